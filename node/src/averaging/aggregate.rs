//! Aggregation of one round's deltas and the outer step that applies the result.
//!
//! Owns: the arithmetic on host tensors (sample-weighted mean, coordinate-wise median,
//! trimmed mean, the norm screen, and the outer step: plain averaging, momentum, Nesterov,
//! Adam and AdamW on the pseudo-gradient). Must not
//! touch: I/O, decoding, or which deltas take part (the round state machine decides that).
//!
//! Every function is deterministic in its inputs' order, and callers pass deltas sorted by
//! sender, so that nodes that aggregate the same deltas compute bit-identical models.

use std::fmt;
use std::str::FromStr;

use meshtune_protocol::{ModelLayout, Tensor, TensorSet, TensorSpec};

/// How the deltas of a round are combined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Aggregation {
    /// Mean weighted by each sender's sample count (FedAvg).
    Mean,
    /// Coordinate-wise median (unweighted); robust to < 50% arbitrary deltas.
    Median,
    /// Per coordinate, drop the `trim` fraction of largest and of smallest values, average the
    /// rest (unweighted).
    TrimmedMean { trim: f64 },
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Aggregation::Mean => f.write_str("mean"),
            Aggregation::Median => f.write_str("median"),
            Aggregation::TrimmedMean { trim } => write!(f, "trimmed-mean:{trim}"),
        }
    }
}

/// A `--aggregation` or `--outer` setting that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SettingError {
    #[error(
        "unknown aggregation `{0}`: use mean, median, trimmed-mean or trimmed-mean:F with \
         0 <= F < 0.5"
    )]
    UnknownAggregation(String),
    #[error(
        "unknown --outer `{0}`: use average, momentum:LR:M, nesterov:LR:M, \
         adam:LR[:BETA1:BETA2:EPS] or adamw:LR[:BETA1:BETA2:EPS:WD]"
    )]
    UnknownOuter(String),
    #[error("invalid --outer `{text}`: `{part}` is not a number")]
    NotANumber { text: String, part: String },
    #[error("outer {name} must be finite and > 0, not {value}")]
    NotPositive { name: &'static str, value: f64 },
    #[error("outer {name} must be in [0, 1), not {value}")]
    NotBelowOne { name: &'static str, value: f64 },
    #[error("outer weight_decay must be finite and >= 0, not {0}")]
    WeightDecay(f64),
    #[error("invalid --outer `{text}`: {reason}")]
    InvalidOuter {
        text: String,
        reason: Box<SettingError>,
    },
}

impl FromStr for Aggregation {
    type Err = SettingError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "mean" => Ok(Aggregation::Mean),
            "median" => Ok(Aggregation::Median),
            "trimmed-mean" => Ok(Aggregation::TrimmedMean { trim: 0.2 }),
            other => {
                let trim = other
                    .strip_prefix("trimmed-mean:")
                    .and_then(|t| t.parse::<f64>().ok())
                    .filter(|t| (0.0..0.5).contains(t))
                    .ok_or_else(|| SettingError::UnknownAggregation(other.to_owned()))?;
                Ok(Aggregation::TrimmedMean { trim })
            }
        }
    }
}

impl serde::Serialize for Aggregation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Aggregation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How the aggregated delta moves the shared model: the outer ("server") optimizer of
/// DiLoCo and of Reddi et al., *Adaptive Federated Optimization* (2021), applied by every node
/// to the pseudo-gradient `g = -aggregate`. Every node of a mesh must use the same one (a late
/// joiner receives its state in the `StateManifest`).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum OuterOptimizer {
    /// `model += aggregate` (FedAvg / plain gossip averaging).
    #[default]
    Average,
    /// Heavy-ball momentum (FedAvgM): `m = momentum * m + g; model -= lr * m`.
    Momentum { lr: f64, momentum: f64 },
    /// Nesterov momentum (DiLoCo), as torch's `SGD(nesterov=True)`:
    /// `m = momentum * m + g; model -= lr * (g + momentum * m)`.
    Nesterov { lr: f64, momentum: f64 },
    /// FedAdam: `torch.optim.Adam` on `g` (bias-corrected moments; `eps` is the paper's tau,
    /// the adaptivity floor).
    Adam {
        lr: f64,
        #[serde(default = "default_beta1")]
        beta1: f64,
        #[serde(default = "default_beta2")]
        beta2: f64,
        #[serde(default = "default_eps")]
        eps: f64,
    },
    /// FedAdamW: `torch.optim.AdamW` on `g` (decoupled weight decay `model *= 1 - lr * wd`
    /// before the Adam step).
    AdamW {
        lr: f64,
        #[serde(default = "default_beta1")]
        beta1: f64,
        #[serde(default = "default_beta2")]
        beta2: f64,
        #[serde(default = "default_eps")]
        eps: f64,
        #[serde(default = "default_weight_decay")]
        weight_decay: f64,
    },
}

fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.99
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    0.01
}

impl OuterOptimizer {
    /// Which state buffers the optimizer keeps per parameter: first moment (momentum) and
    /// second moment.
    fn buffers(self) -> (bool, bool) {
        match self {
            OuterOptimizer::Average => (false, false),
            OuterOptimizer::Momentum { .. } | OuterOptimizer::Nesterov { .. } => (true, false),
            OuterOptimizer::Adam { .. } | OuterOptimizer::AdamW { .. } => (true, true),
        }
    }

    /// Whether the optimizer keeps state between rounds.
    pub fn is_stateful(self) -> bool {
        self != OuterOptimizer::Average
    }

    /// Refuses settings that would diverge or are meaningless.
    pub fn validate(self) -> Result<(), SettingError> {
        let positive = |name: &'static str, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(SettingError::NotPositive { name, value })
            }
        };
        let unit = |name: &'static str, value: f64| {
            if (0.0..1.0).contains(&value) {
                Ok(())
            } else {
                Err(SettingError::NotBelowOne { name, value })
            }
        };
        match self {
            OuterOptimizer::Average => Ok(()),
            OuterOptimizer::Momentum { lr, momentum }
            | OuterOptimizer::Nesterov { lr, momentum } => {
                positive("lr", lr)?;
                unit("momentum", momentum)
            }
            OuterOptimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                positive("lr", lr)?;
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                positive("eps", eps)
            }
            OuterOptimizer::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                positive("lr", lr)?;
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                positive("eps", eps)?;
                if weight_decay.is_finite() && weight_decay >= 0.0 {
                    Ok(())
                } else {
                    Err(SettingError::WeightDecay(weight_decay))
                }
            }
        }
    }
}

/// `average`, `momentum:LR:M`, `nesterov:LR:M`, `adam:LR[:BETA1:BETA2:EPS]`,
/// `adamw:LR[:BETA1:BETA2:EPS:WD]` (the `--outer` flag of `meshtune node` and the testnet).
impl FromStr for OuterOptimizer {
    type Err = SettingError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = text.split(':').collect();
        let numbers = parts[1..]
            .iter()
            .map(|p| {
                p.parse::<f64>().map_err(|_| SettingError::NotANumber {
                    text: text.to_owned(),
                    part: (*p).to_owned(),
                })
            })
            .collect::<Result<Vec<f64>, SettingError>>()?;
        let optimizer = match (parts[0], numbers.as_slice()) {
            ("average", []) => OuterOptimizer::Average,
            ("momentum", [lr, momentum]) => OuterOptimizer::Momentum {
                lr: *lr,
                momentum: *momentum,
            },
            ("nesterov", [lr, momentum]) => OuterOptimizer::Nesterov {
                lr: *lr,
                momentum: *momentum,
            },
            ("adam", [lr]) => OuterOptimizer::Adam {
                lr: *lr,
                beta1: default_beta1(),
                beta2: default_beta2(),
                eps: default_eps(),
            },
            ("adam", [lr, beta1, beta2, eps]) => OuterOptimizer::Adam {
                lr: *lr,
                beta1: *beta1,
                beta2: *beta2,
                eps: *eps,
            },
            ("adamw", [lr]) => OuterOptimizer::AdamW {
                lr: *lr,
                beta1: default_beta1(),
                beta2: default_beta2(),
                eps: default_eps(),
                weight_decay: default_weight_decay(),
            },
            ("adamw", [lr, beta1, beta2, eps, weight_decay]) => OuterOptimizer::AdamW {
                lr: *lr,
                beta1: *beta1,
                beta2: *beta2,
                eps: *eps,
                weight_decay: *weight_decay,
            },
            _ => return Err(SettingError::UnknownOuter(text.to_owned())),
        };
        optimizer
            .validate()
            .map_err(|reason| SettingError::InvalidOuter {
                text: text.to_owned(),
                reason: Box::new(reason),
            })?;
        Ok(optimizer)
    }
}

impl fmt::Display for OuterOptimizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OuterOptimizer::Average => f.write_str("average"),
            OuterOptimizer::Momentum { lr, momentum } => write!(f, "momentum:{lr}:{momentum}"),
            OuterOptimizer::Nesterov { lr, momentum } => write!(f, "nesterov:{lr}:{momentum}"),
            OuterOptimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                write!(f, "adam:{lr}:{beta1}:{beta2}:{eps}")
            }
            OuterOptimizer::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                write!(f, "adamw:{lr}:{beta1}:{beta2}:{eps}:{weight_decay}")
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AggregateError {
    #[error("no deltas to aggregate")]
    Empty,
    #[error("delta {index} does not have the layout of the first one (tensor `{tensor}`)")]
    LayoutMismatch { index: usize, tensor: String },
    #[error("delta {index} has weight {weight}: weights must be finite and positive")]
    BadWeight { index: usize, weight: f64 },
}

/// One delta with its weight (sample count).
#[derive(Debug, Clone, Copy)]
pub struct WeightedDelta<'a> {
    pub weight: f64,
    pub delta: &'a TensorSet,
}

/// L2 norm of every value of `set`.
pub fn l2_norm(set: &TensorSet) -> f64 {
    set.tensors()
        .iter()
        .flat_map(|t| t.values.iter())
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// Indices of deltas whose norm exceeds `factor` times the median norm (needs at least three
/// deltas to have a meaningful median). A scaled-up byzantine delta fails this screen before
/// it reaches a mean.
pub fn norm_outliers(norms: &[f64], factor: f64) -> Vec<usize> {
    if norms.len() < 3 {
        return Vec::new();
    }
    let mut sorted = norms.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    norms
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > factor * median.max(f64::MIN_POSITIVE))
        .map(|(i, _)| i)
        .collect()
}

/// One sender's delta offered to a round's aggregate, with the sample count it reported.
#[derive(Debug, Clone, Copy)]
pub struct Contribution<'a, S> {
    pub sender: S,
    pub samples: u64,
    pub delta: &'a TensorSet,
}

/// What [`screen`] keeps of a round's contributions.
#[derive(Debug)]
pub struct Screened<'a, S> {
    /// The kept deltas with their weights, in the order they were offered.
    pub used: Vec<WeightedDelta<'a>>,
    /// Who the kept deltas came from, in the order they were offered.
    pub contributors: Vec<S>,
    /// Who was left out as a norm outlier, with the delta's norm.
    pub outliers: Vec<(S, f64)>,
}

/// The weighting and screening policy of a round, before [`aggregate`]:
/// - a delta weighs its reported sample count (at least 1), capped at twice the median of the
///   round's counts, so one peer cannot claim the whole average by reporting a huge count;
/// - a delta whose L2 norm is above `outlier_factor` times the round's median norm is left out
///   ([`norm_outliers`]: needs at least three deltas), so a scaled-up byzantine delta never
///   reaches a mean.
///
/// The order of `contributions` is kept: every node must combine the same deltas in the same
/// order to end on the same bits.
pub fn screen<'a, S: Clone>(
    contributions: &[Contribution<'a, S>],
    outlier_factor: f64,
) -> Screened<'a, S> {
    let mut weights: Vec<f64> = contributions
        .iter()
        .map(|c| (c.samples as f64).max(1.0))
        .collect();
    let mut sorted = weights.clone();
    sorted.sort_by(f64::total_cmp);
    if let Some(median) = sorted.get(sorted.len() / 2).copied() {
        for w in &mut weights {
            *w = w.min(2.0 * median);
        }
    }
    let norms: Vec<f64> = contributions.iter().map(|c| l2_norm(c.delta)).collect();
    let outliers = norm_outliers(&norms, outlier_factor);
    let mut screened = Screened {
        used: Vec::with_capacity(contributions.len()),
        contributors: Vec::with_capacity(contributions.len()),
        outliers: Vec::with_capacity(outliers.len()),
    };
    for (i, (c, weight)) in contributions.iter().zip(weights).enumerate() {
        if outliers.contains(&i) {
            screened.outliers.push((c.sender.clone(), norms[i]));
        } else {
            screened.used.push(WeightedDelta {
                weight,
                delta: c.delta,
            });
            screened.contributors.push(c.sender.clone());
        }
    }
    screened
}

/// Combines `deltas` (same layout) with `method`.
pub fn aggregate(
    deltas: &[WeightedDelta<'_>],
    method: Aggregation,
) -> Result<TensorSet, AggregateError> {
    let first = deltas.first().ok_or(AggregateError::Empty)?.delta;
    for (index, d) in deltas.iter().enumerate() {
        if !(d.weight.is_finite() && d.weight > 0.0) {
            return Err(AggregateError::BadWeight {
                index,
                weight: d.weight,
            });
        }
        if d.delta.len() != first.len() {
            return Err(AggregateError::LayoutMismatch {
                index,
                tensor: format!("{} tensors vs {}", d.delta.len(), first.len()),
            });
        }
        for (a, b) in d.delta.tensors().iter().zip(first.tensors()) {
            if a.name != b.name || a.shape != b.shape {
                return Err(AggregateError::LayoutMismatch {
                    index,
                    tensor: a.name.clone(),
                });
            }
        }
    }
    let total_weight: f64 = deltas.iter().map(|d| d.weight).sum();
    let mut column = vec![0f32; deltas.len()];
    let tensors = first
        .tensors()
        .iter()
        .enumerate()
        .map(|(t, template)| {
            let mut out = vec![0f32; template.values.len()];
            match method {
                Aggregation::Mean => {
                    // f64 accumulation in a fixed order: identical on every node.
                    for (i, value) in out.iter_mut().enumerate() {
                        let sum: f64 = deltas
                            .iter()
                            .map(|d| d.weight * f64::from(d.delta.tensors()[t].values[i]))
                            .sum();
                        *value = (sum / total_weight) as f32;
                    }
                }
                Aggregation::Median | Aggregation::TrimmedMean { .. } => {
                    let trim = match method {
                        Aggregation::TrimmedMean { trim } => {
                            ((deltas.len() as f64) * trim).floor() as usize
                        }
                        _ => 0,
                    };
                    for (i, value) in out.iter_mut().enumerate() {
                        for (slot, d) in column.iter_mut().zip(deltas) {
                            *slot = d.delta.tensors()[t].values[i];
                        }
                        column.sort_unstable_by(f32::total_cmp);
                        *value = match method {
                            Aggregation::Median => {
                                let n = column.len();
                                if n % 2 == 1 {
                                    column[n / 2]
                                } else {
                                    ((f64::from(column[n / 2 - 1]) + f64::from(column[n / 2]))
                                        / 2.0) as f32
                                }
                            }
                            _ => {
                                let kept = &column[trim..column.len() - trim];
                                (kept.iter().map(|&v| f64::from(v)).sum::<f64>()
                                    / kept.len() as f64) as f32
                            }
                        };
                    }
                }
            }
            Tensor {
                name: template.name.clone(),
                shape: template.shape.clone(),
                values: out,
            }
        })
        .collect();
    Ok(rebuild(tensors))
}

fn rebuild(tensors: Vec<Tensor>) -> TensorSet {
    TensorSet::new(tensors).expect("names and shapes come from a valid tensor set")
}

/// The outer optimizer's memory between rounds: the number of outer steps taken and, as the
/// optimizer needs them, the first and second moments (same layout as the model).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OuterState {
    pub step: u64,
    pub first: Option<TensorSet>,
    pub second: Option<TensorSet>,
}

/// Names of the outer state in a checkpoint and in a `StateManifest`'s optimizer section.
const STEP_TENSOR: &str = "outer.step";
const FIRST_PREFIX: &str = "outer.m.";
const SECOND_PREFIX: &str = "outer.v.";

fn zeros_like(model: &TensorSet) -> TensorSet {
    rebuild(
        model
            .tensors()
            .iter()
            .map(|t| Tensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                values: vec![0.0; t.values.len()],
            })
            .collect(),
    )
}

impl OuterState {
    /// The state as one tensor set (`outer.step` and `outer.m.*` / `outer.v.*` per model
    /// tensor), zeros before the first step; empty for plain averaging. This is what a
    /// node serves to late joiners and keeps in its checkpoints.
    pub fn to_tensors(&self, optimizer: OuterOptimizer, model: &TensorSet) -> TensorSet {
        let (first, second) = optimizer.buffers();
        if !optimizer.is_stateful() {
            return rebuild(Vec::new());
        }
        // Exact in f32 up to 2^24 rounds.
        let mut tensors = vec![Tensor {
            name: STEP_TENSOR.into(),
            shape: vec![1],
            values: vec![self.step as f32],
        }];
        let mut add = |prefix: &str, buffer: &Option<TensorSet>| {
            let zeros;
            let set = match buffer {
                Some(set) => set,
                None => {
                    zeros = zeros_like(model);
                    &zeros
                }
            };
            tensors.extend(set.tensors().iter().map(|t| Tensor {
                name: format!("{prefix}{}", t.name),
                shape: t.shape.clone(),
                values: t.values.clone(),
            }));
        };
        if first {
            add(FIRST_PREFIX, &self.first);
        }
        if second {
            add(SECOND_PREFIX, &self.second);
        }
        rebuild(tensors)
    }

    /// The layout [`OuterState::to_tensors`] produces for `model`: what a node expects in a
    /// peer's state (a peer with another outer optimizer is refused by layout).
    pub fn layout(optimizer: OuterOptimizer, model: &ModelLayout) -> ModelLayout {
        let (first, second) = optimizer.buffers();
        let mut specs = Vec::new();
        if optimizer.is_stateful() {
            specs.push(TensorSpec::new(STEP_TENSOR, vec![1]));
        }
        for (on, prefix) in [(first, FIRST_PREFIX), (second, SECOND_PREFIX)] {
            if on {
                specs.extend(
                    model
                        .specs()
                        .iter()
                        .map(|s| TensorSpec::new(format!("{prefix}{}", s.name), s.shape.clone())),
                );
            }
        }
        ModelLayout::new(specs).expect("prefixed names of a valid layout are unique")
    }

    /// Reads back [`OuterState::to_tensors`]; `None` for an empty set (plain averaging, or a
    /// checkpoint from before the outer state was kept).
    pub fn from_tensors(set: &TensorSet) -> Result<Self, AggregateError> {
        if set.is_empty() {
            return Ok(Self::default());
        }
        let step = set
            .get(STEP_TENSOR)
            .and_then(|t| t.values.first())
            .filter(|v| v.is_finite() && **v >= 0.0)
            .ok_or_else(|| AggregateError::LayoutMismatch {
                index: 0,
                tensor: STEP_TENSOR.into(),
            })?;
        let pick = |prefix: &str| {
            let tensors: Vec<Tensor> = set
                .tensors()
                .iter()
                .filter_map(|t| {
                    t.name.strip_prefix(prefix).map(|name| Tensor {
                        name: name.to_owned(),
                        shape: t.shape.clone(),
                        values: t.values.clone(),
                    })
                })
                .collect();
            (!tensors.is_empty()).then(|| rebuild(tensors))
        };
        Ok(Self {
            step: *step as u64,
            first: pick(FIRST_PREFIX),
            second: pick(SECOND_PREFIX),
        })
    }
}

/// Applies the aggregated delta to `model` with `optimizer`, updating `state`.
pub fn apply_outer_step(
    model: &mut TensorSet,
    aggregate: &TensorSet,
    optimizer: OuterOptimizer,
    state: &mut OuterState,
) -> Result<(), AggregateError> {
    if aggregate.len() != model.len() {
        return Err(AggregateError::LayoutMismatch {
            index: 0,
            tensor: format!("{} tensors vs {}", aggregate.len(), model.len()),
        });
    }
    for (m, a) in model.tensors().iter().zip(aggregate.tensors()) {
        if m.name != a.name || m.shape != a.shape {
            return Err(AggregateError::LayoutMismatch {
                index: 0,
                tensor: a.name.clone(),
            });
        }
    }
    for buffer in [&state.first, &state.second].into_iter().flatten() {
        if buffer.layout() != model.layout() {
            return Err(AggregateError::LayoutMismatch {
                index: 0,
                tensor: "outer optimizer state".into(),
            });
        }
    }
    let (wants_first, wants_second) = optimizer.buffers();
    if wants_first && state.first.is_none() {
        state.first = Some(zeros_like(aggregate));
    }
    if wants_second && state.second.is_none() {
        state.second = Some(zeros_like(aggregate));
    }
    state.step += 1;
    let t = state.step as i32;
    match optimizer {
        OuterOptimizer::Average => {
            for ((_, values), a) in model.values_mut().zip(aggregate.tensors()) {
                for (v, d) in values.iter_mut().zip(&a.values) {
                    *v += d;
                }
            }
        }
        OuterOptimizer::Momentum { lr, momentum } | OuterOptimizer::Nesterov { lr, momentum } => {
            let nesterov = matches!(optimizer, OuterOptimizer::Nesterov { .. });
            let buffer = state.first.as_mut().expect("created above");
            let (lr, mu) = (lr as f32, momentum as f32);
            for (((_, values), (_, m)), a) in model
                .values_mut()
                .zip(buffer.values_mut())
                .zip(aggregate.tensors())
            {
                for ((v, m), d) in values.iter_mut().zip(m.iter_mut()).zip(&a.values) {
                    let g = -d;
                    *m = mu * *m + g;
                    *v -= if nesterov {
                        lr * (g + mu * *m)
                    } else {
                        lr * *m
                    };
                }
            }
        }
        OuterOptimizer::Adam {
            lr,
            beta1,
            beta2,
            eps,
        }
        | OuterOptimizer::AdamW {
            lr,
            beta1,
            beta2,
            eps,
            ..
        } => {
            let decay = match optimizer {
                OuterOptimizer::AdamW { weight_decay, .. } => (1.0 - lr * weight_decay) as f32,
                _ => 1.0,
            };
            // torch.optim.Adam(W): step = lr / (1 - b1^t); denom = sqrt(v) / sqrt(1 - b2^t) + eps.
            let step_size = (lr / (1.0 - beta1.powi(t))) as f32;
            let correction2 = (1.0 - beta2.powi(t)).sqrt() as f32;
            let (b1, b2, eps) = (beta1 as f32, beta2 as f32, eps as f32);
            let first = state.first.as_mut().expect("created above");
            let second = state.second.as_mut().expect("created above");
            for ((((_, values), (_, m)), (_, s)), a) in model
                .values_mut()
                .zip(first.values_mut())
                .zip(second.values_mut())
                .zip(aggregate.tensors())
            {
                for (((v, m), s), d) in values
                    .iter_mut()
                    .zip(m.iter_mut())
                    .zip(s.iter_mut())
                    .zip(&a.values)
                {
                    let g = -d;
                    *v *= decay;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *s = b2 * *s + (1.0 - b2) * g * g;
                    *v -= step_size * *m / (s.sqrt() / correction2 + eps);
                }
            }
        }
    }
    Ok(())
}

/// `after - before`, tensor by tensor (same layout).
pub fn difference(after: &TensorSet, before: &TensorSet) -> Result<TensorSet, AggregateError> {
    if after.len() != before.len() {
        return Err(AggregateError::LayoutMismatch {
            index: 0,
            tensor: format!("{} tensors vs {}", after.len(), before.len()),
        });
    }
    let tensors = after
        .tensors()
        .iter()
        .zip(before.tensors())
        .map(|(a, b)| {
            if a.name != b.name || a.shape != b.shape {
                return Err(AggregateError::LayoutMismatch {
                    index: 0,
                    tensor: a.name.clone(),
                });
            }
            Ok(Tensor {
                name: a.name.clone(),
                shape: a.shape.clone(),
                values: a.values.iter().zip(&b.values).map(|(x, y)| x - y).collect(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rebuild(tensors))
}

/// Relative disagreement of models: max over nodes of `||w_i - mean|| / ||mean||`.
pub fn relative_disagreement(models: &[TensorSet]) -> f64 {
    let Some(first) = models.first() else {
        return 0.0;
    };
    let n = models.len() as f64;
    let mut mean_sq = 0.0;
    let mut diff_sq = vec![0.0; models.len()];
    for t in 0..first.len() {
        for i in 0..first.tensors()[t].values.len() {
            let mean: f64 = models
                .iter()
                .map(|m| f64::from(m.tensors()[t].values[i]))
                .sum::<f64>()
                / n;
            mean_sq += mean * mean;
            for (k, m) in models.iter().enumerate() {
                let d = f64::from(m.tensors()[t].values[i]) - mean;
                diff_sq[k] += d * d;
            }
        }
    }
    let mean_norm = mean_sq.sqrt().max(f64::MIN_POSITIVE);
    diff_sq
        .into_iter()
        .map(|d| d.sqrt() / mean_norm)
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {

    fn constant(value: f32) -> TensorSet {
        TensorSet::new(vec![
            meshtune_protocol::Tensor::new("w", vec![4], vec![value; 4]).expect("tensor"),
        ])
        .expect("set")
    }

    #[test]
    fn screening_caps_claimed_samples_at_twice_the_median() {
        let (a, b, c) = (constant(1.0), constant(1.0), constant(1.0));
        let offered = [
            Contribution {
                sender: "a",
                samples: 100,
                delta: &a,
            },
            Contribution {
                sender: "b",
                samples: 120,
                delta: &b,
            },
            Contribution {
                sender: "c",
                samples: 1_000_000,
                delta: &c,
            },
        ];
        let screened = screen(&offered, 10.0);
        let weights: Vec<f64> = screened.used.iter().map(|u| u.weight).collect();
        assert_eq!(weights, [100.0, 120.0, 240.0]);
        assert_eq!(screened.contributors, ["a", "b", "c"]);
        assert!(screened.outliers.is_empty());
        // A zero count still weighs one sample.
        let zero = [Contribution {
            sender: "z",
            samples: 0,
            delta: &a,
        }];
        assert_eq!(screen(&zero, 10.0).used[0].weight, 1.0);
    }

    #[test]
    fn screening_leaves_out_norm_outliers_and_keeps_the_order() {
        let (small, other, huge, last) =
            (constant(1.0), constant(1.5), constant(100.0), constant(0.5));
        let offered = [
            Contribution {
                sender: "small",
                samples: 10,
                delta: &small,
            },
            Contribution {
                sender: "huge",
                samples: 10,
                delta: &huge,
            },
            Contribution {
                sender: "other",
                samples: 10,
                delta: &other,
            },
            Contribution {
                sender: "last",
                samples: 10,
                delta: &last,
            },
        ];
        let screened = screen(&offered, 10.0);
        assert_eq!(screened.contributors, ["small", "other", "last"]);
        assert_eq!(screened.outliers.len(), 1);
        assert_eq!(screened.outliers[0].0, "huge");
        assert!(
            (screened.outliers[0].1 - 200.0).abs() < 1e-9,
            "{}",
            screened.outliers[0].1
        );
        // Two deltas have no meaningful median: neither is screened.
        let two = [offered[0], offered[1]];
        assert_eq!(screen(&two, 10.0).contributors, ["small", "huge"]);
    }

    use super::*;

    fn set(values: &[f32]) -> TensorSet {
        TensorSet::new(vec![
            Tensor::new("a", vec![values.len()], values.to_vec()).expect("tensor"),
        ])
        .expect("set")
    }

    fn values(set: &TensorSet) -> Vec<f32> {
        set.tensors()[0].values.clone()
    }

    #[test]
    fn weighted_mean_weights_by_samples() {
        let a = set(&[1.0, 0.0]);
        let b = set(&[4.0, 3.0]);
        let out = aggregate(
            &[
                WeightedDelta {
                    weight: 2.0,
                    delta: &a,
                },
                WeightedDelta {
                    weight: 1.0,
                    delta: &b,
                },
            ],
            Aggregation::Mean,
        )
        .expect("mean");
        assert_eq!(values(&out), vec![2.0, 1.0]);
    }

    #[test]
    fn median_and_trimmed_mean_ignore_one_outlier() {
        let sets: Vec<TensorSet> = [1.0, 2.0, 3.0, 4.0, 1000.0]
            .iter()
            .map(|&v| set(&[v]))
            .collect();
        let deltas: Vec<WeightedDelta<'_>> = sets
            .iter()
            .map(|delta| WeightedDelta { weight: 1.0, delta })
            .collect();
        assert_eq!(
            values(&aggregate(&deltas, Aggregation::Median).expect("median")),
            vec![3.0]
        );
        assert_eq!(
            values(&aggregate(&deltas, Aggregation::TrimmedMean { trim: 0.2 }).expect("trim")),
            vec![3.0]
        );
        assert_eq!(
            values(&aggregate(&deltas[..4], Aggregation::Median).expect("even")),
            vec![2.5]
        );
        assert!(values(&aggregate(&deltas, Aggregation::Mean).expect("mean"))[0] > 200.0);
    }

    #[test]
    fn bad_inputs_are_named() {
        assert_eq!(
            aggregate(&[], Aggregation::Mean).expect_err("empty"),
            AggregateError::Empty
        );
        let a = set(&[1.0]);
        let b = set(&[1.0, 2.0]);
        let err = aggregate(
            &[
                WeightedDelta {
                    weight: 1.0,
                    delta: &a,
                },
                WeightedDelta {
                    weight: 1.0,
                    delta: &b,
                },
            ],
            Aggregation::Mean,
        )
        .expect_err("layout");
        assert!(matches!(
            err,
            AggregateError::LayoutMismatch { index: 1, .. }
        ));
        let err = aggregate(
            &[WeightedDelta {
                weight: f64::NAN,
                delta: &a,
            }],
            Aggregation::Mean,
        )
        .expect_err("weight");
        assert!(matches!(err, AggregateError::BadWeight { .. }));
    }

    #[test]
    fn parse_aggregation() {
        assert_eq!("mean".parse::<Aggregation>(), Ok(Aggregation::Mean));
        assert_eq!(
            "trimmed-mean:0.1".parse::<Aggregation>(),
            Ok(Aggregation::TrimmedMean { trim: 0.1 })
        );
        assert!("trimmed-mean:0.7".parse::<Aggregation>().is_err());
        assert!("avg".parse::<Aggregation>().is_err());
    }

    #[test]
    fn nesterov_with_zero_momentum_and_unit_lr_is_averaging() {
        let delta = set(&[0.5, -1.0]);
        let mut plain = set(&[1.0, 1.0]);
        let mut outer = plain.clone();
        apply_outer_step(
            &mut plain,
            &delta,
            OuterOptimizer::Average,
            &mut OuterState::default(),
        )
        .expect("avg");
        apply_outer_step(
            &mut outer,
            &delta,
            OuterOptimizer::Nesterov {
                lr: 1.0,
                momentum: 0.0,
            },
            &mut OuterState::default(),
        )
        .expect("nesterov");
        assert_eq!(plain, outer);
        assert_eq!(values(&plain), vec![1.5, 0.0]);
    }

    #[test]
    fn nesterov_matches_torch_sgd_nesterov() {
        // torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True) with grad g = -delta:
        // step 1: buf = g; p -= lr * (g + 0.9 * buf)
        // step 2: buf = 0.9 * buf + g; p -= lr * (g + 0.9 * buf)
        let mut model = set(&[0.0]);
        let mut state = OuterState::default();
        let opt = OuterOptimizer::Nesterov {
            lr: 0.7,
            momentum: 0.9,
        };
        apply_outer_step(&mut model, &set(&[1.0]), opt, &mut state).expect("1");
        let after_one = 0.7 * (1.0 + 0.9 * 1.0);
        assert!((f64::from(values(&model)[0]) - after_one).abs() < 1e-6);
        apply_outer_step(&mut model, &set(&[1.0]), opt, &mut state).expect("2");
        let buf = 0.9 * 1.0 + 1.0;
        let after_two = after_one + 0.7 * (1.0 + 0.9 * buf);
        assert!((f64::from(values(&model)[0]) - after_two).abs() < 1e-5);
    }

    #[test]
    fn momentum_is_heavy_ball() {
        // m1 = g = -1; p = 0 - 0.5 * -1 = 0.5. m2 = 0.9 * -1 + -1 = -1.9; p = 0.5 + 0.95.
        let mut model = set(&[0.0]);
        let mut state = OuterState::default();
        let opt = OuterOptimizer::Momentum {
            lr: 0.5,
            momentum: 0.9,
        };
        apply_outer_step(&mut model, &set(&[1.0]), opt, &mut state).expect("1");
        assert!((values(&model)[0] - 0.5).abs() < 1e-6);
        apply_outer_step(&mut model, &set(&[1.0]), opt, &mut state).expect("2");
        assert!((values(&model)[0] - 1.45).abs() < 1e-6);
        assert_eq!(state.step, 2);
    }

    // scripts/outer_optimizer_reference.py, torch 2.15.0.
    const ADAM_REFERENCE: [[f64; 3]; 3] = [
        [0.600000024, -2.0999999, 0.0],
        [0.693344831, -2.14704084, 0.0],
        [0.70442307, -2.11497021, 0.0],
    ];
    const ADAMW_REFERENCE: [[f64; 3]; 3] = [
        [0.574999988, -2.0, 0.0],
        [0.639594793, -1.9470408, 0.0],
        [0.618693292, -1.81761801, 0.0],
    ];

    #[test]
    fn adam_and_adamw_match_torch() {
        // Reference: torch 2.15 Adam/AdamW(lr=0.1, betas=(0.9, 0.99), eps=1e-8[, weight_decay=0.5])
        // on p = [0.5, -2.0, 0.0] with grads -delta for deltas [1, -2, 0], [0.5, 0.5, 0], [-1, 3, 0]
        // (scripts/outer_optimizer_reference.py).
        let deltas = [[1.0, -2.0, 0.0], [0.5, 0.5, 0.0], [-1.0, 3.0, 0.0]];
        let check = |opt: OuterOptimizer, expected: [[f64; 3]; 3]| {
            let mut model = set(&[0.5, -2.0, 0.0]);
            let mut state = OuterState::default();
            for (delta, want) in deltas.iter().zip(expected) {
                apply_outer_step(&mut model, &set(delta), opt, &mut state).expect("step");
                for (got, want) in values(&model).iter().zip(want) {
                    assert!(
                        (f64::from(*got) - want).abs() < 1e-5,
                        "{opt}: {:?} vs {want:?}",
                        values(&model)
                    );
                }
            }
        };
        check(
            OuterOptimizer::Adam {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
            },
            ADAM_REFERENCE,
        );
        check(
            OuterOptimizer::AdamW {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
                weight_decay: 0.5,
            },
            ADAMW_REFERENCE,
        );
    }

    #[test]
    fn outer_state_round_trips_through_tensors_and_layout() {
        let model = set(&[1.0, 2.0, 3.0]);
        let opt: OuterOptimizer = "adam:0.01".parse().expect("valid");
        let mut state = OuterState::default();
        // Before the first step: zeros of the right layout, step 0.
        let zeros = state.to_tensors(opt, &model);
        assert_eq!(zeros.layout(), OuterState::layout(opt, &model.layout()));
        let mut next = model.clone();
        apply_outer_step(&mut next, &set(&[0.1, -0.2, 0.3]), opt, &mut state).expect("step");
        let shipped = state.to_tensors(opt, &model);
        assert_eq!(shipped.layout(), OuterState::layout(opt, &model.layout()));
        assert_eq!(
            OuterState::from_tensors(&shipped).expect("reads back"),
            state
        );
        // Another optimizer expects another layout, so a mismatched peer state is refused.
        let nesterov: OuterOptimizer = "nesterov:0.7:0.9".parse().expect("valid");
        assert_ne!(
            OuterState::layout(nesterov, &model.layout()),
            OuterState::layout(opt, &model.layout())
        );
        assert!(OuterState::layout(OuterOptimizer::Average, &model.layout()).is_empty());
        assert_eq!(
            OuterState::from_tensors(&TensorSet::new(Vec::new()).expect("empty")).expect("empty"),
            OuterState::default()
        );
    }

    #[test]
    fn outer_optimizer_text_round_trips_and_bad_settings_are_named() {
        for text in [
            "average",
            "momentum:0.9:0.5",
            "nesterov:0.7:0.9",
            "adam:0.01:0.9:0.99:0.001",
            "adamw:0.01:0.9:0.95:0.000001:0.1",
        ] {
            let opt: OuterOptimizer = text.parse().expect(text);
            assert_eq!(
                opt.to_string()
                    .parse::<OuterOptimizer>()
                    .expect("own output"),
                opt
            );
        }
        let adam: OuterOptimizer = "adam:0.02".parse().expect("defaults");
        assert_eq!(
            adam,
            OuterOptimizer::Adam {
                lr: 0.02,
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8
            }
        );
        for (bad, needle) in [
            ("nesterov:0.7:1.5", "momentum"),
            ("adam:0", "lr"),
            ("adam:0.1:0.9:1:1e-8", "beta2"),
            ("adamw:0.1:0.9:0.99:1e-8:-1", "weight_decay"),
            ("adam:x", "not a number"),
            ("lamb:0.1", "unknown --outer"),
            ("nesterov:0.7", "unknown --outer"),
        ] {
            let err = bad.parse::<OuterOptimizer>().expect_err(bad).to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn norm_screen_finds_scaled_delta() {
        assert_eq!(norm_outliers(&[1.0, 1.2, 0.9, 50.0], 10.0), vec![3]);
        assert!(norm_outliers(&[1.0, 50.0], 10.0).is_empty());
    }

    #[test]
    fn disagreement_of_identical_models_is_zero() {
        let a = set(&[1.0, 2.0]);
        assert_eq!(relative_disagreement(&[a.clone(), a.clone()]), 0.0);
        let b = set(&[1.0, 2.2]);
        assert!(relative_disagreement(&[a, b]) > 0.01);
    }
}
