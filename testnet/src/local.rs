//! The local testnet: data preparation, the bootstrap and node processes on loopback, the live
//! per-round table, and the baselines (each node alone, centralized on the union, other
//! codecs) trained on the same data with the same compute.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use meshtune_model::split::SplitStrategy;
use meshtune_node::averaging::aggregate::OuterOptimizer;
use meshtune_node::coordinator::RoundRecord;

use crate::docker::DockerMesh;
use crate::netns::Netns;
use crate::report::{self, Baselines, FederatedRun, RunConfig};
use crate::task::{Task, TaskArgs, TaskDefaults};

/// Flags of `meshtune-testnet` (all optional: the defaults are the README's main job).
#[derive(Debug, Clone, Args)]
pub struct TestnetArgs {
    /// Number of training nodes.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Averaging rounds (20 x 8 local steps: enough for the mesh and the centralized baseline
    /// to saturate on the bundled task, under 3 minutes on 2 cores with the comparisons).
    #[arg(long, default_value_t = 20)]
    pub rounds: u64,
    /// Local optimizer steps per round.
    #[arg(long, default_value_t = 8)]
    pub local_steps: usize,
    /// Delta codec of the main run (top-2% of each tensor, int8, zstd, with error feedback:
    /// ~90x fewer bytes than f32 on the default run; see docs/BENCHMARKS.md).
    #[arg(long, default_value = meshtune_protocol::DEFAULT_CODEC)]
    pub codec: String,
    /// mean, median, trimmed-mean[:F].
    #[arg(long, default_value = "mean")]
    pub aggregation: String,
    /// `all` (every node combines every delta: one model) or `gossip:K[:STEP]` (sparse
    /// gossip averaging with K neighbours).
    #[arg(long, default_value = "all")]
    pub topology: String,
    /// Outer step on the averaged delta: average, momentum:LR:M (FedAvgM), nesterov:LR:M
    /// (DiLoCo), adam:LR[:BETA1:BETA2:EPS] (FedAdam), adamw:LR[:BETA1:BETA2:EPS:WD].
    #[arg(long, default_value = "average")]
    pub outer: String,
    /// Also run the mesh with each of these outer optimizers (same codec, seeds and data) and
    /// compare ROUGE-L per round, e.g. `momentum:0.9:0.5,nesterov:0.7:0.9,adam:0.001`.
    #[arg(long, value_delimiter = ',')]
    pub compare_outer: Vec<String>,
    /// The codecs the mesh is also run with for the comparison (`none`: only the baselines
    /// alone and centralized, e.g. for long runs where the codecs' bytes are already known).
    #[arg(long, value_delimiter = ',', default_values_t = ["f32".to_string(), "int8/64+zstd:1".to_string()])]
    pub compare_codecs: Vec<String>,
    /// iid, dirichlet:ALPHA (non-IID by topic) or by-length.
    #[arg(long, default_value = "dirichlet:0.5")]
    pub split: String,
    /// Model: flan-t5-small|base|large|xl with random weights, or `tiny` (the bundled config);
    /// `--model DIR` runs your own.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Fault scenario of the main run: none, kill-node, restart, late-join, partition,
    /// byzantine or slow-link (see README). With a scenario, the same mesh also runs without
    /// it, for comparison (unless --no-compare).
    #[arg(long, default_value = "none")]
    pub scenario: String,
    /// Shape every node's TCP connections: lan, wifi, lte, 5g, slow or settings such as
    /// `rate=10mbit,delay=25ms,loss=0.1%` (`meshtune bench link` checks them).
    #[arg(long)]
    pub link: Option<String>,
    /// Where the processes run: `process` (loopback), `netns` (each in its own network
    /// namespace on a bridge; needs root and iproute2) or `docker` (containers of the
    /// `meshtune:cpu` image from docker/build.sh on a private compose network).
    #[arg(long, default_value = "process")]
    pub mode: String,
    /// Skip the baselines (alone, centralized, other codecs): only the federated run.
    #[arg(long)]
    pub no_compare: bool,
    /// Nodes keep what the codec left out of their delta in their own model (`meshtune node
    /// --keep-residual`).
    #[arg(long)]
    pub keep_residual: bool,
    /// Error feedback with decay on every node (`meshtune node --ef-decay`; 1: plain).
    #[arg(long)]
    pub ef_decay: Option<f32>,
    /// Error feedback without re-learnt progress on every node (`meshtune node --ef-relearn`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub ef_relearn: Option<bool>,
    /// Error-feedback residual bounded by this many times the new delta's norm on every node
    /// (`meshtune node --ef-bound`).
    #[arg(long)]
    pub ef_bound: Option<f32>,
    /// Nodes train the next round while this one is exchanged (`meshtune node --overlap`).
    #[arg(long)]
    pub overlap: bool,
    /// Also run the same mesh with `--overlap` the other way (same seeds, data and link), to
    /// compare utilization, round time, ROUGE-L and bytes side by side (even with
    /// `--no-compare`).
    #[arg(long)]
    pub compare_overlap: bool,
    /// Skip the centralized baseline (it costs twice the mesh's compute): each node alone
    /// and the other codecs still run.
    #[arg(long)]
    pub no_centralized: bool,
    /// Training examples per node (taken from the bundled corpus before splitting; with
    /// `--train`, every example of the file is used).
    #[arg(long, default_value_t = 400)]
    pub examples_per_node: usize,
    /// Held-out examples for ROUGE-L.
    #[arg(long, default_value_t = 24)]
    pub eval_examples: usize,
    /// Evaluate every this many rounds (and always after the last one); 0 picks about ten
    /// evaluations per run.
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 17)]
    pub seed: u64,
    /// Report directory (default: testnet-runs/<unix time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl TestnetArgs {
    /// Rounds between evaluations (`--eval-every`, or about ten per run).
    pub fn eval_rounds(&self) -> u64 {
        if self.eval_every > 0 {
            self.eval_every
        } else {
            self.rounds.div_ceil(10).max(1)
        }
    }
}

/// Internal flags of the `__bootstrap` role.
#[derive(Debug, Clone, Args)]
pub struct BootstrapArgs {
    #[arg(long)]
    pub listen: Vec<meshtune_net::libp2p::Multiaddr>,
    #[arg(long)]
    pub key_file: PathBuf,
    #[arg(long)]
    pub mesh: String,
}

/// Runs the bootstrap node until killed, printing its addresses.
pub fn run_bootstrap(args: BootstrapArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut config = meshtune_bootstrap::BootstrapConfig::new(args.key_file);
        config.listen = args.listen;
        config.behaviour.mesh = args.mesh.parse()?;
        let mut node = meshtune_bootstrap::start(&config).await?;
        while let Some(event) = node.next_event().await {
            if let meshtune_bootstrap::Event::Listening { address } = event {
                println!("{address}");
                std::io::stdout().flush()?;
            }
        }
        anyhow::Ok(())
    })
}

/// A child process killed when dropped (a failed run leaves no strays).
pub(crate) struct Process {
    pub name: String,
    pub child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn self_command(role: &str) -> anyhow::Result<Command> {
    role_command(None, None, role)
}

/// This executable with `role`, inside the bootstrap's (`node: None`) or node `i`'s network
/// namespace when `net` is set.
pub(crate) fn role_command(
    net: Option<&Netns>,
    node: Option<usize>,
    role: &str,
) -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("locating meshtune-testnet")?;
    let mut cmd = match net {
        Some(net) => net.command(node, &exe),
        None => Command::new(exe),
    };
    cmd.arg(role);
    Ok(cmd)
}

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Process,
    Netns,
    Docker,
}

impl Mode {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        match text {
            "process" => Ok(Mode::Process),
            "netns" => Ok(Mode::Netns),
            "docker" => Ok(Mode::Docker),
            other => anyhow::bail!("unknown mode `{other}`: use process, netns or docker"),
        }
    }
}

fn parse_split(text: &str) -> anyhow::Result<SplitStrategy> {
    Ok(match text {
        "iid" => SplitStrategy::Iid,
        "by-length" => SplitStrategy::ByLength,
        other => {
            let alpha = other
                .strip_prefix("dirichlet:")
                .and_then(|a| a.parse::<f64>().ok())
                .with_context(|| {
                    format!("unknown split `{other}`: use iid, dirichlet:ALPHA or by-length")
                })?;
            SplitStrategy::Dirichlet { alpha }
        }
    })
}

/// Files every run shares.
pub(crate) struct Prepared {
    pub data: PathBuf,
    pub shards: Vec<PathBuf>,
    union: PathBuf,
    eval: PathBuf,
    node_toml: PathBuf,
    /// `[train]` settings shared by nodes and baselines.
    train: toml::Table,
    model_args: Vec<String>,
    /// The learning rate and batch size in force (the train config's, else the flags').
    lr: f64,
    batch_size: usize,
    model_label: String,
    data_label: String,
}

/// Checks the flags that do not depend on the task.
fn check_args(args: &TestnetArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.nodes >= 2, "a mesh needs at least 2 nodes");
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    Scenario::parse(&args.scenario)?;
    Mode::parse(&args.mode)?;
    args.topology
        .parse::<meshtune_node::coordinator::Topology>()?;
    if let Some(link) = &args.link {
        link.parse::<meshtune_net::shaping::LinkProfile>()
            .with_context(|| format!("invalid --link `{link}`"))?;
    }
    if let Some(bound) = args.ef_bound {
        anyhow::ensure!(
            bound.is_finite() && bound >= 0.0,
            "--ef-bound must be zero or a positive number, got {bound}"
        );
    }
    if let Some(decay) = args.ef_decay {
        anyhow::ensure!(
            (0.0..=1.0).contains(&decay),
            "--ef-decay must be between 0 and 1, got {decay}"
        );
    }
    anyhow::ensure!(
        !args.keep_residual || args.topology == "all",
        "--keep-residual needs --topology all (a gossip node's neighbours keep public copies of \
         its model)"
    );
    anyhow::ensure!(
        !(args.overlap || args.compare_overlap) || (args.topology == "all" && !args.keep_residual),
        "--overlap needs --topology all and no --keep-residual"
    );
    anyhow::ensure!(
        args.scenario == "none" || args.nodes >= 3,
        "scenario `{}` needs at least 3 nodes",
        args.scenario
    );
    args.outer.parse::<OuterOptimizer>()?;
    for outer in &args.compare_outer {
        outer.parse::<OuterOptimizer>()?;
    }
    for codec in
        std::iter::once(&args.codec).chain(args.compare_codecs.iter().filter(|c| *c != "none"))
    {
        codec
            .parse::<meshtune_protocol::CodecParams>()
            .with_context(|| format!("invalid codec `{codec}`"))?;
    }
    Ok(())
}

/// The bundled task's files (what the soak runs).
pub(crate) fn prepare(args: &TestnetArgs, out: &Path) -> anyhow::Result<Prepared> {
    prepare_task(args, &TaskArgs::default(), out)
}

/// Writes the task's data and `node.toml` under `out`.
pub(crate) fn prepare_task(
    args: &TestnetArgs,
    task: &TaskArgs,
    out: &Path,
) -> anyhow::Result<Prepared> {
    check_args(args)?;
    let data = out.join("data");
    let defaults = TaskDefaults {
        nodes: args.nodes,
        split: parse_split(&args.split)?,
        split_text: args.split.clone(),
        seed: args.seed,
        examples_per_node: args.examples_per_node,
        eval_examples: args.eval_examples,
        batch_size: args.batch_size,
        lr: args.lr,
        preset: args.preset.clone(),
    };
    let prepared = crate::task::prepare(task, &defaults, &data)?;
    let (lr, batch_size) = (prepared.lr(), prepared.batch_size());
    let Task {
        shards,
        union,
        eval,
        model_args,
        train,
        model_label,
        data_label,
    } = prepared;
    let node_toml = out.join("node.toml");
    let mut node = toml::Table::new();
    for (key, value) in [
        ("mesh", toml::Value::String("testnet".into())),
        ("collect_timeout_s", toml::Value::Integer(30)),
        ("wait_timeout_s", toml::Value::Integer(60)),
        (
            "eval_every",
            toml::Value::Integer(args.eval_rounds() as i64),
        ),
    ] {
        node.insert(key.into(), value);
    }
    let mut file = toml::Table::new();
    file.insert("node".into(), toml::Value::Table(node));
    file.insert("train".into(), toml::Value::Table(train.clone()));
    std::fs::write(&node_toml, toml::to_string(&file)?)
        .with_context(|| format!("writing {}", node_toml.display()))?;
    Ok(Prepared {
        data,
        shards,
        union,
        eval,
        node_toml,
        train,
        model_args,
        lr,
        batch_size,
        model_label,
        data_label,
    })
}

pub(crate) fn start_bootstrap(
    out: &Path,
    net: Option<&Netns>,
) -> anyhow::Result<(Process, String)> {
    let ip = net.map_or("127.0.0.1".to_owned(), Netns::bootstrap_ip);
    let mut child = role_command(net, None, "__bootstrap")?
        .args(["--listen", &format!("/ip4/{ip}/tcp/0"), "--mesh", "testnet"])
        .arg("--key-file")
        .arg(out.join("bootstrap.key"))
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(
            out.join("bootstrap.log"),
        )?))
        .spawn()
        .context("starting the bootstrap process")?;
    let stdout = child.stdout.take().context("bootstrap stdout")?;
    let process = Process {
        name: "bootstrap".into(),
        child,
    };
    let mut lines = BufReader::new(stdout).lines();
    let address = lines
        .next()
        .context("the bootstrap process exited before printing its address")??;
    Ok((process, address.trim().to_owned()))
}

pub(crate) fn read_records(path: &Path) -> Vec<RoundRecord> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The fault a run injects (`--scenario`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    None,
    /// SIGKILL the last node once the mesh applied a third of the rounds; the rest finish.
    KillNode,
    /// As kill-node, then start it again: it resumes from its checkpoint and rejoins.
    Restart,
    /// Start the last node only once the others applied a third of the rounds: it syncs the
    /// mesh's state, then trains with it.
    LateJoin,
    /// After a third of the rounds the two halves of the mesh refuse each other (deny
    /// files); after another third the partition heals and the halves must reconverge.
    Partition,
    /// The last node publishes NaN deltas in odd rounds and 100x scaled ones in even rounds.
    Byzantine,
    /// The last node sits on a 1 Mbit/s link with 20 ms delay (link preset `slow`).
    SlowLink,
}

impl Scenario {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(match text {
            "none" => Scenario::None,
            "kill-node" => Scenario::KillNode,
            "restart" => Scenario::Restart,
            "late-join" => Scenario::LateJoin,
            "partition" => Scenario::Partition,
            "byzantine" => Scenario::Byzantine,
            "slow-link" => Scenario::SlowLink,
            other => anyhow::bail!(
                "unknown scenario `{other}`: use none, kill-node, restart, late-join, partition, \
                 byzantine or slow-link"
            ),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::None => "none",
            Scenario::KillNode => "kill-node",
            Scenario::Restart => "restart",
            Scenario::LateJoin => "late-join",
            Scenario::Partition => "partition",
            Scenario::Byzantine => "byzantine",
            Scenario::SlowLink => "slow-link",
        }
    }
}

/// What the scenario did, for the summary.
#[derive(Debug, Clone, Default)]
pub struct FaultLog {
    pub events: Vec<String>,
}

/// A running node: a child process (process and netns modes) or a container.
enum Handle {
    Child(Process),
    Container(String),
}

impl Handle {
    fn name(&self) -> &str {
        match self {
            Handle::Child(p) => &p.name,
            Handle::Container(name) => name,
        }
    }

    /// SIGKILL.
    fn kill(self, docker: Option<&DockerMesh>) -> anyhow::Result<()> {
        match (self, docker) {
            (Handle::Child(mut p), _) => {
                let _ = p.child.kill();
                let _ = p.child.wait();
                Ok(())
            }
            (Handle::Container(name), Some(docker)) => docker.kill(&name),
            (Handle::Container(_), None) => anyhow::bail!("internal: a container without docker"),
        }
    }

    /// `None` while running, else whether it exited successfully (or how it failed).
    fn exit(&mut self, docker: Option<&DockerMesh>) -> anyhow::Result<Option<Result<(), String>>> {
        Ok(match (self, docker) {
            (Handle::Child(p), _) => p.child.try_wait()?.map(|s| {
                if s.success() {
                    Ok(())
                } else {
                    Err(s.to_string())
                }
            }),
            (Handle::Container(name), Some(docker)) => docker.status(name)?.map(|code| {
                if code == 0 {
                    Ok(())
                } else {
                    Err(format!("exit code {code}"))
                }
            }),
            (Handle::Container(_), None) => anyhow::bail!("internal: a container without docker"),
        })
    }
}

struct NodeSlot {
    process: Option<Handle>,
    out: PathBuf,
    /// Killed on purpose and not restarted: its exit is expected.
    killed: bool,
}

/// One federated run of the mesh with `codec`; prints the live table when `live`.
fn run_federated(
    args: &TestnetArgs,
    prepared: &Prepared,
    run: MeshRun<'_>,
) -> anyhow::Result<FederatedRun> {
    std::fs::create_dir_all(run.dir)?;
    let started = Instant::now();
    let mut mesh = FederatedMesh::start(args, prepared, run)?;
    if run.live {
        println!(
            "{:>5} | {:>28} | {:>8} | {:>10} | {:>10} | {:>7} | {:>5} | {:>5} | {:>5} | {:>8}",
            "round",
            "train loss per node",
            "ROUGE-L",
            "sent",
            "received",
            "time",
            "peers",
            "util",
            "G",
            "tok/s/W"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(3600);
    while !mesh.step()? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the testnet did not finish in an hour"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let records = mesh.records();
    if run.live {
        while mesh.printed < args.rounds {
            print_row(mesh.printed, &records);
            mesh.printed += 1;
        }
    }
    Ok(FederatedRun {
        codec: run.codec.to_owned(),
        outer: run.outer.to_owned(),
        overlap: run.overlap,
        records,
        seconds: started.elapsed().as_secs_f64(),
        scenario: run.scenario.name().to_owned(),
        faults: mesh.log.events,
    })
}

/// One mesh run of the testnet: its exchange, where it writes, and what happens to it.
#[derive(Debug, Clone, Copy)]
struct MeshRun<'a> {
    codec: &'a str,
    outer: &'a str,
    /// `--overlap` on every node.
    overlap: bool,
    dir: &'a Path,
    /// Print the live per-round table.
    live: bool,
    scenario: Scenario,
}

/// A federated run in progress. Field order is drop order: the nodes go first, the network
/// namespaces last.
struct FederatedMesh<'a> {
    nodes: Vec<NodeSlot>,
    _bootstrap: Option<Process>,
    docker: Option<DockerMesh>,
    net: Option<Netns>,
    args: &'a TestnetArgs,
    prepared: &'a Prepared,
    run: MeshRun<'a>,
    address: String,
    log: FaultLog,
    /// Rounds the first nodes apply before the scenario's fault.
    trigger: usize,
    fault_done: bool,
    restart_at: Option<Instant>,
    heal_at_round: Option<usize>,
    printed: u64,
}

impl<'a> FederatedMesh<'a> {
    /// Creates the namespaces or containers, starts the bootstrap node and every node that
    /// starts at once.
    fn start(
        args: &'a TestnetArgs,
        prepared: &'a Prepared,
        run: MeshRun<'a>,
    ) -> anyhow::Result<Self> {
        let mode = Mode::parse(&args.mode)?;
        let net = match mode {
            Mode::Netns => Some(Netns::create(args.nodes)?),
            Mode::Process | Mode::Docker => None,
        };
        let docker = match mode {
            Mode::Docker => {
                let root = prepared.data.parent().context("run directory")?;
                Some(DockerMesh::create(root, run.dir)?)
            }
            Mode::Process | Mode::Netns => None,
        };
        let (bootstrap, address) = match &docker {
            Some(docker) => (None, start_docker_bootstrap(docker, run.dir)?),
            None => {
                let (process, address) = start_bootstrap(run.dir, net.as_ref())?;
                (Some(process), address)
            }
        };
        tracing::info!(bootstrap = %address, codec = run.codec, scenario = run.scenario.name(), "starting {} nodes", args.nodes);
        let mut mesh = Self {
            nodes: Vec::new(),
            _bootstrap: bootstrap,
            docker,
            net,
            args,
            prepared,
            run,
            address,
            log: FaultLog::default(),
            trigger: (args.rounds / 3).max(1) as usize,
            fault_done: matches!(
                run.scenario,
                Scenario::None | Scenario::Byzantine | Scenario::SlowLink
            ),
            restart_at: None,
            heal_at_round: None,
            printed: 0,
        };
        let last = args.nodes - 1;
        let late_join = run.scenario == Scenario::LateJoin;
        for i in 0..args.nodes {
            let wait_for = if late_join {
                args.nodes - 2
            } else {
                args.nodes - 1
            };
            let process = if late_join && i == last {
                None
            } else {
                Some(mesh.spawn(i, wait_for)?)
            };
            mesh.nodes.push(NodeSlot {
                process,
                out: run.dir.join(format!("node-{i}")),
                killed: false,
            });
        }
        match run.scenario {
            Scenario::Byzantine => mesh.log.events.push(format!(
                "node-{last} is byzantine from the start: NaN deltas in odd rounds, 100x scaled deltas in even rounds"
            )),
            Scenario::SlowLink => mesh.log.events.push(format!(
                "node-{last} is on the `slow` link (1 Mbit/s each way, 20 ms one-way delay); the others on `{}`",
                args.link.as_deref().unwrap_or("unshaped loopback")
            )),
            _ => {}
        }
        Ok(mesh)
    }

    /// Starts node `i` (a process, a process in its namespace, or a container), waiting for
    /// `wait_for` peers before its first round.
    fn spawn(&self, i: usize, wait_for: usize) -> anyhow::Result<Handle> {
        let (args, run) = (self.args, self.run);
        let ip = match (&self.net, &self.docker) {
            (Some(n), _) => n.node_ip(i),
            (_, Some(d)) => d.node_ip(i),
            _ => "127.0.0.1".to_owned(),
        };
        let launch = NodeLaunch {
            index: i,
            bootstrap: &self.address,
            ip: &ip,
            codec: run.codec,
            outer: run.outer,
            overlap: run.overlap,
            wait_for,
        };
        let mut node_args = node_args(args, self.prepared, run.dir, launch);
        node_args.extend(node_fault_args(args, run.scenario, i, run.dir)?);
        let name = format!("node-{i}");
        if let Some(docker) = &self.docker {
            let mut command = vec!["__node".to_owned()];
            command.extend(node_args);
            docker.start(&name, ip, "/meshtune-testnet", command)?;
            return Ok(Handle::Container(name));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run.dir.join(format!("{name}.log")))?;
        let child = role_command(self.net.as_ref(), Some(i), "__node")?
            .args(&node_args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting node {i}"))?;
        Ok(Handle::Child(Process { name, child }))
    }

    /// Every node's records so far.
    fn records(&self) -> Vec<Vec<RoundRecord>> {
        self.nodes
            .iter()
            .map(|n| read_records(&n.out.join("rounds.jsonl")))
            .collect()
    }

    /// One look at the mesh: the fault when due, the heal or restart when due, finished rounds
    /// printed. True when every node finished and nothing is still to start.
    fn step(&mut self) -> anyhow::Result<bool> {
        let records = self.records();
        let last = self.args.nodes - 1;
        // The fault, once the first nodes applied `trigger` rounds.
        let applied = records[..last].iter().map(Vec::len).min().unwrap_or(0);
        if !self.fault_done && applied >= self.trigger {
            self.inject_fault(&records, applied)?;
            self.fault_done = true;
        }
        self.heal_or_restart(&records)?;
        if self.run.live {
            while self.printed < self.args.rounds && row_ready(&self.nodes, &records, self.printed)
            {
                print_row(self.printed, &records);
                self.printed += 1;
            }
        }
        let running = self.running()?;
        let pending_start = (!self.fault_done && self.run.scenario == Scenario::LateJoin)
            || self.restart_at.is_some();
        Ok(running == 0 && !pending_start && self.fault_done)
    }

    /// The scenario's fault: kill (and later restart) the last node, start the late joiner,
    /// or split the mesh in halves with deny files.
    fn inject_fault(&mut self, records: &[Vec<RoundRecord>], applied: usize) -> anyhow::Result<()> {
        let last = self.args.nodes - 1;
        match self.run.scenario {
            Scenario::KillNode | Scenario::Restart => {
                if let Some(handle) = self.nodes[last].process.take() {
                    handle.kill(self.docker.as_ref())?;
                }
                self.nodes[last].killed = true;
                self.log.events.push(format!(
                    "node-{last} SIGKILLed after the mesh applied {applied} rounds (it had applied {})",
                    records[last].len()
                ));
                if self.run.scenario == Scenario::Restart {
                    self.restart_at = Some(Instant::now() + Duration::from_secs(1));
                }
            }
            Scenario::LateJoin => {
                self.nodes[last].process = Some(self.spawn(last, 1)?);
                self.log.events.push(format!(
                    "node-{last} started after the mesh applied {applied} rounds"
                ));
            }
            Scenario::Partition => {
                let ids: Vec<String> = records
                    .iter()
                    .map(|r| r.first().map(|x| x.peer_id.clone()).unwrap_or_default())
                    .collect();
                let half = self.nodes.len() / 2;
                for (i, slot) in self.nodes.iter().enumerate() {
                    let other: Vec<&str> = ids
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| (*j < half) != (i < half))
                        .map(|(_, id)| id.as_str())
                        .collect();
                    write_deny_file(&slot.out, &other)?;
                }
                self.heal_at_round = Some(applied + self.trigger);
                self.log.events.push(format!(
                    "partitioned after {applied} applied rounds: nodes 0-{} and {half}-{last} refuse each other",
                    half - 1
                ));
            }
            Scenario::None | Scenario::Byzantine | Scenario::SlowLink => {}
        }
        Ok(())
    }

    /// Heals a partition once due, and restarts a killed node once its downtime is over.
    fn heal_or_restart(&mut self, records: &[Vec<RoundRecord>]) -> anyhow::Result<()> {
        let applied_all = records.iter().map(Vec::len).min().unwrap_or(0);
        // The halves run at their own pace: heal once every node applied another third of the
        // run, or once the fastest node has only a third (+1) left, so the mesh always has
        // rounds to reconverge in.
        let fastest = records.iter().map(Vec::len).max().unwrap_or(0);
        let rounds = self.args.rounds;
        let latest_heal = (rounds - rounds / 3).saturating_sub(1).max(1) as usize;
        if let Some(at) = self.heal_at_round
            && (applied_all >= at || fastest >= latest_heal)
        {
            for slot in &self.nodes {
                write_deny_file(&slot.out, &[])?;
            }
            self.log.events.push(format!(
                "partition healed once every node applied {applied_all} rounds (the fastest {fastest})"
            ));
            self.heal_at_round = None;
        }
        if let Some(at) = self.restart_at
            && Instant::now() >= at
        {
            let last = self.args.nodes - 1;
            self.nodes[last].process = Some(self.spawn(last, 1)?);
            self.nodes[last].killed = false;
            self.log.events.push(format!(
                "node-{last} restarted on its checkpoint directory (its last applied round: {})",
                records[last]
                    .last()
                    .map_or("none".into(), |r| r.round.to_string())
            ));
            self.restart_at = None;
        }
        Ok(())
    }

    /// Nodes still running; a node that failed ends the run with its log.
    fn running(&mut self) -> anyhow::Result<usize> {
        let mut running = 0;
        for slot in &mut self.nodes {
            let Some(handle) = slot.process.as_mut() else {
                continue;
            };
            match handle.exit(self.docker.as_ref())? {
                Some(Ok(())) => {}
                Some(Err(status)) => anyhow::bail!(
                    "{} failed ({status}); see {}",
                    handle.name(),
                    self.run
                        .dir
                        .join(format!("{}.log", handle.name()))
                        .display()
                ),
                None => running += 1,
            }
        }
        Ok(running)
    }
}

/// The bootstrap node as a container (docker mode); returns its address.
fn start_docker_bootstrap(docker: &DockerMesh, dir: &Path) -> anyhow::Result<String> {
    let key = dir.join("bootstrap.key");
    let (keypair, _) = meshtune_net::identity::load_or_create(&key)?;
    let ip = docker.bootstrap_ip();
    docker.start(
        "bootstrap",
        ip.clone(),
        "/meshtune-bootstrap",
        vec![
            "--listen".into(),
            format!("/ip4/{ip}/tcp/4001"),
            "--key-file".into(),
            key.display().to_string(),
            "--mesh".into(),
            "testnet".into(),
        ],
    )?;
    Ok(format!(
        "/ip4/{ip}/tcp/4001/p2p/{}",
        keypair.public().to_peer_id()
    ))
}

/// What differs between the nodes of a run.
pub(crate) struct NodeLaunch<'a> {
    pub index: usize,
    pub bootstrap: &'a str,
    pub ip: &'a str,
    pub codec: &'a str,
    pub outer: &'a str,
    pub overlap: bool,
    /// Mesh peers to wait for before the first round.
    pub wait_for: usize,
}

/// The `__node` (`meshtune node`) arguments of one node of a run: its shard, the shared eval
/// set and node.toml, its own output directory `dir/node-I`.
pub(crate) fn node_args(
    args: &TestnetArgs,
    prepared: &Prepared,
    dir: &Path,
    launch: NodeLaunch<'_>,
) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    let i = launch.index;
    let mut node_args: Vec<String> = prepared.model_args.clone();
    node_args.extend([
        "--train".into(),
        path(&prepared.shards[i]),
        "--eval".into(),
        path(&prepared.eval),
        "--out".into(),
        path(&dir.join(format!("node-{i}"))),
        "--config".into(),
        path(&prepared.node_toml),
        "--bootstrap".into(),
        launch.bootstrap.to_owned(),
        "--listen".into(),
        format!("/ip4/{}/tcp/0", launch.ip),
        "--no-quic".into(),
        "--rounds".into(),
        args.rounds.to_string(),
        "--local-steps".into(),
        args.local_steps.to_string(),
        "--codec".into(),
        launch.codec.to_owned(),
        "--aggregation".into(),
        args.aggregation.clone(),
        "--topology".into(),
        args.topology.clone(),
        "--outer".into(),
        launch.outer.to_owned(),
        "--wait-for-peers".into(),
        launch.wait_for.to_string(),
    ]);
    if args.keep_residual {
        node_args.push("--keep-residual".into());
    }
    if launch.overlap {
        node_args.push("--overlap".into());
    }
    if let Some(decay) = args.ef_decay {
        node_args.extend(["--ef-decay".into(), decay.to_string()]);
    }
    if let Some(relearn) = args.ef_relearn {
        node_args.extend(["--ef-relearn".into(), relearn.to_string()]);
    }
    if let Some(bound) = args.ef_bound {
        node_args.push(format!("--ef-bound={bound}"));
    }
    node_args
}

/// Flags that put node `i` into the scenario (its link, deny file, misbehaviour).
fn node_fault_args(
    args: &TestnetArgs,
    scenario: Scenario,
    i: usize,
    dir: &Path,
) -> anyhow::Result<Vec<String>> {
    let last = args.nodes - 1;
    let mut extra = Vec::new();
    let link = if scenario == Scenario::SlowLink && i == last {
        Some("slow")
    } else {
        args.link.as_deref()
    };
    if let Some(link) = link {
        extra.extend(["--link".to_owned(), link.to_owned()]);
    }
    if scenario == Scenario::Partition {
        let out = dir.join(format!("node-{i}"));
        std::fs::create_dir_all(&out)?;
        extra.push("--deny-file".into());
        extra.push(out.join("deny.txt").display().to_string());
    }
    if scenario == Scenario::Byzantine && i == last {
        extra.extend(["--byzantine".to_owned(), "mixed:100".to_owned()]);
    }
    Ok(extra)
}

/// Writes a node's deny file atomically (it re-reads it every second).
fn write_deny_file(node_out: &Path, peers: &[&str]) -> anyhow::Result<()> {
    let path = node_out.join("deny.txt");
    let tmp = node_out.join("deny.txt.tmp");
    let mut text = String::from("# written by meshtune-testnet (partition scenario)\n");
    for peer in peers {
        text.push_str(peer);
        text.push('\n');
    }
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// Round `round` can be printed when every node that is running has applied it or moved past.
fn row_ready(nodes: &[NodeSlot], records: &[Vec<RoundRecord>], round: u64) -> bool {
    nodes.iter().zip(records).all(|(slot, r)| {
        slot.process.is_none() || slot.killed || r.iter().any(|x| x.round >= round)
    })
}

pub(crate) fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn print_row(round: u64, records: &[Vec<RoundRecord>]) {
    let row: Vec<Option<&RoundRecord>> = records
        .iter()
        .map(|r| r.iter().find(|x| x.round == round))
        .collect();
    let present: Vec<&RoundRecord> = row.iter().flatten().copied().collect();
    if present.is_empty() {
        return;
    }
    let losses: Vec<String> = row
        .iter()
        .map(|r| {
            r.and_then(|r| r.train_loss)
                .map_or("-".into(), |l| format!("{l:.2}"))
        })
        .collect();
    let rouge: Vec<f64> = present.iter().filter_map(|r| r.rouge_l).collect();
    let mean_rouge = if rouge.is_empty() {
        "-".into()
    } else {
        format!("{:.3}", rouge.iter().sum::<f64>() / rouge.len() as f64)
    };
    let count = present.len() as u64;
    let sent: u64 = present.iter().map(|r| r.wire_out).sum::<u64>() / count;
    let received: u64 = present.iter().map(|r| r.wire_in).sum::<u64>() / count;
    let time = present.iter().map(|r| r.seconds_total).fold(0.0, f64::max);
    let peers = present.iter().map(|r| r.mesh_peers).min().unwrap_or(0);
    let mean = |values: Vec<f64>, digits: usize| {
        if values.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "{:.digits$}",
                values.iter().sum::<f64>() / values.len() as f64
            )
        }
    };
    let granularity = mean(
        present
            .iter()
            .filter_map(|r| r.energy.granularity)
            .collect(),
        1,
    );
    let utilization = mean(
        present
            .iter()
            .filter_map(|r| r.timing.utilization.map(|u| 100.0 * u))
            .collect(),
        0,
    );
    let efficiency = mean(
        present
            .iter()
            .filter_map(|r| r.energy.tokens_per_s_per_w)
            .collect(),
        1,
    );
    println!(
        "{:>5} | {:>28} | {:>8} | {:>10} | {:>10} | {:>6.1}s | {:>5} | {:>4}% | {:>5} | {:>8}",
        round,
        losses.join(" "),
        mean_rouge,
        human_bytes(sent),
        human_bytes(received),
        time,
        peers,
        utilization,
        granularity,
        efficiency
    );
}

/// `metrics.jsonl` rows of `meshtune train`: (step, ROUGE-L) where evaluated.
fn rouge_curve(path: &Path) -> Vec<(usize, f64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()? as usize, v["rouge_l"].as_f64()?)))
        .collect()
}

fn run_training(
    prepared: &Prepared,
    train: &Path,
    steps: usize,
    eval_every: usize,
    lr: f64,
    out: &Path,
) -> anyhow::Result<Process> {
    let config = out.with_extension("toml");
    let mut table = prepared.train.clone();
    for (key, value) in [
        ("lr", toml::Value::Float(lr)),
        ("eval_every", toml::Value::Integer(eval_every as i64)),
        ("checkpoint_every", toml::Value::Integer(1_000_000)),
        ("keep_checkpoints", toml::Value::Integer(1)),
    ] {
        table.insert(key.into(), value);
    }
    std::fs::write(&config, toml::to_string(&table)?)
        .with_context(|| format!("writing {}", config.display()))?;
    let child = self_command("__train")?
        .args(&prepared.model_args)
        .arg("--train")
        .arg(train)
        .arg("--eval")
        .arg(&prepared.eval)
        .arg("--out")
        .arg(out)
        .arg("--config")
        .arg(&config)
        .args(["--steps", &steps.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(
            out.with_extension("log"),
        )?))
        .spawn()?;
    Ok(Process {
        name: out.display().to_string(),
        child,
    })
}

fn wait_all(processes: &mut [Process]) -> anyhow::Result<()> {
    for process in processes {
        let status = process.child.wait()?;
        anyhow::ensure!(status.success(), "{} failed ({status})", process.name);
    }
    Ok(())
}

/// Each node alone on its shard, and one model on the union, with the same total steps.
fn run_baselines(args: &TestnetArgs, prepared: &Prepared, dir: &Path) -> anyhow::Result<Baselines> {
    std::fs::create_dir_all(dir)?;
    let steps = args.rounds as usize * args.local_steps;
    let started = Instant::now();
    let mut alone = Vec::new();
    for (i, shard) in prepared.shards.iter().enumerate() {
        alone.push(run_training(
            prepared,
            shard,
            steps,
            args.local_steps * args.eval_rounds() as usize,
            prepared.lr,
            &dir.join(format!("alone-{i}")),
        )?);
    }
    wait_all(&mut alone)?;
    // Centralized training is tuned a little, so the comparison is not against a baseline
    // handicapped by the mesh's learning rate: the mesh's lr and a third of it, best kept.
    let central_steps = steps * args.nodes;
    let lrs = if args.no_centralized {
        Vec::new()
    } else {
        vec![prepared.lr, prepared.lr / 3.0]
    };
    let mut central = Vec::new();
    for (k, lr) in lrs.iter().enumerate() {
        central.push(run_training(
            prepared,
            &prepared.union,
            central_steps,
            args.local_steps * args.nodes * args.eval_rounds() as usize,
            *lr,
            &dir.join(format!("centralized-{k}")),
        )?);
    }
    wait_all(&mut central)?;
    let alone_curves: Vec<Vec<(usize, f64)>> = (0..args.nodes)
        .map(|i| rouge_curve(&dir.join(format!("alone-{i}/metrics.jsonl"))))
        .collect();
    let tried: Vec<(f64, Vec<(usize, f64)>)> = lrs
        .iter()
        .enumerate()
        .map(|(k, lr)| {
            (
                *lr,
                rouge_curve(&dir.join(format!("centralized-{k}/metrics.jsonl"))),
            )
        })
        .collect();
    let best = tried.iter().max_by(|a, b| {
        let last = |c: &Vec<(usize, f64)>| c.last().map_or(f64::NEG_INFINITY, |p| p.1);
        last(&a.1).total_cmp(&last(&b.1))
    });
    Ok(Baselines {
        alone: alone_curves,
        centralized: best.map(|b| b.1.clone()).unwrap_or_default(),
        centralized_lr: best.map_or(f64::NAN, |b| b.0),
        centralized_tried: tried
            .iter()
            .map(|(lr, c)| (*lr, c.last().map(|p| p.1)))
            .collect(),
        steps_per_node: steps,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The whole job: federated run with a live table, then (unless `--no-compare`) the baselines
/// and the other codecs, then the report. Returns the report directory.
pub fn run_testnet(args: TestnetArgs, task: TaskArgs) -> anyhow::Result<PathBuf> {
    Ok(run_comparison(args, task)?.report_dir)
}

/// What [`run_comparison`] ran: every federated run (the main one first, then the other
/// codecs and outer optimizers) and the baselines.
pub struct Comparison {
    pub report_dir: PathBuf,
    pub runs: Vec<FederatedRun>,
    pub baselines: Option<Baselines>,
}

/// `testnet-runs/<prefix><unix time>`: where a run goes without `--out`.
pub(crate) fn default_run_dir(prefix: &str) -> PathBuf {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    PathBuf::from(format!("testnet-runs/{prefix}{now}"))
}

/// [`run_testnet`], handing back the runs as well as writing their report.
pub fn run_comparison(args: TestnetArgs, task: TaskArgs) -> anyhow::Result<Comparison> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| crate::local::default_run_dir(""));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // Absolute, so the same paths work inside network namespaces and containers.
    let out = out
        .canonicalize()
        .with_context(|| format!("resolving {}", out.display()))?;
    let prepared = prepare_task(&args, &task, &out)?;
    println!(
        "meshtune testnet: {} nodes, {} rounds x {} local steps, codec {}, model {}, data {}, split {}, files in {}",
        args.nodes,
        args.rounds,
        args.local_steps,
        args.codec,
        prepared.model_label,
        prepared.data_label,
        args.split,
        prepared.data.display()
    );
    let scenario = Scenario::parse(&args.scenario)?;
    let main = run_federated(
        &args,
        &prepared,
        MeshRun {
            codec: &args.codec,
            outer: &args.outer,
            overlap: args.overlap,
            dir: &out.join("federated"),
            live: true,
            scenario,
        },
    )?;
    let mut codecs = vec![main];
    let mut baselines = None;
    let mut clean = None;
    if !args.no_compare && scenario != Scenario::None {
        println!(
            "\ncomparison: the same mesh without the `{}` scenario",
            scenario.name()
        );
        clean = Some(run_federated(
            &args,
            &prepared,
            MeshRun {
                codec: &args.codec,
                outer: &args.outer,
                overlap: args.overlap,
                dir: &out.join("clean"),
                live: false,
                scenario: Scenario::None,
            },
        )?);
    }
    if args.compare_overlap {
        let overlap = !args.overlap;
        println!(
            "\ncomparison: the same mesh with overlap {}",
            if overlap { "on" } else { "off" }
        );
        codecs.push(run_federated(
            &args,
            &prepared,
            MeshRun {
                codec: &args.codec,
                outer: &args.outer,
                overlap,
                dir: &out.join(if overlap { "overlap-on" } else { "overlap-off" }),
                live: false,
                scenario: Scenario::None,
            },
        )?);
    }
    if !args.no_compare {
        for codec in args.compare_codecs.iter().filter(|c| *c != "none") {
            if *codec != args.codec {
                println!("\ncomparison: the same mesh with codec {codec}");
                let dir = out.join(format!(
                    "codec-{}",
                    codec.replace(['/', '%', ':', '+'], "_")
                ));
                codecs.push(run_federated(
                    &args,
                    &prepared,
                    MeshRun {
                        codec,
                        outer: &args.outer,
                        overlap: args.overlap,
                        dir: &dir,
                        live: false,
                        scenario: Scenario::None,
                    },
                )?);
            }
        }
        for (k, outer) in args.compare_outer.iter().enumerate() {
            println!("\ncomparison: the same mesh with outer optimizer {outer}");
            codecs.push(run_federated(
                &args,
                &prepared,
                MeshRun {
                    codec: &args.codec,
                    outer,
                    overlap: args.overlap,
                    dir: &out.join(format!("outer-{k}")),
                    live: false,
                    scenario: Scenario::None,
                },
            )?);
        }
        println!("\ncomparison: each node alone, and centralized on the union (same steps)");
        baselines = Some(run_baselines(&args, &prepared, &out.join("baselines"))?);
    }
    let report_dir = out.join("report");
    report::write(
        &report_dir,
        &run_config(&args, &prepared),
        &codecs,
        clean.as_ref(),
        baselines.as_ref(),
    )?;
    Ok(Comparison {
        report_dir,
        runs: codecs,
        baselines,
    })
}

/// What the report states about the run.
fn run_config(args: &TestnetArgs, prepared: &Prepared) -> RunConfig {
    RunConfig {
        nodes: args.nodes,
        rounds: args.rounds,
        local_steps: args.local_steps,
        codec: args.codec.clone(),
        aggregation: args.aggregation.clone(),
        split: args.split.clone(),
        model: prepared.model_label.clone(),
        data: prepared.data_label.clone(),
        batch_size: prepared.batch_size,
        lr: prepared.lr,
        seed: args.seed,
        mode: args.mode.clone(),
        link: args.link.clone(),
        eval_examples: args.eval_examples,
    }
}
