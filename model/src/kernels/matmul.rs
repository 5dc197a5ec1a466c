//! Matrix products of the linear layers and of attention through `gemm`, writing the output
//! once and in parallel, and their backward as two more such products.
//!
//! Owns: this kernel's forward and backward passes and its autodiff op. Must not choose the
//! backend (`dispatch` does) or hold loops another kernel shares (`simd` has them).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Tensor};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::dispatch;
use super::{new_flex, shape_of};

/// burn-flex's size from which one product is split over threads.
const PARALLEL_PRODUCT: usize = 192 * 192 * 192;

/// An f32 tensor of 2 (`[m, k]`) or 4 (`[b, h, m, k]`) dimensions, read in place as a batch of
/// strided matrices (a transposed view needs no copy).
#[derive(Clone)]
struct Operand {
    tensor: FlexTensor,
    offset: usize,
    /// `None` for a single matrix, `Some([b, h])` for a batch.
    lead: Option<[usize; 2]>,
    lead_strides: [isize; 2],
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl Operand {
    fn of(t: &FlexTensor) -> Option<Self> {
        if t.dtype() != DType::F32 {
            return None;
        }
        let t = if t.layout().strides().iter().all(|&s| s >= 0) {
            t.clone()
        } else {
            t.to_contiguous()
        };
        let dims = shape_of(&t).to_vec();
        let strides = t.layout().strides().to_vec();
        let (lead, lead_strides, rows, cols, row_stride, col_stride) = match *dims.as_slice() {
            [rows, cols] => (None, [0, 0], rows, cols, strides[0], strides[1]),
            [b, h, rows, cols] => (
                Some([b, h]),
                [strides[0], strides[1]],
                rows,
                cols,
                strides[2],
                strides[3],
            ),
            _ => return None,
        };
        Some(Self {
            offset: t.layout().start_offset(),
            tensor: t,
            lead,
            lead_strides,
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// The transpose of every matrix (a view).
    fn transposed(mut self) -> Self {
        std::mem::swap(&mut self.rows, &mut self.cols);
        std::mem::swap(&mut self.row_stride, &mut self.col_stride);
        self
    }

    fn count(&self) -> usize {
        self.lead.map_or(1, |[b, h]| b * h)
    }

    /// The first element of matrix `index` (row-major over the batch dimensions).
    fn matrix(&self, index: usize) -> *const f32 {
        let data: &[f32] = self.tensor.storage();
        let (b, h) = match self.lead {
            Some([_, heads]) => (index / heads, index % heads),
            None => (0, 0),
        };
        let at = self.offset as isize
            + b as isize * self.lead_strides[0]
            + h as isize * self.lead_strides[1];
        data[at as usize..].as_ptr()
    }
}

/// The output buffer of [`product`], shared by the rayon tasks that each write their own part.
///
/// SAFETY: `Send` and `Sync` because the tasks never write the same element (each covers its
/// own columns of its own matrix, see [`product`]) and nothing reads the buffer until every
/// task has finished; the pointer stays valid because the `Vec` it points into outlives the
/// parallel section and is not touched meanwhile.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

// SAFETY: see the type's documentation: disjoint writes only, no reads, the buffer outlives
// every task.
unsafe impl Send for SendPtr {}
// SAFETY: as for `Send`.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer, `offset` elements on.
    ///
    /// SAFETY: `offset` must stay inside the buffer's allocation.
    unsafe fn add(self, offset: usize) -> *mut f32 {
        // SAFETY: the caller keeps `offset` inside the allocation.
        unsafe { self.0.add(offset) }
    }
}

/// `a b` for every matrix of the batch, into a new contiguous tensor. burn-flex's product
/// zero-fills its output and then copies it once more to re-align it, two single-threaded
/// passes over every output while the other cores wait; here gemm writes the output directly.
/// `None` when the shapes do not fit.
fn product(a: &Operand, b: &Operand) -> Option<FlexTensor> {
    if a.cols != b.rows || a.lead != b.lead {
        return None;
    }
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let count = a.count();
    let size = m * n;
    let total = count.checked_mul(size)?;
    let shape = match a.lead {
        None => Shape::new([m, n]),
        Some([b, h]) => Shape::new([b, h, m, n]),
    };
    if total == 0 || k == 0 {
        return Some(new_flex(vec![0.0; total], shape));
    }
    let mut out = Vec::<f32>::with_capacity(total);
    let base = SendPtr(out.as_mut_ptr());
    // Columns `columns` of matrix `index`.
    let part = |index: usize, columns: std::ops::Range<usize>, parallelism: gemm::Parallelism| {
        // SAFETY: the output pointer is inside `out`'s allocation (`count * m * n` elements),
        // each call writes only its own columns of its own matrix, and gemm with `read_dst =
        // false` writes every element it covers without reading any; the inputs are in bounds
        // of their tensors' buffers by their shapes and strides.
        unsafe {
            gemm::gemm(
                m,
                columns.len(),
                k,
                base.add(index * size + columns.start),
                1,
                n as isize,
                false,
                a.matrix(index),
                a.col_stride,
                a.row_stride,
                b.matrix(index)
                    .offset(columns.start as isize * b.col_stride),
                b.col_stride,
                b.row_stride,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                parallelism,
            );
        }
    };
    let one = |index: usize, parallelism: gemm::Parallelism| part(index, 0..n, parallelism);
    let ops = m.saturating_mul(n).saturating_mul(k);
    let threads = rayon::current_num_threads();
    if count == 1 && ops >= PARALLEL_PRODUCT && b.col_stride != 1 && threads > 1 {
        // gemm first repacks the right operand when its columns are strided (a transposed
        // weight: the input gradient of a linear layer), on the calling thread while the other
        // threads wait. Each thread takes a block of columns instead, packing its own.
        let block = n.div_ceil(threads).next_multiple_of(16);
        (0..n.div_ceil(block)).into_par_iter().for_each(|j| {
            part(
                0,
                j * block..((j + 1) * block).min(n),
                gemm::Parallelism::None,
            )
        });
    } else if count == 1 || ops >= PARALLEL_PRODUCT {
        let parallelism = if ops >= PARALLEL_PRODUCT {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
        (0..count).for_each(|index| one(index, parallelism));
    } else {
        (0..count)
            .into_par_iter()
            .for_each(|index| one(index, gemm::Parallelism::None));
    }
    // SAFETY: every one of the `total` elements was written above.
    unsafe { out.set_len(total) };
    Some(new_flex(out, shape))
}

#[derive(Debug)]
struct ProductOp;

impl Backward<Flex, 2> for ProductOp {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (a, b) = ops.state;
        let [node_a, node_b] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let operand = |t: &FlexTensor| Operand::of(t).expect("checked in forward");
        let g = operand(&grad);
        if let Some(node) = node_a {
            let grad_a = product(&g, &operand(&b).transposed()).expect("shapes of the forward");
            grads.register::<Flex>(node.id, grad_a);
        }
        if let Some(node) = node_b {
            let b = operand(&b);
            let grad_b = if b.row_stride == 1 && b.col_stride != 1 {
                // `b` is a transposed view (the keys of `q k^T`): its gradient is the same view
                // of a contiguous `g^T a`, so that what flows back through the transpose is
                // contiguous instead of a view that the next op copies element by element.
                let t = product(&g.transposed(), &operand(&a)).expect("shapes of the forward");
                let dims = shape_of(&t).num_dims();
                t.transpose(dims - 2, dims - 1)
            } else {
                product(&operand(&a).transposed(), &g).expect("shapes of the forward")
            };
            grads.register::<Flex>(node.id, grad_b);
        }
    }
}

/// `a b` of two f32 matrices (`[m, k] x [k, n]`) or two batches of them with the same leading
/// dimensions (`[b, h, m, k] x [b, h, k, n]`), transposed views read in place, and its
/// backward as two more such products. For the linear layers and the attention products.
pub(crate) fn matmul<B: Backend, const D: usize>(
    a: &Tensor<B, D>,
    b: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    dispatch::binary(a, b, ProductOp, |a, b| {
        product(&Operand::of(a)?, &Operand::of(b)?)
    })
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use burn_flex::Flex;

    use super::super::testing::{assert_same_gradients, close, random};

    /// The products against burn's `matmul`: values and both gradients, for plain matrices, a
    /// transposed view, a batch of attention-shaped matrices with a swapped (strided) operand,
    /// and shapes that do not fit (generic path).
    #[test]
    fn matmul_matches_burn_values_and_gradients() {
        let a: Tensor<Flex, 2> = random([7, 33]);
        let b: Tensor<Flex, 2> = random([33, 19]);
        let fused = super::matmul(&a, &b).expect("flex takes the kernel");
        close(fused.into_data(), a.clone().matmul(b.clone()).into_data());
        let bt: Tensor<Flex, 2> = random([19, 33]);
        let fused = super::matmul(&a, &bt.clone().transpose()).expect("a view");
        close(
            fused.into_data(),
            a.clone().matmul(bt.transpose()).into_data(),
        );
        assert_same_gradients(&a, &b, [7, 19], super::matmul, |a, b| a.matmul(b));
        // Large enough to be split over threads.
        let big_a: Tensor<Flex, 2> = random([200, 190]);
        let big_b: Tensor<Flex, 2> = random([190, 210]);
        close(
            super::matmul(&big_a, &big_b).expect("kernel").into_data(),
            big_a.clone().matmul(big_b.clone()).into_data(),
        );

        let q: Tensor<Flex, 4> = random([2, 3, 5, 8]);
        let k: Tensor<Flex, 4> = random([2, 3, 6, 8]);
        let scores = super::matmul(&q, &k.clone().swap_dims(2, 3)).expect("kernel");
        assert_eq!(scores.dims(), [2, 3, 5, 6]);
        close(
            scores.into_data(),
            q.clone().matmul(k.clone().swap_dims(2, 3)).into_data(),
        );
        assert_same_gradients(
            &q,
            &k,
            [2, 3, 5, 6],
            |q, k| super::matmul(q, &k.clone().swap_dims(2, 3)),
            |q, k| q.matmul(k.swap_dims(2, 3)),
        );
        assert!(super::matmul(&a, &a).is_none(), "inner dimensions differ");
        let broadcast: Tensor<Flex, 4> = random([1, 3, 8, 6]);
        assert!(
            super::matmul(&q, &broadcast).is_none(),
            "batch dimensions differ"
        );
    }
}
