//! Top-k sparsification: which elements to send, and how their indices are packed.
//!
//! Selection finds the k largest magnitudes without sorting: a 2048-bucket histogram of
//! the magnitude's top bits finds the bucket holding the k-th largest, `select_nth_unstable`
//! runs on that bucket only, and a last pass collects the winners in index order (ties at
//! the threshold go to the lowest indices, so selection is deterministic).
//!
//! Index section: indices ascending, stored as gaps (`first`, then `next - previous - 1`),
//! in groups of [`INDEX_GROUP`]; each group is one byte of bit width `w` (0..=32) followed
//! by its gaps packed LSB-first in `ceil(len * w / 8)` bytes.
//!
//! Hot loops are index loops, see `values.rs` for why.
//!
//! Owns: top-k selection and the index section. Must not touch value formats: `values` does.
#![allow(clippy::needless_range_loop)]

/// Gaps per bit-packed group.
pub(crate) const INDEX_GROUP: usize = 128;

const BUCKET_SHIFT: u32 = 20;
/// Above one hit in this many values, scans switch from skipping blocks without hits
/// (branchy, best when hits are rare) to branch-free compaction.
const DENSE_HITS: usize = 16;
const BUCKETS: usize = 1 << (31 - BUCKET_SHIFT);

/// An index section that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IndexSectionError {
    Truncated,
    BitWidth { width: u8 },
    OutOfRange { index: u64, universe: u64 },
}

/// Magnitude of a finite float as an integer with the same order.
#[inline]
fn magnitude_key(value: f32) -> u32 {
    value.to_bits() & 0x7fff_ffff
}

/// Number of elements top-k keeps out of `count`: `ceil(fraction * count)`, at least one
/// of a non-empty tensor.
pub(crate) fn kept_count(fraction: f64, count: usize) -> usize {
    if count == 0 {
        return 0;
    }
    let kept = (fraction * count as f64).ceil();
    if kept >= count as f64 {
        count
    } else {
        (kept as usize).max(1)
    }
}

/// Indices (ascending) of the `k` largest magnitudes of `values` (finite), and those
/// values, into `indices` and `kept`. `candidates` is scratch.
pub(crate) fn select_top_k(
    values: &[f32],
    k: usize,
    candidates: &mut Vec<u32>,
    indices: &mut Vec<u32>,
    kept: &mut Vec<f32>,
) {
    indices.clear();
    kept.clear();
    if k == 0 {
        return;
    }
    if k >= values.len() {
        indices.extend(0..values.len() as u32);
        kept.extend_from_slice(values);
        return;
    }
    let histogram = magnitude_histogram(values);
    // Walk down from the largest bucket until it holds the k-th largest magnitude.
    let mut above = 0usize;
    let mut bucket = 0u32;
    for (index, &count) in histogram.iter().enumerate().rev() {
        if above + count as usize >= k {
            bucket = index as u32;
            break;
        }
        above += count as usize;
    }
    let needed_from_bucket = k - above;

    let in_bucket = histogram[bucket as usize] as usize;
    candidates.clear();
    if (above + in_bucket) * DENSE_HITS < values.len() {
        candidates.reserve(in_bucket);
        for_each_key_at_least(values, bucket << BUCKET_SHIFT, |_, key| {
            if key >> BUCKET_SHIFT == bucket {
                candidates.push(key);
            }
        });
    } else {
        // Many hits: branch-free compaction (write every key, advance past the hits).
        candidates.resize(in_bucket + 1, 0);
        let slots = &mut candidates[..];
        let mut found = 0usize;
        for index in 0..values.len() {
            let key = magnitude_key(values[index]);
            slots[found.min(in_bucket)] = key;
            found += usize::from(key >> BUCKET_SHIFT == bucket);
        }
        candidates.truncate(found.min(in_bucket));
    }
    let split = candidates.len() - needed_from_bucket;
    let (_, &mut threshold, larger) = candidates.select_nth_unstable(split);
    let strictly_larger = larger.iter().filter(|&&key| key > threshold).count();
    let mut ties_to_take = needed_from_bucket - strictly_larger;

    if k * DENSE_HITS < values.len() {
        indices.reserve(k);
        kept.reserve(k);
        for_each_key_at_least(values, threshold, |index, key| {
            if key > threshold || ties_to_take > 0 {
                if key == threshold {
                    ties_to_take -= 1;
                }
                indices.push(index as u32);
                kept.push(values[index]);
            }
        });
    } else {
        indices.resize(k + 1, 0);
        kept.resize(k + 1, 0.0);
        let index_slots = &mut indices[..];
        let kept_slots = &mut kept[..];
        let mut taken = 0usize;
        for index in 0..values.len() {
            let value = values[index];
            let key = magnitude_key(value);
            let tie = key == threshold && ties_to_take > 0;
            // Exactly k keys qualify, so `taken` never passes k.
            let slot = taken.min(k);
            index_slots[slot] = index as u32;
            kept_slots[slot] = value;
            taken += usize::from(key > threshold || tie);
            ties_to_take -= usize::from(tie);
        }
        indices.truncate(k);
        kept.truncate(k);
    }
    debug_assert_eq!(indices.len(), k);
}

/// Calls `hit(index, key)`, in index order, for every value whose magnitude key is at
/// least `low`. Blocks of 16 with no such key (the common case: top-k keeps few) are
/// skipped by a comparison that vectorizes.
#[inline]
fn for_each_key_at_least(values: &[f32], low: u32, mut hit: impl FnMut(usize, u32)) {
    const BLOCK: usize = 16;
    let full = values.len() / BLOCK * BLOCK;
    let mut start = 0;
    while start < full {
        let block = &values[start..start + BLOCK];
        let mut any = false;
        for lane in 0..BLOCK {
            any |= magnitude_key(block[lane]) >= low;
        }
        if any {
            for lane in 0..BLOCK {
                let key = magnitude_key(block[lane]);
                if key >= low {
                    hit(start + lane, key);
                }
            }
        }
        start += BLOCK;
    }
    for index in full..values.len() {
        let key = magnitude_key(values[index]);
        if key >= low {
            hit(index, key);
        }
    }
}

/// Counts of magnitude keys per bucket, in four interleaved histograms so consecutive
/// values in the same bucket do not wait on each other's increment.
fn magnitude_histogram(values: &[f32]) -> Vec<u32> {
    let mut histograms = vec![0u32; 4 * BUCKETS];
    let (lanes, tail) = values.as_chunks::<4>();
    for lane in 0..lanes.len() {
        let quad = lanes[lane];
        for (way, &value) in quad.iter().enumerate() {
            // A finite magnitude key is below 0x7f80_0000, so its bucket is below BUCKETS.
            histograms[way * BUCKETS + (magnitude_key(value) >> BUCKET_SHIFT) as usize] += 1;
        }
    }
    for &value in tail {
        histograms[(magnitude_key(value) >> BUCKET_SHIFT) as usize] += 1;
    }
    let (first, rest) = histograms.split_at_mut(BUCKETS);
    for way in 0..3 {
        let other = &rest[way * BUCKETS..(way + 1) * BUCKETS];
        for bucket in 0..BUCKETS {
            first[bucket] += other[bucket];
        }
    }
    histograms.truncate(BUCKETS);
    histograms
}

/// Most bytes an index section of `count` indices can take.
pub(crate) fn max_index_section_len(count: u64) -> Option<u64> {
    count
        .div_ceil(INDEX_GROUP as u64)
        .checked_add(count.checked_mul(4)?)
}

/// Appends the index section of strictly ascending `indices` to `out`.
pub(crate) fn pack_indices(indices: &[u32], out: &mut Vec<u8>) {
    let mut gaps = [0u32; INDEX_GROUP];
    let mut previous: Option<u32> = None;
    for group in indices.chunks(INDEX_GROUP) {
        let gaps = &mut gaps[..group.len()];
        for (gap, &index) in gaps.iter_mut().zip(group) {
            *gap = match previous {
                Some(previous) => index - previous - 1,
                None => index,
            };
            previous = Some(index);
        }
        let width = 32 - gaps.iter().fold(0, |all, &gap| all | gap).leading_zeros();
        out.push(width as u8);
        let mut bits = 0u64;
        let mut pending = 0u32;
        for &gap in gaps.iter() {
            bits |= u64::from(gap) << pending;
            pending += width;
            while pending >= 8 {
                out.push(bits as u8);
                bits >>= 8;
                pending -= 8;
            }
        }
        if pending > 0 {
            out.push(bits as u8);
        }
    }
}

/// Reads an index section of `count` indices, each below `universe`, into `indices`;
/// returns the number of bytes read.
pub(crate) fn unpack_indices(
    bytes: &[u8],
    count: usize,
    universe: u64,
    indices: &mut Vec<u32>,
) -> Result<usize, IndexSectionError> {
    indices.clear();
    let mut position = 0usize;
    let mut next_index = 0u64;
    let mut remaining = count;
    while remaining > 0 {
        let group_len = remaining.min(INDEX_GROUP);
        remaining -= group_len;
        let width = *bytes.get(position).ok_or(IndexSectionError::Truncated)?;
        position += 1;
        if width > 32 {
            return Err(IndexSectionError::BitWidth { width });
        }
        let packed_len = (group_len * usize::from(width)).div_ceil(8);
        let packed = bytes
            .get(position..position + packed_len)
            .ok_or(IndexSectionError::Truncated)?;
        position += packed_len;
        let mask = (1u64 << width) - 1;
        let mut bits = 0u64;
        let mut available = 0u32;
        let mut packed = packed.iter();
        for _ in 0..group_len {
            while available < u32::from(width) {
                let byte = packed.next().copied().unwrap_or(0);
                bits |= u64::from(byte) << available;
                available += 8;
            }
            let index = next_index + (bits & mask);
            bits >>= width;
            available -= u32::from(width);
            if index >= universe {
                return Err(IndexSectionError::OutOfRange { index, universe });
            }
            // index < universe <= 2^32, so the cast is exact.
            indices.push(index as u32);
            next_index = index + 1;
        }
    }
    Ok(position)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference_top_k(values: &[f32], k: usize) -> Vec<u32> {
        let mut order: Vec<u32> = (0..values.len() as u32).collect();
        // Largest magnitude first, ties by lowest index.
        order.sort_by(|&a, &b| {
            magnitude_key(values[b as usize])
                .cmp(&magnitude_key(values[a as usize]))
                .then(a.cmp(&b))
        });
        order.truncate(k);
        order.sort_unstable();
        order
    }

    proptest! {
        #[test]
        fn top_k_matches_a_full_sort(
            values in proptest::collection::vec(
                prop_oneof![Just(0.0f32), Just(-1.5f32), -1e3f32..1e3, -1e-5f32..1e-5], 0..500),
            fraction in 0.0f64..1.0,
        ) {
            let k = kept_count(fraction, values.len());
            let (mut candidates, mut indices, mut kept) = (Vec::new(), Vec::new(), Vec::new());
            select_top_k(&values, k, &mut candidates, &mut indices, &mut kept);
            prop_assert_eq!(&indices, &reference_top_k(&values, k));
            let expected: Vec<f32> = indices.iter().map(|&index| values[index as usize]).collect();
            prop_assert_eq!(kept, expected);
        }

        #[test]
        fn indices_round_trip(
            universe in 1u64..=(1 << 32),
            picks in proptest::collection::btree_set(any::<u64>(), 0..600),
        ) {
            let indices: Vec<u32> = picks
                .iter()
                .map(|pick| (pick % universe) as u32)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut bytes = Vec::new();
            pack_indices(&indices, &mut bytes);
            prop_assert!(bytes.len() as u64 <= max_index_section_len(indices.len() as u64).unwrap_or(0));
            bytes.push(0xee);
            let mut decoded = Vec::new();
            let used = unpack_indices(&bytes, indices.len(), universe, &mut decoded);
            prop_assert_eq!(used, Ok(bytes.len() - 1));
            prop_assert_eq!(decoded, indices);
        }

        #[test]
        fn unpacking_arbitrary_bytes_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            count in 0usize..400,
            universe in 0u64..=(1 << 32),
        ) {
            let mut decoded = Vec::new();
            if let Ok(used) = unpack_indices(&bytes, count, universe, &mut decoded) {
                prop_assert!(used <= bytes.len());
                prop_assert_eq!(decoded.len(), count);
                prop_assert!(decoded.windows(2).all(|pair| pair[0] < pair[1]));
                prop_assert!(decoded.iter().all(|&index| u64::from(index) < universe));
            }
        }
    }

    #[test]
    fn kept_count_edges() {
        assert_eq!(kept_count(0.01, 0), 0);
        assert_eq!(kept_count(0.01, 10), 1);
        assert_eq!(kept_count(0.01, 1000), 10);
        assert_eq!(kept_count(1.0, 7), 7);
        assert_eq!(kept_count(0.5, 7), 4);
    }

    #[test]
    fn wide_gaps_pack_at_32_bits() {
        let indices = [0, u32::MAX];
        let mut bytes = Vec::new();
        pack_indices(&indices, &mut bytes);
        assert_eq!(bytes[0], 32);
        let mut decoded = Vec::new();
        assert_eq!(
            unpack_indices(&bytes, 2, 1 << 32, &mut decoded),
            Ok(bytes.len())
        );
        assert_eq!(decoded, indices);
        assert!(matches!(
            unpack_indices(&bytes, 2, u64::from(u32::MAX), &mut decoded),
            Err(IndexSectionError::OutOfRange { .. })
        ));
    }
}
