//! The token cross-entropy: log-softmax and the pick of each label's entry in one parallel
//! pass, and its backward in another, without the `[B, T, V]` log-probabilities.
//!
//! Owns: this kernel's forward and backward passes and its autodiff op. Must not choose the
//! backend (`dispatch` does) or hold loops another kernel shares (`simd` has them).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Shape, Tensor};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::dispatch::{self, Cpu};
use super::{host_ints, new_flex, rows_per_task, shape_of, simd};

/// Per-token negative log-likelihood of `logits` (`[B, T, V]`) at `labels` (`B * T` of them):
/// `logsumexp(row) - row[label]`, 0 where the label is negative (ignored). Also returns each
/// row's `logsumexp`, what the backward pass needs besides the logits. `None` when the shapes
/// disagree or a label is outside the vocabulary.
fn forward(logits: &FlexTensor, labels: &[i64]) -> Option<(FlexTensor, Vec<f32>)> {
    let dims = logits.layout().shape().to_vec();
    let &[batch, len, vocab] = dims.as_slice() else {
        return None;
    };
    if batch * len != labels.len() || vocab == 0 || labels.iter().any(|&l| l >= vocab as i64) {
        return None;
    }
    let logits = logits.to_contiguous();
    let x: &[f32] = logits.storage();
    let mut nll = vec![0.0f32; labels.len()];
    let mut lse = vec![0.0f32; labels.len()];
    let rows = rows_per_task(vocab);
    nll.par_chunks_mut(rows)
        .zip(lse.par_chunks_mut(rows))
        .zip(x.par_chunks(rows * vocab).zip(labels.par_chunks(rows)))
        .for_each(|((nll, lse), (x, labels))| simd::token_nll_rows(x, labels, nll, lse));
    Some((new_flex(nll, Shape::new([batch, len])), lse))
}

/// Gradient of [`forward`] with respect to the logits: `grad * (softmax(row) - onehot(label))`
/// per row, 0 for ignored rows.
fn backward(logits: &FlexTensor, labels: &[i64], lse: &[f32], grad: &FlexTensor) -> FlexTensor {
    let logits = logits.to_contiguous();
    let grad = grad.to_contiguous();
    let x: &[f32] = logits.storage();
    let g: &[f32] = grad.storage();
    let vocab = x.len() / labels.len().max(1);
    let mut out = vec![0.0f32; x.len()];
    let rows = rows_per_task(vocab);
    out.par_chunks_mut(rows * vocab)
        .zip(x.par_chunks(rows * vocab))
        .zip(
            labels
                .par_chunks(rows)
                .zip(lse.par_chunks(rows).zip(g.par_chunks(rows))),
        )
        .for_each(|((out, x), (labels, (lse, g)))| {
            simd::token_nll_rows_backward(x, labels, lse, g, out)
        });
    new_flex(out, shape_of(&logits))
}

#[derive(Debug)]
struct TokenNllOp;

impl Backward<Flex, 1> for TokenNllOp {
    /// The logits, the labels and each row's `logsumexp`.
    type State = (FlexTensor, Vec<i64>, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, labels, lse) = ops.state;
        let [node] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node {
            grads.register::<Flex>(node.id, backward(&logits, &labels, &lse, &grad));
        }
    }
}

/// Cross-entropy of every target token, `[B, T]` from logits `[B, T, V]` and `labels` `[B, T]`
/// (negative = ignored, giving 0): log-softmax, gather and their backward in one
/// multi-threaded pass each, without the `[B, T, V]` log-probabilities of the generic
/// composition.
pub(crate) fn token_nll<B: Backend>(
    logits: &Tensor<B, 3>,
    labels: &Tensor<B, 2, Int>,
) -> Option<Tensor<B, 2>> {
    let cpu = dispatch::cpu::<B>()?;
    let labels = host_ints(labels)?;
    match cpu {
        Cpu::Inference(flex) => Some(flex.wrap(forward(&flex.f32(logits)?, &labels)?.0)),
        Cpu::Training(ad) => {
            let logits = ad.f32(logits)?;
            let (nll, lse) = forward(&logits.primitive, &labels)?;
            Some(ad.record(TokenNllOp, [logits], |[logits]| (logits, labels, lse), nll))
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Int, Tensor, TensorData};
    use burn_flex::Flex;

    use super::super::testing::{Ad, close, random};

    /// The fused cross-entropy against log_softmax + gather (the generic path of
    /// `score::token_nll`): values, 0 at ignored labels, and the logits' gradient, with a
    /// vocabulary that is not a multiple of the SIMD width and logits large enough that a
    /// `logsumexp` without its max would overflow.
    #[test]
    fn token_nll_matches_log_softmax_and_gather_values_and_gradients() {
        let (batch, len, vocab) = (3, 4, 37);
        let labels: Vec<i64> = (0..batch * len)
            .map(|i| {
                if i % 5 == 3 {
                    -100
                } else {
                    (i * 7 % vocab) as i64
                }
            })
            .collect();
        let logits: Tensor<Flex, 3> = random::<Flex, 3>([batch, len, vocab]) * 30.0;
        let generic = |logits: Tensor<Ad, 3>| {
            let ids = Tensor::<Ad, 1, Int>::from_data(
                TensorData::new(labels.clone(), [batch * len]),
                &Default::default(),
            );
            let valid = ids
                .clone()
                .greater_equal_elem(0)
                .float()
                .reshape([batch, len]);
            let safe = ids.clamp_min(0).reshape([batch, len, 1]);
            let picked = log_softmax(logits, 2).gather(2, safe).reshape([batch, len]);
            picked.neg() * valid
        };
        fn ints<B: burn::tensor::backend::Backend>(
            values: &[i64],
            shape: [usize; 2],
        ) -> Tensor<B, 2, Int> {
            Tensor::from_data(TensorData::new(values.to_vec(), shape), &Default::default())
        }
        let fused = super::token_nll(&logits, &ints::<Flex>(&labels, [batch, len]))
            .expect("flex takes the kernel");
        let want = generic(Tensor::from_data(
            logits.clone().into_data(),
            &Default::default(),
        ));
        close(fused.clone().into_data(), want.inner().into_data());
        let values = fused.into_data().to_vec::<f32>().expect("f32 values");
        // Ignored labels give exactly 0; a kept label's loss is >= 0 and may round to 0 in f32
        // (its logit above every other by ~17 or more, common at this logit scale).
        for (i, label) in labels.iter().enumerate() {
            if *label < 0 {
                assert_eq!(values[i], 0.0, "row {i}");
            } else {
                assert!(values[i] >= 0.0, "row {i}: {}", values[i]);
            }
        }

        let upstream: Tensor<Ad, 2> = random([batch, len]);
        let grad_of = |fused: bool| {
            let x: Tensor<Ad, 3> =
                Tensor::from_data(logits.clone().into_data(), &Default::default()).require_grad();
            let out = if fused {
                super::token_nll(&x, &ints::<Ad>(&labels, [batch, len]))
                    .expect("autodiff takes the kernel")
            } else {
                generic(x.clone())
            };
            let grads = (out * upstream.clone()).sum().backward();
            x.grad(&grads).expect("gradient").into_data()
        };
        close(grad_of(true), grad_of(false));
        // Labels that do not fit the shape or the vocabulary take the generic path.
        let short = &labels[..batch * (len - 1)];
        assert!(super::token_nll(&logits, &ints::<Flex>(short, [batch, len - 1])).is_none());
        let outside = vec![vocab as i64; batch * len];
        assert!(super::token_nll(&logits, &ints::<Flex>(&outside, [batch, len])).is_none());
    }
}
