//! The attention-head swap: dims 1 and 2 of a 4-D tensor swapped and written out contiguous,
//! row by row.
//!
//! Owns: this kernel's forward and backward passes and its autodiff op. Must not choose the
//! backend (`dispatch` does) or hold loops another kernel shares (`simd` has them).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::backend::Backend;
use burn::tensor::{Shape, Tensor};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::dispatch::{self, Cpu};
use super::{new_flex, rows_per_task, shape_of};

/// `x.swap_dims(1, 2)` of a 4-D tensor `[B, A, C, D]`, as a contiguous `[B, C, A, D]` built
/// from whole rows of `D`. burn-flex leaves a swap as a view and copies it one element at a
/// time (its strided iterator) when a reshape needs it contiguous: merging attention heads,
/// and in backward the gradients of every head split.
fn forward(x: &FlexTensor) -> Option<FlexTensor> {
    let dims = shape_of(x).to_vec();
    let &[b, a, c, d] = dims.as_slice() else {
        return None;
    };
    let strided = x.layout().strides().iter().all(|s| *s >= 0) && x.layout().strides()[3] == 1;
    let x = if strided {
        x.clone()
    } else {
        x.to_contiguous()
    };
    let strides: Vec<usize> = x.layout().strides().iter().map(|s| *s as usize).collect();
    let start = x.layout().start_offset();
    let src: &[f32] = x.storage();
    let mut out = vec![0.0f32; b * a * c * d];
    let block = (a * d).max(1);
    out.par_chunks_mut(block)
        .enumerate()
        .with_min_len(rows_per_task(block))
        .for_each(|(bc, rows)| {
            let (bi, ci) = (bc / c.max(1), bc % c.max(1));
            for (ai, row) in rows.chunks_mut(d.max(1)).enumerate() {
                let at = start + bi * strides[0] + ai * strides[1] + ci * strides[2];
                row.copy_from_slice(&src[at..at + row.len()]);
            }
        });
    Some(new_flex(out, Shape::from(vec![b, c, a, d])))
}

#[derive(Debug)]
struct Swap12Op;

impl Backward<Flex, 1> for Swap12Op {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node {
            let back = forward(&grad).unwrap_or_else(|| {
                <Flex as burn::tensor::ops::FloatTensorOps<Flex>>::float_swap_dims(grad, 1, 2)
            });
            grads.register::<Flex>(node.id, back);
        }
    }
}

/// `x.swap_dims(1, 2)` written out contiguous, on the CPU backends (`None` elsewhere: the
/// caller swaps). `training_only`: leave inference to the view (its matrix products read
/// strided operands), for a split whose only cost is in backward.
pub(crate) fn swap_heads<B: Backend>(
    x: &Tensor<B, 4>,
    training_only: bool,
) -> Option<Tensor<B, 4>> {
    match dispatch::cpu::<B>()? {
        Cpu::Inference(_) if training_only => None,
        Cpu::Inference(flex) => Some(flex.wrap(forward(&flex.f32(x)?)?)),
        Cpu::Training(ad) => {
            let x = ad.f32(x)?;
            let out = forward(&x.primitive)?;
            Some(ad.record(Swap12Op, [x], |_| (), out))
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use burn_flex::Flex;

    use super::super::testing::{assert_same_gradients, random};

    /// The head swap: the same values as `swap_dims(1, 2)` on contiguous and strided inputs
    /// (and after a fallback copy when the last dimension is strided), and the same gradients.
    #[test]
    fn swap_heads_matches_swap_dims_values_and_gradients() {
        let x: Tensor<Flex, 4> = random([2, 3, 5, 4]);
        let fused = super::swap_heads(&x, false).expect("flex takes the kernel");
        assert_eq!(fused.dims(), [2, 5, 3, 4]);
        assert_eq!(
            fused.into_data(),
            x.clone().swap_dims(1, 2).into_data(),
            "contiguous input"
        );
        // A strided input (itself a swap): back to the original, exactly.
        let swapped = x.clone().swap_dims(1, 2);
        let back = super::swap_heads(&swapped, false).expect("kernel");
        assert_eq!(back.into_data(), x.clone().into_data(), "strided input");
        // A transposed last dimension falls back to a contiguous copy first.
        let last = x.clone().swap_dims(2, 3);
        assert_eq!(
            super::swap_heads(&last, false).expect("kernel").into_data(),
            last.clone().swap_dims(1, 2).into_data()
        );
        // Inference leaves a split to the view when asked to.
        assert!(super::swap_heads(&x, true).is_none());
        // Gradients, with a second input so the harness has two.
        let w: Tensor<Flex, 4> = random([2, 5, 3, 4]);
        assert_same_gradients(
            &x,
            &w,
            [2, 5, 3, 4],
            |x, w| super::swap_heads(x, true).map(|y| y * w.clone()),
            |x, w| x.swap_dims(1, 2) * w,
        );
    }
}
