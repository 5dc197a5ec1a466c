//! The manifests: what a peer gossips about a delta ([`DeltaManifest`]) and what it hands a
//! late joiner about the full state ([`StateManifest`]).
//!
//! Owns: the two manifests, their tensor index ([`TensorEntry`]) and their wire format.
//! Must not touch: the blob's bytes (see [`crate::encode_delta`], [`crate::decode_delta`]) or its chunks (see
//! [`crate::chunk`]).
//!
//! # Wire format (version 1)
//!
//! Framing as in [`crate::wire`]. A delta manifest is
//! `"MTDM" version mesh_id round base_model sender sample_count training_steps blob index`;
//! a state manifest is
//! `"MTSM" version mesh_id round model_hash sender training_steps blob index(model) index(optimizer)`.
//! `blob` is the [`BlobDescriptor`] (`blob_hash blob_size chunk_size chunk_list_hash`) and
//! `index` is a count and then per tensor, in strictly increasing name order:
//! `shared_prefix_len name_suffix ndims dims.. format [block_size] flags [kept] length`.
//! Names are front-coded against the previous name (the shared prefix must be the longest
//! one, so the encoding stays unique): about 28 bytes per tensor, so the delta manifest of
//! FLAN-T5-XL (558 tensors with names like
//! `decoder.block.23.layer.1.EncDecAttention.q.weight`, 2.85B parameters) is about 16 KiB,
//! whatever the codec (`tests/manifest_size.rs`).
//! Segment offsets are not sent: segments are contiguous in index order, and their lengths
//! must add up to the blob size.
//!
//! # Where the chunk hashes are
//!
//! Not in the manifest. A 3B-parameter delta in f32 is ~12 GB, i.e. ~11 000 chunks of
//! 1 MiB: 350 KiB of chunk hashes, far over gossipsub's 64 KiB. Scaling the chunk size
//! with the blob instead would make chunks of tens of MiB for large deltas, costly to
//! retry on a flaky edge link. So the manifest carries only the blob hash, size, chunk size
//! and the hash of a separate [`crate::ChunkList`]; a receiver fetches that list by its
//! hash from any peer (one extra request), checks it against the manifest, then pulls the
//! chunks from several peers at once and verifies each on arrival. The manifest's size
//! therefore depends on the number of tensors only, never on the number of parameters.

use crate::chunk::BlobDescriptor;
use crate::codec::{DecodeError, TensorEncoding, ValueFormat, check_layout};
use crate::hash::{BlobHash, ChunkListHash, ModelHash};
use crate::limits::Limits;
use crate::tensor::ModelLayout;
use crate::wire::{MessageKind, WireError, WireReader, WireWriter, invalid, over_cap};

/// One tensor of a manifest's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// Tensor name.
    pub name: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// How its segment is encoded.
    pub encoding: TensorEncoding,
    /// Byte offset of its segment in the blob (not sent: implied by the order).
    pub offset: u64,
    /// Byte length of its segment.
    pub length: u64,
}

/// Announces a delta: gossiped by its sender once the delta blob is ready to be pulled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaManifest {
    /// The mesh (training run) this belongs to.
    pub mesh_id: String,
    /// Outer round number.
    pub round: u64,
    /// The model the delta applies to.
    pub base_model: ModelHash,
    /// Sender's peer id bytes (opaque here).
    pub sender: Vec<u8>,
    /// Training samples behind the delta: its weight in averaging.
    pub sample_count: u64,
    /// Local optimizer steps behind the delta.
    pub training_steps: u64,
    /// The blob and its chunking.
    pub blob: BlobDescriptor,
    /// Tensor index, sorted by name.
    pub tensors: Vec<TensorEntry>,
}

/// Announces a full model and optimizer state, for late joiners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateManifest {
    /// The mesh (training run) this belongs to.
    pub mesh_id: String,
    /// The outer round this state is the result of.
    pub round: u64,
    /// [`ModelHash::of_tensors`] of the model part.
    pub model_hash: ModelHash,
    /// Sender's peer id bytes (opaque here).
    pub sender: Vec<u8>,
    /// Optimizer steps behind this state, over the whole run.
    pub training_steps: u64,
    /// The blob and its chunking.
    pub blob: BlobDescriptor,
    /// Tensor index of the model, sorted by name; its segments come first in the blob.
    pub model: Vec<TensorEntry>,
    /// Tensor index of the optimizer state, sorted by name.
    pub optimizer: Vec<TensorEntry>,
}

impl DeltaManifest {
    /// Checks every cap and invariant a receiver with `limits` checks.
    pub fn validate(&self, limits: &Limits) -> Result<(), WireError> {
        check_header(&self.mesh_id, &self.sender, limits)?;
        self.blob.validate(limits)?;
        let mut totals = IndexTotals::default();
        validate_index(&self.tensors, limits, &mut totals)?;
        totals.finish(&self.blob)
    }

    /// Encodes the manifest; fails where a receiver with `limits` would refuse it (including
    /// an encoding larger than `limits.max_manifest_bytes`).
    pub fn encode(&self, limits: &Limits) -> Result<Vec<u8>, WireError> {
        self.validate(limits)?;
        let mut writer = WireWriter::new(MessageKind::DeltaManifest);
        writer.byte_string(self.mesh_id.as_bytes());
        writer.varint(self.round);
        writer.raw(self.base_model.as_bytes());
        writer.byte_string(&self.sender);
        writer.varint(self.sample_count);
        writer.varint(self.training_steps);
        write_blob(&mut writer, &self.blob);
        write_index(&mut writer, &self.tensors);
        finish_writer(
            writer,
            MessageKind::DeltaManifest,
            limits.max_manifest_bytes,
        )
    }

    /// Decodes and validates a manifest, checking every cap before allocating.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Self, WireError> {
        let kind = MessageKind::DeltaManifest;
        let mut reader = WireReader::open(bytes, kind, limits.max_manifest_bytes)?;
        let mesh_id = reader.string("mesh id", limits.max_mesh_id_len)?.to_owned();
        let round = reader.varint("round")?;
        let base_model = ModelHash(reader.array("base model")?);
        let sender = reader
            .byte_string("sender", limits.max_sender_len)?
            .to_vec();
        let sample_count = reader.varint("sample count")?;
        let training_steps = reader.varint("training steps")?;
        let blob = read_blob(&mut reader, limits)?;
        let mut offset = 0;
        let tensors = read_index(&mut reader, limits, &mut offset)?;
        reader.finish(kind)?;
        let manifest = Self {
            mesh_id,
            round,
            base_model,
            sender,
            sample_count,
            training_steps,
            blob,
            tensors,
        };
        manifest.validate(limits)?;
        Ok(manifest)
    }

    /// Checks the tensor index against the receiver's model (same names, same shapes):
    /// run it on a gossiped manifest before pulling any chunk.
    pub fn check_layout(&self, layout: &ModelLayout) -> Result<(), DecodeError> {
        check_layout(&self.tensors, layout)
    }
}

impl StateManifest {
    /// Checks every cap and invariant a receiver with `limits` checks.
    pub fn validate(&self, limits: &Limits) -> Result<(), WireError> {
        check_header(&self.mesh_id, &self.sender, limits)?;
        self.blob.validate(limits)?;
        let mut totals = IndexTotals::default();
        validate_index(&self.model, limits, &mut totals)?;
        validate_index(&self.optimizer, limits, &mut totals)?;
        totals.finish(&self.blob)
    }

    /// Encodes the manifest; fails where a receiver with `limits` would refuse it.
    pub fn encode(&self, limits: &Limits) -> Result<Vec<u8>, WireError> {
        self.validate(limits)?;
        let mut writer = WireWriter::new(MessageKind::StateManifest);
        writer.byte_string(self.mesh_id.as_bytes());
        writer.varint(self.round);
        writer.raw(self.model_hash.as_bytes());
        writer.byte_string(&self.sender);
        writer.varint(self.training_steps);
        write_blob(&mut writer, &self.blob);
        write_index(&mut writer, &self.model);
        write_index(&mut writer, &self.optimizer);
        finish_writer(
            writer,
            MessageKind::StateManifest,
            limits.max_state_manifest_bytes,
        )
    }

    /// Decodes and validates a manifest, checking every cap before allocating.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Self, WireError> {
        let kind = MessageKind::StateManifest;
        let mut reader = WireReader::open(bytes, kind, limits.max_state_manifest_bytes)?;
        let mesh_id = reader.string("mesh id", limits.max_mesh_id_len)?.to_owned();
        let round = reader.varint("round")?;
        let model_hash = ModelHash(reader.array("model hash")?);
        let sender = reader
            .byte_string("sender", limits.max_sender_len)?
            .to_vec();
        let training_steps = reader.varint("training steps")?;
        let blob = read_blob(&mut reader, limits)?;
        let mut offset = 0;
        let model = read_index(&mut reader, limits, &mut offset)?;
        let optimizer = read_index(&mut reader, limits, &mut offset)?;
        reader.finish(kind)?;
        let manifest = Self {
            mesh_id,
            round,
            model_hash,
            sender,
            training_steps,
            blob,
            model,
            optimizer,
        };
        manifest.validate(limits)?;
        Ok(manifest)
    }
}

fn finish_writer(writer: WireWriter, kind: MessageKind, cap: usize) -> Result<Vec<u8>, WireError> {
    if writer.len() > cap {
        return Err(WireError::MessageTooLarge {
            kind,
            len: writer.len(),
            cap,
        });
    }
    Ok(writer.into_bytes())
}

fn check_header(mesh_id: &str, sender: &[u8], limits: &Limits) -> Result<(), WireError> {
    if mesh_id.len() > limits.max_mesh_id_len {
        return Err(over_cap(
            "mesh id",
            mesh_id.len() as u64,
            limits.max_mesh_id_len as u64,
        ));
    }
    if sender.len() > limits.max_sender_len {
        return Err(over_cap(
            "sender",
            sender.len() as u64,
            limits.max_sender_len as u64,
        ));
    }
    Ok(())
}

/// Running sums over the indexes of one manifest.
#[derive(Default)]
struct IndexTotals {
    elements: u64,
    bytes: u64,
}

impl IndexTotals {
    fn finish(self, blob: &BlobDescriptor) -> Result<(), WireError> {
        if self.bytes != blob.blob_size {
            return Err(invalid(
                "blob size",
                "is not the sum of the tensor segment lengths",
            ));
        }
        Ok(())
    }
}

/// Checks one tensor index: caps, name order, encodings, contiguous segments.
fn validate_index(
    entries: &[TensorEntry],
    limits: &Limits,
    totals: &mut IndexTotals,
) -> Result<(), WireError> {
    if entries.len() > limits.max_tensors {
        return Err(over_cap(
            "tensor count",
            entries.len() as u64,
            limits.max_tensors as u64,
        ));
    }
    let mut previous: Option<&str> = None;
    for entry in entries {
        if entry.name.is_empty() {
            return Err(invalid("tensor name", "is empty"));
        }
        if entry.name.len() > limits.max_name_len {
            return Err(over_cap(
                "tensor name",
                entry.name.len() as u64,
                limits.max_name_len as u64,
            ));
        }
        if previous.is_some_and(|previous| previous >= entry.name.as_str()) {
            return Err(invalid(
                "tensor name",
                "tensors are not in strictly increasing name order",
            ));
        }
        previous = Some(&entry.name);
        if entry.shape.len() > limits.max_dims {
            return Err(over_cap(
                "tensor dimensions",
                entry.shape.len() as u64,
                limits.max_dims as u64,
            ));
        }
        let elements = entry
            .shape
            .iter()
            .try_fold(1u64, |count, &dim| count.checked_mul(dim as u64))
            .filter(|&count| count <= limits.max_tensor_elements)
            .ok_or_else(|| {
                let value = entry
                    .shape
                    .iter()
                    .fold(1u64, |count, &dim| count.saturating_mul(dim as u64));
                over_cap("tensor elements", value, limits.max_tensor_elements)
            })?;
        totals.elements = totals.elements.saturating_add(elements);
        if totals.elements > limits.max_total_elements {
            return Err(over_cap(
                "total elements",
                totals.elements,
                limits.max_total_elements,
            ));
        }
        entry
            .encoding
            .check(&entry.shape, elements)
            .map_err(|reason| invalid("tensor encoding", reason))?;
        let encoding = entry.encoding;
        let max_len = encoding
            .max_segment_len(&entry.shape, elements)
            .ok_or(invalid("segment length", "overflows"))?;
        if entry.length > max_len {
            return Err(invalid(
                "segment length",
                "is longer than its encoding allows",
            ));
        }
        if !encoding.zstd
            && encoding.kept.is_none()
            && Some(entry.length) != encoding.max_raw_len(&entry.shape, elements)
        {
            return Err(invalid(
                "segment length",
                "does not match its uncompressed encoding",
            ));
        }
        if entry.offset != totals.bytes {
            return Err(invalid(
                "segment offset",
                "segments are not contiguous in index order",
            ));
        }
        totals.bytes = totals
            .bytes
            .checked_add(entry.length)
            .ok_or(invalid("segment length", "overflows"))?;
    }
    Ok(())
}

fn write_blob(writer: &mut WireWriter, blob: &BlobDescriptor) {
    writer.raw(blob.blob_hash.as_bytes());
    writer.varint(blob.blob_size);
    writer.varint(u64::from(blob.chunk_size));
    writer.raw(blob.chunk_list_hash.as_bytes());
}

fn read_blob(reader: &mut WireReader<'_>, limits: &Limits) -> Result<BlobDescriptor, WireError> {
    let blob_hash = BlobHash(reader.array("blob hash")?);
    let blob_size = reader.varint_capped("blob size", limits.max_blob_size)?;
    let chunk_size = reader.varint_capped("chunk size", u64::from(limits.max_chunk_size))? as u32;
    let chunk_list_hash = ChunkListHash(reader.array("chunk list hash")?);
    Ok(BlobDescriptor {
        blob_hash,
        blob_size,
        chunk_size,
        chunk_list_hash,
    })
}

const FORMAT_F32: u8 = 0;
const FORMAT_F16: u8 = 1;
const FORMAT_BF16: u8 = 2;
const FORMAT_INT8: u8 = 3;
const FORMAT_INT4: u8 = 4;

const FLAG_SPARSE: u8 = 1;
const FLAG_SHUFFLE: u8 = 2;
const FLAG_ZSTD: u8 = 4;
/// A low-rank segment; its rank follows the flags (after the top-k count, which a low-rank
/// segment never has). Nodes built before low-rank segments refuse such a manifest with
/// "unknown tensor flags".
const FLAG_LOW_RANK: u8 = 8;

fn write_index(writer: &mut WireWriter, entries: &[TensorEntry]) {
    writer.varint(entries.len() as u64);
    let mut previous = "";
    for entry in entries {
        let shared = shared_prefix_len(previous, &entry.name);
        writer.varint(shared as u64);
        writer.byte_string(&entry.name.as_bytes()[shared..]);
        previous = &entry.name;
        writer.varint(entry.shape.len() as u64);
        for &dim in &entry.shape {
            writer.varint(dim as u64);
        }
        let encoding = &entry.encoding;
        match encoding.values {
            ValueFormat::F32 => writer.u8(FORMAT_F32),
            ValueFormat::F16 => writer.u8(FORMAT_F16),
            ValueFormat::Bf16 => writer.u8(FORMAT_BF16),
            ValueFormat::Int8 { block_size } => {
                writer.u8(FORMAT_INT8);
                writer.varint(u64::from(block_size));
            }
            ValueFormat::Int4 { block_size } => {
                writer.u8(FORMAT_INT4);
                writer.varint(u64::from(block_size));
            }
        }
        let mut flags = 0;
        if encoding.kept.is_some() {
            flags |= FLAG_SPARSE;
        }
        if encoding.byte_shuffle {
            flags |= FLAG_SHUFFLE;
        }
        if encoding.zstd {
            flags |= FLAG_ZSTD;
        }
        if encoding.rank.is_some() {
            flags |= FLAG_LOW_RANK;
        }
        writer.u8(flags);
        if let Some(kept) = encoding.kept {
            writer.varint(kept);
        }
        if let Some(rank) = encoding.rank {
            writer.varint(u64::from(rank));
        }
        writer.varint(entry.length);
    }
}

fn shared_prefix_len(previous: &str, name: &str) -> usize {
    previous
        .bytes()
        .zip(name.bytes())
        .take_while(|(a, b)| a == b)
        .count()
}

/// Reads one tensor index; `offset` is the running segment offset (shared by the two
/// indexes of a state manifest). Semantic checks are left to `validate_index`.
fn read_index(
    reader: &mut WireReader<'_>,
    limits: &Limits,
    offset: &mut u64,
) -> Result<Vec<TensorEntry>, WireError> {
    let count = reader.len_capped("tensor count", limits.max_tensors)?;
    // Every entry takes at least 6 bytes, so a count larger than that is a lie.
    if count > reader.remaining() / 6 {
        return Err(WireError::Truncated {
            field: "tensor index",
            needed: count as u64 * 6,
            remaining: reader.remaining(),
        });
    }
    let mut entries: Vec<TensorEntry> = Vec::with_capacity(count);
    for _ in 0..count {
        let previous = entries.last().map_or("", |entry| entry.name.as_str());
        let shared = reader.len_capped("tensor name prefix", previous.len())?;
        let suffix =
            reader.byte_string("tensor name", limits.max_name_len.saturating_sub(shared))?;
        if let (Some(&next), Some(&replaced)) = (suffix.first(), previous.as_bytes().get(shared))
            && next == replaced
        {
            return Err(invalid(
                "tensor name prefix",
                "is not the longest shared prefix",
            ));
        }
        let mut name = Vec::with_capacity(shared + suffix.len());
        name.extend_from_slice(&previous.as_bytes()[..shared]);
        name.extend_from_slice(suffix);
        let name = String::from_utf8(name).map_err(|_| WireError::InvalidUtf8 {
            field: "tensor name",
        })?;

        let dims = reader.len_capped("tensor dimensions", limits.max_dims)?;
        let mut shape = Vec::with_capacity(dims);
        for _ in 0..dims {
            let dim = reader.varint_capped("tensor dimension", limits.max_tensor_elements)?;
            shape.push(
                usize::try_from(dim)
                    .map_err(|_| over_cap("tensor dimension", dim, usize::MAX as u64))?,
            );
        }
        let format_tag = reader.u8("tensor format")?;
        let values = match format_tag {
            FORMAT_F32 => ValueFormat::F32,
            FORMAT_F16 => ValueFormat::F16,
            FORMAT_BF16 => ValueFormat::Bf16,
            FORMAT_INT8 | FORMAT_INT4 => {
                let block_size =
                    reader.varint_capped("quantization block size", u64::from(u32::MAX))? as u32;
                if format_tag == FORMAT_INT8 {
                    ValueFormat::Int8 { block_size }
                } else {
                    ValueFormat::Int4 { block_size }
                }
            }
            tag => {
                return Err(WireError::UnknownTag {
                    field: "tensor format",
                    tag: u64::from(tag),
                });
            }
        };
        let flags = reader.u8("tensor flags")?;
        if flags & !(FLAG_SPARSE | FLAG_SHUFFLE | FLAG_ZSTD | FLAG_LOW_RANK) != 0 {
            return Err(WireError::UnknownTag {
                field: "tensor flags",
                tag: u64::from(flags),
            });
        }
        let kept = if flags & FLAG_SPARSE != 0 {
            Some(reader.varint("top-k count")?)
        } else {
            None
        };
        let rank = if flags & FLAG_LOW_RANK != 0 {
            Some(reader.varint_capped("low rank", u64::from(crate::MAX_LOW_RANK))? as u32)
        } else {
            None
        };
        let length = reader.varint_capped("segment length", limits.max_blob_size)?;
        entries.push(TensorEntry {
            name,
            shape,
            encoding: TensorEncoding {
                values,
                kept,
                rank,
                byte_shuffle: flags & FLAG_SHUFFLE != 0,
                zstd: flags & FLAG_ZSTD != 0,
            },
            offset: *offset,
            length,
        });
        *offset = offset.saturating_add(length);
    }
    Ok(entries)
}
