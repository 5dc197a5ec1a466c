//! Parity with Hugging Face transformers on the committed fixture models
//! (made by scripts/make_fixtures.py): logits, encoder states, per-example loss, greedy and
//! beam-search ids. Tolerances: logits max abs error <= 1e-4, loss relative error <= 1e-4,
//! ids identical.

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use meshtune_model::backend::Cpu;
use meshtune_model::data::load_samsum;
use meshtune_model::generate::{EarlyStopping, GenerationConfig, generate};
use meshtune_model::score::{Seq2SeqBatch, score_batch};
use meshtune_model::tokenizer::T5Tokenizer;
use meshtune_model::weights::load_model;
use safetensors::SafeTensors;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

const MODELS: [&str; 3] = ["flan-odd", "t5-relu-tied", "flan-sharded-f16"];

struct Expected {
    json: serde_json::Value,
    bytes: Vec<u8>,
}

impl Expected {
    fn load(dir: &Path) -> Self {
        let json = serde_json::from_str(
            &std::fs::read_to_string(dir.join("expected.json")).expect("expected.json"),
        )
        .expect("valid json");
        let bytes = std::fs::read(dir.join("expected.safetensors")).expect("expected.safetensors");
        Self { json, bytes }
    }

    fn tensor(&self, name: &str) -> (Vec<usize>, TensorData) {
        let st = SafeTensors::deserialize(&self.bytes).expect("safetensors");
        let view = st.tensor(name).expect(name);
        let shape = view.shape().to_vec();
        let data = match view.dtype() {
            safetensors::Dtype::F32 => TensorData::new(
                view.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect::<Vec<f32>>(),
                shape.clone(),
            ),
            safetensors::Dtype::I64 => TensorData::new(
                view.data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect::<Vec<i64>>(),
                shape.clone(),
            ),
            other => panic!("unexpected dtype {other:?}"),
        };
        (shape, data)
    }

    fn floats(&self, name: &str) -> Vec<f32> {
        self.tensor(name).1.into_vec::<f32>().expect("f32")
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn logits_and_encoder_states_match_transformers() {
    let device = Default::default();
    for name in MODELS {
        let dir = fixtures().join("models").join(name);
        let expected = Expected::load(&dir);
        let (_, model) = load_model::<Cpu>(&dir, &device).expect("load fixture model");
        let int = |key: &str| {
            let (shape, data) = expected.tensor(key);
            Tensor::<Cpu, 2, Int>::from_data(data, &device).reshape([shape[0], shape[1]])
        };
        let (encoded, logits) = model.forward(
            int("input_ids"),
            int("attention_mask"),
            int("decoder_input_ids"),
        );
        let got = logits.into_data().into_vec::<f32>().expect("f32");
        let err = max_abs_diff(&got, &expected.floats("logits"));
        eprintln!("{name}: logits max abs error {err:e}");
        assert!(err <= 1e-4, "{name}: logits max abs error {err}");
        let got = encoded.hidden.into_data().into_vec::<f32>().expect("f32");
        let err = max_abs_diff(&got, &expected.floats("encoder_last_hidden_state"));
        assert!(err <= 1e-4, "{name}: encoder state max abs error {err}");
    }
}

#[test]
fn per_example_loss_matches_transformers() {
    let device = Default::default();
    let records = load_samsum(&fixtures().join("samsum_tiny.jsonl")).expect("data");
    for name in MODELS {
        let dir = fixtures().join("models").join(name);
        let expected = Expected::load(&dir);
        let (config, model) = load_model::<Cpu>(&dir, &device).expect("load");
        let tokenizer = T5Tokenizer::from_file(&dir.join("tokenizer.json")).expect("tokenizer");
        let prefix = expected.json["prefix"].as_str().expect("prefix");
        let sources: Vec<Vec<u32>> = records
            .iter()
            .map(|r| {
                tokenizer
                    .encode(&format!("{prefix}{}", r.dialogue), None)
                    .expect("enc")
            })
            .collect();
        let targets: Vec<Vec<u32>> = records
            .iter()
            .map(|r| tokenizer.encode(&r.summary, None).expect("enc"))
            .collect();
        // Scored as one padded batch: padding must not change any example's loss.
        let batch = Seq2SeqBatch::new(
            &sources,
            &targets,
            config.pad_token_id,
            config.decoder_start_id(),
        )
        .expect("batch");
        let losses = score_batch(&model, &batch).expect("score");
        let reference = expected.json["score"].as_array().expect("score");
        assert_eq!(reference.len(), records.len(), "{name}: reference rows");
        assert_eq!(losses.len(), records.len(), "{name}: one loss per example");
        for ((record, got), want) in records.iter().zip(&losses).zip(reference) {
            assert_eq!(want["id"].as_str(), Some(record.id.as_str()));
            let want_loss = want["loss"].as_f64().expect("loss");
            let rel = (got.loss - want_loss).abs() / want_loss.abs().max(1e-12);
            assert!(
                rel <= 1e-4,
                "{name} {}: loss {} vs {want_loss} (rel {rel})",
                record.id,
                got.loss
            );
            assert_eq!(got.tokens as u64, want["tokens"].as_u64().expect("tokens"));
        }
    }
}

#[test]
fn greedy_and_beam_ids_match_transformers() {
    let device = Default::default();
    let records = load_samsum(&fixtures().join("samsum_tiny.jsonl")).expect("data");
    for name in MODELS {
        let dir = fixtures().join("models").join(name);
        let expected = Expected::load(&dir);
        let (config, model) = load_model::<Cpu>(&dir, &device).expect("load");
        let tokenizer = T5Tokenizer::from_file(&dir.join("tokenizer.json")).expect("tokenizer");
        let prefix = expected.json["prefix"].as_str().expect("prefix");
        let sources: Vec<Vec<u32>> = records
            .iter()
            .map(|r| {
                tokenizer
                    .encode(&format!("{prefix}{}", r.dialogue), None)
                    .expect("enc")
            })
            .collect();
        for (mode, entry) in expected.json["generate"].as_object().expect("generate") {
            let settings = &entry["settings"];
            let early_stopping = match &settings["early_stopping"] {
                serde_json::Value::Bool(true) => EarlyStopping::Stop,
                serde_json::Value::String(s) if s == "never" => EarlyStopping::Never,
                _ => EarlyStopping::Heuristic,
            };
            let generation = GenerationConfig {
                max_new_tokens: settings["max_new_tokens"].as_u64().expect("max") as usize,
                num_beams: settings["num_beams"].as_u64().expect("beams") as usize,
                length_penalty: settings["length_penalty"].as_f64().unwrap_or(1.0) as f32,
                early_stopping,
                eos_token_id: config.eos_token_id,
                pad_token_id: config.pad_token_id,
                decoder_start_token_id: config.decoder_start_id(),
            };
            let outputs = generate(&model, &sources, &generation).expect("generate");
            let results = entry["results"].as_array().expect("results");
            // zip stops at the shorter side: a missing output must fail, not pass.
            assert_eq!(
                results.len(),
                records.len(),
                "{name} {mode}: reference rows"
            );
            assert_eq!(
                outputs.len(),
                records.len(),
                "{name} {mode}: one output per example"
            );
            for ((record, got), want) in records.iter().zip(&outputs).zip(results) {
                let want_ids: Vec<u32> = want["token_ids"]
                    .as_array()
                    .expect("ids")
                    .iter()
                    .map(|v| v.as_u64().expect("id") as u32)
                    .collect();
                assert_eq!(got.token_ids, want_ids, "{name} {mode} {}", record.id);
                assert_eq!(
                    Some(got.finished),
                    want["finished"].as_bool(),
                    "{name} {mode} {}",
                    record.id
                );
                let text = tokenizer.decode(&got.token_ids).expect("decode");
                assert_eq!(
                    Some(text.as_str()),
                    want["text"].as_str(),
                    "{name} {mode} {}",
                    record.id
                );
            }
        }
    }
}
