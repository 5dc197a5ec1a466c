//! Every failure case the issue names gets its typed error, and nothing is half applied:
//! NaN/Inf, wrong shapes, wrong names, hash mismatch, size over cap, truncation.

use meshtune_protocol::{
    BlobAssembler, ChunkError, CodecParams, DecodeError, DeltaManifest, EncodeError, ErrorFeedback,
    Limits, ModelHash, ModelLayout, Sparsity, Tensor, TensorEncoding, TensorEntry, TensorSet,
    TensorSpec, ValueFormat, VerifiedBlob, WireError, chunk_blob, decode_delta, encode_delta,
};

fn delta() -> TensorSet {
    let tensor = |name: &str, shape: Vec<usize>, scale: f32| {
        let count = shape.iter().product();
        let values = (0..count)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * scale)
            .collect();
        Tensor::new(name, shape, values).expect("valid")
    };
    TensorSet::new(vec![
        tensor("a.weight", vec![16, 32], 1e-4),
        tensor("b.bias", vec![8], 2e-4),
        tensor("c.weight", vec![3, 3, 3], 5e-5),
    ])
    .expect("valid")
}

/// A manifest and verified blob for `tensors` and `blob`, as an honest-looking sender
/// would announce them (the hashes always match the bytes).
fn announce(tensors: Vec<TensorEntry>, blob: Vec<u8>) -> (DeltaManifest, VerifiedBlob) {
    let chunk_list = chunk_blob(&blob, 64).expect("chunks");
    let manifest = DeltaManifest {
        mesh_id: "mesh".into(),
        round: 1,
        base_model: ModelHash::default(),
        sender: vec![1; 38],
        sample_count: 1,
        training_steps: 1,
        blob: chunk_list.descriptor(),
        tensors,
    };
    let blob = VerifiedBlob::verify(blob, &manifest.blob).expect("hash matches");
    (manifest, blob)
}

fn encoded(params: &CodecParams) -> (Vec<TensorEntry>, Vec<u8>) {
    let encoded = encode_delta(&delta(), params, None).expect("encodes");
    (encoded.tensors, encoded.blob)
}

fn raw(values: ValueFormat) -> CodecParams {
    CodecParams {
        values,
        sparsity: Sparsity::Dense,
        byte_shuffle: false,
        zstd_level: None,
    }
}

fn decode(manifest: &DeltaManifest, blob: &VerifiedBlob) -> Result<TensorSet, DecodeError> {
    decode_delta(manifest, blob, &delta().layout(), &Limits::default())
}

#[test]
fn nan_and_inf_in_a_blob_are_rejected() {
    for (format, bad) in [
        (ValueFormat::F32, f32::NAN.to_le_bytes().to_vec()),
        (ValueFormat::F32, f32::NEG_INFINITY.to_le_bytes().to_vec()),
        (ValueFormat::F16, half::f16::INFINITY.to_le_bytes().to_vec()),
        (ValueFormat::Bf16, half::bf16::NAN.to_le_bytes().to_vec()),
    ] {
        let (tensors, mut blob) = encoded(&raw(format));
        let target = &tensors[1];
        let at = target.offset as usize + 3 * bad.len();
        blob[at..at + bad.len()].copy_from_slice(&bad);
        let (manifest, blob) = announce(tensors, blob);
        assert_eq!(
            decode(&manifest, &blob),
            Err(DecodeError::NonFinite {
                tensor: "b.bias".into(),
                index: 3
            }),
            "{format}"
        );
    }
}

#[test]
fn bad_quantization_scales_are_rejected() {
    let (tensors, blob) = encoded(&raw(ValueFormat::Int8 { block_size: 4 }));
    for (scale, expected_block_error) in [
        (f32::NAN, true),
        (-1.0, true),
        (f32::INFINITY, true),
        (3e38, false),
    ] {
        let mut blob = blob.clone();
        let target = &tensors[2];
        let at = target.offset as usize + 4; // scale of block 1
        blob[at..at + 4].copy_from_slice(&scale.to_le_bytes());
        let (manifest, blob) = announce(tensors.clone(), blob);
        let error = decode(&manifest, &blob).expect_err("bad scale");
        if expected_block_error {
            assert_eq!(
                error,
                DecodeError::InvalidScale {
                    tensor: "c.weight".into(),
                    block: 1
                }
            );
        } else {
            // A finite scale whose values overflow to infinity.
            assert!(
                matches!(error, DecodeError::NonFinite { ref tensor, .. } if tensor == "c.weight"),
                "{error}"
            );
        }
    }
}

#[test]
fn sparse_indices_outside_the_tensor_are_rejected() {
    let params = CodecParams {
        sparsity: Sparsity::TopK {
            keep_fraction: 0.25,
        },
        ..raw(ValueFormat::F32)
    };
    let (tensors, mut blob) = encoded(&params);
    // First group of a.weight: width byte, then gaps; widen the width to 32 bits with
    // all ones so the first index is far outside the tensor.
    let at = tensors[0].offset as usize;
    blob[at] = 32;
    blob[at + 1..at + 5].copy_from_slice(&[0xff; 4]);
    let (manifest, blob) = announce(tensors, blob);
    assert!(matches!(
        decode(&manifest, &blob),
        Err(DecodeError::InvalidIndices { ref tensor, .. }) if tensor == "a.weight"
    ));
}

#[test]
fn wrong_shapes_and_names_are_rejected_before_any_decoding() {
    let (tensors, blob) = encoded(&CodecParams::int8_zstd());
    let (manifest, blob) = announce(tensors, blob);
    let limits = Limits::default();
    let layout = |specs: Vec<TensorSpec>| ModelLayout::new(specs).expect("valid layout");
    let a = TensorSpec::new("a.weight", vec![16, 32]);
    let b = TensorSpec::new("b.bias", vec![8]);
    let c = TensorSpec::new("c.weight", vec![3, 3, 3]);

    let transposed = layout(vec![
        TensorSpec::new("a.weight", vec![32, 16]),
        b.clone(),
        c.clone(),
    ]);
    let expected = DecodeError::ShapeMismatch {
        name: "a.weight".into(),
        expected: vec![32, 16],
        found: vec![16, 32],
    };
    assert_eq!(manifest.check_layout(&transposed), Err(expected.clone()));
    assert_eq!(
        decode_delta(&manifest, &blob, &transposed, &limits),
        Err(expected)
    );

    let renamed = layout(vec![
        a.clone(),
        TensorSpec::new("b.weight", vec![8]),
        c.clone(),
    ]);
    assert_eq!(
        decode_delta(&manifest, &blob, &renamed, &limits),
        Err(DecodeError::UnexpectedTensor {
            name: "b.bias".into()
        })
    );
    let larger = layout(vec![
        a.clone(),
        b.clone(),
        c.clone(),
        TensorSpec::new("d", vec![1]),
    ]);
    assert_eq!(
        decode_delta(&manifest, &blob, &larger, &limits),
        Err(DecodeError::MissingTensor { name: "d".into() })
    );
    let smaller = layout(vec![a, c]);
    assert_eq!(
        decode_delta(&manifest, &blob, &smaller, &limits),
        Err(DecodeError::UnexpectedTensor {
            name: "b.bias".into()
        })
    );
}

#[test]
fn hash_mismatches_are_rejected() {
    let (tensors, blob) = encoded(&CodecParams::int8_zstd());
    let (manifest, verified) = announce(tensors.clone(), blob.clone());

    // Bytes that do not hash to the announced blob.
    let mut tampered = blob.clone();
    tampered[5] ^= 1;
    assert!(matches!(
        VerifiedBlob::verify(tampered.clone(), &manifest.blob),
        Err(ChunkError::BlobHashMismatch { .. })
    ));
    // A verified blob of another manifest.
    let (_, other) = announce(tensors, tampered);
    assert!(matches!(
        decode(&manifest, &other),
        Err(DecodeError::BlobHashMismatch { expected, .. }) if expected == manifest.blob.blob_hash
    ));
    assert!(decode(&manifest, &verified).is_ok());

    // A chunk that does not hash to its entry in the chunk list.
    let chunk_list = chunk_blob(&blob, 64).expect("chunks");
    let mut assembler =
        BlobAssembler::new(chunk_list.clone(), &Limits::default()).expect("within limits");
    let mut chunk = chunk_list.chunk(&blob, 0).expect("chunk 0").to_vec();
    chunk[0] ^= 0x80;
    assert!(matches!(
        assembler.accept_chunk(0, &chunk),
        Err(ChunkError::ChunkHashMismatch { index: 0, .. })
    ));
    assert_eq!(assembler.missing_count(), chunk_list.chunk_count());
}

#[test]
fn sizes_over_caps_are_rejected() {
    let (tensors, blob) = encoded(&CodecParams::int8_zstd());
    let (manifest, _) = announce(tensors, blob);
    let bytes = manifest.encode(&Limits::default()).expect("encodes");
    let capped = |limits: Limits, field: &str| {
        assert!(
            matches!(DeltaManifest::decode(&bytes, &limits), Err(WireError::OverCap { field: f, .. }) if f == field),
            "{field}: {:?}",
            DeltaManifest::decode(&bytes, &limits)
        );
        assert!(manifest.encode(&limits).is_err(), "{field}");
    };
    capped(
        Limits {
            max_tensors: 2,
            ..Limits::default()
        },
        "tensor count",
    );
    capped(
        Limits {
            max_name_len: 7,
            ..Limits::default()
        },
        "tensor name",
    );
    capped(
        Limits {
            max_dims: 2,
            ..Limits::default()
        },
        "tensor dimensions",
    );
    capped(
        Limits {
            max_tensor_elements: 31,
            ..Limits::default()
        },
        "tensor dimension",
    );
    capped(
        Limits {
            max_tensor_elements: 500,
            ..Limits::default()
        },
        "tensor elements",
    );
    capped(
        Limits {
            max_tensor_elements: 512,
            max_total_elements: 540,
            ..Limits::default()
        },
        "total elements",
    );
    capped(
        Limits {
            max_sender_len: 37,
            ..Limits::default()
        },
        "sender",
    );
    capped(
        Limits {
            max_mesh_id_len: 3,
            ..Limits::default()
        },
        "mesh id",
    );
    capped(
        Limits {
            max_blob_size: manifest.blob.blob_size - 1,
            ..Limits::default()
        },
        "blob size",
    );
    capped(
        Limits {
            max_chunk_size: 63,
            ..Limits::default()
        },
        "chunk size",
    );
    capped(
        Limits {
            max_chunks: manifest.blob.chunk_count() - 1,
            ..Limits::default()
        },
        "chunk count",
    );
    assert!(matches!(
        DeltaManifest::decode(
            &bytes,
            &Limits {
                max_manifest_bytes: bytes.len() - 1,
                ..Limits::default()
            }
        ),
        Err(WireError::MessageTooLarge { .. })
    ));

    // The assembler checks the blob size before allocating its buffer.
    let list = chunk_blob(&[0u8; 1000], 10).expect("chunks");
    assert!(matches!(
        BlobAssembler::new(
            list,
            &Limits {
                max_blob_size: 999,
                ..Limits::default()
            }
        ),
        Err(ChunkError::InvalidChunkList(WireError::OverCap {
            field: "blob size",
            ..
        }))
    ));
}

#[test]
fn truncation_is_rejected() {
    // A truncated manifest.
    let (tensors, blob) = encoded(&CodecParams::int8_zstd());
    let (manifest, _) = announce(tensors.clone(), blob.clone());
    let bytes = manifest.encode(&Limits::default()).expect("encodes");
    for keep in 0..bytes.len() {
        assert!(
            DeltaManifest::decode(&bytes[..keep], &Limits::default()).is_err(),
            "{keep}"
        );
    }
    assert!(matches!(
        DeltaManifest::decode(&bytes[..bytes.len() - 1], &Limits::default()),
        Err(WireError::Truncated { .. })
    ));

    // Truncated and oversized chunks.
    let chunk_list = chunk_blob(&blob, 64).expect("chunks");
    let mut assembler =
        BlobAssembler::new(chunk_list.clone(), &Limits::default()).expect("within limits");
    let chunk = chunk_list.chunk(&blob, 0).expect("chunk 0");
    assert_eq!(
        assembler.accept_chunk(0, &chunk[..63]),
        Err(ChunkError::Truncated {
            index: 0,
            expected: 64,
            found: 63
        })
    );
    let mut longer = chunk.to_vec();
    longer.push(0);
    assert_eq!(
        assembler.accept_chunk(0, &longer),
        Err(ChunkError::Oversized {
            index: 0,
            expected: 64,
            found: 65
        })
    );
    assert_eq!(assembler.accept_chunk(0, chunk), Ok(()));
    assert_eq!(
        assembler.accept_chunk(0, chunk),
        Err(ChunkError::Duplicate { index: 0 })
    );
    assert!(matches!(
        assembler.finish(),
        Err(ChunkError::Incomplete { .. })
    ));

    // A zstd segment cut short, announced with consistent lengths and hashes.
    let zstd_tensor = tensors
        .iter()
        .position(|entry| entry.encoding.zstd)
        .expect("one segment uses zstd");
    let mut short_tensors = tensors.clone();
    let cut = 3u64;
    short_tensors[zstd_tensor].length -= cut;
    for entry in &mut short_tensors[zstd_tensor + 1..] {
        entry.offset -= cut;
    }
    let end = (tensors[zstd_tensor].offset + tensors[zstd_tensor].length) as usize;
    let mut short_blob = blob[..end - cut as usize].to_vec();
    short_blob.extend_from_slice(&blob[end..]);
    let (manifest, blob) = announce(short_tensors, short_blob);
    assert!(matches!(
        decode(&manifest, &blob),
        Err(DecodeError::Zstd { .. })
    ));

    // An uncompressed segment whose length does not fit its encoding.
    let (mut tensors, blob) = encoded(&raw(ValueFormat::F32));
    tensors[2].length -= 4;
    let (manifest, blob) = announce(tensors, blob[..blob.len() - 4].to_vec());
    assert!(matches!(
        decode(&manifest, &blob),
        Err(DecodeError::InvalidManifest(WireError::InvalidField {
            field: "segment length",
            ..
        }))
    ));
}

#[test]
fn a_bad_last_tensor_rejects_the_whole_delta() {
    // Decoding: the first tensors are fine, the last is corrupt; no delta comes out.
    let (tensors, mut blob) = encoded(&raw(ValueFormat::F32));
    let last = blob.len() - 4;
    blob[last..].copy_from_slice(&f32::NAN.to_le_bytes());
    let (manifest, blob) = announce(tensors, blob);
    assert!(
        matches!(decode(&manifest, &blob), Err(DecodeError::NonFinite { ref tensor, .. }) if tensor == "c.weight")
    );

    // Encoding with error feedback: a bad last tensor leaves every residual untouched.
    let mut feedback = ErrorFeedback::new();
    let params = CodecParams::top_k_int8(0.1);
    encode_delta(&delta(), &params, Some(&mut feedback)).expect("first round encodes");
    let before = feedback.clone();
    let mut tensors = delta().into_tensors();
    tensors[2].values[5] = f32::INFINITY;
    let bad = TensorSet::new(tensors).expect("valid set");
    assert_eq!(
        encode_delta(&bad, &params, Some(&mut feedback)),
        Err(EncodeError::NonFinite {
            tensor: "c.weight".into(),
            index: 5
        })
    );
    assert_eq!(feedback, before);

    // Same for a value out of the format's range.
    let mut tensors = delta().into_tensors();
    tensors[2].values[0] = 1e5;
    let bad = TensorSet::new(tensors).expect("valid set");
    let f16 = CodecParams {
        values: ValueFormat::F16,
        ..params
    };
    assert!(matches!(
        encode_delta(&bad, &f16, Some(&mut feedback)),
        Err(EncodeError::OutOfRange { ref tensor, format: ValueFormat::F16, .. }) if tensor == "c.weight"
    ));
    assert_eq!(feedback, before);
}

#[test]
fn encoder_input_errors_are_typed() {
    let params = CodecParams::int8_zstd();
    let mut feedback = ErrorFeedback::new();
    encode_delta(&delta(), &params, Some(&mut feedback)).expect("encodes");
    let reshaped = TensorSet::new(vec![
        Tensor::new("a.weight", vec![3], vec![0.0; 3]).expect("valid"),
    ])
    .expect("valid");
    assert_eq!(
        encode_delta(&reshaped, &params, Some(&mut feedback)),
        Err(EncodeError::FeedbackShapeMismatch {
            tensor: "a.weight".into(),
            expected: 3,
            found: 512
        })
    );
    let invalid = CodecParams {
        values: ValueFormat::Int4 { block_size: 0 },
        ..params
    };
    assert!(matches!(
        encode_delta(&delta(), &invalid, None),
        Err(EncodeError::InvalidParams { .. })
    ));
    let wide = CodecParams {
        zstd_level: Some(1000),
        ..params
    };
    assert!(matches!(
        encode_delta(&delta(), &wide, None),
        Err(EncodeError::InvalidParams { .. })
    ));
    let encoding = TensorEncoding {
        values: ValueFormat::F32,
        kept: None,
        rank: None,
        byte_shuffle: false,
        zstd: false,
    };
    assert!(encoding.is_lossless());
}

/// A state whose model does not hash to the announced model hash (a peer announcing one model
/// and serving another), or whose entries are lossy (a state must restore exactly), is refused
/// with its own error, and nothing is returned.
#[test]
fn states_with_a_wrong_model_hash_or_lossy_entries_are_rejected() {
    use meshtune_protocol::{StateCodecParams, StateManifest, decode_state, encode_state};
    let model = delta();
    let optimizer = delta();
    let encoded = encode_state(&model, &optimizer, &StateCodecParams::default()).expect("encodes");
    let chunk_list = chunk_blob(&encoded.blob, 64).expect("chunks");
    let honest = StateManifest {
        mesh_id: "mesh".into(),
        round: 3,
        model_hash: encoded.model_hash,
        sender: vec![1; 38],
        training_steps: 10,
        blob: chunk_list.descriptor(),
        model: encoded.model.clone(),
        optimizer: encoded.optimizer.clone(),
    };
    let blob = VerifiedBlob::verify(encoded.blob.clone(), &honest.blob).expect("matches");
    let limits = Limits::default();
    let decode =
        |m: &StateManifest| decode_state(m, &blob, &model.layout(), &optimizer.layout(), &limits);
    assert!(decode(&honest).is_ok());

    let mut other_hash = honest.clone();
    other_hash.model_hash = ModelHash([9; 32]);
    match decode(&other_hash) {
        Err(DecodeError::ModelHashMismatch { expected, found }) => {
            assert_eq!(expected, ModelHash([9; 32]));
            assert_eq!(found, encoded.model_hash);
        }
        other => panic!("expected ModelHashMismatch, got {other:?}"),
    }

    // A self-consistent manifest and blob, but the model stored as int8.
    let lossy =
        encode_delta(&model, &raw(ValueFormat::Int8 { block_size: 64 }), None).expect("encodes");
    let lossy_chunks = chunk_blob(&lossy.blob, 64).expect("chunks");
    let lossy_state = StateManifest {
        blob: lossy_chunks.descriptor(),
        model: lossy.tensors,
        optimizer: Vec::new(),
        ..honest.clone()
    };
    let lossy_blob = VerifiedBlob::verify(lossy.blob, &lossy_state.blob).expect("matches");
    let no_optimizer = TensorSet::new(Vec::new()).expect("empty set");
    match decode_state(
        &lossy_state,
        &lossy_blob,
        &model.layout(),
        &no_optimizer.layout(),
        &limits,
    ) {
        Err(err @ DecodeError::LossyState { .. }) => {
            assert!(err.to_string().contains("a.weight"), "{err}");
        }
        other => panic!("expected LossyState, got {other:?}"),
    }
}

#[test]
fn low_rank_entries_that_cannot_be_decoded_are_refused_with_the_reason() {
    let params = CodecParams {
        sparsity: Sparsity::LowRank { rank: 2 },
        ..raw(ValueFormat::F32)
    };
    let (tensors, blob) = encoded(&params);
    // a.weight [16, 32] and c.weight [3, 3, 3] (as 3 x 9) are factorized; b.bias is a vector.
    let ranks: Vec<Option<u32>> = tensors.iter().map(|t| t.encoding.rank).collect();
    assert_eq!(ranks, [Some(2), None, Some(2)]);
    assert_eq!(tensors[0].length, 4 * 2 * (16 + 32));
    let limits = Limits::default();
    let (manifest, verified) = announce(tensors.clone(), blob);
    let bytes = manifest.encode(&limits).expect("encodes");
    assert_eq!(
        DeltaManifest::decode(&bytes, &limits).as_ref(),
        Ok(&manifest)
    );
    assert!(decode(&manifest, &verified).is_ok());

    // Where the rank of a.weight is on the wire: the byte that is 2 here and 3 there (the
    // blob size and the segment length differ too).
    let mut rank3 = manifest.clone();
    rank3.tensors[0].encoding.rank = Some(3);
    let grown = 4 * (16 + 32);
    rank3.tensors[0].length += grown;
    for entry in &mut rank3.tensors[1..] {
        entry.offset += grown;
    }
    rank3.blob.blob_size += grown;
    let other = rank3.encode(&limits).expect("encodes");
    let at = (0..bytes.len().min(other.len()))
        .find(|&i| (bytes[i], other[i]) == (2, 3))
        .expect("the rank is on the wire");
    for (rank, reason) in [
        (0u8, "low rank must be in 1..=256"),
        (17, "low rank exceeds the tensor's smaller dimension"),
    ] {
        let mut bad = bytes.clone();
        bad[at] = rank;
        let error = DeltaManifest::decode(&bad, &limits).expect_err("refused");
        assert!(error.to_string().contains(reason), "rank {rank}: {error}");
    }
    // Over the cap on the wire: a varint of 300.
    let mut bad = bytes[..at].to_vec();
    bad.extend_from_slice(&[0xac, 0x02]);
    bad.extend_from_slice(&bytes[at + 1..]);
    let error = DeltaManifest::decode(&bad, &limits).expect_err("refused");
    assert!(error.to_string().contains("low rank"), "{error}");

    // A sender cannot announce a rank on a vector, nor top-k and rank together.
    let mut vector = manifest.clone();
    vector.tensors[1].encoding.rank = Some(1);
    let error = vector.encode(&limits).expect_err("refused");
    assert!(
        error.to_string().contains("at least two dimensions"),
        "{error}"
    );
    let mut both = manifest.clone();
    both.tensors[0].encoding.kept = Some(4);
    let error = both.encode(&limits).expect_err("refused");
    assert!(
        error.to_string().contains("both top-k and low-rank"),
        "{error}"
    );
    // A factor with a NaN is refused by name.
    let (tensors, mut blob) = encoded(&params);
    let at = tensors[2].offset as usize + 4;
    blob[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let (manifest, verified) = announce(tensors, blob);
    assert!(matches!(
        decode(&manifest, &verified),
        Err(DecodeError::NonFinite { ref tensor, .. }) if tensor == "c.weight"
    ));
}
