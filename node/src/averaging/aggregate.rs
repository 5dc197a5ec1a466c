//! Aggregation of one round's deltas and the outer step that applies the result.
//!
//! Owns: the arithmetic on host tensors (sample-weighted mean, coordinate-wise median,
//! trimmed mean, the norm screen, plain averaging and Nesterov outer momentum). Must not
//! touch: I/O, decoding, or which deltas take part (the round state machine decides that).
//!
//! Every function is deterministic in its inputs' order, and callers pass deltas sorted by
//! sender, so that nodes that aggregate the same deltas compute bit-identical models.

use std::fmt;
use std::str::FromStr;

use meshtune_protocol::{Tensor, TensorSet};

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

impl FromStr for Aggregation {
    type Err = String;
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
                    .ok_or_else(|| {
                        format!(
                            "unknown aggregation `{other}`: use mean, median, trimmed-mean or \
                             trimmed-mean:F with 0 <= F < 0.5"
                        )
                    })?;
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

/// How the aggregated delta moves the shared model (DiLoCo's outer optimizer).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum OuterOptimizer {
    /// `model += aggregate` (FedAvg / plain gossip averaging).
    #[default]
    Average,
    /// Nesterov momentum on the outer gradient `g = -aggregate`:
    /// `m = momentum * m + g; model -= lr * (g + momentum * m)`.
    Nesterov { lr: f64, momentum: f64 },
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

/// The outer optimizer's memory between rounds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OuterState {
    pub momentum: Option<TensorSet>,
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
    match optimizer {
        OuterOptimizer::Average => {
            for ((_, values), a) in model.values_mut().zip(aggregate.tensors()) {
                for (v, d) in values.iter_mut().zip(&a.values) {
                    *v += d;
                }
            }
        }
        OuterOptimizer::Nesterov { lr, momentum } => {
            let buffer = state.momentum.get_or_insert_with(|| {
                rebuild(
                    aggregate
                        .tensors()
                        .iter()
                        .map(|t| Tensor {
                            name: t.name.clone(),
                            shape: t.shape.clone(),
                            values: vec![0.0; t.values.len()],
                        })
                        .collect(),
                )
            });
            let (lr, mu) = (lr as f32, momentum as f32);
            for (((_, values), (_, m)), a) in model
                .values_mut()
                .zip(buffer.values_mut())
                .zip(aggregate.tensors())
            {
                for ((v, m), d) in values.iter_mut().zip(m.iter_mut()).zip(&a.values) {
                    let g = -d;
                    *m = mu * *m + g;
                    *v -= lr * (g + mu * *m);
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
