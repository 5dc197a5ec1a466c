//! The shell around the sparse gossip machine
//! ([`GossipMachine`](crate::averaging::gossip::GossipMachine), whose module docs describe the
//! algorithm): it trains, encodes and serves this node's q's ([`OwnCopies`]), asks the
//! neighbours for theirs ([`hear`]), mixes, records and checkpoints, as the machine says.
//!
//! Owns: this node's model between rounds and the copies of it that its pullers hold. Shares
//! with the all-to-all shell: the codec, blob store, fetch, checkpoints and the round record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use meshtune_protocol::{
    ChunkRequest, ChunkResponse, DeltaManifest, ModelHash, ModelLayout, TensorSet, chunk_blob,
    decode_delta, encode_delta,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::config::{CoordinatorConfig, RunSummary, Start};
use super::error::{BuildDeltaError, RunError};
use super::inbox::{Inbox, Keep, linger, sleep_until};
use super::ledger::{Ledger, blocking};
use super::metrics::WireBytes;
use super::record::{RoundRecord, RoundWork};
use super::tasks::DeltaError;
use crate::averaging::aggregate::{difference, l2_norm};
use crate::averaging::gossip::{
    GossipAction, GossipConfig, GossipInput, GossipMachine, Heard, NotHeard, PeerBytes, Topology,
    add_scaled,
};
use crate::network::fetch::fetch_blob;
use crate::network::store::lock as lock_store;
use crate::network::store::{BlobStore, LinkOffers};
use crate::network::{Client, check_manifest};
use crate::trainer::{EvalReport, TrainReport};

impl PeerBytes for PeerId {
    fn peer_bytes(&self) -> Vec<u8> {
        self.to_bytes()
    }
}

/// Rounds of own q blobs kept servable for pullers still fetching an earlier round's.
const BLOB_HISTORY: u64 = 3;

/// What [`OwnCopies::publish`] made: the mean encoded size of the q's for pullers' copies
/// (the anchor's when there are none), the raw f32 bytes of one difference, and how many q's
/// were encoded.
pub struct Published {
    pub delta_bytes: u64,
    pub raw_bytes: u64,
    pub encoded: usize,
}

/// This node's side of its links: the copies of its model that its pullers hold, by hash (the
/// anchor always among them), and what serving them needs.
pub struct OwnCopies {
    me: PeerId,
    anchor: ModelHash,
    mine: HashMap<ModelHash, TensorSet>,
    layout: ModelLayout,
    config: CoordinatorConfig,
    store: Arc<Mutex<BlobStore>>,
}

impl OwnCopies {
    pub fn new(
        me: PeerId,
        anchor: &TensorSet,
        config: &CoordinatorConfig,
        store: &Arc<Mutex<BlobStore>>,
    ) -> Self {
        let hash = ModelHash::of_tensors(anchor);
        Self {
            me,
            anchor: hash,
            mine: HashMap::from([(hash, anchor.clone())]),
            layout: anchor.layout(),
            config: config.clone(),
            store: Arc::clone(store),
        }
    }

    /// Whether a puller holding `copy` holds one this node keeps.
    pub fn holds(&self, copy: &ModelHash) -> bool {
        self.mine.contains_key(copy)
    }

    /// Step 2 of a round: for each copy of this node's model a puller holds (as the store last
    /// served it) and for the anchor, q = Q(model − copy) with the node's codec (the anchor's
    /// without top-k after round 0), and the copy that q leaves, kept for the next round. Served
    /// from `store` as this round's [`LinkOffers`]; the anchor's is also the node's current
    /// manifest (a joiner's way in). `samples` and `steps` are the round's.
    pub fn publish(
        &mut self,
        round: u64,
        model: &TensorSet,
        samples: u64,
        steps: u64,
    ) -> Result<Published, BuildDeltaError> {
        let (store, config, me, anchor, layout) = (
            &self.store,
            &self.config,
            self.me,
            self.anchor,
            &self.layout,
        );
        let mine = &mut self.mine;
        let holders = lock_store(store)?.link_holders();
        let mut bases: Vec<ModelHash> = holders
            .values()
            .copied()
            .filter(|h| mine.contains_key(h))
            .collect();
        bases.push(anchor);
        bases.sort();
        bases.dedup();
        mine.retain(|h, _| bases.contains(h));
        let dense = meshtune_protocol::CodecParams {
            sparsity: meshtune_protocol::Sparsity::Dense,
            ..config.codec
        };
        let mut by_copy = HashMap::new();
        let mut results = Vec::with_capacity(bases.len());
        let mut blobs = Vec::with_capacity(bases.len());
        let mut raw_bytes = 0;
        let mut total = 0u64;
        for base in &bases {
            let copy = &mine[base];
            let diff = difference(model, copy)?;
            raw_bytes = diff.total_elements() * 4;
            // The anchor's q starts a copy. In round 0 the model is one round of training from
            // the anchor, as from any copy: the node's codec. Later it is dense (the codec's
            // quantization without its top-k), or a new neighbour's copy would hold only the
            // largest few percent of the model's drift and pull its puller back toward the anchor.
            let encoded = if *base == anchor && round > 0 {
                encode_delta(&diff, &dense, None)?
            } else {
                encode_delta(&diff, &config.codec, None)?
            };
            let chunks = chunk_blob(&encoded.blob, config.chunk_size)?;
            let manifest = DeltaManifest {
                mesh_id: config.mesh_id.clone(),
                round,
                base_model: *base,
                sender: me.to_bytes(),
                sample_count: samples,
                training_steps: steps,
                blob: chunks.descriptor(),
                tensors: encoded.tensors,
            };
            let verified = meshtune_protocol::VerifiedBlob::verify(encoded.blob, &manifest.blob)?;
            // The copy the q leaves, decoded exactly as the puller will.
            let q = decode_delta(&manifest, &verified, layout, &config.limits)?;
            let mut result = copy.clone();
            add_scaled(&mut result, &q, 1.0)?;
            let result_hash = ModelHash::of_tensors(&result);
            let blob = verified.into_bytes();
            if *base != anchor || bases.len() == 1 {
                total += blob.len() as u64;
            }
            blobs.push((blob, chunks));
            by_copy.insert(*base, (manifest, result_hash));
            results.push((result_hash, result));
        }
        let current = by_copy.get(&anchor).map(|(m, _)| m.clone());
        mine.extend(results);
        let mut s = lock_store(store)?;
        s.forget_before(round.saturating_sub(BLOB_HISTORY - 1));
        for (blob, chunks) in blobs {
            s.insert(round, Arc::new(blob), chunks);
        }
        s.set_link_offers(LinkOffers {
            round,
            anchor,
            by_copy,
        });
        if let Some(manifest) = current {
            s.set_current_manifest(manifest);
        }
        Ok(Published {
            delta_bytes: total / bases.len().saturating_sub(1).max(1) as u64,
            raw_bytes,
            encoded: bases.len(),
        })
    }
}

/// What asking a neighbour for its q needs.
#[derive(Clone)]
pub struct Listener {
    /// The model every node started from.
    pub anchor: ModelHash,
    pub layout: ModelLayout,
    pub config: CoordinatorConfig,
    pub client: Client,
}

/// Asks `peer` for its q of `round` (or later) for our copy `copy` until it has one or
/// `deadline` passes, then fetches and decodes it. A q that applies to neither our copy nor
/// the anchor is refused.
pub async fn hear(
    listener: &Listener,
    peer: PeerId,
    round: u64,
    copy: Option<ModelHash>,
    deadline: Instant,
) -> Heard {
    let Listener {
        anchor,
        layout,
        config,
        client,
    } = listener;
    let anchor = *anchor;
    // Polling backs off (50 ms, x1.5, at most 1 s): a mesh of hundreds of nodes waiting on
    // slow neighbours must not drown in its own requests.
    let mut pause = Duration::from_millis(50);
    let manifest = loop {
        let answer = client
            .request(
                peer,
                ChunkRequest::LinkDelta {
                    mesh_id: config.mesh_id.clone(),
                    round,
                    copy,
                },
            )
            .await;
        if let Ok(ChunkResponse::Manifest(m)) = answer
            && m.round >= round
        {
            break m;
        }
        if Instant::now() >= deadline {
            return Heard::Nothing(NotHeard::Deadline);
        }
        // A neighbour that left (its connection closed) is not waited for.
        if client
            .mesh_peers()
            .await
            .is_ok_and(|peers| !peers.contains(&peer))
        {
            return Heard::Nothing(NotHeard::Left);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 3 / 2).min(Duration::from_secs(1));
    };
    if let Err(fault) = check_manifest(&manifest, &config.mesh_id, peer, layout) {
        let _ = client.strike(peer, fault.reason()).await;
        return Heard::Nothing(NotHeard::BadManifest(fault.reason()));
    }
    if Some(manifest.base_model) != copy && manifest.base_model != anchor {
        return Heard::Nothing(NotHeard::OtherModel {
            copy: manifest.base_model,
            anchor,
        });
    }
    let round = manifest.round;
    match fetch_q(peer, manifest, layout, config, client).await {
        Ok((base, q, payload)) => Heard::Delta {
            base,
            round,
            q: Box::new(q),
            payload,
        },
        Err(err) => Heard::Nothing(NotHeard::Unusable(err.to_string())),
    }
}

/// Fetches, decodes and bounds-checks the q a neighbour's manifest announces: (the copy it
/// applies to, q, payload bytes). A neighbour whose q does not decode or is out of bounds
/// is struck.
async fn fetch_q(
    peer: PeerId,
    manifest: DeltaManifest,
    layout: &ModelLayout,
    config: &CoordinatorConfig,
    client: &Client,
) -> Result<(ModelHash, TensorSet, u64), DeltaError> {
    let fetched = fetch_blob(
        client,
        &manifest.blob,
        &[peer],
        &config.limits,
        config.fetch,
    )
    .await?;
    let payload = fetched.payload_bytes;
    let limits = config.limits.clone();
    let base = manifest.base_model;
    let layout = layout.clone();
    let decoded = tokio::task::spawn_blocking(move || {
        decode_delta(&manifest, &fetched.blob, &layout, &limits)
    })
    .await;
    match decoded {
        Ok(Ok(q)) => {
            let norm = l2_norm(&q);
            if !norm.is_finite() || config.max_delta_norm.is_some_and(|max| norm > max) {
                let _ = client.strike(peer, "delta norm out of bounds").await;
                let max = config.max_delta_norm.unwrap_or(f64::INFINITY);
                return Err(DeltaError::Norm { norm, max });
            }
            Ok((base, q, payload))
        }
        Ok(Err(err)) => {
            let _ = client.strike(peer, "undecodable delta").await;
            Err(DeltaError::Decode(err))
        }
        Err(err) => Err(DeltaError::Task(err)),
    }
}

/// Connected peers whose latest manifest is past round 0 (the mesh is running), of the first
/// few asked, furthest ahead first.
async fn peers_ahead(client: &Client, config: &CoordinatorConfig) -> Vec<PeerId> {
    let Ok(peers) = client.mesh_peers().await else {
        return Vec::new();
    };
    let mut ahead: Vec<(u64, PeerId)> = Vec::new();
    for peer in peers.into_iter().take(8) {
        let answer = client
            .request(
                peer,
                ChunkRequest::CurrentManifest {
                    mesh_id: config.mesh_id.clone(),
                    round: None,
                },
            )
            .await;
        if let Ok(ChunkResponse::Manifest(m)) = answer
            && m.round > 0
            && PeerId::from_bytes(&m.sender).ok() == Some(peer)
        {
            ahead.push((m.round, peer));
        }
    }
    ahead.sort_by_key(|(round, _)| std::cmp::Reverse(*round));
    ahead.into_iter().map(|(_, peer)| peer).collect()
}

/// Joins a running mesh: the model of the first of `peers` that sends its q from the anchor
/// (at most 3 asked, each for a third of the round deadline: a peer that leaves or stalls
/// does not leave the joiner on its initial model). Returns (peer, its round, its model).
async fn join_from(
    peers: &[PeerId],
    anchor: &TensorSet,
    listener: &Listener,
) -> Result<Option<(PeerId, u64, TensorSet)>, RunError> {
    let patience = (listener.config.round.collect_timeout / 3).max(Duration::from_secs(1));
    for &peer in peers.iter().take(3) {
        let deadline = Instant::now() + patience;
        let heard = hear(listener, peer, 0, None, deadline).await;
        match heard {
            Heard::Delta {
                base,
                round: peer_round,
                q,
                ..
            } if base == listener.anchor => {
                let mut model = anchor.clone();
                add_scaled(&mut model, &q, 1.0)?;
                return Ok(Some((peer, peer_round, model)));
            }
            Heard::Delta { .. } => {
                tracing::warn!(peer = %peer, "a running mesh's peer sent a q for another copy");
            }
            Heard::Nothing(reason) => {
                tracing::warn!(peer = %peer, %reason, "could not take a running mesh's model from this peer");
            }
        }
    }
    Ok(None)
}

/// What the round being run has done so far.
struct RoundLog {
    started: Instant,
    wire_at_start: WireBytes,
    /// The model the round trained from.
    base_hash: ModelHash,
    report: Option<TrainReport>,
    published: Option<Published>,
}

impl RoundLog {
    /// A round starting now from `model`.
    fn new(metrics: &super::metrics::NodeMetrics, model: &TensorSet) -> Self {
        Self {
            started: Instant::now(),
            wire_at_start: metrics.wire_bytes(),
            base_hash: ModelHash::of_tensors(model),
            report: None,
            published: None,
        }
    }
}

/// What performing an action led to.
enum Performed {
    /// The machine's next input.
    Input(GossipInput<PeerId>),
    /// Work spawned; its result comes later.
    Spawned,
    /// Shutdown or the network stopped first.
    Stopped,
}

/// The gossip round loop of one node (see the module docs).
struct GossipShell {
    /// Settings and handles.
    start: Start,
    ledger: Ledger,
    machine: GossipMachine<PeerId>,
    model: TensorSet,
    own: OwnCopies,
    listener: Listener,
    /// The anchor as checkpoint extras (written with every checkpoint).
    anchor_extras: Vec<meshtune_model::checkpoint::HostParam>,
    heard_tx: mpsc::Sender<(PeerId, u64, Heard)>,
    log: RoundLog,
}

/// Runs gossip rounds until `config.rounds` are done or `shutdown` fires, then serves the
/// neighbours that still ask for this node's last q.
pub async fn run(
    start: Start,
    mut inbox: Inbox,
    shutdown: CancellationToken,
) -> Result<RunSummary, RunError> {
    let (mut shell, mut heard_rx) = GossipShell::start(start, &mut inbox, &shutdown).await?;
    let mut queue: std::collections::VecDeque<_> = shell.machine.start().into();
    'rounds: loop {
        while let Some(action) = queue.pop_front() {
            if action == GossipAction::Finish {
                break 'rounds;
            }
            match shell.perform(action, &mut inbox, &shutdown).await? {
                Performed::Input(input) => {
                    queue.extend(shell.machine.handle(Instant::now(), input)?)
                }
                Performed::Spawned => {}
                Performed::Stopped => break 'rounds,
            }
        }
        let input = tokio::select! {
            () = shutdown.cancelled() => break,
            () = sleep_until(shell.machine.deadline()) => GossipInput::Tick,
            heard = heard_rx.recv() => match heard {
                None => break,
                Some((peer, round, heard)) => {
                    if let Heard::Nothing(reason) = &heard {
                        tracing::debug!(peer = %peer, round, %reason, "nothing from a neighbour");
                    }
                    GossipInput::Heard { peer, round, heard }
                }
            },
            event = inbox.next() => match event {
                None => break,
                Some(crate::network::NetworkEvent::MeshPeers(n)) => {
                    inbox.mesh_peers = n;
                    continue;
                }
                // Manifests are not gossiped in this mode: none is judged.
                Some(event) => {
                    inbox.ignore(event).await;
                    continue;
                }
            },
        };
        queue.extend(shell.machine.handle(Instant::now(), input)?);
    }
    shell.finish(inbox, shutdown).await
}

impl GossipShell {
    /// Restores the checkpoint (and its anchor), waits for peers, and joins a running mesh
    /// from a peer's model when this node starts fresh.
    async fn start(
        start: Start,
        inbox: &mut Inbox,
        shutdown: &CancellationToken,
    ) -> Result<(Self, mpsc::Receiver<(PeerId, u64, Heard)>), RunError> {
        let (config, me) = (&start.config, start.me);
        let (trainer, client, store) = (&start.trainer, &start.client, &start.store);
        let Topology::Gossip { degree, step } = config.topology else {
            return Err(RunError::WrongTopology);
        };
        let mut ledger = Ledger::open(config, me, trainer, store)?;
        let (mut round, mut restored_anchor) = (0, None);
        if let Some((next_round, restored)) = ledger.restore().await? {
            round = next_round;
            restored_anchor = Some(anchor_from_extras(restored.extras, config)?);
            tracing::info!(round, "resumed from checkpoint");
        }
        let mut model = trainer.weights().await?;
        // The anchor is the model every node of the mesh starts from: a q for a copy the
        // sender no longer knows (a new link, a restart) is taken from it, so no link ever
        // needs a whole model on the wire.
        let fresh_start = restored_anchor.is_none();
        let anchor = restored_anchor.unwrap_or_else(|| model.clone());
        if anchor.layout() != model.layout() {
            return Err(anchor_error("its layout differs from the model's".into()));
        }
        if config.wait_for_peers > 0 {
            inbox
                .wait_for_peers(config.wait_for_peers, config.wait_timeout, shutdown)
                .await;
        }
        let gossip = GossipConfig {
            degree,
            step,
            hear_timeout: config.round.collect_timeout,
            rounds: config.rounds,
        };
        let mut machine = GossipMachine::new(me, round, gossip, anchor.clone());
        let listener = Listener {
            anchor: machine.anchor_hash(),
            layout: model.layout(),
            config: config.clone(),
            client: client.clone(),
        };
        // A fresh node joining a mesh already past round 0 starts from a peer's model, taken
        // as that peer's q from the anchor (one delta's bytes), and from its round.
        if fresh_start {
            let joining = async {
                let ahead = peers_ahead(client, config).await;
                if ahead.is_empty() {
                    return Ok(None);
                }
                let joined = join_from(&ahead, &anchor, &listener).await?;
                if joined.is_none() {
                    tracing::warn!(
                        asked = ahead.len().min(3),
                        "could not take a running mesh's model; starting from the initial model"
                    );
                }
                Ok::<_, RunError>(joined)
            };
            if let Some(Some((peer, peer_round, copy))) = inbox
                .drain_while(joining, Keep::Nothing, shutdown)
                .await
                .transpose()?
            {
                model = copy.clone();
                trainer.set_weights(model.clone()).await?;
                machine.joined(peer, peer_round, copy);
                tracing::info!(peer = %peer, round = machine.round(), "joined a running mesh from a peer's model");
            }
        }
        let anchor_extras = anchor
            .tensors()
            .iter()
            .map(|t| {
                (
                    format!("anchor/{}", t.name),
                    t.shape.clone(),
                    t.values.clone(),
                )
            })
            .collect();
        let (heard_tx, heard_rx) = mpsc::channel(64);
        let log = RoundLog::new(&start.metrics, &model);
        let shell = Self {
            own: OwnCopies::new(me, &anchor, config, store),
            start,
            ledger,
            machine,
            model,
            listener,
            anchor_extras,
            heard_tx,
            log,
        };
        Ok((shell, heard_rx))
    }

    /// Carries out one of the machine's actions.
    async fn perform(
        &mut self,
        action: GossipAction<PeerId>,
        inbox: &mut Inbox,
        shutdown: &CancellationToken,
    ) -> Result<Performed, RunError> {
        Ok(match action {
            GossipAction::Train { round } => {
                let Some(report) = inbox
                    .drain_while(self.train(round), Keep::Nothing, shutdown)
                    .await
                else {
                    return Ok(Performed::Stopped);
                };
                self.log.report = Some(report?);
                let candidates = self.start.client.mesh_peers().await.unwrap_or_default();
                Performed::Input(GossipInput::Trained { round, candidates })
            }
            GossipAction::Publish { round, candidates } => {
                lock_store(&self.start.store)?.retain_link_holders(|p| candidates.contains(p));
                let (samples, steps) = self
                    .log
                    .report
                    .map_or((0, 0), |r| (r.samples, r.steps as u64));
                let (own, model) = (&mut self.own, &self.model);
                self.log.published = Some(blocking(|| own.publish(round, model, samples, steps))?);
                Performed::Input(GossipInput::Published { round })
            }
            GossipAction::Hear {
                peer,
                round,
                copy,
                deadline,
            } => {
                let (listener, heard) = (self.listener.clone(), self.heard_tx.clone());
                tokio::spawn(async move {
                    let answer = hear(&listener, peer, round, copy, deadline).await;
                    let _ = heard.send((peer, round, answer)).await;
                });
                Performed::Spawned
            }
            GossipAction::Mix {
                round,
                heard,
                fresh,
                payload,
            } => {
                self.machine.mix(&mut self.model, &heard)?;
                let applied = self.apply(round, &heard, fresh, payload);
                match inbox.drain_while(applied, Keep::Nothing, shutdown).await {
                    Some(result) => {
                        result?;
                        Performed::Input(GossipInput::Mixed { round })
                    }
                    None => Performed::Stopped,
                }
            }
            GossipAction::Finish => Performed::Stopped,
        })
    }

    /// Local training of `round` from the current model.
    async fn train(&mut self, round: u64) -> Result<TrainReport, RunError> {
        self.log = RoundLog::new(&self.start.metrics, &self.model);
        self.start.metrics.round.set(round as i64);
        self.start.trainer.set_weights(self.model.clone()).await?;
        let report = self
            .start
            .trainer
            .train(self.start.config.local_steps)
            .await?;
        self.model = self.start.trainer.weights().await?;
        Ok(report)
    }

    /// The mixed model goes to the trainer, is evaluated when due, recorded and checkpointed.
    async fn apply(
        &mut self,
        round: u64,
        heard: &[PeerId],
        fresh: usize,
        payload: u64,
    ) -> Result<(), RunError> {
        self.start.trainer.set_weights(self.model.clone()).await?;
        let config = &self.start.config;
        let last = config.rounds.is_some_and(|n| round + 1 == n);
        let eval = if config.eval_every > 0 && (round.is_multiple_of(config.eval_every) || last) {
            Some(self.start.trainer.evaluate().await?)
        } else {
            None
        };
        if let Some(e) = &eval {
            self.start.metrics.eval_loss.set(e.loss);
            self.start.metrics.eval_rouge_l.set(e.rouge_l);
        }
        let hash = ModelHash::of_tensors(&self.model);
        let mesh_peers = self.start.client.mesh_peers().await.map_or(0, |p| p.len());
        let record = self.record(round, hash, eval, heard, payload, mesh_peers);
        let published = self.log.published.as_ref();
        tracing::info!(
            round,
            neighbours = self.machine.neighbours().len(),
            heard = heard.len(),
            fresh,
            qs_encoded = published.map_or(0, |p| p.encoded),
            delta_bytes = record.delta_bytes,
            wire_in = record.wire_in,
            wire_out = record.wire_out,
            seconds = record.seconds_total,
            "gossip round applied"
        );
        self.start.metrics.deltas_used.set(heard.len() as i64 + 1);
        self.start.metrics.round_seconds.set(record.seconds_total);
        self.ledger
            .checkpoint(round + 1, hash, self.anchor_extras.clone(), None)
            .await?;
        self.ledger.record(record)
    }

    /// What the round did.
    fn record(
        &self,
        round: u64,
        hash: ModelHash,
        eval: Option<EvalReport>,
        heard: &[PeerId],
        payload_in: u64,
        mesh_peers: usize,
    ) -> RoundRecord {
        let work = RoundWork {
            report: self.log.report,
            eval,
            wire: self
                .start
                .metrics
                .wire_bytes()
                .since(&self.log.wire_at_start),
            payload_in,
            seconds_total: self.log.started.elapsed().as_secs_f64(),
            round_j: None,
        };
        let mut contributors: Vec<String> = heard.iter().map(ToString::to_string).collect();
        contributors.push(self.start.me.to_string());
        contributors.sort();
        let published = self.log.published.as_ref();
        RoundRecord {
            deltas: heard.len() + 1,
            mesh_peers,
            delta_bytes: published.map_or(0, |p| p.delta_bytes),
            raw_delta_bytes: published.map_or(0, |p| p.raw_bytes),
            deadline_s: self.start.config.round.collect_timeout.as_secs_f64(),
            base_hash: self.log.base_hash.to_string(),
            contributors,
            ..RoundRecord::of_work(round, self.start.me, hash, work)
        }
    }

    /// Serves the neighbours that still ask for this node's last q, then hands back the run.
    async fn finish(
        self,
        mut inbox: Inbox,
        shutdown: CancellationToken,
    ) -> Result<RunSummary, RunError> {
        let config = &self.start.config;
        linger(
            &self.start.store,
            &mut inbox,
            &shutdown,
            config.linger_quiet,
            config.round.collect_timeout + config.linger_quiet,
        )
        .await;
        Ok(RunSummary {
            final_round: self.machine.round(),
            model_hash: ModelHash::of_tensors(&self.model),
            rounds: self.ledger.records,
            adopted_final_state: None,
        })
    }
}

/// The anchor model a gossip checkpoint holds.
fn anchor_from_extras(
    extras: Vec<meshtune_model::checkpoint::HostParam>,
    config: &CoordinatorConfig,
) -> Result<TensorSet, RunError> {
    let tensors = extras
        .into_iter()
        .filter_map(|(name, shape, values)| {
            let name = name.strip_prefix("anchor/")?.to_owned();
            Some(meshtune_protocol::Tensor::new(&name, shape, values))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| anchor_error(err.to_string()))?;
    if tensors.is_empty() {
        return Err(anchor_error(format!(
            "none in {} (written by an older meshtune or another topology): start with a fresh --out directory",
            config.out.join("checkpoints").display()
        )));
    }
    TensorSet::new(tensors).map_err(|err| anchor_error(err.to_string()))
}

fn anchor_error(detail: String) -> RunError {
    RunError::Checkpointed {
        what: "anchor model",
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshtune_protocol::Tensor;

    fn set(values: &[f32]) -> TensorSet {
        TensorSet::new(vec![
            Tensor::new("w", vec![values.len()], values.to_vec()).expect("tensor"),
        ])
        .expect("set")
    }

    /// A model that differs every round.
    fn model_of(round: u64) -> TensorSet {
        set(&(0..256)
            .map(|i| ((i as f32 + 1.0) * (round as f32 + 1.0)).sin())
            .collect::<Vec<_>>())
    }

    fn empty() -> Arc<Mutex<BlobStore>> {
        Arc::new(Mutex::new(BlobStore::default()))
    }

    /// A network stack on the memory transport at `port` serving `store`, its events drained.
    fn stack(
        port: u64,
        store: Arc<Mutex<BlobStore>>,
        layout: &ModelLayout,
        shutdown: &CancellationToken,
    ) -> (PeerId, Client) {
        use crate::network::{self, NetworkConfig};
        use libp2p::identity::Keypair;
        use meshtune_net::transport::memory_transport;
        use prometheus_client::registry::Registry;

        let keypair = Keypair::generate_ed25519();
        let mut net = NetworkConfig::new("test".parse().expect("mesh"));
        net.listen = vec![format!("/memory/{port}").parse().expect("addr")];
        let running = network::start(
            &keypair,
            memory_transport(&keypair, None).expect("transport"),
            net,
            Arc::new(layout.clone()),
            store,
            &mut Registry::default(),
            shutdown.child_token(),
        )
        .expect("network");
        let mut events = running.events;
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        (running.peer_id, running.client)
    }

    /// Dials the stack at `port` and waits until `peer` is a mesh peer.
    async fn link(client: &Client, port: u64, peer: PeerId) {
        client
            .dial(format!("/memory/{port}").parse().expect("addr"))
            .await
            .expect("dial");
        let linked = Instant::now();
        while !client.mesh_peers().await.expect("peers").contains(&peer) {
            assert!(linked.elapsed() < Duration::from_secs(10), "no link");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A joiner asks the peers ahead in turn: one that never answers (it has published
    /// nothing) costs a third of the round deadline, then the next one's model is taken;
    /// with nobody answering, the joiner stays on its own model.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_joiner_takes_the_next_peers_model_when_the_first_does_not_answer() {
        let shutdown = CancellationToken::new();
        let mut config = CoordinatorConfig::new("test", std::env::temp_dir());
        config.codec = "int8/64+zstd:1".parse().expect("codec");
        config.round.collect_timeout = Duration::from_secs(3);
        let anchor = set(&[0.0; 256]);
        let anchor_hash = ModelHash::of_tensors(&anchor);
        let layout = anchor.layout();
        let silent = stack(7510, empty(), &layout, &shutdown);
        let store = Arc::new(Mutex::new(BlobStore::default()));
        let running = stack(7511, Arc::clone(&store), &layout, &shutdown);
        let mut own = OwnCopies::new(running.0, &anchor, &config, &store);
        own.publish(4, &model_of(4), 1, 1).expect("publish");
        let me = stack(7512, empty(), &layout, &shutdown);
        link(&me.1, 7510, silent.0).await;
        link(&me.1, 7511, running.0).await;
        let listener = Listener {
            anchor: anchor_hash,
            layout: layout.clone(),
            config: config.clone(),
            client: me.1.clone(),
        };
        let (peer, round, model) = join_from(&[silent.0, running.0], &anchor, &listener)
            .await
            .expect("join")
            .expect("the second peer's model");
        assert_eq!((peer, round), (running.0, 4));
        let error =
            l2_norm(&difference(&model, &model_of(4)).expect("diff")) / l2_norm(&model_of(4));
        assert!(error < 0.02, "relative error {error}");
        let alone = join_from(&[silent.0], &anchor, &listener)
            .await
            .expect("join");
        assert!(alone.is_none(), "nobody answered");
        shutdown.cancel();
    }

    /// The link protocol between two real network stacks: a new link's first q comes from
    /// the anchor; a copy that missed a round catches up with one q; both ends then hold the
    /// same copy bit for bit; an unknown copy gets the anchor's q; a q for another anchor is
    /// refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn links_cost_one_q_whatever_the_copy_and_both_ends_agree_bit_for_bit() {
        let shutdown = CancellationToken::new();
        let mut config = CoordinatorConfig::new("test", std::env::temp_dir());
        config.codec = "int8/64+zstd:1".parse().expect("codec");
        let anchor = set(&[0.0; 256]);
        let anchor_hash = ModelHash::of_tensors(&anchor);
        let layout = anchor.layout();
        let store = Arc::new(Mutex::new(BlobStore::default()));
        let neighbour = stack(7500, Arc::clone(&store), &layout, &shutdown);
        let mut mine = OwnCopies::new(neighbour.0, &anchor, &config, &store);
        let publish = |round: u64, mine: &mut OwnCopies| {
            mine.publish(round, &model_of(round), 1, 1)
                .expect("publish")
        };
        let me = stack(7501, empty(), &layout, &shutdown);
        link(&me.1, 7500, neighbour.0).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let hear_round = |round: u64, copy: Option<ModelHash>, anchor: ModelHash| {
            let listener = Listener {
                anchor,
                layout: layout.clone(),
                config: config.clone(),
                client: me.1.clone(),
            };
            async move { hear(&listener, neighbour.0, round, copy, deadline).await }
        };
        let relative_error = |copy: &TensorSet, round: u64| {
            let diff = difference(copy, &model_of(round)).expect("diff");
            l2_norm(&diff) / l2_norm(&model_of(round))
        };
        // Our copy is close to the neighbour's model and is, bit for bit, a copy it keeps.
        let holds_neighbours_copy = |copy: &TensorSet, round: u64, bound: f64, mine: &OwnCopies| {
            let error = relative_error(copy, round);
            assert!(error < bound, "relative error {error} in round {round}");
            assert!(
                mine.holds(&ModelHash::of_tensors(copy)),
                "the neighbour does not keep our copy of round {round}"
            );
        };
        // Round 0, a new link: the q from the anchor.
        assert_eq!(
            publish(0, &mut mine).encoded,
            1,
            "only the anchor's q: no puller yet"
        );
        let Heard::Delta {
            base,
            round,
            q,
            payload,
        } = hear_round(0, None, anchor_hash).await
        else {
            panic!("nothing in round 0");
        };
        assert_eq!((base, round), (anchor_hash, 0));
        assert!(payload > 0);
        let mut copy = anchor.clone();
        add_scaled(&mut copy, &q, 1.0).expect("add");
        holds_neighbours_copy(&copy, 0, 0.02, &mine);
        // Rounds 1 and 2 published; we skip round 1. Round 2's q for our copy covers both.
        assert_eq!(
            publish(1, &mut mine).encoded,
            2,
            "our copy's q and the anchor's"
        );
        publish(2, &mut mine);
        let Heard::Delta { base, round, q, .. } =
            hear_round(2, Some(ModelHash::of_tensors(&copy)), anchor_hash).await
        else {
            panic!("nothing in round 2");
        };
        assert_eq!((base, round), (ModelHash::of_tensors(&copy), 2));
        add_scaled(&mut copy, &q, 1.0).expect("add");
        holds_neighbours_copy(&copy, 2, 0.01, &mine);
        // A copy the neighbour does not know gets the anchor's q.
        let stranger = ModelHash::of_tensors(&set(&[1.0; 256]));
        let Heard::Delta { base, .. } = hear_round(2, Some(stranger), anchor_hash).await else {
            panic!("nothing for an unknown copy");
        };
        assert_eq!(base, anchor_hash);
        // A node that started from another model cannot use any of it.
        let other = ModelHash::of_tensors(&set(&[2.0; 256]));
        match hear_round(2, None, other).await {
            Heard::Nothing(reason) => assert!(
                matches!(reason, NotHeard::OtherModel { copy, .. } if copy == anchor_hash),
                "{reason}"
            ),
            Heard::Delta { .. } => panic!("a q from another anchor was taken"),
        }
        shutdown.cancel();
    }

    #[test]
    fn a_gossip_checkpoint_without_an_anchor_says_to_start_fresh() {
        let config = CoordinatorConfig::new("test", std::path::PathBuf::from("out-dir"));
        let err = anchor_from_extras(vec![("outer/w".into(), vec![1], vec![0.0])], &config)
            .expect_err("no anchor");
        let text = err.to_string();
        assert!(
            text.contains("anchor model") && text.contains("fresh --out"),
            "{text}"
        );
        let anchor = vec![("anchor/w".into(), vec![2], vec![1.0, 2.0])];
        let model = anchor_from_extras(anchor, &config).expect("anchor");
        assert_eq!(model.tensors()[0].values, vec![1.0, 2.0]);
    }
}
