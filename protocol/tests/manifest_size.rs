//! Manifests of a real 3B model (FLAN-T5-XL, 558 tensors, 2.85B parameters) stay well
//! under gossipsub's 64 KiB (the delta manifest at about a quarter of it), because chunk
//! hashes live in the separately fetched chunk list (see the `manifest` module docs).

use meshtune_protocol::t5_layout::{T5Dims, flan_t5_layout};
use meshtune_protocol::{
    BlobDescriptor, BlobHash, ChunkListHash, DEFAULT_CHUNK_SIZE, DeltaManifest, Limits, ModelHash,
    StateManifest, TensorEncoding, TensorEntry, TensorSpec, ValueFormat,
};

const GOSSIP_LIMIT: usize = 64 * 1024;

/// The encoding each tensor gets, from its element count.
type EncodingFor = fn(u64) -> TensorEncoding;

/// A tensor index for `specs` with segment lengths as `encoding` would produce them
/// (compressed sizes estimated as 90 % of raw; only the number of varint bytes matters).
fn index(
    specs: &[TensorSpec],
    encoding: impl Fn(u64) -> TensorEncoding,
    offset: &mut u64,
) -> Vec<TensorEntry> {
    specs
        .iter()
        .map(|spec| {
            let elements = spec.element_count().expect("fits") as u64;
            let encoding = encoding(elements);
            let count = encoding.kept.unwrap_or(elements);
            let raw = match encoding.values {
                ValueFormat::F32 => count * 4,
                ValueFormat::Int8 { block_size } => {
                    count + count.div_ceil(u64::from(block_size)) * 4
                }
                _ => count * 2,
            } + if encoding.kept.is_some() {
                count * 2
            } else {
                0
            };
            let length = if encoding.zstd { raw * 9 / 10 } else { raw };
            let entry = TensorEntry {
                name: spec.name.clone(),
                shape: spec.shape.clone(),
                encoding,
                offset: *offset,
                length,
            };
            *offset += length;
            entry
        })
        .collect()
}

fn descriptor(blob_size: u64) -> BlobDescriptor {
    BlobDescriptor {
        blob_hash: BlobHash([0xab; 32]),
        blob_size,
        chunk_size: DEFAULT_CHUNK_SIZE,
        chunk_list_hash: ChunkListHash([0xcd; 32]),
    }
}

#[test]
fn flan_t5_xl_delta_manifest_fits_in_a_gossip_message() {
    let layout = flan_t5_layout(&T5Dims::FLAN_T5_XL);
    assert_eq!(layout.len(), 558);
    assert_eq!(layout.total_elements(), 2_849_757_184);
    let encodings: [(&str, EncodingFor); 3] = [
        ("f32", |_| TensorEncoding {
            values: ValueFormat::F32,
            kept: None,
            rank: None,
            byte_shuffle: true,
            zstd: true,
        }),
        ("int8+zstd", |_| TensorEncoding {
            values: ValueFormat::Int8 { block_size: 64 },
            kept: None,
            rank: None,
            byte_shuffle: false,
            zstd: true,
        }),
        ("top1%+int8", |elements: u64| TensorEncoding {
            values: ValueFormat::Int8 { block_size: 64 },
            kept: Some(elements.div_ceil(100)),
            rank: None,
            byte_shuffle: false,
            zstd: false,
        }),
    ];
    let limits = Limits::default();
    for (label, encoding) in encodings {
        let mut blob_size = 0;
        let tensors = index(layout.specs(), encoding, &mut blob_size);
        let manifest = DeltaManifest {
            mesh_id: "flan-t5-xl-summarization-2026".into(),
            round: 123_456,
            base_model: ModelHash([7; 32]),
            sender: vec![0x24; 38],
            sample_count: 1 << 20,
            training_steps: 1 << 16,
            blob: descriptor(blob_size),
            tensors,
        };
        let bytes = manifest.encode(&limits).expect("fits the default limits");
        println!(
            "{label}: blob {:.1} GB in {} chunks, manifest {} bytes",
            blob_size as f64 / 1e9,
            manifest.blob.chunk_count(),
            bytes.len()
        );
        assert!(
            bytes.len() < GOSSIP_LIMIT / 3,
            "{label}: {} bytes",
            bytes.len()
        );
        assert_eq!(
            DeltaManifest::decode(&bytes, &limits).expect("decodes"),
            manifest
        );
    }
}

#[test]
fn flan_t5_xl_state_manifest_with_adam_state_fits_too() {
    let layout = flan_t5_layout(&T5Dims::FLAN_T5_XL);
    let optimizer: Vec<TensorSpec> = ["exp_avg", "exp_avg_sq"]
        .iter()
        .flat_map(|moment| {
            layout.specs().iter().map(move |spec| {
                TensorSpec::new(format!("{moment}.{}", spec.name), spec.shape.clone())
            })
        })
        .collect();
    let optimizer = meshtune_protocol::ModelLayout::new(optimizer).expect("valid");
    let lossless = |_| TensorEncoding {
        values: ValueFormat::F32,
        kept: None,
        rank: None,
        byte_shuffle: true,
        zstd: true,
    };
    let mut blob_size = 0;
    let model = index(layout.specs(), lossless, &mut blob_size);
    let optimizer = index(optimizer.specs(), lossless, &mut blob_size);
    let manifest = StateManifest {
        mesh_id: "flan-t5-xl-summarization-2026".into(),
        round: 123_456,
        model_hash: ModelHash([7; 32]),
        sender: vec![0x24; 38],
        training_steps: 1 << 30,
        blob: descriptor(blob_size),
        model,
        optimizer,
    };
    let limits = Limits::default();
    let bytes = manifest.encode(&limits).expect("fits the default limits");
    println!(
        "state: blob {:.1} GB in {} chunks, manifest {} bytes",
        blob_size as f64 / 1e9,
        manifest.blob.chunk_count(),
        bytes.len()
    );
    // Sent over request/response, under its own cap; still under the gossip limit.
    assert!(bytes.len() < GOSSIP_LIMIT, "{} bytes", bytes.len());
    assert!(bytes.len() < limits.max_state_manifest_bytes);
    assert_eq!(
        StateManifest::decode(&bytes, &limits).expect("decodes"),
        manifest
    );
    // Its chunk list (fetched separately) is within the default cap too.
    assert!(manifest.blob.chunk_count() * 32 < limits.max_chunk_list_bytes() as u64);
}
