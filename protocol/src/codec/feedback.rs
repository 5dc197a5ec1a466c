//! Error feedback: what lossy encoding left out of a round, carried into the next one.
//!
//! Owns: [`ErrorFeedback`], one residual buffer per tensor. The encoder adds the residual
//! to the new delta, encodes the sum, and stores `sum - decoded` back, so over rounds
//! `sum of decoded deltas + residual == sum of true deltas` up to float rounding.
//! Must not touch: the network; the residual never leaves the node.

use std::collections::BTreeMap;

use crate::tensor::TensorSet;

/// Per-tensor residuals kept by a sender between rounds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ErrorFeedback {
    residuals: BTreeMap<String, Vec<f32>>,
}

impl ErrorFeedback {
    /// No residuals yet (the first round).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The residual of tensor `name`, if any was stored.
    #[must_use]
    pub fn residual(&self, name: &str) -> Option<&[f32]> {
        self.residuals.get(name).map(Vec::as_slice)
    }

    /// All residuals, by tensor name.
    pub fn residuals(&self) -> impl Iterator<Item = (&str, &[f32])> {
        self.residuals
            .iter()
            .map(|(name, residual)| (name.as_str(), residual.as_slice()))
    }

    /// Restores a residual saved from [`ErrorFeedback::residuals`] (a checkpoint), so a
    /// restarted sender loses nothing it had left out.
    pub fn restore_residual(&mut self, name: &str, values: Vec<f32>) {
        self.residuals.insert(name.to_owned(), values);
    }

    /// Drops every residual (e.g. after the model was replaced by a peer's state).
    pub fn clear(&mut self) {
        self.residuals.clear();
    }

    /// Multiplies every residual by `factor` (error feedback with decay, as SparseLoCo's
    /// `e <- beta * e + delta`: the sender forgets part of what it left out each round).
    pub fn scale(&mut self, factor: f32) {
        for residual in self.residuals.values_mut() {
            residual.iter_mut().for_each(|value| *value *= factor);
        }
    }

    /// Bounds each residual by the new delta it is about to join: a residual whose norm is
    /// more than `factor` times the norm of the same tensor's new delta is scaled down to
    /// that. Plain error feedback lets the residual of a coordinate grow for as many rounds as
    /// top-k passes it over; when local phases are long, each round re-learns part of what the
    /// residual holds and the sum grows past anything one round moves, so the coordinates
    /// top-k finally picks jump too far. The bound keeps what a residual can add to a round at
    /// `factor` rounds' worth of that round's own progress, and leaves it whole while it is
    /// smaller (short phases, where what was left out is progress still to send). A tensor
    /// whose new delta is zero keeps nothing. If any norm is not finite (a NaN delta, which the
    /// encoder refuses) nothing changes. Returns how many residuals were scaled down.
    pub fn bound_by(&mut self, delta: &TensorSet, factor: f32) -> usize {
        let mut scales = Vec::new();
        for tensor in delta.tensors() {
            let Some(residual) = self.residuals.get(&tensor.name) else {
                continue;
            };
            if residual.len() != tensor.values.len() {
                continue;
            }
            let norm = |values: &[f32]| {
                values
                    .iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>()
                    .sqrt()
            };
            let (carried, fresh) = (norm(residual), norm(&tensor.values));
            if !carried.is_finite() || !fresh.is_finite() {
                return 0;
            }
            let limit = f64::from(factor) * fresh;
            if carried > limit {
                scales.push((tensor.name.as_str(), limit / carried));
            }
        }
        for &(name, scale) in &scales {
            if let Some(residual) = self.residuals.get_mut(name) {
                #[allow(clippy::cast_possible_truncation)]
                let scale = scale as f32;
                residual.iter_mut().for_each(|value| *value *= scale);
            }
        }
        scales.len()
    }

    /// Takes out of each residual the part that the new delta learnt again, before the delta
    /// joins it. A sender that restarts every round from the mesh's model re-learns what its
    /// residual holds (the residual is exactly what the mesh's model lacks of its progress);
    /// plain error feedback then counts that progress twice, and over long local phases the
    /// coordinates top-k picks overshoot. Per tensor, with `e` the residual and `d` the delta,
    /// `alpha = clamp(<d, e> / <e, e>, 0, 1)` is how much of `e` the delta re-learnt along
    /// `e`, and `e <- (1 - alpha) e`: a delta orthogonal to the residual (a short phase
    /// that learnt something else) leaves it whole, one that covers it removes it. If any
    /// product is not finite (a NaN delta, which the encoder refuses) nothing changes.
    /// Returns the mean `alpha` over the residuals that were not zero.
    pub fn discount_relearned(&mut self, delta: &TensorSet) -> f64 {
        let mut alphas = Vec::new();
        for tensor in delta.tensors() {
            let Some(residual) = self.residuals.get(&tensor.name) else {
                continue;
            };
            if residual.len() != tensor.values.len() {
                continue;
            }
            let (mut dot, mut norm) = (0.0_f64, 0.0_f64);
            for (&e, &d) in residual.iter().zip(&tensor.values) {
                dot += f64::from(e) * f64::from(d);
                norm += f64::from(e) * f64::from(e);
            }
            if !dot.is_finite() || !norm.is_finite() {
                return 0.0;
            }
            if norm > 0.0 {
                alphas.push((tensor.name.as_str(), (dot / norm).clamp(0.0, 1.0)));
            }
        }
        for &(name, alpha) in &alphas {
            if let Some(residual) = self.residuals.get_mut(name) {
                #[allow(clippy::cast_possible_truncation)]
                let keep = (1.0 - alpha) as f32;
                residual.iter_mut().for_each(|value| *value *= keep);
            }
        }
        if alphas.is_empty() {
            return 0.0;
        }
        #[allow(clippy::cast_precision_loss)]
        let count = alphas.len() as f64;
        alphas.iter().map(|&(_, alpha)| alpha).sum::<f64>() / count
    }

    /// Sum of squares of all residuals, in f64.
    #[must_use]
    pub fn squared_norm(&self) -> f64 {
        self.residuals
            .values()
            .flat_map(|residual| residual.iter())
            .map(|&value| f64::from(value) * f64::from(value))
            .sum()
    }

    /// The residual of `name`, zeros of length `len` if there was none.
    pub(crate) fn residual_mut(&mut self, name: &str, len: usize) -> &mut Vec<f32> {
        self.residuals
            .entry(name.to_owned())
            .or_insert_with(|| vec![0.0; len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_multiplies_every_residual() {
        let mut feedback = ErrorFeedback::new();
        feedback.restore_residual("a", vec![1.0, -2.0]);
        feedback.restore_residual("b", vec![4.0]);
        feedback.scale(0.5);
        assert_eq!(feedback.residual("a"), Some(&[0.5, -1.0][..]));
        assert_eq!(feedback.residual("b"), Some(&[2.0][..]));
        assert!((feedback.squared_norm() - 5.25).abs() < 1e-12);
    }

    fn set(tensors: &[(&str, Vec<f32>)]) -> TensorSet {
        let tensors = tensors
            .iter()
            .map(|(name, values)| crate::tensor::Tensor {
                name: (*name).to_owned(),
                shape: vec![values.len()],
                values: values.clone(),
            })
            .collect();
        TensorSet::new(tensors).expect("valid set")
    }

    #[test]
    fn bound_by_scales_only_residuals_larger_than_factor_times_the_new_delta() {
        let mut feedback = ErrorFeedback::new();
        feedback.restore_residual("big", vec![3.0, 4.0]);
        feedback.restore_residual("small", vec![0.3, 0.4]);
        feedback.restore_residual("stale", vec![1.0]);
        let delta = set(&[
            ("big", vec![1.0, 0.0]),
            ("small", vec![0.0, 1.0]),
            ("stale", vec![0.0]),
        ]);
        assert_eq!(feedback.bound_by(&delta, 2.0), 2);
        // |(3, 4)| = 5 > 2 * 1: scaled to norm 2.
        let big = feedback.residual("big").expect("kept");
        assert!((big[0] - 1.2).abs() < 1e-6 && (big[1] - 1.6).abs() < 1e-6);
        // |(0.3, 0.4)| = 0.5 <= 2: untouched.
        assert_eq!(feedback.residual("small"), Some(&[0.3, 0.4][..]));
        // A tensor that did not move this round keeps nothing.
        assert_eq!(feedback.residual("stale"), Some(&[0.0][..]));
        // NaN in the delta: nothing changes.
        let mut before = feedback.clone();
        let nan = set(&[("big", vec![f32::NAN, 0.0])]);
        assert_eq!(before.bound_by(&nan, 0.1), 0);
        assert_eq!(before, feedback);
    }

    #[test]
    fn a_delta_that_relearnt_the_residual_removes_it_and_an_orthogonal_one_keeps_it() {
        let mut feedback = ErrorFeedback::new();
        feedback.restore_residual("covered", vec![1.0, 2.0]);
        feedback.restore_residual("half", vec![2.0, 0.0]);
        feedback.restore_residual("other", vec![1.0, 0.0]);
        feedback.restore_residual("against", vec![1.0, 1.0]);
        let delta = set(&[
            ("against", vec![-1.0, -3.0]),
            ("covered", vec![3.0, 6.0]),
            ("half", vec![1.0, 5.0]),
            ("other", vec![0.0, 7.0]),
        ]);
        let mean = feedback.discount_relearned(&delta);
        // <d,e>/<e,e>: covered 15/5 -> 1, half 2/4 = 0.5, other 0, against -4/2 -> 0.
        assert_eq!(feedback.residual("covered"), Some(&[0.0, 0.0][..]));
        assert_eq!(feedback.residual("half"), Some(&[1.0, 0.0][..]));
        assert_eq!(feedback.residual("other"), Some(&[1.0, 0.0][..]));
        assert_eq!(feedback.residual("against"), Some(&[1.0, 1.0][..]));
        assert!((mean - 0.375).abs() < 1e-12);
    }

    #[test]
    fn a_nan_delta_or_an_empty_residual_changes_nothing() {
        let mut feedback = ErrorFeedback::new();
        feedback.restore_residual("a", vec![1.0, 2.0]);
        feedback.restore_residual("b", vec![1.0, 2.0]);
        feedback.restore_residual("zero", vec![0.0, 0.0]);
        // `a` alone would be removed (alpha 1), but `b` holds a NaN: nothing changes.
        let delta = set(&[
            ("a", vec![1.0, 2.0]),
            ("b", vec![f32::NAN, 1.0]),
            ("zero", vec![1.0, 1.0]),
        ]);
        assert!(feedback.discount_relearned(&delta).abs() < 1e-12);
        assert_eq!(feedback.residual("a"), Some(&[1.0, 2.0][..]));
        assert_eq!(feedback.residual("b"), Some(&[1.0, 2.0][..]));
        assert_eq!(feedback.residual("zero"), Some(&[0.0, 0.0][..]));
        let clean = set(&[("a", vec![1.0, 2.0]), ("zero", vec![1.0, 1.0])]);
        assert!((feedback.discount_relearned(&clean) - 1.0).abs() < 1e-12);
        assert_eq!(feedback.residual("a"), Some(&[0.0, 0.0][..]));
    }
}
