//! Proptest strategies shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use meshtune_protocol::{
    BlobDescriptor, BlobHash, ChunkListHash, CodecParams, DeltaManifest, Limits, ModelHash,
    Sparsity, StateManifest, Tensor, TensorEncoding, TensorEntry, TensorSet, ValueFormat,
};
use proptest::prelude::*;

pub fn hash_bytes() -> impl Strategy<Value = [u8; 32]> {
    any::<[u8; 32]>()
}

pub fn value_format() -> impl Strategy<Value = ValueFormat> {
    prop_oneof![
        Just(ValueFormat::F32),
        Just(ValueFormat::F16),
        Just(ValueFormat::Bf16),
        (1u32..300).prop_map(|block_size| ValueFormat::Int8 { block_size }),
        (1u32..300).prop_map(|block_size| ValueFormat::Int4 { block_size }),
    ]
}

pub fn codec_params() -> impl Strategy<Value = CodecParams> {
    (
        value_format(),
        prop_oneof![
            Just(Sparsity::Dense),
            (0.0001f64..=1.0).prop_map(|keep_fraction| Sparsity::TopK { keep_fraction }),
            (1u32..=6).prop_map(|rank| Sparsity::LowRank { rank })
        ],
        any::<bool>(),
        prop_oneof![Just(None), (-5i32..=6).prop_map(Some)],
    )
        .prop_map(|(values, sparsity, byte_shuffle, zstd_level)| CodecParams {
            values,
            sparsity,
            byte_shuffle,
            zstd_level,
        })
}

/// Names that look like checkpoint keys, with shared prefixes to exercise front coding.
pub fn tensor_name() -> impl Strategy<Value = String> {
    "[a-c]{1,2}(\\.[a-c0-9é_]{1,3}){0,4}"
}

pub fn shape() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(0usize..12, 0..4)
}

/// A tensor index that passes validation: sorted unique names, valid encodings, lengths
/// within what each encoding allows, contiguous offsets.
pub fn tensor_index(max_tensors: usize) -> impl Strategy<Value = Vec<TensorEntry>> {
    proptest::collection::btree_map(
        tensor_name(),
        (
            shape(),
            value_format(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
        ),
        0..max_tensors,
    )
    .prop_map(|entries: BTreeMap<String, _>| {
        let mut offset = 0u64;
        entries
            .into_iter()
            .map(
                |(name, (shape, values, sparse, byte_shuffle, zstd, kept_pick, length_pick))| {
                    let elements: u64 = shape.iter().map(|&dim| dim as u64).product();
                    let kept = sparse.then(|| kept_pick % (elements + 1));
                    let encoding = TensorEncoding {
                        values,
                        kept,
                        rank: None,
                        byte_shuffle,
                        zstd,
                    };
                    let length = exact_or_bounded_length(&encoding, elements, length_pick);
                    let entry = TensorEntry {
                        name,
                        shape,
                        encoding,
                        offset,
                        length,
                    };
                    offset += length;
                    entry
                },
            )
            .collect()
    })
}

/// The only valid length of an uncompressed dense segment, else any length up to the
/// encoding's bound.
pub fn exact_or_bounded_length(encoding: &TensorEncoding, elements: u64, pick: u64) -> u64 {
    let per_value = |format: ValueFormat, count: u64| match format {
        ValueFormat::F32 => count * 4,
        ValueFormat::F16 | ValueFormat::Bf16 => count * 2,
        ValueFormat::Int8 { block_size } => count.div_ceil(u64::from(block_size)) * 4 + count,
        ValueFormat::Int4 { block_size } => {
            count.div_ceil(u64::from(block_size)) * 4 + count.div_ceil(2)
        }
    };
    match (encoding.kept, encoding.zstd) {
        (None, false) => per_value(encoding.values, elements),
        (None, true) => pick % (per_value(encoding.values, elements) + 1),
        (Some(kept), _) => pick % (per_value(encoding.values, kept) + 1),
    }
}

pub fn blob_descriptor(blob_size: u64) -> impl Strategy<Value = BlobDescriptor> {
    let limits = Limits::default();
    let smallest_chunk = blob_size.div_ceil(limits.max_chunks).max(1) as u32;
    (
        hash_bytes(),
        smallest_chunk..=limits.max_chunk_size,
        hash_bytes(),
    )
        .prop_map(
            move |(blob_hash, chunk_size, chunk_list_hash)| BlobDescriptor {
                blob_hash: BlobHash(blob_hash),
                blob_size,
                chunk_size,
                chunk_list_hash: ChunkListHash(chunk_list_hash),
            },
        )
}

pub fn sender() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=128)
}

pub fn mesh_id() -> impl Strategy<Value = String> {
    "[a-z0-9-]{0,40}"
}

pub fn delta_manifest() -> impl Strategy<Value = DeltaManifest> {
    (
        mesh_id(),
        any::<u64>(),
        hash_bytes(),
        sender(),
        any::<u64>(),
        any::<u64>(),
        tensor_index(12),
    )
        .prop_flat_map(
            |(mesh_id, round, base, sender, sample_count, training_steps, tensors)| {
                let blob_size = tensors.iter().map(|entry| entry.length).sum();
                blob_descriptor(blob_size).prop_map(move |blob| DeltaManifest {
                    mesh_id: mesh_id.clone(),
                    round,
                    base_model: ModelHash(base),
                    sender: sender.clone(),
                    sample_count,
                    training_steps,
                    blob,
                    tensors: tensors.clone(),
                })
            },
        )
}

pub fn state_manifest() -> impl Strategy<Value = StateManifest> {
    (
        mesh_id(),
        any::<u64>(),
        hash_bytes(),
        sender(),
        any::<u64>(),
        tensor_index(8),
        tensor_index(8),
    )
        .prop_flat_map(
            |(mesh_id, round, model_hash, sender, training_steps, model, optimizer)| {
                let model_bytes: u64 = model.iter().map(|entry| entry.length).sum();
                let optimizer: Vec<TensorEntry> = optimizer
                    .into_iter()
                    .map(|mut entry| {
                        entry.offset += model_bytes;
                        entry
                    })
                    .collect();
                let blob_size =
                    model_bytes + optimizer.iter().map(|entry| entry.length).sum::<u64>();
                blob_descriptor(blob_size).prop_map(move |blob| StateManifest {
                    mesh_id: mesh_id.clone(),
                    round,
                    model_hash: ModelHash(model_hash),
                    sender: sender.clone(),
                    training_steps,
                    blob,
                    model: model.clone(),
                    optimizer: optimizer.clone(),
                })
            },
        )
}

/// Finite values in the ranges deltas live in, with exact zeros and ties.
pub fn delta_value() -> impl Strategy<Value = f32> {
    prop_oneof![
        2 => Just(0.0f32),
        1 => Just(-3e-4f32),
        6 => (-1.0f32..1.0).prop_map(|value| value * 1e-3),
        2 => -100.0f32..100.0,
        1 => (any::<bool>(), 1e-20f32..1e3).prop_map(|(negative, value)| if negative { -value } else { value }),
    ]
}

/// A small delta: up to 5 tensors with up to ~300 values each.
pub fn tensor_set() -> impl Strategy<Value = TensorSet> {
    proptest::collection::btree_map(
        tensor_name(),
        proptest::collection::vec(1usize..9, 0..3),
        0..5,
    )
    .prop_flat_map(|shapes| {
        let tensors: Vec<_> = shapes
            .into_iter()
            .map(|(name, shape)| {
                let count = shape.iter().product::<usize>();
                proptest::collection::vec(delta_value(), count).prop_map(move |values| Tensor {
                    name: name.clone(),
                    shape: shape.clone(),
                    values,
                })
            })
            .collect();
        tensors.prop_map(|tensors| TensorSet::new(tensors).expect("valid by construction"))
    })
}

/// Same layout as `set`, new values.
pub fn same_layout_values(set: &TensorSet) -> impl Strategy<Value = TensorSet> + use<> {
    let tensors: Vec<_> = set
        .tensors()
        .iter()
        .map(|tensor| {
            let (name, shape) = (tensor.name.clone(), tensor.shape.clone());
            proptest::collection::vec(delta_value(), tensor.values.len()).prop_map(move |values| {
                Tensor {
                    name: name.clone(),
                    shape: shape.clone(),
                    values,
                }
            })
        })
        .collect();
    tensors.prop_map(|tensors| TensorSet::new(tensors).expect("valid by construction"))
}

/// Byte-level damage to a valid encoding.
#[derive(Debug, Clone)]
pub enum Mutation {
    Flip { position: usize, mask: u8 },
    Truncate { keep: usize },
    Insert { position: usize, byte: u8 },
    Remove { position: usize },
}

pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(
        prop_oneof![
            4 => (any::<usize>(), 1u8..=255).prop_map(|(position, mask)| Mutation::Flip { position, mask }),
            1 => any::<usize>().prop_map(|keep| Mutation::Truncate { keep }),
            1 => (any::<usize>(), any::<u8>()).prop_map(|(position, byte)| Mutation::Insert { position, byte }),
            1 => any::<usize>().prop_map(|position| Mutation::Remove { position }),
        ],
        1..4,
    )
}

pub fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        let len = bytes.len();
        match *mutation {
            Mutation::Flip { position, mask } if len > 0 => bytes[position % len] ^= mask,
            Mutation::Truncate { keep } => bytes.truncate(keep % (len + 1)),
            Mutation::Insert { position, byte } => bytes.insert(position % (len + 1), byte),
            Mutation::Remove { position } if len > 0 => {
                bytes.remove(position % len);
            }
            _ => {}
        }
    }
    bytes
}
