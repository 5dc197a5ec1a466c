//! Low-rank segments (PowerSGD-style): a matrix delta `M` (`m x n`, row-major; a tensor of
//! more dimensions is viewed as `shape[0] x rest`) sent as two factors `P` (`m x r`) and `Q`
//! (`n x r`) with `M ~ P Q^T`. The rest goes to error feedback, as with top-k, so over rounds
//! nothing is lost.
//!
//! Layout of the raw segment: the value section of `P` then the value section of `Q`, each
//! in the tensor's [`super::ValueFormat`], each stored column by column (`p[k * m + i]`,
//! `q[k * n + j]`): a quantization block then holds one column, whose entries have one scale.
//!
//! The encoder finds the factors by subspace iteration ([`ITERATIONS`] rounds of
//! `P = orth(M Q)`, `Q = M^T P` from a fixed pseudo-random start), in f64. The decoder only
//! multiplies: [`reconstruct`] sums the `r` products of each element in a fixed order in f32,
//! so every node decodes the same bits on every platform.
//!
//! Owns: the factorization and the reconstruction. Must not choose the rank (the sender's
//! [`super::CodecParams`] does) or read the wire format (the manifest records the rank).
#![allow(clippy::needless_range_loop)]

/// Subspace iterations per encode: the second one sharpens the subspace found from the
/// random start (PowerSGD warm-starts one iteration from the previous round instead, which
/// needs sender state per tensor).
pub(crate) const ITERATIONS: usize = 2;

/// `(rows, columns)` a tensor of `shape` is factorized as; `None` below two dimensions.
pub(crate) fn matrix_dims(shape: &[usize]) -> Option<(usize, usize)> {
    match shape {
        [] | [_] => None,
        [rows, rest @ ..] => Some((*rows, rest.iter().product())),
    }
}

/// Whether rank `rank` makes a `rows x cols` tensor smaller: `rank (rows + cols) < rows cols`.
pub(crate) fn saves(rows: usize, cols: usize, rank: usize) -> bool {
    rank >= 1
        && rank <= rows.min(cols)
        && (rank as u128) * (rows as u128 + cols as u128) < (rows as u128) * (cols as u128)
}

/// Reusable buffers of the encoder.
#[derive(Default)]
pub(crate) struct Factorizer {
    p: Vec<f64>,
    q: Vec<f64>,
}

impl Factorizer {
    /// Writes `P` (column-major, `m x r`) then `Q` (column-major, `n x r`) of a rank-`r`
    /// approximation of `matrix` into `factors` (`(m + n) r` values). `P` has orthonormal
    /// columns (a column of zeros where `M` has no more rank), so `P Q^T` is the projection
    /// of `M` onto the subspace found.
    pub(crate) fn factorize(
        &mut self,
        matrix: &[f32],
        (m, n): (usize, usize),
        r: usize,
        factors: &mut Vec<f32>,
    ) {
        debug_assert_eq!(matrix.len(), m * n);
        let Self { p, q } = self;
        p.clear();
        p.resize(m * r, 0.0);
        q.clear();
        q.resize(n * r, 0.0);
        // A fixed start (SplitMix64 uniforms in [-1, 1)): the encoder is deterministic.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for value in q.iter_mut() {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            *value = (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0;
        }
        for _ in 0..ITERATIONS {
            multiply(matrix, (m, n), q, r, p);
            orthonormalize(p, m, r);
            multiply_transposed(matrix, (m, n), p, r, q);
        }
        factors.clear();
        factors.extend(p.iter().map(|&v| v as f32));
        factors.extend(q.iter().map(|&v| v as f32));
    }
}

/// `p = M q`: `p[k m + i] = sum_j M[i n + j] q[k n + j]`.
fn multiply(matrix: &[f32], (m, n): (usize, usize), q: &[f64], r: usize, p: &mut [f64]) {
    for i in 0..m {
        let row = &matrix[i * n..(i + 1) * n];
        for k in 0..r {
            let column = &q[k * n..(k + 1) * n];
            let mut sum = 0.0f64;
            for j in 0..n {
                sum += f64::from(row[j]) * column[j];
            }
            p[k * m + i] = sum;
        }
    }
}

/// `q = M^T p`: `q[k n + j] = sum_i M[i n + j] p[k m + i]`.
fn multiply_transposed(matrix: &[f32], (m, n): (usize, usize), p: &[f64], r: usize, q: &mut [f64]) {
    q.fill(0.0);
    for i in 0..m {
        let row = &matrix[i * n..(i + 1) * n];
        for k in 0..r {
            let weight = p[k * m + i];
            if weight == 0.0 {
                continue;
            }
            let column = &mut q[k * n..(k + 1) * n];
            for j in 0..n {
                column[j] += weight * f64::from(row[j]);
            }
        }
    }
}

/// Modified Gram-Schmidt on the `r` columns of `p` (`m` rows each); a column left with no
/// norm (the matrix has lower rank) becomes zeros.
fn orthonormalize(p: &mut [f64], m: usize, r: usize) {
    for k in 0..r {
        for previous in 0..k {
            let (done, rest) = p.split_at_mut(k * m);
            let basis = &done[previous * m..(previous + 1) * m];
            let column = &mut rest[..m];
            let dot: f64 = basis.iter().zip(column.iter()).map(|(a, b)| a * b).sum();
            for (value, b) in column.iter_mut().zip(basis) {
                *value -= dot * b;
            }
        }
        let column = &mut p[k * m..(k + 1) * m];
        let norm = column.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm > 1e-30 {
            column.iter_mut().for_each(|v| *v /= norm);
        } else {
            column.fill(0.0);
        }
    }
}

/// `out = P Q^T` (`m x n`, row-major) from column-major factors, in f32 with the products of
/// each element summed in order `k = 0..r`: the same bits on every node.
pub(crate) fn reconstruct(p: &[f32], q: &[f32], (m, n): (usize, usize), r: usize, out: &mut [f32]) {
    debug_assert!(p.len() == m * r && q.len() == n * r && out.len() == m * n);
    out.fill(0.0);
    for i in 0..m {
        let row = &mut out[i * n..(i + 1) * n];
        for k in 0..r {
            let weight = p[k * m + i];
            let column = &q[k * n..(k + 1) * n];
            for j in 0..n {
                row[j] += weight * column[j];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approximate(matrix: &[f32], dims: (usize, usize), r: usize) -> Vec<f32> {
        let mut factors = Vec::new();
        Factorizer::default().factorize(matrix, dims, r, &mut factors);
        let (p, q) = factors.split_at(dims.0 * r);
        let mut out = vec![0.0; dims.0 * dims.1];
        reconstruct(p, q, dims, r, &mut out);
        out
    }

    fn norm(values: &[f32]) -> f64 {
        values
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn a_matrix_of_rank_r_is_recovered_exactly() {
        // M = a b^T + c d^T (rank 2), 12 x 7.
        let (m, n) = (12, 7);
        let matrix: Vec<f32> = (0..m * n)
            .map(|x| {
                let (i, j) = ((x / n) as f32, (x % n) as f32);
                (i - 3.0) * (j + 1.0) * 0.01 + (i * i * 0.02) * ((j * 0.7).sin())
            })
            .collect();
        let out = approximate(&matrix, (m, n), 2);
        let error: Vec<f32> = matrix.iter().zip(&out).map(|(a, b)| a - b).collect();
        assert!(norm(&error) <= 1e-5 * norm(&matrix), "{}", norm(&error));
        // Rank 3 of a rank-2 matrix: the third column of P is (numerically) empty.
        let out = approximate(&matrix, (m, n), 3);
        let error: Vec<f32> = matrix.iter().zip(&out).map(|(a, b)| a - b).collect();
        assert!(norm(&error) <= 1e-5 * norm(&matrix));
    }

    #[test]
    fn the_approximation_is_a_projection_that_never_adds_error() {
        // A full-rank matrix: rank-r approximations shrink the error as r grows and the error
        // never exceeds the matrix (P has orthonormal columns: P Q^T = P P^T M).
        let (m, n) = (16, 10);
        let matrix: Vec<f32> = (0..m * n)
            .map(|x| ((x * 7919 % 1013) as f32 / 1013.0) - 0.5)
            .collect();
        let mut previous = norm(&matrix);
        for r in 1..=10 {
            let out = approximate(&matrix, (m, n), r);
            let error: Vec<f32> = matrix.iter().zip(&out).map(|(a, b)| a - b).collect();
            let e = norm(&error);
            assert!(e <= previous * (1.0 + 1e-6), "rank {r}: {e} > {previous}");
            previous = e;
        }
        assert!(
            previous <= 1e-5 * norm(&matrix),
            "rank 10 of 16 x 10 is exact"
        );
    }

    #[test]
    fn dims_and_savings() {
        assert_eq!(matrix_dims(&[4]), None);
        assert_eq!(matrix_dims(&[]), None);
        assert_eq!(matrix_dims(&[4, 3, 2]), Some((4, 6)));
        assert!(saves(128, 128, 4));
        assert!(!saves(32, 4, 4)); // 4 x 36 > 128
        assert!(!saves(8, 8, 0));
        assert!(!saves(8, 8, 9));
    }
}
