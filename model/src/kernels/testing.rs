//! What the kernels' unit tests share: each kernel is checked against burn's own ops composing
//! the same formula (the generic path of every other backend), values and gradients; the
//! model-level parity with HF transformers is in `tests/`.
//!
//! Owns: test helpers only. Must not be used outside `#[cfg(test)]` code.

use burn::backend::Autodiff;
use burn::tensor::{Distribution, Tensor, TensorData, Tolerance};
use burn_flex::Flex;

/// The CPU training backend the gradient checks run on.
pub(super) type Ad = Autodiff<Flex>;

pub(super) fn random<B: burn::tensor::backend::Backend, const D: usize>(
    shape: [usize; D],
) -> Tensor<B, D> {
    let values =
        Tensor::<Flex, D>::random(shape, Distribution::Normal(0.0, 1.5), &Default::default());
    Tensor::from_data(values.into_data(), &Default::default())
}

pub(super) fn close(got: TensorData, want: TensorData) {
    got.assert_approx_eq::<f32>(&want, Tolerance::rel_abs(2e-5, 2e-5));
}

/// The gradients of `sum(op(a, b) * upstream)` with respect to `a` and `b` are the same
/// through the fused kernel (on the autodiff CPU backend) and through `generic`.
pub(super) fn assert_same_gradients<const DA: usize, const DB: usize, const DO: usize>(
    a: &Tensor<Flex, DA>,
    b: &Tensor<Flex, DB>,
    out_shape: [usize; DO],
    fused: impl Fn(&Tensor<Ad, DA>, &Tensor<Ad, DB>) -> Option<Tensor<Ad, DO>>,
    generic: impl Fn(Tensor<Ad, DA>, Tensor<Ad, DB>) -> Tensor<Ad, DO>,
) {
    let upstream: Tensor<Ad, DO> = random(out_shape);
    let grads_of = |use_fused: bool| {
        let device = Default::default();
        let aa = Tensor::<Ad, DA>::from_data(a.to_data(), &device).require_grad();
        let ba = Tensor::<Ad, DB>::from_data(b.to_data(), &device).require_grad();
        let y = if use_fused {
            fused(&aa, &ba).expect("autodiff flex takes the fused path")
        } else {
            generic(aa.clone(), ba.clone())
        };
        let grads = (y * upstream.clone()).sum().backward();
        (
            aa.grad(&grads).expect("first input's grad").into_data(),
            ba.grad(&grads).expect("second input's grad").into_data(),
        )
    };
    let (fused_a, fused_b) = grads_of(true);
    let (generic_a, generic_b) = grads_of(false);
    close(fused_a, generic_a);
    close(fused_b, generic_b);
}
