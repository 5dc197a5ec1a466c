//! The one seeded generator of the data code: the synthetic corpus and the federated splits
//! draw from it.
//!
//! Owns: [`SeededRng`], its stream (`rand_xoshiro`'s SplitMix64) and the draws derived from it
//! (uniforms, picks, shuffles, normals, Gamma and Dirichlet samples). Must not know what the
//! draws are for: [`crate::synthetic`] and [`crate::split`] decide that. A change here changes
//! the committed synthetic fixtures and every split.

use rand::{RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;

/// The data code's seeded draws over `rand_xoshiro`'s SplitMix64 (Steele, Lea, Flood 2014):
/// reproducible on every platform and, being a fixed published algorithm, in every version of
/// the crate; enough for shuffling and synthetic data (not for cryptography). The helpers below
/// derive every value from `next_u64` alone, so that the corpus and the splits depend on the
/// stream and on nothing else.
#[derive(Debug, Clone)]
pub(crate) struct SeededRng {
    stream: SplitMix64,
}

impl SeededRng {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            stream: SplitMix64::seed_from_u64(seed),
        }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.stream.next_u64()
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (`n > 0`); the bias of the multiply-shift is below 2^-40 for the
    /// sizes used here.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    pub(crate) fn chance(&mut self, probability: f64) -> bool {
        self.next_f64() < probability
    }

    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// Fisher–Yates.
    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }

    /// Standard normal (Box–Muller, one of the pair).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]: ln is finite
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// ln of a Gamma(shape, 1) sample. Marsaglia & Tsang (2000) for shape >= 1; for
    /// shape < 1 the boost Gamma(shape) = Gamma(shape + 1) * U^(1/shape), kept in log space
    /// because U^(1/shape) underflows to 0 for shapes like 0.01.
    fn ln_gamma_sample(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            let u = 1.0 - self.next_f64();
            return self.ln_gamma_sample(shape + 1.0) + u.ln() / shape;
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = 1.0 + c * x;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            let u = 1.0 - self.next_f64();
            if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
                return (d * v).ln();
            }
        }
    }

    /// A draw from the symmetric Dirichlet(alpha, ..., alpha) over `n` outcomes.
    pub(crate) fn dirichlet(&mut self, alpha: f64, n: usize) -> Vec<f64> {
        let logs: Vec<f64> = (0..n).map(|_| self.ln_gamma_sample(alpha)).collect();
        let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = logs.iter().map(|l| (l - max).exp()).collect();
        let sum: f64 = weights.iter().sum();
        weights.iter().map(|w| w / sum).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::SeededRng;

    #[test]
    fn gamma_and_dirichlet_have_the_right_moments() {
        let mut rng = SeededRng::new(1);
        for shape in [0.1, 0.5, 1.0, 2.5, 10.0] {
            let n = 20_000;
            let samples: Vec<f64> = (0..n).map(|_| rng.ln_gamma_sample(shape).exp()).collect();
            let mean = samples.iter().sum::<f64>() / n as f64;
            let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            // Gamma(k, 1): mean k, variance k.
            assert!(
                (mean - shape).abs() < 0.05 * shape.max(1.0),
                "{shape}: mean {mean}"
            );
            assert!(
                (var - shape).abs() < 0.15 * shape.max(1.0),
                "{shape}: var {var}"
            );
        }
        let p = rng.dirichlet(0.01, 5);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(p.iter().all(|x| x.is_finite() && *x >= 0.0));
    }

    #[test]
    fn below_and_shuffle_cover_their_range() {
        let mut rng = SeededRng::new(7);
        let mut counts = [0usize; 5];
        for _ in 0..5000 {
            counts[rng.below(5)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (900..1100).contains(&c)),
            "{counts:?}"
        );
        let mut items: Vec<u32> = (0..50).collect();
        rng.shuffle(&mut items);
        assert_ne!(items, (0..50).collect::<Vec<_>>());
        items.sort_unstable();
        assert_eq!(items, (0..50).collect::<Vec<_>>());
    }
}
