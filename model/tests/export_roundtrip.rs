//! Export as a HF folder and load it back. The exported `model.safetensors` must carry exactly
//! the tensors (names, shapes, values) of the transformers-written reference checkpoint, which
//! scripts/make_fixtures.py verified transformers loads; `scripts/check_export.py` runs the
//! transformers side by hand (see docs/TESTING.md).

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use meshtune_model::backend::Cpu;
use meshtune_model::weights::{ExportDtype, export_hf_folder, load_model};
use safetensors::SafeTensors;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// name -> (shape, values as f32) of every tensor in a folder (single or sharded).
fn read_all(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if !name.starts_with("model") || !name.ends_with(".safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read");
        let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
        for (key, view) in st.tensors() {
            let values: Vec<f32> = match view.dtype() {
                safetensors::Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                safetensors::Dtype::F16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                safetensors::Dtype::BF16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                other => panic!("{key}: dtype {other:?}"),
            };
            out.insert(key, (view.shape().to_vec(), values));
        }
    }
    out
}

#[test]
fn export_writes_the_reference_tensors_and_reloads() {
    let device = Default::default();
    for name in ["flan-odd", "t5-relu-tied", "flan-sharded-f16"] {
        let src = fixtures().join("models").join(name);
        let (config, model) = load_model::<Cpu>(&src, &device).expect("load");
        let out = tempfile::tempdir().expect("tmp");
        export_hf_folder(
            &model,
            &config,
            Some(&src.join("tokenizer.json")),
            out.path(),
            ExportDtype::F32,
        )
        .expect("export");
        for file in ["config.json", "model.safetensors", "tokenizer.json"] {
            assert!(out.path().join(file).exists(), "{name}: {file} missing");
        }
        let mut reference = read_all(&src);
        // Real FLAN-T5 files repeat `shared` as embed_tokens; HF does not need them.
        reference.remove("encoder.embed_tokens.weight");
        reference.remove("decoder.embed_tokens.weight");
        let exported = read_all(out.path());
        assert_eq!(
            reference.keys().collect::<Vec<_>>(),
            exported.keys().collect::<Vec<_>>(),
            "{name}: key sets differ"
        );
        for (key, (shape, values)) in &reference {
            let (got_shape, got) = &exported[key];
            assert_eq!(shape, got_shape, "{name} {key}");
            // f16/bf16 -> f32 is exact, so values must be bit-identical.
            assert_eq!(values, got, "{name} {key}");
        }
        // The exported folder loads back and computes the same logits as the source.
        let (config2, reloaded) = load_model::<Cpu>(out.path(), &device).expect("reload");
        assert_eq!(config2.d_model, config.d_model);
        assert_eq!(reloaded.tied(), model.tied());
        let ids = Tensor::<Cpu, 2, Int>::from_data(
            TensorData::new(vec![5i64, 9, 11, 1], [1, 4]),
            &device,
        );
        let mask = Tensor::<Cpu, 2, Int>::ones([1, 4], &device);
        let dec =
            Tensor::<Cpu, 2, Int>::from_data(TensorData::new(vec![0i64, 7, 3], [1, 3]), &device);
        let a = model
            .forward(ids.clone(), mask.clone(), dec.clone())
            .1
            .into_data();
        let b = reloaded.forward(ids, mask, dec).1.into_data();
        a.assert_approx_eq::<f32>(&b, burn::tensor::Tolerance::absolute(1e-6));
    }
}

#[test]
fn bf16_export_rounds_each_value_once() {
    let device = Default::default();
    let src = fixtures().join("models").join("flan-odd");
    let (config, model) = load_model::<Cpu>(&src, &device).expect("load");
    let out = tempfile::tempdir().expect("tmp");
    export_hf_folder(&model, &config, None, out.path(), ExportDtype::Bf16).expect("export");
    let reference = read_all(&src);
    let exported = read_all(out.path());
    let (_, want) = &reference["shared.weight"];
    let (_, got) = &exported["shared.weight"];
    assert_eq!(want.len(), got.len());
    for (w, g) in want.iter().zip(got) {
        assert_eq!(half::bf16::from_f32(*w).to_f32(), *g);
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("config.json")).expect("cfg"),
    )
    .expect("json");
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["scale_decoder_outputs"], false);
}
