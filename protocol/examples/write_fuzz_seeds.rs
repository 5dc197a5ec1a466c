//! Writes seed inputs for the fuzz targets: valid encodings of every message kind and of
//! deltas in every codec.
//! `cargo run -p meshtune-protocol --example write_fuzz_seeds -- fuzz/corpus`

use std::path::Path;

use meshtune_protocol::fuzz_harness::{delta_blob_input, fuzz_limits, seed_delta};
use meshtune_protocol::{
    BlobHash, ChunkHash, ChunkListHash, ChunkRequest, ChunkResponse, CodecParams, DeltaManifest,
    ErrorFeedback, Limits, ModelHash, StateCodecParams, StateManifest, chunk_blob, encode_state,
};

const CODECS: [&str; 14] = [
    "f32",
    "f32+shuffle+zstd:1",
    "f16",
    "f16+shuffle+zstd:3",
    "bf16+zstd:1",
    "int8/64",
    "int8/7+zstd:1",
    "int4/64",
    "int4/5+shuffle+zstd:1",
    "top1%+int8/64",
    "top10%+int4/16+zstd:1",
    "top30%+f16+shuffle",
    "rank2+int8/64+zstd:1",
    "rank3+f16+shuffle",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/corpus".into());
    let root = Path::new(&root);
    let wire = root.join("wire_messages");
    let blob = root.join("delta_blob");
    std::fs::create_dir_all(&wire)?;
    std::fs::create_dir_all(&blob)?;
    let limits = Limits::default();

    for (index, codec) in CODECS.iter().enumerate() {
        let params: CodecParams = codec.parse()?;
        let delta = seed_delta(index as u64);
        let mut feedback = ErrorFeedback::new();
        let input =
            delta_blob_input(&delta, &params, Some(&mut feedback)).ok_or("seed does not encode")?;
        std::fs::write(blob.join(format!("seed-{index:02}")), &input)?;
        let manifest_len = usize::from(u16::from_le_bytes([input[0], input[1]]));
        std::fs::write(
            wire.join(format!("seed-delta-manifest-{index:02}")),
            &input[2..2 + manifest_len],
        )?;
    }

    let model = seed_delta(100);
    let optimizer = seed_delta(101);
    let state = encode_state(&model, &optimizer, &StateCodecParams::default())?;
    let chunk_list = chunk_blob(&state.blob, 1024)?;
    let manifest = StateManifest {
        mesh_id: "fuzz".into(),
        round: 7,
        model_hash: state.model_hash,
        sender: vec![9; 38],
        training_steps: 100,
        blob: chunk_list.descriptor(),
        model: state.model,
        optimizer: state.optimizer,
    };
    std::fs::write(wire.join("seed-state-manifest"), manifest.encode(&limits)?)?;
    std::fs::write(wire.join("seed-chunk-list"), chunk_list.encode())?;
    let responses = [
        ChunkResponse::ChunkList(chunk_list.clone()),
        ChunkResponse::Chunk(state.blob[..100].to_vec()),
        ChunkResponse::State(manifest),
        ChunkResponse::NotFound,
    ];
    for (index, response) in responses.iter().enumerate() {
        std::fs::write(
            wire.join(format!("seed-response-{index}")),
            response.encode(&limits)?,
        )?;
    }
    let requests = [
        ChunkRequest::ChunkList {
            chunk_list_hash: ChunkListHash([1; 32]),
        },
        ChunkRequest::Chunk {
            blob_hash: BlobHash([2; 32]),
            index: 300,
            chunk_hash: ChunkHash([3; 32]),
        },
        ChunkRequest::LatestState {
            mesh_id: "fuzz".into(),
        },
        ChunkRequest::CurrentManifest {
            mesh_id: "fuzz".into(),
            round: Some(7),
        },
        ChunkRequest::LinkDelta {
            mesh_id: "fuzz".into(),
            round: 9,
            copy: Some(ModelHash([4; 32])),
        },
        ChunkRequest::LinkDelta {
            mesh_id: "fuzz".into(),
            round: 0,
            copy: None,
        },
    ];
    for (index, request) in requests.iter().enumerate() {
        std::fs::write(
            wire.join(format!("seed-request-{index}")),
            request.encode(&limits)?,
        )?;
    }
    // An empty delta.
    let empty = DeltaManifest {
        mesh_id: String::new(),
        round: 0,
        base_model: ModelHash::default(),
        sender: Vec::new(),
        sample_count: 0,
        training_steps: 0,
        blob: chunk_blob(&[], 1)?.descriptor(),
        tensors: Vec::new(),
    };
    std::fs::write(
        wire.join("seed-empty-delta-manifest"),
        empty.encode(&fuzz_limits())?,
    )?;
    println!("seeds written under {}", root.display());
    Ok(())
}
