//! The README's main job, scaled down: `meshtune-testnet` starts a bootstrap and nodes as
//! processes, they train and average, and the report directory holds every promised file.

use std::process::Command;

#[test]
fn a_small_testnet_runs_to_completion_and_writes_its_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let output = Command::new(env!("CARGO_BIN_EXE_meshtune-testnet"))
        .args(["--nodes", "2", "--rounds", "2", "--local-steps", "2"])
        .args([
            "--examples-per-node",
            "40",
            "--eval-examples",
            "4",
            "--batch-size",
            "4",
        ])
        .arg("--no-compare")
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The live table printed one row per round.
    assert!(stdout.contains("round |"), "{stdout}");
    let report = out.join("report");
    for file in [
        "summary.md",
        "metrics.json",
        "rounds.csv",
        "loss.svg",
        "rouge.svg",
        "bytes.svg",
        "round_time.svg",
        "loss.png",
    ] {
        assert!(report.join(file).exists(), "missing {file}");
    }
    let csv = std::fs::read_to_string(report.join("rounds.csv")).expect("csv");
    // Header + 2 nodes x 2 rounds, each round combining both deltas.
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "{csv}");
    for row in rows {
        assert_eq!(row.split(',').nth(5), Some("2"), "deltas column: {row}");
    }
    let png = std::fs::read(report.join("loss.png")).expect("png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn unknown_scenarios_and_splits_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (flag, value, expected) in [
        (
            "--scenario",
            "meteor",
            "scenario `meteor` is not implemented",
        ),
        ("--split", "zipf", "unknown split `zipf`"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_meshtune-testnet"))
            .args([flag, value, "--no-compare"])
            .arg("--out")
            .arg(dir.path().join(value))
            .output()
            .expect("run");
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
}

#[test]
fn restart_scenario_rejoins_and_ends_on_one_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let output = Command::new(env!("CARGO_BIN_EXE_meshtune-testnet"))
        .args(["--scenario", "restart", "--nodes", "3", "--rounds", "6"])
        .args(["--local-steps", "4", "--examples-per-node", "40"])
        .args(["--eval-examples", "4", "--batch-size", "4", "--no-compare"])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = std::fs::read_to_string(out.join("report/summary.md")).expect("summary");
    assert!(summary.contains("SIGKILLed"), "{summary}");
    assert!(summary.contains("restarted on its checkpoint"), "{summary}");
    assert!(
        summary
            .contains("3 of 3 nodes applied the last round (5); they hold 1 distinct final model"),
        "{summary}"
    );
}
