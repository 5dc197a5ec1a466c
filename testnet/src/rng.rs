//! The seeded generator of the simulator's synthetic data and the soak's kill schedule:
//! `rand_xoshiro`'s splitmix64 (value-stable across versions, the stream the trainer shuffles
//! with), and `rand_distr`'s normal distribution, so a run is reproducible from `--seed`.

use rand::{Rng as _, SeedableRng};
use rand_distr::StandardNormal;
use rand_xoshiro::SplitMix64;

#[derive(Debug, Clone)]
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64::seed_from_u64(seed))
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        self.0.random_range(lo..=hi)
    }

    /// Standard normal.
    pub fn gaussian(&mut self) -> f32 {
        self.0.sample(StandardNormal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_reproducible_and_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let draws: Vec<u64> = (0..100).map(|_| a.range(2, 9)).collect();
        assert_eq!(draws, (0..100).map(|_| b.range(2, 9)).collect::<Vec<_>>());
        assert!(draws.iter().all(|d| (2..=9).contains(d)));
        assert!(
            (2..=9).all(|v| draws.contains(&v)),
            "every value drawn: {draws:?}"
        );
        let normal: Vec<f32> = (0..10_000).map(|_| a.gaussian()).collect();
        let mean = normal.iter().sum::<f32>() / normal.len() as f32;
        let var = normal.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / normal.len() as f32;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.05,
            "mean {mean}, var {var}"
        );
    }
}
