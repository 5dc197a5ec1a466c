//! `meshtune node`: join a mesh and fine-tune with it. Loads the model and the local data,
//! starts the trainer thread, the network task, the metrics endpoint and the round loop.
//!
//! Settings come from built-in defaults, then `--config node.toml`, then `MESHTUNE_*`
//! environment variables and flags (clap reads both; flags win).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use meshtune_model::data::load_samsum;
use meshtune_model::t5::T5;
use meshtune_net::identity::{self, KeyOrigin};
use meshtune_net::metrics::MetricsServer;
use meshtune_net::shaping::LinkProfile;
use meshtune_net::transport::{self, TransportConfig, is_quic};
use meshtune_net::{MeshId, PeerAddr};
use meshtune_protocol::{CodecParams, Limits};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::averaging::aggregate::{Aggregation, OuterOptimizer};
use crate::averaging::round::RoundConfig;
use crate::coordinator::{CoordinatorConfig, Misbehaviour, RunSummary, Topology};
use crate::device::DeviceChoice;
use crate::network::{self, NetworkConfig};
use crate::node::{Node, NodeConfig};
use crate::trainer::TrainConfig;
use crate::trainer::model::{initial_model, model_config_and_tokenizer};
use crate::trainer::{LocalData, T5Trainer, TrainerHandle};

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Bootstrap peer `/ip4/…/tcp/…/p2p/<id>` (repeat, or comma-separate in the env var).
    #[arg(long, env = "MESHTUNE_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<PeerAddr>,
    /// Listen address (repeat). Default: TCP and QUIC on all interfaces, random ports.
    #[arg(long, env = "MESHTUNE_LISTEN", value_delimiter = ',')]
    pub listen: Vec<Multiaddr>,
    /// Address to announce besides the observed ones (e.g. a public or container address).
    #[arg(long, env = "MESHTUNE_EXTERNAL", value_delimiter = ',')]
    pub external: Vec<Multiaddr>,
    /// HF T5 folder to start from (config.json, weights, tokenizer.json).
    #[arg(long, env = "MESHTUNE_MODEL", conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// flan-t5-small|base|large|xl with random weights (needs --tokenizer).
    #[arg(long, env = "MESHTUNE_PRESET")]
    pub preset: Option<String>,
    /// Random weights (seeded by the train seed: every node gets the same) with MODEL/config.json.
    #[arg(long)]
    pub random_init: bool,
    #[arg(long, env = "MESHTUNE_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// Local training data (Samsum JSONL or JSON array).
    #[arg(long, env = "MESHTUNE_TRAIN")]
    pub train: PathBuf,
    /// Held-out data for per-round loss and ROUGE-L (optional).
    #[arg(long, env = "MESHTUNE_EVAL")]
    pub eval: Option<PathBuf>,
    /// Checkpoints, `rounds.jsonl` and the identity key (unless --key-file).
    #[arg(long, env = "MESHTUNE_OUT", default_value = "meshtune-node")]
    pub out: PathBuf,
    /// ed25519 identity, created (mode 0600) on first start. Default: OUT/node.key.
    #[arg(long, env = "MESHTUNE_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Private mesh key (go-libp2p swarm.key format). With a key only TCP is used: QUIC
    /// cannot carry it, so QUIC is switched off.
    #[arg(long, env = "MESHTUNE_PSK_FILE")]
    pub psk_file: Option<PathBuf>,
    /// TOML with `[node]` and `[train]` tables.
    #[arg(long, env = "MESHTUNE_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "MESHTUNE_MESH")]
    pub mesh: Option<String>,
    #[arg(long, env = "MESHTUNE_ROUNDS")]
    pub rounds: Option<u64>,
    #[arg(long, env = "MESHTUNE_LOCAL_STEPS")]
    pub local_steps: Option<usize>,
    /// e.g. `f32+shuffle+zstd:3`, `int8/64+zstd:1`, `top1%+int8/64+zstd:1`,
    /// `rank8+int4/64+zstd:1` (rank-8 factors of every matrix).
    #[arg(long, env = "MESHTUNE_CODEC")]
    pub codec: Option<String>,
    /// mean, median, trimmed-mean[:F].
    #[arg(long, env = "MESHTUNE_AGGREGATION")]
    pub aggregation: Option<String>,
    /// `all` (every node combines every delta each round: one model everywhere) or
    /// `gossip:K[:STEP]` (sparse gossip averaging with at most K gossip-mesh neighbours:
    /// bytes per round flat in the mesh size; models agree only approximately).
    #[arg(long, env = "MESHTUNE_TOPOLOGY")]
    pub topology: Option<String>,
    /// Outer step on the averaged delta: average, momentum:LR:M (FedAvgM), nesterov:LR:M
    /// (DiLoCo), adam:LR[:BETA1:BETA2:EPS] (FedAdam) or adamw:LR[:BETA1:BETA2:EPS:WD]. Every
    /// node of a mesh must use the same one.
    #[arg(long, env = "MESHTUNE_OUTER")]
    pub outer: Option<String>,
    /// Refuse deltas whose L2 norm exceeds this (besides the screen against 10x the round's
    /// median norm).
    #[arg(long, env = "MESHTUNE_MAX_DELTA_NORM")]
    pub max_delta_norm: Option<f64>,
    /// Power reader for per-round energy, tokens/s/W: auto (Jetson INA3221, then NVML, then
    /// RAPL, else unavailable), jetson, nvml, rapl or none.
    #[arg(long, env = "MESHTUNE_POWER", default_value = "auto")]
    pub power: crate::energy::PowerSource,
    /// Fraction of the mesh whose deltas end a round early.
    #[arg(long, env = "MESHTUNE_QUORUM")]
    pub quorum: Option<f64>,
    /// Seconds to wait for peers' deltas after publishing.
    #[arg(long, env = "MESHTUNE_COLLECT_TIMEOUT_S")]
    pub collect_timeout_s: Option<f64>,
    /// Mesh peers to wait for before the first round.
    #[arg(long, env = "MESHTUNE_WAIT_FOR_PEERS")]
    pub wait_for_peers: Option<usize>,
    /// Train LoRA adapters (exchanging only them) instead of all weights.
    #[arg(long)]
    pub lora: bool,
    /// Train 0 steps in the last round (all nodes end on the same model).
    #[arg(long)]
    pub final_exchange: bool,
    /// Keep what a lossy codec left out of this node's delta in its own model (it still
    /// reaches the mesh in later rounds) instead of setting its local progress back to the
    /// mesh's model; `topology = "all"` only. Also `keep_residual = true` in node.toml.
    #[arg(long, env = "MESHTUNE_KEEP_RESIDUAL")]
    pub keep_residual: bool,
    /// Error feedback with decay: the residual a lossy codec left out is multiplied by this
    /// each round before the new delta joins it (1: plain error feedback, 0: none). Also
    /// `ef_decay` in node.toml.
    #[arg(long, env = "MESHTUNE_EF_DECAY")]
    pub ef_decay: Option<f32>,
    /// Take out of the error-feedback residual what the new delta learnt again before adding
    /// it, so a long local phase's progress is not sent twice (`--ef-relearn` or
    /// `--ef-relearn true|false`). Also `ef_relearn` in node.toml.
    #[arg(long, env = "MESHTUNE_EF_RELEARN", num_args = 0..=1, default_missing_value = "true")]
    pub ef_relearn: Option<bool>,
    /// Bound the error-feedback residual: each tensor's residual is scaled down to at most
    /// this many times the norm of the tensor's new delta before they are added. Also
    /// `ef_bound` in node.toml.
    #[arg(long, env = "MESHTUNE_EF_BOUND")]
    pub ef_bound: Option<f32>,
    /// Train the next round's local phase while this round's deltas are exchanged, then move
    /// it onto the mesh's new model (one-step delayed application); `topology = "all"`,
    /// without `keep_residual`. Also `overlap = true` in node.toml.
    #[arg(long, env = "MESHTUNE_OVERLAP")]
    pub overlap: bool,
    #[arg(long, env = "MESHTUNE_DEVICE", default_value = "cpu")]
    pub device: DeviceChoice,
    /// Compute precision: auto (from the device: bf16 on compute capability >= 8.0, fp16 with
    /// dynamic loss scaling on Jetson Xavier/Volta/Turing, f32 on CPU), f32, bf16 or fp16.
    #[arg(long, env = "MESHTUNE_PRECISION")]
    pub precision: Option<meshtune_model::precision::PrecisionChoice>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "MESHTUNE_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// Do not listen or dial over QUIC.
    #[arg(long)]
    pub no_quic: bool,
    /// Use circuit relays: dial peers' `/p2p-circuit` addresses (not with --psk-file).
    #[arg(long)]
    pub relay_client: bool,
    /// Reserve a slot on this relay (a `meshtune-bootstrap --relay` address) and listen through
    /// it, for nodes behind NAT; repeat for several. Implies --relay-client.
    #[arg(long, env = "MESHTUNE_RELAY", value_delimiter = ',')]
    pub relay: Vec<PeerAddr>,
    /// Direct connection upgrade through relays (hole punching).
    #[arg(long)]
    pub dcutr: bool,
    /// Ask peers whether this node is publicly reachable.
    #[arg(long)]
    pub autonat: bool,
    /// Discover peers on the local network with mDNS.
    #[arg(long)]
    pub mdns: bool,
    /// Shape this node's TCP connections like a real link: a preset (lan, wifi, lte, 5g,
    /// slow) or settings such as `rate=1mbit,delay=20ms,loss=0.1%` (see `meshtune bench
    /// link`). QUIC is off while shaping.
    #[arg(long, env = "MESHTUNE_LINK")]
    pub link: Option<String>,
    /// Peers to refuse: a file of peer ids (one per line, `#` comments), re-read every
    /// second; a peer leaves the list to be dialed again.
    #[arg(long, env = "MESHTUNE_DENY_FILE")]
    pub deny_file: Option<PathBuf>,
    /// Fault injection for testnets only: publish bad deltas on purpose (`scale:FACTOR`,
    /// `nan`, `mixed:FACTOR`).
    #[arg(long, hide = true)]
    pub byzantine: Option<String>,
}

/// `[node]` of node.toml.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MeshSettings {
    pub mesh: String,
    pub rounds: Option<u64>,
    pub local_steps: usize,
    pub codec: String,
    pub aggregation: Aggregation,
    pub outer: OuterOptimizer,
    /// `all` or `gossip:K[:STEP]` (see `--topology`).
    pub topology: String,
    pub quorum: f64,
    pub min_deltas: usize,
    /// The first rounds' collect deadline (and every round's with `adaptive_deadline = false`).
    pub collect_timeout_s: f64,
    /// Later deadlines follow peers' observed arrival times (2 x p95 + 2 s), bounded by
    /// `[min_collect_timeout_s, max_collect_timeout_s]`.
    pub adaptive_deadline: bool,
    pub min_collect_timeout_s: f64,
    pub max_collect_timeout_s: f64,
    pub future_window: u64,
    pub eval_every: u64,
    pub max_delta_norm: Option<f64>,
    pub norm_outlier_factor: f64,
    pub request_timeout_s: f64,
    pub max_requests_per_peer_per_s: u32,
    /// Mesh peers to wait for before the first round.
    pub wait_for_peers: usize,
    pub wait_timeout_s: f64,
    /// After the last round, keep serving blobs until peers have fetched nothing for this
    /// long (0: exit at once).
    pub linger_quiet_s: f64,
    /// Peers this node serves state chunks to at once (late joiners beyond it are answered
    /// `Busy` and pull from other donors); 0: no cap.
    pub max_state_uploads: usize,
    /// States of at least this many MiB are encoded to and synced through files under
    /// `OUT/state/` instead of memory (a 3B-parameter state is about 12 GB).
    pub stream_state_mib: u64,
    /// See `--keep-residual`.
    pub keep_residual: bool,
    /// See `--ef-decay`.
    pub ef_decay: f32,
    /// See `--ef-relearn`.
    pub ef_relearn: bool,
    /// See `--ef-bound`.
    pub ef_bound: Option<f32>,
    /// See `--overlap`.
    pub overlap: bool,
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self {
            mesh: "default".into(),
            rounds: None,
            local_steps: 20,
            codec: meshtune_protocol::DEFAULT_CODEC.into(),
            aggregation: Aggregation::Mean,
            outer: OuterOptimizer::Average,
            topology: "all".into(),
            quorum: 1.0,
            min_deltas: 1,
            collect_timeout_s: 60.0,
            adaptive_deadline: true,
            min_collect_timeout_s: 10.0,
            max_collect_timeout_s: 600.0,
            future_window: 1,
            eval_every: 1,
            max_delta_norm: None,
            norm_outlier_factor: 10.0,
            request_timeout_s: 30.0,
            max_requests_per_peer_per_s: 200,
            wait_for_peers: 0,
            wait_timeout_s: 60.0,
            linger_quiet_s: 5.0,
            max_state_uploads: 4,
            stream_state_mib: 256,
            keep_residual: false,
            ef_decay: 1.0,
            ef_relearn: false,
            ef_bound: None,
            overlap: false,
        }
    }
}

/// The whole node.toml.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct NodeFile {
    pub node: MeshSettings,
    pub train: TrainConfig,
}

impl NodeFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid node config {}", path.display()))
    }
}

fn positive_seconds(name: &str, value: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        value.is_finite() && value > 0.0,
        "`{name}` must be a positive number of seconds, got {value}"
    );
    Ok(Duration::from_secs_f64(value))
}

/// Settings after file, env and flags.
pub fn resolve(args: &NodeArgs) -> anyhow::Result<(MeshSettings, TrainConfig)> {
    let file = match &args.config {
        Some(path) => NodeFile::load(path)?,
        None => NodeFile::default(),
    };
    let mut mesh = file.node;
    if let Some(v) = &args.mesh {
        mesh.mesh = v.clone();
    }
    if let Some(v) = args.rounds {
        mesh.rounds = Some(v);
    }
    if let Some(v) = args.local_steps {
        mesh.local_steps = v;
    }
    if let Some(v) = &args.codec {
        mesh.codec = v.clone();
    }
    if let Some(v) = &args.aggregation {
        mesh.aggregation = v.parse()?;
    }
    if let Some(v) = &args.topology {
        mesh.topology = v.clone();
    }
    if args.keep_residual {
        mesh.keep_residual = true;
    }
    if let Some(v) = args.ef_decay {
        mesh.ef_decay = v;
    }
    if let Some(v) = args.ef_relearn {
        mesh.ef_relearn = v;
    }
    if let Some(v) = args.ef_bound {
        mesh.ef_bound = Some(v);
    }
    if args.overlap {
        mesh.overlap = true;
    }
    if let Some(v) = &args.outer {
        mesh.outer = v.parse()?;
    }
    if let Some(v) = args.max_delta_norm {
        mesh.max_delta_norm = Some(v);
    }
    if let Some(v) = args.quorum {
        mesh.quorum = v;
    }
    if let Some(v) = args.collect_timeout_s {
        mesh.collect_timeout_s = v;
    }
    if let Some(v) = args.wait_for_peers {
        mesh.wait_for_peers = v;
    }
    positive_seconds("wait_timeout_s", mesh.wait_timeout_s)?;
    anyhow::ensure!(
        mesh.linger_quiet_s.is_finite() && mesh.linger_quiet_s >= 0.0,
        "`linger_quiet_s` must be zero or a positive number of seconds, got {}",
        mesh.linger_quiet_s
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&mesh.ef_decay),
        "`ef_decay` must be between 0 and 1, got {}",
        mesh.ef_decay
    );
    if let Some(bound) = mesh.ef_bound {
        anyhow::ensure!(
            bound.is_finite() && bound >= 0.0,
            "`ef_bound` must be zero or a positive number, got {bound}"
        );
    }
    anyhow::ensure!(
        (0.0..=1.0).contains(&mesh.quorum),
        "`quorum` must be between 0 and 1, got {}",
        mesh.quorum
    );
    positive_seconds("collect_timeout_s", mesh.collect_timeout_s)?;
    positive_seconds("min_collect_timeout_s", mesh.min_collect_timeout_s)?;
    positive_seconds("max_collect_timeout_s", mesh.max_collect_timeout_s)?;
    anyhow::ensure!(
        mesh.min_collect_timeout_s <= mesh.max_collect_timeout_s,
        "`min_collect_timeout_s` ({}) is above `max_collect_timeout_s` ({})",
        mesh.min_collect_timeout_s,
        mesh.max_collect_timeout_s
    );
    mesh.outer.validate()?;
    if let Some(norm) = mesh.max_delta_norm {
        anyhow::ensure!(
            norm.is_finite() && norm > 0.0,
            "`max_delta_norm` must be a positive number, got {norm}"
        );
    }
    positive_seconds("request_timeout_s", mesh.request_timeout_s)?;
    mesh.codec
        .parse::<CodecParams>()
        .with_context(|| format!("invalid codec `{}`", mesh.codec))?;
    mesh.topology.parse::<Topology>()?;
    MeshId::new(&mesh.mesh)?;
    let mut train = file.train;
    if let Some(rounds) = mesh.rounds {
        // The learning-rate schedule spans the whole run.
        train.steps = (rounds as usize * mesh.local_steps).max(1);
    }
    if let Some(v) = args.precision {
        train.precision = v;
    }
    train.resolve_precision(args.device);
    train.validate()?;
    Ok((mesh, train))
}

pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let summary = runtime.block_on(run_async(args))?;
    println!(
        "stopped at round {}; model {}{}",
        summary.final_round,
        summary.model_hash,
        summary
            .adopted_final_state
            .map(|peer| format!(" (the mesh's final state, adopted from {peer})"))
            .unwrap_or_default()
    );
    Ok(())
}

async fn run_async(args: NodeArgs) -> anyhow::Result<RunSummary> {
    let (settings, train_config) = resolve(&args)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let keypair = load_identity(&args)?;
    let (transport_config, listen) = transport_settings(&args)?;
    let trainer = start_trainer(&args, &train_config)?;
    let topology: Topology = settings.topology.parse()?;
    let transport = transport::network_transport(&keypair, &transport_config)?;
    let node = Node::spawn(NodeConfig {
        keypair,
        transport,
        network: network_config(&args, &settings, listen, topology)?,
        coordinator: coordinator_config(&args, &settings, topology)?,
        trainer,
        max_state_uploads: Some(settings.max_state_uploads),
        shutdown: CancellationToken::new(),
    })?;
    if let Some(addr) = args.metrics {
        let server = MetricsServer::bind(addr, Arc::clone(&node.registry)).await?;
        tracing::info!(addr = %format!("http://{}/metrics", server.local_addr()), "serving metrics");
        tokio::spawn(server.serve(node.shutdown.child_token()));
    }
    let shutdown = node.shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("interrupted: stopping after the current step");
            shutdown.cancel();
        }
    });
    if let Some(path) = args.deny_file.clone() {
        let (client, shutdown) = (node.client.clone(), node.shutdown.child_token());
        tokio::spawn(watch_deny_file(path, client, shutdown));
    }
    Ok(node.join().await?)
}

/// The node's key pair from `--key-file` (default `OUT/node.key`), created on first use.
fn load_identity(args: &NodeArgs) -> anyhow::Result<Keypair> {
    let key_file = args
        .key_file
        .clone()
        .unwrap_or_else(|| args.out.join("node.key"));
    let (keypair, origin) = identity::load_or_create(&key_file)?;
    tracing::info!(
        peer = %keypair.public().to_peer_id(),
        path = %key_file.display(),
        created = origin == KeyOrigin::Created,
        "identity"
    );
    Ok(keypair)
}

/// The transport (private key, QUIC, link shaping) and the addresses to listen on.
fn transport_settings(args: &NodeArgs) -> anyhow::Result<(TransportConfig, Vec<Multiaddr>)> {
    let psk = args
        .psk_file
        .as_deref()
        .map(transport::load_psk)
        .transpose()?;
    anyhow::ensure!(
        !(psk.is_some() && (args.relay_client || !args.relay.is_empty())),
        "--relay-client cannot be combined with --psk-file: relayed connections would bypass the key"
    );
    let link = match &args.link {
        Some(text) => text
            .parse::<LinkProfile>()
            .with_context(|| format!("invalid --link `{text}`"))?,
        None => LinkProfile::UNLIMITED,
    };
    if !link.is_unlimited() {
        tracing::info!(link = %link, "shaping every TCP connection (QUIC is off)");
    }
    let transport_config = TransportConfig {
        psk,
        quic: !args.no_quic,
        link,
        ..TransportConfig::default()
    };
    let mut listen = if args.listen.is_empty() {
        let mut defaults: Vec<Multiaddr> = vec!["/ip4/0.0.0.0/tcp/0".parse()?];
        if transport_config.quic_enabled() {
            defaults.push("/ip4/0.0.0.0/udp/0/quic-v1".parse()?);
        }
        defaults
    } else {
        args.listen.clone()
    };
    if !transport_config.quic_enabled() {
        listen.retain(|addr| {
            let keep = !is_quic(addr);
            if !keep {
                tracing::warn!(addr = %addr, "skipping QUIC listen address (QUIC is off)");
            }
            keep
        });
        anyhow::ensure!(!listen.is_empty(), "no TCP listen address left");
    }
    Ok((transport_config, listen))
}

/// The trainer thread on the chosen device and backend.
fn start_trainer(args: &NodeArgs, config: &TrainConfig) -> anyhow::Result<TrainerHandle> {
    match (args.device, config.activation_checkpointing) {
        (DeviceChoice::Cpu, false) => {
            build_trainer::<meshtune_model::backend::CpuTrain>(Default::default(), args, config)
        }
        (DeviceChoice::Cpu, true) => {
            build_trainer::<meshtune_model::backend::CpuTrainCheckpointed>(
                Default::default(),
                args,
                config,
            )
        }
        #[cfg(feature = "cuda")]
        (DeviceChoice::Cuda(index), false) => build_trainer::<meshtune_model::backend::CudaTrain>(
            burn::backend::cuda::CudaDevice::new(index),
            args,
            config,
        ),
        #[cfg(feature = "cuda")]
        (DeviceChoice::Cuda(index), true) => {
            build_trainer::<meshtune_model::backend::CudaTrainCheckpointed>(
                burn::backend::cuda::CudaDevice::new(index),
                args,
                config,
            )
        }
        #[cfg(not(feature = "cuda"))]
        (DeviceChoice::Cuda(_), _) => anyhow::bail!(
            "this meshtune was built without CUDA: rebuild with `cargo build --release --features cuda`"
        ),
    }
}

/// The network settings: mesh, addresses, bootstrap peers, timeouts, NAT traversal.
fn network_config(
    args: &NodeArgs,
    settings: &MeshSettings,
    listen: Vec<Multiaddr>,
    topology: Topology,
) -> anyhow::Result<NetworkConfig> {
    let mut network_config = NetworkConfig::new(MeshId::new(&settings.mesh)?);
    network_config.listen = listen;
    network_config.bootstrap = args.bootstrap.clone();
    network_config.external = args.external.clone();
    network_config.limits = Limits::default();
    network_config.request_timeout = Duration::from_secs_f64(settings.request_timeout_s);
    network_config.max_requests_per_peer_per_s = settings.max_requests_per_peer_per_s;
    network_config.relay_client = args.relay_client || !args.relay.is_empty();
    network_config.relays = args.relay.clone();
    network_config.peer_table = Some(args.out.join("peers.json"));
    network_config.dcutr = args.dcutr;
    network_config.autonat = args.autonat;
    network_config.mdns = args.mdns;
    network_config.dial_discovered_below = topology.dial_discovered_below();
    Ok(network_config)
}

/// The round settings: codec, aggregation, outer step, deadlines, energy reader.
fn coordinator_config(
    args: &NodeArgs,
    settings: &MeshSettings,
    topology: Topology,
) -> anyhow::Result<CoordinatorConfig> {
    let mut config = CoordinatorConfig::new(&settings.mesh, args.out.clone());
    config.misbehave = args
        .byzantine
        .as_deref()
        .map(str::parse::<Misbehaviour>)
        .transpose()
        .context("invalid --byzantine")?;
    let reader = crate::energy::detect(args.power)?;
    tracing::info!(reader = reader.name(), "power reader");
    config.energy = Some(crate::energy::EnergyMeter::start(
        reader,
        Duration::from_millis(100),
    ));
    config.local_steps = settings.local_steps;
    config.rounds = settings.rounds;
    config.final_exchange = args.final_exchange;
    config.codec = settings.codec.parse()?;
    config.aggregation = settings.aggregation;
    config.outer = settings.outer;
    config.topology = topology;
    anyhow::ensure!(
        !settings.keep_residual || topology == Topology::All,
        "keep_residual works with topology \"all\" only (a gossip node's neighbours keep public \
         copies of its model)"
    );
    config.keep_residual = settings.keep_residual;
    config.ef_decay = settings.ef_decay;
    config.ef_relearn = settings.ef_relearn;
    config.ef_bound = settings.ef_bound;
    anyhow::ensure!(
        !settings.overlap || (topology == Topology::All && !settings.keep_residual),
        "overlap works with topology \"all\" and without keep_residual (a rebase moves the \
         ahead phase onto the mesh's model, which keep_residual replaces with its own)"
    );
    config.overlap = settings.overlap;
    config.round = RoundConfig {
        quorum: settings.quorum,
        min_deltas: settings.min_deltas,
        collect_timeout: Duration::from_secs_f64(settings.collect_timeout_s),
        future_window: settings.future_window,
        adaptive: settings
            .adaptive_deadline
            .then(|| crate::averaging::round::AdaptiveDeadline {
                min: Duration::from_secs_f64(settings.min_collect_timeout_s),
                max: Duration::from_secs_f64(settings.max_collect_timeout_s),
            }),
    };
    config.max_delta_norm = settings.max_delta_norm;
    config.norm_outlier_factor = settings.norm_outlier_factor;
    config.eval_every = if args.eval.is_some() {
        settings.eval_every
    } else {
        0
    };
    config.wait_for_peers = settings.wait_for_peers;
    config.wait_timeout = Duration::from_secs_f64(settings.wait_timeout_s);
    config.linger_quiet = Duration::from_secs_f64(settings.linger_quiet_s);
    config.stream_state_bytes = settings.stream_state_mib.saturating_mul(1 << 20);
    Ok(config)
}

/// Peer ids in a deny file: one per line, blank lines and `#` comments ignored.
pub fn parse_deny_list(text: &str) -> anyhow::Result<HashSet<PeerId>> {
    let mut peers = HashSet::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let peer = line
            .parse::<PeerId>()
            .with_context(|| format!("line {}: `{line}` is not a peer id", number + 1))?;
        peers.insert(peer);
    }
    Ok(peers)
}

/// Re-reads the deny file every second and hands changes to the network. A missing file
/// is an empty list; a malformed one keeps the previous list and says what is wrong.
async fn watch_deny_file(path: PathBuf, client: network::Client, shutdown: CancellationToken) {
    let mut last: Option<HashSet<PeerId>> = None;
    let mut last_error = String::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(err) => {
                let message = format!("cannot read {}: {err}", path.display());
                if message != last_error {
                    tracing::warn!(error = %message, "deny file unreadable; keeping the previous list");
                    last_error = message;
                }
                continue;
            }
        };
        match parse_deny_list(&text) {
            Ok(peers) => {
                last_error.clear();
                if last.as_ref() != Some(&peers) {
                    if client.set_denied(peers.clone()).await.is_err() {
                        return;
                    }
                    last = Some(peers);
                }
            }
            Err(err) => {
                let message = format!("{}: {err:#}", path.display());
                if message != last_error {
                    tracing::warn!(error = %message, "deny file malformed; keeping the previous list");
                    last_error = message;
                }
            }
        }
    }
}

fn build_trainer<B: AutodiffBackend>(
    device: B::Device,
    args: &NodeArgs,
    config: &TrainConfig,
) -> anyhow::Result<TrainerHandle> {
    let (model_config, tokenizer) = model_config_and_tokenizer(
        args.model.as_deref(),
        args.preset.as_deref(),
        args.tokenizer.as_deref(),
    )?;
    let train = load_samsum(&args.train)?;
    let eval = match &args.eval {
        Some(path) => load_samsum(path)?,
        None => Vec::new(),
    };
    let model: T5<B> = initial_model(
        &model_config,
        args.model.as_deref(),
        args.random_init,
        config.seed,
        &device,
    )?;
    let trainer = T5Trainer::new(
        model,
        model_config,
        tokenizer,
        config.clone(),
        args.lora,
        LocalData {
            train: &train,
            eval,
        },
        device,
    )?;
    Ok(TrainerHandle::spawn(
        &args.out.display().to_string(),
        trainer,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_file_errors_name_the_key_and_values_are_checked() {
        let err = toml::from_str::<NodeFile>("[node]\nquorom = 0.5").expect_err("typo");
        assert!(err.to_string().contains("quorom"), "{err}");
        let file: NodeFile = toml::from_str(
            "[node]\nmesh = \"lab\"\nrounds = 3\naggregation = \"trimmed-mean:0.25\"\n\
             outer = { kind = \"nesterov\", lr = 0.7, momentum = 0.9 }\n[train]\nbatch_size = 4",
        )
        .expect("valid");
        assert_eq!(file.node.rounds, Some(3));
        assert_eq!(
            file.node.aggregation,
            Aggregation::TrimmedMean { trim: 0.25 }
        );
        assert_eq!(
            file.node.outer,
            OuterOptimizer::Nesterov {
                lr: 0.7,
                momentum: 0.9
            }
        );
        assert_eq!(file.train.batch_size, 4);
        let err = toml::from_str::<NodeFile>("[node]\naggregation = \"avg\"").expect_err("bad");
        assert!(err.to_string().contains("unknown aggregation"), "{err}");
    }
}
