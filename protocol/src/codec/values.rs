//! The value section of a tensor segment: `count` f32 values in one [`ValueFormat`].
//!
//! Layouts (all little-endian):
//! - `F32`: 4 bytes per value. `F16`, `Bf16`: 2 bytes per value (IEEE binary16 / bfloat16,
//!   round to nearest even).
//! - `Int8 { block_size }`: one f32 scale per block of `block_size` values, then one
//!   signed byte per value; a value is `q * scale`, `scale = absmax(block) / 127`.
//! - `Int4 { block_size }`: the same with `scale = absmax(block) / 7` and two values per
//!   byte (low nibble first) stored as `q + 8`.
//!
//! With byte shuffle, every float array (the values of `F32`/`F16`/`Bf16`, the scales of
//! `Int8`/`Int4`) is stored as byte planes: all first bytes, then all second bytes, ...
//! which groups the slowly varying exponent bytes together for zstd.
//!
//! Hot loops work on whole slices with no per-element allocation or branching, so that
//! they auto-vectorize. They are plain index loops over slices cut to equal length (bounds
//! checks disappear): iterator adapters (`zip`, `chunks_exact`) call core helpers that are
//! not inlined across codegen units when the release profile disables LTO, which made
//! these loops much slower (docs/BENCHMARKS.md, "Delta codec").
//!
//! Owns: the value formats, quantization and byte shuffle. Must not choose which values to
//! send: `sparse` does.
#![allow(clippy::needless_range_loop)]

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use super::ValueFormat;

/// Blocks whose absolute maximum is below this are sent as zeros (scale 0). Keeps
/// `levels / absmax` finite; far below any real weight delta.
pub(crate) const QUANT_FLUSH_BELOW: f32 = 1e-30;

/// `1.5 * 2^23`: adding it to a float of magnitude below `2^22` leaves the value rounded
/// to the nearest integer (ties to even) in the low mantissa bits.
const ROUNDING_MAGIC: f32 = 12_582_912.0;

/// A value section that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ValueSectionError {
    Length { expected: u64, found: u64 },
    InvalidScale { block: usize },
}

/// Reusable buffers, so encoding and decoding allocate once per call, not per tensor.
#[derive(Default)]
pub(crate) struct ValueScratch {
    halves: Vec<f16>,
    words: Vec<u16>,
    quants: Vec<u8>,
    scales: Vec<f32>,
}

pub(crate) fn quant_levels(format: ValueFormat) -> Option<f32> {
    match format {
        ValueFormat::Int8 { .. } => Some(127.0),
        ValueFormat::Int4 { .. } => Some(7.0),
        _ => None,
    }
}

/// Bytes of a value section holding `count` values; `None` for a zero block size or on
/// overflow.
pub(crate) fn value_section_len(format: ValueFormat, count: u64) -> Option<u64> {
    match format {
        ValueFormat::F32 => count.checked_mul(4),
        ValueFormat::F16 | ValueFormat::Bf16 => count.checked_mul(2),
        ValueFormat::Int8 { block_size } => scale_bytes(count, block_size)?.checked_add(count),
        ValueFormat::Int4 { block_size } => {
            scale_bytes(count, block_size)?.checked_add(count.div_ceil(2))
        }
    }
}

fn scale_bytes(count: u64, block_size: u32) -> Option<u64> {
    if block_size == 0 {
        return None;
    }
    count.div_ceil(u64::from(block_size)).checked_mul(4)
}

/// Whether every value of magnitude at most `absmax` survives `format` without becoming
/// infinite.
pub(crate) fn fits_format(format: ValueFormat, absmax: f32) -> bool {
    match format {
        ValueFormat::F32 => absmax.is_finite(),
        // Values from 65520 up round to infinity in binary16.
        ValueFormat::F16 => absmax < 65520.0,
        // Values from 0x7f7f8000 up round (to even) to infinity in bfloat16.
        ValueFormat::Bf16 => absmax.to_bits() < 0x7f7f_8000,
        ValueFormat::Int8 { .. } | ValueFormat::Int4 { .. } => {
            let levels = quant_levels(format).unwrap_or(1.0);
            (absmax / levels * levels).is_finite()
        }
    }
}

/// Appends the value section of `values` to `out`. The caller has checked
/// [`fits_format`] and that the values are finite.
pub(crate) fn encode_values(
    format: ValueFormat,
    values: &[f32],
    byte_shuffle: bool,
    scratch: &mut ValueScratch,
    out: &mut Vec<u8>,
) {
    let count = values.len();
    let len = value_section_len(format, count as u64).unwrap_or(0) as usize;
    let start = out.len();
    out.resize(start + len, 0);
    let section = &mut out[start..];
    match format {
        ValueFormat::F32 => put_f32s(values, byte_shuffle, section),
        ValueFormat::F16 => {
            scratch.halves.clear();
            scratch.halves.resize(count, f16::ZERO);
            scratch.halves.convert_from_f32_slice(values);
            put_u16s(scratch.halves.reinterpret_cast(), byte_shuffle, section);
        }
        ValueFormat::Bf16 => {
            scratch.words.clear();
            scratch.words.resize(count, 0);
            encode_bf16(values, &mut scratch.words);
            put_u16s(&scratch.words, byte_shuffle, section);
        }
        ValueFormat::Int8 { block_size } | ValueFormat::Int4 { block_size } => {
            let block_size = block_size as usize;
            let levels = quant_levels(format).unwrap_or(1.0);
            let blocks = count.div_ceil(block_size);
            let (scale_section, quant_section) = section.split_at_mut(blocks * 4);
            scratch.scales.clear();
            scratch.scales.resize(blocks, 0.0);
            if matches!(format, ValueFormat::Int8 { .. }) {
                quantize_blocks(
                    values,
                    block_size,
                    levels,
                    &mut scratch.scales,
                    quant_section,
                );
            } else {
                scratch.quants.clear();
                scratch.quants.resize(count, 0);
                quantize_blocks(
                    values,
                    block_size,
                    levels,
                    &mut scratch.scales,
                    &mut scratch.quants,
                );
                pack_nibbles(&scratch.quants, quant_section);
            }
            put_f32s(&scratch.scales, byte_shuffle, scale_section);
        }
    }
}

/// Decodes a value section of exactly `out.len()` values into `out`.
pub(crate) fn decode_values(
    format: ValueFormat,
    section: &[u8],
    byte_shuffle: bool,
    scratch: &mut ValueScratch,
    out: &mut [f32],
) -> Result<(), ValueSectionError> {
    let count = out.len();
    let expected = value_section_len(format, count as u64).ok_or(ValueSectionError::Length {
        expected: u64::MAX,
        found: section.len() as u64,
    })?;
    if expected != section.len() as u64 {
        return Err(ValueSectionError::Length {
            expected,
            found: section.len() as u64,
        });
    }
    match format {
        ValueFormat::F32 => get_f32s(section, byte_shuffle, out),
        ValueFormat::F16 => {
            scratch.words.clear();
            scratch.words.resize(count, 0);
            get_u16s(section, byte_shuffle, &mut scratch.words);
            scratch
                .words
                .reinterpret_cast::<f16>()
                .convert_to_f32_slice(out);
        }
        ValueFormat::Bf16 => {
            scratch.words.clear();
            scratch.words.resize(count, 0);
            get_u16s(section, byte_shuffle, &mut scratch.words);
            decode_bf16(&scratch.words, out);
        }
        ValueFormat::Int8 { block_size } | ValueFormat::Int4 { block_size } => {
            let block_size = block_size as usize;
            let blocks = count.div_ceil(block_size);
            let (scale_section, quant_section) = section.split_at(blocks * 4);
            scratch.scales.clear();
            scratch.scales.resize(blocks, 0.0);
            get_f32s(scale_section, byte_shuffle, &mut scratch.scales);
            // A scale must be finite and non-negative (+0.0 included, -0.0 not): the
            // encoder never writes anything else.
            if let Some(block) = scratch
                .scales
                .iter()
                .position(|scale| scale.to_bits() >= 0x7f80_0000)
            {
                return Err(ValueSectionError::InvalidScale { block });
            }
            if matches!(format, ValueFormat::Int8 { .. }) {
                dequantize_blocks(quant_section, block_size, &scratch.scales, out);
            } else {
                scratch.quants.clear();
                scratch.quants.resize(count, 0);
                unpack_nibbles(quant_section, &mut scratch.quants);
                dequantize_blocks(&scratch.quants, block_size, &scratch.scales, out);
            }
        }
    }
    Ok(())
}

/// float -> bfloat16 bits, round to nearest even; input finite.
fn bf16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

fn encode_bf16(values: &[f32], words: &mut [u16]) {
    let words = &mut words[..values.len()];
    for i in 0..values.len() {
        words[i] = bf16_bits(values[i]);
    }
}

fn decode_bf16(words: &[u16], out: &mut [f32]) {
    let words = &words[..out.len()];
    for i in 0..out.len() {
        out[i] = f32::from_bits(u32::from(words[i]) << 16);
    }
}

/// Largest magnitude in `values` (finite input), in 16 independent lanes so the loop
/// vectorizes.
pub(crate) fn absmax(values: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let full = values.len() / LANES * LANES;
    let mut start = 0;
    while start < full {
        let chunk = &values[start..start + LANES];
        for lane in 0..LANES {
            let magnitude = chunk[lane].abs();
            lanes[lane] = if magnitude > lanes[lane] {
                magnitude
            } else {
                lanes[lane]
            };
        }
        start += LANES;
    }
    let mut max = 0f32;
    for &magnitude in &lanes {
        max = max.max(magnitude);
    }
    for &value in &values[full..] {
        max = max.max(value.abs());
    }
    max
}

fn round_half_even(value: f32) -> i32 {
    (value + ROUNDING_MAGIC).to_bits() as i32 - ROUNDING_MAGIC.to_bits() as i32
}

fn quantize_blocks(
    values: &[f32],
    block_size: usize,
    levels: f32,
    scales: &mut [f32],
    quants: &mut [u8],
) {
    let mut start = 0;
    let mut block = 0;
    while start < values.len() {
        let end = (start + block_size).min(values.len());
        let block_values = &values[start..end];
        let quant_block = &mut quants[start..end];
        let block_max = absmax(block_values);
        if block_max < QUANT_FLUSH_BELOW {
            scales[block] = 0.0;
            quant_block.fill(0);
        } else {
            scales[block] = block_max / levels;
            let inverse = levels / block_max;
            for i in 0..block_values.len() {
                quant_block[i] = round_half_even(block_values[i] * inverse) as i8 as u8;
            }
        }
        start = end;
        block += 1;
    }
}

fn dequantize_blocks(quants: &[u8], block_size: usize, scales: &[f32], out: &mut [f32]) {
    let mut start = 0;
    let mut block = 0;
    while start < out.len() {
        let end = (start + block_size).min(out.len());
        let scale = scales[block];
        let quant_block = &quants[start..end];
        let out_block = &mut out[start..end];
        for i in 0..out_block.len() {
            out_block[i] = f32::from(quant_block[i] as i8) * scale;
        }
        start = end;
        block += 1;
    }
}

fn pack_nibbles(quants: &[u8], packed: &mut [u8]) {
    let pairs = quants.len() / 2;
    let packed_pairs = &mut packed[..pairs];
    let quants_pairs = &quants[..pairs * 2];
    for i in 0..pairs {
        let low = quants_pairs[2 * i].wrapping_add(8) & 0x0f;
        let high = quants_pairs[2 * i + 1].wrapping_add(8) & 0x0f;
        packed_pairs[i] = low | (high << 4);
    }
    if quants.len() % 2 == 1 {
        packed[pairs] = quants[pairs * 2].wrapping_add(8) & 0x0f;
    }
}

fn unpack_nibbles(packed: &[u8], quants: &mut [u8]) {
    let pairs = quants.len() / 2;
    let packed_pairs = &packed[..pairs];
    let quants_pairs = &mut quants[..pairs * 2];
    for i in 0..pairs {
        let byte = packed_pairs[i];
        quants_pairs[2 * i] = (byte & 0x0f).wrapping_sub(8);
        quants_pairs[2 * i + 1] = (byte >> 4).wrapping_sub(8);
    }
    if quants.len() % 2 == 1 {
        quants[pairs * 2] = (packed[pairs] & 0x0f).wrapping_sub(8);
    }
}

fn put_f32s(values: &[f32], byte_shuffle: bool, out: &mut [u8]) {
    let count = values.len();
    if byte_shuffle {
        let (plane0, rest) = out.split_at_mut(count);
        let (plane1, rest) = rest.split_at_mut(count);
        let (plane2, plane3) = rest.split_at_mut(count);
        let plane3 = &mut plane3[..count];
        for i in 0..count {
            let bytes = values[i].to_le_bytes();
            plane0[i] = bytes[0];
            plane1[i] = bytes[1];
            plane2[i] = bytes[2];
            plane3[i] = bytes[3];
        }
    } else {
        let (words, _) = out[..count * 4].as_chunks_mut::<4>();
        let words = &mut words[..count];
        for i in 0..count {
            words[i] = values[i].to_le_bytes();
        }
    }
}

fn get_f32s(bytes: &[u8], byte_shuffle: bool, out: &mut [f32]) {
    let count = out.len();
    if byte_shuffle {
        let (plane0, rest) = bytes.split_at(count);
        let (plane1, rest) = rest.split_at(count);
        let (plane2, plane3) = rest.split_at(count);
        let plane3 = &plane3[..count];
        for i in 0..count {
            out[i] = f32::from_le_bytes([plane0[i], plane1[i], plane2[i], plane3[i]]);
        }
    } else {
        let (words, _) = bytes[..count * 4].as_chunks::<4>();
        let words = &words[..count];
        for i in 0..count {
            out[i] = f32::from_le_bytes(words[i]);
        }
    }
}

fn put_u16s(words: &[u16], byte_shuffle: bool, out: &mut [u8]) {
    let count = words.len();
    if byte_shuffle {
        let (low, high) = out.split_at_mut(count);
        let high = &mut high[..count];
        for i in 0..count {
            let bytes = words[i].to_le_bytes();
            low[i] = bytes[0];
            high[i] = bytes[1];
        }
    } else {
        let (pairs, _) = out[..count * 2].as_chunks_mut::<2>();
        let pairs = &mut pairs[..count];
        for i in 0..count {
            pairs[i] = words[i].to_le_bytes();
        }
    }
}

fn get_u16s(bytes: &[u8], byte_shuffle: bool, out: &mut [u16]) {
    let count = out.len();
    if byte_shuffle {
        let (low, high) = bytes.split_at(count);
        let high = &high[..count];
        for i in 0..count {
            out[i] = u16::from_le_bytes([low[i], high[i]]);
        }
    } else {
        let (pairs, _) = bytes[..count * 2].as_chunks::<2>();
        let pairs = &pairs[..count];
        for i in 0..count {
            out[i] = u16::from_le_bytes(pairs[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FORMATS: [ValueFormat; 7] = [
        ValueFormat::F32,
        ValueFormat::F16,
        ValueFormat::Bf16,
        ValueFormat::Int8 { block_size: 1 },
        ValueFormat::Int8 { block_size: 7 },
        ValueFormat::Int4 { block_size: 3 },
        ValueFormat::Int4 { block_size: 64 },
    ];

    fn round_trip(format: ValueFormat, values: &[f32], byte_shuffle: bool) -> Vec<f32> {
        let mut scratch = ValueScratch::default();
        let mut bytes = vec![0xaa];
        encode_values(format, values, byte_shuffle, &mut scratch, &mut bytes);
        assert_eq!(
            bytes.len() as u64 - 1,
            value_section_len(format, values.len() as u64).unwrap_or(0)
        );
        let mut out = vec![0.0; values.len()];
        decode_values(format, &bytes[1..], byte_shuffle, &mut scratch, &mut out).expect("decodes");
        out
    }

    fn finite_value() -> impl Strategy<Value = f32> {
        prop_oneof![
            Just(0.0f32),
            -1.0e4f32..1.0e4,
            (-1.0f32..1.0).prop_map(|value| value * 1e-4),
            (any::<bool>(), 1e-20f32..1e20).prop_map(|(negative, value)| if negative {
                -value
            } else {
                value
            }),
        ]
    }

    proptest! {
        #[test]
        fn lossless_and_half_precision_round_trip(
            values in proptest::collection::vec(finite_value(), 0..300),
            byte_shuffle: bool,
        ) {
            prop_assert_eq!(round_trip(ValueFormat::F32, &values, byte_shuffle), values.clone());
            let bf16 = round_trip(ValueFormat::Bf16, &values, byte_shuffle);
            for (&value, &decoded) in values.iter().zip(&bf16) {
                prop_assert_eq!(decoded, half::bf16::from_f32(value).to_f32());
            }
            let small: Vec<f32> = values.iter().map(|value| value.clamp(-6e4, 6e4)).collect();
            let f16 = round_trip(ValueFormat::F16, &small, byte_shuffle);
            for (&value, &decoded) in small.iter().zip(&f16) {
                prop_assert_eq!(decoded, half::f16::from_f32(value).to_f32());
            }
        }

        /// The bound of the issue: per-element error at most scale/2, scale = absmax/127
        /// (int8) or absmax/7 (int4) of the block, up to float rounding of the scale.
        #[test]
        fn quantization_error_is_at_most_half_a_step(
            values in proptest::collection::vec(finite_value(), 0..300),
            block_size in 1u32..80,
            byte_shuffle: bool,
        ) {
            for (format, levels) in [
                (ValueFormat::Int8 { block_size }, 127.0f32),
                (ValueFormat::Int4 { block_size }, 7.0f32),
            ] {
                let decoded = round_trip(format, &values, byte_shuffle);
                for (block, decoded_block) in values.chunks(block_size as usize).zip(decoded.chunks(block_size as usize)) {
                    let block_max = absmax(block);
                    let scale = block_max / levels;
                    for (&value, &decoded) in block.iter().zip(decoded_block) {
                        let error = (value - decoded).abs();
                        let bound = if block_max < QUANT_FLUSH_BELOW {
                            block_max
                        } else {
                            scale / 2.0 + block_max * 4.0 * f32::EPSILON
                        };
                        prop_assert!(error <= bound, "{format:?} value {value} decoded {decoded} error {error} bound {bound}");
                    }
                }
            }
        }

        #[test]
        fn decoding_arbitrary_sections_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            count in 0usize..100,
            format_index in 0usize..FORMATS.len(),
            byte_shuffle: bool,
        ) {
            let mut out = vec![0.0; count];
            let _ = decode_values(FORMATS[format_index], &bytes, byte_shuffle, &mut ValueScratch::default(), &mut out);
        }
    }

    #[test]
    fn every_format_round_trips_exact_grid_values() {
        // Multiples of 1/8 up to 7/8 * 7 survive every format exactly.
        let values: Vec<f32> = (-7..=7).map(|step| step as f32 / 8.0 * 7.0 / 7.0).collect();
        for format in FORMATS {
            for byte_shuffle in [false, true] {
                let decoded = round_trip(format, &values, byte_shuffle);
                assert_eq!(decoded.len(), values.len());
                if !matches!(format, ValueFormat::Int4 { .. } | ValueFormat::Int8 { .. }) {
                    assert_eq!(decoded, values, "{format:?}");
                }
            }
        }
    }

    #[test]
    fn refuses_negative_and_non_finite_scales() {
        let format = ValueFormat::Int8 { block_size: 2 };
        let mut section = (-1.0f32).to_le_bytes().to_vec();
        section.extend_from_slice(&[1, 2]);
        let mut out = [0.0; 2];
        assert_eq!(
            decode_values(
                format,
                &section,
                false,
                &mut ValueScratch::default(),
                &mut out
            ),
            Err(ValueSectionError::InvalidScale { block: 0 })
        );
        section[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(
            decode_values(
                format,
                &section,
                false,
                &mut ValueScratch::default(),
                &mut out
            )
            .is_err()
        );
    }

    #[test]
    fn range_checks_match_the_formats() {
        assert!(fits_format(ValueFormat::F16, 65519.0));
        assert!(!fits_format(ValueFormat::F16, 65520.0));
        assert!(fits_format(ValueFormat::Bf16, half::bf16::MAX.to_f32()));
        assert!(!fits_format(ValueFormat::Bf16, f32::MAX));
        assert!(fits_format(ValueFormat::Int8 { block_size: 4 }, 1e38));
        assert!(!fits_format(ValueFormat::F32, f32::INFINITY));
    }
}
