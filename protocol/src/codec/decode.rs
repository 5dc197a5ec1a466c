//! Decoding: a verified blob and its tensor index in, a complete and validated
//! [`TensorSet`] out, or a typed error and nothing.
//!
//! Owns: the decoder and its validation. Must not hand out a tensor that failed validation,
//! nor part of a delta.

use super::lowrank::reconstruct;
use super::sparse::{IndexSectionError, unpack_indices};
use super::values::{ValueScratch, ValueSectionError, decode_values, value_section_len};
use super::{TensorEncoding, first_non_finite, scatter};
use crate::chunk::{VerifiedBlob, VerifiedFile};
use crate::hash::{BlobHash, ModelHash};
use crate::limits::Limits;
use crate::manifest::{DeltaManifest, StateManifest, TensorEntry};
use crate::tensor::{ModelLayout, Tensor, TensorSet};
use crate::wire::WireError;

/// A blob or tensor index that fails to decode or to match the expected layout. Nothing
/// is returned in that case: no partial delta exists.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// Reading a blob file failed.
    #[error("reading the blob file: {0}")]
    Storage(String),
    /// The manifest breaks the wire format or its caps.
    #[error("invalid manifest: {0}")]
    InvalidManifest(#[from] WireError),
    /// The blob is not the one the manifest names.
    #[error("blob hash mismatch: manifest names {expected}, blob is {found}")]
    BlobHashMismatch {
        /// Hash in the manifest.
        expected: BlobHash,
        /// Hash of the blob.
        found: BlobHash,
    },
    /// The blob has another size than the manifest says.
    #[error("blob is {found} bytes, manifest says {expected}")]
    BlobSizeMismatch {
        /// Size in the manifest.
        expected: u64,
        /// Size of the blob.
        found: u64,
    },
    /// An expected tensor is not in the manifest.
    #[error("tensor {name:?} is missing")]
    MissingTensor {
        /// Its name.
        name: String,
    },
    /// The manifest has a tensor the model does not.
    #[error("tensor {name:?} is not in the model")]
    UnexpectedTensor {
        /// Its name.
        name: String,
    },
    /// A tensor with the wrong shape.
    #[error("tensor {name:?} has shape {found:?}, the model {expected:?}")]
    ShapeMismatch {
        /// Its name.
        name: String,
        /// Shape in the model.
        expected: Vec<usize>,
        /// Shape in the manifest.
        found: Vec<usize>,
    },
    /// A segment outside the blob.
    #[error("tensor {tensor:?}: segment lies outside the blob")]
    SegmentOutOfBounds {
        /// Tensor name.
        tensor: String,
    },
    /// A zstd frame that does not decompress within the expected size.
    #[error("tensor {tensor:?}: zstd: {reason}")]
    Zstd {
        /// Tensor name.
        tensor: String,
        /// zstd's message.
        reason: String,
    },
    /// A (decompressed) segment or section of the wrong length: truncated or padded.
    #[error("tensor {tensor:?}: payload is {found} bytes, expected {expected}")]
    PayloadSize {
        /// Tensor name.
        tensor: String,
        /// Expected bytes.
        expected: u64,
        /// Bytes found.
        found: u64,
    },
    /// A quantization scale that is negative, infinite or NaN.
    #[error("tensor {tensor:?}: invalid quantization scale in block {block}")]
    InvalidScale {
        /// Tensor name.
        tensor: String,
        /// Block index.
        block: usize,
    },
    /// A top-k index section that is truncated, malformed, or points outside the tensor.
    #[error("tensor {tensor:?}: invalid top-k indices: {reason}")]
    InvalidIndices {
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A decoded NaN or infinity.
    #[error("tensor {tensor:?}: decoded value at index {index} is not finite")]
    NonFinite {
        /// Tensor name.
        tensor: String,
        /// First bad element.
        index: usize,
    },
    /// A state tensor stored lossily (states must reproduce the model hash).
    #[error("state tensor {tensor:?} is not stored as dense f32")]
    LossyState {
        /// Tensor name.
        tensor: String,
    },
    /// The decoded model does not hash to the announced model hash.
    #[error("decoded model hashes to {found}, the state manifest announces {expected}")]
    ModelHashMismatch {
        /// Announced.
        expected: ModelHash,
        /// Computed.
        found: ModelHash,
    },
}

/// Decodes a delta: checks the manifest against `limits`, the blob against the manifest's
/// blob hash, the tensor index against `layout` (same names, same shapes), then decodes
/// every tensor into a fresh buffer and checks it is finite.
pub fn decode_delta(
    manifest: &DeltaManifest,
    blob: &VerifiedBlob,
    layout: &ModelLayout,
    limits: &Limits,
) -> Result<TensorSet, DecodeError> {
    manifest.validate(limits)?;
    check_blob(manifest.blob.blob_hash, manifest.blob.blob_size, blob)?;
    decode_entries(&manifest.tensors, blob.as_bytes(), layout)
}

/// A decoded [`StateManifest`] blob.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelState {
    /// Model weights; hash to the manifest's model hash.
    pub model: TensorSet,
    /// Optimizer state.
    pub optimizer: TensorSet,
}

/// Decodes a state like [`decode_delta`], also refusing lossy tensors and checking the
/// decoded model against the manifest's [`ModelHash`].
pub fn decode_state(
    manifest: &StateManifest,
    blob: &VerifiedBlob,
    model_layout: &ModelLayout,
    optimizer_layout: &ModelLayout,
    limits: &Limits,
) -> Result<ModelState, DecodeError> {
    manifest.validate(limits)?;
    check_blob(manifest.blob.blob_hash, manifest.blob.blob_size, blob)?;
    decode_state_from(
        manifest,
        &mut SliceSegments(blob.as_bytes()),
        model_layout,
        optimizer_layout,
    )
}

/// [`decode_state`] from a blob on disk ([`VerifiedFile`]), one segment in memory at a time:
/// memory holds the decoded state and one encoded tensor, never a second copy of the blob.
pub fn decode_state_file(
    manifest: &StateManifest,
    file: &VerifiedFile,
    model_layout: &ModelLayout,
    optimizer_layout: &ModelLayout,
    limits: &Limits,
) -> Result<ModelState, DecodeError> {
    manifest.validate(limits)?;
    check_hash_and_size(
        manifest.blob.blob_hash,
        manifest.blob.blob_size,
        file.hash(),
        file.size(),
    )?;
    let mut source = FileSegments {
        file,
        buffer: Vec::new(),
    };
    decode_state_from(manifest, &mut source, model_layout, optimizer_layout)
}

/// The checks and decoding both state paths share: lossless entries only, the model hashing
/// to the manifest's [`ModelHash`], then the optimizer state.
fn decode_state_from(
    manifest: &StateManifest,
    source: &mut dyn Segments,
    model_layout: &ModelLayout,
    optimizer_layout: &ModelLayout,
) -> Result<ModelState, DecodeError> {
    if let Some(entry) = manifest
        .model
        .iter()
        .chain(&manifest.optimizer)
        .find(|entry| !entry.encoding.is_lossless())
    {
        return Err(DecodeError::LossyState {
            tensor: entry.name.clone(),
        });
    }
    let model = decode_entries_from(&manifest.model, source, model_layout)?;
    let found = ModelHash::of_tensors(&model);
    if found != manifest.model_hash {
        return Err(DecodeError::ModelHashMismatch {
            expected: manifest.model_hash,
            found,
        });
    }
    let optimizer = decode_entries_from(&manifest.optimizer, source, optimizer_layout)?;
    Ok(ModelState { model, optimizer })
}

fn check_blob(
    expected_hash: BlobHash,
    expected_size: u64,
    blob: &VerifiedBlob,
) -> Result<(), DecodeError> {
    check_hash_and_size(
        expected_hash,
        expected_size,
        blob.hash(),
        blob.as_bytes().len() as u64,
    )
}

fn check_hash_and_size(
    expected_hash: BlobHash,
    expected_size: u64,
    found_hash: BlobHash,
    found_size: u64,
) -> Result<(), DecodeError> {
    if found_hash != expected_hash {
        return Err(DecodeError::BlobHashMismatch {
            expected: expected_hash,
            found: found_hash,
        });
    }
    if found_size != expected_size {
        return Err(DecodeError::BlobSizeMismatch {
            expected: expected_size,
            found: found_size,
        });
    }
    Ok(())
}

/// Checks that `entries` name exactly the tensors of `layout`, with the same shapes.
/// Both are sorted by name.
pub(crate) fn check_layout(
    entries: &[TensorEntry],
    layout: &ModelLayout,
) -> Result<(), DecodeError> {
    let mut expected = layout.specs().iter().peekable();
    let mut found = entries.iter().peekable();
    loop {
        match (expected.peek(), found.peek()) {
            (None, None) => return Ok(()),
            (Some(spec), None) => {
                return Err(DecodeError::MissingTensor {
                    name: spec.name.clone(),
                });
            }
            (None, Some(entry)) => {
                return Err(DecodeError::UnexpectedTensor {
                    name: entry.name.clone(),
                });
            }
            (Some(spec), Some(entry)) => match spec.name.cmp(&entry.name) {
                std::cmp::Ordering::Less => {
                    return Err(DecodeError::MissingTensor {
                        name: spec.name.clone(),
                    });
                }
                std::cmp::Ordering::Greater => {
                    return Err(DecodeError::UnexpectedTensor {
                        name: entry.name.clone(),
                    });
                }
                std::cmp::Ordering::Equal if spec.shape != entry.shape => {
                    return Err(DecodeError::ShapeMismatch {
                        name: spec.name.clone(),
                        expected: spec.shape.clone(),
                        found: entry.shape.clone(),
                    });
                }
                std::cmp::Ordering::Equal => {
                    expected.next();
                    found.next();
                }
            },
        }
    }
}

/// Decodes the segments of `entries` out of `blob`, after checking them against `layout`.
/// Does not check any hash: callers hold a [`VerifiedBlob`] or are benchmarks.
pub(crate) fn decode_entries(
    entries: &[TensorEntry],
    blob: &[u8],
    layout: &ModelLayout,
) -> Result<TensorSet, DecodeError> {
    decode_entries_from(entries, &mut SliceSegments(blob), layout)
}

/// Where a tensor's encoded segment is read from.
trait Segments {
    /// The `len` bytes at `offset`; `None` when they are not all in the blob.
    fn segment(&mut self, offset: u64, len: u64) -> Result<Option<&[u8]>, DecodeError>;
}

struct SliceSegments<'a>(&'a [u8]);

impl Segments for SliceSegments<'_> {
    fn segment(&mut self, offset: u64, len: u64) -> Result<Option<&[u8]>, DecodeError> {
        let (Ok(start), Ok(len)) = (usize::try_from(offset), usize::try_from(len)) else {
            return Ok(None);
        };
        Ok(start
            .checked_add(len)
            .and_then(|end| self.0.get(start..end)))
    }
}

/// Segments read from a [`VerifiedFile`] into one reused buffer.
struct FileSegments<'a> {
    file: &'a VerifiedFile,
    buffer: Vec<u8>,
}

impl Segments for FileSegments<'_> {
    fn segment(&mut self, offset: u64, len: u64) -> Result<Option<&[u8]>, DecodeError> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.file.size())
        {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| {
            DecodeError::Storage(format!("a {len}-byte segment does not fit in memory"))
        })?;
        self.buffer.resize(len, 0);
        self.file
            .read_at(&mut self.buffer, offset)
            .map_err(|err| DecodeError::Storage(err.to_string()))?;
        Ok(Some(&self.buffer))
    }
}

fn decode_entries_from(
    entries: &[TensorEntry],
    source: &mut dyn Segments,
    layout: &ModelLayout,
) -> Result<TensorSet, DecodeError> {
    check_layout(entries, layout)?;
    let mut decoder = SegmentDecoder::default();
    let mut tensors = Vec::with_capacity(entries.len());
    for (entry, spec) in entries.iter().zip(layout.specs()) {
        // The layout is trusted and matches, so this is the real element count.
        let elements = spec.element_count().unwrap_or(0);
        let segment = source.segment(entry.offset, entry.length)?.ok_or_else(|| {
            DecodeError::SegmentOutOfBounds {
                tensor: entry.name.clone(),
            }
        })?;
        let values = decoder.decode_segment(entry, elements, segment)?;
        tensors.push(Tensor {
            name: entry.name.clone(),
            shape: entry.shape.clone(),
            values,
        });
    }
    Ok(TensorSet::from_sorted_unchecked(tensors))
}

/// Per-call decoder state, reused across tensors.
#[derive(Default)]
struct SegmentDecoder {
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    raw: Vec<u8>,
    values: ValueScratch,
    indices: Vec<u32>,
    kept: Vec<f32>,
}

impl SegmentDecoder {
    /// Decodes one segment into a fresh vector of `elements` values.
    fn decode_segment(
        &mut self,
        entry: &TensorEntry,
        elements: usize,
        segment: &[u8],
    ) -> Result<Vec<f32>, DecodeError> {
        let tensor = || entry.name.clone();
        let encoding = entry.encoding;
        let max_raw = encoding
            .max_raw_len(&entry.shape, elements as u64)
            .and_then(|len| usize::try_from(len).ok())
            .ok_or_else(|| DecodeError::PayloadSize {
                tensor: tensor(),
                expected: u64::MAX,
                found: segment.len() as u64,
            })?;
        let raw: &[u8] = if encoding.zstd {
            let zstd_error = |error: std::io::Error| DecodeError::Zstd {
                tensor: tensor(),
                reason: error.to_string(),
            };
            let mut decompressor = match self.decompressor.take() {
                Some(decompressor) => decompressor,
                None => zstd::bulk::Decompressor::new().map_err(zstd_error)?,
            };
            self.raw.clear();
            // The capacity bounds the output: a frame claiming more fails, unallocated.
            self.raw.reserve(max_raw);
            let decompressed = decompressor.decompress_to_buffer(segment, &mut self.raw);
            self.decompressor = Some(decompressor);
            decompressed.map_err(zstd_error)?;
            if self.raw.len() > max_raw {
                return Err(DecodeError::PayloadSize {
                    tensor: tensor(),
                    expected: max_raw as u64,
                    found: self.raw.len() as u64,
                });
            }
            &self.raw
        } else {
            segment
        };
        let value_error = |error: ValueSectionError| match error {
            ValueSectionError::Length { expected, found } => DecodeError::PayloadSize {
                tensor: tensor(),
                expected,
                found,
            },
            ValueSectionError::InvalidScale { block } => DecodeError::InvalidScale {
                tensor: tensor(),
                block,
            },
        };
        let mut out = vec![0.0f32; elements];
        if let Some(dims) = encoding.low_rank(&entry.shape) {
            decode_low_rank(raw, encoding, dims, &mut self.values, &mut out)
                .map_err(value_error)?;
            return finite(out, entry);
        }
        match encoding.kept {
            None => decode_values(
                encoding.values,
                raw,
                encoding.byte_shuffle,
                &mut self.values,
                &mut out,
            )
            .map_err(value_error)?,
            Some(kept) => {
                let kept = usize::try_from(kept).unwrap_or(usize::MAX).min(elements);
                let used = unpack_indices(raw, kept, elements as u64, &mut self.indices).map_err(
                    |error| DecodeError::InvalidIndices {
                        tensor: tensor(),
                        reason: match error {
                            IndexSectionError::Truncated => "truncated".to_owned(),
                            IndexSectionError::BitWidth { width } => {
                                format!("bit width {width} over 32")
                            }
                            IndexSectionError::OutOfRange { index, universe } => {
                                format!("index {index} outside a tensor of {universe} elements")
                            }
                        },
                    },
                )?;
                self.kept.clear();
                self.kept.resize(kept, 0.0);
                decode_values(
                    encoding.values,
                    &raw[used..],
                    encoding.byte_shuffle,
                    &mut self.values,
                    &mut self.kept,
                )
                .map_err(value_error)?;
                scatter(&mut out, &self.indices, &self.kept);
            }
        }
        finite(out, entry)
    }
}

/// `P Q^T` from the two value sections of a low-rank segment.
fn decode_low_rank(
    raw: &[u8],
    encoding: TensorEncoding,
    (rows, cols, rank): (usize, usize, usize),
    scratch: &mut ValueScratch,
    out: &mut [f32],
) -> Result<(), ValueSectionError> {
    let p_len = value_section_len(encoding.values, (rows * rank) as u64).unwrap_or(u64::MAX);
    let split = usize::try_from(p_len).unwrap_or(usize::MAX).min(raw.len());
    let (mut p, mut q) = (vec![0.0f32; rows * rank], vec![0.0f32; cols * rank]);
    let shuffle = encoding.byte_shuffle;
    decode_values(encoding.values, &raw[..split], shuffle, scratch, &mut p)?;
    decode_values(encoding.values, &raw[split..], shuffle, scratch, &mut q)?;
    reconstruct(&p, &q, (rows, cols), rank, out);
    Ok(())
}

/// `out`, or the first non-finite value of it as an error.
fn finite(out: Vec<f32>, entry: &TensorEntry) -> Result<Vec<f32>, DecodeError> {
    match first_non_finite(&out) {
        Some(index) => Err(DecodeError::NonFinite {
            tensor: entry.name.clone(),
            index,
        }),
        None => Ok(out),
    }
}
