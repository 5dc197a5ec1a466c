//! The CLI contract that outside tests call: `meshtune score` and `meshtune generate` with
//! `--json`, checked against transformers' numbers in the fixtures.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn meshtune(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meshtune"))
        .args(args)
        .env("MESHTUNE_LOG", "warn")
        .output()
        .expect("run meshtune")
}

fn json_lines(output: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(
        output.status.success(),
        "meshtune failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

fn expected(model: &str) -> serde_json::Value {
    let path = fixtures().join("models").join(model).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("expected.json")).expect("json")
}

#[test]
fn score_json_matches_transformers_loss() {
    for model in ["flan-odd", "t5-relu-tied"] {
        let dir = fixtures().join("models").join(model);
        let data = fixtures().join("samsum_tiny.jsonl");
        let out = meshtune(&[
            "score",
            "--model",
            dir.to_str().expect("utf8"),
            "--data",
            data.to_str().expect("utf8"),
            "--prefix",
            "summarize: ",
            "--json",
        ]);
        let lines = json_lines(&out);
        let want = expected(model)["score"].as_array().expect("score").clone();
        assert_eq!(lines.len(), want.len());
        for (got, want) in lines.iter().zip(&want) {
            assert_eq!(got["id"], want["id"]);
            assert_eq!(got["tokens"], want["tokens"]);
            let (g, w) = (
                got["loss"].as_f64().expect("loss"),
                want["loss"].as_f64().expect("loss"),
            );
            assert!(
                (g - w).abs() / w <= 1e-4,
                "{model} {}: {g} vs {w}",
                got["id"]
            );
        }
    }
}

#[test]
fn generate_json_matches_transformers_ids() {
    let dir = fixtures().join("models").join("flan-sharded-f16");
    let data = fixtures().join("samsum_tiny.json"); // the JSON-array export format
    let exp = expected("flan-sharded-f16");
    for (mode, beams) in [("greedy", "1"), ("beam", "4")] {
        let out = meshtune(&[
            "generate",
            "--model",
            dir.to_str().expect("utf8"),
            "--data",
            data.to_str().expect("utf8"),
            "--prefix",
            "summarize: ",
            "--max-new-tokens",
            "20",
            "--num-beams",
            beams,
            "--batch-size",
            "5",
            "--json",
        ]);
        let lines = json_lines(&out);
        let want = exp["generate"][mode]["results"]
            .as_array()
            .expect("results");
        assert_eq!(lines.len(), want.len());
        for (got, want) in lines.iter().zip(want) {
            assert_eq!(got["id"], want["id"]);
            assert_eq!(got["token_ids"], want["token_ids"], "{mode} {}", got["id"]);
            assert_eq!(got["text"], want["text"], "{mode} {}", got["id"]);
        }
    }
}

#[test]
fn errors_are_clear_and_exit_nonzero() {
    let data = fixtures().join("samsum_tiny.jsonl");
    let out = meshtune(&[
        "score",
        "--model",
        "/nonexistent/model",
        "--data",
        data.to_str().expect("utf8"),
        "--json",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/model"), "{stderr}");

    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\":\"x\",\"dialogue\":\"hi\"}\n").expect("write");
    let model = fixtures().join("models/flan-odd");
    let out = meshtune(&[
        "generate",
        "--model",
        model.to_str().expect("utf8"),
        "--data",
        bad.to_str().expect("utf8"),
        "--json",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.jsonl") && stderr.contains("line 1") && stderr.contains("summary"),
        "{stderr}"
    );
}

#[test]
fn model_info_reports_published_sizes() {
    let out = meshtune(&["model", "info", "--preset", "flan-t5-base"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("247577856") && text.contains("248M"),
        "{text}"
    );
}

#[test]
fn rouge_json_matches_rouge_score() {
    let dir = fixtures().join("rouge");
    let out = meshtune(&[
        "rouge",
        "--predictions",
        dir.join("predictions.txt").to_str().expect("utf8"),
        "--references",
        dir.join("references.txt").to_str().expect("utf8"),
        "--json",
    ]);
    let got = &json_lines(&out)[0];
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("corpus_expected.json")).expect("expected"),
    )
    .expect("json");
    for key in ["rouge1", "rouge2", "rougeL", "rougeLsum"] {
        let (g, w) = (
            got[key].as_f64().expect(key),
            want[key].as_f64().expect(key),
        );
        assert!((g - w).abs() <= 1e-4, "{key}: {g} vs {w}");
    }
}
