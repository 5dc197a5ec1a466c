//! Replays the committed cargo-fuzz corpus (`fuzz/corpus/<target>/`) through the same
//! harness functions the fuzz targets call, so every input the fuzzer kept (and every
//! regression input of a fixed crash) is re-checked by a plain `cargo test` on stable.

use std::path::{Path, PathBuf};

use meshtune_protocol::fuzz_harness;

fn corpus(target: &str) -> Vec<PathBuf> {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&directory)
        .unwrap_or_else(|error| panic!("corpus {} is missing: {error}", directory.display()))
        .map(|entry| entry.expect("readable corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str, harness: fn(&[u8])) {
    let files = corpus(target);
    assert!(!files.is_empty(), "corpus of {target} is empty");
    for path in &files {
        let input = std::fs::read(path).expect("readable corpus file");
        let outcome = std::panic::catch_unwind(|| harness(&input));
        assert!(outcome.is_ok(), "{target}: {} fails", path.display());
    }
    println!("{target}: replayed {} inputs", files.len());
}

#[test]
fn wire_messages_corpus_replays_cleanly() {
    replay("wire_messages", fuzz_harness::wire_messages);
}

#[test]
fn delta_blob_corpus_replays_cleanly() {
    replay("delta_blob", fuzz_harness::delta_blob);
}

#[test]
fn seed_inputs_decode_successfully() {
    // The seeds are valid deltas: the harness must get all the way through the decoder.
    for path in corpus("delta_blob").iter().filter(|path| {
        path.file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("seed-"))
    }) {
        let input = std::fs::read(path).expect("readable");
        let manifest_len = usize::from(u16::from_le_bytes([input[0], input[1]]));
        let limits = fuzz_harness::fuzz_limits();
        let manifest =
            meshtune_protocol::DeltaManifest::decode(&input[2..2 + manifest_len], &limits)
                .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let blob = meshtune_protocol::VerifiedBlob::verify(
            input[2 + manifest_len..].to_vec(),
            &manifest.blob,
        )
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let layout = meshtune_protocol::ModelLayout::new(
            manifest
                .tensors
                .iter()
                .map(|entry| {
                    meshtune_protocol::TensorSpec::new(entry.name.clone(), entry.shape.clone())
                })
                .collect(),
        )
        .expect("valid layout");
        meshtune_protocol::decode_delta(&manifest, &blob, &layout, &limits)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    }
}
