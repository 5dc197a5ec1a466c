//! What a round loop is given and what it hands back: [`CoordinatorConfig`] (how a node
//! takes part in rounds), [`Start`] (the handles it runs with) and [`RunSummary`].
//!
//! Owns: the settings' defaults and the byzantine test switch's syntax. Must not touch:
//! anything at run time.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use meshtune_protocol::{CodecParams, DEFAULT_CHUNK_SIZE, Limits, ModelHash};

use super::metrics::NodeMetrics;
use super::record::RoundRecord;
use crate::averaging::aggregate::{Aggregation, OuterOptimizer};
use crate::averaging::gossip::Topology;
use crate::averaging::round::RoundConfig;
use crate::energy::EnergyMeter;
use crate::network::Client;
use crate::network::fetch::FetchConfig;
use crate::network::store::BlobStore;
use crate::trainer::TrainerHandle;

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
    /// Keep what a lossy codec left out of this node's delta (its error-feedback residual) in
    /// the node's own model instead of dropping it from the model until it is sent: the node
    /// trains on from the mesh's model plus its unsent progress, and that progress still
    /// reaches the mesh in later deltas. The mesh's model (hashes, checkpoints, state sync,
    /// the final agreement) is the same as without it; only what each node trains and
    /// evaluates differs, by its residual. All-to-all only.
    pub keep_residual: bool,
    /// Error feedback with decay: each round, before the new delta is added, the residual is
    /// multiplied by this (1: plain error feedback, 0: none). Ignored under `keep_residual`.
    pub ef_decay: f32,
    /// Error feedback that does not count a round's progress twice: before the new delta joins
    /// the residual, the part of the residual the delta learnt again is taken out of it
    /// (`ErrorFeedback::discount_relearned`). Ignored under `keep_residual`.
    pub ef_relearn: bool,
    /// Error feedback with a bounded residual: before the new delta joins it, each tensor's
    /// residual is scaled down to at most this many times the norm of the tensor's new delta
    /// (`ErrorFeedback::bound_by`; `None`: unbounded). Ignored under `keep_residual`.
    pub ef_bound: Option<f32>,
    /// Train the next round's local phase while this one is exchanged, and rebase it onto the
    /// aggregate (see `averaging::overlap`); topology "all", without `keep_residual`.
    pub overlap: bool,
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

/// A `--byzantine` value that does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MisbehaviourError {
    #[error("`{0}` is not a finite scale factor")]
    Factor(String),
    #[error("unknown misbehaviour `{0}`: use scale:FACTOR, nan or mixed:FACTOR")]
    Unknown(String),
}

impl std::str::FromStr for Misbehaviour {
    type Err = MisbehaviourError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let factor = |v: &str| {
            v.parse::<f32>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| MisbehaviourError::Factor(v.to_owned()))
        };
        match text.split_once(':') {
            None if text == "nan" => Ok(Misbehaviour::Nan),
            Some(("scale", v)) => Ok(Misbehaviour::Scale(factor(v)?)),
            Some(("mixed", v)) => Ok(Misbehaviour::Mixed(factor(v)?)),
            _ => Err(MisbehaviourError::Unknown(text.to_owned())),
        }
    }
}

impl Misbehaviour {
    /// What to send in `round`: `Some(factor)` to scale, `None` for NaN.
    pub(crate) fn in_round(self, round: u64) -> Option<f32> {
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
            keep_residual: false,
            ef_decay: 1.0,
            ef_relearn: false,
            ef_bound: None,
            overlap: false,
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

/// Everything a round loop starts with.
pub struct Start {
    pub config: CoordinatorConfig,
    pub me: PeerId,
    pub trainer: TrainerHandle,
    pub client: Client,
    pub store: Arc<Mutex<BlobStore>>,
    pub metrics: NodeMetrics,
}
