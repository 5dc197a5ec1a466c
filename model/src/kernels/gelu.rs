//! FLAN-T5's gated gelu, `gelu_new(a) * gate`: one pass forward, one pass back.
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
use super::{CHUNK, backward_pair, map_pair, new_flex, shape_of, simd};

/// `gelu_new(a) * gate`.
fn forward(a: &FlexTensor, gate: &FlexTensor) -> Option<FlexTensor> {
    if a.layout().shape() != gate.layout().shape() {
        return None;
    }
    Some(map_pair(a, gate, simd::gelu_gated))
}

/// Gradients of [`forward`] with respect to `a` and `gate`.
fn backward(a: &FlexTensor, gate: &FlexTensor, grad: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let a = a.to_contiguous();
    let gate = gate.to_contiguous();
    let grad = grad.to_contiguous();
    let src: &[f32] = a.storage();
    let g: &[f32] = gate.storage();
    let up: &[f32] = grad.storage();
    let mut grad_a = vec![0.0f32; src.len()];
    let mut grad_gate = vec![0.0f32; src.len()];
    grad_a
        .par_chunks_mut(CHUNK)
        .zip(grad_gate.par_chunks_mut(CHUNK))
        .zip(src.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .zip(up.par_chunks(CHUNK))
        .for_each(|(((da, dg), (a, g)), up)| simd::gelu_gated_backward(a, g, up, da, dg));
    (
        new_flex(grad_a, shape_of(&a)),
        new_flex(grad_gate, shape_of(&a)),
    )
}

#[derive(Debug)]
struct GeluGatedOp;

impl Backward<Flex, 2> for GeluGatedOp {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        backward_pair(ops, grads, backward);
    }
}

/// `gelu_new(a) * gate` (FLAN-T5's gated-gelu), one pass (and one pass back when training).
pub(crate) fn gelu_new_gated<B: Backend>(
    a: &Tensor<B, 3>,
    gate: &Tensor<B, 3>,
) -> Option<Tensor<B, 3>> {
    dispatch::binary(a, gate, GeluGatedOp, forward)
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use burn_flex::Flex;

    use super::super::testing::{assert_same_gradients, close, random};

    fn generic_gelu_gated<B: burn::tensor::backend::Backend>(
        a: Tensor<B, 3>,
        g: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        burn::tensor::activation::gelu_approximate(a) * g
    }

    #[test]
    fn gated_gelu_matches_the_generic_formula_values_and_gradients() {
        let a: Tensor<Flex, 3> = random([2, 7, 300]);
        let g: Tensor<Flex, 3> = random([2, 7, 300]);
        let fused = super::gelu_new_gated(&a, &g).expect("flex takes the fused path");
        close(
            fused.into_data(),
            generic_gelu_gated(a.clone(), g.clone()).into_data(),
        );

        assert_same_gradients(
            &a,
            &g,
            [2, 7, 300],
            super::gelu_new_gated,
            generic_gelu_gated,
        );
    }

    #[test]
    fn other_backends_and_dtypes_take_the_generic_path() {
        let x: Tensor<Flex, 3> = random([1, 2, 8]);
        let half = x.clone().cast(burn::tensor::FloatDType::F16);
        let w: Tensor<Flex, 1> = random([8]);
        assert!(super::super::rms_norm(&half, &w, 1e-6).is_none());
        assert!(super::gelu_new_gated(&half, &half).is_none());
        // A shape the kernel does not handle (gate of another shape) falls back too.
        let other: Tensor<Flex, 3> = random([1, 2, 9]);
        assert!(super::gelu_new_gated(&x, &other).is_none());
    }
}
