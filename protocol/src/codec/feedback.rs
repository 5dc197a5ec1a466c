//! Error feedback: what lossy encoding left out of a round, carried into the next one.
//!
//! Owns: [`ErrorFeedback`], one residual buffer per tensor. The encoder adds the residual
//! to the new delta, encodes the sum, and stores `sum - decoded` back, so over rounds
//! `sum of decoded deltas + residual == sum of true deltas` up to float rounding.
//! Must not touch: the network; the residual never leaves the node.

use std::collections::BTreeMap;

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
}
