//! Sparse gossip averaging (`topology = "gossip:K[:STEP]"`): each round a node mixes with at
//! most K neighbours (connected mesh peers, kept while they stay connected, new ones picked
//! by a hash of the pair) instead of the whole mesh, so the bytes a node
//! sends and receives per round stay flat as the mesh grows. Models are no longer identical;
//! their spread shrinks geometrically at a rate set by the overlay's spectral gap.
//!
//! The algorithm is CHOCO-gossip (Koloskova, Stich and Jaggi, ICML 2019), which keeps
//! compression (top-k, int8) safe without a shared base:
//!
//! - every node i keeps its model x_i and a *public copy* x̂_i that every neighbour also keeps,
//!   bit for bit;
//! - after local training, i encodes q_i = Q(x_i − x̂_i) with the delta codec, and everyone
//!   (i included) adds the decoded q_i to x̂_i; what the codec drops stays in x_i − x̂_i and is
//!   sent later (the error feedback is built in);
//! - i then mixes: x_i += STEP / (k + 1) · Σ_j (x̂_j − x̂_i) over the k neighbours heard.
//!
//! A neighbour's manifest names the hash of the public copy its q applies to (`base_model`);
//! a copy that missed a few rounds replays the q's of the neighbour's earlier manifests (each
//! node serves its last `MANIFEST_HISTORY` rounds); a node whose copy is missing or older (a
//! new neighbour, a restart) fetches the neighbour's current public copy, which every node
//! serves as its state. Manifests are not
//! gossiped: a node asks each neighbour for its current manifest
//! ([`ChunkRequest::CurrentManifest`]), so no traffic grows with the mesh.
//!
//! Owns: the public copies and the gossip round loop. Shares with the all-to-all loop: the
//! codec, blob store, fetch, checkpoints and the per-round record.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use libp2p::PeerId;
use libp2p::gossipsub::MessageAcceptance;
use meshtune_protocol::{
    ChunkRequest, ChunkResponse, DeltaManifest, ModelHash, ModelLayout, TensorSet, chunk_blob,
    decode_delta, encode_delta,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::metrics::NodeMetrics;
use super::{
    CoordinatorConfig, RoundRecord, RunSummary, append_record, blocking, fetch_state,
    process_memory, serve_state,
};
use crate::averaging::aggregate::{OuterState, difference, l2_norm};
use crate::energy::RoundEnergy;
use crate::network::fetch::fetch_blob;
use crate::network::store::BlobStore;
use crate::network::{Client, NetworkEvent, check_manifest};
use crate::trainer::TrainerHandle;

/// How a node averages with the mesh.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Topology {
    /// Every node combines every node's delta each round: one model everywhere.
    All,
    /// CHOCO-gossip with at most `degree` neighbours, mixing step `step` in (0, 1].
    Gossip { degree: usize, step: f32 },
}

impl Topology {
    /// How many connections a node dials discovered peers up to
    /// ([`crate::network::NetworkConfig::dial_discovered_below`]): all-to-all averaging pulls
    /// from every node, gossip from K neighbours chosen among the connected peers, so a few
    /// times K links (the neighbours, spares for churn, the gossipsub mesh) are enough.
    pub fn dial_discovered_below(&self) -> Option<usize> {
        match self {
            Topology::All => None,
            Topology::Gossip { degree, .. } => Some((3 * degree).max(12)),
        }
    }
}

impl std::str::FromStr for Topology {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "all" {
            return Ok(Topology::All);
        }
        let usage = || format!("unknown topology `{text}`: use all or gossip:K[:STEP]");
        let rest = text.strip_prefix("gossip:").ok_or_else(usage)?;
        let (degree, step) = match rest.split_once(':') {
            Some((k, s)) => (k, s.parse::<f32>().map_err(|_| usage())?),
            None => (rest, 0.5),
        };
        let degree: usize = degree.parse().map_err(|_| usage())?;
        if degree == 0 {
            return Err(format!("topology `{text}`: K must be at least 1"));
        }
        if !(step > 0.0 && step <= 1.0) {
            return Err(format!("topology `{text}`: STEP must be in (0, 1]"));
        }
        Ok(Topology::Gossip { degree, step })
    }
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Topology::All => write!(f, "all"),
            Topology::Gossip { degree, step } => write!(f, "gossip:{degree}:{step}"),
        }
    }
}

/// `target += scale * source`, tensor by tensor (same layout).
fn add_scaled(target: &mut TensorSet, source: &TensorSet, scale: f32) -> anyhow::Result<()> {
    anyhow::ensure!(target.layout() == source.layout(), "tensor layouts differ");
    for ((_, t), s) in target.values_mut().zip(source.tensors()) {
        for (x, y) in t.iter_mut().zip(&s.values) {
            *x += scale * y;
        }
    }
    Ok(())
}

/// The mixing step: `model += step / (k + 1) * Σ_j (copy_j − public)` over the k copies.
pub fn mix(
    model: &mut TensorSet,
    public: &TensorSet,
    copies: &[&TensorSet],
    step: f32,
) -> anyhow::Result<()> {
    let weight = step / (copies.len() as f32 + 1.0);
    for copy in copies {
        add_scaled(model, copy, weight)?;
        add_scaled(model, public, -weight)?;
    }
    Ok(())
}

/// Up to `degree` neighbours among `candidates` (the connected peers of the mesh). Sticky:
/// the `current` neighbours that are still candidates stay (a new neighbour costs a transfer
/// of its public copy); free places go to the candidates ranked first by a hash of the
/// unordered pair, so both ends of a link tend to pick each other and the overlay is random.
pub fn choose_neighbours(
    me: PeerId,
    current: &[PeerId],
    candidates: &[PeerId],
    degree: usize,
) -> Vec<PeerId> {
    let mut chosen: Vec<PeerId> = current
        .iter()
        .filter(|p| **p != me && candidates.contains(p))
        .take(degree)
        .copied()
        .collect();
    let mut ranked: Vec<([u8; 32], PeerId)> = candidates
        .iter()
        .filter(|p| **p != me && !chosen.contains(p))
        .map(|p| {
            let (a, b) = if me.to_bytes() < p.to_bytes() {
                (me, *p)
            } else {
                (*p, me)
            };
            let mut hasher = blake3::Hasher::new();
            hasher.update(&a.to_bytes());
            hasher.update(&b.to_bytes());
            (*hasher.finalize().as_bytes(), *p)
        })
        .collect();
    ranked.sort();
    ranked.dedup_by(|a, b| a.1 == b.1);
    let free = degree.saturating_sub(chosen.len());
    chosen.extend(ranked.into_iter().take(free).map(|(_, p)| p));
    chosen
}

/// Rounds of own manifests and blobs kept for neighbours that lag behind.
const MANIFEST_HISTORY: u64 = 4;

/// A neighbour's public copy as this node keeps it.
struct Copy {
    model: TensorSet,
    hash: ModelHash,
}

/// What one neighbour contributed this round.
enum Heard {
    /// Its q's, decoded, each with the copy it applies to (oldest first: more than one when
    /// our copy missed rounds), and the payload bytes fetched.
    Delta {
        steps: Vec<(ModelHash, TensorSet)>,
        payload: u64,
    },
    /// Its current public copy (fetched because ours was missing or stale): (round, model).
    State(u64, Box<TensorSet>),
    Nothing(String),
}

/// Step 2 of a round: q = Q(model − public) with the node's codec, applied to `public` as
/// every neighbour will decode it, and served from `store` under a manifest naming the copy q
/// applies to (the last `MANIFEST_HISTORY` rounds stay served, for neighbours catching up).
/// `counts` = (samples, optimizer steps) of the round. Returns (the hash of the copy q applies
/// to, q's encoded bytes, raw f32 bytes of the difference).
fn publish_q(
    store: &Mutex<BlobStore>,
    config: &CoordinatorConfig,
    me: PeerId,
    round: u64,
    (model, public): (&TensorSet, &mut TensorSet),
    layout: &ModelLayout,
    counts: (u64, u64),
) -> anyhow::Result<(ModelHash, u64, u64)> {
    let base_hash = ModelHash::of_tensors(public);
    let diff = difference(model, public)?;
    let raw_bytes = diff.total_elements() * 4;
    let encoded = encode_delta(&diff, &config.codec, None)?;
    let chunks = chunk_blob(&encoded.blob, config.chunk_size)?;
    let manifest = DeltaManifest {
        mesh_id: config.mesh_id.clone(),
        round,
        base_model: base_hash,
        sender: me.to_bytes(),
        sample_count: counts.0,
        training_steps: counts.1,
        blob: chunks.descriptor(),
        tensors: encoded.tensors,
    };
    let verified = meshtune_protocol::VerifiedBlob::verify(encoded.blob, &manifest.blob)?;
    let q = decode_delta(&manifest, &verified, layout, &config.limits)?;
    add_scaled(public, &q, 1.0)?;
    let blob = verified.into_bytes();
    let delta_bytes = blob.len() as u64;
    if let Ok(mut s) = store.lock() {
        s.forget_before(round.saturating_sub(MANIFEST_HISTORY - 1));
        s.insert(round, Arc::new(blob), chunks);
        s.set_current_manifest(manifest);
    }
    Ok((base_hash, delta_bytes, raw_bytes))
}

/// Asks `peer` for its manifest of `round` until it has one or `deadline` passes, then
/// fetches and decodes its q (or its public copy when `have` is not the copy q applies to).
#[allow(clippy::too_many_arguments)]
async fn hear(
    peer: PeerId,
    round: u64,
    expected: Option<ModelHash>,
    layout: ModelLayout,
    config: CoordinatorConfig,
    client: Client,
    deadline: Instant,
) -> Heard {
    // Polling backs off (50 ms, x1.5, at most 1 s): a mesh of hundreds of nodes waiting on
    // slow neighbours must not drown in its own requests.
    let mut pause = Duration::from_millis(50);
    let manifest = loop {
        let answer = client
            .request(
                peer,
                ChunkRequest::CurrentManifest {
                    mesh_id: config.mesh_id.clone(),
                    round: Some(round),
                },
            )
            .await;
        if let Ok(ChunkResponse::Manifest(m)) = answer
            && m.round >= round
        {
            break m;
        }
        if Instant::now() >= deadline {
            return Heard::Nothing("no manifest for the round before the deadline".into());
        }
        // A neighbour that left (its connection closed) is not waited for.
        if client
            .mesh_peers()
            .await
            .is_ok_and(|peers| !peers.contains(&peer))
        {
            return Heard::Nothing("the neighbour left".into());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 3 / 2).min(Duration::from_secs(1));
    };
    if let Err(fault) = check_manifest(&manifest, &config.mesh_id, peer, &layout) {
        let _ = client.strike(peer, fault.reason()).await;
        return Heard::Nothing(fault.reason().into());
    }
    // A copy that missed a few rounds (a deadline passed, a slow round) catches up on the
    // q's the neighbour still serves (its last MANIFEST_HISTORY rounds) instead of taking
    // its whole public copy.
    let mut chain = vec![manifest];
    while let Some(want) = expected
        && chain[0].base_model != want
        && chain.len() < MANIFEST_HISTORY as usize
        && chain[0].round > 0
    {
        let earlier = chain[0].round - 1;
        let answer = client
            .request(
                peer,
                ChunkRequest::CurrentManifest {
                    mesh_id: config.mesh_id.clone(),
                    round: Some(earlier),
                },
            )
            .await;
        let Ok(ChunkResponse::Manifest(m)) = answer else {
            break;
        };
        if m.round != earlier {
            break;
        }
        if let Err(fault) = check_manifest(&m, &config.mesh_id, peer, &layout) {
            let _ = client.strike(peer, fault.reason()).await;
            return Heard::Nothing(fault.reason().into());
        }
        chain.insert(0, m);
    }
    let newest = chain.last().map_or(round, |m| m.round);
    if newest > round || Some(chain[0].base_model) != expected {
        // Our copy is missing or too stale: take the neighbour's current public copy instead.
        return match fetch_state(&client, peer, 0, layout, &config, None).await {
            Ok((state_round, model, _)) => Heard::State(state_round, model),
            Err(err) => Heard::Nothing(format!("public copy: {err}")),
        };
    }
    let mut steps = Vec::with_capacity(chain.len());
    let mut payload = 0u64;
    for manifest in chain {
        match fetch_q(peer, manifest, &layout, &config, &client).await {
            Ok((base, q, bytes)) => {
                steps.push((base, q));
                payload += bytes;
            }
            Err(reason) => return Heard::Nothing(reason),
        }
    }
    Heard::Delta { steps, payload }
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
) -> Result<(ModelHash, TensorSet, u64), String> {
    let fetched = fetch_blob(
        client,
        &manifest.blob,
        &[peer],
        &config.limits,
        config.fetch,
    )
    .await
    .map_err(|err| err.to_string())?;
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
                return Err(format!("delta norm {norm:.3e} refused"));
            }
            Ok((base, q, payload))
        }
        Ok(Err(err)) => {
            let _ = client.strike(peer, "undecodable delta").await;
            Err(format!("decoding: {err}"))
        }
        Err(err) => Err(format!("decoder task: {err}")),
    }
}

/// A connected peer whose latest manifest is past round 0 (the mesh is running), if any: of
/// the first few asked, the one furthest ahead.
async fn peer_ahead(client: &Client, config: &CoordinatorConfig) -> Option<PeerId> {
    let peers = client.mesh_peers().await.ok()?;
    let mut best: Option<(u64, PeerId)> = None;
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
            && best.is_none_or(|(r, _)| m.round > r)
        {
            best = Some((m.round, peer));
        }
    }
    best.map(|(_, peer)| peer)
}

/// The gossip round loop (see the module docs); called by [`super::run`].
#[allow(clippy::too_many_arguments)]
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
    let Topology::Gossip { degree, step } = config.topology else {
        anyhow::bail!("gossip::run needs a gossip topology");
    };
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("creating {}", config.out.display()))?;
    let checkpoints = config.out.join("checkpoints");
    let mut round = 0u64;
    let mut public: Option<TensorSet> = None;
    if let Some(restored) = trainer.restore(checkpoints.clone()).await? {
        round = restored.state["next_round"].as_u64().unwrap_or(0);
        let tensors = restored
            .extras
            .into_iter()
            .filter_map(|(name, shape, values)| {
                let name = name.strip_prefix("public/")?.to_owned();
                Some(meshtune_protocol::Tensor::new(&name, shape, values))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !tensors.is_empty() {
            public = Some(TensorSet::new(tensors)?);
        }
        tracing::info!(round, "resumed from checkpoint");
    }
    let mut model = trainer.weights().await?;
    let layout = model.layout();
    // Every node starts from the same model: on a fresh start it is everyone's first public
    // copy. After a restart it is unknown here: neighbours' copies are fetched instead.
    let mut initial = (round == 0 && public.is_none()).then(|| model.clone());
    let mut initial_hash = initial.as_ref().map(ModelHash::of_tensors);
    let mut public = public.unwrap_or_else(|| model.clone());
    let no_outer = OuterState::default();
    let rounds_path = config.out.join("rounds.jsonl");
    let mut records: Vec<RoundRecord> = Vec::new();
    let mut copies: BTreeMap<PeerId, Copy> = BTreeMap::new();
    blocking(|| serve_state(&store, &config, me, round, &public, &no_outer))?;

    // Network events: manifests are not gossiped in this mode (ignore any), peer counts kept.
    let mesh_peers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let drain = {
        let client = client.clone();
        let mesh_peers = Arc::clone(&mesh_peers);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                match event {
                    NetworkEvent::MeshPeers(n) => {
                        mesh_peers.store(n, std::sync::atomic::Ordering::Relaxed);
                    }
                    NetworkEvent::Manifest {
                        message_id, source, ..
                    } => {
                        let _ = client
                            .report_manifest(message_id, source, MessageAcceptance::Ignore)
                            .await;
                    }
                    NetworkEvent::Listening(_) => {}
                }
            }
        })
    };
    let peers_now = || mesh_peers.load(std::sync::atomic::Ordering::Relaxed);
    if config.wait_for_peers > 0 {
        let until = Instant::now() + config.wait_timeout;
        while peers_now() < config.wait_for_peers && Instant::now() < until {
            if shutdown.is_cancelled() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut neighbours: Vec<PeerId> = Vec::new();
    // A fresh node joining a mesh already past round 0 starts from a peer's public copy and
    // round: its own starting model is rounds behind everyone else's. That peer becomes its
    // first neighbour: its public copy is already here, so it costs no second transfer.
    if initial.is_some()
        && let Some(peer) = peer_ahead(&client, &config).await
    {
        match fetch_state(&client, peer, 0, layout.clone(), &config, Some(&metrics)).await {
            Ok((state_round, state, _)) => {
                public = *state;
                model = public.clone();
                trainer.set_weights(model.clone()).await?;
                round = state_round;
                initial = None;
                initial_hash = None;
                blocking(|| serve_state(&store, &config, me, round, &public, &no_outer))?;
                copies.insert(
                    peer,
                    Copy {
                        model: public.clone(),
                        hash: ModelHash::of_tensors(&public),
                    },
                );
                neighbours.push(peer);
                tracing::info!(peer = %peer, round, "joined a running mesh from a peer's public copy");
            }
            Err(err) => {
                tracing::warn!(peer = %peer, error = %err, "could not take a running mesh's model; starting from the initial one");
            }
        }
    }
    let mut final_hash = ModelHash::of_tensors(&model);
    while config.rounds.is_none_or(|n| round < n) && !shutdown.is_cancelled() {
        let started = Instant::now();
        let wire_at_start = metrics.wire_bytes();
        metrics.round.set(round as i64);
        // 1. Local training.
        trainer.set_weights(model.clone()).await?;
        let report = trainer.train(config.local_steps).await?;
        model = trainer.weights().await?;
        // 2. q = Q(x - x̂), applied to x̂ as every neighbour will decode it.
        let (base_hash, delta_bytes, raw_bytes) = publish_q(
            &store,
            &config,
            me,
            round,
            (&model, &mut public),
            &layout,
            (report.samples, report.steps as u64),
        )?;
        // 3. Hear the neighbours (in parallel, until the deadline).
        let candidates = client.mesh_peers().await.unwrap_or_default();
        neighbours = choose_neighbours(me, &neighbours, &candidates, degree);
        let deadline = Instant::now() + config.round.collect_timeout;
        let tasks: Vec<_> = neighbours
            .iter()
            .map(|&peer| {
                let expected = copies.get(&peer).map(|c| c.hash).or(initial_hash);
                tokio::spawn(hear(
                    peer,
                    round,
                    expected,
                    layout.clone(),
                    config.clone(),
                    client.clone(),
                    deadline,
                ))
            })
            .collect();
        let mut payload_in = 0u64;
        let mut used: Vec<PeerId> = Vec::new();
        let mut resynced = 0usize;
        for (peer, task) in neighbours.iter().zip(tasks) {
            match task.await {
                Ok(Heard::Delta { steps, payload }) => {
                    if !copies.contains_key(peer)
                        && let Some(start) = &initial
                    {
                        copies.insert(
                            *peer,
                            Copy {
                                model: start.clone(),
                                hash: ModelHash::of_tensors(start),
                            },
                        );
                    }
                    let Some(copy) = copies.get_mut(peer) else {
                        continue;
                    };
                    // Each q applies to the copy the one before left (a copy that stops
                    // matching keeps the last consistent state; the next round resyncs it).
                    let mut caught_up = true;
                    for (base, q) in &steps {
                        if copy.hash != *base {
                            caught_up = false;
                            break;
                        }
                        add_scaled(&mut copy.model, q, 1.0)?;
                        copy.hash = ModelHash::of_tensors(&copy.model);
                    }
                    if steps.len() > 1 {
                        tracing::debug!(peer = %peer, rounds = steps.len(), caught_up, "caught a neighbour's copy up");
                    }
                    if !caught_up {
                        continue;
                    }
                    payload_in += payload;
                    used.push(*peer);
                }
                Ok(Heard::State(state_round, state)) => {
                    tracing::info!(peer = %peer, state_round, "took a neighbour's public copy");
                    let hash = ModelHash::of_tensors(&state);
                    copies.insert(
                        *peer,
                        Copy {
                            model: *state,
                            hash,
                        },
                    );
                    resynced += 1;
                    used.push(*peer);
                }
                Ok(Heard::Nothing(reason)) => {
                    tracing::debug!(peer = %peer, round, reason, "nothing from a neighbour");
                }
                Err(err) => tracing::warn!(peer = %peer, error = %err, "neighbour task failed"),
            }
        }
        // Copies of peers that are no longer neighbours are dropped (memory: k + 2 models).
        copies.retain(|p, _| neighbours.contains(p));
        // 4. Mix through the public copies.
        let heard: Vec<&TensorSet> = used
            .iter()
            .filter_map(|p| copies.get(p).map(|c| &c.model))
            .collect();
        mix(&mut model, &public, &heard, step)?;
        trainer.set_weights(model.clone()).await?;
        let last = config.rounds.is_some_and(|n| round + 1 == n);
        let eval = if config.eval_every > 0 && (round.is_multiple_of(config.eval_every) || last) {
            Some(trainer.evaluate().await?)
        } else {
            None
        };
        if let Some(e) = &eval {
            metrics.eval_loss.set(e.loss);
            metrics.eval_rouge_l.set(e.rouge_l);
        }
        let hash = ModelHash::of_tensors(&model);
        final_hash = hash;
        let wire_now = metrics.wire_bytes();
        let wire_in = wire_now.0.saturating_sub(wire_at_start.0);
        let wire_out = wire_now.1.saturating_sub(wire_at_start.1);
        let seconds_total = started.elapsed().as_secs_f64();
        let mut contributors: Vec<String> = used.iter().map(ToString::to_string).collect();
        contributors.push(me.to_string());
        contributors.sort();
        let record = RoundRecord {
            round,
            peer_id: me.to_string(),
            train_loss: report.loss.is_finite().then_some(report.loss),
            train_samples: report.samples,
            eval_loss: eval.as_ref().map(|e| e.loss),
            rouge_l: eval.as_ref().map(|e| e.rouge_l),
            deltas: used.len() + 1,
            mesh_peers: peers_now(),
            delta_bytes,
            raw_delta_bytes: raw_bytes,
            payload_in,
            wire_in,
            wire_out,
            amplification: (payload_in > 0).then(|| wire_in as f64 / payload_in as f64),
            seconds_train: report.seconds,
            seconds_total,
            seconds_eval: eval.as_ref().map_or(0.0, |e| e.seconds),
            deadline_s: config.round.collect_timeout.as_secs_f64(),
            tokens: report.tokens,
            energy: RoundEnergy::new(
                report.tokens,
                report.seconds,
                (seconds_total - report.seconds - eval.as_ref().map_or(0.0, |e| e.seconds))
                    .max(0.0),
                report.energy_j,
                None,
            ),
            model_hash: hash.to_string(),
            base_hash: base_hash.to_string(),
            contributors,
            rss_bytes: process_memory("VmRSS:"),
            peak_rss_bytes: process_memory("VmHWM:"),
            rejected: BTreeMap::new(),
            adopted_final_state: None,
            synced_from: None,
        };
        tracing::info!(
            round,
            neighbours = neighbours.len(),
            heard = used.len(),
            resynced,
            delta_bytes,
            wire_in,
            wire_out,
            seconds = seconds_total,
            "gossip round applied"
        );
        metrics.deltas_used.set(used.len() as i64 + 1);
        metrics.round_seconds.set(seconds_total);
        let extras = public
            .tensors()
            .iter()
            .map(|t| {
                (
                    format!("public/{}", t.name),
                    t.shape.clone(),
                    t.values.clone(),
                )
            })
            .collect();
        trainer
            .save(
                checkpoints.clone(),
                (round + 1) as usize,
                serde_json::json!({"next_round": round + 1, "model_hash": hash.to_string(), "topology": config.topology.to_string()}),
                extras,
            )
            .await
            .context("checkpoint after the round")?;
        append_record(&rounds_path, &record)?;
        records.push(record);
        blocking(|| serve_state(&store, &config, me, round + 1, &public, &no_outer))?;
        round += 1;
    }
    // Neighbours may still be asking for this node's last q: serve until quiet.
    let lingering = Instant::now();
    let until = lingering + config.round.collect_timeout + config.linger_quiet;
    loop {
        let quiet = store
            .lock()
            .ok()
            .and_then(|s| s.last_served())
            .is_none_or(|t| t.elapsed() >= config.linger_quiet);
        if (quiet && lingering.elapsed() >= config.linger_quiet)
            || Instant::now() >= until
            || shutdown.is_cancelled()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drain.abort();
    Ok(RunSummary {
        rounds: records,
        final_round: round,
        model_hash: final_hash,
        adopted_final_state: None,
    })
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

    #[test]
    fn topology_parses_and_names_bad_values() {
        assert_eq!("all".parse::<Topology>(), Ok(Topology::All));
        assert_eq!(
            "gossip:4".parse::<Topology>(),
            Ok(Topology::Gossip {
                degree: 4,
                step: 0.5
            })
        );
        assert_eq!(
            "gossip:2:1".parse::<Topology>(),
            Ok(Topology::Gossip {
                degree: 2,
                step: 1.0
            })
        );
        for bad in [
            "gossip",
            "gossip:0",
            "gossip:4:0",
            "gossip:4:1.5",
            "ring:4",
            "gossip:x",
        ] {
            let err = bad.parse::<Topology>().expect_err(bad);
            assert!(err.contains(bad), "{err}");
        }
        let t: Topology = "gossip:3:0.25".parse().expect("parse");
        assert_eq!(t.to_string().parse::<Topology>(), Ok(t));
    }

    #[test]
    fn mixing_moves_toward_the_neighbours_and_keeps_the_mean_of_a_symmetric_pair() {
        // Two nodes, exact public copies (x̂ = x), full step: both land on the mean.
        let (a, b) = (set(&[0.0, 2.0]), set(&[4.0, -2.0]));
        let mut xa = a.clone();
        mix(&mut xa, &a, &[&b], 1.0).expect("mix");
        let mut xb = b.clone();
        mix(&mut xb, &b, &[&a], 1.0).expect("mix");
        assert_eq!(xa.get("w").expect("w").values, vec![2.0, 0.0]);
        assert_eq!(xb.get("w").expect("w").values, vec![2.0, 0.0]);
        // Half a step with two neighbours: x + 0.5/3 * ((c1 - x) + (c2 - x)).
        let mut x = set(&[0.0]);
        mix(&mut x, &set(&[0.0]), &[&set(&[3.0]), &set(&[6.0])], 0.5).expect("mix");
        assert!((x.get("w").expect("w").values[0] - 1.5).abs() < 1e-6);
        // Different layouts are refused.
        let mut x = set(&[0.0]);
        assert!(mix(&mut x, &set(&[0.0]), &[&set(&[1.0, 2.0])], 0.5).is_err());
    }

    #[test]
    fn neighbours_are_bounded_exclude_me_and_agree_on_both_ends() {
        let peers: Vec<PeerId> = (0..12).map(|_| PeerId::random()).collect();
        let me = peers[0];
        let chosen = choose_neighbours(me, &[], &peers, 4);
        assert_eq!(chosen.len(), 4);
        assert!(!chosen.contains(&me));
        // Fewer candidates than the degree: all of them.
        assert_eq!(choose_neighbours(me, &[], &peers[..3], 4).len(), 2);
        // The ranking of a link is the same seen from either end.
        let other = chosen[0];
        assert_eq!(choose_neighbours(other, &[], &[me, other], 1), vec![me]);
        // Sticky: current neighbours stay while connected, even when a new peer ranks first;
        // one that left is replaced.
        let newcomer = PeerId::random();
        let mut more = peers.clone();
        more.push(newcomer);
        assert_eq!(choose_neighbours(me, &chosen, &more, 4), chosen);
        let without: Vec<PeerId> = more.iter().filter(|p| **p != chosen[1]).copied().collect();
        let again = choose_neighbours(me, &chosen, &without, 4);
        assert_eq!(again.len(), 4);
        assert_eq!(&again[..3], &[chosen[0], chosen[2], chosen[3]]);
        assert!(!again.contains(&chosen[1]));
    }

    /// A copy that missed rounds 1 and 2 of a neighbour catches up on the q's it still serves
    /// (bit for bit the neighbour's public copy); one older than the served history, or
    /// unknown, is not patched from q's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_that_missed_rounds_catches_up_on_the_served_qs() {
        use crate::network::{self, NetworkConfig};
        use libp2p::identity::Keypair;
        use meshtune_bootstrap::transport::memory_transport;
        use prometheus_client::registry::Registry;

        let shutdown = CancellationToken::new();
        let mut config = CoordinatorConfig::new("test", std::env::temp_dir());
        config.codec = "int8/64+zstd:1".parse().expect("codec");
        let start = set(&[0.0; 256]);
        let layout = start.layout();
        let spawn = |port: u64, store: Arc<Mutex<BlobStore>>| {
            let keypair = Keypair::generate_ed25519();
            let mut net = NetworkConfig::new("test".parse().expect("mesh"));
            net.listen = vec![format!("/memory/{port}").parse().expect("addr")];
            network::start(
                &keypair,
                memory_transport(&keypair, None).expect("transport"),
                net,
                Arc::new(layout.clone()),
                store,
                &mut Registry::default(),
                shutdown.child_token(),
            )
            .expect("network")
        };
        // The neighbour publishes rounds 0-3; we heard round 0 only.
        let store = Arc::new(Mutex::new(BlobStore::default()));
        let neighbour = spawn(7500, Arc::clone(&store));
        let mut public = start.clone();
        let mut copies = Vec::new();
        for round in 0..4u64 {
            copies.push(public.clone());
            let model = set(&(0..256)
                .map(|i| ((i as f32 + 1.0) * (round as f32 + 1.0)).sin())
                .collect::<Vec<_>>());
            publish_q(
                &store,
                &config,
                neighbour.peer_id,
                round,
                (&model, &mut public),
                &layout,
                (1, 1),
            )
            .expect("publish");
        }
        let me = spawn(7501, Arc::new(Mutex::new(BlobStore::default())));
        me.client
            .dial("/memory/7500".parse().expect("addr"))
            .await
            .expect("dial");
        let mut events = me.events;
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        let mut neighbour_events = neighbour.events;
        tokio::spawn(async move { while neighbour_events.recv().await.is_some() {} });
        let linked = Instant::now();
        while !me
            .client
            .mesh_peers()
            .await
            .expect("peers")
            .contains(&neighbour.peer_id)
        {
            assert!(linked.elapsed() < Duration::from_secs(10), "no link");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let hear_round = |expected: ModelHash| {
            hear(
                neighbour.peer_id,
                3,
                Some(expected),
                layout.clone(),
                config.clone(),
                me.client.clone(),
                deadline,
            )
        };
        // Our copy is the neighbour's public copy after round 0 (we missed rounds 1 and 2).
        let mut copy = copies[1].clone();
        match hear_round(ModelHash::of_tensors(&copy)).await {
            Heard::Delta { steps, payload } => {
                assert_eq!(steps.len(), 3, "rounds 1, 2 and 3");
                assert!(payload > 0);
                for (base, q) in &steps {
                    assert_eq!(*base, ModelHash::of_tensors(&copy));
                    add_scaled(&mut copy, q, 1.0).expect("add");
                }
                assert_eq!(ModelHash::of_tensors(&copy), ModelHash::of_tensors(&public));
            }
            Heard::State(..) => panic!("took the whole copy"),
            Heard::Nothing(reason) => panic!("nothing: {reason}"),
        }
        // A copy none of the served q's applies to (new, or older than the history) is not
        // patched from q's.
        let stranger = set(&[1.0; 256]);
        assert!(
            !matches!(
                hear_round(ModelHash::of_tensors(&stranger)).await,
                Heard::Delta { .. }
            ),
            "an unknown copy was patched from q's"
        );
        shutdown.cancel();
    }
}
