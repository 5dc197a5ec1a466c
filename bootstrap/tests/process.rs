//! The built `meshtune-bootstrap` binary as an operator runs it: real TCP and QUIC on
//! loopback, addresses read from its stdout, identify with a test swarm, metrics over
//! HTTP, SIGTERM, restart with the same key, and the refusals that must name the file.

mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use futures::StreamExt;
use meshtune_bootstrap::{
    BootstrapBehaviour, MeshId, PeerAddr,
    behaviour::{BehaviourConfig, BootstrapBehaviourEvent},
    libp2p::{
        Multiaddr, identify, identity::Keypair, multiaddr::Protocol, pnet::PreSharedKey,
        swarm::SwarmEvent,
    },
};
use meshtune_net::transport::{self, TransportConfig};
use support::{DEADLINE, within};

const BIN: &str = env!("CARGO_BIN_EXE_meshtune-bootstrap");

/// The child process, its stdout lines as they arrive and its stderr so far.
struct Bootstrap {
    child: Child,
    stdout_lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Bootstrap {
    fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn meshtune-bootstrap");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (sender, stdout_lines) = mpsc::sync_channel(64);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let collected = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&collected);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = String::new();
            while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                if let Ok(mut all) = sink.lock() {
                    all.push_str(&line);
                }
                line.clear();
            }
        });
        Self {
            child,
            stdout_lines,
            stderr: collected,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Reads printed addresses until `done` says enough.
    fn addresses_until(&self, done: impl Fn(&[Multiaddr]) -> bool) -> Vec<Multiaddr> {
        let started = Instant::now();
        let mut addrs = Vec::new();
        while !done(&addrs) {
            let left = DEADLINE.saturating_sub(started.elapsed());
            match self.stdout_lines.recv_timeout(left) {
                Ok(line) => addrs.push(
                    line.parse()
                        .unwrap_or_else(|e| panic!("stdout line {line:?} is no multiaddr: {e}")),
                ),
                Err(error) => panic!(
                    "no address on stdout ({error}); got {addrs:?}; stderr:\n{}",
                    self.stderr()
                ),
            }
        }
        addrs
    }

    /// Waits for the line of stderr that contains `needle`.
    fn stderr_line_containing(&self, needle: &str) -> String {
        let started = Instant::now();
        loop {
            if let Some(line) = self.stderr().lines().find(|line| line.contains(needle)) {
                return line.to_owned();
            }
            assert!(
                started.elapsed() < DEADLINE,
                "no stderr line with {needle:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        self.wait()
    }

    fn wait(&mut self) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "did not exit in time; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Bootstrap {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn is_tcp(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::Tcp(_)))
}

fn is_quic(addr: &Multiaddr) -> bool {
    transport::is_quic(addr)
}

fn test_swarm(psk: Option<PreSharedKey>) -> meshtune_bootstrap::libp2p::Swarm<BootstrapBehaviour> {
    let keypair = Keypair::generate_ed25519();
    let config = TransportConfig {
        psk,
        ..TransportConfig::default()
    };
    let transport = transport::network_transport(&keypair, &config).expect("transport");
    let behaviour = BootstrapBehaviour::new(&keypair, &BehaviourConfig::default());
    transport::build_swarm(&keypair, transport, behaviour, Duration::from_secs(60))
}

/// Dials `addr` and waits until identify reports the bootstrap node's info.
/// Dials `addr` and waits for the bootstrap's identify info. The swarm goes on being driven in
/// a task (aborted on drop of the handle), so that the bootstrap can identify this peer too:
/// closing the connection at once can cut off this side's answer to its identify request.
async fn identify_through(addr: &Multiaddr) -> (identify::Info, tokio::task::JoinHandle<()>) {
    let expected = PeerAddr::from_multiaddr(addr.clone())
        .expect("printed address ends in /p2p")
        .peer_id;
    let mut swarm = test_swarm(None);
    swarm.dial(addr.clone()).expect("dial");
    let info = within(&format!("identify via {addr}"), async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(BootstrapBehaviourEvent::Identify(
                    identify::Event::Received { peer_id, info, .. },
                )) if peer_id == expected => return info,
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    panic!("cannot connect to {addr}: {error}")
                }
                _ => {}
            }
        }
    })
    .await;
    let driver = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    (info, driver)
}

fn http_get(addr: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect metrics");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

fn key_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("key file exists")
        .permissions()
        .mode()
        & 0o777
}

// Multi-threaded: the test thread blocks while it reads the child's output, and the dialing
// swarms must keep running meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_prints_its_addresses_identifies_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("keys/bootstrap.key");
    let key_arg = key.display().to_string();
    let args = [
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
        "--key-file",
        &key_arg,
        "--metrics",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ];
    let mut node = Bootstrap::spawn(&args);
    let addrs = node.addresses_until(|a| a.iter().any(is_tcp) && a.iter().any(is_quic));
    let peer_id = PeerAddr::from_multiaddr(addrs[0].clone())
        .expect("ends in /p2p")
        .peer_id;
    assert!(
        addrs
            .iter()
            .all(|a| PeerAddr::from_multiaddr(a.clone()).is_ok_and(|p| p.peer_id == peer_id))
    );

    // The key file was created private, and it is the identity being served.
    assert_eq!(key_mode(&key), 0o600);
    let on_disk = meshtune_net::identity::load(&key).expect("key loads");
    assert_eq!(on_disk.public().to_peer_id(), peer_id);

    // Identify over TCP and over QUIC.
    let mut drivers = Vec::new();
    for addr in [
        addrs.iter().find(|a| is_tcp(a)).expect("tcp"),
        addrs.iter().find(|a| is_quic(a)).expect("quic"),
    ] {
        let (info, driver) = identify_through(addr).await;
        drivers.push(driver);
        assert_eq!(
            info.protocol_version,
            MeshId::default().identify_protocol_version()
        );
        assert!(info.agent_version.starts_with("meshtune-bootstrap/"));
        assert!(info.protocols.contains(&MeshId::default().kad_protocol()));
    }

    // Logs are JSON on stderr, with structured fields.
    let line = node.stderr_line_containing("serving metrics");
    let log: serde_json::Value = serde_json::from_str(&line).expect("json log line");
    let url = log["fields"]["addr"]
        .as_str()
        .expect("addr field")
        .to_owned();
    let metrics_addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    let identified = node.stderr_line_containing("identified peer");
    let identified: serde_json::Value = serde_json::from_str(&identified).expect("json");
    assert!(identified["fields"]["peer"].is_string(), "{identified}");
    for driver in drivers {
        driver.abort();
    }

    let metrics = http_get(&metrics_addr, "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    assert!(metrics.contains("libp2p_identify_"), "{metrics}");
    assert!(
        metrics.contains("libp2p_swarm_connections_established_total"),
        "{metrics}"
    );

    let status = node.terminate();
    assert!(
        status.success(),
        "exit {status}; stderr:\n{}",
        node.stderr()
    );
    assert!(node.stderr().contains("SIGTERM"), "{}", node.stderr());

    // Restarted with the same key file: same peer id.
    let mut again = Bootstrap::spawn(&args[..6]);
    let addrs = again.addresses_until(|a| !a.is_empty());
    assert_eq!(
        PeerAddr::from_multiaddr(addrs[0].clone())
            .expect("ends in /p2p")
            .peer_id,
        peer_id
    );
    assert!(again.terminate().success());
}

#[test]
fn insecure_or_corrupt_key_files_are_refused_naming_the_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("open.key");
    meshtune_net::identity::create(&key).expect("create");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let key_arg = key.display().to_string();
    let args = ["--listen", "/ip4/127.0.0.1/tcp/0", "--key-file", &key_arg];

    let mut node = Bootstrap::spawn(&args);
    let status = node.wait();
    assert!(!status.success());
    let stderr = node.stderr();
    assert!(
        stderr.contains(&key_arg) && stderr.contains("chmod 600"),
        "{stderr}"
    );

    std::fs::write(&key, b"garbage").expect("write");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut node = Bootstrap::spawn(&args);
    assert!(!node.wait().success());
    let stderr = node.stderr();
    assert!(
        stderr.contains(&key_arg) && stderr.contains("corrupt"),
        "{stderr}"
    );
}

#[test]
fn with_a_psk_quic_is_skipped_and_help_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let psk = dir.path().join("swarm.key");
    std::fs::write(&psk, PreSharedKey::new([9; 32]).to_key_file()).expect("write psk");
    let key_arg = dir.path().join("k").display().to_string();
    let psk_arg = psk.display().to_string();

    let mut quic_only = Bootstrap::spawn(&[
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
        "--key-file",
        &key_arg,
        "--psk-file",
        &psk_arg,
    ]);
    assert!(!quic_only.wait().success());
    assert!(
        quic_only.stderr().contains("add a TCP address"),
        "{}",
        quic_only.stderr()
    );

    let mut both = Bootstrap::spawn(&[
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--key-file",
        &key_arg,
        "--psk-file",
        &psk_arg,
    ]);
    let addrs = both.addresses_until(|a| !a.is_empty());
    assert!(addrs.iter().all(is_tcp), "{addrs:?}");
    assert!(
        both.stderr_line_containing("QUIC disabled")
            .contains("fingerprint")
    );
    assert!(both.terminate().success());

    let help = Command::new(BIN).arg("--help").output().expect("--help");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("QUIC is disabled"), "{help}");
}
