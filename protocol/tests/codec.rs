//! The delta codec end to end (encode, chunk, verify, decode): round trips, error bounds,
//! top-k selection, error feedback over rounds, states, and damaged blobs.

mod common;

use common::{codec_params, mutate, mutations, same_layout_values, tensor_set};
use meshtune_protocol::{
    CodecParams, DeltaManifest, ErrorFeedback, Limits, ModelHash, Sparsity, StateCodecParams,
    StateManifest, TensorSet, ValueFormat, VerifiedBlob, chunk_blob, decode_delta, decode_state,
    encode_delta, encode_state,
};
use proptest::prelude::*;

/// Encodes, chunks, announces and verifies `delta` like a sender and receiver would, and
/// returns what the receiver decodes.
fn send(
    delta: &TensorSet,
    params: &CodecParams,
    feedback: Option<&mut ErrorFeedback>,
) -> TensorSet {
    let encoded = encode_delta(delta, params, feedback).expect("valid delta encodes");
    let chunk_list = chunk_blob(&encoded.blob, 1000).expect("chunks");
    let manifest = DeltaManifest {
        mesh_id: "test".into(),
        round: 3,
        base_model: ModelHash::default(),
        sender: b"peer".to_vec(),
        sample_count: 10,
        training_steps: 5,
        blob: chunk_list.descriptor(),
        tensors: encoded.tensors,
    };
    let limits = Limits::default();
    let manifest = DeltaManifest::decode(&manifest.encode(&limits).expect("encodes"), &limits)
        .expect("decodes");
    let blob = VerifiedBlob::verify(encoded.blob, &manifest.blob).expect("blob matches");
    decode_delta(&manifest, &blob, &delta.layout(), &limits).expect("decodes")
}

fn kept_count(params: &CodecParams, elements: usize) -> usize {
    match params.sparsity {
        Sparsity::Dense => elements,
        Sparsity::TopK { keep_fraction } if elements > 0 => {
            ((keep_fraction * elements as f64).ceil() as usize).clamp(1, elements)
        }
        Sparsity::TopK { .. } => 0,
        Sparsity::LowRank { .. } => elements,
    }
}

/// Per-element bound of dense quantization: half a step of the element's block, plus
/// float rounding of the scale.
fn quantization_bound(values: &[f32], block_size: u32, levels: f32) -> Vec<f32> {
    values
        .chunks(block_size as usize)
        .flat_map(|block| {
            let absmax = block.iter().fold(0f32, |max, value| max.max(value.abs()));
            let bound = absmax / levels / 2.0 + absmax * 4.0 * f32::EPSILON;
            std::iter::repeat_n(bound, block.len())
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Dense formats: f32 is exact, f16/bf16 round each value, int8/int4 are within half a
    /// step of their block scale (the bound).
    #[test]
    fn dense_formats_meet_their_bounds(delta in tensor_set(), params in codec_params()) {
        let params = CodecParams { sparsity: Sparsity::Dense, ..params };
        let decoded = send(&delta, &params, None);
        for (tensor, decoded) in delta.tensors().iter().zip(decoded.tensors()) {
            prop_assert_eq!(&tensor.name, &decoded.name);
            prop_assert_eq!(&tensor.shape, &decoded.shape);
            let expected: Vec<f32> = match params.values {
                ValueFormat::F32 => tensor.values.clone(),
                ValueFormat::F16 => tensor.values.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
                ValueFormat::Bf16 => tensor.values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect(),
                ValueFormat::Int8 { block_size } | ValueFormat::Int4 { block_size } => {
                    let levels = if matches!(params.values, ValueFormat::Int8 { .. }) { 127.0 } else { 7.0 };
                    let bounds = quantization_bound(&tensor.values, block_size, levels);
                    for ((&value, &got), &bound) in tensor.values.iter().zip(&decoded.values).zip(&bounds) {
                        prop_assert!((value - got).abs() <= bound, "{value} -> {got}, bound {bound}");
                    }
                    continue;
                }
            };
            prop_assert_eq!(&decoded.values, &expected);
        }
    }

    /// Top-k keeps exactly the k largest magnitudes (ties: lowest index) and zeros the rest.
    #[test]
    fn top_k_keeps_the_largest_magnitudes(delta in tensor_set(), fraction in 0.0001f64..=1.0, zstd: bool) {
        let params = CodecParams {
            values: ValueFormat::F32,
            sparsity: Sparsity::TopK { keep_fraction: fraction },
            byte_shuffle: false,
            zstd_level: zstd.then_some(1),
        };
        let decoded = send(&delta, &params, None);
        for (tensor, decoded) in delta.tensors().iter().zip(decoded.tensors()) {
            let k = kept_count(&params, tensor.values.len());
            let mut order: Vec<usize> = (0..tensor.values.len()).collect();
            order.sort_by(|&a, &b| {
                let key = |i: usize| tensor.values[i].to_bits() & 0x7fff_ffff;
                key(b).cmp(&key(a)).then(a.cmp(&b))
            });
            let mut expected = vec![0.0f32; tensor.values.len()];
            for &index in &order[..k] {
                expected[index] = tensor.values[index];
            }
            prop_assert_eq!(&decoded.values, &expected);
        }
    }

    /// The invariant: over any number of rounds, everything sent plus the residual
    /// equals the sum of the true deltas, up to the rounding of the f32 additions.
    #[test]
    fn error_feedback_loses_nothing(
        (first, later) in tensor_set().prop_flat_map(|first| {
            let later = proptest::collection::vec(same_layout_values(&first), 0..5);
            (Just(first), later)
        }),
        params in codec_params(),
    ) {
        let mut feedback = ErrorFeedback::new();
        let elements = first.total_elements() as usize;
        let mut true_sum = vec![0f64; elements];
        let mut sent_sum = vec![0f64; elements];
        let mut tolerance = vec![0f64; elements];
        for delta in std::iter::once(&first).chain(&later) {
            let carried: Vec<f32> = delta
                .tensors()
                .iter()
                .flat_map(|tensor| {
                    feedback
                        .residual(&tensor.name)
                        .map_or_else(|| vec![0.0; tensor.values.len()], <[f32]>::to_vec)
                })
                .collect();
            let decoded = send(delta, &params, Some(&mut feedback));
            let values = delta.tensors().iter().flat_map(|tensor| tensor.values.iter());
            let sent = decoded.tensors().iter().flat_map(|tensor| tensor.values.iter());
            for (index, ((&value, &sent), &carried)) in values.zip(sent).zip(&carried).enumerate() {
                true_sum[index] += f64::from(value);
                sent_sum[index] += f64::from(sent);
                // Two f32 roundings per round: residual + value, then minus what was sent.
                let corrected = f64::from(carried) + f64::from(value);
                tolerance[index] += f64::from(f32::EPSILON) * (corrected.abs() + (corrected - f64::from(sent)).abs());
            }
        }
        let residual: Vec<f32> = first
            .tensors()
            .iter()
            .flat_map(|tensor| feedback.residual(&tensor.name).map_or_else(Vec::new, <[f32]>::to_vec))
            .collect();
        prop_assert_eq!(residual.len(), elements);
        for index in 0..elements {
            let error = (sent_sum[index] + f64::from(residual[index]) - true_sum[index]).abs();
            prop_assert!(
                error <= tolerance[index] + 1e-37,
                "element {index}: sent {} + residual {} != true {} (error {error}, tolerance {})",
                sent_sum[index], residual[index], true_sum[index], tolerance[index]
            );
        }
    }

    /// A lossless codec leaves nothing in the residual.
    #[test]
    fn lossless_feedback_stays_zero(delta in tensor_set(), shuffle: bool) {
        let params = CodecParams { byte_shuffle: shuffle, ..CodecParams::lossless() };
        let mut feedback = ErrorFeedback::new();
        let decoded = send(&delta, &params, Some(&mut feedback));
        prop_assert_eq!(&decoded, &delta);
        prop_assert_eq!(feedback.squared_norm(), 0.0);
    }

    #[test]
    fn encoding_is_deterministic(delta in tensor_set(), params in codec_params()) {
        let first = encode_delta(&delta, &params, None).expect("encodes");
        let second = encode_delta(&delta, &params, None).expect("encodes");
        prop_assert_eq!(first, second);
    }

    #[test]
    fn states_round_trip_exactly(model in tensor_set(), optimizer in tensor_set(), shuffle: bool, zstd: bool) {
        let params = StateCodecParams { byte_shuffle: shuffle, zstd_level: zstd.then_some(3) };
        let encoded = encode_state(&model, &optimizer, &params).expect("encodes");
        prop_assert_eq!(encoded.model_hash, ModelHash::of_tensors(&model));
        let chunk_list = chunk_blob(&encoded.blob, 512).expect("chunks");
        let manifest = StateManifest {
            mesh_id: "mesh".into(),
            round: 9,
            model_hash: encoded.model_hash,
            sender: vec![7; 38],
            training_steps: 1000,
            blob: chunk_list.descriptor(),
            model: encoded.model,
            optimizer: encoded.optimizer,
        };
        let limits = Limits::default();
        let manifest = StateManifest::decode(&manifest.encode(&limits).expect("encodes"), &limits).expect("decodes");
        let blob = VerifiedBlob::verify(encoded.blob, &manifest.blob).expect("blob matches");
        let state = decode_state(&manifest, &blob, &model.layout(), &optimizer.layout(), &limits).expect("decodes");
        prop_assert_eq!(state.model, model);
        prop_assert_eq!(state.optimizer, optimizer);
    }

    /// Valid manifests with damaged blobs (the blob re-hashed, as if a malicious sender had
    /// announced it): decoding never panics, and anything accepted is finite and complete.
    #[test]
    fn damaged_blobs_never_panic(delta in tensor_set(), params in codec_params(), damage in mutations()) {
        let input = meshtune_protocol::fuzz_harness::delta_blob_input(&delta, &params, None).expect("seed");
        let manifest_len = usize::from(u16::from_le_bytes([input[0], input[1]]));
        let (head, blob) = input.split_at(2 + manifest_len);
        let mut damaged = head.to_vec();
        damaged.extend_from_slice(&mutate(blob.to_vec(), &damage));
        meshtune_protocol::fuzz_harness::delta_blob(&damaged);
        // Damage anywhere, the manifest included.
        meshtune_protocol::fuzz_harness::delta_blob(&mutate(input, &damage));
    }

    /// A state blob damaged anywhere (and re-hashed, as a malicious peer would announce it)
    /// never panics the decoder; what it accepts hashes to the announced model.
    #[test]
    fn damaged_states_never_panic(model in tensor_set(), optimizer in tensor_set(), zstd: bool, damage in mutations()) {
        let params = StateCodecParams { byte_shuffle: false, zstd_level: zstd.then_some(1) };
        let encoded = encode_state(&model, &optimizer, &params).expect("encodes");
        let damaged = mutate(encoded.blob, &damage);
        let chunk_list = chunk_blob(&damaged, 512).expect("chunks");
        let manifest = StateManifest {
            mesh_id: "mesh".into(),
            round: 9,
            model_hash: encoded.model_hash,
            sender: vec![7; 38],
            training_steps: 1000,
            blob: chunk_list.descriptor(),
            model: encoded.model,
            optimizer: encoded.optimizer,
        };
        let limits = Limits::default();
        let blob = VerifiedBlob::verify(damaged, &manifest.blob).expect("re-hashed");
        if let Ok(state) = decode_state(&manifest, &blob, &model.layout(), &optimizer.layout(), &limits) {
            prop_assert_eq!(ModelHash::of_tensors(&state.model), manifest.model_hash);
            prop_assert_eq!(state.model.layout(), model.layout());
            prop_assert_eq!(state.optimizer.layout(), optimizer.layout());
        }
    }

    /// Codec settings and hashes come from config files and flags: any text parses or is
    /// refused, never panics.
    #[test]
    fn arbitrary_codec_and_hash_strings_never_panic(text in ".{0,80}", hex in "[0-9a-fA-Fg]{0,70}") {
        let _ = text.parse::<CodecParams>();
        let _ = hex.parse::<ModelHash>();
        let _ = text.parse::<ModelHash>();
        if let Ok(hash) = hex.parse::<ModelHash>() {
            prop_assert_eq!(hash.to_string().parse::<ModelHash>().expect("own output parses"), hash);
        }
    }

    #[test]
    fn codec_strings_round_trip(params in codec_params()) {
        let text = params.to_string();
        let parsed: CodecParams = text.parse().expect("own output parses");
        prop_assert_eq!(parsed.to_string(), text);
    }
}

/// Low rank: a delta of rank <= r arrives within float rounding; a segment is the two
/// factors, `r (rows + columns)` values.
#[test]
fn low_rank_sends_a_low_rank_matrix_whole_at_its_factor_size() {
    use meshtune_protocol::Tensor;
    let (rows, cols, rank) = (24usize, 40usize, 3usize);
    let values: Vec<f32> = (0..rows * cols)
        .map(|x| {
            let (i, j) = ((x / cols) as f32, (x % cols) as f32);
            1e-3 * ((i * 0.3).sin() * (j * 0.2).cos()
                + (i - 7.0) * 0.1
                + (j * 0.05) * (i * 0.7).cos())
        })
        .collect();
    let delta = TensorSet::new(vec![
        Tensor::new("m.weight", vec![rows, cols], values.clone()).expect("valid"),
        Tensor::new("v.bias", vec![5], vec![1e-3; 5]).expect("valid"),
    ])
    .expect("valid");
    let params: CodecParams = format!("rank{rank}+f32").parse().expect("codec");
    let encoded = encode_delta(&delta, &params, None).expect("encodes");
    assert_eq!(encoded.tensors[0].length, (4 * rank * (rows + cols)) as u64);
    assert_eq!(
        encoded.tensors[1].encoding.rank, None,
        "a vector is sent dense"
    );
    let mut feedback = ErrorFeedback::new();
    let decoded = send(&delta, &params, Some(&mut feedback));
    let got = &decoded.tensors()[0].values;
    let scale = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in values.iter().zip(got) {
        assert!((a - b).abs() <= 1e-5 * scale, "{a} vs {b}");
    }
    assert!(feedback.squared_norm() <= 1e-10 * f64::from(scale * scale) * values.len() as f64);
    // A full-rank matrix over rounds: error feedback sends what rank 1 left out later, so
    // the sum of decoded rounds closes on the sum of true deltas.
    let noise: Vec<f32> = (0..rows * cols)
        .map(|x| ((x * 7919 % 1013) as f32 / 1013.0 - 0.5) * 1e-3)
        .collect();
    let full = TensorSet::new(vec![
        Tensor::new("m.weight", vec![rows, cols], noise.clone()).expect("valid"),
    ])
    .expect("valid");
    let zero = TensorSet::new(vec![
        Tensor::new("m.weight", vec![rows, cols], vec![0.0; rows * cols]).expect("valid"),
    ])
    .expect("valid");
    let params: CodecParams = "rank1+int8/64".parse().expect("codec");
    let mut feedback = ErrorFeedback::new();
    let mut sent = vec![0f64; rows * cols];
    let mut gaps = Vec::new();
    for round in 0..40 {
        let delta = if round == 0 { &full } else { &zero };
        let decoded = send(delta, &params, Some(&mut feedback));
        for (s, v) in sent.iter_mut().zip(&decoded.tensors()[0].values) {
            *s += f64::from(*v);
        }
        let gap: f64 = sent
            .iter()
            .zip(&noise)
            .map(|(s, t)| (s - f64::from(*t)).powi(2))
            .sum::<f64>()
            .sqrt();
        gaps.push(gap);
    }
    let start: f64 = noise
        .iter()
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        gaps[0] < start && gaps[23] < 0.05 * start,
        "{:?}",
        &gaps[..24]
    );
}
