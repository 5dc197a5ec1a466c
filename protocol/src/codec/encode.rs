//! Encoding: tensors (plus error-feedback residuals) in, one blob and its tensor index out.
//!
//! Every check that can fail runs before the first residual is updated (with feedback) or
//! before each tensor is encoded (without). zstd is an optimization: where it fails or
//! does not shrink a segment, the segment is stored raw.
//!
//! Owns: the encoder and the update of error-feedback residuals. Must not define chunk lists
//! or hashes: it feeds [`crate::chunk`]'s builder, which does.

use super::lowrank::{Factorizer, matrix_dims, reconstruct, saves};
use super::sparse::{kept_count, max_index_section_len, pack_indices, select_top_k};
use super::values::{ValueScratch, decode_values, encode_values, fits_format, value_section_len};
use super::{
    CodecParams, ErrorFeedback, NON_FINITE_KEY, Sparsity, TensorEncoding, ValueFormat, add_assign,
    largest_magnitude_key, largest_sum_key, scatter_sub, sub_assign,
};
use crate::hash::ModelHash;
use crate::manifest::TensorEntry;
use crate::tensor::{Tensor, TensorSet};

/// A delta or state that cannot be encoded. Returned before any error-feedback residual
/// was changed (except [`EncodeError::SelfCheckFailed`], which is a bug).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    /// Writing a streamed state failed.
    #[error("writing the state: {0}")]
    Write(String),
    /// Parameters out of range.
    #[error("invalid codec parameters: {reason}")]
    InvalidParams {
        /// What is wrong.
        reason: &'static str,
    },
    /// A NaN or infinity in the input.
    #[error("tensor {tensor:?}: value at index {index} is not finite")]
    NonFinite {
        /// Tensor name.
        tensor: String,
        /// First bad element.
        index: usize,
    },
    /// The input plus the carried residual overflows.
    #[error("tensor {tensor:?}: value plus error-feedback residual at index {index} is not finite")]
    NonFiniteWithResidual {
        /// Tensor name.
        tensor: String,
        /// First bad element.
        index: usize,
    },
    /// A value too large for the value format (it would decode as infinity).
    #[error("tensor {tensor:?}: largest magnitude {absmax} does not fit {format}")]
    OutOfRange {
        /// Tensor name.
        tensor: String,
        /// The format asked for.
        format: ValueFormat,
        /// The largest magnitude found.
        absmax: f32,
    },
    /// A stored residual with a different length than the tensor.
    #[error("tensor {tensor:?}: error-feedback residual has {found} values, the tensor {expected}")]
    FeedbackShapeMismatch {
        /// Tensor name.
        tensor: String,
        /// Tensor length.
        expected: usize,
        /// Residual length.
        found: usize,
    },
    /// A tensor too large for `u32` sparse indices.
    #[error("tensor {tensor:?}: {elements} elements is too many for top-k (u32 indices)")]
    TooManyElements {
        /// Tensor name.
        tensor: String,
        /// Its length.
        elements: usize,
    },
    /// The encoder could not decode its own output.
    #[error("tensor {tensor:?}: the encoder could not decode its own output (bug)")]
    SelfCheckFailed {
        /// Tensor name.
        tensor: String,
    },
}

/// A delta encoded into one blob, and its tensor index for the [`crate::DeltaManifest`].
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedDelta {
    /// Tensor index: name, shape, encoding, segment of each tensor.
    pub tensors: Vec<TensorEntry>,
    /// The blob (chunk it with [`crate::chunk_blob`]).
    pub blob: Vec<u8>,
}

/// Encodes `delta` with `params`. With `feedback`, the stored residual of each tensor is
/// added first, and what the receivers will not see (the sum minus what they decode) is
/// stored as the new residual.
pub fn encode_delta(
    delta: &TensorSet,
    params: &CodecParams,
    mut feedback: Option<&mut ErrorFeedback>,
) -> Result<EncodedDelta, EncodeError> {
    params.validate()?;
    // With feedback every tensor is checked before the first residual changes; without,
    // each tensor is checked just before it is encoded (while it is still in cache), and
    // an error only drops the partial blob.
    if feedback.is_some() {
        for tensor in delta.tensors() {
            check_tensor(tensor, params, feedback.as_deref())?;
        }
    }
    let mut encoder = SegmentEncoder::new(*params);
    let mut blob = Vec::with_capacity(encoder.raw_size_estimate(delta));
    let mut tensors = Vec::with_capacity(delta.len());
    for tensor in delta.tensors() {
        let residual = match feedback.as_deref_mut() {
            Some(feedback) => Some(feedback.residual_mut(&tensor.name, tensor.values.len())),
            None => {
                check_tensor(tensor, params, None)?;
                None
            }
        };
        tensors.push(encoder.encode_tensor(tensor, residual, &mut blob)?);
    }
    Ok(EncodedDelta { tensors, blob })
}

/// Options for [`encode_state`]; states are always dense f32 (lossless), so that the
/// decoded model reproduces its [`ModelHash`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateCodecParams {
    /// Byte-shuffle before zstd.
    pub byte_shuffle: bool,
    /// zstd level; `None` for none.
    pub zstd_level: Option<i32>,
}

impl Default for StateCodecParams {
    fn default() -> Self {
        Self {
            byte_shuffle: true,
            zstd_level: Some(3),
        }
    }
}

/// A model and optimizer state encoded into one blob (model segments first).
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedState {
    /// [`ModelHash::of_tensors`] of the model.
    pub model_hash: ModelHash,
    /// Tensor index of the model.
    pub model: Vec<TensorEntry>,
    /// Tensor index of the optimizer state.
    pub optimizer: Vec<TensorEntry>,
    /// The blob.
    pub blob: Vec<u8>,
}

/// Encodes a full state losslessly, for [`crate::StateManifest`].
pub fn encode_state(
    model: &TensorSet,
    optimizer: &TensorSet,
    params: &StateCodecParams,
) -> Result<EncodedState, EncodeError> {
    let codec = CodecParams {
        values: ValueFormat::F32,
        sparsity: Sparsity::Dense,
        byte_shuffle: params.byte_shuffle,
        zstd_level: params.zstd_level,
    };
    codec.validate()?;
    let mut encoder = SegmentEncoder::new(codec);
    let mut blob =
        Vec::with_capacity(encoder.raw_size_estimate(model) + encoder.raw_size_estimate(optimizer));
    let mut encode_all = |set: &TensorSet, blob: &mut Vec<u8>| {
        set.tensors()
            .iter()
            .map(|tensor| {
                check_tensor(tensor, &codec, None)?;
                encoder.encode_tensor(tensor, None, blob)
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let model_entries = encode_all(model, &mut blob)?;
    let optimizer_entries = encode_all(optimizer, &mut blob)?;
    Ok(EncodedState {
        model_hash: ModelHash::of_tensors(model),
        model: model_entries,
        optimizer: optimizer_entries,
        blob,
    })
}

/// The index of a state written by [`encode_state_to`] (its bytes went to the writer).
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedStateIndex {
    /// [`ModelHash::of_tensors`] of the model.
    pub model_hash: ModelHash,
    /// Tensor index of the model.
    pub model: Vec<TensorEntry>,
    /// Tensor index of the optimizer state.
    pub optimizer: Vec<TensorEntry>,
}

/// [`encode_state`] streamed to `out` tensor by tensor, so memory holds one encoded tensor
/// at a time instead of the whole blob (a 3B-parameter state is 12 GB), with the chunk list
/// of the bytes written (`chunk_size` bytes per chunk). Writes exactly the bytes
/// [`encode_state`] returns.
pub fn encode_state_to(
    model: &TensorSet,
    optimizer: &TensorSet,
    params: &StateCodecParams,
    out: &mut impl std::io::Write,
    chunk_size: u32,
) -> Result<(EncodedStateIndex, crate::ChunkList), EncodeError> {
    let codec = CodecParams {
        values: ValueFormat::F32,
        sparsity: Sparsity::Dense,
        byte_shuffle: params.byte_shuffle,
        zstd_level: params.zstd_level,
    };
    codec.validate()?;
    let mut chunks =
        crate::ChunkListBuilder::new(chunk_size).map_err(|_| EncodeError::InvalidParams {
            reason: "chunk size must be at least 1 byte",
        })?;
    let mut encoder = SegmentEncoder::new(codec);
    let mut segment = Vec::new();
    let mut offset = 0u64;
    let mut encode_all = |set: &TensorSet| {
        set.tensors()
            .iter()
            .map(|tensor| {
                check_tensor(tensor, &codec, None)?;
                segment.clear();
                let mut entry = encoder.encode_tensor(tensor, None, &mut segment)?;
                entry.offset = offset;
                out.write_all(&segment)
                    .map_err(|err| EncodeError::Write(err.to_string()))?;
                chunks.update(&segment);
                offset += segment.len() as u64;
                Ok(entry)
            })
            .collect::<Result<Vec<_>, EncodeError>>()
    };
    let model_entries = encode_all(model)?;
    let optimizer_entries = encode_all(optimizer)?;
    out.flush()
        .map_err(|err| EncodeError::Write(err.to_string()))?;
    Ok((
        EncodedStateIndex {
            model_hash: ModelHash::of_tensors(model),
            model: model_entries,
            optimizer: optimizer_entries,
        },
        chunks.finish(),
    ))
}

/// Checks everything that could make encoding `tensor` fail: size, finiteness (also after
/// adding its residual), range of the value format, residual shape.
fn check_tensor(
    tensor: &Tensor,
    params: &CodecParams,
    feedback: Option<&ErrorFeedback>,
) -> Result<(), EncodeError> {
    let name = || tensor.name.clone();
    let elements = tensor.values.len();
    if matches!(params.sparsity, Sparsity::TopK { .. }) && elements as u64 > u64::from(u32::MAX) {
        return Err(EncodeError::TooManyElements {
            tensor: name(),
            elements,
        });
    }
    let values_key = largest_magnitude_key(&tensor.values);
    if values_key >= NON_FINITE_KEY {
        let index = tensor
            .values
            .iter()
            .position(|value| !value.is_finite())
            .unwrap_or(0);
        return Err(EncodeError::NonFinite {
            tensor: name(),
            index,
        });
    }
    let largest_key = match feedback.and_then(|feedback| feedback.residual(&tensor.name)) {
        None => values_key,
        Some(residual) if residual.len() != elements => {
            return Err(EncodeError::FeedbackShapeMismatch {
                tensor: name(),
                expected: elements,
                found: residual.len(),
            });
        }
        Some(residual) => {
            let sum_key = largest_sum_key(&tensor.values, residual);
            if sum_key >= NON_FINITE_KEY {
                let index = tensor
                    .values
                    .iter()
                    .zip(residual)
                    .position(|(value, carried)| !(value + carried).is_finite())
                    .unwrap_or(0);
                return Err(EncodeError::NonFiniteWithResidual {
                    tensor: name(),
                    index,
                });
            }
            sum_key
        }
    };
    let mut absmax = f32::from_bits(largest_key);
    if let Some((rows, _, _)) = low_rank_dims(params, &tensor.shape) {
        // A factor entry of Q is at most the norm of a column: sqrt(rows) * absmax.
        absmax *= (rows as f32).sqrt();
    }
    if !fits_format(params.values, absmax) {
        return Err(EncodeError::OutOfRange {
            tensor: name(),
            format: params.values,
            absmax,
        });
    }
    Ok(())
}

/// `(rows, columns, rank)` when `params` sends a tensor of `shape` as low-rank factors: a
/// matrix that the rank makes smaller.
fn low_rank_dims(params: &CodecParams, shape: &[usize]) -> Option<(usize, usize, usize)> {
    let Sparsity::LowRank { rank } = params.sparsity else {
        return None;
    };
    let (rows, cols) = matrix_dims(shape)?;
    saves(rows, cols, rank as usize).then_some((rows, cols, rank as usize))
}

/// Per-call encoder state: the zstd context and scratch buffers, reused across tensors.
struct SegmentEncoder {
    params: CodecParams,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    factorizer: Factorizer,
    factors: Vec<f32>,
    values: ValueScratch,
    candidates: Vec<u32>,
    indices: Vec<u32>,
    kept: Vec<f32>,
    reconstructed: Vec<f32>,
    raw: Vec<u8>,
    compressed: Vec<u8>,
}

impl SegmentEncoder {
    fn new(params: CodecParams) -> Self {
        // A context that cannot be created means no zstd: segments are stored raw.
        let compressor = params
            .zstd_level
            .and_then(|level| zstd::bulk::Compressor::new(level).ok());
        Self {
            params,
            compressor,
            factorizer: Factorizer::default(),
            factors: Vec::new(),
            values: ValueScratch::default(),
            candidates: Vec::new(),
            indices: Vec::new(),
            kept: Vec::new(),
            reconstructed: Vec::new(),
            raw: Vec::new(),
            compressed: Vec::new(),
        }
    }

    /// Bytes of the blob before zstd (an upper bound with zstd), to reserve once.
    fn raw_size_estimate(&self, set: &TensorSet) -> usize {
        set.tensors()
            .iter()
            .map(|tensor| {
                let elements = tensor.values.len() as u64;
                let count = match self.params.sparsity {
                    Sparsity::Dense | Sparsity::LowRank { .. } => elements,
                    Sparsity::TopK { keep_fraction } => {
                        kept_count(keep_fraction, elements as usize) as u64
                    }
                };
                let indices = if count < elements {
                    max_index_section_len(count)
                } else {
                    Some(0)
                };
                let values = value_section_len(self.params.values, count);
                indices
                    .zip(values)
                    .map_or(0, |(indices, values)| (indices + values) as usize)
            })
            .sum()
    }

    /// Appends the segment of `tensor` to `blob`. `residual`, when given, is the tensor's
    /// error-feedback residual: it is added to the values before encoding and replaced by
    /// what the receivers will not see.
    fn encode_tensor(
        &mut self,
        tensor: &Tensor,
        mut residual: Option<&mut Vec<f32>>,
        blob: &mut Vec<u8>,
    ) -> Result<TensorEntry, EncodeError> {
        if let Some(dims) = low_rank_dims(&self.params, &tensor.shape) {
            return self.encode_low_rank(tensor, dims, residual, blob);
        }
        let Self {
            params,
            compressor,
            factorizer: _,
            factors: _,
            values: value_scratch,
            candidates,
            indices,
            kept,
            reconstructed,
            raw,
            compressed,
        } = self;
        if let Some(residual) = residual.as_deref_mut() {
            add_assign(residual, &tensor.values);
        }
        let source: &[f32] = residual
            .as_deref()
            .map_or(tensor.values.as_slice(), Vec::as_slice);
        let elements = source.len();
        let kept_target = match params.sparsity {
            Sparsity::Dense | Sparsity::LowRank { .. } => elements,
            Sparsity::TopK { keep_fraction } => kept_count(keep_fraction, elements),
        };
        let sparse = kept_target < elements;

        let segment_start = blob.len();
        let target: &mut Vec<u8> = if compressor.is_some() {
            raw.clear();
            raw
        } else {
            blob
        };
        let to_encode: &[f32] = if sparse {
            select_top_k(source, kept_target, candidates, indices, kept);
            pack_indices(indices, target);
            kept
        } else {
            source
        };
        let values_start = target.len();
        let sent_count = to_encode.len();
        encode_values(
            params.values,
            to_encode,
            params.byte_shuffle,
            value_scratch,
            target,
        );

        if let Some(residual) = residual {
            reconstructed.clear();
            reconstructed.resize(sent_count, 0.0);
            decode_values(
                params.values,
                &target[values_start..],
                params.byte_shuffle,
                value_scratch,
                reconstructed,
            )
            .map_err(|_| EncodeError::SelfCheckFailed {
                tensor: tensor.name.clone(),
            })?;
            if sparse {
                scatter_sub(residual, indices, reconstructed);
            } else {
                sub_assign(residual, reconstructed);
            }
        }

        let zstd_used = compress_into(compressor.as_mut(), raw, compressed, blob);
        Ok(TensorEntry {
            name: tensor.name.clone(),
            shape: tensor.shape.clone(),
            encoding: TensorEncoding {
                values: params.values,
                kept: sparse.then_some(kept_target as u64),
                rank: None,
                byte_shuffle: params.byte_shuffle,
                zstd: zstd_used,
            },
            offset: segment_start as u64,
            length: (blob.len() - segment_start) as u64,
        })
    }

    /// [`Self::encode_tensor`] for a matrix sent as rank-`rank` factors `P`, `Q`; the
    /// residual keeps what `P Q^T` (as the receivers decode it) leaves out.
    fn encode_low_rank(
        &mut self,
        tensor: &Tensor,
        (rows, cols, rank): (usize, usize, usize),
        mut residual: Option<&mut Vec<f32>>,
        blob: &mut Vec<u8>,
    ) -> Result<TensorEntry, EncodeError> {
        let params = self.params;
        if let Some(residual) = residual.as_deref_mut() {
            add_assign(residual, &tensor.values);
        }
        let source: &[f32] = residual
            .as_deref()
            .map_or(tensor.values.as_slice(), Vec::as_slice);
        self.factorizer
            .factorize(source, (rows, cols), rank, &mut self.factors);
        let segment_start = blob.len();
        let raw = &mut self.raw;
        raw.clear();
        let (p, q) = self.factors.split_at(rows * rank);
        encode_values(params.values, p, params.byte_shuffle, &mut self.values, raw);
        let q_start = raw.len();
        encode_values(params.values, q, params.byte_shuffle, &mut self.values, raw);
        if let Some(residual) = residual {
            let self_check = |_| EncodeError::SelfCheckFailed {
                tensor: tensor.name.clone(),
            };
            let (mut p_sent, mut q_sent) = (vec![0.0; p.len()], vec![0.0; q.len()]);
            let shuffle = params.byte_shuffle;
            decode_values(
                params.values,
                &raw[..q_start],
                shuffle,
                &mut self.values,
                &mut p_sent,
            )
            .map_err(self_check)?;
            decode_values(
                params.values,
                &raw[q_start..],
                shuffle,
                &mut self.values,
                &mut q_sent,
            )
            .map_err(self_check)?;
            self.reconstructed.clear();
            self.reconstructed.resize(rows * cols, 0.0);
            reconstruct(
                &p_sent,
                &q_sent,
                (rows, cols),
                rank,
                &mut self.reconstructed,
            );
            sub_assign(residual, &self.reconstructed);
        }
        let zstd_used = match self.compressor.as_mut() {
            Some(compressor) => compress_into(Some(compressor), raw, &mut self.compressed, blob),
            None => {
                blob.extend_from_slice(raw);
                false
            }
        };
        Ok(TensorEntry {
            name: tensor.name.clone(),
            shape: tensor.shape.clone(),
            encoding: TensorEncoding {
                values: params.values,
                kept: None,
                rank: Some(rank as u32),
                byte_shuffle: params.byte_shuffle,
                zstd: zstd_used,
            },
            offset: segment_start as u64,
            length: (blob.len() - segment_start) as u64,
        })
    }
}

/// Appends `raw` zstd-compressed to `blob` when a compressor is given and it makes the
/// segment smaller; returns whether it did. Without a compressor the caller already wrote
/// the segment into `blob`.
fn compress_into(
    compressor: Option<&mut zstd::bulk::Compressor<'static>>,
    raw: &[u8],
    compressed: &mut Vec<u8>,
    blob: &mut Vec<u8>,
) -> bool {
    let Some(compressor) = compressor else {
        return false;
    };
    compressed.clear();
    compressed.reserve(zstd::zstd_safe::compress_bound(raw.len()));
    match compressor.compress_to_buffer(raw, compressed) {
        Ok(len) if len < raw.len() => {
            blob.extend_from_slice(compressed);
            true
        }
        // Incompressible (or a zstd failure): store the segment raw.
        _ => {
            blob.extend_from_slice(raw);
            false
        }
    }
}
