//! `meshtune train` end to end on the bundled tiny config: outputs, resume after a stop or a
//! kill -9, NaN loss, bad config and memory budget errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("train.toml");
    std::fs::write(
        &path,
        format!(
            "batch_size = 4\nlr = 3e-3\nwarmup_steps = 1\neval_every = 2\neval_examples = 4\neval_max_new_tokens = 8\ncheckpoint_every = 1\nsource_max_len = 64\ntarget_max_len = 24\n{extra}"
        ),
    )
    .expect("config");
    path
}

fn train_command(out: &Path, config: &Path, steps: usize) -> Command {
    train_command_on(
        &fixtures().join("synthetic/train.jsonl"),
        out,
        config,
        steps,
    )
}

fn train_command_on(train: &Path, out: &Path, config: &Path, steps: usize) -> Command {
    let synthetic = fixtures().join("synthetic");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshtune"));
    cmd.args(["train", "--random-init", "--model"])
        .arg(&synthetic)
        .arg("--train")
        .arg(train)
        .arg("--eval")
        .arg(synthetic.join("eval.jsonl"))
        .arg("--out")
        .arg(out)
        .arg("--config")
        .arg(config)
        .args(["--steps", &steps.to_string()])
        .env("MESHTUNE_LOG", "info");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run meshtune")
}

#[test]
fn trains_writes_reports_and_resumes() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("run");
    let config = write_config(dir.path(), "");
    let first = run(&mut train_command(&out, &config, 2));
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    for file in [
        "metrics.csv",
        "loss.svg",
        "rouge.svg",
        "initial_eval.json",
        "final/model.safetensors",
        "final/config.json",
        "final/tokenizer.json",
        "checkpoints/latest",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    // Asking for more steps resumes from the checkpoint instead of starting over.
    let second = run(&mut train_command(&out, &config, 4));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    assert!(
        stderr.contains("resumed") && stderr.contains("step=2"),
        "{stderr}"
    );
    let csv = std::fs::read_to_string(out.join("metrics.csv")).expect("csv");
    let steps: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap_or(""))
        .collect();
    assert_eq!(steps, ["1", "2", "3", "4"], "{csv}");
    // The exported folder is a loadable HF model.
    let score = run(Command::new(env!("CARGO_BIN_EXE_meshtune"))
        .args(["score", "--json", "--model"])
        .arg(out.join("final"))
        .arg("--data")
        .arg(fixtures().join("synthetic/eval.jsonl")));
    assert!(
        score.status.success(),
        "{}",
        String::from_utf8_lossy(&score.stderr)
    );
}

#[test]
fn kill_9_leaves_a_loadable_checkpoint() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("run");
    let config = write_config(dir.path(), "");
    let mut child = train_command(&out, &config, 200)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(120);
    // Kill while checkpoints are being written every step.
    while !out.join("checkpoints/checkpoint-00000003").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    // Every checkpoint directory left behind loads, and training continues from `latest`.
    let resumed = run(&mut train_command(&out, &config, 5));
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("resumed"), "{stderr}");
}

#[test]
fn nan_loss_stops_with_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("run");
    let config = write_config(dir.path(), "max_grad_norm = 1e30\n");
    let output = run(train_command(&out, &config, 6).args(["--lr", "1e30"]));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("last good checkpoint"), "{stderr}");
    assert!(stderr.contains("NaN") || stderr.contains("inf"), "{stderr}");
}

#[test]
fn bad_config_and_memory_budget_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = write_config(dir.path(), "stepz = 3\n");
    let output = run(&mut train_command(&dir.path().join("a"), &config, 2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("stepz"),
        "{stderr}"
    );

    let config = write_config(dir.path(), "");
    let output =
        run(train_command(&dir.path().join("b"), &config, 2)
            .args(["--memory-budget-gib", "0.0001"]));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("exceeds the budget"),
        "{stderr}"
    );

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\":\"1\",\"dialogue\":\"\",\"summary\":\"x\"}\n").expect("write");
    let output = run(&mut train_command_on(
        &bad,
        &dir.path().join("c"),
        &config,
        2,
    ));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("empty dialogue"),
        "{stderr}"
    );
}

/// `meshtune model export --checkpoint`: the weights of a run's latest checkpoint (here the
/// last step, so the same as what `train` wrote to `final/`) come out as a HF folder, with LoRA
/// adapters merged; a folder without checkpoints is named in the error.
#[test]
fn export_writes_a_checkpoint_as_the_final_model() {
    for lora in [false, true] {
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("run");
        let config = write_config(dir.path(), "");
        let mut train = train_command(&out, &config, 2);
        if lora {
            train.arg("--lora");
        }
        let trained = run(&mut train);
        assert!(
            trained.status.success(),
            "{}",
            String::from_utf8_lossy(&trained.stderr)
        );
        let exported = dir.path().join("exported");
        let export = run(Command::new(env!("CARGO_BIN_EXE_meshtune"))
            .args(["model", "export", "--model"])
            .arg(fixtures().join("synthetic"))
            .arg("--checkpoint")
            .arg(out.join("checkpoints"))
            .arg("--train-config")
            .arg(&config)
            .arg("--out")
            .arg(&exported));
        assert!(
            export.status.success(),
            "lora {lora}: {}",
            String::from_utf8_lossy(&export.stderr)
        );
        let read = |path: PathBuf| std::fs::read(&path).expect("model.safetensors");
        assert!(
            read(exported.join("model.safetensors")) == read(out.join("final/model.safetensors")),
            "lora {lora}: the exported checkpoint differs from the final model"
        );
        let missing = run(Command::new(env!("CARGO_BIN_EXE_meshtune"))
            .args(["model", "export", "--model"])
            .arg(fixtures().join("synthetic"))
            .arg("--checkpoint")
            .arg(dir.path())
            .arg("--out")
            .arg(dir.path().join("nothing")));
        let stderr = String::from_utf8_lossy(&missing.stderr);
        assert!(!missing.status.success(), "{stderr}");
        assert!(stderr.contains("neither a checkpoint"), "{stderr}");
    }
}
