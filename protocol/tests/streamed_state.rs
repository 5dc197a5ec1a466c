//! States streamed through files: `encode_state_to` writes exactly the bytes `encode_state`
//! returns (so both sides agree on hashes), and `decode_state_file` decodes them back with
//! the same checks as `decode_state`.

use std::io::Write;

use meshtune_protocol::{
    DecodeError, FileAssembler, Limits, StateCodecParams, StateManifest, Tensor, TensorSet,
    VerifiedFile, chunk_blob, decode_state, decode_state_file, encode_state, encode_state_to,
};

fn sets() -> (TensorSet, TensorSet) {
    let tensor = |name: &str, n: usize, k: f32| {
        Tensor::new(
            name,
            vec![n],
            (0..n).map(|i| (i as f32 * 0.01 + k).cos()).collect(),
        )
        .expect("tensor")
    };
    (
        TensorSet::new(vec![tensor("a", 10_000, 0.1), tensor("b", 3_333, 0.2)]).expect("model"),
        TensorSet::new(vec![tensor("outer.m.a", 10_000, 0.3)]).expect("optimizer"),
    )
}

fn open_rw(path: &std::path::Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("file")
}

#[test]
fn a_streamed_state_has_the_bytes_and_hashes_of_the_in_memory_one() {
    let (model, optimizer) = sets();
    let params = StateCodecParams::default();
    let whole = encode_state(&model, &optimizer, &params).expect("encode");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("state.blob");
    let mut file = open_rw(&path);
    let (index, list) =
        encode_state_to(&model, &optimizer, &params, &mut file, 4096).expect("stream");
    file.flush().expect("flush");
    assert_eq!(std::fs::read(&path).expect("read"), whole.blob);
    assert_eq!(list, chunk_blob(&whole.blob, 4096).expect("chunks"));
    assert_eq!(
        (index.model_hash, &index.model, &index.optimizer),
        (whole.model_hash, &whole.model, &whole.optimizer)
    );

    // Decoded from the file, with the checks of the in-memory path.
    let manifest = StateManifest {
        mesh_id: "m".into(),
        round: 3,
        model_hash: index.model_hash,
        sender: Vec::new(),
        training_steps: 0,
        blob: list.descriptor(),
        model: index.model,
        optimizer: index.optimizer,
    };
    let limits = Limits::default();
    let verified =
        VerifiedFile::verify(std::fs::File::open(&path).expect("open"), &list).expect("verify");
    let from_file = decode_state_file(
        &manifest,
        &verified,
        &model.layout(),
        &optimizer.layout(),
        &limits,
    )
    .expect("decode");
    let blob = meshtune_protocol::VerifiedBlob::verify(whole.blob.clone(), &list.descriptor())
        .expect("blob");
    let from_memory = decode_state(
        &manifest,
        &blob,
        &model.layout(),
        &optimizer.layout(),
        &limits,
    )
    .expect("decode");
    assert_eq!(from_file, from_memory);
    assert_eq!(from_file.model, model);

    // A file assembled chunk by chunk decodes the same.
    let copy = dir.path().join("copy.blob");
    let mut sink = FileAssembler::new(list.clone(), &limits, open_rw(&copy)).expect("sink");
    for index in 0..list.chunk_count() {
        let range = list.chunk_range(index).expect("range");
        meshtune_protocol::ChunkSink::accept(
            &mut sink,
            index,
            &whole.blob[range.start as usize..range.end as usize],
        )
        .expect("chunk");
    }
    let assembled = sink.finish().expect("assembled");
    let again = decode_state_file(
        &manifest,
        &assembled,
        &model.layout(),
        &optimizer.layout(),
        &limits,
    )
    .expect("decode");
    assert_eq!(again, from_memory);

    // A manifest naming another model hash is refused, as in memory.
    let mut lying = manifest.clone();
    lying.model_hash = meshtune_protocol::ModelHash([9; 32]);
    assert!(matches!(
        decode_state_file(
            &lying,
            &verified,
            &model.layout(),
            &optimizer.layout(),
            &limits
        ),
        Err(DecodeError::ModelHashMismatch { .. })
    ));
    // A file whose bytes changed after the chunk list was made does not verify.
    let mut bytes = whole.blob.clone();
    bytes[100] ^= 1;
    std::fs::write(&copy, &bytes).expect("write");
    assert!(VerifiedFile::verify(std::fs::File::open(&copy).expect("open"), &list).is_err());
}
