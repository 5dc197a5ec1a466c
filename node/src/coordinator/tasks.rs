//! The all-to-all coordinator's spawned work: train and publish this node's delta, fetch a
//! peer's delta, apply an aggregate, take a peer's state. Each task reports back once, as a
//! [`Done`], on the coordinator's bounded channel.
//!
//! Owns: nothing between calls. Must not touch: the round machine (only the coordinator
//! feeds it) or the current base (the coordinator swaps it when a task reports).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use meshtune_protocol::{
    ChunkList, CodecParams, DecodeError, DeltaManifest, ErrorFeedback, ModelHash, ModelLayout,
    Sparsity, TensorSet, ValueFormat, VerifiedBlob, chunk_blob, decode_delta, encode_delta,
};
use tokio::sync::mpsc;

use super::config::CoordinatorConfig;
use super::error::BuildDeltaError;
use super::metrics::NodeMetrics;
use super::sync::{SyncError, SyncedState, fetch_state};
use crate::averaging::aggregate::{difference, l2_norm};
use crate::averaging::overlap::{Busy, BusyClock};
use crate::energy::EnergyMeter;
use crate::network::Client;
use crate::network::fetch::{FetchError, fetch_blob};
use crate::network::store::BlobStore;
use crate::network::store::lock as lock_store;
use crate::trainer::{EvalReport, TrainReport, TrainerError, TrainerHandle};

/// How long a publish is retried while the gossip mesh forms.
const PUBLISH_RETRY: Duration = Duration::from_secs(10);

/// Why this node has no delta for a round (the round goes on with its peers' deltas).
#[derive(Debug, thiserror::Error)]
pub enum OwnDeltaError {
    #[error("local training: {0}")]
    Training(TrainerError),
    #[error("encoding the delta: {0}")]
    Encoding(BuildDeltaError),
    /// The encoder panicked: the residuals it held are gone with it.
    #[error("the encoder task panicked: {0}")]
    EncoderPanicked(String),
}

/// Work finished by a spawned task.
pub enum Done {
    Published {
        round: u64,
        /// False when the node had left the round (syncing) and withheld the manifest.
        announced: bool,
        base: ModelHash,
        own: Box<TensorSet>,
        report: TrainReport,
        feedback: ErrorFeedback,
        delta_bytes: u64,
        raw_bytes: u64,
    },
    TrainFailed {
        round: u64,
        error: OwnDeltaError,
        feedback: ErrorFeedback,
    },
    /// The trainer is done with `round`'s delta (the encoding and announcing go on).
    TrainerFree { round: u64 },
    /// An ahead phase of `round` ended (see `averaging::overlap`).
    AheadTrained {
        round: u64,
        result: Result<TrainReport, TrainerError>,
    },
    Fetched {
        sender: PeerId,
        round: u64,
        result: Result<(TensorSet, u64), DeltaError>,
    },
    Applied {
        round: u64,
        base: Box<TensorSet>,
        hash: ModelHash,
        eval: Option<EvalReport>,
    },
    Synced {
        from: PeerId,
        result: Result<SyncedState, SyncError>,
    },
    /// An applied round is written down (see `coordinator::persist`).
    Persisted(Box<super::persist::Persisted>),
}

/// Why a peer's delta is not usable.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("decoding: {0}")]
    Decode(#[from] DecodeError),
    #[error("delta norm {norm:.3e} exceeds the bound {max:.3e}")]
    Norm { norm: f64, max: f64 },
    #[error("decoder task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl DeltaError {
    /// Whether `sender` itself sent invalid data (as opposed to the delta being unavailable,
    /// or another provider serving bad chunks).
    pub fn sender_at_fault(&self, sender: PeerId) -> bool {
        match self {
            DeltaError::Fetch(FetchError::BadData { bad_peers, .. }) => bad_peers.contains(&sender),
            DeltaError::Fetch(FetchError::Unavailable { .. }) | DeltaError::Task(_) => false,
            DeltaError::Decode(_) | DeltaError::Norm { .. } => true,
        }
    }

    /// Providers other than the sender that served chunks not matching their hashes.
    pub fn bad_providers(&self, sender: PeerId) -> Vec<PeerId> {
        match self {
            DeltaError::Fetch(FetchError::BadData { bad_peers, .. }) => {
                bad_peers.iter().copied().filter(|p| *p != sender).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// Where the coordinator is, as a training task sees it when it finishes: a node that synced
/// or moved on meanwhile must not announce a stale round (peers would count it as
/// equivocation or staleness against this node).
#[derive(Clone)]
pub struct Position {
    /// The round the machine is collecting for (`u64::MAX` while syncing).
    pub round: Arc<AtomicU64>,
    pub base: Arc<Mutex<ModelHash>>,
}

impl Position {
    pub fn new(round: u64, base: ModelHash) -> Self {
        Self {
            round: Arc::new(AtomicU64::new(round)),
            base: Arc::new(Mutex::new(base)),
        }
    }

    pub fn set(&self, round: u64, base: ModelHash) {
        self.round.store(round, Ordering::SeqCst);
        match self.base.lock() {
            Ok(mut current) => *current = base,
            Err(poisoned) => *poisoned.into_inner() = base,
        }
    }

    fn is(&self, round: u64, base: ModelHash) -> bool {
        let current = match self.base.lock() {
            Ok(current) => *current,
            Err(poisoned) => *poisoned.into_inner(),
        };
        self.round.load(Ordering::SeqCst) == round && current == base
    }
}

/// What a training task needs besides the shared handles.
pub struct TrainJob {
    pub round: u64,
    pub base_hash: ModelHash,
    pub base: TensorSet,
    pub steps: usize,
    pub feedback: ErrorFeedback,
    pub me: PeerId,
    pub position: Position,
    /// The report of the round's local phase, trained ahead (overlap): the task rebases it
    /// onto `base` instead of training.
    pub ahead: Option<TrainReport>,
}

/// The handles every task uses.
#[derive(Clone)]
pub struct Shared {
    pub config: CoordinatorConfig,
    pub trainer: TrainerHandle,
    pub client: Client,
    pub store: Arc<Mutex<BlobStore>>,
    pub metrics: NodeMetrics,
    pub done: mpsc::Sender<Done>,
    /// When the trainer computes (the rounds' utilization).
    pub busy: Arc<Mutex<BusyClock>>,
}

impl Shared {
    pub fn new(start: super::config::Start, done: mpsc::Sender<Done>) -> Self {
        Self {
            config: start.config,
            trainer: start.trainer,
            client: start.client,
            store: start.store,
            metrics: start.metrics,
            done,
            busy: Arc::new(Mutex::new(BusyClock::new(Instant::now()))),
        }
    }

    /// Marks the trainer busy (`true`) or idle now.
    pub fn set_busy(&self, busy: bool) {
        let mut clock = match self.busy.lock() {
            Ok(clock) => clock,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now = Instant::now();
        if busy {
            clock.start(now)
        } else {
            clock.stop(now)
        }
    }

    /// The trainer's busy and wall time since the last call.
    pub fn take_busy(&self) -> Busy {
        let mut clock = match self.busy.lock() {
            Ok(clock) => clock,
            Err(poisoned) => poisoned.into_inner(),
        };
        clock.take(Instant::now())
    }
}

/// This node's delta as peers will see it.
struct OwnDelta {
    manifest_bytes: Vec<u8>,
    manifest: DeltaManifest,
    /// Decoded exactly as peers decode it, so every node aggregates identical values.
    decoded: TensorSet,
    chunks: ChunkList,
    blob: VerifiedBlob,
    raw_bytes: u64,
}

/// Trains `job.steps` from `job.base`, encodes and stores the delta, and announces it unless
/// the node left the round meanwhile.
pub async fn train_and_publish(job: TrainJob, shared: Shared) {
    let TrainJob {
        round,
        base_hash,
        base,
        steps,
        feedback,
        me,
        position,
        ahead,
    } = job;
    let fail = |error: OwnDeltaError, feedback| Done::TrainFailed {
        round,
        error,
        feedback,
    };
    // With `keep_residual` the node trains from the mesh's model plus what it has not sent
    // yet; its delta from the mesh's model then holds that residual already, so the codec
    // starts from an empty one (and stores the new residual).
    let keep = shared.config.keep_residual;
    let start = if keep {
        plus_residual(&base, &feedback)
    } else {
        base.clone()
    };
    let trained = match ahead {
        Some(report) => rebase_or_train(&shared, base.clone(), report, steps).await,
        None => train_local(&shared, start, steps).await,
    };
    let (report, after) = match trained {
        Ok(trained) => trained,
        Err(err) => {
            let _ = shared
                .done
                .send(fail(OwnDeltaError::Training(err), feedback))
                .await;
            return;
        }
    };
    let _ = shared.done.send(Done::TrainerFree { round }).await;
    let misbehave = shared.config.misbehave.map(|m| m.in_round(round));
    let config = shared.config.clone();
    let samples = report.samples.max(1);
    let steps_done = report.steps as u64;
    // Encoding a large model takes a while: off the async threads. The residuals come back on
    // error too, so a failed encode does not lose what earlier rounds left out (encode_delta
    // checks every tensor before it touches a residual).
    let encoded = tokio::task::spawn_blocking(move || {
        let mut feedback = feedback;
        let head = DeltaHead {
            round,
            base_hash,
            me,
            samples,
            steps: steps_done,
        };
        // Under `keep_residual` the residual is in `after - base` already: encode from an empty
        // one, and put the old one back if encoding fails (nothing trained is lost).
        let saved = keep.then(|| std::mem::take(&mut feedback));
        let result = encode_own_delta(&config, head, &after, &base, misbehave, &mut feedback);
        if let (Err(_), Some(saved)) = (&result, saved) {
            feedback = saved;
        }
        (feedback, result)
    })
    .await;
    let (feedback, own) = match encoded {
        Ok((feedback, Ok(own))) => (feedback, own),
        Ok((feedback, Err(err))) => {
            let error = OwnDeltaError::Encoding(err);
            let _ = shared.done.send(fail(error, feedback)).await;
            return;
        }
        // The encoder panicked: its residuals are gone with it.
        Err(err) => {
            let error = OwnDeltaError::EncoderPanicked(err.to_string());
            let _ = shared.done.send(fail(error, ErrorFeedback::new())).await;
            return;
        }
    };
    let delta_bytes = own.blob.as_bytes().len() as u64;
    let raw_bytes = own.raw_bytes;
    let announced = position.is(round, base_hash);
    let decoded = announce(&shared, own, round, announced).await;
    tracing::debug!(round, bytes = delta_bytes, raw_bytes, "published delta");
    let _ = shared
        .done
        .send(Done::Published {
            round,
            announced,
            base: base_hash,
            own: Box::new(decoded),
            report,
            feedback,
            delta_bytes,
            raw_bytes,
        })
        .await;
}

/// `base` plus the error-feedback residual of each tensor that has one: this node's own model
/// under `keep_residual`.
pub fn plus_residual(base: &TensorSet, feedback: &ErrorFeedback) -> TensorSet {
    let mut model = base.clone();
    for (name, values) in model.values_mut() {
        if let Some(residual) = feedback.residual(name)
            && residual.len() == values.len()
        {
            for (value, carried) in values.iter_mut().zip(residual) {
                *value += carried;
            }
        }
    }
    model
}

/// Local training from `base`: the report (with the joules the power reader measured) and the
/// weights after it.
async fn train_local(
    shared: &Shared,
    base: TensorSet,
    steps: usize,
) -> Result<(TrainReport, TensorSet), TrainerError> {
    // The trainer may hold weights from before a sync or a restore: start from the base.
    shared.trainer.set_weights(base).await?;
    let energy = shared.config.energy.as_ref();
    let before = energy.and_then(EnergyMeter::joules);
    shared.set_busy(true);
    let report = shared.trainer.train(steps).await;
    shared.set_busy(false);
    let mut report = report?;
    let after = energy.and_then(EnergyMeter::joules);
    report.energy_j = before.zip(after).map(|(b, a)| a - b);
    Ok((report, shared.trainer.weights().await?))
}

/// The round's local phase as trained ahead, moved onto `base` (the weights after it), or,
/// when the model was replaced since (a sync), trained again from `base`.
async fn rebase_or_train(
    shared: &Shared,
    base: TensorSet,
    report: TrainReport,
    steps: usize,
) -> Result<(TrainReport, TensorSet), TrainerError> {
    match shared.trainer.rebase(base.clone()).await? {
        Some(after) => Ok((report, after)),
        None => {
            tracing::info!(
                "the model was replaced during the ahead phase: training the round from its base"
            );
            train_local(shared, base, steps).await
        }
    }
}

/// Trains `round`'s local phase ahead, on from the trainer's current model, while the previous
/// round is exchanged (see `averaging::overlap`).
pub async fn train_ahead(
    round: u64,
    steps: usize,
    start: Option<(TensorSet, f32)>,
    shared: Shared,
) {
    let energy = shared.config.energy.as_ref();
    let before = energy.and_then(EnergyMeter::joules);
    shared.set_busy(true);
    let result = shared.trainer.train_ahead(steps, start).await;
    shared.set_busy(false);
    let after = energy.and_then(EnergyMeter::joules);
    let result = result.map(|mut report| {
        report.energy_j = before.zip(after).map(|(b, a)| a - b);
        report
    });
    let _ = shared.done.send(Done::AheadTrained { round, result }).await;
}

/// The manifest fields of this node's delta that are not about its bytes.
struct DeltaHead {
    round: u64,
    base_hash: ModelHash,
    me: PeerId,
    samples: u64,
    steps: u64,
}

/// Encodes `after - base` with the node's codec (and its error feedback), or the deliberately
/// bad delta of a byzantine test node (`misbehave`: `Some(Some(k))` scales by k, `Some(None)`
/// sends NaN).
fn encode_own_delta(
    config: &CoordinatorConfig,
    head: DeltaHead,
    after: &TensorSet,
    base: &TensorSet,
    misbehave: Option<Option<f32>>,
    feedback: &mut ErrorFeedback,
) -> Result<OwnDelta, BuildDeltaError> {
    let mut delta = difference(after, base)?;
    let raw_bytes = delta.total_elements() * 4;
    let codec = match misbehave {
        Some(Some(factor)) => {
            tracing::warn!(
                round = head.round,
                factor,
                "byzantine: publishing a scaled delta on purpose"
            );
            for (_, values) in delta.values_mut() {
                values.iter_mut().for_each(|v| *v *= factor);
            }
            config.codec
        }
        // Plain f32 (no compression), so the NaNs written over the blob below decode as NaN.
        Some(None) => CodecParams {
            values: ValueFormat::F32,
            sparsity: Sparsity::Dense,
            byte_shuffle: false,
            zstd_level: None,
        },
        None => config.codec,
    };
    let lossy = !codec.is_lossless();
    if lossy && config.ef_decay < 1.0 {
        feedback.scale(config.ef_decay);
    }
    if lossy && let Some(factor) = config.ef_bound {
        let bounded = feedback.bound_by(&delta, factor);
        tracing::debug!(round = head.round, bounded, "residuals bounded");
    }
    if lossy && config.ef_relearn {
        let relearnt = feedback.discount_relearned(&delta);
        tracing::debug!(round = head.round, relearnt, "residual discounted");
    }
    let mut encoded = encode_delta(&delta, &codec, lossy.then_some(feedback))?;
    let factored = encoded.tensors.iter().filter(|t| t.encoding.rank.is_some());
    tracing::debug!(
        round = head.round,
        factored = factored.count(),
        tensors = encoded.tensors.len(),
        "delta encoded"
    );
    if misbehave == Some(None) {
        tracing::warn!(
            round = head.round,
            "byzantine: publishing a NaN delta on purpose"
        );
        let first = &encoded.tensors[0];
        let (start, end) = (
            first.offset as usize,
            (first.offset + first.length) as usize,
        );
        for value in encoded.blob[start..end].chunks_exact_mut(4) {
            value.copy_from_slice(&f32::NAN.to_le_bytes());
        }
    }
    let chunks = chunk_blob(&encoded.blob, config.chunk_size)?;
    let manifest = DeltaManifest {
        mesh_id: config.mesh_id.clone(),
        round: head.round,
        base_model: head.base_hash,
        sender: head.me.to_bytes(),
        sample_count: head.samples,
        training_steps: head.steps,
        blob: chunks.descriptor(),
        tensors: encoded.tensors,
    };
    let manifest_bytes = manifest.encode(&config.limits)?;
    let blob = VerifiedBlob::verify(encoded.blob, &manifest.blob)?;
    let decoded = if misbehave == Some(None) {
        delta
    } else {
        decode_delta(&manifest, &blob, &delta.layout(), &config.limits)?
    };
    Ok(OwnDelta {
        manifest_bytes,
        manifest,
        decoded,
        chunks,
        blob,
        raw_bytes,
    })
}

/// Stores the delta's blob for peers to pull and, when `announced`, gossips its manifest
/// (retried briefly while the gossip mesh forms; a node with no peer at all does not wait).
/// Returns the decoded delta.
async fn announce(shared: &Shared, own: OwnDelta, round: u64, announced: bool) -> TensorSet {
    let OwnDelta {
        manifest_bytes,
        manifest,
        decoded,
        chunks,
        blob,
        ..
    } = own;
    match lock_store(&shared.store) {
        Ok(mut store) => {
            store.insert(round, Arc::new(blob.into_bytes()), chunks);
            if announced {
                // Served to peers that connect after the gossip went out.
                store.set_current_manifest(manifest);
            }
        }
        Err(err) => tracing::error!(round, error = %err, "the delta cannot be served"),
    }
    if !announced {
        tracing::info!(round, "not announcing a round this node has left");
        return decoded;
    }
    let started = Instant::now();
    loop {
        let Err(err) = shared.client.publish(manifest_bytes.clone()).await else {
            break;
        };
        let alone = shared
            .client
            .mesh_peers()
            .await
            .map_or(true, |p| p.is_empty());
        if alone || started.elapsed() > PUBLISH_RETRY {
            tracing::warn!(round, error = %err, alone, "delta manifest not published");
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    decoded
}

/// Fetches `manifest`'s delta from `providers` (the sender first), decodes and bounds it, and
/// keeps its blob servable for peers that pull from this node.
pub async fn fetch_delta(
    manifest: Arc<DeltaManifest>,
    providers: Vec<PeerId>,
    layout: ModelLayout,
    shared: Shared,
) {
    let sender = providers[0];
    let round = manifest.round;
    let result = fetch_and_decode(&manifest, &providers, layout, &shared).await;
    let _ = shared
        .done
        .send(Done::Fetched {
            sender,
            round,
            result,
        })
        .await;
}

async fn fetch_and_decode(
    manifest: &Arc<DeltaManifest>,
    providers: &[PeerId],
    layout: ModelLayout,
    shared: &Shared,
) -> Result<(TensorSet, u64), DeltaError> {
    let config = &shared.config;
    let fetched = fetch_blob(
        &shared.client,
        &manifest.blob,
        providers,
        &config.limits,
        config.fetch,
    )
    .await?;
    let payload = fetched.payload_bytes;
    let limits = config.limits.clone();
    let to_decode = Arc::clone(manifest);
    let (delta, blob, chunks) = tokio::task::spawn_blocking(move || {
        decode_delta(&to_decode, &fetched.blob, &layout, &limits)
            .map(|d| (d, fetched.blob, fetched.chunks))
    })
    .await??;
    let norm = l2_norm(&delta);
    if let Some(max) = config.max_delta_norm
        && norm > max
    {
        return Err(DeltaError::Norm { norm, max });
    }
    match lock_store(&shared.store) {
        Ok(mut store) => store.insert(manifest.round, Arc::new(blob.into_bytes()), chunks),
        Err(err) => {
            tracing::error!(round = manifest.round, error = %err, "a fetched delta cannot be served on")
        }
    }
    Ok((delta, payload))
}

/// Gives the trainer the round's new base (plus this node's residual under `keep_residual`:
/// `own`) and evaluates the mesh's model when asked, so every node reports the quality of the
/// model the mesh agrees on. Under overlap the trainer keeps its model (an ahead phase is on
/// it) and only evaluates the base.
pub async fn apply_round(
    round: u64,
    next: TensorSet,
    hash: ModelHash,
    evaluate: bool,
    own: Option<TensorSet>,
    shared: Shared,
) {
    let result = async {
        // Whether the trainer holds another model than the base (evaluated on the side).
        let holds_other = own.is_some() || shared.config.overlap;
        match own {
            Some(own) => shared.trainer.set_weights(own).await?,
            None if !holds_other => shared.trainer.set_weights(next.clone()).await?,
            None => {}
        }
        if !evaluate {
            return Ok::<_, TrainerError>(None);
        }
        let energy = shared.config.energy.as_ref();
        let before = energy.and_then(EnergyMeter::joules);
        let mut report = if holds_other {
            shared.trainer.evaluate_at(next.clone()).await?
        } else {
            shared.trainer.evaluate().await?
        };
        let after = energy.and_then(EnergyMeter::joules);
        report.energy_j = before.zip(after).map(|(b, a)| a - b);
        Ok(Some(report))
    }
    .await;
    let eval = result.unwrap_or_else(|err| {
        tracing::error!(round, error = %err, "applying the round failed");
        None
    });
    let _ = shared
        .done
        .send(Done::Applied {
            round,
            base: Box::new(next),
            hash,
            eval,
        })
        .await;
}

/// Takes `from`'s state (of `round` or later) and reports it.
pub async fn sync_state(from: PeerId, round: u64, layout: ModelLayout, shared: Shared) {
    let result = fetch_state(
        &shared.client,
        from,
        round,
        layout,
        &shared.config,
        Some(&shared.metrics),
    )
    .await;
    let _ = shared.done.send(Done::Synced { from, result }).await;
}

#[cfg(test)]
mod tests {
    use meshtune_protocol::{CodecParams, Tensor, encode_delta};

    use super::*;

    fn set(a: Vec<f32>, b: Vec<f32>) -> TensorSet {
        TensorSet::new(vec![
            Tensor::new("a", vec![a.len()], a).expect("valid"),
            Tensor::new("b", vec![b.len()], b).expect("valid"),
        ])
        .expect("valid")
    }

    /// `keep_residual`: a node's own model is the mesh's plus what its codec left out, and
    /// its next delta from the mesh's model (encoded from an empty residual) carries that
    /// residual: nothing it trained is set back, nothing is sent twice.
    #[test]
    fn a_kept_residual_is_in_the_model_and_in_the_next_delta_once() {
        let base = set(vec![1.0, 2.0, 3.0, 4.0], vec![10.0]);
        let codec: CodecParams = "top25%+f32".parse().expect("codec");
        let mut feedback = ErrorFeedback::new();
        // Round 1: the node trained +0.5 on a[0], +0.1 on a[1] and b[0]; top-25% sends a[0]
        // and b[0] (the largest of each tensor) and keeps a[1] as residual.
        let delta = set(vec![0.5, 0.1, 0.0, 0.0], vec![0.1]);
        encode_delta(&delta, &codec, Some(&mut feedback)).expect("encodes");
        assert_eq!(feedback.residual("a"), Some(&[0.0, 0.1, 0.0, 0.0][..]));
        let own = plus_residual(&base, &feedback);
        assert_eq!(own.get("a").expect("a").values, [1.0, 2.1, 3.0, 4.0]);
        assert_eq!(own.get("b").expect("b").values, [10.0]);
        // Round 2, trained nothing: the delta from the mesh's model is the residual, sent
        // from an empty one (as `train_and_publish` does), so a[1] goes out once.
        let after = own;
        let mut delta = after.clone();
        for ((_, d), base) in delta.values_mut().zip(base.tensors()) {
            d.iter_mut().zip(&base.values).for_each(|(d, b)| *d -= b);
        }
        let mut fresh = ErrorFeedback::new();
        let encoded = encode_delta(&delta, &codec, Some(&mut fresh)).expect("encodes");
        assert_eq!(encoded.tensors[0].encoding.kept, Some(1));
        assert_eq!(
            fresh.squared_norm(),
            0.0,
            "only a[1] was left and it was sent"
        );
        // Without a residual the node's model is the mesh's.
        assert_eq!(plus_residual(&base, &ErrorFeedback::new()), base);
    }

    /// Two rounds of `top25%+f32` from a zero base: round 1's `a = [0.5, 0.1, 0, 0]` sends
    /// 0.5 and leaves 0.1 out, then `second` is round 2's `a`. Returns round 2's decoded
    /// delta and the residual after it.
    fn two_rounds(
        configure: impl FnOnce(&mut CoordinatorConfig),
        second: Vec<f32>,
    ) -> (TensorSet, ErrorFeedback) {
        let base = set(vec![0.0; 4], vec![0.0]);
        let me = PeerId::random();
        let head = |round| DeltaHead {
            round,
            base_hash: ModelHash::of_bytes(b"base"),
            me,
            samples: 1,
            steps: 1,
        };
        let mut config = CoordinatorConfig::new("m", std::path::PathBuf::from("unused"));
        config.codec = "top25%+f32".parse().expect("codec");
        configure(&mut config);
        let mut feedback = ErrorFeedback::new();
        let first = set(vec![0.5, 0.1, 0.0, 0.0], vec![0.1]);
        encode_own_delta(&config, head(1), &first, &base, None, &mut feedback)
            .expect("round 1 encodes");
        assert_eq!(feedback.residual("a"), Some(&[0.0, 0.1, 0.0, 0.0][..]));
        let second = set(second, vec![0.0]);
        let own = encode_own_delta(&config, head(2), &second, &base, None, &mut feedback)
            .expect("round 2 encodes");
        (own.decoded, feedback)
    }

    /// `ef_decay`: the residual is scaled before the new delta joins it, so with 0.5 a
    /// left-out 0.1 stays as 0.05 and with 0 it is gone (top-k without memory).
    #[test]
    fn error_feedback_decays_by_the_configured_factor_before_the_next_delta() {
        for decay in [1.0_f32, 0.5, 0.0] {
            // Round 2 sends its own 0.3; what stays left out is the decayed 0.1.
            let (_, feedback) = two_rounds(|c| c.ef_decay = decay, vec![0.0, 0.0, 0.0, 0.3]);
            assert_eq!(
                feedback.residual("a"),
                Some(&[0.0, 0.1 * decay, 0.0, 0.0][..]),
                "decay {decay}"
            );
        }
    }

    /// `ef_relearn`: a next delta that learnt the left-out 0.1 again (and more) sends it once,
    /// not 0.1 + 0.3; without the setting the residual joins it and is sent twice over.
    #[test]
    fn a_relearnt_residual_is_not_sent_twice() {
        for (relearn, sent) in [(true, 0.3_f32), (false, 0.4)] {
            let (decoded, feedback) =
                two_rounds(|c| c.ef_relearn = relearn, vec![0.0, 0.3, 0.0, 0.0]);
            let a = decoded.get("a").expect("a");
            assert!(
                (a.values[1] - sent).abs() < 1e-6,
                "relearn {relearn}: {a:?}"
            );
            assert_eq!(feedback.residual("a"), Some(&[0.0; 4][..]));
        }
    }

    /// `ef_bound`: a residual larger than the bound times the new delta's norm is scaled
    /// down before it joins: round 2's delta has norm 0.02 (on a[3]), so with bound 2 the
    /// left-out 0.1 enters as 0.04 and with bound 10 whole; round 2 sends a[1] either way.
    #[test]
    fn error_feedback_residual_is_bounded_by_the_new_delta() {
        for (bound, carried) in [(None, 0.1_f32), (Some(10.0), 0.1), (Some(2.0), 0.04)] {
            let (decoded, feedback) = two_rounds(|c| c.ef_bound = bound, vec![0.0, 0.0, 0.0, 0.02]);
            let a = decoded.get("a").expect("a");
            assert!(
                (a.values[1] - carried).abs() < 1e-6,
                "bound {bound:?}: {a:?}"
            );
            assert_eq!(
                feedback.residual("a"),
                Some(&[0.0, 0.0, 0.0, 0.02][..]),
                "bound {bound:?}"
            );
        }
    }
}
