//! A mesh of real processes on loopback: `meshtune-bootstrap` listening on TCP and QUIC, and
//! three `meshtune node`s that know only its address. Node 0 speaks TCP only (`--no-quic`),
//! node 1 listens on QUIC only and bootstraps over QUIC, node 2 listens on both. They must
//! find each other through the bootstrap node, run every round with all three deltas, and
//! end on one model.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshtune_node::coordinator::RoundRecord;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/synthetic")
}

/// `meshtune-bootstrap` next to `meshtune` (built by `cargo test --workspace`; built here
/// when this package is tested alone).
fn bootstrap_binary() -> PathBuf {
    let meshtune = PathBuf::from(env!("CARGO_BIN_EXE_meshtune"));
    let path = meshtune.with_file_name(format!(
        "meshtune-bootstrap{}",
        std::env::consts::EXE_SUFFIX
    ));
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "meshtune-bootstrap"])
            .status()
            .expect("cargo build");
        assert!(status.success(), "building meshtune-bootstrap failed");
    }
    path
}

fn scrape(port: u16) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn three_processes_over_tcp_and_quic_find_each_other_through_the_bootstrap_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bootstrap = Killed(
        Command::new(bootstrap_binary())
            .args([
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--listen",
                "/ip4/127.0.0.1/udp/0/quic-v1",
                "--mesh",
                "proc-test",
                "--key-file",
            ])
            .arg(dir.path().join("bootstrap.key"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("bootstrap"),
    );
    let stdout = bootstrap.0.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let (mut tcp, mut quic) = (None, None);
    while tcp.is_none() || quic.is_none() {
        let line = lines
            .next()
            .expect("bootstrap printed its addresses")
            .expect("line");
        if line.contains("/tcp/") {
            tcp = Some(line.trim().to_owned());
        } else if line.contains("/quic-v1/") {
            quic = Some(line.trim().to_owned());
        }
    }
    let (tcp, quic) = (tcp.expect("tcp"), quic.expect("quic"));

    let train = std::fs::read_to_string(fixtures().join("train.jsonl")).expect("train");
    let lines_of: Vec<&str> = train.lines().collect();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        "[node]\nmesh = \"proc-test\"\ncodec = \"top10%+int8/64+zstd:1\"\ncollect_timeout_s = 60\n\
         [train]\nbatch_size = 4\nlr = 3e-3\nwarmup_steps = 0\nschedule = \"constant\"\n\
         source_max_len = 48\ntarget_max_len = 24\n",
    )
    .expect("config");
    let metrics_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        probe.local_addr().expect("addr").port()
    };
    let mut nodes = Vec::new();
    for i in 0..3 {
        let shard = dir.path().join(format!("shard{i}.jsonl"));
        std::fs::write(&shard, lines_of[i * 40..(i + 1) * 40].join("\n")).expect("shard");
        let out = dir.path().join(format!("node{i}"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshtune"));
        cmd.arg("node")
            .arg("--random-init")
            .arg("--model")
            .arg(fixtures())
            .arg("--train")
            .arg(&shard)
            .arg("--out")
            .arg(&out)
            .arg("--config")
            .arg(&config)
            .args(["--rounds", "3", "--local-steps", "2", "--final-exchange"])
            .args(["--wait-for-peers", "2"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join(format!("node{i}.log"))).expect("log"),
            ));
        match i {
            0 => cmd
                .args(["--no-quic", "--listen", "/ip4/127.0.0.1/tcp/0"])
                .args(["--bootstrap", &tcp]),
            1 => cmd
                .args(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"])
                .args(["--bootstrap", &quic]),
            _ => cmd
                .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
                .args(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"])
                .args(["--bootstrap", &tcp])
                .args(["--metrics", &format!("127.0.0.1:{metrics_port}")]),
        };
        nodes.push((Killed(cmd.spawn().expect("node")), out));
    }
    // Node 2's Prometheus endpoint, scraped while it runs.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut scraped = String::new();
    while Instant::now() < deadline {
        if let Ok(text) = scrape(metrics_port)
            && text.contains("meshtune_round")
            && text.contains("libp2p_bandwidth_bytes_total")
        {
            scraped = text;
            break;
        }
        if nodes[2].0.0.try_wait().expect("wait").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for name in [
        "meshtune_round",
        "meshtune_mesh_peers",
        "meshtune_train_loss",
        "libp2p_bandwidth_bytes_total",
    ] {
        assert!(scraped.contains(name), "/metrics lacks {name}:\n{scraped}");
    }
    for (i, (child, _)) in nodes.iter_mut().enumerate() {
        loop {
            if let Some(status) = child.0.try_wait().expect("wait") {
                let log = std::fs::read_to_string(dir.path().join(format!("node{i}.log")))
                    .unwrap_or_default();
                assert!(status.success(), "node {i} failed:\n{log}");
                break;
            }
            assert!(Instant::now() < deadline, "node {i} did not finish in time");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let mut finals = Vec::new();
    for (i, (_, out)) in nodes.iter().enumerate() {
        let records: Vec<RoundRecord> = std::fs::read_to_string(out.join("rounds.jsonl"))
            .expect("rounds.jsonl")
            .lines()
            .map(|l| serde_json::from_str(l).expect("record"))
            .collect();
        assert_eq!(records.len(), 3, "node {i}");
        for r in &records {
            assert_eq!(
                r.deltas, 3,
                "node {i} round {} combined every delta",
                r.round
            );
            assert!(r.wire_in > 0 && r.wire_out > 0);
        }
        println!(
            "node {i}: delta {} B (raw f32 {} B), amplification {:?}",
            records[0].delta_bytes,
            records[0].raw_delta_bytes,
            records.iter().map(|r| r.amplification).collect::<Vec<_>>()
        );
        finals.push(records[2].model_hash.clone());
        assert!(
            out.join("checkpoints/latest").exists(),
            "node {i} checkpointed"
        );
    }
    assert!(
        finals.windows(2).all(|w| w[0] == w[1]),
        "nodes ended on different models: {finals:?}"
    );
}
