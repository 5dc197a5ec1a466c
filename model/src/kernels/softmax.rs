//! Attention weights: `softmax(scores + sum(bias terms))` over the last dimension, the bias
//! terms (position bias, padding mask) read in place at their broadcast shapes.
//!
//! Owns: this kernel's forward and backward passes and its autodiff op. Must not choose the
//! backend (`dispatch` does) or hold loops another kernel shares (`simd` has them).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, broadcast_shape};
use burn::tensor::backend::Backend;
use burn::tensor::{Shape, Tensor};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::dispatch::{self, AdTensor, Cpu, Training};
use super::{into_contiguous, rows_per_task, shape_of, simd};

/// One additive bias term, broadcastable to `[B, H, Lq, Lk]`, read in place.
struct BiasTerm {
    tensor: FlexTensor,
    /// Element strides of `[B, H, Lq]`, 0 along broadcast dimensions.
    strides: [usize; 3],
    /// Whether the last dimension is broadcast (one value per row).
    scalar_rows: bool,
}

impl BiasTerm {
    fn new(tensor: FlexTensor, target: &[usize]) -> Option<Self> {
        let dims = tensor.layout().shape().to_vec();
        if dims.len() != 4
            || target.len() != 4
            || dims
                .iter()
                .zip(target)
                .any(|(&have, &want)| have != want && have != 1)
        {
            return None;
        }
        // A term whose last dimension is strided (the position bias is a permuted gather) is
        // copied once at its own, unbroadcast size, so that every row reads a slice.
        let scalar_rows = dims[3] == 1;
        let tensor = if scalar_rows || tensor.layout().strides()[3] == 1 {
            tensor
        } else {
            tensor.to_contiguous()
        };
        let layout = tensor.layout();
        if layout.strides().iter().any(|&s| s < 0) {
            return None;
        }
        let stride = |i: usize| {
            if dims[i] == 1 {
                0
            } else {
                layout.strides()[i] as usize
            }
        };
        let strides = [stride(0), stride(1), stride(2)];
        Some(Self {
            tensor,
            strides,
            scalar_rows,
        })
    }

    fn add_to_row(&self, row: &mut [f32], b: usize, h: usize, i: usize) {
        let data: &[f32] = self.tensor.storage();
        let start = self.tensor.layout().start_offset()
            + b * self.strides[0]
            + h * self.strides[1]
            + i * self.strides[2];
        if self.scalar_rows {
            let value = data[start];
            row.iter_mut().for_each(|s| *s += value);
        } else {
            simd::add_in_place(row, &data[start..start + row.len()]);
        }
    }
}

/// `softmax(scores + sum(terms))` over the last dimension; `scores` is `[B, H, Lq, Lk]`.
fn forward(scores: &FlexTensor, terms: &[FlexTensor]) -> Option<FlexTensor> {
    let terms = bias_terms(scores, terms)?;
    Some(in_place(scores.to_contiguous(), &terms))
}

/// The bias terms of `scores` (`[B, H, Lq, Lk]`), or `None` when one does not broadcast to it.
fn bias_terms(scores: &FlexTensor, terms: &[FlexTensor]) -> Option<Vec<BiasTerm>> {
    let dims = scores.layout().shape().to_vec();
    if dims.len() != 4 {
        return None;
    }
    terms
        .iter()
        .map(|t| BiasTerm::new(t.clone(), &dims))
        .collect::<Option<Vec<_>>>()
}

/// `softmax(scores + sum(terms))`, in place when `scores` is contiguous and not shared.
fn in_place(scores: FlexTensor, terms: &[BiasTerm]) -> FlexTensor {
    let dims = scores.layout().shape().to_vec();
    let (heads, q_len, k_len) = (dims[1], dims[2], dims[3]);
    let mut out = into_contiguous(scores);
    let data: &mut [f32] = out.storage_mut();
    let rows_per_task = rows_per_task(k_len);
    data.par_chunks_mut(k_len * rows_per_task)
        .enumerate()
        .for_each(|(task, rows)| {
            for (r, row) in rows.chunks_exact_mut(k_len).enumerate() {
                let index = task * rows_per_task + r;
                let (i, h, b) = (
                    index % q_len,
                    (index / q_len) % heads,
                    index / (q_len * heads),
                );
                for term in terms {
                    term.add_to_row(row, b, h, i);
                }
                simd::softmax_in_place(row);
            }
        });
    out
}

/// Gradient of the softmax input: `p * (grad - sum(grad * p))` per row.
fn backward(p: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
    let p = p.to_contiguous();
    let mut out = grad.to_contiguous();
    let k_len = p
        .layout()
        .shape()
        .to_vec()
        .last()
        .copied()
        .unwrap_or(1)
        .max(1);
    let probs: &[f32] = p.storage();
    let data: &mut [f32] = out.storage_mut();
    let chunk = rows_per_task(k_len) * k_len;
    data.par_chunks_mut(chunk)
        .zip(probs.par_chunks(chunk))
        .for_each(|(g, p)| {
            for (g, p) in g.chunks_exact_mut(k_len).zip(p.chunks_exact(k_len)) {
                simd::softmax_row_backward(p, g);
            }
        });
    out
}

#[derive(Debug)]
struct SoftmaxBiasOp;

impl<const N: usize> Backward<Flex, N> for SoftmaxBiasOp {
    /// The output probabilities and the shape of every input (scores first).
    type State = (FlexTensor, Vec<Shape>);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (probs, shapes) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node);
        let grad_scores = backward(&probs, &grad);
        for (node, shape) in ops.parents.into_iter().zip(&shapes) {
            if let Some(node) = node {
                grads
                    .register::<Flex>(node.id, broadcast_shape::<Flex>(grad_scores.clone(), shape));
            }
        }
    }
}

/// The scores and the terms recorded as one op of `N` inputs (scores first).
fn record<B: Backend, const N: usize>(
    ad: &Training<B>,
    inputs: [AdTensor; N],
) -> Option<Tensor<B, 4>> {
    let (scores, terms) = inputs.split_first()?;
    let term_data: Vec<FlexTensor> = terms.iter().map(|t| t.primitive.clone()).collect();
    let out = forward(&scores.primitive, &term_data)?;
    let shapes: Vec<Shape> = inputs.iter().map(|t| shape_of(&t.primitive)).collect();
    let probs = out.clone();
    Some(ad.record(SoftmaxBiasOp, inputs, |_| (probs, shapes), out))
}

fn training<B: Backend>(
    ad: &Training<B>,
    scores: &Tensor<B, 4>,
    terms: &[Tensor<B, 4>],
) -> Option<Tensor<B, 4>> {
    let scores = ad.f32(scores)?;
    let terms = terms
        .iter()
        .map(|t| ad.f32(t))
        .collect::<Option<Vec<_>>>()?;
    match terms.len() {
        1 => {
            let [t0]: [AdTensor; 1] = terms.try_into().ok()?;
            record(ad, [scores, t0])
        }
        2 => {
            let [t0, t1]: [AdTensor; 2] = terms.try_into().ok()?;
            record(ad, [scores, t0, t1])
        }
        _ => None,
    }
}

/// `softmax(scores + sum(terms))` over the last dimension, `scores` `[B, H, Lq, Lk]` and each
/// term broadcastable to it and read in place, never materialized at that size: one fused,
/// multi-threaded pass (and one pass back when training, where the gradient of a broadcast term
/// is summed over its broadcast dimensions). `Err(scores)` where the generic path must run.
pub(crate) fn softmax_with_bias<B: Backend>(
    scores: Tensor<B, 4>,
    terms: &[Tensor<B, 4>],
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let fused = match dispatch::cpu::<B>() {
        None => None,
        Some(Cpu::Inference(flex)) => {
            // Inference: the scores are this call's own, so the softmax overwrites them. The
            // second handle on them that `f32` returns is dropped before they are taken.
            let bias = terms
                .iter()
                .map(|t| flex.f32(t))
                .collect::<Option<Vec<_>>>()
                .and_then(|terms| bias_terms(&flex.f32(&scores)?, &terms));
            match bias {
                Some(bias) => return Ok(flex.wrap(in_place(flex.take(scores), &bias))),
                None => None,
            }
        }
        Some(Cpu::Training(ad)) => training(&ad, &scores, terms),
    };
    fused.ok_or(scores)
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::softmax;
    use burn::tensor::{Tensor, TensorData};
    use burn_flex::Flex;

    use super::super::testing::{Ad, assert_same_gradients, close, random};

    #[test]
    fn softmax_with_broadcast_bias_terms_matches_the_generic_formula_values_and_gradients() {
        // Scores [B, H, Lq, Lk], a position-bias-like term [1, H, Lq, Lk] read through a
        // permuted (strided) layout, and a padding-mask-like term [B, 1, 1, Lk].
        let scores: Tensor<Flex, 4> = random([2, 3, 5, 37]);
        let position: Tensor<Flex, 3> = random([5, 37, 3]);
        let mask = Tensor::<Flex, 4>::from_data(
            TensorData::new(
                (0..2 * 37)
                    .map(|i| {
                        if i % 37 > 30 && i >= 37 {
                            -1.0e9f32
                        } else {
                            0.0
                        }
                    })
                    .collect::<Vec<_>>(),
                [2, 1, 1, 37],
            ),
            &Default::default(),
        );
        let position4 = position.clone().permute([2, 0, 1]).unsqueeze::<4>();
        let fused = super::softmax_with_bias(scores.clone(), &[position4.clone(), mask.clone()])
            .expect("flex takes the fused path");
        let generic = softmax(scores.clone() + position4.clone() + mask.clone(), 3);
        close(fused.into_data(), generic.into_data());

        let mask = Tensor::<Ad, 4>::from_data(mask.to_data(), &Default::default());
        let with_position = |p: &Tensor<Ad, 3>| p.clone().permute([2, 0, 1]).unsqueeze::<4>();
        assert_same_gradients(
            &scores,
            &position,
            [2, 3, 5, 37],
            |s, p| super::softmax_with_bias(s.clone(), &[with_position(p), mask.clone()]).ok(),
            |s, p| softmax(s + with_position(&p) + mask.clone(), 3),
        );
    }
}
