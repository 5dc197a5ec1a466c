//! The per-tensor delta codec: tensors in, one blob plus a tensor index out, and back.
//!
//! Owns: [`CodecParams`] (what a sender asks for), [`TensorEncoding`] (what one tensor's
//! segment actually is; recorded in the manifest's tensor index), [`ErrorFeedback`], and
//! the encode/decode entry points. Must not touch: chunking and hashing of the blob
//! ([`crate::chunk`]), message framing ([`crate::manifest`]).
//!
//! A blob is the concatenation of one segment per tensor, in name order. A segment is
//! `zstd?(indices? ++ values)`:
//! - `indices` (top-k only): the kept positions, delta-encoded and bit-packed
//!   (see `sparse.rs`);
//! - or, for a low-rank segment, the two factors' value sections instead (see `lowrank.rs`);
//! - `values`: the dense tensor, or the kept values, in a [`ValueFormat`], optionally
//!   byte-shuffled (see `values.rs`);
//! - zstd is applied per segment and kept only where it makes the segment smaller, so
//!   [`TensorEncoding::zstd`] can differ between tensors of one blob.
//!
//! Decoding never writes into caller state: every tensor is decoded into a fresh buffer,
//! checked (lengths, scales, indices, finiteness), and only a fully decoded and
//! validated [`TensorSet`] is handed back. Encoding checks everything (finiteness, ranges,
//! residual shapes) before it updates the first error-feedback residual.

mod decode;
mod encode;
mod feedback;
mod lowrank;
mod params;
mod sparse;
mod values;

pub use decode::{DecodeError, ModelState, decode_delta, decode_state, decode_state_file};
pub(crate) use decode::{check_layout, decode_entries};
pub use encode::{
    EncodeError, EncodedDelta, EncodedState, EncodedStateIndex, StateCodecParams, encode_delta,
    encode_state, encode_state_to,
};
pub use feedback::ErrorFeedback;
pub use params::{
    CodecParams, MAX_LOW_RANK, ParseCodecParamsError, Sparsity, TensorEncoding, ValueFormat,
};

pub(crate) const NON_FINITE_KEY: u32 = 0x7f80_0000;
const MAGNITUDE_MASK: u32 = 0x7fff_ffff;
const KEY_LANES: usize = 8;

/// Largest `bits & 0x7fff_ffff` of `values`: at least [`NON_FINITE_KEY`] iff one of them is
/// NaN or infinite; otherwise the bits of the largest magnitude. Branch-free, vectorizes.
/// (Hot loops here are index loops; see `values.rs` for why.)
#[allow(clippy::needless_range_loop)]
pub(crate) fn largest_magnitude_key(values: &[f32]) -> u32 {
    let mut lanes = [0u32; KEY_LANES];
    let full = values.len() / KEY_LANES * KEY_LANES;
    let mut start = 0;
    while start < full {
        let chunk = &values[start..start + KEY_LANES];
        for lane in 0..KEY_LANES {
            lanes[lane] = lanes[lane].max(chunk[lane].to_bits() & MAGNITUDE_MASK);
        }
        start += KEY_LANES;
    }
    let mut largest = 0;
    for &lane in &lanes {
        largest = largest.max(lane);
    }
    for &value in &values[full..] {
        largest = largest.max(value.to_bits() & MAGNITUDE_MASK);
    }
    largest
}

/// [`largest_magnitude_key`] of `values + carried`, element-wise, as f32 additions.
#[allow(clippy::needless_range_loop)]
pub(crate) fn largest_sum_key(values: &[f32], carried: &[f32]) -> u32 {
    let carried = &carried[..values.len()];
    let mut lanes = [0u32; KEY_LANES];
    let full = values.len() / KEY_LANES * KEY_LANES;
    let mut start = 0;
    while start < full {
        let chunk = &values[start..start + KEY_LANES];
        let carried_chunk = &carried[start..start + KEY_LANES];
        for lane in 0..KEY_LANES {
            lanes[lane] =
                lanes[lane].max((chunk[lane] + carried_chunk[lane]).to_bits() & MAGNITUDE_MASK);
        }
        start += KEY_LANES;
    }
    let mut largest = 0;
    for &lane in &lanes {
        largest = largest.max(lane);
    }
    for index in full..values.len() {
        largest = largest.max((values[index] + carried[index]).to_bits() & MAGNITUDE_MASK);
    }
    largest
}

/// Index of the first NaN or infinity.
pub(crate) fn first_non_finite(values: &[f32]) -> Option<usize> {
    if largest_magnitude_key(values) < NON_FINITE_KEY {
        return None;
    }
    values.iter().position(|value| !value.is_finite())
}

#[allow(clippy::needless_range_loop)]
pub(crate) fn add_assign(target: &mut [f32], values: &[f32]) {
    let values = &values[..target.len()];
    for index in 0..target.len() {
        target[index] += values[index];
    }
}

#[allow(clippy::needless_range_loop)]
pub(crate) fn sub_assign(target: &mut [f32], values: &[f32]) {
    let values = &values[..target.len()];
    for index in 0..target.len() {
        target[index] -= values[index];
    }
}

/// `target[indices[j]] = values[j]`; indices are below `target.len()`.
#[allow(clippy::needless_range_loop)]
pub(crate) fn scatter(target: &mut [f32], indices: &[u32], values: &[f32]) {
    let values = &values[..indices.len()];
    for j in 0..indices.len() {
        target[indices[j] as usize] = values[j];
    }
}

/// `target[indices[j]] -= values[j]`; indices are below `target.len()`.
#[allow(clippy::needless_range_loop)]
pub(crate) fn scatter_sub(target: &mut [f32], indices: &[u32], values: &[f32]) {
    let values = &values[..indices.len()];
    for j in 0..indices.len() {
        target[indices[j] as usize] -= values[j];
    }
}
