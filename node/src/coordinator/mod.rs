//! The node's round loop: it runs the [`RoundMachine`], performs its actions with the
//! trainer thread, the network client and the blob store, and records what every round did.
//!
//! Owns: the current base model, the error-feedback residuals, the outer optimizer state, the
//! decoded deltas of the open rounds, checkpoints after every applied round, the per-round
//! record (`rounds.jsonl`) and the node's Prometheus metrics. Must not touch: the swarm (only
//! through [`Client`]) or the model's internals (only through [`TrainerHandle`]).

pub mod gossip;
pub mod metrics;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use libp2p::PeerId;
use libp2p::gossipsub::MessageAcceptance;
use meshtune_protocol::{
    ChunkRequest, ChunkResponse, CodecParams, DEFAULT_CHUNK_SIZE, DeltaManifest, ErrorFeedback,
    Limits, ModelHash, ModelLayout, StateCodecParams, StateManifest, TensorSet, VerifiedFile,
    chunk_blob, decode_delta, decode_state, decode_state_file, encode_delta, encode_state,
    encode_state_to,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::averaging::aggregate::{
    Aggregation, OuterOptimizer, OuterState, WeightedDelta, aggregate, apply_outer_step,
    difference, l2_norm, norm_outliers,
};
use crate::averaging::round::{
    Action, Input, RejectReason, RoundConfig, RoundMachine, Verdict, final_state_winner,
};
use crate::energy::{EnergyMeter, RoundEnergy};
use crate::network::fetch::{FetchConfig, FetchError, fetch_blob, fetch_blob_to_file};
use crate::network::store::{BlobBytes, BlobFile, BlobStore};
use crate::network::{Client, NetworkEvent};
use crate::trainer::{EvalReport, TrainReport, TrainerHandle};

pub use self::gossip::Topology;
use self::metrics::NodeMetrics;

/// How a node takes part in rounds.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub mesh_id: String,
    /// Local optimizer steps per round.
    pub local_steps: usize,
    /// Stop after this many applied rounds (counted from round 0); `None` runs until stopped.
    pub rounds: Option<u64>,
    /// Train 0 steps in the last round: a pure exchange that leaves every node on the same
    /// model.
    pub final_exchange: bool,
    pub codec: CodecParams,
    pub aggregation: Aggregation,
    pub outer: OuterOptimizer,
    pub round: RoundConfig,
    /// Deltas with an L2 norm above this are refused.
    pub max_delta_norm: Option<f64>,
    /// Deltas with a norm above this multiple of the round's median are left out (>= 3 deltas).
    pub norm_outlier_factor: f64,
    /// Evaluate every this many rounds (0: never).
    pub eval_every: u64,
    pub limits: Limits,
    pub chunk_size: u32,
    /// Node checkpoints (one per applied round) and `rounds.jsonl`.
    pub out: PathBuf,
    pub fetch: FetchConfig,
    /// Before round 0 (or the resumed round), wait until this many mesh peers are connected
    /// (bounded by `wait_timeout`), so a starting mesh does not begin with lone rounds.
    pub wait_for_peers: usize,
    pub wait_timeout: Duration,
    /// After the last round, keep serving blobs until peers have not fetched anything for this
    /// long (bounded by the collect timeout), so slower peers can still complete the round.
    /// Zero stops at once.
    pub linger_quiet: Duration,
    /// Fault injection for the testnet's byzantine scenario: this node publishes bad deltas
    /// on purpose. Never set in normal operation.
    pub misbehave: Option<Misbehaviour>,
    /// Where per-round energy comes from (`None`: not measured).
    pub energy: Option<EnergyMeter>,
    /// States of at least this many bytes are written to and read from `OUT/state/` instead
    /// of memory, in both directions (served and synced).
    pub stream_state_bytes: u64,
    /// All-to-all averaging (one model everywhere) or sparse gossip ([`gossip`]).
    pub topology: Topology,
}

/// The bad deltas a deliberately byzantine node sends (`meshtune node --byzantine`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Misbehaviour {
    /// Its honest delta times this factor.
    Scale(f32),
    /// NaN in the first tensor of a correctly hashed blob (raw f32).
    Nan,
    /// NaN in odd rounds, scaled by the factor in even rounds.
    Mixed(f32),
}

impl std::str::FromStr for Misbehaviour {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let factor = |v: &str| {
            v.parse::<f32>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| format!("`{v}` is not a finite scale factor"))
        };
        match text.split_once(':') {
            None if text == "nan" => Ok(Misbehaviour::Nan),
            Some(("scale", v)) => Ok(Misbehaviour::Scale(factor(v)?)),
            Some(("mixed", v)) => Ok(Misbehaviour::Mixed(factor(v)?)),
            _ => Err(format!(
                "unknown misbehaviour `{text}`: use scale:FACTOR, nan or mixed:FACTOR"
            )),
        }
    }
}

impl Misbehaviour {
    /// What to send in `round`: `Some(factor)` to scale, `None` for NaN.
    fn in_round(self, round: u64) -> Option<f32> {
        match self {
            Misbehaviour::Scale(k) => Some(k),
            Misbehaviour::Nan => None,
            Misbehaviour::Mixed(k) => round.is_multiple_of(2).then_some(k),
        }
    }
}

impl CoordinatorConfig {
    pub fn new(mesh_id: &str, out: PathBuf) -> Self {
        Self {
            mesh_id: mesh_id.to_owned(),
            local_steps: 20,
            rounds: None,
            final_exchange: false,
            codec: CodecParams::default(),
            aggregation: Aggregation::Mean,
            outer: OuterOptimizer::Average,
            round: RoundConfig::default(),
            max_delta_norm: None,
            norm_outlier_factor: 10.0,
            eval_every: 1,
            limits: Limits::default(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            out,
            energy: None,
            fetch: FetchConfig::default(),
            wait_for_peers: 0,
            wait_timeout: Duration::from_secs(60),
            linger_quiet: Duration::from_secs(5),
            misbehave: None,
            stream_state_bytes: 256 << 20,
            topology: Topology::All,
        }
    }
}

/// What one applied round did, as written to `rounds.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoundRecord {
    pub round: u64,
    pub peer_id: String,
    pub train_loss: Option<f64>,
    pub train_samples: u64,
    pub eval_loss: Option<f64>,
    pub rouge_l: Option<f64>,
    /// Deltas combined (own included).
    pub deltas: usize,
    pub mesh_peers: usize,
    /// Size of this node's encoded delta.
    pub delta_bytes: u64,
    /// Size of the same delta as raw f32.
    pub raw_delta_bytes: u64,
    /// Blob payload this node pulled from peers this round.
    pub payload_in: u64,
    /// Bytes through substreams this round (all protocols; noise and yamux framing not counted).
    pub wire_in: u64,
    pub wire_out: u64,
    /// `wire_in / payload_in` (1.0 is the ideal of receiving each needed byte once).
    pub amplification: Option<f64>,
    /// `wire_in` by application protocol (`blobs`, `kad`, `identify`, `ping`, `gossipsub`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub wire_in_by_protocol: BTreeMap<String, u64>,
    pub seconds_train: f64,
    pub seconds_total: f64,
    /// Evaluation time inside `seconds_total`.
    #[serde(default)]
    pub seconds_eval: f64,
    /// The collect deadline in force for this round (adaptive unless configured fixed).
    #[serde(default)]
    pub deadline_s: f64,
    /// Training tokens (source + target, no padding).
    #[serde(default)]
    pub tokens: u64,
    /// Compute vs communication energy, tokens/s/W and granularity G.
    #[serde(default, flatten)]
    pub energy: RoundEnergy,
    pub model_hash: String,
    /// The model the round's deltas were applied to.
    #[serde(default)]
    pub base_hash: String,
    /// Peer ids whose deltas were combined (this node's own included), sorted.
    #[serde(default)]
    pub contributors: Vec<String>,
    /// Resident memory of the node process after the round (Linux), and its peak so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    pub rejected: BTreeMap<String, u64>,
    /// Last round only: the peer whose final state this node adopted after the round (it had
    /// missed part of it); `model_hash` is then the adopted model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted_final_state: Option<String>,
    /// The peer whose state this node adopted instead of taking part in the rounds since its
    /// previous record (it was down, or fell too far behind): the record of a catch-up, not of
    /// a round this node trained or aggregated, so it has no loss, deltas or base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_from: Option<String>,
}

impl RoundRecord {
    /// The record of adopting `peer`'s state after `round`: `hash` is the adopted model.
    pub fn synced(
        round: u64,
        me: PeerId,
        peer: PeerId,
        hash: ModelHash,
        mesh_peers: usize,
    ) -> Self {
        RoundRecord {
            round,
            peer_id: me.to_string(),
            train_loss: None,
            train_samples: 0,
            eval_loss: None,
            rouge_l: None,
            deltas: 0,
            mesh_peers,
            delta_bytes: 0,
            raw_delta_bytes: 0,
            payload_in: 0,
            wire_in: 0,
            wire_out: 0,
            amplification: None,
            wire_in_by_protocol: BTreeMap::new(),
            seconds_train: 0.0,
            seconds_total: 0.0,
            seconds_eval: 0.0,
            deadline_s: 0.0,
            tokens: 0,
            energy: RoundEnergy::default(),
            model_hash: hash.to_string(),
            base_hash: String::new(),
            contributors: Vec::new(),
            rss_bytes: process_memory("VmRSS:"),
            peak_rss_bytes: process_memory("VmHWM:"),
            rejected: BTreeMap::new(),
            adopted_final_state: None,
            synced_from: Some(peer.to_string()),
        }
    }
}

/// What [`run`] hands back.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub rounds: Vec<RoundRecord>,
    pub final_round: u64,
    pub model_hash: ModelHash,
    /// The peer whose final state this node adopted after the last round (it had missed part
    /// of that round); `None` when it already held the model most nodes ended on.
    pub adopted_final_state: Option<String>,
}

/// Work finished by a spawned task.
enum Done {
    Published {
        round: u64,
        /// False when the node had left the round (syncing) and withheld the manifest.
        announced: bool,
        base: ModelHash,
        own: Box<TensorSet>,
        samples: u64,
        report: TrainReport,
        feedback: ErrorFeedback,
        delta_bytes: u64,
        raw_bytes: u64,
    },
    TrainFailed {
        round: u64,
        error: String,
        feedback: ErrorFeedback,
    },
    Fetched {
        sender: PeerId,
        round: u64,
        result: Result<(TensorSet, u64), (bool, String, Vec<PeerId>)>,
    },
    Applied {
        round: u64,
        base: Box<TensorSet>,
        hash: ModelHash,
        eval: Option<EvalReport>,
    },
    Synced {
        from: PeerId,
        result: Result<(u64, Box<TensorSet>, OuterState), String>,
    },
}

struct OpenRound {
    started: Instant,
    report: Option<TrainReport>,
    own: Option<(TensorSet, u64)>,
    delta_bytes: u64,
    raw_bytes: u64,
    payload_in: u64,
    wire_at_start: metrics::WireBytes,
    energy_at_start: Option<f64>,
    /// The collect deadline in force when the round aggregated.
    deadline_s: f64,
}

/// Runs rounds until `config.rounds` are applied or `shutdown` fires.
#[allow(clippy::too_many_lines, clippy::too_many_arguments)]
pub async fn run(
    config: CoordinatorConfig,
    me: PeerId,
    trainer: TrainerHandle,
    client: Client,
    mut events: mpsc::Receiver<NetworkEvent>,
    store: Arc<Mutex<BlobStore>>,
    metrics: NodeMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<RunSummary> {
    if matches!(config.topology, Topology::Gossip { .. }) {
        return gossip::run(
            config, me, trainer, client, events, store, metrics, shutdown,
        )
        .await;
    }
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("creating {}", config.out.display()))?;
    let checkpoints = config.out.join("checkpoints");
    let mut feedback = ErrorFeedback::new();
    let mut outer_state = OuterState::default();
    let mut round = 0u64;
    if let Some(restored) = trainer.restore(checkpoints.clone()).await? {
        round = restored.state["next_round"].as_u64().unwrap_or(0);
        let mut outer = Vec::new();
        for (name, shape, values) in restored.extras {
            if let Some(tensor) = name.strip_prefix("feedback/") {
                feedback.restore_residual(tensor, values);
            } else if let Some(tensor) = name.strip_prefix("outer/") {
                outer.push(meshtune_protocol::Tensor::new(tensor, shape, values)?);
            }
        }
        outer_state = OuterState::from_tensors(&TensorSet::new(outer)?)
            .context("outer optimizer state in the checkpoint")?;
        tracing::info!(round, "resumed from checkpoint");
    }
    let mut base = trainer.weights().await?;
    let layout: ModelLayout = base.layout();
    let mut base_hash = ModelHash::of_tensors(&base);
    blocking(|| serve_state(&store, &config, me, round, &base, &outer_state))?;
    let rounds_path = config.out.join("rounds.jsonl");
    let mut records: Vec<RoundRecord> = std::fs::read_to_string(&rounds_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &RoundRecord| r.round < round)
        .collect();

    let mut mesh_peers = 0usize;
    // Events that arrive before the round machine exists (while waiting for peers, while
    // catching up on the mesh's state): handed to it first, so that a node joining a running
    // mesh does not miss the deltas of its first round, nor the peers that joined its mesh
    // meanwhile (a mesh size left at its first count closes rounds before the others' deltas).
    let mut replay: VecDeque<NetworkEvent> = VecDeque::new();
    if config.wait_for_peers > 0 {
        let until = tokio::time::Instant::now() + config.wait_timeout;
        tracing::info!(want = config.wait_for_peers, "waiting for mesh peers");
        while mesh_peers < config.wait_for_peers {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(until) => {
                    tracing::warn!(have = mesh_peers, want = config.wait_for_peers, "starting with fewer mesh peers than wanted");
                    break;
                }
                event = events.recv() => match event {
                    Some(NetworkEvent::MeshPeers(n)) => mesh_peers = n,
                    Some(manifest @ NetworkEvent::Manifest { .. }) => {
                        // A mesh already running (this node restarted or joins late): kept
                        // for the round machine, which judges them once it exists.
                        replay.push_back(manifest);
                    }
                    Some(NetworkEvent::Listening(_)) => {}
                    None => break,
                },
            }
        }
    }
    metrics.mesh_peers.set(mesh_peers as i64);
    let ledger = Ledger {
        trainer: &trainer,
        checkpoints: &checkpoints,
        rounds_path: &rounds_path,
        store: &store,
        config: &config,
        me,
    };
    // Back from a restart (or new) while the mesh already moved on: adopt its state before
    // the first round rather than training a round nobody else is in. Waiting for manifests
    // instead can miss the whole rest of a short run (a mesh whose last rounds went by while
    // this node was down), and training alone meanwhile makes the others wait for it.
    if mesh_peers > 0
        && let Some(Some((peer, their_round))) = drain_while(
            mesh_ahead(&client, &config.mesh_id, round),
            &client,
            &mut events,
            Some(&mut replay),
            &shutdown,
        )
        .await
    {
        tracing::info!(peer = %peer, their_round, our_round = round, "the mesh is ahead of this node: adopting its state before the first round");
        let fetched = drain_while(
            fetch_state(
                &client,
                peer,
                their_round,
                layout.clone(),
                &config,
                Some(&metrics),
            ),
            &client,
            &mut events,
            Some(&mut replay),
            &shutdown,
        )
        .await;
        match fetched {
            Some(Ok((synced_round, weights, outer))) => {
                feedback.clear();
                (base, base_hash, outer_state) = ledger
                    .adopt(
                        peer,
                        synced_round,
                        *weights,
                        outer,
                        &mut records,
                        mesh_peers,
                    )
                    .await?;
                round = synced_round;
            }
            Some(Err(reason)) => {
                tracing::warn!(peer = %peer, reason, "catching up on the mesh's state failed; starting from this node's own state");
            }
            None => {}
        }
    }
    let (done_tx, mut done_rx) = mpsc::channel::<Done>(64);
    let (mut machine, mut actions) = RoundMachine::new(me, round, base_hash, config.round.clone());
    actions.extend(machine.handle(Instant::now(), Input::PeerCount(mesh_peers)));
    // Kept manifests of rounds this node caught up past were honest when sent: ignored here,
    // where the round machine would call the older ones stale and penalise their senders.
    let mut kept = VecDeque::new();
    for event in replay.drain(..) {
        match event {
            NetworkEvent::Manifest {
                message_id,
                source,
                manifest,
            } if manifest.round < round => {
                let _ = client
                    .report_manifest(message_id, source, MessageAcceptance::Ignore)
                    .await;
            }
            event => kept.push_back(event),
        }
    }
    replay = kept;
    let mut manifests: HashMap<(u64, PeerId), Arc<DeltaManifest>> = HashMap::new();
    let mut seen_senders: std::collections::HashSet<PeerId> = std::collections::HashSet::new();
    let mut deltas: HashMap<(u64, PeerId), TensorSet> = HashMap::new();
    let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
    let mut deltas_used = 0usize;
    let mut contributors: Vec<String> = Vec::new();
    let mut round_base = base_hash;
    let mut open = OpenRound {
        started: Instant::now(),
        report: None,
        own: None,
        delta_bytes: 0,
        raw_bytes: 0,
        payload_in: 0,
        wire_at_start: metrics.wire_bytes(),
        energy_at_start: config.energy.as_ref().and_then(EnergyMeter::joules),
        deadline_s: 0.0,
    };
    let mut feedback_slot = Some(std::mem::take(&mut feedback));
    let mut queue: Vec<Action> = actions;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending_train: Option<(u64, ModelHash)> = None;
    let current_round = Arc::new(AtomicU64::new(round));
    // The base the round is trained from: a training that started before a sync must not
    // announce its delta after it (a second manifest for the round would be equivocation).
    let current_base = Arc::new(Mutex::new(base_hash));

    loop {
        current_round.store(
            if machine.phase() == crate::averaging::round::Phase::Syncing {
                u64::MAX
            } else {
                machine.round()
            },
            Ordering::SeqCst,
        );
        if let Ok(mut current) = current_base.lock() {
            *current = base_hash;
        }
        // Perform queued actions.
        while let Some(action) = pop_front(&mut queue) {
            match action {
                Action::Train { round, base: hash } => {
                    if hash != base_hash || config.rounds.is_some_and(|n| round >= n) {
                        continue;
                    }
                    let steps =
                        if config.final_exchange && config.rounds.is_some_and(|n| round + 1 == n) {
                            0
                        } else {
                            config.local_steps
                        };
                    let Some(fb) = feedback_slot.take() else {
                        // A training task is running; train this round when it returns.
                        pending_train = Some((round, hash));
                        continue;
                    };
                    open = OpenRound {
                        started: Instant::now(),
                        report: None,
                        own: None,
                        delta_bytes: 0,
                        raw_bytes: 0,
                        payload_in: 0,
                        wire_at_start: metrics.wire_bytes(),
                        energy_at_start: config.energy.as_ref().and_then(EnergyMeter::joules),
                        deadline_s: 0.0,
                    };
                    metrics.round.set(round as i64);
                    tokio::spawn(train_and_publish(
                        TrainJob {
                            round,
                            base_hash: hash,
                            base: base.clone(),
                            steps,
                            feedback: fb,
                            me,
                            current_round: Arc::clone(&current_round),
                            current_base: Arc::clone(&current_base),
                        },
                        config.clone(),
                        trainer.clone(),
                        client.clone(),
                        Arc::clone(&store),
                        done_tx.clone(),
                    ));
                }
                Action::Fetch { sender, round } => {
                    let Some(manifest) = manifests.get(&(round, sender)).cloned() else {
                        continue;
                    };
                    let peers = client.mesh_peers().await.unwrap_or_default();
                    let mut providers = vec![sender];
                    providers.extend(peers.into_iter().filter(|p| *p != sender).take(3));
                    tokio::spawn(fetch_delta(
                        manifest,
                        providers,
                        layout.clone(),
                        config.clone(),
                        client.clone(),
                        Arc::clone(&store),
                        done_tx.clone(),
                    ));
                }
                Action::Aggregate {
                    round,
                    own,
                    peers: senders,
                } => {
                    open.deadline_s = machine.collect_timeout().as_secs_f64();
                    let mut inputs: Vec<(String, f64, &TensorSet)> = Vec::new();
                    if own && let Some((delta, samples)) = &open.own {
                        inputs.push(("self".into(), *samples as f64, delta));
                    }
                    for sender in &senders {
                        if let (Some(delta), Some(manifest)) = (
                            deltas.get(&(round, *sender)),
                            manifests.get(&(round, *sender)),
                        ) {
                            inputs.push((sender.to_string(), manifest.sample_count as f64, delta));
                        }
                    }
                    // Self-reported sample counts are capped at twice the median, so one peer
                    // cannot claim the whole average.
                    let mut weights: Vec<f64> = inputs.iter().map(|i| i.1.max(1.0)).collect();
                    let mut sorted = weights.clone();
                    sorted.sort_by(f64::total_cmp);
                    if let Some(median) = sorted.get(sorted.len() / 2).copied() {
                        for w in &mut weights {
                            *w = w.min(2.0 * median);
                        }
                    }
                    let norms: Vec<f64> = inputs.iter().map(|i| l2_norm(i.2)).collect();
                    let outliers = norm_outliers(&norms, config.norm_outlier_factor);
                    for &i in &outliers {
                        tracing::warn!(round, sender = %inputs[i].0, norm = norms[i], "leaving out a delta far above the round's median norm");
                        *rejected.entry("norm_outlier".into()).or_insert(0) += 1;
                        metrics.rejected("norm_outlier");
                    }
                    let used: Vec<WeightedDelta<'_>> = inputs
                        .iter()
                        .zip(&weights)
                        .enumerate()
                        .filter(|(i, _)| !outliers.contains(i))
                        .map(|(_, (input, w))| WeightedDelta {
                            weight: *w,
                            delta: input.2,
                        })
                        .collect();
                    let count = used.len();
                    contributors = inputs
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !outliers.contains(i))
                        .map(|(_, input)| {
                            if input.0 == "self" {
                                me.to_string()
                            } else {
                                input.0.clone()
                            }
                        })
                        .collect();
                    contributors.sort();
                    round_base = base_hash;
                    let mut next = base.clone();
                    if count > 0 {
                        let combined = aggregate(&used, config.aggregation)?;
                        apply_outer_step(&mut next, &combined, config.outer, &mut outer_state)?;
                    }
                    drop(used);
                    tracing::info!(round, deltas = count, "aggregated");
                    metrics.deltas_used.set(count as i64);
                    let next_hash = ModelHash::of_tensors(&next);
                    tokio::spawn(apply_round(
                        round,
                        next,
                        next_hash,
                        trainer.clone(),
                        config.eval_every > 0
                            && (round % config.eval_every == 0
                                || config.rounds.is_some_and(|n| round + 1 == n)),
                        config.energy.clone(),
                        done_tx.clone(),
                    ));
                    deltas_used = count;
                }
                Action::SyncState { from, round } => {
                    tokio::spawn(sync_state(
                        from,
                        round,
                        layout.clone(),
                        config.clone(),
                        client.clone(),
                        metrics.clone(),
                        done_tx.clone(),
                    ));
                }
                Action::Forget { before_round } => {
                    manifests.retain(|(r, _), _| *r >= before_round);
                    deltas.retain(|(r, _), _| *r >= before_round);
                    if let Ok(mut store) = store.lock() {
                        store.forget_before(before_round.saturating_sub(1));
                    }
                }
                Action::Judge {
                    sender,
                    verdict: Verdict::Reject(reason),
                    ..
                } => {
                    *rejected.entry(reason.label().into()).or_insert(0) += 1;
                    metrics.rejected(reason.label());
                    if reason == RejectReason::BadData {
                        let _ = client.strike(sender, "invalid delta data").await;
                    }
                }
                Action::Judge { .. } => {}
            }
        }

        if config.rounds.is_some_and(|n| machine.round() >= n) {
            break;
        }
        let deadline = machine.deadline();
        let input = tokio::select! {
            () = shutdown.cancelled() => break,
            () = sleep_until(deadline) => Input::Tick,
            _ = tick.tick() => Input::Tick,
            event = next_event(&mut replay, &mut events) => match event {
                None => break,
                Some(NetworkEvent::Listening(_)) => continue,
                Some(NetworkEvent::MeshPeers(n)) => {
                    mesh_peers = n;
                    metrics.mesh_peers.set(n as i64);
                    match client.mesh_peers().await {
                        Ok(peers) => Input::Peers(peers),
                        Err(_) => Input::PeerCount(n),
                    }
                }
                Some(NetworkEvent::Manifest { message_id, source, manifest }) => {
                    let Ok(sender) = PeerId::from_bytes(&manifest.sender) else { continue };
                    if seen_senders.insert(sender)
                        && machine.round() > 0
                        && (manifest.base_model != base_hash || manifest.round.abs_diff(machine.round()) >= 2)
                    {
                        // A sender never heard before, on a model this node's rounds did not
                        // produce: two halves of a split mesh found each other (or a node is
                        // back from a long outage). The base rules pick the surviving model.
                        metrics.lineage_merges.inc();
                        tracing::warn!(
                            peer = %sender, their_round = manifest.round, our_round = machine.round(),
                            their_base = %manifest.base_model, our_base = %base_hash,
                            "a peer from another part of the mesh joined (a split mesh merging, or a node back from an outage): the model most nodes hold wins"
                        );
                    }
                    let input = Input::ManifestReceived {
                        sender,
                        round: manifest.round,
                        base: manifest.base_model,
                        blob: manifest.blob.blob_hash,
                    };
                    let actions = machine.handle(Instant::now(), input);
                    let mut acceptance = MessageAcceptance::Ignore;
                    for action in &actions {
                        if let Action::Judge { sender: s, round: r, verdict } = action
                            && *s == sender && *r == manifest.round
                        {
                            acceptance = match verdict {
                                Verdict::Accept => MessageAcceptance::Accept,
                                Verdict::Ignore => MessageAcceptance::Ignore,
                                Verdict::Reject(_) => MessageAcceptance::Reject,
                            };
                            if *verdict == Verdict::Accept {
                                manifests.entry((manifest.round, sender)).or_insert_with(|| Arc::clone(&manifest));
                            }
                        }
                    }
                    let _ = client.report_manifest(message_id, source, acceptance).await;
                    queue.extend(actions);
                    continue;
                }
            },
            done = done_rx.recv() => match done {
                None => break,
                Some(Done::Published { round, announced, base: hash, own, samples, report, feedback: fb, delta_bytes, raw_bytes }) => {
                    feedback_slot = Some(fb);
                    metrics.train_loss.set(report.loss);
                    if !announced {
                        if let Some((r, h)) = pending_train.take() {
                            queue.push(Action::Train { round: r, base: h });
                        }
                        queue.extend(machine.handle(Instant::now(), Input::LocalDeltaWithheld { round }));
                        continue;
                    }
                    if round == machine.round() && hash == base_hash {
                        open.report = Some(report);
                        open.own = Some((*own, samples));
                        open.delta_bytes = delta_bytes;
                        open.raw_bytes = raw_bytes;
                        metrics.bytes("delta_out", delta_bytes);
                    }
                    if let Some((r, h)) = pending_train.take() {
                        queue.push(Action::Train { round: r, base: h });
                    }
                    Input::LocalDeltaPublished { round, base: hash }
                }
                Some(Done::TrainFailed { round, error, feedback: fb }) => {
                    feedback_slot = Some(fb);
                    tracing::error!(round, error, "local training failed; the round goes on without this node's delta");
                    if let Some((r, h)) = pending_train.take() {
                        queue.push(Action::Train { round: r, base: h });
                        continue;
                    }
                    // Publish nothing, but let the round complete on peers' deltas.
                    Input::LocalTrainingFailed { round }
                }
                Some(Done::Fetched { sender, round, result }) => match result {
                    Ok((delta, bytes)) => {
                        deltas.insert((round, sender), delta);
                        if round == machine.round() {
                            open.payload_in += bytes;
                        }
                        metrics.bytes("delta_in", bytes);
                        Input::DeltaReady { sender, round }
                    }
                    Err((bad_data, reason, bad_peers)) => {
                        tracing::warn!(peer = %sender, round, bad_data, reason, "delta not usable");
                        for peer in bad_peers.into_iter().filter(|p| *p != sender) {
                            let _ = client.strike(peer, "served bad chunks").await;
                        }
                        if !bad_data {
                            *rejected.entry("unavailable".into()).or_insert(0) += 1;
                            metrics.rejected("unavailable");
                        }
                        Input::DeltaFailed { sender, round, bad_data }
                    }
                },
                Some(Done::Applied { round, base: next, hash, eval }) => {
                    base = *next;
                    base_hash = hash;
                    let wire = metrics.wire_bytes().since(&open.wire_at_start);
                    let (wire_in, wire_out) = (wire.inbound, wire.outbound);
                    let report = open.report.unwrap_or(TrainReport { steps: 0, samples: 0, loss: f64::NAN, seconds: 0.0, tokens: 0, energy_j: None });
                    let seconds_total = open.started.elapsed().as_secs_f64();
                    let seconds_eval = eval.map_or(0.0, |e| e.seconds);
                    let round_j = config.energy.as_ref().and_then(EnergyMeter::joules).zip(open.energy_at_start).map(|(now, start)| now - start);
                    let comm_j = round_j.zip(report.energy_j).map(|(total, compute)| {
                        (total - compute - eval.and_then(|e| e.energy_j).unwrap_or(0.0)).max(0.0)
                    });
                    let energy = RoundEnergy::new(
                        report.tokens,
                        report.seconds,
                        (seconds_total - report.seconds - seconds_eval).max(0.0),
                        report.energy_j,
                        comm_j,
                    );
                    let record = RoundRecord {
                        round,
                        peer_id: me.to_string(),
                        train_loss: report.loss.is_finite().then_some(report.loss),
                        train_samples: report.samples,
                        eval_loss: eval.map(|e| e.loss),
                        rouge_l: eval.map(|e| e.rouge_l),
                        deltas: deltas_used,
                        mesh_peers,
                        delta_bytes: open.delta_bytes,
                        raw_delta_bytes: open.raw_bytes,
                        payload_in: open.payload_in,
                        wire_in,
                        wire_out,
                        amplification: (open.payload_in > 0).then(|| wire_in as f64 / open.payload_in as f64),
                        wire_in_by_protocol: wire.inbound_by_protocol,
                        seconds_train: report.seconds,
                        seconds_total,
                        seconds_eval,
                        deadline_s: open.deadline_s,
                        tokens: report.tokens,
                        energy,
                        model_hash: hash.to_string(),
                        base_hash: round_base.to_string(),
                        contributors: std::mem::take(&mut contributors),
                        rss_bytes: process_memory("VmRSS:"),
                        peak_rss_bytes: process_memory("VmHWM:"),
                        rejected: std::mem::take(&mut rejected),
                        adopted_final_state: None,
                        synced_from: None,
                    };
                    metrics.round_seconds.set(record.seconds_total);
                    metrics.record_energy(&record.energy);
                    if let Some(e) = eval {
                        metrics.eval_loss.set(e.loss);
                        metrics.eval_rouge_l.set(e.rouge_l);
                    }
                    tracing::info!(
                        round,
                        train_loss = record.train_loss,
                        rouge_l = record.rouge_l,
                        deltas = record.deltas,
                        peers = mesh_peers,
                        delta_bytes = record.delta_bytes,
                        wire_in,
                        wire_out,
                        amplification = record.amplification,
                        seconds = record.seconds_total,
                        "round applied"
                    );
                    let extras = checkpoint_extras(feedback_slot.as_ref(), &outer_state, &config, &base);
                    trainer
                        .save(checkpoints.clone(), (round + 1) as usize, serde_json::json!({"next_round": round + 1, "model_hash": hash.to_string()}), extras)
                        .await
                        .context("checkpoint after the round")?;
                    append_record(&rounds_path, &record)?;
                    records.push(record);
                    blocking(|| serve_state(&store, &config, me, round + 1, &base, &outer_state))?;
                    Input::RoundApplied { round, new_base: hash }
                }
                Some(Done::Synced { from, result }) => match result {
                    Ok((synced_round, weights, outer)) => {
                        if let Some(fb) = feedback_slot.as_mut() {
                            fb.clear();
                        }
                        (base, base_hash, outer_state) = ledger
                            .adopt(from, synced_round, *weights, outer, &mut records, mesh_peers)
                            .await?;
                        if let Ok(mut current) = current_base.lock() {
                            *current = base_hash;
                        }
                        Input::StateSynced { round: synced_round, base: base_hash }
                    }
                    Err(reason) => {
                        tracing::warn!(peer = %from, reason, "state sync failed");
                        Input::SyncFailed { from }
                    }
                },
            },
        };
        queue.extend(machine.handle(Instant::now(), input));
    }
    let finished = !shutdown.is_cancelled()
        && mesh_peers > 0
        && config.rounds.is_some_and(|n| machine.round() >= n);
    let mut adopted_final_state = None;
    if finished && !config.linger_quiet.is_zero() {
        // No round follows the last one to repair a node that missed part of it, so the nodes
        // compare final states: wait (bounded) until every mesh peer finished, and adopt the
        // model most nodes hold if it is not this one.
        let final_round = machine.round();
        let last_round_s = records.last().map_or(0.0, |r| r.seconds_total);
        let wait = (machine.collect_timeout() * 2 + Duration::from_secs_f64(2.0 * last_round_s))
            .min(Duration::from_secs(1_800));
        let reports = drain_while(
            final_states(&client, &config.mesh_id, final_round, wait),
            &client,
            &mut events,
            None,
            &shutdown,
        )
        .await
        .unwrap_or_default();
        if let Some((peer, hash, agreeing)) = final_state_winner(base_hash, &reports) {
            tracing::warn!(
                peer = %peer, ours = %base_hash, theirs = %hash, agreeing, asked = reports.len(),
                "the mesh ended on another model (this node missed part of the last round): adopting it"
            );
            let synced = drain_while(
                sync_state(
                    peer,
                    final_round,
                    layout.clone(),
                    config.clone(),
                    client.clone(),
                    metrics.clone(),
                    done_tx.clone(),
                ),
                &client,
                &mut events,
                None,
                &shutdown,
            )
            .await;
            while synced.is_some() {
                let Ok(done) = done_rx.try_recv() else { break };
                let Done::Synced { from, result } = done else {
                    continue;
                };
                match result {
                    Ok((round, weights, outer))
                        if ModelHash::of_tensors(&weights) == hash && round == final_round =>
                    {
                        // This node's record of the last round exists, so `adopt` writes
                        // no catch-up record; that record is rewritten below instead.
                        (_, base_hash, _) = ledger
                            .adopt(from, final_round, *weights, outer, &mut records, mesh_peers)
                            .await?;
                        metrics.final_state_adopted.inc();
                        tracing::info!(peer = %from, hash = %base_hash, "adopted the mesh's final state");
                        adopted_final_state = Some(from.to_string());
                        if let Some(last) = records.last_mut() {
                            last.model_hash = hash.to_string();
                            last.adopted_final_state = Some(from.to_string());
                        }
                        rewrite_records(&rounds_path, &records)?;
                    }
                    Ok((round, weights, _)) => tracing::error!(
                        peer = %from, round, hash = %ModelHash::of_tensors(&weights),
                        "the peer's final state changed since it reported it; keeping this node's model"
                    ),
                    Err(reason) => tracing::error!(
                        peer = %from, reason,
                        "could not fetch the mesh's final state; this node ends on its own model"
                    ),
                }
                break;
            }
        }
    }
    if finished && !config.linger_quiet.is_zero() {
        linger(
            &store,
            &mut events,
            &shutdown,
            config.linger_quiet,
            config.round.collect_timeout,
        )
        .await;
    }
    Ok(RunSummary {
        rounds: records,
        final_round: machine.round(),
        model_hash: base_hash,
        adopted_final_state,
    })
}

/// Mesh peers other than `from` that serve the very state blob `manifest` names (up to
/// [`MAX_STATE_DONORS`] - 1), asked all at once.
pub async fn same_state_holders(
    client: &Client,
    mesh_id: &str,
    manifest: &StateManifest,
    from: PeerId,
) -> Vec<PeerId> {
    latest_states(client, mesh_id)
        .await
        .into_iter()
        .filter(|(peer, m)| *peer != from && m.blob == manifest.blob)
        .map(|(peer, _)| peer)
        .take(MAX_STATE_DONORS - 1)
        .collect()
}

/// Every mesh peer's latest state of `mesh_id`, asked all at once (5 s each); peers that do
/// not answer, have no state, or serve another mesh are left out.
async fn latest_states(client: &Client, mesh_id: &str) -> Vec<(PeerId, StateManifest)> {
    let peers = client.mesh_peers().await.unwrap_or_default();
    let asks = peers.into_iter().map(|peer| {
        let request = ChunkRequest::LatestState {
            mesh_id: mesh_id.to_owned(),
        };
        async move {
            match tokio::time::timeout(Duration::from_secs(5), client.request(peer, request)).await
            {
                Ok(Ok(ChunkResponse::State(m))) if m.mesh_id == mesh_id => Some((peer, m)),
                _ => None,
            }
        }
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Donors one state sync pulls from at most.
pub const MAX_STATE_DONORS: usize = 8;

/// Runs `work` while draining network events (so the swarm never drops events on a full
/// channel); `None` when `shutdown` fires or the network stops first.
///
/// Events go to `keep` when given (manifests for the round machine to judge later, and the
/// changes of the mesh's size, which are not sent again); without it manifests are ignored:
/// after the last round, no round is left that could use them.
async fn drain_while<T>(
    work: impl std::future::Future<Output = T>,
    client: &Client,
    events: &mut mpsc::Receiver<NetworkEvent>,
    mut keep: Option<&mut VecDeque<NetworkEvent>>,
    shutdown: &CancellationToken,
) -> Option<T> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return None,
            out = &mut work => return Some(out),
            event = events.recv() => match (event?, keep.as_deref_mut()) {
                (NetworkEvent::Listening(_), _) => {}
                (event, Some(keep)) => keep.push_back(event),
                (NetworkEvent::Manifest { message_id, source, .. }, None) => {
                    let _ = client.report_manifest(message_id, source, MessageAcceptance::Ignore).await;
                }
                (_, None) => {}
            }
        }
    }
}

/// The next network event: the kept ones first.
async fn next_event(
    kept: &mut VecDeque<NetworkEvent>,
    events: &mut mpsc::Receiver<NetworkEvent>,
) -> Option<NetworkEvent> {
    match kept.pop_front() {
        Some(event) => Some(event),
        None => events.recv().await,
    }
}

/// Asks every mesh peer for its latest state: when most of them are past `round` (they ran
/// rounds without this node), the peer to sync from and its round: the most advanced state
/// held by the most peers. A minority ahead is not followed (it may be lying), and peers of
/// another mesh or without a state do not count for either side.
async fn mesh_ahead(client: &Client, mesh_id: &str, round: u64) -> Option<(PeerId, u64)> {
    let states: Vec<(PeerId, u64, ModelHash)> = latest_states(client, mesh_id)
        .await
        .into_iter()
        .map(|(peer, m)| (peer, m.round, m.model_hash))
        .collect();
    crate::averaging::round::ahead_majority(round, &states)
}

/// Where a node's history goes: the trainer that holds the model, checkpoints,
/// `rounds.jsonl`, and the state it serves to peers.
struct Ledger<'a> {
    trainer: &'a TrainerHandle,
    checkpoints: &'a std::path::Path,
    rounds_path: &'a std::path::Path,
    store: &'a Arc<Mutex<BlobStore>>,
    config: &'a CoordinatorConfig,
    me: PeerId,
}

impl Ledger<'_> {
    /// Adopts `from`'s state of `round` (the model after round `round - 1`): the trainer takes
    /// the weights, the state is checkpointed as this node's resume point and served, and when
    /// rounds were skipped a catch-up record ends them, so a node restarted after the mesh's
    /// last round still ends on a record of the mesh's model. The mesh's outer optimizer state
    /// comes with its model, so the next outer step here is the one every other node takes.
    async fn adopt(
        &self,
        from: PeerId,
        round: u64,
        weights: TensorSet,
        outer: OuterState,
        records: &mut Vec<RoundRecord>,
        mesh_peers: usize,
    ) -> anyhow::Result<(TensorSet, ModelHash, OuterState)> {
        let (config, me) = (self.config, self.me);
        self.trainer.set_weights(weights.clone()).await?;
        let hash = ModelHash::of_tensors(&weights);
        self.trainer
            .save(
                self.checkpoints.to_path_buf(),
                round as usize,
                serde_json::json!({"next_round": round, "model_hash": hash.to_string()}),
                checkpoint_extras(None, &outer, config, &weights),
            )
            .await
            .context("checkpoint after adopting a peer's state")?;
        if let Some(last) = round.checked_sub(1)
            && records.last().is_none_or(|r| r.round < last)
        {
            let record = RoundRecord::synced(last, me, from, hash, mesh_peers);
            append_record(self.rounds_path, &record)?;
            records.push(record);
        }
        blocking(|| serve_state(self.store, config, me, round, &weights, &outer))?;
        tracing::info!(peer = %from, round, hash = %hash, "adopted a peer's state");
        Ok((weights, hash, outer))
    }
}

/// Asks every mesh peer for its latest state until all of them report `final_round` (or
/// `wait` runs out): the final model hash of each peer that finished. A peer still in an
/// earlier round is asked again every half second, so this node keeps serving it meanwhile.
async fn final_states(
    client: &Client,
    mesh_id: &str,
    final_round: u64,
    wait: Duration,
) -> Vec<(PeerId, ModelHash)> {
    let start = Instant::now();
    let mut finished: HashMap<PeerId, ModelHash> = HashMap::new();
    loop {
        let peers = client.mesh_peers().await.unwrap_or_default();
        let mut behind = Vec::new();
        let unfinished: Vec<PeerId> = peers
            .into_iter()
            .filter(|p| !finished.contains_key(p))
            .collect();
        for peer in unfinished {
            let request = ChunkRequest::LatestState {
                mesh_id: mesh_id.to_owned(),
            };
            match tokio::time::timeout(Duration::from_secs(5), client.request(peer, request)).await
            {
                Ok(Ok(ChunkResponse::State(m)))
                    if m.mesh_id == mesh_id && m.round == final_round =>
                {
                    finished.insert(peer, m.model_hash);
                }
                // A peer configured for more rounds: not part of this ending.
                Ok(Ok(ChunkResponse::State(m))) if m.round > final_round => {}
                _ => behind.push(peer),
            }
        }
        if behind.is_empty() {
            break;
        }
        if start.elapsed() >= wait {
            tracing::warn!(
                waiting_for = ?behind, seconds = wait.as_secs_f64(),
                "peers did not finish the last round in time; comparing final models without them"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tracing::info!(
        finished = finished.len(),
        "compared final models with peers"
    );
    finished.into_iter().collect()
}

/// Serves blobs until no peer fetched anything for `quiet` (at most `max`), draining network
/// events so the swarm never waits on a full channel.
async fn linger(
    store: &Mutex<BlobStore>,
    events: &mut mpsc::Receiver<NetworkEvent>,
    shutdown: &CancellationToken,
    quiet: Duration,
    max: Duration,
) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tracing::info!(
        quiet_s = quiet.as_secs_f64(),
        "last round applied; serving blobs while peers still fetch"
    );
    loop {
        let last = store
            .lock()
            .ok()
            .and_then(|s| s.last_served())
            .map_or(start, |t| t.max(start));
        let now = Instant::now();
        if now.duration_since(last) >= quiet || now.duration_since(start) >= max {
            break;
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
            event = events.recv() => if event.is_none() { break },
        }
    }
    tracing::info!(
        seconds = start.elapsed().as_secs_f64(),
        "stopped serving: peers stopped fetching"
    );
}

/// What a checkpoint holds besides the weights: the error-feedback residuals (when there are
/// any to keep) and the outer optimizer state, restored by [`run`] on start.
fn checkpoint_extras(
    feedback: Option<&ErrorFeedback>,
    outer: &OuterState,
    config: &CoordinatorConfig,
    base: &TensorSet,
) -> Vec<meshtune_model::checkpoint::HostParam> {
    let mut extras = Vec::new();
    if let Some(fb) = feedback {
        for (name, values) in fb.residuals() {
            extras.push((
                format!("feedback/{name}"),
                vec![values.len()],
                values.to_vec(),
            ));
        }
    }
    for t in outer.to_tensors(config.outer, base).into_tensors() {
        extras.push((format!("outer/{}", t.name), t.shape, t.values));
    }
    extras
}

fn pop_front(queue: &mut Vec<Action>) -> Option<Action> {
    if queue.is_empty() {
        None
    } else {
        Some(queue.remove(0))
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Replaces `rounds.jsonl` with `records` (atomically: temporary file, then rename).
fn rewrite_records(path: &std::path::Path, records: &[RoundRecord]) -> anyhow::Result<()> {
    let mut text = String::new();
    for record in records {
        text.push_str(&serde_json::to_string(record)?);
        text.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// A memory figure of this process from `/proc/self/status` (`VmRSS:`, `VmHWM:`, ...), in bytes;
/// `None` where there is no procfs.
pub fn process_memory(field: &str) -> Option<u64> {
    let kib: u64 = std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn append_record(path: &std::path::Path, record: &RoundRecord) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(file, "{}", serde_json::to_string(record)?)?;
    file.sync_data()?;
    Ok(())
}

/// Encodes the current base and the outer optimizer's state losslessly and serves them to
/// late joiners and to nodes that resynchronise.
/// Serves `base` (with the outer optimizer state) as this node's latest state for `round`.
pub fn serve_state(
    store: &Arc<Mutex<BlobStore>>,
    config: &CoordinatorConfig,
    me: PeerId,
    round: u64,
    base: &TensorSet,
    outer: &OuterState,
) -> anyhow::Result<()> {
    let outer = outer.to_tensors(config.outer, base);
    let raw = (base.total_elements() + outer.total_elements()) * 4;
    if raw >= config.stream_state_bytes {
        return serve_state_file(store, config, me, round, base, &outer);
    }
    let encoded = encode_state(base, &outer, &StateCodecParams::default())?;
    let chunks = chunk_blob(&encoded.blob, config.chunk_size)?;
    let manifest = StateManifest {
        mesh_id: config.mesh_id.clone(),
        round,
        model_hash: encoded.model_hash,
        sender: me.to_bytes(),
        // Local optimizer steps each node took to reach this model.
        training_steps: round * config.local_steps as u64,
        blob: chunks.descriptor(),
        model: encoded.model,
        optimizer: encoded.optimizer,
    };
    if let Ok(mut store) = store.lock() {
        store.set_state(manifest, Arc::new(encoded.blob), chunks);
    }
    Ok(())
}

/// Runs `work` (encoding a state: seconds to minutes for a large model) without stalling the
/// runtime's other tasks (the network, fetches) on a multi-threaded runtime.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// [`serve_state`] for a large state: encoded straight to `OUT/state/` tensor by tensor and
/// served from there, so the blob never sits in memory next to the model. The store deletes
/// the file once a newer state (and the one before it) replaced it.
fn serve_state_file(
    store: &Arc<Mutex<BlobStore>>,
    config: &CoordinatorConfig,
    me: PeerId,
    round: u64,
    base: &TensorSet,
    outer: &TensorSet,
) -> anyhow::Result<()> {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let dir = config.out.join("state");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // A unique name: a state re-served for the same round must not reuse a file the store
    // may still serve (and delete) under the old entry.
    let path = dir.join(format!(
        "state-{round}-{}-{}.blob",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let mut writer = std::io::BufWriter::with_capacity(4 << 20, file);
    let (index, chunks) = encode_state_to(
        base,
        outer,
        &StateCodecParams::default(),
        &mut writer,
        config.chunk_size,
    )
    .with_context(|| format!("writing {}", path.display()))?;
    let file = writer
        .into_inner()
        .map_err(|err| anyhow::anyhow!("writing {}: {}", path.display(), err.error()))?;
    let verified = VerifiedFile::written(file, &chunks)
        .with_context(|| format!("reading back {}", path.display()))?;
    let manifest = StateManifest {
        mesh_id: config.mesh_id.clone(),
        round,
        model_hash: index.model_hash,
        sender: me.to_bytes(),
        training_steps: round * config.local_steps as u64,
        blob: chunks.descriptor(),
        model: index.model,
        optimizer: index.optimizer,
    };
    let bytes = BlobBytes::File(Arc::new(BlobFile {
        file: verified,
        path,
    }));
    if let Ok(mut store) = store.lock() {
        store.set_state_bytes(manifest, bytes, chunks);
    }
    Ok(())
}

/// How long a publish is retried while the gossip mesh forms.
const PUBLISH_RETRY: Duration = Duration::from_secs(10);

struct TrainJob {
    round: u64,
    base_hash: ModelHash,
    base: TensorSet,
    steps: usize,
    feedback: ErrorFeedback,
    me: PeerId,
    /// The round the machine is collecting for (`u64::MAX` while syncing).
    current_round: Arc<AtomicU64>,
    current_base: Arc<Mutex<ModelHash>>,
}

async fn train_and_publish(
    job: TrainJob,
    config: CoordinatorConfig,
    trainer: TrainerHandle,
    client: Client,
    store: Arc<Mutex<BlobStore>>,
    done: mpsc::Sender<Done>,
) {
    let TrainJob {
        round,
        base_hash,
        base,
        steps,
        mut feedback,
        me,
        current_round,
        current_base,
    } = job;
    let result: anyhow::Result<(TrainReport, TensorSet)> = async {
        // The trainer may hold weights from before a sync or a restore: start from the base.
        trainer.set_weights(base.clone()).await?;
        let before = config.energy.as_ref().and_then(EnergyMeter::joules);
        let mut report = trainer.train(steps).await?;
        let after = config.energy.as_ref().and_then(EnergyMeter::joules);
        report.energy_j = before.zip(after).map(|(b, a)| a - b);
        let after = trainer.weights().await?;
        Ok((report, after))
    }
    .await;
    let (report, after) = match result {
        Ok(ok) => ok,
        Err(err) => {
            let _ = done
                .send(Done::TrainFailed {
                    round,
                    error: format!("{err:#}"),
                    feedback,
                })
                .await;
            return;
        }
    };
    let codec = config.codec;
    let limits = config.limits.clone();
    let chunk_size = config.chunk_size;
    let mesh_id = config.mesh_id.clone();
    let misbehave = config.misbehave.map(|m| m.in_round(round));
    // Encoding a large model takes a while: off the async threads. The residuals come back on
    // error too, so a failed encode does not lose what earlier rounds left out (encode_delta
    // checks every tensor before it touches a residual).
    let encoded = tokio::task::spawn_blocking(move || {
        let result = (|| {
            let mut delta = difference(&after, &base)?;
            let raw_bytes = delta.total_elements() * 4;
            let codec = match misbehave {
                Some(Some(factor)) => {
                    tracing::warn!(
                        round,
                        factor,
                        "byzantine: publishing a scaled delta on purpose"
                    );
                    for (_, values) in delta.values_mut() {
                        values.iter_mut().for_each(|v| *v *= factor);
                    }
                    codec
                }
                Some(None) => "f32".parse::<CodecParams>()?,
                None => codec,
            };
            let lossy = !codec.is_lossless();
            let mut encoded = encode_delta(&delta, &codec, lossy.then_some(&mut feedback))?;
            if misbehave == Some(None) {
                tracing::warn!(round, "byzantine: publishing a NaN delta on purpose");
                let first = &encoded.tensors[0];
                let (start, end) = (
                    first.offset as usize,
                    (first.offset + first.length) as usize,
                );
                for value in encoded.blob[start..end].chunks_exact_mut(4) {
                    value.copy_from_slice(&f32::NAN.to_le_bytes());
                }
            }
            let chunks = chunk_blob(&encoded.blob, chunk_size)?;
            let manifest = DeltaManifest {
                mesh_id,
                round,
                base_model: base_hash,
                sender: me.to_bytes(),
                sample_count: report.samples.max(1),
                training_steps: report.steps as u64,
                blob: chunks.descriptor(),
                tensors: encoded.tensors,
            };
            let bytes = manifest.encode(&limits)?;
            // What peers will decode, so every node aggregates identical values.
            let verified = meshtune_protocol::VerifiedBlob::verify(encoded.blob, &manifest.blob)?;
            let own = if misbehave == Some(None) {
                delta
            } else {
                decode_delta(&manifest, &verified, &delta.layout(), &limits)?
            };
            anyhow::Ok((bytes, manifest, own, chunks, verified, raw_bytes))
        })();
        (feedback, result)
    })
    .await;
    let (feedback, encoded) = match encoded {
        Ok((feedback, result)) => (
            feedback,
            result.map_err(|err| format!("encoding the delta: {err:#}")),
        ),
        // The encoder panicked: its residuals are gone with it.
        Err(err) => (ErrorFeedback::new(), Err(format!("encoder task: {err}"))),
    };
    let (manifest_bytes, manifest, own, chunks, verified, raw_bytes) = match encoded {
        Ok(ok) => ok,
        Err(error) => {
            let _ = done
                .send(Done::TrainFailed {
                    round,
                    error,
                    feedback,
                })
                .await;
            return;
        }
    };
    let delta_bytes = verified.as_bytes().len() as u64;
    if let Ok(mut store) = store.lock() {
        store.insert(round, Arc::new(verified.into_bytes()), chunks);
    }
    // A node that synced or moved on meanwhile must not announce a stale round (peers would
    // count it against this node).
    let announced = current_round.load(Ordering::SeqCst) == round
        && current_base.lock().is_ok_and(|b| *b == base_hash);
    if announced {
        // Served to peers that connect after the gossip went out.
        if let Ok(mut store) = store.lock() {
            store.set_current_manifest(manifest);
        }
        // Gossip needs a mesh peer: retry briefly while the gossip mesh forms, but a node with
        // no peer at all does not wait (its round completes on its own delta).
        let started = Instant::now();
        loop {
            match client.publish(manifest_bytes.clone()).await {
                Ok(()) => break,
                Err(err) => {
                    let alone = client.mesh_peers().await.map_or(true, |p| p.is_empty());
                    if alone || started.elapsed() > PUBLISH_RETRY {
                        tracing::warn!(round, error = %err, alone, "delta manifest not published");
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    } else {
        tracing::info!(round, "not announcing a round this node has left");
    }
    tracing::debug!(round, bytes = delta_bytes, raw_bytes, "published delta");
    let _ = done
        .send(Done::Published {
            round,
            announced,
            base: base_hash,
            own: Box::new(own),
            samples: report.samples.max(1),
            report,
            feedback,
            delta_bytes,
            raw_bytes,
        })
        .await;
}

async fn fetch_delta(
    manifest: Arc<DeltaManifest>,
    providers: Vec<PeerId>,
    layout: ModelLayout,
    config: CoordinatorConfig,
    client: Client,
    store: Arc<Mutex<BlobStore>>,
    done: mpsc::Sender<Done>,
) {
    let sender = providers[0];
    let round = manifest.round;
    let result = async {
        let fetched = fetch_blob(
            &client,
            &manifest.blob,
            &providers,
            &config.limits,
            config.fetch,
        )
        .await
        .map_err(|err| match err {
            FetchError::Unavailable { .. } => (false, err.to_string(), Vec::new()),
            FetchError::BadData { ref bad_peers, .. } => {
                let bad = bad_peers.clone();
                (bad.contains(&sender), err.to_string(), bad)
            }
        })?;
        let payload = fetched.payload_bytes;
        let limits = config.limits.clone();
        let manifest_for_decode = Arc::clone(&manifest);
        let (delta, blob) = tokio::task::spawn_blocking(move || {
            decode_delta(&manifest_for_decode, &fetched.blob, &layout, &limits)
                .map(|d| (d, (fetched.blob, fetched.chunks)))
        })
        .await
        .map_err(|err| (false, format!("decoder task: {err}"), Vec::new()))?
        .map_err(|err| (true, format!("decoding: {err}"), vec![sender]))?;
        let norm = l2_norm(&delta);
        if let Some(max) = config.max_delta_norm
            && norm > max
        {
            return Err((
                true,
                format!("delta norm {norm:.3e} exceeds the bound {max:.3e}"),
                vec![sender],
            ));
        }
        if let Ok(mut store) = store.lock() {
            store.insert(round, Arc::new(blob.0.into_bytes()), blob.1);
        }
        Ok((delta, payload))
    }
    .await;
    let _ = done
        .send(Done::Fetched {
            sender,
            round,
            result,
        })
        .await;
}

async fn apply_round(
    round: u64,
    next: TensorSet,
    hash: ModelHash,
    trainer: TrainerHandle,
    evaluate: bool,
    energy: Option<EnergyMeter>,
    done: mpsc::Sender<Done>,
) {
    let result = async {
        trainer.set_weights(next.clone()).await?;
        let eval = if evaluate {
            let before = energy.as_ref().and_then(EnergyMeter::joules);
            let mut report = trainer.evaluate().await?;
            let after = energy.as_ref().and_then(EnergyMeter::joules);
            report.energy_j = before.zip(after).map(|(b, a)| a - b);
            Some(report)
        } else {
            None
        };
        anyhow::Ok(eval)
    }
    .await;
    let eval = match result {
        Ok(eval) => eval,
        Err(err) => {
            tracing::error!(round, error = %format!("{err:#}"), "applying the round failed");
            None
        }
    };
    let _ = done
        .send(Done::Applied {
            round,
            base: Box::new(next),
            hash,
            eval,
        })
        .await;
}

async fn sync_state(
    from: PeerId,
    round: u64,
    layout: ModelLayout,
    config: CoordinatorConfig,
    client: Client,
    metrics: NodeMetrics,
    done: mpsc::Sender<Done>,
) {
    let result = fetch_state(&client, from, round, layout, &config, Some(&metrics)).await;
    let _ = done.send(Done::Synced { from, result }).await;
}

/// A synced state: its round, model, and the mesh's outer optimizer state.
pub type SyncedState = (u64, Box<TensorSet>, OuterState);

/// Fetches and verifies `from`'s latest state (of `round` or later), pulling chunks from every
/// mesh peer that serves the same blob.
pub async fn fetch_state(
    client: &Client,
    from: PeerId,
    round: u64,
    layout: ModelLayout,
    config: &CoordinatorConfig,
    metrics: Option<&NodeMetrics>,
) -> Result<SyncedState, String> {
    async {
        let response = client
            .request(
                from,
                ChunkRequest::LatestState {
                    mesh_id: config.mesh_id.clone(),
                },
            )
            .await
            .map_err(|err| err.to_string())?;
        let ChunkResponse::State(manifest) = response else {
            return Err("peer has no state to serve".to_string());
        };
        if manifest.mesh_id != config.mesh_id {
            return Err(format!("state is for mesh `{}`", manifest.mesh_id));
        }
        if manifest.round < round {
            return Err(format!(
                "peer's state is for round {}, older than round {round}",
                manifest.round
            ));
        }
        // Every peer serving the same state blob is a donor: chunks come from all of them (a
        // few in flight per donor), and a donor that leaves mid-transfer is dropped while
        // the others finish the blob.
        let mut donors = vec![from];
        donors.extend(same_state_holders(client, &config.mesh_id, &manifest, from).await);
        tracing::info!(peer = %from, round = manifest.round, donors = donors.len(), bytes = manifest.blob.blob_size, "syncing state");
        let limits = config.limits.clone();
        let outer_layout = OuterState::layout(config.outer, &layout);
        let state = if manifest.blob.blob_size >= config.stream_state_bytes {
            // Large: streamed to a file and decoded from it tensor by tensor, so memory holds
            // the decoded model and a few chunks, never a second copy of the blob.
            let dir = config.out.join("state");
            std::fs::create_dir_all(&dir).map_err(|err| format!("{}: {err}", dir.display()))?;
            let path = dir.join(format!("incoming-{}.part", manifest.blob.blob_hash));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(|err| format!("{}: {err}", path.display()))?;
            let fetched = fetch_blob_to_file(
                client,
                &manifest.blob,
                &donors,
                &config.limits,
                config.fetch,
                file,
            )
            .await;
            let decoded = match fetched {
                Ok((verified, _)) => {
                    if let Some(metrics) = metrics {
                        metrics.bytes("state_in", verified.size());
                    }
                    tokio::task::spawn_blocking(move || {
                        decode_state_file(&manifest, &verified, &layout, &outer_layout, &limits)
                            .map(|s| (manifest.round, s))
                    })
                    .await
                    .map_err(|err| err.to_string())
                }
                Err(err) => Err(err.to_string()),
            };
            let _ = std::fs::remove_file(&path);
            decoded?
        } else {
            let fetched = fetch_blob(
                client,
                &manifest.blob,
                &donors,
                &config.limits,
                config.fetch,
            )
            .await
            .map_err(|err| err.to_string())?;
            if let Some(metrics) = metrics {
                metrics.bytes("state_in", fetched.blob.as_bytes().len() as u64);
            }
            tokio::task::spawn_blocking(move || {
                decode_state(&manifest, &fetched.blob, &layout, &outer_layout, &limits)
                    .map(|s| (manifest.round, s))
            })
            .await
            .map_err(|err| err.to_string())?
        }
        .map_err(|err| {
            format!(
                "state does not verify (this node's outer optimizer is `{}`): {err}",
                config.outer
            )
        })?;
        let outer = OuterState::from_tensors(&state.1.optimizer)
            .map_err(|err| format!("peer's outer optimizer state: {err}"))?;
        Ok((state.0, Box::new(state.1.model), outer))
    }
    .await
}
