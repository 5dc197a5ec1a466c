//! One-input bodies of the fuzz targets, shared by `fuzz/` (cargo-fuzz) and the corpus
//! replay test (`tests/fuzz_corpus_replay.rs`), so CI replays the committed corpus
//! through exactly the code the fuzzer ran, on stable Rust.
//!
//! Owns: the two harnesses and the seed builders. Must not touch: anything outside
//! the public decode API (plus hashing the fuzz input, to stand in for the chunk fetch).
//! A harness panics only on a real finding: a decoder panicking, or an accepted message
//! that does not re-encode to the same bytes (the format promises one encoding per value).

use crate::chunk::ChunkList;
use crate::chunk::{VerifiedBlob, chunk_blob};
use crate::codec::{CodecParams, ErrorFeedback, decode_delta, encode_delta};
use crate::hash::{BlobHash, ModelHash};
use crate::limits::Limits;
use crate::manifest::{DeltaManifest, StateManifest};
use crate::messages::{ChunkRequest, ChunkResponse};
use crate::tensor::{Tensor, TensorSet};

/// Largest blob the blob harness builds (keeps each run fast).
const MAX_FUZZ_BLOB: u64 = 1 << 20;

/// Limits of the blob harness: small, so that a hostile shape cannot make a run slow.
#[must_use]
pub fn fuzz_limits() -> Limits {
    Limits {
        max_tensor_elements: 1 << 16,
        max_total_elements: 1 << 18,
        max_blob_size: MAX_FUZZ_BLOB,
        ..Limits::default()
    }
}

/// Feeds `data` to every message decoder; accepted messages must re-encode to `data`.
///
/// # Panics
/// On a finding (see the module docs).
pub fn wire_messages(data: &[u8]) {
    let limits = Limits::default();
    if let Ok(manifest) = DeltaManifest::decode(data, &limits) {
        let encoded = manifest
            .encode(&limits)
            .expect("an accepted delta manifest re-encodes");
        assert_eq!(encoded, data, "delta manifest encoding is not canonical");
        let _ = manifest.check_layout(&own_layout(&manifest));
    }
    if let Ok(manifest) = StateManifest::decode(data, &limits) {
        let encoded = manifest
            .encode(&limits)
            .expect("an accepted state manifest re-encodes");
        assert_eq!(encoded, data, "state manifest encoding is not canonical");
    }
    if let Ok(list) = ChunkList::decode(data, &limits) {
        assert_eq!(list.encode(), data, "chunk list encoding is not canonical");
        let _ = list.verify_against(&list.descriptor());
    }
    if let Ok(request) = ChunkRequest::decode(data, &limits) {
        let encoded = request
            .encode(&limits)
            .expect("an accepted request re-encodes");
        assert_eq!(encoded, data, "chunk request encoding is not canonical");
    }
    if let Ok(response) = ChunkResponse::decode(data, &limits) {
        let encoded = response
            .encode(&limits)
            .expect("an accepted response re-encodes");
        assert_eq!(encoded, data, "chunk response encoding is not canonical");
    }
}

fn own_layout(manifest: &DeltaManifest) -> crate::tensor::ModelLayout {
    let specs = manifest
        .tensors
        .iter()
        .map(|entry| crate::tensor::TensorSpec::new(entry.name.clone(), entry.shape.clone()))
        .collect();
    crate::tensor::ModelLayout::new(specs).unwrap_or_default()
}

/// Input of [`delta_blob`]: `u16 LE manifest length`, the manifest, the blob bytes.
///
/// The blob is cut or zero-padded to the manifest's blob size and the manifest's blob
/// hash is replaced by the blob's, standing in for a blob whose chunks were fetched and
/// verified; then it is decoded against the manifest's own layout, so the fuzzer reaches
/// the segment decoders.
///
/// # Panics
/// On a finding: a decoder panicking, or an accepted delta that is not finite or does not
/// have the announced shapes.
pub fn delta_blob(data: &[u8]) {
    let Some((length, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let manifest_len = usize::from(u16::from_le_bytes(*length));
    if manifest_len > rest.len() {
        return;
    }
    let (manifest_bytes, blob_bytes) = rest.split_at(manifest_len);
    let limits = fuzz_limits();
    let Ok(mut manifest) = DeltaManifest::decode(manifest_bytes, &limits) else {
        return;
    };
    let Ok(blob_size) = usize::try_from(manifest.blob.blob_size) else {
        return;
    };
    let mut blob = blob_bytes.to_vec();
    blob.resize(blob_size, 0);
    manifest.blob.blob_hash = BlobHash::of_bytes(&blob);
    let Ok(blob) = VerifiedBlob::verify(blob, &manifest.blob) else {
        return;
    };
    let layout = own_layout(&manifest);
    if let Ok(delta) = decode_delta(&manifest, &blob, &layout, &limits) {
        assert_eq!(delta.len(), manifest.tensors.len());
        for (tensor, entry) in delta.tensors().iter().zip(&manifest.tensors) {
            assert_eq!(tensor.name, entry.name);
            assert_eq!(tensor.shape, entry.shape);
            assert!(tensor.values.iter().all(|value| value.is_finite()));
        }
    }
}

/// Builds a [`delta_blob`] input from a real delta: what the seed corpus is made of.
#[must_use]
pub fn delta_blob_input(
    delta: &TensorSet,
    params: &CodecParams,
    feedback: Option<&mut ErrorFeedback>,
) -> Option<Vec<u8>> {
    let encoded = encode_delta(delta, params, feedback).ok()?;
    let chunk_list = chunk_blob(&encoded.blob, 4096).ok()?;
    let manifest = DeltaManifest {
        mesh_id: "fuzz".into(),
        round: 1,
        base_model: ModelHash::default(),
        sender: vec![1, 2, 3],
        sample_count: 8,
        training_steps: 4,
        blob: chunk_list.descriptor(),
        tensors: encoded.tensors,
    };
    let manifest_bytes = manifest.encode(&fuzz_limits()).ok()?;
    let mut input = u16::try_from(manifest_bytes.len())
        .ok()?
        .to_le_bytes()
        .to_vec();
    input.extend_from_slice(&manifest_bytes);
    input.extend_from_slice(&encoded.blob);
    Some(input)
}

/// A small delta for seeds: a few tensors of a few shapes, heavy-tailed values.
#[must_use]
pub fn seed_delta(seed: u64) -> TensorSet {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e-3
    };
    let shapes: [(&str, Vec<usize>); 4] = [
        (
            "decoder.block.0.layer.0.SelfAttention.q.weight",
            vec![8, 16],
        ),
        ("decoder.block.0.layer.0.layer_norm.weight", vec![16]),
        (
            "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
            vec![3, 5, 7],
        ),
        ("shared.weight", vec![33, 9]),
    ];
    let tensors = shapes
        .into_iter()
        .map(|(name, shape)| {
            let count = shape.iter().product();
            let values = (0..count)
                .map(|_| next() / (0.01 + next().abs() * 100.0))
                .collect();
            Tensor {
                name: name.to_owned(),
                shape,
                values,
            }
        })
        .collect();
    TensorSet::new(tensors).unwrap_or_default()
}
