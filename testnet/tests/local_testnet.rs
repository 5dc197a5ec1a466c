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
        "granularity.svg",
        "loss.png",
    ] {
        assert!(report.join(file).exists(), "missing {file}");
    }
    let csv = std::fs::read_to_string(report.join("rounds.csv")).expect("csv");
    // Header + 2 nodes x 2 rounds, each round combining both deltas.
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "{csv}");
    for row in rows {
        let cells: Vec<&str> = row.split(',').collect();
        assert_eq!(cells[5], "2", "deltas column: {row}");
        // Trained tokens and a granularity G for every round that trained.
        assert!(cells[16].parse::<u64>().expect("tokens") > 0, "{row}");
        assert!(cells[17].parse::<f64>().expect("G") > 0.0, "{row}");
    }
    assert!(stdout.contains("tok/s/W"), "{stdout}");
    let summary = std::fs::read_to_string(report.join("summary.md")).expect("summary");
    assert!(summary.contains("Granularity G"), "{summary}");
    let png = std::fs::read(report.join("loss.png")).expect("png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn unknown_scenarios_and_splits_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (flag, value, expected) in [
        ("--scenario", "meteor", "unknown scenario `meteor`"),
        ("--split", "zipf", "unknown split `zipf`"),
        ("--mode", "vm", "unknown mode `vm`"),
        (
            "--link",
            "carrier-pigeon",
            "invalid --link `carrier-pigeon`",
        ),
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

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// The main job on your own model and data: an HF folder with weights (a committed fixture
/// standing in for `google/flan-t5-small`), the Samsum file in the HF datasets JSON export
/// format split across the nodes, a `train.toml` for every node, a prefix.
#[test]
fn a_testnet_runs_on_your_own_model_folder_and_samsum_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let train_toml = dir.path().join("train.toml");
    std::fs::write(
        &train_toml,
        "source_max_len = 64\ntarget_max_len = 24\neval_max_new_tokens = 8\n",
    )
    .expect("train.toml");
    let model = fixtures().join("models/flan-odd");
    let data = fixtures().join("samsum_tiny.json");
    let output = Command::new(env!("CARGO_BIN_EXE_meshtune-testnet"))
        .arg("--model")
        .arg(&model)
        .arg("--train")
        .arg(&data)
        .arg("--train-config")
        .arg(&train_toml)
        .args(["--prefix", "summarize: ", "--split", "iid"])
        .args(["--nodes", "2", "--rounds", "2", "--local-steps", "2"])
        .args(["--eval-examples", "3", "--batch-size", "3", "--no-compare"])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = std::fs::read_to_string(out.join("report/summary.md")).expect("summary");
    assert!(summary.contains("flan-odd"), "{summary}");
    // 12 records: the last 3 held out for evaluation, 9 split over the 2 nodes.
    assert!(
        summary.contains("samsum_tiny.json` (9 training examples; its last 3 held out for eval)"),
        "{summary}"
    );
    let shards: usize = (0..2)
        .map(|i| {
            std::fs::read_to_string(out.join(format!("data/shard-{i}.jsonl")))
                .expect("shard")
                .lines()
                .count()
        })
        .sum();
    assert_eq!(shards, 9);
    // Every node got the train config's settings and the prefix.
    let node_toml = std::fs::read_to_string(out.join("node.toml")).expect("node.toml");
    assert!(node_toml.contains("target_max_len = 24"), "{node_toml}");
    assert!(
        node_toml.contains("prefix = \"summarize: \""),
        "{node_toml}"
    );
    let csv = std::fs::read_to_string(out.join("report/rounds.csv")).expect("csv");
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "{csv}");
    for row in rows {
        let cells: Vec<&str> = row.split(',').collect();
        assert_eq!(cells[5], "2", "both deltas every round: {row}");
        // The model trained is flan-odd (~0.1 M parameters), not the bundled tiny T5 (1.29 M,
        // 5.17 MB as raw f32 deltas).
        let raw: u64 = cells[8].parse().expect("raw_delta_bytes");
        assert!(raw > 0 && raw < 1_000_000, "{row}");
    }
    // The same with --lora and an eval file: the nodes exchange only the adapters.
    let lora_out = dir.path().join("lora");
    let output = Command::new(env!("CARGO_BIN_EXE_meshtune-testnet"))
        .arg("--model")
        .arg(&model)
        .arg("--train")
        .arg(&data)
        .arg("--eval")
        .arg(fixtures().join("samsum_tiny.jsonl"))
        .args(["--lora", "--split", "iid", "--nodes", "2", "--rounds", "2"])
        .args([
            "--local-steps",
            "2",
            "--eval-examples",
            "3",
            "--batch-size",
            "3",
        ])
        .arg("--no-compare")
        .arg("--out")
        .arg(&lora_out)
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let raw = |dir: &std::path::Path| -> u64 {
        let csv = std::fs::read_to_string(dir.join("report/rounds.csv")).expect("csv");
        let row = csv.lines().nth(1).expect("a row").to_owned();
        row.split(',').nth(8).expect("raw").parse().expect("raw")
    };
    // All 12 records train (eval comes from its own file).
    let summary = std::fs::read_to_string(lora_out.join("report/summary.md")).expect("summary");
    assert!(
        summary.contains("(12 training examples), eval"),
        "{summary}"
    );
    assert!(
        raw(&lora_out) * 5 < raw(&out),
        "LoRA deltas {} vs full {}",
        raw(&lora_out),
        raw(&out)
    );
}

/// Bad combinations fail before anything starts, naming the flag and what is wrong.
#[test]
fn a_bad_model_folder_or_data_file_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let no_summary = dir.path().join("no_summary.jsonl");
    std::fs::write(
        &no_summary,
        "{\"id\": \"1\", \"dialogue\": \"A: hi\"}\n{\"id\": \"2\", \"dialogue\": \"B: yo\"}\n",
    )
    .expect("write");
    let empty_dir = dir.path().join("empty");
    std::fs::create_dir_all(&empty_dir).expect("dir");
    let config_only = dir.path().join("config_only");
    std::fs::create_dir_all(&config_only).expect("dir");
    std::fs::copy(
        fixtures().join("models/flan-odd/config.json"),
        config_only.join("config.json"),
    )
    .expect("copy");
    let model = fixtures().join("models/flan-odd");
    let samsum = fixtures().join("samsum_tiny.json");
    let path = |p: &std::path::Path| p.to_str().expect("utf-8").to_owned();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--train".into(), path(&no_summary)],
            "missing field `summary`",
        ),
        (
            vec!["--model".into(), path(&empty_dir)],
            "no config.json in that folder",
        ),
        (
            vec!["--model".into(), path(&config_only)],
            "no weights (model.safetensors or model.safetensors.index.json); add --random-init",
        ),
        (
            vec![
                "--model".into(),
                path(&model),
                "--train".into(),
                path(&samsum),
                "--nodes".into(),
                "12".into(),
            ],
            "9 training examples (after 3 held out for evaluation) for 12 nodes",
        ),
        (
            vec!["--train-config".into(), path(&no_summary)],
            "--train-config",
        ),
    ];
    for (args, expected) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_meshtune-testnet"))
            .args(&args)
            .arg("--no-compare")
            .arg("--out")
            .arg(dir.path().join("out"))
            .output()
            .expect("run");
        assert!(!output.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
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

/// Runs a small 4-node testnet of `rounds` rounds with `extra` flags and returns its summary
/// (add `--no-compare` to skip the comparisons).
fn small_run(dir: &std::path::Path, rounds: u64, extra: &[&str]) -> String {
    let out = dir.join("run");
    let output = Command::new(env!("CARGO_BIN_EXE_meshtune-testnet"))
        .args(["--nodes", "4", "--local-steps", "4"])
        .args(["--rounds", &rounds.to_string()])
        .args(["--examples-per-node", "40", "--eval-examples", "4"])
        .args(["--batch-size", "4"])
        .args(extra)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read_to_string(out.join("report/summary.md")).expect("summary")
}

/// Whether this machine lets us create network namespaces (root and iproute2).
fn netns_available() -> bool {
    let name = format!("mt-probe-{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &name])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
    }
    ok
}

#[test]
fn a_partitioned_mesh_in_network_namespaces_on_lte_links_reconverges() {
    // CI runs as root: there the namespace mode must run. Elsewhere (not root) it cannot,
    // and the same partition runs on loopback instead.
    let mode = if netns_available() {
        "netns"
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "network namespaces unavailable under CI (needs root and iproute2): the netns mode \
             would be skipped"
        );
        eprintln!(
            "SKIPPED netns mode: network namespaces unavailable (not root?); the partition runs \
             on loopback"
        );
        "process"
    };
    let dir = tempfile::tempdir().expect("tempdir");
    // Partitioned after 3 rounds, healed at the latest when the fastest node applied 5: at
    // least 4 rounds to reconverge.
    let summary = small_run(
        dir.path(),
        9,
        &[
            "--scenario",
            "partition",
            "--mode",
            mode,
            "--link",
            "lte",
            "--no-compare",
        ],
    );
    assert!(summary.contains("refuse each other"), "{summary}");
    assert!(summary.contains("partition healed"), "{summary}");
    assert!(summary.contains("**reconverged**"), "{summary}");
    assert!(summary.contains("every link shaped as `lte`"), "{summary}");
    if mode == "netns" {
        assert!(summary.contains("own network namespace"), "{summary}");
        let left = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip");
        let left = String::from_utf8_lossy(&left.stdout);
        assert!(
            !left.contains(&format!("mt{}x", std::process::id())),
            "namespaces left behind: {left}"
        );
    }
}

#[test]
fn a_byzantine_node_is_refused_and_the_honest_nodes_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    // With the clean comparison (no codec runs, the baselines are cheap at this size), so the
    // robust-aggregation verdict is produced and checked.
    let summary = small_run(
        dir.path(),
        6,
        &["--scenario", "byzantine", "--compare-codecs", "none"],
    );
    assert!(summary.contains("node-3 is byzantine"), "{summary}");
    assert!(
        summary.contains("hold 1 distinct final model(s); their final ROUGE-L"),
        "{summary}"
    );
    let refused: u64 = summary
        .split("honest nodes refused or left out ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("refused count");
    // 6 rounds x 3 honest nodes, each refusing the NaN or the scaled delta.
    assert!(refused >= 12, "{summary}");
    // Against the clean comparison: "held" or "held within noise" (4 eval examples are
    // noisy); a byzantine delta that got through would leave the honest nodes far below.
    assert!(summary.contains("**robust aggregation held"), "{summary}");
}

#[test]
fn a_node_on_a_slow_link_keeps_up_with_the_mesh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let summary = small_run(dir.path(), 6, &["--scenario", "slow-link", "--no-compare"]);
    assert!(summary.contains("`slow` link (1 Mbit/s"), "{summary}");
    assert!(summary.contains("the slow node:"), "{summary}");
    assert!(
        summary
            .contains("4 of 4 nodes applied the last round (5); they hold 1 distinct final model"),
        "{summary}"
    );
}

/// `simulate` runs real nodes in one process with the synthetic trainer, here for two mesh
/// sizes one after the other. Each run ends on one model (consensus distance at f32 rounding
/// in the last round) and writes its table; the sweep adds `scale.csv` and plots against N.
/// (Churn runs take minutes; docs/BENCHMARKS.md has one.)
#[test]
fn simulate_runs_nodes_in_process_and_reports_consensus() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("sim");
    let output = Command::new(env!("CARGO_BIN_EXE_meshtune-testnet"))
        .args([
            "simulate", "--nodes", "3,4", "--rounds", "3", "--params", "2000",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for n in [3, 4] {
        let run = out.join(format!("n{n}"));
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("summary.json")).expect("summary"),
        )
        .expect("json");
        let rounds = summary["per_round"].as_array().expect("rows");
        let last = rounds.last().expect("a round");
        assert_eq!(last["round"], 2, "{summary}");
        assert_eq!(last["nodes"], n, "{summary}");
        let distance = last["consensus_distance"].as_f64().expect("distance");
        assert!(distance <= 1e-6, "N={n}: last-round distance {distance}");
        assert!(
            std::fs::read_to_string(run.join("rounds.csv"))
                .expect("csv")
                .starts_with("round,nodes,slowest_s")
        );
    }
    let scale = std::fs::read_to_string(out.join("scale.csv")).expect("scale.csv");
    let rows: Vec<&str> = scale.lines().collect();
    assert_eq!(rows.len(), 3, "{scale}");
    assert!(
        rows[1].starts_with("3,") && rows[2].starts_with("4,"),
        "{scale}"
    );
    for chart in ["round_time", "bytes", "consensus", "memory"] {
        assert!(out.join(format!("{chart}.png")).exists(), "{chart}.png");
    }
    for (args, expected) in [
        (&["simulate", "--nodes", "1"][..], "--nodes"),
        (&["simulate", "--churn", "1.5"][..], "--churn"),
    ] {
        let bad = Command::new(env!("CARGO_BIN_EXE_meshtune-testnet"))
            .args(args)
            .output()
            .expect("run");
        assert!(!bad.status.success());
        assert!(String::from_utf8_lossy(&bad.stderr).contains(expected));
    }
}

/// Sparse gossip averaging in the simulator: each node combines its own and at most K
/// neighbours' deltas, and once training stops the nodes' spread shrinks round after round.
#[test]
fn gossip_topology_mixes_with_k_neighbours_and_the_spread_shrinks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("gossip");
    let output = Command::new(env!("CARGO_BIN_EXE_meshtune-testnet"))
        .args([
            "simulate", "--nodes", "6", "--rounds", "7", "--params", "2000",
        ])
        .args(["--topology", "gossip:2", "--train-rounds", "1"])
        .args(["--codec", "int8/64+zstd:1"])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary"))
            .expect("json");
    let rounds = summary["per_round"].as_array().expect("rows");
    assert_eq!(rounds.len(), 7, "{summary}");
    for r in rounds {
        let used = r["deltas_used_min"].as_u64().expect("deltas");
        assert!((1..=3).contains(&used), "own + at most 2 neighbours: {r}");
    }
    let distance = |i: usize| rounds[i]["consensus_distance"].as_f64().expect("distance");
    assert!(
        distance(0) > 0.0,
        "training spreads the nodes apart: {summary}"
    );
    assert!(
        distance(6) < 0.5 * distance(0),
        "pure mixing after round 0 must shrink the spread: {summary}"
    );
    let rate = summary["consensus_rate"].as_f64().expect("rate");
    assert!(rate < 1.0, "{summary}");
}

#[test]
fn nodes_that_keep_their_residual_still_end_on_one_mesh_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    small_run(
        dir.path(),
        3,
        &[
            "--keep-residual",
            "--codec",
            "top2%+int8/64+zstd:1",
            "--no-compare",
        ],
    );
    let last: Vec<serde_json::Value> = (0..4)
        .map(|i| {
            let path = dir
                .path()
                .join(format!("run/federated/node-{i}/rounds.jsonl"));
            let text = std::fs::read_to_string(&path).expect("rounds.jsonl");
            serde_json::from_str(text.lines().last().expect("a round")).expect("record")
        })
        .collect();
    for record in &last {
        assert_eq!(record["round"], 2, "{record}");
        assert_eq!(record["model_hash"], last[0]["model_hash"], "{record}");
    }
    // Only with all-to-all averaging.
    let output = Command::new(env!("CARGO_BIN_EXE_meshtune-testnet"))
        .args(["--keep-residual", "--topology", "gossip:2", "--no-compare"])
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--keep-residual needs --topology all"),
        "{stderr}"
    );
}

/// `--overlap`: every node trains the next round while the current one is exchanged; the mesh
/// still ends on one model, and every round reports how much of it the node trained.
#[test]
fn overlapped_nodes_end_on_one_model_and_report_their_utilization() {
    let dir = tempfile::tempdir().expect("tempdir");
    let summary = small_run(dir.path(), 3, &["--overlap", "--no-compare"]);
    assert!(summary.contains("Compute utilization"), "{summary}");
    let mut hashes = std::collections::BTreeSet::new();
    for i in 0..4 {
        let path = dir
            .path()
            .join(format!("run/federated/node-{i}/rounds.jsonl"));
        let text = std::fs::read_to_string(&path).expect("rounds.jsonl");
        let records: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("record"))
            .collect();
        assert_eq!(records.len(), 3, "node {i}: {text}");
        for record in &records {
            let utilization = record["utilization"].as_f64().expect("utilization");
            let comp = record["t_comp_s"].as_f64().expect("t_comp_s");
            let wait = record["t_wait_s"].as_f64().expect("t_wait_s");
            assert!((0.0..=1.0).contains(&utilization), "{record}");
            assert!(comp >= 0.0 && wait >= 0.0, "{record}");
            assert!(record["t_comm_s"].as_f64().is_some(), "{record}");
        }
        hashes.insert(records[2]["model_hash"].to_string());
    }
    assert_eq!(
        hashes.len(),
        1,
        "the nodes ended on different models: {hashes:?}"
    );
    let csv = std::fs::read_to_string(dir.path().join("run/report/rounds.csv")).expect("csv");
    assert!(
        csv.lines()
            .next()
            .expect("header")
            .ends_with("utilization,t_comp_s,t_wait_s,t_comm_s"),
        "{csv}"
    );
    assert!(dir.path().join("run/report/utilization.svg").exists());
    let output = Command::new(env!("CARGO_BIN_EXE_meshtune-testnet"))
        .args(["--overlap", "--topology", "gossip:2", "--no-compare"])
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--overlap needs --topology all"),
        "{stderr}"
    );
}
