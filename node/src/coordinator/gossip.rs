//! Sparse gossip averaging (`topology = "gossip:K[:STEP]"`): each round a node mixes with at
//! most K neighbours (connected mesh peers, kept while they stay connected, new ones picked
//! by a hash of the pair) instead of the whole mesh, so the bytes a node
//! sends and receives per round stay flat as the mesh grows. Models are no longer identical;
//! their spread shrinks geometrically at a rate set by the overlay's spectral gap.
//!
//! The algorithm is compressed gossip with error feedback per link, after CHOCO-gossip
//! (Koloskova, Stich and Jaggi, ICML 2019), which keeps compression (top-k, int8) safe
//! without a shared base:
//!
//! - node i keeps, for each neighbour j it pulls from, a *copy* of j's model that j keeps
//!   too, bit for bit (j keeps one per distinct copy its pullers hold, by hash);
//! - after local training, j encodes q = Q(x_j − copy) with the delta codec for each copy its
//!   pullers hold, and both ends add the decoded q to that copy; what the codec drops stays in
//!   x_j − copy and is sent later (the error feedback is built in);
//! - i then mixes: x_i += STEP / (k + 1) · Σ_j (copy_j − x_i) over the k neighbours heard.
//!
//! A puller names the hash of its copy when it asks ([`ChunkRequest::LinkDelta`]); a copy the
//! sender no longer knows (a new link, a restart, a copy that missed rounds the sender has
//! moved past) gets the q from the *anchor*, the model every node started from, which both
//! ends hold. So a new neighbour costs one q, never a whole model, and a copy that missed
//! rounds catches up with one q. Pullers that got the same q hold the same copy, so a node
//! encodes one q per distinct copy (its pullers mostly share a few), not one per puller.
//! Manifests are not gossiped: a node asks each neighbour, so no traffic grows with the mesh.
//!
//! Owns: the copies (own and neighbours') and the gossip round loop. Shares with the
//! all-to-all loop: the codec, blob store, fetch, checkpoints and the per-round record.

use std::collections::{BTreeMap, HashMap};
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
use super::{CoordinatorConfig, RoundRecord, RunSummary, append_record, blocking, process_memory};
use crate::averaging::aggregate::{difference, l2_norm};
use crate::energy::RoundEnergy;
use crate::network::fetch::fetch_blob;
use crate::network::store::{BlobStore, LinkOffers};
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

/// The mixing step: `model += step / (k + 1) * Σ_j (copy_j − model)` over the k copies.
pub fn mix(model: &mut TensorSet, copies: &[&TensorSet], step: f32) -> anyhow::Result<()> {
    for copy in copies {
        anyhow::ensure!(copy.layout() == model.layout(), "tensor layouts differ");
    }
    let weight = step / (copies.len() as f32 + 1.0);
    for (index, (_, values)) in model.values_mut().enumerate() {
        let sources: Vec<&[f32]> = copies
            .iter()
            .map(|c| c.tensors()[index].values.as_slice())
            .collect();
        for (i, x) in values.iter_mut().enumerate() {
            let pull: f32 = sources.iter().map(|c| c[i] - *x).sum();
            *x += weight * pull;
        }
    }
    Ok(())
}

/// Up to `degree` neighbours among `candidates` (the connected peers of the mesh). Sticky:
/// the `current` neighbours that are still candidates stay (a new neighbour's first q comes
/// from the anchor, coarser than one for a copy kept round after round); free places go to the candidates ranked first by a hash of the
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

/// Rounds of own q blobs kept servable for pullers still fetching an earlier round's.
const BLOB_HISTORY: u64 = 3;

/// A neighbour's model as this node keeps it: the copy its q's build, bit for bit the one
/// the neighbour keeps for this link.
struct Copy {
    model: TensorSet,
    hash: ModelHash,
    /// The neighbour's round the copy is of.
    round: u64,
}

/// What one neighbour sent this round.
enum Heard {
    /// Its q for this link, decoded: the copy it applies to (ours, or the anchor when we
    /// named none it knows), its round, and the payload bytes fetched.
    Delta {
        base: ModelHash,
        round: u64,
        q: Box<TensorSet>,
        payload: u64,
    },
    Nothing(String),
}

/// The copies of this node's model its pullers hold, by hash (the anchor always among them).
type Mine = HashMap<ModelHash, TensorSet>;

/// What [`publish_links`] made: the mean encoded size of the q's for pullers' copies (the
/// anchor's when there are none), the raw f32 bytes of one difference, and how many q's were
/// encoded.
struct Published {
    delta_bytes: u64,
    raw_bytes: u64,
    encoded: usize,
}

/// Step 2 of a round: for each copy of this node's model a puller holds (as the store last
/// served it) and for the anchor, q = Q(model − copy) with the node's codec (the anchor's
/// without top-k after round 0), and the copy that q leaves, kept for the next round. Served
/// from `store` as this round's [`LinkOffers`]; the anchor's is also the node's current
/// manifest (a joiner's way in). `counts` = (samples, optimizer steps) of the round.
fn publish_links(
    store: &Mutex<BlobStore>,
    config: &CoordinatorConfig,
    (me, round): (PeerId, u64),
    model: &TensorSet,
    (anchor, mine): (ModelHash, &mut Mine),
    layout: &ModelLayout,
    counts: (u64, u64),
) -> anyhow::Result<Published> {
    let holders = store
        .lock()
        .map_err(|_| anyhow::anyhow!("blob store poisoned"))?
        .link_holders();
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
            sample_count: counts.0,
            training_steps: counts.1,
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
    if let Ok(mut s) = store.lock() {
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
    }
    Ok(Published {
        delta_bytes: total / bases.len().saturating_sub(1).max(1) as u64,
        raw_bytes,
        encoded: bases.len(),
    })
}

/// Asks `peer` for its q of `round` (or later) for our copy `copy` until it has one or
/// `deadline` passes, then fetches and decodes it. A q that applies to neither our copy nor
/// the anchor is refused.
#[allow(clippy::too_many_arguments)]
async fn hear(
    peer: PeerId,
    round: u64,
    (copy, anchor): (Option<ModelHash>, ModelHash),
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
            return Heard::Nothing("no q for the round before the deadline".into());
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
    if Some(manifest.base_model) != copy && manifest.base_model != anchor {
        return Heard::Nothing(format!(
            "its q applies to copy {}, neither ours nor the anchor {anchor} (did it start from another model?)",
            manifest.base_model
        ));
    }
    let round = manifest.round;
    match fetch_q(peer, manifest, &layout, &config, &client).await {
        Ok((base, q, payload)) => Heard::Delta {
            base,
            round,
            q: Box::new(q),
            payload,
        },
        Err(reason) => Heard::Nothing(reason),
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
    anchor: (&TensorSet, ModelHash),
    layout: &ModelLayout,
    config: &CoordinatorConfig,
    client: &Client,
) -> anyhow::Result<Option<(PeerId, u64, TensorSet)>> {
    let patience = (config.round.collect_timeout / 3).max(Duration::from_secs(1));
    for &peer in peers.iter().take(3) {
        let deadline = Instant::now() + patience;
        let heard = hear(
            peer,
            0,
            (None, anchor.1),
            layout.clone(),
            config.clone(),
            client.clone(),
            deadline,
        )
        .await;
        match heard {
            Heard::Delta {
                base,
                round: peer_round,
                q,
                ..
            } if base == anchor.1 => {
                let mut model = anchor.0.clone();
                add_scaled(&mut model, &q, 1.0)?;
                return Ok(Some((peer, peer_round, model)));
            }
            Heard::Delta { .. } => {
                tracing::warn!(peer = %peer, "a running mesh's peer sent a q for another copy");
            }
            Heard::Nothing(reason) => {
                tracing::warn!(peer = %peer, reason, "could not take a running mesh's model from this peer");
            }
        }
    }
    Ok(None)
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
    let mut restored_anchor: Option<TensorSet> = None;
    if let Some(restored) = trainer.restore(checkpoints.clone()).await? {
        round = restored.state["next_round"].as_u64().unwrap_or(0);
        let tensors = restored
            .extras
            .into_iter()
            .filter_map(|(name, shape, values)| {
                let name = name.strip_prefix("anchor/")?.to_owned();
                Some(meshtune_protocol::Tensor::new(&name, shape, values))
            })
            .collect::<Result<Vec<_>, _>>()?;
        anyhow::ensure!(
            !tensors.is_empty(),
            "checkpoint in {} has no anchor model (written by an older meshtune or another topology): start with a fresh --out directory",
            checkpoints.display()
        );
        restored_anchor = Some(TensorSet::new(tensors)?);
        tracing::info!(round, "resumed from checkpoint");
    }
    let mut model = trainer.weights().await?;
    let layout = model.layout();
    // The anchor is the model every node of the mesh starts from: a q for a copy the sender
    // no longer knows (a new link, a restart) is taken from it, so no link ever needs a
    // whole model on the wire.
    let fresh_start = restored_anchor.is_none();
    let anchor = restored_anchor.unwrap_or_else(|| model.clone());
    let anchor_hash = ModelHash::of_tensors(&anchor);
    anyhow::ensure!(
        anchor.layout() == layout,
        "the checkpoint's anchor model has another layout than the model"
    );
    let mut mine: Mine = HashMap::from([(anchor_hash, anchor.clone())]);
    let rounds_path = config.out.join("rounds.jsonl");
    let mut records: Vec<RoundRecord> = Vec::new();
    let mut copies: BTreeMap<PeerId, Copy> = BTreeMap::new();

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
    // A fresh node joining a mesh already past round 0 starts from a peer's model, taken as
    // that peer's q from the anchor (one delta's bytes), and from its round. That peer becomes
    // its first neighbour: the copy is already here.
    if fresh_start {
        let ahead = peers_ahead(&client, &config).await;
        if !ahead.is_empty() {
            match join_from(&ahead, (&anchor, anchor_hash), &layout, &config, &client).await? {
                Some((peer, peer_round, copy)) => {
                    model = copy.clone();
                    trainer.set_weights(model.clone()).await?;
                    round = peer_round + 1;
                    copies.insert(
                        peer,
                        Copy {
                            hash: ModelHash::of_tensors(&copy),
                            model: copy,
                            round: peer_round,
                        },
                    );
                    neighbours.push(peer);
                    tracing::info!(peer = %peer, round, "joined a running mesh from a peer's model");
                }
                None => tracing::warn!(
                    asked = ahead.len().min(3),
                    "could not take a running mesh's model; starting from the initial model"
                ),
            }
        }
    }
    let mut final_hash = ModelHash::of_tensors(&model);
    while config.rounds.is_none_or(|n| round < n) && !shutdown.is_cancelled() {
        let started = Instant::now();
        let wire_at_start = metrics.wire_bytes();
        metrics.round.set(round as i64);
        let base_hash = final_hash;
        // 1. Local training.
        trainer.set_weights(model.clone()).await?;
        let report = trainer.train(config.local_steps).await?;
        model = trainer.weights().await?;
        // 2. A q per copy of this model that pullers hold (and one from the anchor).
        let candidates = client.mesh_peers().await.unwrap_or_default();
        if let Ok(mut s) = store.lock() {
            s.retain_link_holders(|p| candidates.contains(p));
        }
        let published = blocking(|| {
            publish_links(
                &store,
                &config,
                (me, round),
                &model,
                (anchor_hash, &mut mine),
                &layout,
                (report.samples, report.steps as u64),
            )
        })?;
        // 3. Hear the neighbours (in parallel, until the deadline).
        neighbours = choose_neighbours(me, &neighbours, &candidates, degree);
        let deadline = Instant::now() + config.round.collect_timeout;
        let tasks: Vec<_> = neighbours
            .iter()
            .map(|&peer| {
                let held = copies.get(&peer);
                // A copy already of this round or later (the neighbour was ahead when we
                // last asked) needs nothing new.
                let current = held.is_some_and(|c| c.round >= round);
                let copy = held.map(|c| c.hash);
                let (layout, config, client) = (layout.clone(), config.clone(), client.clone());
                tokio::spawn(async move {
                    if current {
                        return None;
                    }
                    Some(
                        hear(
                            peer,
                            round,
                            (copy, anchor_hash),
                            layout,
                            config,
                            client,
                            deadline,
                        )
                        .await,
                    )
                })
            })
            .collect();
        let mut payload_in = 0u64;
        let mut used: Vec<PeerId> = Vec::new();
        let mut fresh = 0usize;
        for (peer, task) in neighbours.iter().zip(tasks) {
            match task.await {
                Ok(None) => used.push(*peer),
                Ok(Some(Heard::Delta {
                    base,
                    round: peer_round,
                    q,
                    payload,
                })) => {
                    let copy = match copies.get_mut(peer) {
                        Some(copy) if copy.hash == base => copy,
                        _ => {
                            // The neighbour did not know our copy (or we had none): its q
                            // starts from the anchor.
                            fresh += 1;
                            copies.insert(
                                *peer,
                                Copy {
                                    model: anchor.clone(),
                                    hash: anchor_hash,
                                    round: 0,
                                },
                            );
                            copies.get_mut(peer).context("copy just inserted")?
                        }
                    };
                    add_scaled(&mut copy.model, &q, 1.0)?;
                    copy.hash = ModelHash::of_tensors(&copy.model);
                    copy.round = peer_round;
                    payload_in += payload;
                    used.push(*peer);
                }
                Ok(Some(Heard::Nothing(reason))) => {
                    tracing::debug!(peer = %peer, round, reason, "nothing from a neighbour");
                }
                Err(err) => tracing::warn!(peer = %peer, error = %err, "neighbour task failed"),
            }
        }
        // Copies of peers that are no longer neighbours are dropped.
        copies.retain(|p, _| neighbours.contains(p));
        // 4. Mix: move toward the neighbours' models through their copies.
        let heard: Vec<&TensorSet> = used
            .iter()
            .filter_map(|p| copies.get(p).map(|c| &c.model))
            .collect();
        mix(&mut model, &heard, step)?;
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
        let wire = metrics.wire_bytes().since(&wire_at_start);
        let (wire_in, wire_out) = (wire.inbound, wire.outbound);
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
            delta_bytes: published.delta_bytes,
            raw_delta_bytes: published.raw_bytes,
            payload_in,
            wire_in,
            wire_out,
            amplification: (payload_in > 0).then(|| wire_in as f64 / payload_in as f64),
            wire_in_by_protocol: wire.inbound_by_protocol,
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
            fresh,
            qs_encoded = published.encoded,
            delta_bytes = published.delta_bytes,
            wire_in,
            wire_out,
            seconds = seconds_total,
            "gossip round applied"
        );
        metrics.deltas_used.set(used.len() as i64 + 1);
        metrics.round_seconds.set(seconds_total);
        let extras = anchor
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
        // Two nodes, exact copies, full step: both land on the mean.
        let (a, b) = (set(&[0.0, 2.0]), set(&[4.0, -2.0]));
        let mut xa = a.clone();
        mix(&mut xa, &[&b], 1.0).expect("mix");
        let mut xb = b.clone();
        mix(&mut xb, &[&a], 1.0).expect("mix");
        assert_eq!(xa.get("w").expect("w").values, vec![2.0, 0.0]);
        assert_eq!(xb.get("w").expect("w").values, vec![2.0, 0.0]);
        // Half a step with two neighbours: x + 0.5/3 * ((c1 - x) + (c2 - x)).
        let mut x = set(&[0.0]);
        mix(&mut x, &[&set(&[3.0]), &set(&[6.0])], 0.5).expect("mix");
        assert!((x.get("w").expect("w").values[0] - 1.5).abs() < 1e-6);
        // Different layouts are refused.
        let mut x = set(&[0.0]);
        assert!(mix(&mut x, &[&set(&[1.0, 2.0])], 0.5).is_err());
        // No neighbour heard: unchanged.
        let mut x = set(&[1.5]);
        mix(&mut x, &[], 0.5).expect("mix");
        assert_eq!(x.get("w").expect("w").values, vec![1.5]);
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
        let mut mine: Mine = HashMap::from([(anchor_hash, anchor.clone())]);
        publish_links(
            &store,
            &config,
            (running.0, 4),
            &model_of(4),
            (anchor_hash, &mut mine),
            &layout,
            (1, 1),
        )
        .expect("publish");
        let me = stack(7512, empty(), &layout, &shutdown);
        link(&me.1, 7510, silent.0).await;
        link(&me.1, 7511, running.0).await;
        let (peer, round, model) = join_from(
            &[silent.0, running.0],
            (&anchor, anchor_hash),
            &layout,
            &config,
            &me.1,
        )
        .await
        .expect("join")
        .expect("the second peer's model");
        assert_eq!((peer, round), (running.0, 4));
        let error =
            l2_norm(&difference(&model, &model_of(4)).expect("diff")) / l2_norm(&model_of(4));
        assert!(error < 0.02, "relative error {error}");
        let alone = join_from(&[silent.0], (&anchor, anchor_hash), &layout, &config, &me.1)
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
        let mut mine: Mine = HashMap::from([(anchor_hash, anchor.clone())]);
        let publish = |round: u64, mine: &mut Mine| {
            publish_links(
                &store,
                &config,
                (neighbour.0, round),
                &model_of(round),
                (anchor_hash, mine),
                &layout,
                (1, 1),
            )
            .expect("publish")
        };
        let me = stack(7501, empty(), &layout, &shutdown);
        link(&me.1, 7500, neighbour.0).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let hear_round = |round: u64, copy: Option<ModelHash>, anchor: ModelHash| {
            hear(
                neighbour.0,
                round,
                (copy, anchor),
                layout.clone(),
                config.clone(),
                me.1.clone(),
                deadline,
            )
        };
        let relative_error = |copy: &TensorSet, round: u64| {
            let diff = difference(copy, &model_of(round)).expect("diff");
            l2_norm(&diff) / l2_norm(&model_of(round))
        };
        // Our copy is close to the neighbour's model and is, bit for bit, a copy it keeps.
        let holds_neighbours_copy = |copy: &TensorSet, round: u64, bound: f64, mine: &Mine| {
            let error = relative_error(copy, round);
            assert!(error < bound, "relative error {error} in round {round}");
            assert!(
                mine.contains_key(&ModelHash::of_tensors(copy)),
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
            Heard::Nothing(reason) => assert!(reason.contains("anchor"), "{reason}"),
            Heard::Delta { .. } => panic!("a q from another anchor was taken"),
        }
        shutdown.cancel();
    }
}
