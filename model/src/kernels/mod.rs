//! Fused CPU kernels for burn-flex, for inference and for training.
//!
//! Owns: single-pass, multi-threaded versions of the T5 element-wise hot spots (RMS norm,
//! gated gelu_new, attention bias + softmax, dropout, the attention-head swap, the token
//! cross-entropy, the embedding lookup, AdamW's update, the gradient norm) and the matrix
//! products of the linear layers and of attention, on the CPU backend ([`crate::backend::Cpu`])
//! and its autodiff wrappers ([`crate::backend::CpuTrain`],
//! [`crate::backend::CpuTrainCheckpointed`]), f32 only. burn-flex runs each element-wise tensor
//! op as its own scalar, single-threaded pass through memory (gelu_new alone is eight passes with
//! libm `powf` and `tanh`, and autodiff adds a backward pass per op), zero-fills and then copies
//! every matrix product's output on the calling thread, and builds an embedding's gradient in
//! three single-threaded passes over the whole table. Each training op here has its backward
//! written out as one pass too. Must not touch model structure or the generic path: the callers
//! in [`crate::t5`], [`crate::score`] and [`crate::optim`] own both.
//!
//! One file per kernel, its tests next to it; the vectorized loops they share are in `simd`,
//! and the choice of backend is made in one place, `dispatch`. Every kernel returns `None` (or
//! its inputs back) unless the backend is one of the CPU ones and the data is f32; the caller
//! then runs the generic composition of tensor ops, which is the path of every other backend
//! (CUDA) and dtype. Both paths are checked against the HF reference fixtures and against each
//! other (`MESHTUNE_GENERIC_KERNELS=1` turns the kernels off).

mod adamw;
mod dispatch;
mod dropout;
mod embedding;
mod gelu;
mod matmul;
mod rms_norm;
mod simd;
mod softmax;
mod sum_of_squares;
mod swap_heads;
#[cfg(test)]
mod testing;
mod token_nll;

pub(crate) use adamw::{AdamWInput, AdamWScalars, adamw};
pub(crate) use dispatch::fused;
pub(crate) use dropout::dropout;
pub(crate) use embedding::embedding;
pub(crate) use gelu::gelu_new_gated;
pub(crate) use matmul::matmul;
pub(crate) use rms_norm::rms_norm;
pub(crate) use softmax::softmax_with_bias;
pub(crate) use sum_of_squares::sum_of_squares;
pub(crate) use swap_heads::swap_heads;
pub(crate) use token_nll::token_nll;

use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::Ops;
use burn::tensor::backend::Backend;
use burn::tensor::{Bytes, DType, Int, Shape, Tensor};
use burn_flex::{Flex, FlexTensor, Layout};
use rayon::prelude::*;

fn new_flex(data: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(data),
        Layout::contiguous(shape),
        DType::F32,
    )
}

/// `t` contiguous, as the only handle on its buffer when it already was contiguous and
/// unshared: `to_contiguous` of a contiguous tensor is a second handle on the same buffer, so
/// the first is dropped here and a later `storage_mut` writes in place instead of copying.
fn into_contiguous(t: FlexTensor) -> FlexTensor {
    let contiguous = t.to_contiguous();
    drop(t);
    contiguous
}

fn shape_of(t: &FlexTensor) -> Shape {
    t.layout().shape().clone()
}

/// Rows per rayon task: enough work per task to amortize scheduling.
fn rows_per_task(row_len: usize) -> usize {
    (16 * 1024 / row_len.max(1)).max(1)
}

/// Elements per rayon task of an element-wise kernel.
const CHUNK: usize = 16 * 1024;

/// `f` over matching chunks of `a` and `b` (of one shape) into a new tensor of that shape, the
/// chunks in parallel.
fn map_pair(
    a: &FlexTensor,
    b: &FlexTensor,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Send + Sync,
) -> FlexTensor {
    let a = a.to_contiguous();
    let b = b.to_contiguous();
    let x: &[f32] = a.storage();
    let y: &[f32] = b.storage();
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
        .for_each(|(o, (x, y))| f(x, y, o));
    new_flex(out, shape_of(&a))
}

/// The backward pass of a two-input op that keeps its inputs: `gradients(a, b, grad)` gives
/// both inputs' gradients, and each is registered where its parent requires one.
fn backward_pair(
    ops: Ops<(FlexTensor, FlexTensor), 2>,
    grads: &mut Gradients,
    gradients: impl FnOnce(&FlexTensor, &FlexTensor, &FlexTensor) -> (FlexTensor, FlexTensor),
) {
    let (a, b) = ops.state;
    let grad = grads.consume::<Flex>(&ops.node);
    let (grad_a, grad_b) = gradients(&a, &b, &grad);
    let [node_a, node_b] = ops.parents;
    if let Some(node) = node_a {
        grads.register::<Flex>(node.id, grad_a);
    }
    if let Some(node) = node_b {
        grads.register::<Flex>(node.id, grad_b);
    }
}

/// The values of an id or label tensor on the host, row-major (called only for the CPU
/// backends, where this is a read of their own memory rather than a device sync).
fn host_ints<B: Backend>(t: &Tensor<B, 2, Int>) -> Option<Vec<i64>> {
    t.clone()
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .ok()
}
