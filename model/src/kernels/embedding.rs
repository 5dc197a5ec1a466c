//! The embedding lookup: rows of the table gathered in parallel, and the table's gradient in
//! one parallel pass over it.
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

/// Rows `ids` of `weight` (`[V, d]`) as `[B, L, d]`; `None` when an id is outside `0..V`.
fn forward(weight: &FlexTensor, ids: &[usize], [batch, len]: [usize; 2]) -> Option<FlexTensor> {
    let dims = shape_of(weight).to_vec();
    let &[vocab, d] = dims.as_slice() else {
        return None;
    };
    if ids.len() != batch * len || ids.iter().any(|&id| id >= vocab) || d == 0 {
        return None;
    }
    let weight = weight.to_contiguous();
    let table: &[f32] = weight.storage();
    let mut out = vec![0.0f32; ids.len() * d];
    let rows = rows_per_task(d);
    out.par_chunks_mut(rows * d)
        .zip(ids.par_chunks(rows))
        .for_each(|(out, ids)| {
            for (row, &id) in out.chunks_exact_mut(d).zip(ids) {
                row.copy_from_slice(&table[id * d..(id + 1) * d]);
            }
        });
    Some(new_flex(out, Shape::new([batch, len, d])))
}

/// Gradient of [`forward`] with respect to the table: `grad`'s rows summed into the rows of
/// their ids, in the order of the positions. One multi-threaded pass over `[V, d]` (each task
/// zeroes its block of rows and adds the positions whose ids fall in it), where burn-flex's
/// zeroes, copies and scatters the whole table in three single-threaded passes.
fn backward(ids: &[usize], vocab: usize, grad: &FlexTensor) -> FlexTensor {
    let grad = grad.to_contiguous();
    let g: &[f32] = grad.storage();
    let d = g.len() / ids.len().max(1);
    // Positions sorted by id (stable: same-id positions stay in order).
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i]);
    let mut out = vec![0.0f32; vocab * d];
    let rows = rows_per_task(d).max(vocab.div_ceil(4 * rayon::current_num_threads()));
    out.par_chunks_mut(rows * d)
        .enumerate()
        .for_each(|(block, out)| {
            let first = block * rows;
            let start = order.partition_point(|&i| ids[i] < first);
            let end = order.partition_point(|&i| ids[i] < first + rows);
            for &i in &order[start..end] {
                let row = &mut out[(ids[i] - first) * d..(ids[i] - first + 1) * d];
                simd::add_in_place(row, &g[i * d..(i + 1) * d]);
            }
        });
    new_flex(out, Shape::new([vocab, d]))
}

#[derive(Debug)]
struct EmbeddingOp;

impl Backward<Flex, 1> for EmbeddingOp {
    /// The ids and the vocabulary size.
    type State = (Vec<usize>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (ids, vocab) = ops.state;
        let [node] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node {
            grads.register::<Flex>(node.id, backward(&ids, vocab, &grad));
        }
    }
}

/// burn's `embedding(weight, ids)`: rows of `weight` (`[V, d]`) gathered as `[B, L, d]`, and in
/// training the table's gradient in one multi-threaded pass. `None` (the generic path) unless
/// the backend is a CPU one and every id is in the table.
pub(crate) fn embedding<B: Backend>(
    weight: &Tensor<B, 2>,
    ids: &Tensor<B, 2, Int>,
) -> Option<Tensor<B, 3>> {
    let cpu = dispatch::cpu::<B>()?;
    let shape = ids.dims();
    let host: Vec<usize> = host_ints(ids)?
        .into_iter()
        .map(|id| usize::try_from(id).ok())
        .collect::<Option<_>>()?;
    match cpu {
        Cpu::Inference(flex) => Some(flex.wrap(forward(&flex.f32(weight)?, &host, shape)?)),
        Cpu::Training(ad) => {
            let weight = ad.f32(weight)?;
            let out = forward(&weight.primitive, &host, shape)?;
            let vocab = shape_of(&weight.primitive)[0];
            Some(ad.record(EmbeddingOp, [weight], |_| (host, vocab), out))
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::module::embedding;
    use burn::tensor::{Int, Tensor, TensorData};
    use burn_flex::Flex;

    use super::super::testing::{Ad, close, random};

    /// The embedding kernel against burn's `embedding`: values, and the table's gradient with
    /// repeated ids, ids in every block of rows the backward splits the table into, and an id
    /// outside the table (generic path).
    #[test]
    fn embedding_matches_burn_values_and_gradients() {
        // 1031 rows of 64 are split into blocks of 256 rows (`rows_per_task(64)`).
        let (vocab, d) = (1031, 64);
        let table: Tensor<Flex, 2> = random([vocab, d]);
        let ids: Vec<i64> = vec![0, 5, 5, 1030, 600, 5, 1029, 0, 255, 256, 5, 800];
        let id_tensor = |values: &[i64]| {
            Tensor::<Flex, 2, Int>::from_data(
                TensorData::new(values.to_vec(), [3, 4]),
                &Default::default(),
            )
        };
        let fused = super::embedding(&table, &id_tensor(&ids)).expect("flex takes the kernel");
        close(
            fused.into_data(),
            embedding(table.clone(), id_tensor(&ids)).into_data(),
        );

        let upstream: Tensor<Ad, 3> = random([3, 4, d]);
        let grad_of = |fused: bool| {
            let w: Tensor<Ad, 2> =
                Tensor::from_data(table.clone().into_data(), &Default::default()).require_grad();
            let ids = Tensor::<Ad, 2, Int>::from_data(
                TensorData::new(ids.clone(), [3, 4]),
                &Default::default(),
            );
            let out = if fused {
                super::embedding(&w, &ids).expect("autodiff takes the kernel")
            } else {
                embedding(w.clone(), ids)
            };
            let grads = (out * upstream.clone()).sum().backward();
            w.grad(&grads).expect("gradient").into_data()
        };
        close(grad_of(true), grad_of(false));
        let mut outside = ids.clone();
        outside[3] = vocab as i64;
        assert!(super::embedding(&table, &id_tensor(&outside)).is_none());
    }
}
