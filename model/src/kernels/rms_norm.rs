//! T5's RMS norm `weight * x / sqrt(mean(x^2) + eps)` over the last dimension: one pass
//! forward, one pass back.
//!
//! Owns: this kernel's forward and backward passes and its autodiff op. Must not choose the
//! backend (`dispatch` does) or hold loops another kernel shares (`simd` has them).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::dispatch;
use super::{backward_pair, new_flex, rows_per_task, shape_of, simd};

/// `weight * x / sqrt(mean(x^2) + eps)` over the last dimension of `x`.
fn forward(x: &FlexTensor, weight: &FlexTensor, eps: f32) -> Option<FlexTensor> {
    let x = x.to_contiguous();
    let weight = weight.to_contiguous();
    let w: &[f32] = weight.storage();
    let d = w.len();
    if d == 0 || x.layout().shape().to_vec().last() != Some(&d) {
        return None;
    }
    let src: &[f32] = x.storage();
    let mut out = vec![0.0f32; src.len()];
    let chunk = rows_per_task(d) * d;
    out.par_chunks_mut(chunk)
        .zip(src.par_chunks(chunk))
        .for_each(|(out, src)| simd::rms_rows(src, w, eps, out));
    Some(new_flex(out, shape_of(&x)))
}

/// Gradients of [`forward`] with respect to `x` and `weight`.
fn backward(
    x: &FlexTensor,
    weight: &FlexTensor,
    eps: f32,
    grad: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let x = x.to_contiguous();
    let grad = grad.to_contiguous();
    let weight = weight.to_contiguous();
    let w: &[f32] = weight.storage();
    let d = w.len();
    let src: &[f32] = x.storage();
    let g: &[f32] = grad.storage();
    let mut grad_x = vec![0.0f32; src.len()];
    let chunk = rows_per_task(d) * d;
    let grad_w = grad_x
        .par_chunks_mut(chunk)
        .zip(src.par_chunks(chunk).zip(g.par_chunks(chunk)))
        .map(|(out, (src, g))| {
            let mut grad_w = vec![0.0f32; d];
            simd::rms_rows_backward(src, w, eps, g, out, &mut grad_w);
            grad_w
        })
        .reduce(
            || vec![0.0f32; d],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                a
            },
        );
    (
        new_flex(grad_x, shape_of(&x)),
        new_flex(grad_w, shape_of(&weight)),
    )
}

#[derive(Debug)]
struct RmsNormOp {
    eps: f32,
}

impl Backward<Flex, 2> for RmsNormOp {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        backward_pair(ops, grads, |x, weight, grad| {
            backward(x, weight, self.eps, grad)
        });
    }
}

/// T5 RMS norm `weight * x / sqrt(mean(x^2) + eps)` over the last dimension, one pass (and one
/// pass back when training).
pub(crate) fn rms_norm<B: Backend>(
    x: &Tensor<B, 3>,
    weight: &Tensor<B, 1>,
    eps: f64,
) -> Option<Tensor<B, 3>> {
    let eps = eps as f32;
    dispatch::binary(x, weight, RmsNormOp { eps }, |x, weight| {
        forward(x, weight, eps)
    })
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use burn_flex::Flex;

    use super::super::testing::{assert_same_gradients, close, random};

    fn generic_rms<B: burn::tensor::backend::Backend>(
        x: Tensor<B, 3>,
        w: Tensor<B, 1>,
    ) -> Tensor<B, 3> {
        let variance = x.clone().powi_scalar(2).mean_dim(2);
        x * (variance + 1e-6).sqrt().recip() * w.unsqueeze::<3>()
    }

    #[test]
    fn rms_norm_matches_the_generic_formula_values_and_gradients() {
        let x: Tensor<Flex, 3> = random([3, 5, 40]);
        let w: Tensor<Flex, 1> = random([40]);
        let fused = super::rms_norm(&x, &w, 1e-6).expect("flex takes the fused path");
        close(
            fused.into_data(),
            generic_rms(x.clone(), w.clone()).into_data(),
        );

        assert_same_gradients(
            &x,
            &w,
            [3, 5, 40],
            |x, w| super::rms_norm(x, w, 1e-6),
            generic_rms,
        );
    }
}
