//! Bad input gets a clear error naming the file, key and shape: each case on a corrupted copy
//! of a fixture model.

use std::path::{Path, PathBuf};

use meshtune_model::ModelError;
use meshtune_model::backend::Cpu;
use meshtune_model::data::load_samsum;
use meshtune_model::generate::{EarlyStopping, GenerationConfig, generate};
use meshtune_model::pretrained::Pretrained;
use meshtune_model::score::Seq2SeqBatch;
use safetensors::SafeTensors;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/models")
        .join(name)
}

/// A writable copy of a fixture folder.
fn copy_of(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    for entry in std::fs::read_dir(fixture(name)).expect("fixture") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
    }
    dir
}

fn load_err(dir: &Path) -> String {
    match Pretrained::<Cpu>::load(dir, None, &Default::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(err) => err.to_string(),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    edit(&mut value);
    std::fs::write(&path, value.to_string()).expect("write");
}

#[test]
fn missing_weights_file_is_named() {
    let dir = copy_of("flan-odd");
    std::fs::remove_file(dir.path().join("model.safetensors")).expect("rm");
    let err = load_err(dir.path());
    assert!(
        err.contains("no model.safetensors or model.safetensors.index.json"),
        "{err}"
    );
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
}

#[test]
fn truncated_safetensors_is_reported_with_its_path() {
    let dir = copy_of("flan-odd");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(
        err.contains("truncated") || err.contains("not a valid safetensors"),
        "{err}"
    );
    // Cut inside the header too.
    std::fs::write(&path, &bytes[..20]).expect("write");
    let err = load_err(dir.path());
    assert!(err.contains("not a valid safetensors"), "{err}");
}

#[test]
fn shape_disagreeing_with_config_names_key_and_shapes() {
    let dir = copy_of("flan-odd");
    edit_config(dir.path(), |c| c["d_ff"] = 40.into());
    let err = load_err(dir.path());
    assert!(
        err.contains("encoder.block.0.layer.1.DenseReluDense.wi_0.weight"),
        "{err}"
    );
    assert!(
        err.contains("[48, 32]") && err.contains("[40, 32]"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_of("flan-odd");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    let st = SafeTensors::deserialize(&bytes).expect("valid");
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != "decoder.block.1.layer.1.EncDecAttention.v.weight")
        .collect();
    let out = safetensors::serialize(kept, None).expect("serialize");
    std::fs::write(&path, out).expect("write");
    let err = load_err(dir.path());
    assert!(
        err.contains("decoder.block.1.layer.1.EncDecAttention.v.weight"),
        "{err}"
    );
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn unknown_feed_forward_proj_is_refused() {
    let dir = copy_of("flan-odd");
    edit_config(dir.path(), |c| c["feed_forward_proj"] = "gated-mish".into());
    let err = load_err(dir.path());
    assert!(
        err.contains("feed_forward_proj") && err.contains("gated-mish"),
        "{err}"
    );
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn malformed_or_missing_config() {
    let dir = copy_of("flan-odd");
    std::fs::write(dir.path().join("config.json"), "{not json").expect("write");
    let err = load_err(dir.path());
    assert!(err.contains("config"), "{err}");
    std::fs::remove_file(dir.path().join("config.json")).expect("rm");
    let err = load_err(dir.path());
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn tokenizer_larger_than_model_vocab_is_refused() {
    let dir = copy_of("flan-odd");
    edit_config(dir.path(), |c| c["vocab_size"] = 400.into());
    let err = load_err(dir.path());
    assert!(
        err.contains("tokenizer vocabulary (467) is larger than the model's vocab_size (400)"),
        "{err}"
    );
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn missing_or_corrupt_tokenizer() {
    let dir = copy_of("flan-odd");
    std::fs::write(dir.path().join("tokenizer.json"), "{}").expect("write");
    let err = load_err(dir.path());
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::remove_file(dir.path().join("tokenizer.json")).expect("rm");
    let err = load_err(dir.path());
    assert!(
        err.contains("tokenizer.json") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn missing_shard_is_named() {
    let dir = copy_of("flan-sharded-f16");
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).expect("rm");
    let err = load_err(dir.path());
    assert!(err.contains("model-00002-of-00003.safetensors"), "{err}");
}

#[test]
fn shard_names_cannot_escape_the_folder() {
    let dir = copy_of("flan-sharded-f16");
    let index = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index)
        .expect("read")
        .replace("model-00001-of-00003.safetensors", "../../etc/passwd");
    std::fs::write(&index, text).expect("write");
    let err = load_err(dir.path());
    assert!(
        err.contains("must be a file name in the same folder"),
        "{err}"
    );
}

#[test]
fn empty_inputs_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n").expect("write");
    let err = load_samsum(&empty).expect_err("empty file").to_string();
    assert!(
        err.contains("empty.jsonl") && err.contains("no examples"),
        "{err}"
    );

    let loaded =
        Pretrained::<Cpu>::load(&fixture("flan-odd"), None, &Default::default()).expect("load");
    let config = GenerationConfig {
        max_new_tokens: 4,
        num_beams: 1,
        length_penalty: 1.0,
        early_stopping: EarlyStopping::Heuristic,
        eos_token_id: 1,
        pad_token_id: 0,
        decoder_start_token_id: 0,
    };
    let err = generate(&loaded.model, &[vec![]], &config).expect_err("empty source");
    assert!(matches!(err, ModelError::Input(_)), "{err}");
    let err = generate(&loaded.model, &[vec![9999]], &config).expect_err("id out of range");
    assert!(err.to_string().contains("9999"), "{err}");
    let err = Seq2SeqBatch::new(&[vec![5, 1]], &[vec![]], 0, 0).expect_err("empty target");
    assert!(err.to_string().contains("target 0"), "{err}");
}
