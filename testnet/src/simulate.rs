//! `meshtune-testnet simulate --nodes N`: N real nodes (the node's round state machine,
//! coordinator, gossipsub, Kademlia and chunk transfer) in one process on libp2p's memory
//! transport, each with a synthetic trainer instead of a model, so that hundreds fit on two
//! cores. Measures, per round: how long the slowest node took, bytes each node sent and
//! received against the payload, the consensus distance of the nodes' parameters, and memory
//! per node.
//!
//! The synthetic trainer: parameters `w` (one tensor of `--params` f32, zeros at the start, the
//! same on every node); a local step moves `w` 10% toward the node's own target (a fixed random
//! vector per node: non-IID data) plus Gaussian noise. Checkpoints are not written: `save`
//! hands the parameters to the simulation's ledger, which is how consensus distance is
//! measured; `restore` finds nothing (a simulated node has no disk).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use libp2p::identity::Keypair;
use meshtune_bootstrap::BootstrapConfig;
use meshtune_net::PeerAddr;
use meshtune_net::transport::memory_transport;
use meshtune_node::averaging::round::RoundConfig;
use meshtune_node::coordinator::{self, CoordinatorConfig, RunSummary, Topology};
use meshtune_node::network::NetworkConfig;
use meshtune_node::trainer::{
    CheckpointWrite, EvalReport, LocalTrainer, Restored, TrainReport, TrainerError, TrainerHandle,
};
use meshtune_node::{Node, NodeConfig};
use meshtune_protocol::{Tensor, TensorSet};
use tokio_util::sync::CancellationToken;

use crate::rng::Rng;

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Nodes in the mesh; several (`10,50,100,200`) run one after another and add
    /// `scale.csv` and plots against N.
    #[arg(long, value_delimiter = ',', default_value = "10")]
    pub nodes: Vec<usize>,
    #[arg(long, default_value_t = 6)]
    pub rounds: u64,
    /// Parameters per node (one f32 tensor).
    #[arg(long, default_value_t = 100_000)]
    pub params: usize,
    /// Delta codec, as `meshtune node --codec`.
    #[arg(long, default_value = meshtune_protocol::DEFAULT_CODEC)]
    pub codec: String,
    /// Standard deviation of the per-step noise (the target vectors have unit scale).
    #[arg(long, default_value_t = 0.01)]
    pub noise: f32,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Fraction of the nodes that leave (without a goodbye) after each round, replaced by as
    /// many fresh nodes that must sync the mesh's state (0: no churn).
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
    /// `all` (every node combines every delta: one model) or `gossip:K[:STEP]` (each node
    /// mixes with at most K gossip-mesh neighbours through per-link copies of their models).
    #[arg(long, default_value = "all")]
    pub topology: String,
    /// Train only in the first this many rounds (0: every round); the rounds after are pure
    /// averaging, where the consensus distance's decay rate is the topology's own.
    #[arg(long, default_value_t = 0)]
    pub train_rounds: u64,
    /// Connections per node (the node's `max_connections`): a sparse overlay needs few, and
    /// hundreds of nodes in one process each connected to all others spend the two cores on
    /// keep-alive traffic. All-to-all averaging pulls from every node: keep it above N.
    #[arg(long, default_value_t = 256)]
    pub max_connections: u32,
    /// How long a round waits for missing deltas (for neighbours under gossip). Hundreds of
    /// nodes on two cores take longer than the default per round; a neighbour given up on
    /// catches the copy up with its next q.
    #[arg(long, default_value_t = 30.0)]
    pub collect_timeout_s: f64,
    /// Only rewrite `scale.csv` and the plots against N from an earlier sweep's directory.
    #[arg(long)]
    pub replot: Option<PathBuf>,
    /// Where the per-round CSV and the summary go.
    #[arg(long, default_value = "simulation")]
    pub out: PathBuf,
}

/// Per-round sums of the nodes' parameters, filled by the synthetic trainers' `save`.
#[derive(Debug, Default)]
struct Ledger {
    rounds: BTreeMap<u64, (Vec<f64>, f64, usize)>,
}

impl Ledger {
    fn record(&mut self, round: u64, values: &[f32]) {
        let entry = self
            .rounds
            .entry(round)
            .or_insert_with(|| (vec![0.0; values.len()], 0.0, 0));
        let mut sq = 0.0;
        for (sum, &v) in entry.0.iter_mut().zip(values) {
            *sum += f64::from(v);
            sq += f64::from(v) * f64::from(v);
        }
        entry.1 += sq;
        entry.2 += 1;
    }

    /// Relative spread: sqrt(mean_i |w_i - mean|^2) / |mean|.
    fn consensus_distance(&self, round: u64) -> Option<(f64, usize)> {
        let (sum, sq, n) = self.rounds.get(&round)?;
        let n_f = *n as f64;
        let mean_sq: f64 = sum.iter().map(|s| (s / n_f) * (s / n_f)).sum();
        let spread = (sq / n_f - mean_sq).max(0.0).sqrt();
        Some((spread / mean_sq.sqrt().max(1e-30), *n))
    }
}

struct SyntheticTrainer {
    w: Vec<f32>,
    /// Train calls so far, and after how many training stops (0: never).
    calls: u64,
    train_rounds: u64,
    target: Vec<f32>,
    noise: f32,
    rng: Rng,
    ledger: Arc<Mutex<Ledger>>,
}

impl SyntheticTrainer {
    fn new(
        params: usize,
        seed: u64,
        noise: f32,
        train_rounds: u64,
        ledger: Arc<Mutex<Ledger>>,
    ) -> Self {
        let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let target = (0..params).map(|_| rng.gaussian()).collect();
        Self {
            w: vec![0.0; params],
            calls: 0,
            train_rounds,
            target,
            noise,
            rng,
            ledger,
        }
    }
}

impl LocalTrainer for SyntheticTrainer {
    fn weights(&mut self) -> Result<TensorSet, TrainerError> {
        Ok(TensorSet::new(vec![Tensor::new(
            "w",
            vec![self.w.len()],
            self.w.clone(),
        )?])?)
    }

    fn set_weights(&mut self, weights: &TensorSet) -> Result<(), TrainerError> {
        let w = weights
            .get("w")
            .filter(|w| w.values.len() == self.w.len())
            .ok_or_else(|| TrainerError::Layout {
                doing: "synthetic weights",
                detail: format!("one tensor `w` of {} values expected", self.w.len()),
            })?;
        self.w.copy_from_slice(&w.values);
        Ok(())
    }

    fn train(&mut self, steps: usize) -> Result<TrainReport, TrainerError> {
        let started = Instant::now();
        self.calls += 1;
        let steps = if self.train_rounds > 0 && self.calls > self.train_rounds {
            0
        } else {
            steps
        };
        for _ in 0..steps {
            for (w, t) in self.w.iter_mut().zip(&self.target) {
                *w += 0.1 * (t - *w) + self.noise * self.rng.gaussian();
            }
        }
        let loss = self
            .w
            .iter()
            .zip(&self.target)
            .map(|(w, t)| f64::from((w - t) * (w - t)))
            .sum::<f64>()
            / self.w.len().max(1) as f64;
        Ok(TrainReport {
            steps,
            samples: steps as u64,
            loss,
            seconds: started.elapsed().as_secs_f64(),
            tokens: 0,
            energy_j: None,
        })
    }

    fn evaluate(&mut self) -> Result<EvalReport, TrainerError> {
        Ok(EvalReport {
            loss: 0.0,
            rouge_l: 0.0,
            seconds: 0.0,
            energy_j: None,
        })
    }

    fn save(
        &mut self,
        root: &Path,
        index: usize,
        _state: serde_json::Value,
        _extras: Vec<meshtune_model::checkpoint::HostParam>,
    ) -> Result<CheckpointWrite, TrainerError> {
        // `index` is the next round: these are the parameters after round index - 1.
        self.ledger
            .lock()
            .map_err(|_| TrainerError::Poisoned("the simulation's ledger"))?
            .record(index.saturating_sub(1) as u64, &self.w);
        let root = root.to_path_buf();
        Ok(Box::new(move || Ok(root)))
    }

    fn restore(&mut self, _root: &Path) -> Result<Option<Restored>, TrainerError> {
        Ok(None)
    }
}

type NodeTask = tokio::task::JoinHandle<Result<RunSummary, coordinator::RunError>>;

/// What every node of one simulated mesh shares.
struct SimMesh<'a> {
    args: &'a SimulateArgs,
    /// Mesh size (the nodes wait for min(n - 1, 24) peers before round 0).
    n: usize,
    /// Offset of this mesh's memory-transport addresses.
    ports: u64,
    mesh: String,
    bootstrap: PeerAddr,
    ledger: Arc<Mutex<Ledger>>,
    dir: PathBuf,
}

impl SimMesh<'_> {
    /// Starts node `i` (fresh identity, zero parameters); cancelling `shutdown` takes it down
    /// (as a crash would: no goodbye).
    async fn spawn_node(&self, i: usize, shutdown: CancellationToken) -> anyhow::Result<NodeTask> {
        let SimMesh {
            args,
            n,
            ports,
            mesh,
            bootstrap,
            ledger,
            dir,
        } = self;
        let (args, n, ports, mesh) = (*args, *n, *ports, mesh.as_str());
        let keypair = Keypair::generate_ed25519();
        let trainer = TrainerHandle::spawn(
            &format!("sim-{i}"),
            SyntheticTrainer::new(
                args.params,
                args.seed.wrapping_add(i as u64),
                args.noise,
                args.train_rounds,
                Arc::clone(ledger),
            ),
        )?;
        let topology: Topology = args.topology.parse()?;
        let mut net = NetworkConfig::new(mesh.parse()?);
        net.listen = vec![format!("/memory/{}", ports + 100 + i as u64).parse()?];
        net.bootstrap = vec![bootstrap.clone()];
        net.dial_discovered_below = topology.dial_discovered_below();
        if matches!(topology, Topology::All) {
            // Every node must find every other one quickly (gossip: a few links suffice, the
            // node's default walk of 30 s).
            net.random_walk_interval = Duration::from_secs(5);
        }
        net.request_timeout = Duration::from_secs(60);
        net.max_requests_per_peer_per_s = 10_000;
        net.max_connections = args.max_connections;
        let mut config = CoordinatorConfig::new(mesh, dir.join(format!("node{i}")));
        config.local_steps = 1;
        config.rounds = Some(args.rounds);
        config.final_exchange = false;
        config.codec = args.codec.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
        config.eval_every = 0;
        config.topology = topology;
        config.round = RoundConfig {
            quorum: 1.0,
            min_deltas: 1,
            collect_timeout: Duration::from_secs_f64(args.collect_timeout_s),
            future_window: 1,
            adaptive: Some(Default::default()),
        };
        // All-to-all: start rounds once most of the mesh is connected (a node asks peers that
        // connect later for their current manifest, but every pull waits on the connection).
        // Gossip: once there are enough links to choose neighbours from.
        config.wait_for_peers = match topology {
            Topology::All => (n - 1).min(24),
            Topology::Gossip { degree, .. } => (n - 1).min(2 * degree),
        };
        config.wait_timeout = Duration::from_secs(60);
        config.linger_quiet = Duration::from_secs(2);
        let node = Node::spawn(NodeConfig {
            transport: memory_transport(&keypair, None)?,
            keypair,
            network: net,
            coordinator: config,
            trainer,
            max_state_uploads: None,
            shutdown,
        })?;
        Ok(node.rounds)
    }
}

fn status_kib(field: &str) -> Option<u64> {
    coordinator::process_memory(field).map(|b| b / 1024)
}

/// One row of the per-round table.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SimRound {
    pub round: u64,
    pub nodes: usize,
    /// The slowest node's round time: until it had every delta it used and applied the round.
    pub slowest_s: f64,
    /// Median bytes a node sent on the wire in the round, and that over its own delta.
    pub sent_bytes: u64,
    pub sent_over_own_delta: f64,
    /// Median bytes received over the delta payload the node needed (gossip amplification).
    pub received_over_payload: f64,
    pub delta_bytes: u64,
    pub deltas_used_min: usize,
    /// Median connected mesh peers per node at the end of the round (what the dial policy
    /// keeps: every other node under all-to-all, a few times K under gossip).
    #[serde(default)]
    pub links: f64,
    pub consensus_distance: Option<f64>,
    /// Median bytes received by application protocol over the payload needed, for the
    /// protocols in [`PROTOCOLS`] and `other` for the rest (what `received_over_payload` is
    /// made of).
    #[serde(default)]
    pub received_by_protocol: BTreeMap<String, f64>,
}

/// The protocols [`SimRound::received_by_protocol`] reports one by one.
pub const PROTOCOLS: [&str; 6] = ["blobs", "kad", "identify", "ping", "gossipsub", "other"];

/// A node's received bytes of the round by [`PROTOCOLS`] (everything else under `other`).
fn by_protocol(received: &BTreeMap<String, u64>) -> BTreeMap<&'static str, u64> {
    let mut out: BTreeMap<&'static str, u64> = PROTOCOLS.iter().map(|p| (*p, 0)).collect();
    for (protocol, bytes) in received {
        let key = PROTOCOLS
            .iter()
            .find(|p| *p == protocol)
            .copied()
            .unwrap_or("other");
        *out.entry(key).or_default() += bytes;
    }
    out
}

pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.replot {
        return replot(dir);
    }
    anyhow::ensure!(
        !args.nodes.is_empty() && args.nodes.iter().all(|&n| n >= 2),
        "--nodes must be at least 2 (each of them), got {:?}",
        args.nodes
    );
    anyhow::ensure!(
        args.rounds >= 1 && args.params >= 1,
        "--rounds and --params must be at least 1"
    );
    anyhow::ensure!(
        args.collect_timeout_s.is_finite() && args.collect_timeout_s > 0.0,
        "--collect-timeout-s must be a positive number of seconds, got {}",
        args.collect_timeout_s
    );
    anyhow::ensure!(
        (0.0..1.0).contains(&args.churn),
        "--churn must be in [0, 1), got {}",
        args.churn
    );
    args.codec
        .parse::<meshtune_protocol::CodecParams>()
        .with_context(|| format!("invalid codec `{}`", args.codec))?;
    args.topology
        .parse::<meshtune_node::coordinator::Topology>()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut summaries = Vec::new();
    for (k, &n) in args.nodes.iter().enumerate() {
        let out = if args.nodes.len() == 1 {
            args.out.clone()
        } else {
            args.out.join(format!("n{n}"))
        };
        // Each size's peak memory is its own (Linux: reset the high-water mark).
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let ports = k as u64 * 1_000_000;
        summaries.push(runtime.block_on(simulate(&args, n, ports, &out))?);
    }
    if summaries.len() > 1 {
        write_scale(&args.out, &summaries)?;
    }
    Ok(())
}

/// `simulate --replot DIR`: `scale.csv` and the plots against N again, from the `n*/summary.json`
/// files of an earlier sweep.
pub fn replot(dir: &Path) -> anyhow::Result<()> {
    let mut summaries: Vec<SimSummary> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path().join("summary.json");
        if path.is_file() {
            let text = std::fs::read_to_string(&path)?;
            summaries.push(
                serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", path.display()))?,
            );
        }
    }
    anyhow::ensure!(
        !summaries.is_empty(),
        "no n*/summary.json under {}",
        dir.display()
    );
    summaries.sort_by_key(|s| s.nodes);
    write_scale(dir, &summaries)
}

/// One mesh size's results.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SimSummary {
    pub nodes: usize,
    /// Factor by which the consensus distance shrinks per round (fit), where it is positive.
    pub consensus_rate: Option<f64>,
    pub wall_s: f64,
    pub memory_per_node_mib: f64,
    pub peak_rss_mib: u64,
    pub per_round: Vec<SimRound>,
}

impl SimSummary {
    /// Median over the second half of the rounds: the first ones include connecting (Kademlia
    /// walks, identify, subscriptions), which takes longer the larger the mesh.
    fn steady(&self, value: impl Fn(&SimRound) -> f64) -> f64 {
        let half = self.per_round.len() as u64 / 2;
        let mut v: Vec<f64> = self
            .per_round
            .iter()
            .filter(|r| r.round >= half)
            .map(value)
            .filter(|x| x.is_finite())
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

/// Per-round factor of the consensus distance: exp of the least-squares slope of its log over
/// the rounds after `train_rounds` (or after round 0), counting rounds with a distance above
/// f32 rounding; `None` with fewer than two such rounds.
pub fn decay_rate(rows: &[SimRound], train_rounds: u64) -> Option<f64> {
    let first = train_rounds.max(1).saturating_sub(1);
    let points: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r.round >= first)
        .filter_map(|r| {
            r.consensus_distance
                .filter(|d| *d > 1e-6)
                .map(|d| (r.round as f64, d.ln()))
        })
        .collect();
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| (sxy / sxx).exp())
}

/// `scale.csv` and the plots against N of a sweep over mesh sizes.
fn write_scale(out: &Path, summaries: &[SimSummary]) -> anyhow::Result<()> {
    use meshtune_node::plot::{Series, line_chart_svg};
    let mut csv = String::from(
        "nodes,round0_slowest_s,slowest_s,sent_over_own_delta,received_over_payload,sent_bytes,delta_bytes,consensus_round1,consensus_last,consensus_rate,memory_per_node_mib,peak_rss_per_node_mib,wall_s\n",
    );
    println!(
        "\n{:>6} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>12}",
        "N", "round0 s", "round s", "sent/own", "recv/need", "consensus@1", "MiB/node", "peak/node"
    );
    let consensus = |s: &SimSummary, round: Option<u64>| -> f64 {
        let row = match round {
            Some(r) => s.per_round.iter().find(|x| x.round == r),
            None => s.per_round.last(),
        };
        row.and_then(|r| r.consensus_distance).unwrap_or(f64::NAN)
    };
    for s in summaries {
        let round0 = s.per_round.first().map_or(f64::NAN, |r| r.slowest_s);
        let row = (
            s.steady(|r| r.slowest_s),
            s.steady(|r| r.sent_over_own_delta),
            s.steady(|r| r.received_over_payload),
            s.steady(|r| r.sent_bytes as f64),
            s.steady(|r| r.delta_bytes as f64),
        );
        let peak_per_node = s.peak_rss_mib as f64 / s.nodes as f64;
        csv.push_str(&format!(
            "{},{round0:.3},{:.3},{:.2},{:.3},{:.0},{:.0},{:e},{:e},{},{:.2},{:.2},{:.1}\n",
            s.nodes,
            row.0,
            row.1,
            row.2,
            row.3,
            row.4,
            consensus(s, Some(1)),
            consensus(s, None),
            s.consensus_rate
                .map_or(String::new(), |r| format!("{r:.4}")),
            s.memory_per_node_mib,
            peak_per_node,
            s.wall_s
        ));
        println!(
            "{:>6} {:>10.2} {:>10.2} {:>10.1} {:>10.2} {:>12.2e} {:>12.1} {:>12.1}",
            s.nodes,
            round0,
            row.0,
            row.1,
            row.2,
            consensus(s, Some(1)),
            s.memory_per_node_mib,
            peak_per_node
        );
    }
    std::fs::write(out.join("scale.csv"), csv)?;
    let points = |f: &dyn Fn(&SimSummary) -> f64| -> Vec<(f64, f64)> {
        summaries.iter().map(|s| (s.nodes as f64, f(s))).collect()
    };
    let charts = [
        (
            "round_time",
            "Round time of the slowest node",
            "seconds",
            vec![
                Series::new(
                    "round 0 (connecting)",
                    points(&|s| s.per_round.first().map_or(f64::NAN, |r| r.slowest_s)),
                ),
                Series::new(
                    "later rounds (median)",
                    points(&|s| s.steady(|r| r.slowest_s)),
                ),
            ],
        ),
        (
            "bytes",
            "Bytes per node per round over the payload",
            "ratio",
            vec![
                Series::new(
                    "sent / own delta",
                    points(&|s| s.steady(|r| r.sent_over_own_delta)),
                ),
                Series::new(
                    "received / deltas needed",
                    points(&|s| s.steady(|r| r.received_over_payload)),
                ),
            ],
        ),
        (
            "consensus",
            "Consensus distance (relative spread)",
            "distance",
            vec![
                Series::new("after round 0", points(&|s| consensus(s, Some(0)))),
                Series::new("after round 1", points(&|s| consensus(s, Some(1)))),
                Series::new("after the last round", points(&|s| consensus(s, None))),
            ],
        ),
        (
            "memory",
            "Memory per node",
            "MiB",
            vec![
                Series::new("after start", points(&|s| s.memory_per_node_mib)),
                Series::new("peak", points(&|s| s.peak_rss_mib as f64 / s.nodes as f64)),
            ],
        ),
    ];
    for (name, title, y, series) in charts {
        let svg = line_chart_svg(title, "nodes (N)", y, &series);
        std::fs::write(out.join(format!("{name}.svg")), &svg)?;
        crate::png::write_png(&svg, &out.join(format!("{name}.png")))?;
    }
    println!(
        "wrote {} and plots against N",
        out.join("scale.csv").display()
    );
    Ok(())
}

/// One mesh size; `ports` offsets its memory-transport addresses from earlier sizes'.
async fn simulate(
    args: &SimulateArgs,
    n: usize,
    ports: u64,
    out: &Path,
) -> anyhow::Result<SimSummary> {
    let started = Instant::now();
    let rss_start = status_kib("VmRSS:").unwrap_or(0);
    let dir = tempfile::tempdir()?;
    let mesh = format!("sim-{n}");
    let (_bootstrap, bootstrap) = start_bootstrap(&mesh, n, ports).await?;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let sim = SimMesh {
        args,
        n,
        ports,
        mesh: mesh.clone(),
        bootstrap,
        ledger: Arc::clone(&ledger),
        dir: dir.path().to_path_buf(),
    };
    let shutdown = CancellationToken::new();
    let mut nodes = SimNodes::default();
    for i in 0..n {
        nodes.spawn(&sim, i, &shutdown).await?;
    }
    let rss_running = status_kib("VmRSS:").unwrap_or(0);
    tracing::info!(nodes = n, rss_mib = rss_running / 1024, "all nodes started");
    let churn_log = if args.churn > 0.0 {
        churn(&sim, &mut nodes, &shutdown).await?
    } else {
        Vec::new()
    };
    let summaries = nodes.finish().await?;
    shutdown.cancel();
    let rss_peak = status_kib("VmHWM:").unwrap_or(0);
    let rows = {
        let ledger = ledger
            .lock()
            .map_err(|_| anyhow::anyhow!("ledger poisoned"))?;
        round_rows(args.rounds, &summaries, &ledger)
    };
    let per_node_mib = (rss_running.saturating_sub(rss_start)) as f64 / 1024.0 / n as f64;
    println!(
        "simulate: {} nodes, {} rounds, {} params, codec {}, topology {}, churn {}  (wall {:.0} s; memory {:.1} MiB per node at start, peak RSS {} MiB)",
        n,
        args.rounds,
        args.params,
        args.codec,
        args.topology,
        args.churn,
        started.elapsed().as_secs_f64(),
        per_node_mib,
        rss_peak / 1024
    );
    let csv = print_rows(&rows);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("rounds.csv"), csv)?;
    let consensus_rate = decay_rate(&rows, args.train_rounds);
    if let Some(rate) = consensus_rate {
        println!(
            "consensus distance decays by {rate:.3}x per round (log-linear fit over the rounds after training stopped, or after round 0)"
        );
    }
    let summary = SimSummary {
        consensus_rate,
        nodes: n,
        wall_s: started.elapsed().as_secs_f64(),
        memory_per_node_mib: per_node_mib,
        peak_rss_mib: rss_peak / 1024,
        per_round: rows,
    };
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "nodes": n, "rounds": args.rounds, "params": args.params, "codec": args.codec,
            "topology": args.topology, "train_rounds": args.train_rounds,
            "consensus_rate": summary.consensus_rate,
            "wall_s": summary.wall_s, "memory_per_node_mib": per_node_mib,
            "peak_rss_mib": rss_peak / 1024, "churn": args.churn, "churn_events": churn_log, "per_round": summary.per_round,
        }))?,
    )?;
    println!("wrote {}", out.join("rounds.csv").display());
    Ok(summary)
}

/// The mesh's discovery node on the memory transport (at `ports + 1`).
async fn start_bootstrap(
    mesh: &str,
    n: usize,
    ports: u64,
) -> anyhow::Result<(meshtune_bootstrap::RunningBootstrap, PeerAddr)> {
    let boot_key = Keypair::generate_ed25519();
    let boot_addr: libp2p::Multiaddr = format!("/memory/{}", ports + 1).parse()?;
    let mut boot_config = BootstrapConfig::new(PathBuf::from("unused"));
    boot_config.listen = vec![boot_addr.clone()];
    boot_config.behaviour.mesh = mesh.parse()?;
    boot_config.behaviour.max_connections = (n * 4) as u32 + 64;
    let boot_peer = boot_key.public().to_peer_id();
    let transport = memory_transport(&boot_key, None)?;
    let running = meshtune_bootstrap::start_with_transport(&boot_config, boot_key, transport)
        .await
        .context("starting the bootstrap node")?;
    Ok((running, PeerAddr::new(boot_peer, boot_addr)))
}

/// The simulated nodes, those that left included.
#[derive(Default)]
struct SimNodes {
    tasks: Vec<(NodeTask, CancellationToken)>,
    left: Vec<bool>,
}

impl SimNodes {
    async fn spawn(
        &mut self,
        sim: &SimMesh<'_>,
        index: usize,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let token = shutdown.child_token();
        let task = sim.spawn_node(index, token.clone()).await?;
        self.tasks.push((task, token));
        self.left.push(false);
        Ok(())
    }

    fn live(&self) -> Vec<usize> {
        (0..self.tasks.len()).filter(|&j| !self.left[j]).collect()
    }

    /// The summaries of the nodes that stayed to the end.
    async fn finish(self) -> anyhow::Result<Vec<RunSummary>> {
        let mut summaries = Vec::new();
        for (i, (handle, _)) in self.tasks.into_iter().enumerate() {
            let summary = tokio::time::timeout(Duration::from_secs(3_600), handle)
                .await
                .with_context(|| format!("node {i} did not finish within an hour"))?
                .with_context(|| format!("node {i} panicked"))?
                .with_context(|| format!("node {i} failed"))?;
            if !self.left[i] {
                summaries.push(summary);
            }
        }
        Ok(summaries)
    }
}

/// After each round but the last two, `--churn` of the nodes leave (cancelled, no goodbye)
/// and as many fresh ones join (new identities, zero parameters: they must sync). Returns the
/// churn events.
async fn churn(
    sim: &SimMesh<'_>,
    nodes: &mut SimNodes,
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<String>> {
    let (args, n) = (sim.args, sim.n);
    let k = ((args.churn * n as f64).round() as usize).max(1);
    let mut rng = Rng::new(args.seed ^ 0x00C0_FFEE);
    let mut next_index = n;
    let mut churn_log = Vec::new();
    for round in 0..args.rounds.saturating_sub(2) {
        // Until most live nodes applied `round`.
        loop {
            let applied = sim
                .ledger
                .lock()
                .map_err(|_| anyhow::anyhow!("the simulation's ledger is poisoned"))?
                .rounds
                .get(&round)
                .map_or(0, |e| e.2);
            let live = nodes.live().len();
            if applied * 2 >= live || nodes.tasks.iter().all(|(t, _)| t.is_finished()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let live = nodes.live();
        let mut leaving = Vec::new();
        while leaving.len() < k.min(live.len().saturating_sub(1)) {
            let j = live[(rng.gaussian().abs() * 1e6) as usize % live.len()];
            if !leaving.contains(&j) {
                leaving.push(j);
            }
        }
        for &j in &leaving {
            nodes.tasks[j].1.cancel();
            nodes.left[j] = true;
        }
        for _ in 0..leaving.len() {
            nodes.spawn(sim, next_index, shutdown).await?;
            next_index += 1;
        }
        churn_log.push(format!(
            "after round {round}: {} left, {} joined",
            leaving.len(),
            leaving.len()
        ));
        tracing::info!(round, left = leaving.len(), joined = leaving.len(), "churn");
    }
    Ok(churn_log)
}

/// One row per round from every finishing node's records.
fn round_rows(rounds: u64, summaries: &[RunSummary], ledger: &Ledger) -> Vec<SimRound> {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut rows = Vec::new();
    for round in 0..rounds {
        let records: Vec<_> = summaries
            .iter()
            .filter_map(|s| s.rounds.iter().find(|r| r.round == round))
            .collect();
        if records.is_empty() {
            continue;
        }
        let sent = median(records.iter().map(|r| r.wire_out as f64).collect());
        let delta = median(records.iter().map(|r| r.delta_bytes as f64).collect());
        rows.push(SimRound {
            round,
            nodes: records.len(),
            slowest_s: records.iter().map(|r| r.seconds_total).fold(0.0, f64::max),
            sent_bytes: sent as u64,
            sent_over_own_delta: sent / delta.max(1.0),
            received_over_payload: median(
                records
                    .iter()
                    .map(|r| r.amplification.unwrap_or(f64::NAN))
                    .collect(),
            ),
            delta_bytes: delta as u64,
            deltas_used_min: records.iter().map(|r| r.deltas).min().unwrap_or(0),
            links: median(records.iter().map(|r| r.mesh_peers as f64).collect()),
            consensus_distance: ledger.consensus_distance(round).map(|c| c.0),
            received_by_protocol: PROTOCOLS
                .iter()
                .map(|p| {
                    let ratios = records
                        .iter()
                        .filter(|r| r.payload_in > 0)
                        .map(|r| {
                            by_protocol(&r.wire_in_by_protocol)[p] as f64 / r.payload_in as f64
                        })
                        .collect::<Vec<_>>();
                    let value = if ratios.is_empty() {
                        f64::NAN
                    } else {
                        median(ratios)
                    };
                    (p.to_string(), value)
                })
                .collect(),
        });
    }
    rows
}

/// Prints the per-round table and returns it as `rounds.csv`.
fn print_rows(rows: &[SimRound]) -> String {
    let mut csv = String::from(
        "round,nodes,slowest_s,sent_bytes,sent_over_own_delta,received_over_payload,delta_bytes,deltas_used_min,links,consensus_distance",
    );
    for p in PROTOCOLS {
        csv.push_str(&format!(",received_{p}_over_payload"));
    }
    csv.push('\n');
    println!(
        "{:>5} {:>6} {:>10} {:>12} {:>10} {:>10} {:>10} {:>7} {:>6} {:>12}",
        "round",
        "nodes",
        "slowest s",
        "sent B",
        "sent/own",
        "recv/need",
        "delta B",
        "deltas",
        "links",
        "consensus"
    );
    let received_parts = |r: &SimRound| {
        PROTOCOLS
            .iter()
            .map(|p| {
                format!(
                    "{p} {:.2}",
                    r.received_by_protocol.get(*p).copied().unwrap_or(f64::NAN)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    for r in rows {
        println!(
            "{:>5} {:>6} {:>10.2} {:>12} {:>10.1} {:>10.2} {:>10} {:>7} {:>6.0} {:>12}",
            r.round,
            r.nodes,
            r.slowest_s,
            r.sent_bytes,
            r.sent_over_own_delta,
            r.received_over_payload,
            r.delta_bytes,
            r.deltas_used_min,
            r.links,
            r.consensus_distance
                .map_or("n/a".into(), |c| format!("{c:.2e}"))
        );
        println!("      received / needed by protocol: {}", received_parts(r));
        csv.push_str(&format!(
            "{},{},{:.4},{},{:.3},{:.3},{},{},{},{}\n",
            r.round,
            r.nodes,
            r.slowest_s,
            r.sent_bytes,
            r.sent_over_own_delta,
            r.received_over_payload,
            r.delta_bytes,
            r.deltas_used_min,
            r.links,
            r.consensus_distance
                .map_or(String::new(), |c| format!("{c:e}"))
        ));
        csv.pop();
        for p in PROTOCOLS {
            let v = r.received_by_protocol.get(p).copied().unwrap_or(f64::NAN);
            csv.push_str(&if v.is_finite() {
                format!(",{v:.3}")
            } else {
                ",".into()
            });
        }
        csv.push('\n');
    }
    csv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consensus_distance_is_the_relative_spread() {
        let mut ledger = Ledger::default();
        ledger.record(0, &[1.0, 1.0]);
        ledger.record(0, &[1.0, 1.0]);
        assert_eq!(ledger.consensus_distance(0), Some((0.0, 2)));
        ledger.record(1, &[2.0, 0.0]);
        ledger.record(1, &[0.0, 2.0]);
        // mean (1, 1), each node sqrt(2) away: sqrt(2) / sqrt(2) = 1.
        let (d, n) = ledger.consensus_distance(1).expect("round 1");
        assert_eq!(n, 2);
        assert!((d - 1.0).abs() < 1e-12, "{d}");
        assert_eq!(ledger.consensus_distance(2), None);
    }
}
