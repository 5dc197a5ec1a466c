//! Helpers shared by the in-process mesh tests: a bootstrap node and meshtune nodes with a
//! tiny T5 each, on libp2p's memory transport.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, PeerId};
use meshtune_bootstrap::BootstrapConfig;
use meshtune_model::backend::CpuTrain;
use meshtune_model::config::T5Config;
use meshtune_model::data::{SamsumRecord, load_samsum};
use meshtune_model::t5::T5;
use meshtune_model::tokenizer::T5Tokenizer;
use meshtune_model::weights::RandomInit;
use meshtune_net::PeerAddr;
use meshtune_net::transport::memory_transport;
use meshtune_node::averaging::round::RoundConfig;
use meshtune_node::coordinator::metrics::NodeMetrics;
use meshtune_node::coordinator::{CoordinatorConfig, RunSummary};
use meshtune_node::network::store::BlobStore;
use meshtune_node::network::{self, NetworkConfig};
use meshtune_node::trainer::TrainConfig;
use meshtune_node::trainer::{LocalData, T5Trainer, TrainerHandle};
use meshtune_node::{Node, NodeConfig};
use meshtune_protocol::TensorSet;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// `RUST_LOG=meshtune_node=debug cargo test …` shows the nodes' events.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/synthetic")
}

pub fn tiny_config() -> T5Config {
    let tokenizer = T5Tokenizer::from_file(&fixtures().join("tokenizer.json")).expect("tokenizer");
    serde_json::from_value(serde_json::json!({
        "vocab_size": tokenizer.vocab_size().max(432), "d_model": 32, "d_kv": 8, "d_ff": 64,
        "num_layers": 1, "num_decoder_layers": 1, "num_heads": 4,
        "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
        "feed_forward_proj": "gated-gelu", "tie_word_embeddings": false,
        "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1
    }))
    .expect("config")
}

pub fn train_config() -> TrainConfig {
    TrainConfig {
        batch_size: 8,
        lr: 3e-3,
        warmup_steps: 0,
        schedule: meshtune_model::optim::ScheduleKind::Constant,
        source_max_len: 48,
        target_max_len: 24,
        eval_examples: 8,
        eval_max_new_tokens: 8,
        steps: 1000,
        ..TrainConfig::default()
    }
}

pub fn trainer(records: &[SamsumRecord], config: &TrainConfig) -> TrainerHandle {
    let model_config = tiny_config();
    let device = Default::default();
    // Every node starts from the same seed: the same model.
    let model: T5<CpuTrain> = T5::from_source(
        &model_config,
        &mut RandomInit::<CpuTrain>::new(&model_config, &device, 7),
    )
    .expect("model");
    let tokenizer = T5Tokenizer::from_file(&fixtures().join("tokenizer.json")).expect("tokenizer");
    let eval = load_samsum(&fixtures().join("eval.jsonl")).expect("eval");
    let trainer = T5Trainer::new(
        model,
        model_config,
        tokenizer,
        config.clone(),
        false,
        LocalData {
            train: records,
            eval: eval.into_iter().take(8).collect(),
        },
        device,
    )
    .expect("trainer");
    TrainerHandle::spawn("test", trainer).expect("spawn")
}

pub struct TestNode {
    pub peer_id: PeerId,
    pub trainer: TrainerHandle,
    pub handle: tokio::task::JoinHandle<Result<RunSummary, meshtune_node::coordinator::RunError>>,
    pub shutdown: CancellationToken,
    pub metrics: NodeMetrics,
    /// The node's network (to dial, or ask peers directly).
    pub client: network::Client,
}

pub async fn start_bootstrap(port: u64) -> (meshtune_bootstrap::RunningBootstrap, PeerAddr) {
    start_bootstrap_with_psk(port, None).await
}

/// A bootstrap node whose transport requires the pre-shared key `psk`.
pub async fn start_bootstrap_with_psk(
    port: u64,
    psk: Option<PreSharedKey>,
) -> (meshtune_bootstrap::RunningBootstrap, PeerAddr) {
    let keypair = Keypair::generate_ed25519();
    let mut config = BootstrapConfig::new(PathBuf::from("unused"));
    let addr: Multiaddr = format!("/memory/{port}").parse().expect("addr");
    config.listen = vec![addr.clone()];
    config.behaviour.mesh = "test".parse().expect("mesh");
    let transport = memory_transport(&keypair, psk).expect("transport");
    let bootstrap = meshtune_bootstrap::start_with_transport(&config, keypair, transport)
        .await
        .expect("bootstrap");
    let peer = PeerAddr::new(bootstrap.peer_id(), addr);
    (bootstrap, peer)
}

pub fn start_node(
    keypair: Option<Keypair>,
    port: u64,
    bootstrap: &PeerAddr,
    records: &[SamsumRecord],
    out: &Path,
    peers_expected: usize,
    configure: impl FnOnce(&mut CoordinatorConfig),
) -> TestNode {
    spawn_test_node(
        NodeSpec {
            psk: None,
            keypair,
            port,
            bootstrap,
            records,
            out,
            peers_expected,
        },
        configure,
    )
}

/// One node per shard of `data`, each with a fixed identity (key `[key_seed + i; 32]`, so sums
/// run in the same order every run), listening on `port + 1 + i` and writing to `dir/node{i}`.
pub fn start_keyed_nodes(
    port: u64,
    key_seed: u8,
    bootstrap: &PeerAddr,
    data: &[Vec<SamsumRecord>],
    dir: &Path,
    configure: impl Fn(&mut CoordinatorConfig) + Copy,
) -> Vec<TestNode> {
    (0..data.len())
        .map(|i| {
            let mut secret = [key_seed + i as u8; 32];
            let key = Keypair::ed25519_from_bytes(&mut secret).expect("key");
            start_node(
                Some(key),
                port + 1 + i as u64,
                bootstrap,
                &data[i],
                &dir.join(format!("node{i}")),
                data.len() - 1,
                configure,
            )
        })
        .collect()
}

/// Who a test node is and where it listens, trains and writes.
pub struct NodeSpec<'a> {
    /// The mesh's pre-shared key (a private mesh), if any.
    pub psk: Option<PreSharedKey>,
    pub keypair: Option<Keypair>,
    pub port: u64,
    pub bootstrap: &'a PeerAddr,
    pub records: &'a [SamsumRecord],
    pub out: &'a Path,
    pub peers_expected: usize,
}

/// A tiny-T5 node on the memory transport, through [`Node::spawn`] as the binary starts one:
/// 4 rounds of 3 steps, int8 deltas, a final exchange, no evaluation, unless `configure`
/// changes them.
pub fn spawn_test_node(
    spec: NodeSpec<'_>,
    configure: impl FnOnce(&mut CoordinatorConfig),
) -> TestNode {
    let keypair = spec.keypair.unwrap_or_else(Keypair::generate_ed25519);
    let trainer = trainer(spec.records, &train_config());
    let mut net = NetworkConfig::new("test".parse().expect("mesh"));
    net.listen = vec![format!("/memory/{}", spec.port).parse().expect("addr")];
    net.bootstrap = vec![spec.bootstrap.clone()];
    net.random_walk_interval = Duration::from_secs(2);
    net.request_timeout = Duration::from_secs(10);
    let mut config = CoordinatorConfig::new("test", spec.out.to_path_buf());
    config.local_steps = 3;
    config.rounds = Some(4);
    config.final_exchange = true;
    config.codec = "int8/64+zstd:1".parse().expect("codec");
    config.eval_every = 0;
    config.round = RoundConfig {
        quorum: 1.0,
        min_deltas: 1,
        collect_timeout: Duration::from_secs(60),
        future_window: 1,
        adaptive: Some(Default::default()),
    };
    config.wait_for_peers = spec.peers_expected;
    config.wait_timeout = Duration::from_secs(30);
    configure(&mut config);
    let node = Node::spawn(NodeConfig {
        transport: memory_transport(&keypair, spec.psk).expect("transport"),
        keypair,
        network: net,
        coordinator: config,
        trainer,
        max_state_uploads: None,
        shutdown: CancellationToken::new(),
    })
    .expect("node");
    TestNode {
        peer_id: node.peer_id,
        trainer: node.trainer,
        handle: node.rounds,
        shutdown: node.shutdown,
        metrics: node.metrics,
        client: node.client,
    }
}

pub fn shards(n: usize, per_node: usize) -> Vec<Vec<SamsumRecord>> {
    let all = load_samsum(&fixtures().join("train.jsonl")).expect("train");
    (0..n)
        .map(|i| all[i * per_node..(i + 1) * per_node].to_vec())
        .collect()
}

/// A network stack alone (no coordinator, no model) on the memory transport.
pub fn bare_network(
    config: NetworkConfig,
    shutdown: &CancellationToken,
) -> network::RunningNetwork {
    bare_network_with_store(config, Arc::new(Mutex::new(BlobStore::default())), shutdown)
}

/// [`bare_network`] serving what `store` holds.
pub fn bare_network_with_store(
    config: NetworkConfig,
    store: Arc<Mutex<BlobStore>>,
    shutdown: &CancellationToken,
) -> network::RunningNetwork {
    let keypair = Keypair::generate_ed25519();
    network::start(
        &keypair,
        memory_transport(&keypair, None).expect("transport"),
        config,
        Arc::new(meshtune_protocol::ModelLayout::new(Vec::new()).expect("layout")),
        store,
        &mut Registry::default(),
        shutdown.child_token(),
    )
    .expect("network")
}

/// The rounds `out/rounds.jsonl` records so far.
pub fn records(out: &Path) -> Vec<meshtune_node::coordinator::RoundRecord> {
    std::fs::read_to_string(out.join("rounds.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits until the node writing to `out` applied `applied` rounds.
pub async fn wait_for_round(out: &Path, applied: usize) {
    for _ in 0..6_000 {
        if records(out).len() >= applied {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never applied {applied} rounds", out.display());
}

/// Waits for every node to finish its rounds: each one's summary and final weights.
pub async fn finish(nodes: Vec<TestNode>) -> Vec<(RunSummary, TensorSet)> {
    let mut out = Vec::new();
    for node in nodes {
        let summary = tokio::time::timeout(Duration::from_secs(300), node.handle)
            .await
            .expect("node finished in time")
            .expect("task")
            .expect("run");
        let weights = node.trainer.weights().await.expect("weights");
        node.shutdown.cancel();
        out.push((summary, weights));
    }
    out
}
