//! The element-wise loops, written so that the compiler vectorizes them; compiled three times
//! (for the baseline target, AVX2+FMA and AVX-512) and picked at run time. The compiler never
//! fuses a multiply and an add on its own, so all three give the same bits.
//!
//! Owns: the arithmetic of every kernel's inner loop, on plain slices. Must not know about
//! tensors, layouts or backends: the kernels' files hand it contiguous slices.

/// `exp(x)` for f32 to ~2 ulp (Cephes `expf`: range reduction by ln 2, degree-6
/// polynomial, exponent bits set directly); exactly 0 below -87.3 as libm's underflow.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = x.clamp(-87.3, 88.3);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let poly = p * r2 + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    let value = poly * scale;
    if x < -87.3 { 0.0 } else { value }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// `gelu_new(x) = 0.5 x (1 + tanh(u)) = x sigmoid(2u)`, `u = sqrt(2/pi) (x + 0.044715 x^3)`;
/// returns `(gelu_new(x), sigmoid(2u))`.
#[inline(always)]
fn gelu(x: f32) -> (f32, f32) {
    let u = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
    let s = 1.0 / (1.0 + exp(-2.0 * u));
    (x * s, s)
}

#[inline(always)]
fn gelu_gated_body(a: &[f32], gate: &[f32], out: &mut [f32]) {
    for ((o, &x), &g) in out.iter_mut().zip(a).zip(gate) {
        *o = gelu(x).0 * g;
    }
}

/// `d gelu_new(x) / dx = s + x s (1 - s) 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2)`, `s` as in
/// [`gelu`]; the gate's gradient is `grad * gelu_new(a)`.
#[inline(always)]
fn gelu_gated_backward_body(
    a: &[f32],
    gate: &[f32],
    grad: &[f32],
    grad_a: &mut [f32],
    grad_gate: &mut [f32],
) {
    let n = a.len();
    let (gate, grad, grad_a, grad_gate) = (
        &gate[..n],
        &grad[..n],
        &mut grad_a[..n],
        &mut grad_gate[..n],
    );
    for i in 0..n {
        let x = a[i];
        let (value, s) = gelu(x);
        let slope = s + x * s * (1.0 - s) * 2.0 * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x);
        grad_a[i] = grad[i] * gate[i] * slope;
        grad_gate[i] = grad[i] * value;
    }
}

/// Independent accumulators: a reduction over one `f32` chain cannot be vectorized
/// without reassociation, which Rust never does on its own.
const LANES: usize = 16;

/// The largest element of `row` (`-inf` when empty), in independent lanes.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    lanes
        .iter()
        .chain(chunks.remainder())
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

#[inline(always)]
fn softmax_body(row: &mut [f32]) {
    let max = row_max(row);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sums = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, v) in sums.iter_mut().zip(chunk.iter_mut()) {
            *v = exp(*v - max);
            *s += *v;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// torch's single-tensor AdamW, element by element in its order of operations (f32, as the
/// generic path's scalar tensor ops compute).
#[inline(always)]
fn adamw_body(
    value: &mut [f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    grad: &[f32],
    h: &super::AdamWScalars,
) {
    let grad_scale = h.grad_scale as f32;
    let decay = h.decay as f32;
    let w = h.lerp_weight as f32;
    let one_minus_w = (1.0 - h.lerp_weight) as f32;
    let beta2 = h.beta2 as f32;
    let one_minus_beta2 = (1.0 - h.beta2) as f32;
    let bc2 = h.bias_correction2_sqrt as f32;
    let eps = h.eps as f32;
    let step_size = h.step_size as f32;
    let lerp_low = h.lerp_weight < 0.5;
    let n = value.len();
    let (exp_avg, exp_avg_sq, grad) = (&mut exp_avg[..n], &mut exp_avg_sq[..n], &grad[..n]);
    for i in 0..n {
        let g = grad[i] * grad_scale;
        let v = value[i] * decay;
        let m0 = exp_avg[i];
        let m = if lerp_low {
            m0 + (g - m0) * w
        } else {
            g - (g - m0) * one_minus_w
        };
        let s = exp_avg_sq[i] * beta2 + g * g * one_minus_beta2;
        let denom = s.sqrt() / bc2 + eps;
        value[i] = v - (m / denom) * step_size;
        exp_avg[i] = m;
        exp_avg_sq[i] = s;
    }
}

/// Adds `bias` (same length) to `row`.
#[inline(always)]
fn add_body(row: &mut [f32], bias: &[f32]) {
    row.iter_mut().zip(bias).for_each(|(r, b)| *r += b);
}

/// One T5 RMS-norm row: `out = weight * (x / sqrt(mean(x^2) + eps))`.
#[inline(always)]
fn rms_row_body(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mut sums = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (s, &v) in sums.iter_mut().zip(chunk) {
            *s += v * v;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    let variance = (sums.iter().sum::<f32>() + tail) / x.len() as f32;
    let inv = 1.0 / (variance + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * inv);
    }
}

/// Backward of [`rms_row_body`] for every row: `grad_x = r gw - x r^3 sum(gw x) / d` with
/// `gw = grad * weight`, `r = 1 / sqrt(mean(x^2) + eps)`; adds `grad * x r` to `grad_w`.
#[inline(always)]
fn rms_rows_backward_body(
    x: &[f32],
    weight: &[f32],
    eps: f32,
    grad: &[f32],
    grad_x: &mut [f32],
    grad_w: &mut [f32],
) {
    let d = weight.len();
    for ((x, g), gx) in x
        .chunks_exact(d)
        .zip(grad.chunks_exact(d))
        .zip(grad_x.chunks_exact_mut(d))
    {
        let mut squares = [0.0f32; LANES];
        let mut dots = [0.0f32; LANES];
        let mut index = 0;
        while index + LANES <= d {
            for l in 0..LANES {
                let v = x[index + l];
                squares[l] += v * v;
                dots[l] += g[index + l] * weight[index + l] * v;
            }
            index += LANES;
        }
        let mut square_sum: f32 = squares.iter().sum();
        let mut dot: f32 = dots.iter().sum();
        for i in index..d {
            square_sum += x[i] * x[i];
            dot += g[i] * weight[i] * x[i];
        }
        let r = 1.0 / (square_sum / d as f32 + eps).sqrt();
        let k = r * r * r * dot / d as f32;
        for i in 0..d {
            gx[i] = r * g[i] * weight[i] - x[i] * k;
            grad_w[i] += g[i] * x[i] * r;
        }
    }
}

/// One softmax row backward in place: `g = p * (g - sum(g * p))`.
#[inline(always)]
fn softmax_row_backward_body(p: &[f32], g: &mut [f32]) {
    let mut dots = [0.0f32; LANES];
    let mut gc = g.chunks_exact(LANES);
    let mut pc = p.chunks_exact(LANES);
    for (gc, pc) in (&mut gc).zip(&mut pc) {
        for l in 0..LANES {
            dots[l] += gc[l] * pc[l];
        }
    }
    let tail: f32 = gc
        .remainder()
        .iter()
        .zip(pc.remainder())
        .map(|(g, p)| g * p)
        .sum();
    let dot = dots.iter().sum::<f32>() + tail;
    for (g, &p) in g.iter_mut().zip(p) {
        *g = p * (*g - dot);
    }
}

/// `logsumexp` of one row: max, then the sum of `exp(v - max)` in independent lanes.
#[inline(always)]
fn logsumexp_body(row: &[f32]) -> f32 {
    let max = row_max(row);
    if !max.is_finite() {
        return max;
    }
    let mut sums = [0.0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (s, &v) in sums.iter_mut().zip(chunk) {
            *s += exp(v - max);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| exp(v - max)).sum();
    max + (sums.iter().sum::<f32>() + tail).ln()
}

/// The token cross-entropy of the rows of `x` (`labels.len()` rows) and their `logsumexp`.
#[inline(always)]
fn token_nll_rows_body(x: &[f32], labels: &[i64], nll: &mut [f32], lse: &mut [f32]) {
    let vocab = x.len() / labels.len().max(1);
    for (((row, &label), nll), lse) in x.chunks_exact(vocab).zip(labels).zip(nll).zip(lse) {
        if label < 0 {
            *nll = 0.0;
            *lse = 0.0;
            continue;
        }
        *lse = logsumexp_body(row);
        *nll = *lse - row[label as usize];
    }
}

/// The gradient of the token cross-entropy with respect to the rows of `x`.
#[inline(always)]
fn token_nll_rows_backward_body(
    x: &[f32],
    labels: &[i64],
    lse: &[f32],
    grad: &[f32],
    out: &mut [f32],
) {
    let vocab = x.len() / labels.len().max(1);
    for ((((row, o), &label), &lse), &g) in x
        .chunks_exact(vocab)
        .zip(out.chunks_exact_mut(vocab))
        .zip(labels)
        .zip(lse)
        .zip(grad)
    {
        if label < 0 {
            o.fill(0.0);
            continue;
        }
        for (o, &v) in o.iter_mut().zip(row) {
            *o = g * exp(v - lse);
        }
        o[label as usize] -= g;
    }
}

/// `out[0] = sum(x^2)`, in independent lanes.
#[inline(always)]
fn sum_squares_body(x: &[f32], out: &mut [f32]) {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (s, &v) in lanes.iter_mut().zip(chunk) {
            *s += v * v;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    out[0] = lanes.iter().sum::<f32>() + tail;
}

/// RMS norm of every `weight.len()`-long row of `x`.
#[inline(always)]
fn rms_rows_body(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (o, row) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        rms_row_body(row, weight, eps, o);
    }
}

macro_rules! dispatch {
    ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        pub(super) fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features `avx512` was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

dispatch!(gelu_gated, gelu_gated_body, (a: &[f32], gate: &[f32], out: &mut [f32]));
dispatch!(gelu_gated_backward, gelu_gated_backward_body, (a: &[f32], gate: &[f32], grad: &[f32], grad_a: &mut [f32], grad_gate: &mut [f32]));
dispatch!(rms_rows_backward, rms_rows_backward_body, (x: &[f32], weight: &[f32], eps: f32, grad: &[f32], grad_x: &mut [f32], grad_w: &mut [f32]));
dispatch!(softmax_row_backward, softmax_row_backward_body, (p: &[f32], g: &mut [f32]));
dispatch!(softmax_in_place, softmax_body, (row: &mut [f32]));
dispatch!(adamw, adamw_body, (value: &mut [f32], exp_avg: &mut [f32], exp_avg_sq: &mut [f32], grad: &[f32], h: &super::AdamWScalars));
dispatch!(add_in_place, add_body, (row: &mut [f32], bias: &[f32]));
dispatch!(rms_rows, rms_rows_body, (x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]));
dispatch!(sum_squares, sum_squares_body, (x: &[f32], out: &mut [f32]));
dispatch!(token_nll_rows, token_nll_rows_body, (x: &[f32], labels: &[i64], nll: &mut [f32], lse: &mut [f32]));
dispatch!(token_nll_rows_backward, token_nll_rows_backward_body, (x: &[f32], labels: &[i64], lse: &[f32], grad: &[f32], out: &mut [f32]));

#[cfg(test)]
mod tests {
    #[test]
    fn exp_matches_libm_to_a_few_ulp() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = x.exp();
            let got = super::exp(x);
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_3;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(super::exp(-1.0e9), 0.0);
        assert_eq!(super::exp(0.0), 1.0);
    }
}
