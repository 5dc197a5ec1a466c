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
    // A malformed mesh setting is refused by name before the node starts.
    let overlap_refused = "overlap works with topology \"all\" and without keep_residual";
    for (flags, needle) in [
        (&["--topology", "ring:3"][..], "unknown topology `ring:3`"),
        (
            &["--ef-decay", "1.5"][..],
            "`ef_decay` must be between 0 and 1, got 1.5",
        ),
        (
            &["--ef-bound=-1"][..],
            "`ef_bound` must be zero or a positive number, got -1",
        ),
        (
            &["--ef-bound", "NaN"][..],
            "`ef_bound` must be zero or a positive number, got NaN",
        ),
        (
            &["--outer", "nesterov:0.7:1.5"][..],
            "outer momentum must be in [0, 1)",
        ),
        (
            &["--ef-relearn", "maybe"][..],
            "invalid value 'maybe' for '--ef-relearn",
        ),
        (&["--overlap", "--keep-residual"][..], overlap_refused),
        (
            &["--overlap", "--topology", "gossip:2"][..],
            overlap_refused,
        ),
    ] {
        let node_out = dir.path().join("node");
        let mut args = vec![
            "node",
            "--model",
            model.to_str().expect("utf8"),
            "--train",
            data.to_str().expect("utf8"),
            "--out",
            node_out.to_str().expect("utf8"),
        ];
        args.extend_from_slice(flags);
        let out = meshtune(&args);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{flags:?}: {stderr}");
    }
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

#[test]
fn data_split_writes_one_shard_per_node_covering_every_example() {
    let dir = tempfile::tempdir().expect("tmp");
    let input = fixtures().join("synthetic/eval.jsonl");
    for strategy in ["iid", "dirichlet", "by-length"] {
        let out = dir.path().join(strategy);
        let output = meshtune(&[
            "data",
            "split",
            "--input",
            input.to_str().expect("utf8"),
            "--nodes",
            "4",
            "--strategy",
            strategy,
            "--alpha",
            "0.1",
            "--out",
            out.to_str().expect("utf8"),
        ]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut ids = Vec::new();
        for node in 0..4 {
            let text =
                std::fs::read_to_string(out.join(format!("node-{node:03}.jsonl"))).expect("shard");
            assert!(!text.trim().is_empty(), "{strategy}: node {node} empty");
            for line in text.lines() {
                let value: serde_json::Value = serde_json::from_str(line).expect("json");
                ids.push(value["id"].as_str().expect("id").to_string());
            }
        }
        ids.sort();
        let before = ids.len();
        ids.dedup();
        assert_eq!(before, ids.len(), "{strategy}: duplicated examples");
        assert_eq!(ids.len(), 200, "{strategy}: examples lost");
    }
    let output = meshtune(&[
        "data",
        "split",
        "--input",
        input.to_str().expect("utf8"),
        "--nodes",
        "0",
        "--out",
        dir.path().to_str().expect("utf8"),
    ]);
    assert!(!output.status.success());
}

/// `meshtune eval` against what the fixture implies: transformers' beam-4 summaries scored
/// with ROUGE (the implementation `rouge_parity.rs` holds to rouge-score) and transformers'
/// per-example losses, token-weighted.
#[test]
fn eval_scores_generated_summaries() {
    let model = fixtures().join("models/flan-sharded-f16");
    let data = fixtures().join("samsum_tiny.jsonl");
    let out = meshtune(&[
        "eval",
        "--model",
        model.to_str().expect("utf8"),
        "--data",
        data.to_str().expect("utf8"),
        "--num-beams",
        "4",
        "--max-new-tokens",
        "20",
        "--json",
    ]);
    let result = &json_lines(&out)[0];
    let exp = expected("flan-sharded-f16");
    let beam = &exp["generate"]["beam"];
    assert_eq!(beam["settings"]["num_beams"], 4);
    assert_eq!(beam["settings"]["max_new_tokens"], 20);
    let records = meshtune_model::data::load_samsum(&data).expect("data");
    let texts: Vec<&str> = beam["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["text"].as_str().expect("text"))
        .collect();
    assert_eq!(texts.len(), records.len());
    assert_eq!(result["examples"], records.len());
    let want = meshtune_model::rouge::mean_f_scores(
        texts
            .iter()
            .copied()
            .zip(records.iter().map(|r| r.summary.as_str())),
    );
    for (key, want) in [
        ("rouge1", want.rouge1),
        ("rouge2", want.rouge2),
        ("rougeL", want.rouge_l),
        ("rougeLsum", want.rouge_lsum),
    ] {
        let got = result[key].as_f64().expect("score");
        assert!(
            (got - want).abs() <= 1e-9,
            "{key}: {got} vs {want} ({result})"
        );
    }
    let scores = exp["score"].as_array().expect("score");
    let tokens: f64 = scores
        .iter()
        .map(|s| s["tokens"].as_f64().expect("t"))
        .sum();
    let nll: f64 = scores
        .iter()
        .map(|s| s["loss"].as_f64().expect("loss") * s["tokens"].as_f64().expect("t"))
        .sum();
    let (got, want) = (result["loss"].as_f64().expect("loss"), nll / tokens);
    assert!((got - want).abs() / want <= 1e-4, "loss {got} vs {want}");
}

/// `meshtune bench train` runs a real step (full and LoRA, f32 and bf16) and reports what
/// it measured; the numbers themselves are benchmarks, not test assertions.
#[test]
fn bench_train_reports_a_measured_step() {
    let config = fixtures().join("synthetic/config.json");
    for extra in [
        &[][..],
        &["--lora"][..],
        &["--precision", "bf16"][..],
        &["--activation-checkpointing"][..],
    ] {
        let mut args = vec![
            "bench",
            "train",
            "--config",
            config.to_str().expect("utf-8 path"),
            "--batch",
            "2",
            "--src-len",
            "12",
            "--tgt-len",
            "6",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--peak-tflops",
            "1",
            "--json",
        ];
        args.extend_from_slice(extra);
        let output = meshtune(&args);
        assert!(
            output.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report = json_lines(&output).pop().expect("a json line");
        let row = &report["results"][0];
        assert!(
            row["ms_per_step"].as_f64().is_some_and(|v| v > 0.0),
            "{report}"
        );
        assert!(row["mfu"].as_f64().is_some_and(|v| v > 0.0), "{report}");
        assert_eq!(report["lora"], extra == ["--lora"], "{report}");
        let want = if extra.contains(&"bf16") {
            "bf16"
        } else {
            "f32"
        };
        assert_eq!(report["precision"], want, "{report}");
        assert_eq!(
            report["activation_checkpointing"],
            extra == ["--activation-checkpointing"],
            "{report}"
        );
    }
    let bad = meshtune(&["bench", "train", "--precision", "fp8"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("fp8"));
}
