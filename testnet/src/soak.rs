//! `meshtune-testnet soak`: an endurance run of real node processes on loopback (default 6
//! nodes, 50 rounds) with random SIGKILLs and restarts and one late joiner, then the checks the
//! run must pass:
//!
//! 1. every process ended cleanly (each killed node was restarted and finished the run);
//! 2. every checkpoint on disk loads through the node's own loading code and holds the model
//!    its `state.json` names (hash of the loaded parameters);
//! 3. no accepted delta was lost: the model most nodes applied in round r (the mesh's accepted
//!    round) is the base every node built round r+1 on;
//! 4. the final models agree (largest parameter difference between nodes' last checkpoints);
//! 5. memory did not grow round over round: per node and per process lifetime of at least 20
//!    rounds, after 8 warm-up rounds, the median RSS of the last third of its rounds against
//!    that of the first third.
//!
//! Writes `OUT/soak/summary.md`, `soak.json`, `rss.csv` and an RSS-per-round plot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use meshtune_model::T5;
use meshtune_model::backend::Cpu;
use meshtune_model::checkpoint::load_checkpoint;
use meshtune_model::exchange::{ExchangeScope, module_tensors};
use meshtune_model::optim::{AdamW, AdamWConfig};
use meshtune_node::coordinator::RoundRecord;
use meshtune_node::plot::{Series, line_chart_svg};
use meshtune_protocol::{ModelHash, TensorSet};

use crate::local::{
    NodeLaunch, Prepared, Process, TestnetArgs, node_args, prepare, read_records, role_command,
    start_bootstrap,
};
use crate::rng::Rng;

#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// Node processes (the last one joins late).
    #[arg(long, default_value_t = 6)]
    pub nodes: usize,
    #[arg(long, default_value_t = 50)]
    pub rounds: u64,
    /// SIGKILL-then-restart events, at random rounds spread over the run (one node down at a
    /// time, a random moment inside the round).
    #[arg(long, default_value_t = 6)]
    pub kills: usize,
    /// A killed node stays down a random 1..=this many seconds.
    #[arg(long, default_value_t = 5)]
    pub max_down_s: u64,
    /// The last node starts once the mesh applied this many rounds (default: a fifth of them).
    #[arg(long)]
    pub late_join_round: Option<u64>,
    #[arg(long, default_value_t = 2)]
    pub local_steps: usize,
    #[arg(long, default_value_t = 60)]
    pub examples_per_node: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value = meshtune_protocol::DEFAULT_CODEC)]
    pub codec: String,
    #[arg(long, default_value_t = 23)]
    pub seed: u64,
    /// Allowed growth of a node's RSS from the first to the last third of its rounds (after
    /// 8 warm-up rounds; process lifetimes of at least 20 rounds).
    #[arg(long, default_value_t = 0.10)]
    pub max_rss_growth: f64,
    /// Largest allowed parameter difference between the nodes' final models.
    #[arg(long, default_value_t = 1e-6)]
    pub tolerance: f64,
    /// Give up after this many minutes.
    #[arg(long, default_value_t = 120)]
    pub timeout_min: u64,
    /// Run directory (default: testnet-runs/soak-<unix time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One node of the soak: its current process and where each of its lifetimes began.
struct Slot {
    process: Option<Process>,
    /// First round of each process lifetime (records at or after it belong to it).
    lifetimes: Vec<u64>,
    down_until: Option<Instant>,
}

/// What the soak did to whom, and when.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SoakEvent {
    pub seconds: f64,
    pub node: usize,
    pub what: String,
}

/// The verdict on the records (check 3 and 5), separate from the files so it can be tested.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RecordChecks {
    /// Round -> the model hash most nodes applied (ties: the smaller hash, as the nodes do).
    pub accepted: BTreeMap<u64, String>,
    /// Rounds where some node applied another model than the accepted one (it then synced).
    pub split_rounds: Vec<u64>,
    /// Records built on another base than the mesh's accepted model of the round before.
    pub lost: Vec<String>,
    /// Deltas some node combined that the accepted round does not hold (a sender killed
    /// while its delta was being fetched).
    pub minority_only_deltas: usize,
    /// Nodes that applied a round they trained in without their delta in the accepted model.
    pub own_delta_left_out: usize,
    /// Per node and lifetime: (node, first round, rounds, RSS MiB early, late, growth).
    pub rss: Vec<RssLifetime>,
    pub rss_failures: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RssLifetime {
    pub node: usize,
    pub first_round: u64,
    pub rounds: usize,
    pub early_mib: f64,
    pub late_mib: f64,
    pub growth: f64,
}

/// Rounds of a process lifetime left out of the memory check (warm-up).
const WARMUP_ROUNDS: usize = 8;
/// Shorter lifetimes are not judged.
const MIN_JUDGED_ROUNDS: usize = 20;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Checks 3 and 5 on every node's `rounds.jsonl` (`lifetimes[i]`: first round of each of node
/// i's processes).
pub fn check_records(
    records: &[Vec<RoundRecord>],
    lifetimes: &[Vec<u64>],
    max_rss_growth: f64,
) -> RecordChecks {
    let mut checks = RecordChecks::default();
    let mut by_round: BTreeMap<u64, Vec<&RoundRecord>> = BTreeMap::new();
    for record in records.iter().flatten() {
        by_round.entry(record.round).or_default().push(record);
    }
    for (&round, recs) in &by_round {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for r in recs {
            *counts.entry(r.model_hash.as_str()).or_default() += 1;
        }
        // BTreeMap order: the first of the largest counts is the smallest hash.
        let most = counts.values().copied().max().unwrap_or(0);
        let Some((&winner, _)) = counts.iter().find(|(_, c)| **c == most) else {
            continue;
        };
        checks.accepted.insert(round, winner.to_owned());
        if counts.len() > 1 {
            checks.split_rounds.push(round);
        }
        // Who the accepted model combined, from a node that aggregated it (a node that only
        // adopted it as a catch-up knows no contributors).
        let accepted_from: Vec<&str> = recs
            .iter()
            .find(|r| r.model_hash == winner && r.synced_from.is_none())
            .map(|r| r.contributors.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let mut extra: Vec<&str> = recs
            .iter()
            .filter(|r| r.model_hash != winner)
            .flat_map(|r| r.contributors.iter().map(String::as_str))
            .filter(|c| !accepted_from.contains(c))
            .collect();
        extra.sort_unstable();
        extra.dedup();
        checks.minority_only_deltas += extra.len();
        checks.own_delta_left_out += recs
            .iter()
            .filter(|r| r.train_loss.is_some() && !accepted_from.contains(&r.peer_id.as_str()))
            .count();
    }
    for (i, node) in records.iter().enumerate() {
        for r in node {
            let Some(previous) = r.round.checked_sub(1) else {
                continue;
            };
            if let Some(accepted) = checks.accepted.get(&previous)
                && !r.base_hash.is_empty()
                && &r.base_hash != accepted
            {
                checks.lost.push(format!(
                    "node-{i} built round {} on {} instead of the mesh's round-{previous} model {}",
                    r.round, r.base_hash, accepted
                ));
            }
        }
    }
    for (i, node) in records.iter().enumerate() {
        let starts = lifetimes.get(i).cloned().unwrap_or_default();
        for (k, &first) in starts.iter().enumerate() {
            let end = starts.get(k + 1).copied().unwrap_or(u64::MAX);
            let rss: Vec<f64> = node
                .iter()
                .filter(|r| r.round >= first && r.round < end)
                .filter_map(|r| r.rss_bytes)
                .map(|b| b as f64 / f64::from(1 << 20))
                .collect();
            // Caches and allocator arenas fill during the first rounds: judge the rest, first
            // third against last third, where a lifetime is long enough to tell.
            if rss.len() < MIN_JUDGED_ROUNDS {
                continue;
            }
            let steady = &rss[WARMUP_ROUNDS..];
            let third = steady.len() / 3;
            let early = median(steady[..third].to_vec());
            let late = median(steady[steady.len() - third..].to_vec());
            let growth = late / early - 1.0;
            if growth > max_rss_growth {
                checks.rss_failures.push(format!(
                    "node-{i} (process from round {first}): RSS {early:.0} MiB -> {late:.0} MiB (+{:.0}%)",
                    growth * 100.0
                ));
            }
            checks.rss.push(RssLifetime {
                node: i,
                first_round: first,
                rounds: rss.len(),
                early_mib: early,
                late_mib: late,
                growth,
            });
        }
    }
    checks
}

/// Check 2 for one checkpoint directory: loads it into a model of the run's config with the
/// node's loader and returns its parameters, after checking them against `state.json`.
fn load_and_verify(checkpoint: &Path, data: &Path) -> anyhow::Result<TensorSet> {
    let config = meshtune_model::T5Config::from_file(&data.join("config.json"))?;
    let device = Default::default();
    let model: T5<Cpu> =
        meshtune_node::trainer::model::initial_model(&config, Some(data), true, 0, &device)?;
    let mut optimizer = AdamW::<Cpu>::new(AdamWConfig::default());
    let (model, state) = load_checkpoint(checkpoint, model, &mut optimizer, &device)
        .with_context(|| format!("loading {}", checkpoint.display()))?;
    let tensors = module_tensors(&model, ExchangeScope::All)?;
    let expected = state["model_hash"].as_str().unwrap_or_default();
    let found = ModelHash::of_tensors(&tensors).to_string();
    anyhow::ensure!(
        found == expected,
        "{}: parameters hash to {found}, state.json says {expected}",
        checkpoint.display()
    );
    for t in tensors.tensors() {
        anyhow::ensure!(
            t.values.iter().all(|v| v.is_finite()),
            "{}: `{}` holds a non-finite value",
            checkpoint.display(),
            t.name
        );
    }
    Ok(tensors)
}

fn checkpoint_dirs(node_out: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(node_out.join("checkpoints"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("checkpoint-"))
        })
        .collect();
    dirs.sort();
    dirs
}

fn max_abs_diff(a: &TensorSet, b: &TensorSet) -> anyhow::Result<f64> {
    let mut worst = 0.0f64;
    for t in a.tensors() {
        let other = b
            .get(&t.name)
            .with_context(|| format!("`{}` missing from the other model", t.name))?;
        anyhow::ensure!(
            other.values.len() == t.values.len(),
            "`{}` shapes differ",
            t.name
        );
        for (x, y) in t.values.iter().zip(&other.values) {
            worst = worst.max(f64::from((x - y).abs()));
        }
    }
    Ok(worst)
}

/// Everything the soak found, as written to `soak.json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SoakReport {
    pub nodes: usize,
    pub rounds: u64,
    pub seconds: f64,
    pub events: Vec<SoakEvent>,
    pub checkpoints_loaded: usize,
    pub checkpoint_failures: Vec<String>,
    pub final_hashes: Vec<Option<String>>,
    pub final_max_abs_diff: Option<f64>,
    pub records: RecordChecks,
    pub failures: Vec<String>,
}

pub fn run(args: SoakArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.nodes >= 3,
        "--nodes must be at least 3 (one joins late)"
    );
    anyhow::ensure!(args.rounds >= 4, "--rounds must be at least 4");
    anyhow::ensure!(args.max_down_s >= 1, "--max-down-s must be at least 1");
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| crate::local::default_run_dir("soak-"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;
    let testnet = soak_testnet_args(&args, &out);
    let prepared = prepare(&testnet, &out)?;
    let dir = out.join("soak");
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let (_bootstrap, address) = start_bootstrap(&dir, None)?;
    let mut soak = Soak::start(SoakRun {
        args: &args,
        testnet: &testnet,
        prepared: &prepared,
        dir: &dir,
        address: &address,
        started,
    })?;
    println!(
        "{:>5} | {:>40} | {:>6} | {:>7}",
        "round", "RSS MiB per node", "deltas", "time"
    );
    let deadline = started + Duration::from_secs(args.timeout_min * 60);
    while !soak.step()? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the soak did not finish in {} minutes",
            args.timeout_min
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let seconds = started.elapsed().as_secs_f64();
    let records = soak.records();
    while soak.printed < args.rounds {
        print_row(soak.printed, &records);
        soak.printed += 1;
    }
    let lifetimes: Vec<Vec<u64>> = soak.slots.iter().map(|s| s.lifetimes.clone()).collect();
    let report = verify(
        &args,
        &prepared.data,
        &dir,
        &records,
        &lifetimes,
        soak.events,
        seconds,
    )?;
    write_report(&dir, &report, &records)?;
    println!("\nsoak report: {}", dir.join("summary.md").display());
    if report.failures.is_empty() {
        println!("soak passed: {}", summary_line(&report));
        Ok(())
    } else {
        anyhow::bail!("soak failed:\n- {}", report.failures.join("\n- "))
    }
}

/// The testnet settings of a soak's nodes.
fn soak_testnet_args(args: &SoakArgs, out: &Path) -> TestnetArgs {
    TestnetArgs {
        nodes: args.nodes,
        rounds: args.rounds,
        local_steps: args.local_steps,
        codec: args.codec.clone(),
        aggregation: "mean".into(),
        topology: "all".into(),
        outer: "average".into(),
        compare_outer: Vec::new(),
        compare_codecs: Vec::new(),
        split: "dirichlet:0.5".into(),
        preset: "tiny".into(),
        scenario: "none".into(),
        link: None,
        mode: "process".into(),
        no_compare: true,
        no_centralized: false,
        keep_residual: false,
        ef_decay: None,
        ef_relearn: None,
        ef_bound: None,
        overlap: false,
        compare_overlap: false,
        examples_per_node: args.examples_per_node,
        eval_examples: 4,
        eval_every: args.rounds,
        batch_size: args.batch_size,
        lr: 3e-3,
        seed: args.seed,
        out: Some(out.to_path_buf()),
    }
}

/// What a soak runs with.
struct SoakRun<'a> {
    args: &'a SoakArgs,
    testnet: &'a TestnetArgs,
    prepared: &'a Prepared,
    dir: &'a Path,
    address: &'a str,
    started: Instant,
}

/// A soak in progress: the node processes, the kill schedule, what happened so far.
struct Soak<'a> {
    run: SoakRun<'a>,
    args: &'a SoakArgs,
    dir: &'a Path,
    rng: Rng,
    /// Rounds after which a node is killed, soonest first.
    kill_at: Vec<u64>,
    slots: Vec<Slot>,
    events: Vec<SoakEvent>,
    /// The round the late joiner starts after.
    late_round: u64,
    /// Rounds printed so far.
    printed: u64,
}

impl<'a> Soak<'a> {
    /// Starts every node but the late joiner and draws the kill schedule.
    fn start(run: SoakRun<'a>) -> anyhow::Result<Self> {
        let (args, dir) = (run.args, run.dir);
        let last = args.nodes - 1;
        let late_round = args
            .late_join_round
            .unwrap_or((args.rounds / 5).max(1))
            .min(args.rounds - 2);
        println!(
            "meshtune soak: {} node processes, {} rounds, {} kills, node-{last} joins after round {late_round}; run in {}",
            args.nodes,
            args.rounds,
            args.kills,
            dir.display()
        );
        let mut rng = Rng::new(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        // Kills land in rounds 2..=rounds-6, so each restarted node has rounds left to rejoin.
        let mut kill_at: Vec<u64> = (0..args.kills)
            .map(|_| rng.range(2, args.rounds.saturating_sub(6).max(2)))
            .collect();
        kill_at.sort_unstable();
        let mut soak = Self {
            run,
            args,
            dir,
            rng,
            kill_at,
            slots: Vec::new(),
            events: Vec::new(),
            late_round,
            printed: 0,
        };
        for i in 0..args.nodes {
            let process = if i == last {
                None
            } else {
                Some(soak.spawn(i, args.nodes - 2)?)
            };
            soak.slots.push(Slot {
                lifetimes: if process.is_some() {
                    vec![0]
                } else {
                    Vec::new()
                },
                process,
                down_until: None,
            });
        }
        Ok(soak)
    }

    /// Starts node `i`, waiting for `wait_for` peers before its first round.
    fn spawn(&self, i: usize, wait_for: usize) -> anyhow::Result<Process> {
        let launch = NodeLaunch {
            index: i,
            bootstrap: self.run.address,
            ip: "127.0.0.1",
            codec: &self.args.codec,
            outer: "average",
            overlap: false,
            wait_for,
        };
        let name = format!("node-{i}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))?;
        let child = role_command(None, Some(i), "__node")?
            .args(node_args(
                self.run.testnet,
                self.run.prepared,
                self.dir,
                launch,
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting node {i}"))?;
        Ok(Process { name, child })
    }

    fn event(&mut self, node: usize, what: String) {
        let seconds = self.run.started.elapsed().as_secs_f64();
        tracing::info!(node, seconds, "{what}");
        self.events.push(SoakEvent {
            seconds,
            node,
            what,
        });
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{i}"))
    }

    /// Every node's records so far.
    fn records(&self) -> Vec<Vec<RoundRecord>> {
        (0..self.args.nodes)
            .map(|i| read_records(&self.node_dir(i).join("rounds.jsonl")))
            .collect()
    }

    /// One look at the mesh: start the late joiner, kill, restart, print finished rounds.
    /// True when every node finished and none is still to start.
    fn step(&mut self) -> anyhow::Result<bool> {
        let records = self.records();
        let progress = records
            .iter()
            .filter_map(|r| r.iter().map(|x| x.round + 1).max())
            .max()
            .unwrap_or(0);
        let last = self.args.nodes - 1;
        if self.slots[last].lifetimes.is_empty() && progress >= self.late_round {
            self.slots[last].process = Some(self.spawn(last, 1)?);
            self.slots[last].lifetimes.push(0);
            self.event(
                last,
                format!("late join after the mesh applied {progress} rounds"),
            );
        }
        let someone_down = self.slots.iter().any(|s| s.down_until.is_some());
        if !someone_down && self.kill_at.first().is_some_and(|&k| progress >= k) {
            self.kill_at.remove(0);
            self.kill_one();
        }
        for i in 0..self.slots.len() {
            if self.slots[i]
                .down_until
                .is_some_and(|t| Instant::now() >= t)
            {
                self.slots[i].down_until = None;
                self.slots[i].process = Some(self.spawn(i, 1)?);
                self.event(i, "restarted on its checkpoint directory".into());
            }
        }
        self.print_finished_rounds(&records);
        let running = self.running()?;
        let pending = self
            .slots
            .iter()
            .any(|s| s.down_until.is_some() || s.lifetimes.is_empty());
        Ok(running == 0 && !pending)
    }

    /// SIGKILLs a random running node at a random moment inside the round (training,
    /// exchange or checkpoint); it stays down for a random while.
    fn kill_one(&mut self) {
        let running: Vec<usize> = (0..self.args.nodes)
            .filter(|&i| self.slots[i].process.is_some())
            .collect();
        if running.is_empty() {
            return;
        }
        let victim = running[self.rng.range(0, running.len() as u64 - 1) as usize];
        std::thread::sleep(Duration::from_millis(self.rng.range(0, 1500)));
        let applied = read_records(&self.node_dir(victim).join("rounds.jsonl"))
            .iter()
            .map(|r| r.round + 1)
            .max()
            .unwrap_or(0);
        if let Some(mut process) = self.slots[victim].process.take() {
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
        let down = self.rng.range(1, self.args.max_down_s);
        self.slots[victim].down_until = Some(Instant::now() + Duration::from_secs(down));
        self.slots[victim].lifetimes.push(applied);
        self.event(
            victim,
            format!("SIGKILL after it applied {applied} rounds; down {down} s"),
        );
    }

    /// Prints each round once every running node has passed it.
    fn print_finished_rounds(&mut self, records: &[Vec<RoundRecord>]) {
        while self.printed < self.args.rounds
            && records.iter().enumerate().all(|(i, r)| {
                self.slots[i].process.is_none() || r.iter().any(|x| x.round >= self.printed)
            })
            && records
                .iter()
                .any(|r| r.iter().any(|x| x.round == self.printed))
        {
            print_row(self.printed, records);
            self.printed += 1;
        }
    }

    /// Node processes still running; a process that failed ends the soak with its log.
    fn running(&mut self) -> anyhow::Result<usize> {
        let mut running = 0;
        for slot in &mut self.slots {
            let Some(process) = slot.process.as_mut() else {
                continue;
            };
            match process.child.try_wait()? {
                Some(status) if status.success() => {}
                Some(status) => anyhow::bail!(
                    "{} failed ({status}); see {}",
                    process.name,
                    self.dir.join(format!("{}.log", process.name)).display()
                ),
                None => running += 1,
            }
        }
        Ok(running)
    }
}

fn verify(
    args: &SoakArgs,
    data: &Path,
    dir: &Path,
    records: &[Vec<RoundRecord>],
    lifetimes: &[Vec<u64>],
    events: Vec<SoakEvent>,
    seconds: f64,
) -> anyhow::Result<SoakReport> {
    let mut failures = Vec::new();
    let mut checkpoints_loaded = 0;
    let mut checkpoint_failures = Vec::new();
    let mut finals: Vec<Option<TensorSet>> = Vec::new();
    for i in 0..args.nodes {
        let node_out = dir.join(format!("node-{i}"));
        let dirs = checkpoint_dirs(&node_out);
        if dirs.is_empty() {
            checkpoint_failures.push(format!("node-{i}: no checkpoint on disk"));
        }
        let latest = meshtune_model::checkpoint::latest_checkpoint(&node_out.join("checkpoints"))
            .ok()
            .flatten();
        let mut last_model = None;
        for checkpoint in dirs {
            match load_and_verify(&checkpoint, data) {
                Ok(tensors) => {
                    checkpoints_loaded += 1;
                    if latest.as_ref() == Some(&checkpoint) {
                        last_model = Some(tensors);
                    }
                }
                Err(err) => checkpoint_failures.push(format!("{err:#}")),
            }
        }
        finals.push(last_model);
    }
    failures.extend(checkpoint_failures.iter().cloned());
    let mut final_max_abs_diff = None;
    if let Some(first) = finals.iter().flatten().next() {
        let mut worst = 0.0f64;
        for other in finals.iter().flatten() {
            worst = worst.max(max_abs_diff(first, other)?);
        }
        final_max_abs_diff = Some(worst);
        if worst > args.tolerance {
            failures.push(format!(
                "final models differ by up to {worst:.3e} (tolerance {:.0e})",
                args.tolerance
            ));
        }
    }
    if finals.iter().any(Option::is_none) {
        failures.push("a node has no loadable latest checkpoint".into());
    }
    let final_hashes: Vec<Option<String>> = records
        .iter()
        .map(|r| {
            r.iter()
                .filter(|x| x.round + 1 == args.rounds)
                .map(|x| x.model_hash.clone())
                .next_back()
        })
        .collect();
    for (i, hash) in final_hashes.iter().enumerate() {
        if hash.is_none() {
            failures.push(format!("node-{i} has no record of the last round"));
        }
    }
    let checks = check_records(records, lifetimes, args.max_rss_growth);
    failures.extend(checks.lost.iter().cloned());
    failures.extend(checks.rss_failures.iter().cloned());
    Ok(SoakReport {
        nodes: args.nodes,
        rounds: args.rounds,
        seconds,
        events,
        checkpoints_loaded,
        checkpoint_failures,
        final_hashes,
        final_max_abs_diff,
        records: checks,
        failures,
    })
}

fn rss_mib(record: &RoundRecord) -> Option<f64> {
    record.rss_bytes.map(|b| b as f64 / f64::from(1 << 20))
}

fn print_row(round: u64, records: &[Vec<RoundRecord>]) {
    let row: Vec<Option<&RoundRecord>> = records
        .iter()
        .map(|r| r.iter().rev().find(|x| x.round == round))
        .collect();
    let rss: Vec<String> = row
        .iter()
        .map(|r| {
            r.and_then(rss_mib)
                .map_or("-".into(), |m| format!("{m:.0}"))
        })
        .collect();
    let deltas = row.iter().flatten().map(|r| r.deltas).max().unwrap_or(0);
    let time = row
        .iter()
        .flatten()
        .map(|r| r.seconds_total)
        .fold(0.0, f64::max);
    println!(
        "{:>5} | {:>40} | {:>6} | {:>6.1}s",
        round,
        rss.join(" "),
        deltas,
        time
    );
}

fn summary_line(report: &SoakReport) -> String {
    format!(
        "{} rounds in {:.0} s, {} kills, {} checkpoints loaded, final models differ by {}, \
         {} split rounds repaired, no accepted delta lost",
        report.rounds,
        report.seconds,
        report
            .events
            .iter()
            .filter(|e| e.what.starts_with("SIGKILL"))
            .count(),
        report.checkpoints_loaded,
        report
            .final_max_abs_diff
            .map_or("-".into(), |d| format!("{d:.1e}")),
        report.records.split_rounds.len(),
    )
}

fn write_report(
    dir: &Path,
    report: &SoakReport,
    records: &[Vec<RoundRecord>],
) -> anyhow::Result<()> {
    std::fs::write(dir.join("soak.json"), serde_json::to_vec_pretty(report)?)?;
    let mut csv = String::from("round,node,rss_mib,peak_rss_mib,deltas,seconds,model_hash\n");
    let mut series = Vec::new();
    for (i, node) in records.iter().enumerate() {
        let mut points = Vec::new();
        for r in node {
            csv.push_str(&format!(
                "{},{i},{},{},{},{:.3},{}\n",
                r.round,
                rss_mib(r).map_or(String::new(), |m| format!("{m:.1}")),
                r.peak_rss_bytes.map_or(String::new(), |b| format!(
                    "{:.1}",
                    b as f64 / f64::from(1 << 20)
                )),
                r.deltas,
                r.seconds_total,
                r.model_hash
            ));
            if let Some(m) = rss_mib(r) {
                points.push((r.round as f64, m));
            }
        }
        series.push(Series::new(&format!("node-{i}"), points));
    }
    std::fs::write(dir.join("rss.csv"), csv)?;
    let svg = line_chart_svg("Resident memory per round", "round", "RSS (MiB)", &series);
    std::fs::write(dir.join("rss.svg"), &svg)?;
    crate::png::write_png(&svg, &dir.join("rss.png"))?;
    let mut md = format!(
        "# Soak: {} nodes, {} rounds\n\n{}\n\n## Events\n\n",
        report.nodes,
        report.rounds,
        if report.failures.is_empty() {
            format!("**Passed**: {}.", summary_line(report))
        } else {
            format!("**Failed**:\n\n- {}", report.failures.join("\n- "))
        }
    );
    for e in &report.events {
        md.push_str(&format!(
            "- {:.1} s: node-{}: {}\n",
            e.seconds, e.node, e.what
        ));
    }
    let checks = &report.records;
    md.push_str(&format!(
        "\n## Checks\n\n\
         - Checkpoints on disk that loaded and matched their recorded model hash: {} \
         (failures: {}).\n\
         - Final models: largest parameter difference between nodes {}; final hashes: {}.\n\
         - Rounds where some node applied another model than most (repaired by state sync): \
         {:?}.\n\
         - Records built on another base than the mesh's accepted previous round: {}.\n\
         - Deltas combined by a minority only (sender killed mid-transfer): {}; nodes whose \
         own delta missed a round they applied (restarted mid-round): {}.\n\n\
         ## Memory per process lifetime of 20+ rounds (median RSS after 8 warm-up rounds: first vs last third)\n\n\
         | node | from round | rounds | early MiB | late MiB | growth |\n|---:|---:|---:|---:|---:|---:|\n",
        report.checkpoints_loaded,
        report.checkpoint_failures.len(),
        report
            .final_max_abs_diff
            .map_or("-".into(), |d| format!("{d:.3e}")),
        report
            .final_hashes
            .iter()
            .map(|h| h.as_deref().map_or("-", |h| &h[..h.len().min(12)]))
            .collect::<Vec<_>>()
            .join(", "),
        checks.split_rounds,
        checks.lost.len(),
        checks.minority_only_deltas,
        checks.own_delta_left_out,
    ));
    for l in &checks.rss {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:+.1}% |\n",
            l.node,
            l.first_round,
            l.rounds,
            l.early_mib,
            l.late_mib,
            l.growth * 100.0
        ));
    }
    md.push_str("\nRSS per round: `rss.csv`, `rss.png`.\n");
    std::fs::write(dir.join("summary.md"), md)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        node: usize,
        round: u64,
        base: &str,
        hash: &str,
        from: &[usize],
        rss: u64,
    ) -> RoundRecord {
        let mut r: RoundRecord = serde_json::from_value(serde_json::json!({
            "round": round, "peer_id": format!("p{node}"), "train_loss": 1.0, "train_samples": 4,
            "eval_loss": null, "rouge_l": null, "deltas": from.len(), "mesh_peers": 2,
            "delta_bytes": 1, "raw_delta_bytes": 4, "payload_in": 0, "wire_in": 0,
            "wire_out": 0, "amplification": null, "seconds_train": 0.1, "seconds_total": 0.2,
            "model_hash": hash, "rejected": {}
        }))
        .expect("record");
        r.base_hash = base.into();
        r.contributors = from.iter().map(|c| format!("p{c}")).collect();
        r.rss_bytes = Some(rss << 20);
        r
    }

    #[test]
    fn a_node_that_builds_on_a_dropped_round_is_reported_and_splits_are_counted() {
        // Round 0: nodes 0 and 1 combine all three deltas (hash a); node 2 missed node 1's
        // delta (hash x). Round 1: nodes 0 and 1 build on a; node 2 kept building on x.
        let records = vec![
            vec![
                record(0, 0, "z", "a", &[0, 1, 2], 100),
                record(0, 1, "a", "b", &[0, 1], 100),
            ],
            vec![
                record(1, 0, "z", "a", &[0, 1, 2], 100),
                record(1, 1, "a", "b", &[0, 1], 100),
            ],
            vec![
                record(2, 0, "z", "x", &[0, 2], 100),
                record(2, 1, "x", "y", &[2], 100),
            ],
        ];
        let checks = check_records(&records, &[vec![0], vec![0], vec![0]], 0.1);
        assert_eq!(checks.accepted[&0], "a");
        assert_eq!(checks.split_rounds, vec![0, 1]);
        assert_eq!(checks.lost.len(), 1, "{:?}", checks.lost);
        assert!(
            checks.lost[0].contains("node-2 built round 1"),
            "{:?}",
            checks.lost
        );
        // Node 2 trained in round 1 but its delta is not in the accepted model.
        assert_eq!(checks.own_delta_left_out, 1);
        // Had node 2 synced (its round-1 base is a), nothing is lost.
        let mut repaired = records.clone();
        repaired[2][1] = record(2, 1, "a", "b", &[0, 1], 100);
        let checks = check_records(&repaired, &[vec![0], vec![0], vec![0]], 0.1);
        assert!(checks.lost.is_empty(), "{:?}", checks.lost);
        assert_eq!(checks.split_rounds, vec![0]);
    }

    #[test]
    fn a_catch_up_record_neither_loses_nor_hides_the_rounds_contributors() {
        // Node 0 was down for round 1 and adopted the mesh's round-1 model from node 1; nodes
        // 1 and 2 aggregated it from their two deltas.
        let mut synced = record(0, 1, "", "b", &[], 100);
        synced.train_loss = None;
        synced.synced_from = Some("p1".into());
        let records = vec![
            vec![record(0, 0, "z", "a", &[0, 1, 2], 100), synced],
            vec![
                record(1, 0, "z", "a", &[0, 1, 2], 100),
                record(1, 1, "a", "b", &[1, 2], 100),
            ],
            vec![
                record(2, 0, "z", "a", &[0, 1, 2], 100),
                record(2, 1, "a", "b", &[1, 2], 100),
            ],
        ];
        let checks = check_records(&records, &[vec![0], vec![0], vec![0]], 0.1);
        assert_eq!(checks.accepted[&1], "b");
        assert!(checks.split_rounds.is_empty());
        assert!(checks.lost.is_empty(), "{:?}", checks.lost);
        assert_eq!(checks.own_delta_left_out, 0);
        assert_eq!(checks.minority_only_deltas, 0);
    }

    #[test]
    fn memory_growth_is_judged_per_process_lifetime() {
        // Node 0 leaks 5 MiB a round. Node 1 was restarted at round 25 (its RSS drops) and
        // ramps up during each lifetime's warm-up, then stays flat. Node 2's second lifetime
        // (rounds 50-59) is too short to judge.
        let rounds = 60u64;
        let leaky: Vec<RoundRecord> = (0..rounds)
            .map(|r| record(0, r, "", "h", &[0], 100 + 5 * r))
            .collect();
        let warm = |r: u64, start: u64, level: u64| level + 10 * (start + 8).saturating_sub(r);
        let restarted: Vec<RoundRecord> = (0..rounds)
            .map(|r| {
                let rss = if r < 25 {
                    warm(r, 0, 200)
                } else {
                    warm(r, 25, 120)
                };
                record(1, r, "", "h", &[1], rss)
            })
            .collect();
        let short: Vec<RoundRecord> = (0..rounds)
            .map(|r| record(2, r, "", "h", &[2], if r < 50 { 150 } else { 100 + r }))
            .collect();
        let checks = check_records(
            &[leaky, restarted, short],
            &[vec![0], vec![0, 25], vec![0, 50]],
            0.1,
        );
        assert_eq!(checks.rss_failures.len(), 1, "{:?}", checks.rss_failures);
        assert!(checks.rss_failures[0].starts_with("node-0"));
        let node1: Vec<&RssLifetime> = checks.rss.iter().filter(|l| l.node == 1).collect();
        assert_eq!(node1.len(), 2);
        assert!(node1.iter().all(|l| l.growth.abs() < 1e-9), "{node1:?}");
        let node2: Vec<&RssLifetime> = checks.rss.iter().filter(|l| l.node == 2).collect();
        assert_eq!(node2.len(), 1, "only the 50-round lifetime is judged");
    }
}
