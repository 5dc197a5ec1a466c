//! The shell around the all-to-all [`RoundMachine`]: [`Coordinator::perform`] carries out the
//! machine's actions (spawning the work in [`super::tasks`]), [`Coordinator::on_event`] and
//! [`Coordinator::on_done`] turn what the network and the tasks report into the machine's
//! inputs, and [`Coordinator::close_round`] writes the record, checkpoint and served state of
//! an applied round. Every node combines the same decoded deltas in the same order, so nodes
//! with the same set end on bit-identical models.
//!
//! **Restart**: the checkpoint of the last applied round holds the model, AdamW moments, data
//! position, error-feedback residuals and the outer optimizer's step and moments; a restarted node
//! resumes at the next round and resynchronises if the mesh moved on: before its first round it
//! asks its mesh peers for their latest states and, when most are past it, adopts that state
//! (checkpointed, and a catch-up record with `synced_from` in `rounds.jsonl` ends the rounds it
//! missed, even when the mesh finished while it was down; the manifests and mesh-size changes that
//! arrive meanwhile are replayed to the round machine once it exists); later, manifests beyond the
//! window trigger the same sync.
//!
//! **Withheld deltas**: a training that finishes while its node is syncing, or from a base the
//! node has since left, is never announced (a second manifest for the round would be
//! equivocation); the round is trained again from the adopted base. Once every expected sender
//! (the connected peers and whoever announced, by peer id) has been heard from, a failed delta
//! (bad data, unavailable) no longer holds the round, so a byzantine peer costs no deadline; a
//! partial quorum still counts usable deltas only.
//!
//! **Split meshes**: a manifest from a sender never heard before, on a base this node's rounds did
//! not produce (or two rounds away), is the other half of a split mesh (or a node back from an
//! outage): logged as a warning and counted (`meshtune_lineage_merges_total`); the base rules then
//! pick one model for all. Halves find each other once any link exists: Kademlia walks (every 30
//! s) through the linked node discover the other half and every discovered peer is dialed.
//!
//! **Late connections**: gossip does not replay a manifest to a peer that connects after it went
//! out. When a peer subscribes to the delta topic, a node asks it for its current manifest
//! (`ChunkRequest::CurrentManifest`); the connection authenticates the answer, which must name the
//! responder as sender (otherwise a strike), and it then enters the round machine like a gossiped
//! one (duplicates are ignored).
//!
//! Owns: the current base, the error-feedback residuals, the outer optimizer state, the
//! decoded deltas of the open rounds and the open round's bookkeeping. Must not touch: the
//! swarm (only through the [`Client`]) or the model's internals (only through the trainer).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::gossipsub::MessageAcceptance;
use meshtune_protocol::{DeltaManifest, ErrorFeedback, ModelHash, ModelLayout, TensorSet};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::config::{CoordinatorConfig, RunSummary, Start};
use super::error::RunError;
use super::inbox::{Inbox, Keep, linger, sleep_until};
use super::ledger::{Ledger, checkpoint_extras};
use super::metrics::WireBytes;
use super::persist::{Persist, Persisted, spawn_persister};
use super::record::{RoundRecord, RoundTiming, RoundWork};
use super::sync::{fetch_state, final_states, mesh_ahead};
use super::tasks::{self, Done, Position, Shared, TrainJob};
use crate::averaging::aggregate::{Contribution, OuterState, aggregate, apply_outer_step, screen};
use crate::averaging::overlap::{self, OverlapConfig, OverlapMachine};
use crate::averaging::round::{
    self, Phase, RejectReason, RoundMachine, Verdict, final_state_winner,
};
use crate::energy::EnergyMeter;
use crate::network::NetworkEvent;
use crate::network::store::lock as lock_store;
use crate::trainer::{EvalReport, TrainReport};

type Input = round::Input<PeerId>;
type Action = round::Action<PeerId>;

/// The bookkeeping of the round being trained and collected.
struct OpenRound {
    started: Instant,
    report: Option<TrainReport>,
    /// This node's decoded delta and its sample count.
    own: Option<(TensorSet, u64)>,
    delta_bytes: u64,
    raw_bytes: u64,
    payload_in: u64,
    wire_at_start: WireBytes,
    energy_at_start: Option<f64>,
    /// The collect deadline in force when the round aggregated.
    deadline_s: f64,
    /// Set when the round aggregates: deltas combined, who from, and the base they applied to.
    deltas_used: usize,
    contributors: Vec<String>,
    round_base: ModelHash,
    /// When this node's delta was announced (the exchange's start).
    published_at: Option<Instant>,
}

impl OpenRound {
    fn new(config: &CoordinatorConfig, wire: WireBytes, base: ModelHash) -> Self {
        Self {
            started: Instant::now(),
            report: None,
            own: None,
            delta_bytes: 0,
            raw_bytes: 0,
            payload_in: 0,
            wire_at_start: wire,
            energy_at_start: config.energy.as_ref().and_then(EnergyMeter::joules),
            deadline_s: 0.0,
            deltas_used: 0,
            contributors: Vec::new(),
            round_base: base,
            published_at: None,
        }
    }
}

/// The all-to-all round loop of one node (see the module docs).
pub struct Coordinator {
    shared: Shared,
    me: PeerId,
    ledger: Ledger,
    machine: RoundMachine<PeerId>,
    queue: VecDeque<Action>,
    layout: ModelLayout,
    base: TensorSet,
    base_hash: ModelHash,
    outer_state: OuterState,
    /// `None` while a training task holds the residuals.
    feedback: Option<ErrorFeedback>,
    /// A round to train (or publish from its ahead phase) once the running training task
    /// returns.
    pending_train: Option<(u64, ModelHash, Option<TrainReport>)>,
    /// Which round trains ahead of the exchange (`--overlap`).
    overlap: OverlapMachine,
    /// The report of the last ahead phase, until its round is published.
    ahead_report: Option<(u64, TrainReport)>,
    position: Position,
    manifests: HashMap<(u64, PeerId), Arc<DeltaManifest>>,
    deltas: HashMap<(u64, PeerId), TensorSet>,
    seen_senders: HashSet<PeerId>,
    rejected: BTreeMap<String, u64>,
    mesh_peers: usize,
    open: OpenRound,
    /// Applied rounds go here to be written down (checkpoint, served state, record).
    persister: mpsc::Sender<Persist>,
    /// Rounds handed to the persister and not yet written down.
    persisting: usize,
    /// Task reports received while waiting for the persister, handled next.
    stashed: VecDeque<Done>,
}

impl Coordinator {
    /// Restores the checkpoint, waits for peers, catches up on a mesh that moved on, and sets
    /// up the round machine. Returns the coordinator and the receiver its tasks report on.
    pub async fn start(
        start: Start,
        inbox: &mut Inbox,
        shutdown: &CancellationToken,
    ) -> Result<(Self, mpsc::Receiver<Done>), RunError> {
        let (config, me) = (start.config.clone(), start.me);
        let mut ledger = Ledger::open(&config, me, &start.trainer, &start.store)?;
        let (mut round, mut feedback, mut outer_state) =
            (0, ErrorFeedback::new(), OuterState::default());
        if let Some((next_round, restored)) = ledger.restore().await? {
            round = next_round;
            (feedback, outer_state) = restore_extras(restored.extras)?;
            tracing::info!(round, "resumed from checkpoint");
        }
        let mut base = start.trainer.weights().await?;
        if config.keep_residual && feedback.squared_norm() > 0.0 {
            // The checkpoint holds the mesh's model; this node trains on from it plus its
            // residual (see `checkpoint_weights`).
            let own = tasks::plus_residual(&base, &feedback);
            start.trainer.set_weights(own).await?;
        }
        let layout = base.layout();
        let mut base_hash = ModelHash::of_tensors(&base);
        ledger.serve(round, &base, &outer_state)?;
        if config.wait_for_peers > 0 {
            inbox
                .wait_for_peers(config.wait_for_peers, config.wait_timeout, shutdown)
                .await;
        }
        start.metrics.mesh_peers.set(inbox.mesh_peers as i64);
        // Back from a restart (or new) while the mesh already moved on: adopt its state
        // before the first round rather than training a round nobody else is in. Waiting for
        // manifests instead can miss the whole rest of a short run, and training alone
        // meanwhile makes the others wait for it.
        if inbox.mesh_peers > 0
            && let Some(((synced, peer), weights, outer)) =
                catch_up(&start, &layout, round, inbox, shutdown).await
        {
            feedback.clear();
            (base, base_hash) = ledger
                .adopt(peer, synced, weights, &outer, inbox.mesh_peers)
                .await?;
            outer_state = outer;
            round = synced;
        }
        let (machine, actions) = RoundMachine::new(me, round, base_hash, config.round.clone());
        // Kept manifests of rounds this node caught up past were honest when sent: ignored
        // here, where the round machine would call the older ones stale and penalise them.
        inbox
            .retain_kept(
                |e| !matches!(e, NetworkEvent::Manifest { manifest, .. } if manifest.round < round),
            )
            .await;
        let (done, done_rx) = mpsc::channel(64);
        let persister = spawn_persister(start.store.clone(), config.clone(), me, done.clone());
        let wire = start.metrics.wire_bytes();
        let mut coordinator = Self {
            open: OpenRound::new(&config, wire, base_hash),
            shared: Shared::new(start, done),
            me,
            ledger,
            machine,
            queue: actions.into(),
            layout,
            base,
            base_hash,
            outer_state,
            feedback: Some(feedback),
            pending_train: None,
            overlap: OverlapMachine::new(OverlapConfig {
                enabled: config.overlap,
                rounds: config.rounds,
                last_round_trains: !config.final_exchange,
            }),
            ahead_report: None,
            position: Position::new(round, base_hash),
            manifests: HashMap::new(),
            deltas: HashMap::new(),
            seen_senders: HashSet::new(),
            rejected: BTreeMap::new(),
            mesh_peers: inbox.mesh_peers,
            persister,
            persisting: 0,
            stashed: VecDeque::new(),
        };
        coordinator.feed(Input::PeerCount(inbox.mesh_peers));
        Ok((coordinator, done_rx))
    }

    /// Runs rounds until `config.rounds` are applied or `shutdown` fires, then agrees on the
    /// final model with the mesh and serves peers that still fetch.
    pub async fn run(
        mut self,
        mut inbox: Inbox,
        mut done_rx: mpsc::Receiver<Done>,
        shutdown: CancellationToken,
    ) -> Result<RunSummary, RunError> {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let syncing = self.machine.phase() == Phase::Syncing;
            let round = if syncing {
                u64::MAX
            } else {
                self.machine.round()
            };
            self.position.set(round, self.base_hash);
            while let Some(action) = self.queue.pop_front() {
                self.perform(action).await?;
            }
            if self.all_rounds_applied() && self.persisting == 0 {
                break;
            }
            if let Some(done) = self.stashed.pop_front() {
                if let Some(input) = self.on_done(done, &mut done_rx).await? {
                    self.feed(input);
                }
                continue;
            }
            let deadline = self.machine.deadline();
            let input = tokio::select! {
                () = shutdown.cancelled() => break,
                () = sleep_until(deadline) => Some(Input::Tick),
                _ = tick.tick() => Some(Input::Tick),
                event = inbox.next() => match event {
                    None => break,
                    Some(event) => self.on_event(event).await,
                },
                done = done_rx.recv() => match done {
                    None => break,
                    Some(done) => self.on_done(done, &mut done_rx).await?,
                },
            };
            if let Some(input) = input {
                self.feed(input);
            }
        }
        // What was applied is written down before the node stops.
        self.flush_persists(&mut done_rx).await?;
        let adopted = self.finish(&mut inbox, &shutdown).await?;
        let config = &self.shared.config;
        if self.all_rounds_applied() && (config.keep_residual || config.overlap) {
            // The run is over: the node ends on the model the mesh agreed on (its residual
            // stays in the checkpoint; an overlapped node holds its last rebased phase).
            self.shared.trainer.set_weights(self.base.clone()).await?;
        }
        Ok(RunSummary {
            rounds: self.ledger.records,
            final_round: self.machine.round(),
            model_hash: self.base_hash,
            adopted_final_state: adopted,
        })
    }

    fn config(&self) -> &CoordinatorConfig {
        &self.shared.config
    }

    fn all_rounds_applied(&self) -> bool {
        self.config()
            .rounds
            .is_some_and(|n| self.machine.round() >= n)
    }

    fn feed(&mut self, input: Input) {
        let actions = self.machine.handle(Instant::now(), input);
        self.queue.extend(actions);
    }

    fn reject(&mut self, label: &str) {
        *self.rejected.entry(label.into()).or_insert(0) += 1;
        self.shared.metrics.rejected(label);
    }

    /// Carries out one of the machine's actions.
    async fn perform(&mut self, action: Action) -> Result<(), RunError> {
        match action {
            Action::Train { round, base } => {
                let actions = self
                    .overlap
                    .handle(overlap::Input::Requested { round, base });
                self.perform_overlap(actions);
            }
            Action::Fetch { sender, round } => self.fetch(sender, round).await,
            Action::Aggregate { round, own, peers } => self.aggregate(round, own, &peers)?,
            Action::SyncState { from, round } => {
                let layout = self.layout.clone();
                tokio::spawn(tasks::sync_state(from, round, layout, self.shared.clone()));
            }
            Action::Forget { before_round } => {
                self.manifests.retain(|(r, _), _| *r >= before_round);
                self.deltas.retain(|(r, _), _| *r >= before_round);
                // A poisoned store is logged by `lock_store`; the round goes on.
                if let Ok(mut store) = lock_store(&self.shared.store) {
                    store.forget_before(before_round.saturating_sub(1));
                }
            }
            Action::Judge {
                sender,
                verdict: Verdict::Reject(reason),
                ..
            } => {
                self.reject(reason.label());
                if reason == RejectReason::BadData {
                    let _ = self
                        .shared
                        .client
                        .strike(sender, "invalid delta data")
                        .await;
                }
            }
            Action::Judge { .. } => {}
        }
        Ok(())
    }

    /// Carries out the overlap machine's actions.
    fn perform_overlap(&mut self, actions: Vec<overlap::Action>) {
        for action in actions {
            match action {
                overlap::Action::Train { round, base } => self.train(round, base, None),
                overlap::Action::Publish { round, base } => {
                    let report = self.ahead_report.take().filter(|(r, _)| *r == round);
                    self.train(round, base, report.map(|(_, report)| report));
                }
                overlap::Action::TrainAhead { round } => {
                    // The phase starts from the base plus this node's share of the average it
                    // just contributed to (its own delta / mesh size), the best guess of the
                    // next model without the others' deltas.
                    let share = 1.0 / (self.mesh_peers + 1) as f32;
                    let start = Some((self.base.clone(), share));
                    let steps = self.shared.config.local_steps;
                    tokio::spawn(tasks::train_ahead(round, steps, start, self.shared.clone()));
                }
            }
        }
    }

    /// Starts training `round` from `base`, or rebasing its ahead phase (`ahead`) onto it (now,
    /// or when the running training returns).
    fn train(&mut self, round: u64, base: ModelHash, ahead: Option<TrainReport>) {
        let config = &self.shared.config;
        if base != self.base_hash || config.rounds.is_some_and(|n| round >= n) {
            return;
        }
        let last = config.rounds.is_some_and(|n| round + 1 == n);
        let steps = if config.final_exchange && last {
            0
        } else {
            config.local_steps
        };
        let Some(feedback) = self.feedback.take() else {
            self.pending_train = Some((round, base, ahead));
            return;
        };
        self.open = OpenRound::new(config, self.shared.metrics.wire_bytes(), self.base_hash);
        self.shared.metrics.round.set(round as i64);
        let job = TrainJob {
            round,
            base_hash: base,
            base: self.base.clone(),
            steps,
            feedback,
            me: self.me,
            position: self.position.clone(),
            ahead,
        };
        tokio::spawn(tasks::train_and_publish(job, self.shared.clone()));
    }

    /// Pulls `sender`'s delta of `round` from it and up to three other mesh peers.
    async fn fetch(&mut self, sender: PeerId, round: u64) {
        let Some(manifest) = self.manifests.get(&(round, sender)).cloned() else {
            return;
        };
        let peers = self.shared.client.mesh_peers().await.unwrap_or_default();
        let mut providers = vec![sender];
        providers.extend(peers.into_iter().filter(|p| *p != sender).take(3));
        let layout = self.layout.clone();
        tokio::spawn(tasks::fetch_delta(
            manifest,
            providers,
            layout,
            self.shared.clone(),
        ));
    }

    /// Screens and combines the round's deltas (own first, then the senders in the machine's
    /// order), applies the outer step to a copy of the base and hands it to the trainer.
    fn aggregate(&mut self, round: u64, own: bool, senders: &[PeerId]) -> Result<(), RunError> {
        self.open.deadline_s = self.machine.collect_timeout().as_secs_f64();
        let mut offered = Vec::with_capacity(senders.len() + 1);
        if own && let Some((delta, samples)) = &self.open.own {
            offered.push(Contribution {
                sender: self.me,
                samples: *samples,
                delta,
            });
        }
        for sender in senders {
            if let (Some(delta), Some(manifest)) = (
                self.deltas.get(&(round, *sender)),
                self.manifests.get(&(round, *sender)),
            ) {
                offered.push(Contribution {
                    sender: *sender,
                    samples: manifest.sample_count,
                    delta,
                });
            }
        }
        let config = &self.shared.config;
        let screened = screen(&offered, config.norm_outlier_factor);
        let mut next = self.base.clone();
        if !screened.used.is_empty() {
            let combined = aggregate(&screened.used, config.aggregation)?;
            apply_outer_step(&mut next, &combined, config.outer, &mut self.outer_state)?;
        }
        let count = screened.used.len();
        let mut contributors: Vec<String> = screened
            .contributors
            .iter()
            .map(ToString::to_string)
            .collect();
        contributors.sort();
        let outliers = screened.outliers;
        for (sender, norm) in &outliers {
            tracing::warn!(round, sender = %sender, norm, "leaving out a delta far above the round's median norm");
            self.reject("norm_outlier");
        }
        tracing::info!(round, deltas = count, "aggregated");
        self.shared.metrics.deltas_used.set(count as i64);
        self.open.deltas_used = count;
        self.open.contributors = contributors;
        self.open.round_base = self.base_hash;
        let config = &self.shared.config;
        let evaluate = config.eval_every > 0
            && (round.is_multiple_of(config.eval_every)
                || config.rounds.is_some_and(|n| round + 1 == n));
        let hash = ModelHash::of_tensors(&next);
        let own = self
            .feedback
            .as_ref()
            .filter(|_| config.keep_residual)
            .map(|feedback| tasks::plus_residual(&next, feedback));
        tokio::spawn(tasks::apply_round(
            round,
            next,
            hash,
            evaluate,
            own,
            self.shared.clone(),
        ));
        Ok(())
    }

    /// A network event as the machine's input; manifests are judged here (the verdict goes
    /// back to gossipsub) and feed the machine directly.
    async fn on_event(&mut self, event: NetworkEvent) -> Option<Input> {
        match event {
            NetworkEvent::Listening(_) => None,
            NetworkEvent::MeshPeers(n) => {
                self.mesh_peers = n;
                self.shared.metrics.mesh_peers.set(n as i64);
                Some(match self.shared.client.mesh_peers().await {
                    Ok(peers) => Input::Peers(peers),
                    Err(_) => Input::PeerCount(n),
                })
            }
            NetworkEvent::Manifest {
                message_id,
                source,
                manifest,
            } => {
                let acceptance = self.judge_manifest(manifest);
                let _ = self
                    .shared
                    .client
                    .report_manifest(message_id, source, acceptance)
                    .await;
                None
            }
        }
    }

    /// Feeds a peer's manifest to the machine, keeps it when accepted, and returns gossipsub's
    /// verdict on it.
    fn judge_manifest(&mut self, manifest: Arc<DeltaManifest>) -> MessageAcceptance {
        let Ok(sender) = PeerId::from_bytes(&manifest.sender) else {
            return MessageAcceptance::Ignore;
        };
        if self.seen_senders.insert(sender)
            && self.machine.round() > 0
            && (manifest.base_model != self.base_hash
                || manifest.round.abs_diff(self.machine.round()) >= 2)
        {
            // A sender never heard before, on a model this node's rounds did not produce: two
            // halves of a split mesh found each other (or a node is back from a long outage).
            // The base rules pick the surviving model.
            self.shared.metrics.lineage_merges.inc();
            tracing::warn!(
                peer = %sender, their_round = manifest.round, our_round = self.machine.round(),
                their_base = %manifest.base_model, our_base = %self.base_hash,
                "a peer from another part of the mesh joined (a split mesh merging, or a node back from an outage): the model most nodes hold wins"
            );
        }
        let input = Input::ManifestReceived {
            sender,
            round: manifest.round,
            base: manifest.base_model,
            blob: manifest.blob.blob_hash,
        };
        let actions = self.machine.handle(Instant::now(), input);
        let mut acceptance = MessageAcceptance::Ignore;
        for action in &actions {
            if let Action::Judge {
                sender: s,
                round: r,
                verdict,
            } = action
                && *s == sender
                && *r == manifest.round
            {
                acceptance = match verdict {
                    Verdict::Accept => MessageAcceptance::Accept,
                    Verdict::Ignore => MessageAcceptance::Ignore,
                    Verdict::Reject(_) => MessageAcceptance::Reject,
                };
                if *verdict == Verdict::Accept {
                    self.manifests
                        .entry((manifest.round, sender))
                        .or_insert_with(|| Arc::clone(&manifest));
                }
            }
        }
        self.queue.extend(actions);
        acceptance
    }

    /// Starts the training that waited for the running one.
    fn resume_pending_train(&mut self) -> bool {
        match self.pending_train.take() {
            Some((round, base, ahead)) => {
                self.train(round, base, ahead);
                true
            }
            None => false,
        }
    }

    /// Waits until every applied round is written down; other reports are kept for later.
    async fn flush_persists(&mut self, done_rx: &mut mpsc::Receiver<Done>) -> Result<(), RunError> {
        while self.persisting > 0 {
            match done_rx.recv().await {
                Some(Done::Persisted(persisted)) => self.on_persisted(*persisted)?,
                Some(other) => self.stashed.push_back(other),
                None => break,
            }
        }
        Ok(())
    }

    /// An applied round is on disk: its record goes to `rounds.jsonl`.
    fn on_persisted(&mut self, persisted: Persisted) -> Result<(), RunError> {
        self.persisting = self.persisting.saturating_sub(1);
        let Persisted {
            round,
            record,
            checkpoint_s,
            serve_s,
            result,
        } = persisted;
        result?;
        self.ledger.record(record)?;
        tracing::debug!(round, checkpoint_s, serve_s, "round written down");
        Ok(())
    }

    /// A finished task as the machine's input.
    async fn on_done(
        &mut self,
        done: Done,
        done_rx: &mut mpsc::Receiver<Done>,
    ) -> Result<Option<Input>, RunError> {
        Ok(match done {
            Done::Published {
                round,
                announced,
                base,
                own,
                report,
                feedback,
                delta_bytes,
                raw_bytes,
            } => {
                self.feedback = Some(feedback);
                self.shared.metrics.train_loss.set(report.loss);
                if !announced {
                    self.resume_pending_train();
                    return Ok(Some(Input::LocalDeltaWithheld { round }));
                }
                if round == self.machine.round() && base == self.base_hash {
                    self.open.own = Some((*own, report.samples.max(1)));
                    self.open.report = Some(report);
                    self.open.delta_bytes = delta_bytes;
                    self.open.raw_bytes = raw_bytes;
                    self.open.published_at = Some(Instant::now());
                    self.shared.metrics.bytes("delta_out", delta_bytes);
                }
                self.resume_pending_train();
                Some(Input::LocalDeltaPublished { round, base })
            }
            Done::TrainFailed {
                round,
                error,
                feedback,
            } => {
                self.feedback = Some(feedback);
                tracing::error!(
                    round,
                    %error,
                    "no delta of this node; the round goes on without it"
                );
                // Publish nothing, but let the round complete on peers' deltas.
                (!self.resume_pending_train()).then_some(Input::LocalTrainingFailed { round })
            }
            Done::TrainerFree { round } => {
                let actions = self.overlap.handle(overlap::Input::TrainerFree { round });
                self.perform_overlap(actions);
                None
            }
            Done::AheadTrained { round, result } => {
                let ok = match result {
                    Ok(report) => {
                        self.ahead_report = Some((round, report));
                        true
                    }
                    Err(error) => {
                        tracing::warn!(
                            round,
                            error = %error,
                            "training ahead failed; the round trains from its base"
                        );
                        false
                    }
                };
                let actions = self.overlap.handle(overlap::Input::AheadDone { round, ok });
                self.perform_overlap(actions);
                None
            }
            Done::Fetched {
                sender,
                round,
                result,
            } => Some(self.on_fetched(sender, round, result).await),
            Done::Applied {
                round,
                base,
                hash,
                eval,
            } => Some(self.close_round(round, *base, hash, eval).await?),
            Done::Persisted(persisted) => {
                self.on_persisted(*persisted)?;
                None
            }
            Done::Synced { from, result } => match result {
                Ok((round, weights, outer)) => {
                    // The rounds before the adopted one are written down first, so that
                    // `rounds.jsonl` stays in order.
                    self.flush_persists(done_rx).await?;
                    if let Some(fb) = self.feedback.as_mut() {
                        fb.clear();
                    }
                    (self.base, self.base_hash) = self
                        .ledger
                        .adopt(from, round, *weights, &outer, self.mesh_peers)
                        .await?;
                    self.outer_state = outer;
                    self.position.set(self.machine.round(), self.base_hash);
                    Some(Input::StateSynced {
                        round,
                        base: self.base_hash,
                    })
                }
                Err(err) => {
                    tracing::warn!(peer = %from, error = %err, "state sync failed");
                    Some(Input::SyncFailed { from })
                }
            },
        })
    }

    async fn on_fetched(
        &mut self,
        sender: PeerId,
        round: u64,
        result: Result<(TensorSet, u64), tasks::DeltaError>,
    ) -> Input {
        match result {
            Ok((delta, bytes)) => {
                self.deltas.insert((round, sender), delta);
                if round == self.machine.round() {
                    self.open.payload_in += bytes;
                }
                self.shared.metrics.bytes("delta_in", bytes);
                Input::DeltaReady { sender, round }
            }
            Err(err) => {
                let bad_data = err.sender_at_fault(sender);
                tracing::warn!(peer = %sender, round, bad_data, error = %err, "delta not usable");
                for peer in err.bad_providers(sender) {
                    let _ = self.shared.client.strike(peer, "served bad chunks").await;
                }
                if !bad_data {
                    self.reject("unavailable");
                }
                Input::DeltaFailed {
                    sender,
                    round,
                    bad_data,
                }
            }
        }
    }

    /// The round is applied: record it, checkpoint it, serve the new state.
    async fn close_round(
        &mut self,
        round: u64,
        next: TensorSet,
        hash: ModelHash,
        eval: Option<EvalReport>,
    ) -> Result<Input, RunError> {
        self.base = next;
        self.base_hash = hash;
        let record = self.round_record(round, hash, eval);
        let metrics = &self.shared.metrics;
        metrics.round_seconds.set(record.seconds_total);
        metrics.record_energy(&record.energy);
        metrics.record_timing(&record.timing);
        if let Some(e) = eval {
            metrics.eval_loss.set(e.loss);
            metrics.eval_rouge_l.set(e.rouge_l);
        }
        tracing::info!(
            round,
            train_loss = record.train_loss,
            rouge_l = record.rouge_l,
            deltas = record.deltas,
            peers = self.mesh_peers,
            delta_bytes = record.delta_bytes,
            wire_in = record.wire_in,
            wire_out = record.wire_out,
            amplification = record.amplification,
            seconds = record.seconds_total,
            "round applied"
        );
        let extras = checkpoint_extras(
            self.feedback.as_ref(),
            &self.outer_state,
            &self.shared.config,
            &self.base,
        );
        let written = self
            .ledger
            .checkpoint_queued(round + 1, hash, extras, self.checkpoint_weights())
            .await?;
        let persist = Persist {
            round,
            record,
            written,
            base: self.base.clone(),
            outer: self.outer_state.clone(),
        };
        self.persister
            .send(persist)
            .await
            .map_err(|_| RunError::PersisterStopped)?;
        self.persisting += 1;
        Ok(Input::RoundApplied {
            round,
            new_base: hash,
        })
    }

    /// The weights a checkpoint saves when the trainer holds another model than the mesh's:
    /// its own plus its residual under `keep_residual`, its ahead phase under overlap. A
    /// checkpoint (what a restart resumes from and `model export` writes) is always the
    /// model the mesh agreed on, and the residual is saved once, with the extras.
    fn checkpoint_weights(&self) -> Option<TensorSet> {
        let config = &self.shared.config;
        let kept = self
            .feedback
            .as_ref()
            .is_some_and(|f| config.keep_residual && f.squared_norm() > 0.0);
        (kept || config.overlap).then(|| self.base.clone())
    }

    /// What the round did, from the open round's bookkeeping.
    fn round_record(
        &mut self,
        round: u64,
        hash: ModelHash,
        eval: Option<EvalReport>,
    ) -> RoundRecord {
        let open = &mut self.open;
        let round_j = (self.shared.config.energy.as_ref())
            .and_then(EnergyMeter::joules)
            .zip(open.energy_at_start)
            .map(|(now, start)| now - start);
        let busy = self.shared.take_busy();
        let work = RoundWork {
            report: open.report,
            eval,
            wire: self.shared.metrics.wire_bytes().since(&open.wire_at_start),
            payload_in: open.payload_in,
            seconds_total: open.started.elapsed().as_secs_f64(),
            round_j,
        };
        RoundRecord {
            deltas: open.deltas_used,
            mesh_peers: self.mesh_peers,
            delta_bytes: open.delta_bytes,
            raw_delta_bytes: open.raw_bytes,
            deadline_s: open.deadline_s,
            base_hash: open.round_base.to_string(),
            contributors: std::mem::take(&mut open.contributors),
            rejected: std::mem::take(&mut self.rejected),
            timing: RoundTiming::new(busy, open.published_at),
            ..RoundRecord::of_work(round, self.me, hash, work)
        }
    }

    /// After the last round: agree on the final model with the mesh, then serve peers that
    /// still fetch. Returns the peer whose final state was adopted, if any.
    async fn finish(
        &mut self,
        inbox: &mut Inbox,
        shutdown: &CancellationToken,
    ) -> Result<Option<String>, RunError> {
        let config = &self.shared.config;
        let finished = !shutdown.is_cancelled() && self.mesh_peers > 0 && self.all_rounds_applied();
        if !finished || config.linger_quiet.is_zero() {
            return Ok(None);
        }
        let adopted = self.agree_on_final_state(inbox, shutdown).await?;
        let config = &self.shared.config;
        linger(
            &self.shared.store,
            inbox,
            shutdown,
            config.linger_quiet,
            config.round.collect_timeout,
        )
        .await;
        Ok(adopted)
    }

    /// No round follows the last one to repair a node that missed part of it, so the nodes
    /// compare final states: wait (bounded) until every mesh peer finished, and adopt the
    /// model most nodes hold if it is not this one.
    async fn agree_on_final_state(
        &mut self,
        inbox: &mut Inbox,
        shutdown: &CancellationToken,
    ) -> Result<Option<String>, RunError> {
        let final_round = self.machine.round();
        let last_round_s = self.ledger.records.last().map_or(0.0, |r| r.seconds_total);
        let wait = (self.machine.collect_timeout() * 2
            + Duration::from_secs_f64(2.0 * last_round_s))
        .min(Duration::from_secs(1_800));
        let (client, config) = (&self.shared.client, &self.shared.config);
        let asked = final_states(client, &config.mesh_id, final_round, wait);
        let reports = inbox
            .drain_while(asked, Keep::Nothing, shutdown)
            .await
            .unwrap_or_default();
        let Some((peer, hash, agreeing)) = final_state_winner(self.base_hash, &reports) else {
            return Ok(None);
        };
        tracing::warn!(
            peer = %peer, ours = %self.base_hash, theirs = %hash, agreeing, asked = reports.len(),
            "the mesh ended on another model (this node missed part of the last round): adopting it"
        );
        let layout = self.layout.clone();
        let metrics = Some(&self.shared.metrics);
        let fetched = fetch_state(client, peer, final_round, layout, config, metrics);
        match inbox.drain_while(fetched, Keep::Nothing, shutdown).await {
            Some(Ok((round, weights, outer)))
                if ModelHash::of_tensors(&weights) == hash && round == final_round =>
            {
                // This node's record of the last round exists, so `adopt` writes no catch-up
                // record; that record is rewritten below instead.
                let mesh_peers = self.mesh_peers;
                (self.base, self.base_hash) = self
                    .ledger
                    .adopt(peer, final_round, *weights, &outer, mesh_peers)
                    .await?;
                self.shared.metrics.final_state_adopted.inc();
                tracing::info!(peer = %peer, hash = %self.base_hash, "adopted the mesh's final state");
                self.ledger.amend_last(|last| {
                    last.model_hash = hash.to_string();
                    last.adopted_final_state = Some(peer.to_string());
                })?;
                Ok(Some(peer.to_string()))
            }
            Some(Ok((round, weights, _))) => {
                tracing::error!(
                    peer = %peer, round, hash = %ModelHash::of_tensors(&weights),
                    "the peer's final state changed since it reported it; keeping this node's model"
                );
                Ok(None)
            }
            Some(Err(err)) => {
                tracing::error!(peer = %peer, error = %err, "could not fetch the mesh's final state; this node ends on its own model");
                Ok(None)
            }
            None => Ok(None),
        }
    }
}

/// The error-feedback residuals and outer optimizer state a checkpoint holds.
fn restore_extras(
    extras: Vec<meshtune_model::checkpoint::HostParam>,
) -> Result<(ErrorFeedback, OuterState), RunError> {
    let mut feedback = ErrorFeedback::new();
    let mut outer = Vec::new();
    for (name, shape, values) in extras {
        if let Some(tensor) = name.strip_prefix("feedback/") {
            feedback.restore_residual(tensor, values);
        } else if let Some(tensor) = name.strip_prefix("outer/") {
            let tensor = meshtune_protocol::Tensor::new(tensor, shape, values)
                .map_err(|err| outer_state_error(err.to_string()))?;
            outer.push(tensor);
        }
    }
    let outer = TensorSet::new(outer).map_err(|err| outer_state_error(err.to_string()))?;
    let outer =
        OuterState::from_tensors(&outer).map_err(|err| outer_state_error(err.to_string()))?;
    Ok((feedback, outer))
}

fn outer_state_error(detail: String) -> RunError {
    RunError::Checkpointed {
        what: "outer optimizer state",
        detail,
    }
}

/// Asks the mesh whether most of it is past `round` and, if so, takes the state of the peer
/// to follow: `((round, peer), weights, outer state)`. Events that arrive meanwhile are kept.
async fn catch_up(
    start: &Start,
    layout: &ModelLayout,
    round: u64,
    inbox: &mut Inbox,
    shutdown: &CancellationToken,
) -> Option<((u64, PeerId), TensorSet, OuterState)> {
    let (client, config, metrics) = (&start.client, &start.config, &start.metrics);
    let ahead = mesh_ahead(client, &config.mesh_id, round);
    let (peer, their_round) = inbox.drain_while(ahead, Keep::All, shutdown).await??;
    tracing::info!(peer = %peer, their_round, our_round = round, "the mesh is ahead of this node: adopting its state before the first round");
    let fetched = fetch_state(
        client,
        peer,
        their_round,
        layout.clone(),
        config,
        Some(metrics),
    );
    match inbox.drain_while(fetched, Keep::All, shutdown).await? {
        Ok((synced_round, weights, outer)) => Some(((synced_round, peer), *weights, outer)),
        Err(err) => {
            tracing::warn!(peer = %peer, error = %err, "catching up on the mesh's state failed; starting from this node's own state");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_with_a_broken_outer_state_is_a_named_error() {
        // A residual and no outer state: restored as they are.
        let (feedback, _) =
            restore_extras(vec![("feedback/w".into(), vec![2], vec![0.5, 0.5])]).expect("ok");
        assert!(feedback.squared_norm() > 0.0);
        // An outer tensor whose shape does not match its values.
        let broken = vec![("outer/w".into(), vec![3], vec![1.0])];
        let err = restore_extras(broken).expect_err("broken");
        assert!(
            matches!(
                err,
                RunError::Checkpointed {
                    what: "outer optimizer state",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("outer optimizer state"), "{err}");
    }
}
