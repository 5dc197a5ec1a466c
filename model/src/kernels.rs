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
//! three single-threaded passes over the whole table; with two cores, one of them waited through
//! all of that. Each training op here has its backward written out as one pass too.
//!
//! Every function returns `None` unless the backend is one of those and the data is f32. The
//! callers in [`crate::t5`] then run the generic composition of tensor ops, which is the path of
//! every other backend (CUDA) and dtype. Both paths are checked against the HF reference
//! fixtures and against each other (`MESHTUNE_GENERIC_KERNELS=1` turns the kernels off).

use std::any::{Any, TypeId};

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, broadcast_shape};
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{Bytes, DType, Int, Shape, Tensor, TensorPrimitive};
use burn_flex::{Flex, FlexTensor, Layout};
use rayon::prelude::*;

/// The autodiff tensor of the CPU training backends (the same type for both strategies).
type AdTensor = <Autodiff<Flex> as BackendTypes>::FloatTensorPrimitive;

/// Which backend a tensor's primitive belongs to, as far as these kernels care.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Flex,
    Autodiff,
    Checkpointed,
}

/// Set `MESHTUNE_GENERIC_KERNELS=1` to run the generic tensor-op composition on CPU too (for
/// benchmarks and tests comparing the two paths).
fn fused_enabled() -> bool {
    use std::sync::OnceLock;
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("MESHTUNE_GENERIC_KERNELS").is_none())
}

fn kind<B: Backend>() -> Option<Kind> {
    if !fused_enabled() {
        return None;
    }
    let id = TypeId::of::<B>();
    if id == TypeId::of::<Flex>() {
        Some(Kind::Flex)
    } else if id == TypeId::of::<Autodiff<Flex, NoCheckpointing>>() {
        Some(Kind::Autodiff)
    } else if id == TypeId::of::<Autodiff<Flex, BalancedCheckpointing>>() {
        Some(Kind::Checkpointed)
    } else {
        None
    }
}

/// Whether the fused kernels run for backend `B`.
pub(crate) fn fused<B: Backend>() -> bool {
    kind::<B>().is_some()
}

/// `B`'s float primitive as the concrete type `T`, when `B`'s primitive is `T`.
fn downcast<B: Backend, T: 'static, const D: usize>(t: &Tensor<B, D>) -> Option<T> {
    let primitive: B::FloatTensorPrimitive = t.clone().into_primitive().tensor();
    let boxed: Box<dyn Any> = Box::new(primitive);
    boxed.downcast::<T>().ok().map(|b| *b)
}

/// Wraps a concrete primitive back into `Tensor<B, D>`; `None` unless `T` is `B`'s primitive.
fn upcast<B: Backend, T: 'static, const D: usize>(primitive: T) -> Option<Tensor<B, D>> {
    let boxed: Box<dyn Any> = Box::new(primitive);
    let primitive = *boxed.downcast::<B::FloatTensorPrimitive>().ok()?;
    Some(Tensor::from_primitive(TensorPrimitive::Float(primitive)))
}

/// The burn-flex tensor behind `t`, when `B` is burn-flex and `t` holds f32.
fn as_flex<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<FlexTensor> {
    (kind::<B>()? == Kind::Flex).then_some(())?;
    let flex: FlexTensor = downcast(t)?;
    (flex.dtype() == DType::F32).then_some(flex)
}

/// The autodiff tensor behind `t`, when `B` is a CPU training backend and `t` holds f32.
fn as_autodiff<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<AdTensor> {
    (kind::<B>()? != Kind::Flex).then_some(())?;
    let tensor: AdTensor = downcast(t)?;
    (tensor.primitive.dtype() == DType::F32).then_some(tensor)
}

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

// ---------------------------------------------------------------------------------------------
// RMS norm
// ---------------------------------------------------------------------------------------------

/// `weight * x / sqrt(mean(x^2) + eps)` over the last dimension of `x`.
fn rms_norm_forward(x: &FlexTensor, weight: &FlexTensor, eps: f32) -> Option<FlexTensor> {
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

/// Gradients of [`rms_norm_forward`] with respect to `x` and `weight`.
fn rms_norm_backward(
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
        let (x, weight) = ops.state;
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (grad_x, grad_w) = rms_norm_backward(&x, &weight, self.eps, &grad);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, grad_x);
        }
        if let Some(node) = node_w {
            grads.register::<Flex>(node.id, grad_w);
        }
    }
}

fn rms_norm_autodiff<C: CheckpointStrategy>(
    x: AdTensor,
    weight: AdTensor,
    eps: f32,
) -> Option<AdTensor> {
    let out = rms_norm_forward(&x.primitive, &weight.primitive, eps)?;
    Some(record_binary::<C, _>(RmsNormOp { eps }, x, weight, out))
}

/// Records `out = op(a, b)` in the autodiff graph, keeping both inputs for the backward pass.
fn record_binary<C, O>(op: O, a: AdTensor, b: AdTensor, out: FlexTensor) -> AdTensor
where
    C: CheckpointStrategy,
    O: Backward<Flex, 2, State = (FlexTensor, FlexTensor)>,
{
    match op
        .prepare::<C>([a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((a.primitive, b.primitive), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
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
    match kind::<B>()? {
        Kind::Flex => upcast(rms_norm_forward(&as_flex(x)?, &as_flex(weight)?, eps)?),
        Kind::Autodiff => upcast(rms_norm_autodiff::<NoCheckpointing>(
            as_autodiff(x)?,
            as_autodiff(weight)?,
            eps,
        )?),
        Kind::Checkpointed => upcast(rms_norm_autodiff::<BalancedCheckpointing>(
            as_autodiff(x)?,
            as_autodiff(weight)?,
            eps,
        )?),
    }
}

// ---------------------------------------------------------------------------------------------
// Gated gelu_new
// ---------------------------------------------------------------------------------------------

fn same_shape(a: &FlexTensor, b: &FlexTensor) -> bool {
    a.layout().shape() == b.layout().shape()
}

/// `gelu_new(a) * gate`.
fn gelu_gated_forward(a: &FlexTensor, gate: &FlexTensor) -> Option<FlexTensor> {
    if !same_shape(a, gate) {
        return None;
    }
    let a = a.to_contiguous();
    let gate = gate.to_contiguous();
    let src: &[f32] = a.storage();
    let g: &[f32] = gate.storage();
    let mut out = vec![0.0f32; src.len()];
    out.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(o, (a, g))| simd::gelu_gated(a, g, o));
    Some(new_flex(out, shape_of(&a)))
}

/// Gradients of [`gelu_gated_forward`] with respect to `a` and `gate`.
fn gelu_gated_backward(
    a: &FlexTensor,
    gate: &FlexTensor,
    grad: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
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
        let (a, gate) = ops.state;
        let [node_a, node_gate] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (grad_a, grad_gate) = gelu_gated_backward(&a, &gate, &grad);
        if let Some(node) = node_a {
            grads.register::<Flex>(node.id, grad_a);
        }
        if let Some(node) = node_gate {
            grads.register::<Flex>(node.id, grad_gate);
        }
    }
}

fn gelu_gated_autodiff<C: CheckpointStrategy>(a: AdTensor, gate: AdTensor) -> Option<AdTensor> {
    let out = gelu_gated_forward(&a.primitive, &gate.primitive)?;
    Some(record_binary::<C, _>(GeluGatedOp, a, gate, out))
}

/// `gelu_new(a) * gate` (FLAN-T5's gated-gelu), one pass (and one pass back when training).
pub(crate) fn gelu_new_gated<B: Backend>(
    a: &Tensor<B, 3>,
    gate: &Tensor<B, 3>,
) -> Option<Tensor<B, 3>> {
    match kind::<B>()? {
        Kind::Flex => upcast(gelu_gated_forward(&as_flex(a)?, &as_flex(gate)?)?),
        Kind::Autodiff => upcast(gelu_gated_autodiff::<NoCheckpointing>(
            as_autodiff(a)?,
            as_autodiff(gate)?,
        )?),
        Kind::Checkpointed => upcast(gelu_gated_autodiff::<BalancedCheckpointing>(
            as_autodiff(a)?,
            as_autodiff(gate)?,
        )?),
    }
}

// ---------------------------------------------------------------------------------------------
// Attention: bias terms + softmax
// ---------------------------------------------------------------------------------------------

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
fn softmax_bias_forward(scores: &FlexTensor, terms: &[FlexTensor]) -> Option<FlexTensor> {
    let terms = bias_terms(scores, terms)?;
    Some(softmax_bias_in_place(scores.to_contiguous(), &terms))
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
fn softmax_bias_in_place(scores: FlexTensor, terms: &[BiasTerm]) -> FlexTensor {
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
fn softmax_backward(p: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
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
        let grad_scores = softmax_backward(&probs, &grad);
        for (node, shape) in ops.parents.into_iter().zip(&shapes) {
            if let Some(node) = node {
                grads
                    .register::<Flex>(node.id, broadcast_shape::<Flex>(grad_scores.clone(), shape));
            }
        }
    }
}

fn softmax_bias_autodiff<C: CheckpointStrategy, const N: usize>(
    inputs: [AdTensor; N],
) -> Option<AdTensor> {
    let (scores, terms) = inputs.split_first()?;
    let term_data: Vec<FlexTensor> = terms.iter().map(|t| t.primitive.clone()).collect();
    let out = softmax_bias_forward(&scores.primitive, &term_data)?;
    let shapes = inputs.iter().map(|t| shape_of(&t.primitive)).collect();
    let nodes = inputs.map(|t| t.node.clone());
    Some(
        match SoftmaxBiasOp.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((out.clone(), shapes), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        },
    )
}

fn softmax_bias_training<C: CheckpointStrategy, B: Backend>(
    scores: &Tensor<B, 4>,
    terms: &[Tensor<B, 4>],
) -> Option<AdTensor> {
    let scores = as_autodiff(scores)?;
    let terms = terms.iter().map(as_autodiff).collect::<Option<Vec<_>>>()?;
    match terms.len() {
        1 => {
            let [t0]: [AdTensor; 1] = terms.try_into().ok()?;
            softmax_bias_autodiff::<C, 2>([scores, t0])
        }
        2 => {
            let [t0, t1]: [AdTensor; 2] = terms.try_into().ok()?;
            softmax_bias_autodiff::<C, 3>([scores, t0, t1])
        }
        _ => None,
    }
}

/// `softmax(scores + sum(terms))` over the last dimension, `scores` `[B, H, Lq, Lk]` and each
/// term broadcastable to it and read in place, never materialized at that size: one fused,
/// multi-threaded pass (and one pass back when training, where the gradient of a broadcast term
/// is summed over its broadcast dimensions).
pub(crate) fn softmax_with_bias<B: Backend>(
    scores: Tensor<B, 4>,
    terms: &[Tensor<B, 4>],
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let fused = match kind::<B>() {
        None => None,
        Some(Kind::Flex) => {
            // Inference: the scores are this call's own, so the softmax overwrites them.
            let flex_terms = terms.iter().map(as_flex).collect::<Option<Vec<_>>>();
            let prepared = flex_terms.and_then(|t| Some((as_flex(&scores)?, t)));
            match prepared.and_then(|(flex, t)| bias_terms(&flex, &t)) {
                Some(bias) => {
                    let owned = take_flex(scores)?;
                    return Ok(upcast(softmax_bias_in_place(owned, &bias)).expect("B is burn-flex"));
                }
                None => None,
            }
        }
        Some(Kind::Autodiff) => softmax_bias_training::<NoCheckpointing, B>(&scores, terms),
        Some(Kind::Checkpointed) => {
            softmax_bias_training::<BalancedCheckpointing, B>(&scores, terms)
        }
    };
    match fused.and_then(upcast) {
        Some(weights) => Ok(weights),
        None => Err(scores),
    }
}

// ---------------------------------------------------------------------------------------------
// Matrix products
// ---------------------------------------------------------------------------------------------

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
    let base = out.as_mut_ptr() as usize;
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
                (base as *mut f32).add(index * size + columns.start),
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

fn product_autodiff<C: CheckpointStrategy>(a: AdTensor, b: AdTensor) -> Option<AdTensor> {
    let out = product(&Operand::of(&a.primitive)?, &Operand::of(&b.primitive)?)?;
    Some(record_binary::<C, _>(ProductOp, a, b, out))
}

/// `a b` of two f32 matrices (`[m, k] x [k, n]`) or two batches of them with the same leading
/// dimensions (`[b, h, m, k] x [b, h, k, n]`), transposed views read in place, and its
/// backward as two more such products. For the linear layers and the attention products.
pub(crate) fn matmul<B: Backend, const D: usize>(
    a: &Tensor<B, D>,
    b: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    match kind::<B>()? {
        Kind::Flex => upcast(product(
            &Operand::of(&as_flex(a)?)?,
            &Operand::of(&as_flex(b)?)?,
        )?),
        Kind::Autodiff => upcast(product_autodiff::<NoCheckpointing>(
            as_autodiff(a)?,
            as_autodiff(b)?,
        )?),
        Kind::Checkpointed => upcast(product_autodiff::<BalancedCheckpointing>(
            as_autodiff(a)?,
            as_autodiff(b)?,
        )?),
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding lookup
// ---------------------------------------------------------------------------------------------

/// The values of an id or label tensor on the host, row-major (called only for the CPU
/// backends, where this is a read of their own memory rather than a device sync).
fn host_ints<B: Backend>(t: &Tensor<B, 2, Int>) -> Option<Vec<i64>> {
    t.clone()
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .ok()
}

/// Rows `ids` of `weight` (`[V, d]`) as `[B, L, d]`; `None` when an id is outside `0..V`.
fn embedding_forward(
    weight: &FlexTensor,
    ids: &[usize],
    [batch, len]: [usize; 2],
) -> Option<FlexTensor> {
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

/// Gradient of [`embedding_forward`] with respect to the table: `grad`'s rows summed into the
/// rows of their ids, in the order of the positions. One multi-threaded pass over `[V, d]`
/// (each task zeroes its block of rows and adds the positions whose ids fall in it), where
/// burn-flex's zeroes, copies and scatters the whole table in three single-threaded passes.
fn embedding_backward(ids: &[usize], vocab: usize, grad: &FlexTensor) -> FlexTensor {
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
            grads.register::<Flex>(node.id, embedding_backward(&ids, vocab, &grad));
        }
    }
}

fn embedding_autodiff<C: CheckpointStrategy>(
    weight: AdTensor,
    ids: Vec<usize>,
    shape: [usize; 2],
) -> Option<AdTensor> {
    let out = embedding_forward(&weight.primitive, &ids, shape)?;
    let vocab = shape_of(&weight.primitive)[0];
    Some(
        match EmbeddingOp
            .prepare::<C>([weight.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((ids, vocab), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        },
    )
}

/// burn's `embedding(weight, ids)`: rows of `weight` (`[V, d]`) gathered as `[B, L, d]`, and in
/// training the table's gradient in one multi-threaded pass. `None` (the generic path) unless
/// the backend is a CPU one and every id is in the table.
pub(crate) fn embedding<B: Backend>(
    weight: &Tensor<B, 2>,
    ids: &Tensor<B, 2, Int>,
) -> Option<Tensor<B, 3>> {
    let kind = kind::<B>()?;
    let shape = ids.dims();
    let host: Vec<usize> = host_ints(ids)?
        .into_iter()
        .map(|id| usize::try_from(id).ok())
        .collect::<Option<_>>()?;
    match kind {
        Kind::Flex => upcast(embedding_forward(&as_flex(weight)?, &host, shape)?),
        Kind::Autodiff => upcast(embedding_autodiff::<NoCheckpointing>(
            as_autodiff(weight)?,
            host,
            shape,
        )?),
        Kind::Checkpointed => upcast(embedding_autodiff::<BalancedCheckpointing>(
            as_autodiff(weight)?,
            host,
            shape,
        )?),
    }
}

// ---------------------------------------------------------------------------------------------
// Token cross-entropy
// ---------------------------------------------------------------------------------------------

/// Per-token negative log-likelihood of `logits` (`[B, T, V]`) at `labels` (`B * T` of them):
/// `logsumexp(row) - row[label]`, 0 where the label is negative (ignored). Also returns each
/// row's `logsumexp`, what the backward pass needs besides the logits. `None` when the shapes
/// disagree or a label is outside the vocabulary.
fn token_nll_forward(logits: &FlexTensor, labels: &[i64]) -> Option<(FlexTensor, Vec<f32>)> {
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

/// Gradient of [`token_nll_forward`] with respect to the logits: `grad * (softmax(row) -
/// onehot(label))` per row, 0 for ignored rows.
fn token_nll_backward(
    logits: &FlexTensor,
    labels: &[i64],
    lse: &[f32],
    grad: &FlexTensor,
) -> FlexTensor {
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
            grads.register::<Flex>(node.id, token_nll_backward(&logits, &labels, &lse, &grad));
        }
    }
}

fn token_nll_autodiff<C: CheckpointStrategy>(
    logits: AdTensor,
    labels: Vec<i64>,
) -> Option<AdTensor> {
    let (nll, lse) = token_nll_forward(&logits.primitive, &labels)?;
    Some(
        match TokenNllOp
            .prepare::<C>([logits.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((logits.primitive, labels, lse), nll),
            OpsKind::UnTracked(prep) => prep.finish(nll),
        },
    )
}

/// Cross-entropy of every target token, `[B, T]` from logits `[B, T, V]` and `labels` `[B, T]`
/// (negative = ignored, giving 0): log-softmax, gather and their backward in one
/// multi-threaded pass each, without the `[B, T, V]` log-probabilities of the generic
/// composition.
pub(crate) fn token_nll<B: Backend>(
    logits: &Tensor<B, 3>,
    labels: &Tensor<B, 2, Int>,
) -> Option<Tensor<B, 2>> {
    let kind = kind::<B>()?;
    let labels = host_ints(labels)?;
    match kind {
        Kind::Flex => upcast(token_nll_forward(&as_flex(logits)?, &labels)?.0),
        Kind::Autodiff => upcast(token_nll_autodiff::<NoCheckpointing>(
            as_autodiff(logits)?,
            labels,
        )?),
        Kind::Checkpointed => upcast(token_nll_autodiff::<BalancedCheckpointing>(
            as_autodiff(logits)?,
            labels,
        )?),
    }
}

// ---------------------------------------------------------------------------------------------
// Dropout
// ---------------------------------------------------------------------------------------------

/// `x * mask / (1 - prob)` with a Bernoulli(1 - prob) mask; returns the output and the scaled
/// mask (0 or `1 / (1 - prob)`), which is also the backward's factor. The mask comes from a
/// SplitMix64 stream per chunk, seeded from `seed` and the chunk's index, so it does not depend
/// on how rayon splits the work.
fn dropout_forward(x: &FlexTensor, prob: f64, seed: u64) -> (FlexTensor, FlexTensor) {
    let x = x.to_contiguous();
    let src: &[f32] = x.storage();
    let mut out = vec![0.0f32; src.len()];
    let mut mask = vec![0.0f32; src.len()];
    let threshold = (prob.clamp(0.0, 1.0) * 4_294_967_296.0) as u64;
    let scale = (1.0 / (1.0 - prob)) as f32;
    out.par_chunks_mut(CHUNK)
        .zip(mask.par_chunks_mut(CHUNK))
        .zip(src.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(chunk, ((out, mask), src))| {
            let mut state = seed ^ (chunk as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            for ((o, m), &v) in out.iter_mut().zip(mask.iter_mut()).zip(src) {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                let keep = (z >> 32) >= threshold;
                *m = if keep { scale } else { 0.0 };
                *o = v * *m;
            }
        });
    let shape = shape_of(&x);
    (new_flex(out, shape.clone()), new_flex(mask, shape))
}

fn multiply(a: &FlexTensor, b: &FlexTensor) -> FlexTensor {
    let a = a.to_contiguous();
    let b = b.to_contiguous();
    let x: &[f32] = a.storage();
    let y: &[f32] = b.storage();
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
        .for_each(|(o, (x, y))| {
            o.iter_mut()
                .zip(x.iter().zip(y))
                .for_each(|(o, (x, y))| *o = x * y)
        });
    new_flex(out, shape_of(&a))
}

#[derive(Debug)]
struct DropoutOp;

impl Backward<Flex, 1> for DropoutOp {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let mask = ops.state;
        let [node] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node {
            grads.register::<Flex>(node.id, multiply(&grad, &mask));
        }
    }
}

fn dropout_autodiff<C: CheckpointStrategy>(x: AdTensor, prob: f64, seed: u64) -> AdTensor {
    let (out, mask) = dropout_forward(&x.primitive, prob, seed);
    match DropoutOp
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(mask, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// A seed for one dropout mask, drawn from burn-flex's generator so that `Backend::seed`
/// makes training runs reproducible as before.
fn draw_seed() -> u64 {
    use burn::tensor::Distribution;
    let draw = Tensor::<Flex, 1>::random([2], Distribution::Uniform(0.0, 1.0), &Default::default());
    let values = draw.into_data().to_vec::<f32>().unwrap_or_default();
    values
        .iter()
        .fold(0u64, |seed, v| (seed << 32) ^ u64::from(v.to_bits()))
}

/// Training-mode dropout (`prob` in (0, 1)) in one pass, with a one-pass backward. `None` for
/// inference backends (dropout is the identity there) and every backend but the CPU one.
pub(crate) fn dropout<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    prob: f64,
) -> Option<Tensor<B, D>> {
    if !(prob > 0.0 && prob < 1.0) {
        return None;
    }
    match kind::<B>()? {
        Kind::Flex => None,
        Kind::Autodiff => upcast(dropout_autodiff::<NoCheckpointing>(
            as_autodiff(x)?,
            prob,
            draw_seed(),
        )),
        Kind::Checkpointed => upcast(dropout_autodiff::<BalancedCheckpointing>(
            as_autodiff(x)?,
            prob,
            draw_seed(),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Attention heads: dims 1 and 2 of a 4-D tensor swapped, written out contiguous
// ---------------------------------------------------------------------------------------------

/// `x.swap_dims(1, 2)` of a 4-D tensor `[B, A, C, D]`, as a contiguous `[B, C, A, D]` built
/// from whole rows of `D`. burn-flex leaves a swap as a view and copies it one element at a
/// time (its strided iterator) when a reshape needs it contiguous: merging attention heads,
/// and in backward the gradients of every head split, a seventh of a training step.
fn swap12_forward(x: &FlexTensor) -> Option<FlexTensor> {
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
            let back = swap12_forward(&grad).unwrap_or_else(|| {
                <Flex as burn::tensor::ops::FloatTensorOps<Flex>>::float_swap_dims(grad, 1, 2)
            });
            grads.register::<Flex>(node.id, back);
        }
    }
}

fn swap12_autodiff<C: CheckpointStrategy>(x: AdTensor) -> Option<AdTensor> {
    let out = swap12_forward(&x.primitive)?;
    Some(
        Swap12Op
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateless(out),
    )
}

/// `x.swap_dims(1, 2)` written out contiguous, on the CPU backends (`None` elsewhere: the
/// caller swaps). `training_only`: leave inference to the view (its matrix products read
/// strided operands), for a split whose only cost is in backward.
pub(crate) fn swap_heads<B: Backend>(
    x: &Tensor<B, 4>,
    training_only: bool,
) -> Option<Tensor<B, 4>> {
    match kind::<B>()? {
        Kind::Flex if training_only => None,
        Kind::Flex => upcast(swap12_forward(&as_flex(x)?)?),
        Kind::Autodiff => upcast(swap12_autodiff::<NoCheckpointing>(as_autodiff(x)?)?),
        Kind::Checkpointed => upcast(swap12_autodiff::<BalancedCheckpointing>(as_autodiff(x)?)?),
    }
}

// ---------------------------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------------------------

/// The scalars of one AdamW update of one parameter, in torch's order of operations.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamWScalars {
    /// Multiplies the raw gradient (the clipping coefficient, and loss-scale unscaling).
    pub grad_scale: f64,
    /// `1 - lr * weight_decay` (1 where no decay applies).
    pub decay: f64,
    /// `1 - beta1`, torch's `lerp_` weight.
    pub lerp_weight: f64,
    pub beta2: f64,
    pub bias_correction2_sqrt: f64,
    pub eps: f64,
    /// `lr / bias_correction1`.
    pub step_size: f64,
}

/// A tensor that `B` owns as a burn-flex f32 tensor, or the tensor back.
fn take_flex<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<FlexTensor, Tensor<B, D>> {
    if kind::<B>() != Some(Kind::Flex) || t.dtype() != DType::F32 {
        return Err(t);
    }
    let primitive: B::FloatTensorPrimitive = t.into_primitive().tensor();
    let boxed: Box<dyn Any> = Box::new(primitive);
    match boxed.downcast::<FlexTensor>() {
        Ok(flex) => Ok(*flex),
        Err(boxed) => match boxed.downcast::<B::FloatTensorPrimitive>() {
            Ok(primitive) => Err(Tensor::from_primitive(TensorPrimitive::Float(*primitive))),
            Err(_) => unreachable!("a primitive downcasts to its own type"),
        },
    }
}

/// One AdamW step (torch's single-tensor `adamw`) over flat `value`, `grad`, `exp_avg`,
/// `exp_avg_sq` in one multi-threaded pass, updating the moments and the value in place where
/// their buffers are not shared. Returns `(value, exp_avg, exp_avg_sq)`, or the four inputs
/// back when `B` is not burn-flex.
#[allow(clippy::type_complexity)]
pub(crate) fn adamw<B: Backend>(
    value: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    exp_avg: Tensor<B, 1>,
    exp_avg_sq: Tensor<B, 1>,
    h: &AdamWScalars,
) -> Result<
    (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>),
    (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>),
> {
    let lengths = [
        value.dims()[0],
        grad.dims()[0],
        exp_avg.dims()[0],
        exp_avg_sq.dims()[0],
    ];
    if kind::<B>() != Some(Kind::Flex) || lengths.iter().any(|&n| n != lengths[0]) {
        return Err((value, grad, exp_avg, exp_avg_sq));
    }
    let parts = (
        take_flex(value),
        take_flex(grad),
        take_flex(exp_avg),
        take_flex(exp_avg_sq),
    );
    let (value, grad, m, s) = match parts {
        (Ok(v), Ok(g), Ok(m), Ok(s)) => (v, g, m, s),
        (v, g, m, s) => {
            let back = |t: Result<FlexTensor, Tensor<B, 1>>| match t {
                Ok(flex) => upcast::<B, _, 1>(flex).expect("B is burn-flex"),
                Err(tensor) => tensor,
            };
            return Err((back(v), back(g), back(m), back(s)));
        }
    };
    // Written in place (a copy of every parameter and both moments per step otherwise).
    let mut value = into_contiguous(value);
    let grad = grad.to_contiguous();
    let mut m = into_contiguous(m);
    let mut s = into_contiguous(s);
    {
        let g: &[f32] = grad.storage();
        let v: &mut [f32] = value.storage_mut();
        let mm: &mut [f32] = m.storage_mut();
        let ss: &mut [f32] = s.storage_mut();
        let h = *h;
        v.par_chunks_mut(CHUNK)
            .zip(mm.par_chunks_mut(CHUNK))
            .zip(ss.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((v, m), s), g)| simd::adamw(v, m, s, g, &h));
    }
    let wrap = |t: FlexTensor| upcast::<B, _, 1>(t).expect("B is burn-flex");
    Ok((wrap(value), wrap(m), wrap(s)))
}

/// The sum of the squares of `t`'s elements (for the global gradient norm), in one
/// multi-threaded pass without the squared copy of `t.clone() * t`; each task sums in f32 lanes
/// and the tasks' sums are added in f64. `None` unless `B` is burn-flex and `t` holds f32.
pub(crate) fn sum_of_squares<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<f64> {
    let flex = as_flex(t)?.to_contiguous();
    let data: &[f32] = flex.storage();
    Some(
        data.par_chunks(CHUNK)
            .map(|chunk| {
                let mut sum = [0.0f32];
                simd::sum_squares(chunk, &mut sum);
                f64::from(sum[0])
            })
            .sum(),
    )
}

/// The element-wise loops, written so that the compiler vectorizes them; compiled three times
/// (for the baseline target, AVX2+FMA and AVX-512) and picked at run time. The compiler never
/// fuses a multiply and an add on its own, so all three give the same bits.
mod simd {
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
        let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
            * r
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
            let slope =
                s + x * s * (1.0 - s) * 2.0 * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x);
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

    /// [`super::token_nll_forward`] for the rows of `x` (`labels.len()` rows).
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

    /// [`super::token_nll_backward`] for the rows of `x`.
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
}

#[cfg(test)]
mod tests {
    //! Each kernel against burn's own ops composing the same formula (the generic path of
    //! every other backend), values and gradients; the model-level parity with HF transformers
    //! is in `tests/`.
    use burn::backend::Autodiff;
    use burn::tensor::activation::softmax;
    use burn::tensor::{Distribution, Tensor, TensorData, Tolerance};
    use burn_flex::Flex;

    type Ad = Autodiff<Flex>;

    fn random<B: burn::tensor::backend::Backend, const D: usize>(
        shape: [usize; D],
    ) -> Tensor<B, D> {
        let values =
            Tensor::<Flex, D>::random(shape, Distribution::Normal(0.0, 1.5), &Default::default());
        Tensor::from_data(values.into_data(), &Default::default())
    }

    fn close(got: TensorData, want: TensorData) {
        got.assert_approx_eq::<f32>(&want, Tolerance::rel_abs(2e-5, 2e-5));
    }

    /// The gradients of `sum(op(a, b) * upstream)` with respect to `a` and `b` are the same
    /// through the fused kernel (on the autodiff CPU backend) and through `generic`.
    fn assert_same_gradients<const DA: usize, const DB: usize, const DO: usize>(
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

    fn generic_rms<B: burn::tensor::backend::Backend>(
        x: Tensor<B, 3>,
        w: Tensor<B, 1>,
    ) -> Tensor<B, 3> {
        let variance = x.clone().powi_scalar(2).mean_dim(2);
        x * (variance + 1e-6).sqrt().recip() * w.unsqueeze::<3>()
    }

    fn generic_gelu_gated<B: burn::tensor::backend::Backend>(
        a: Tensor<B, 3>,
        g: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        burn::tensor::activation::gelu_approximate(a) * g
    }

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

    /// The fused cross-entropy against log_softmax + gather (the generic path of
    /// `score::token_nll`): values, 0 at ignored labels, and the logits' gradient, with a
    /// vocabulary that is not a multiple of the SIMD width and logits large enough that a
    /// `logsumexp` without its max would overflow.
    #[test]
    fn token_nll_matches_log_softmax_and_gather_values_and_gradients() {
        use burn::tensor::Int;
        use burn::tensor::activation::log_softmax;
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
        for (i, label) in labels.iter().enumerate() {
            assert_eq!(*label < 0, values[i] == 0.0, "row {i}");
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

    /// The embedding kernel against burn's `embedding`: values, and the table's gradient with
    /// repeated ids, ids in every block of rows the backward splits the table into, and an id
    /// outside the table (generic path).
    #[test]
    fn embedding_matches_burn_values_and_gradients() {
        use burn::tensor::Int;
        use burn::tensor::module::embedding;
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

    #[test]
    fn dropout_keeps_about_one_minus_p_scales_the_kept_and_routes_gradients_through_the_mask() {
        let device = Default::default();
        let x = Tensor::<Ad, 2>::ones([64, 1000], &device).require_grad();
        let y = super::dropout(&x, 0.1).expect("autodiff flex takes the fused path");
        let values = y.to_data().to_vec::<f32>().expect("f32");
        let kept = values.iter().filter(|&&v| v != 0.0).count() as f64 / values.len() as f64;
        assert!((kept - 0.9).abs() < 0.01, "kept fraction {kept}");
        let scale = 1.0f32 / 0.9;
        assert!(values.iter().all(|&v| v == 0.0 || (v - scale).abs() < 1e-6));
        let grads = (y.clone() * 3.0).sum().backward();
        let grad = x
            .grad(&grads)
            .expect("x grad")
            .into_data()
            .to_vec::<f32>()
            .expect("f32");
        for (g, v) in grad.iter().zip(&values) {
            assert!((g - 3.0 * v).abs() < 1e-5, "grad {g} for output {v}");
        }
        // Another call draws another mask; inference backends never take this path.
        let again = super::dropout(&x, 0.1)
            .expect("fused")
            .to_data()
            .to_vec::<f32>();
        assert_ne!(again.expect("f32"), values);
        assert!(super::dropout(&Tensor::<Flex, 2>::ones([2, 2], &device), 0.1).is_none());
    }

    #[test]
    fn other_backends_and_dtypes_take_the_generic_path() {
        let x: Tensor<Flex, 3> = random([1, 2, 8]);
        let half = x.clone().cast(burn::tensor::FloatDType::F16);
        let w: Tensor<Flex, 1> = random([8]);
        assert!(super::rms_norm(&half, &w, 1e-6).is_none());
        assert!(super::gelu_new_gated(&half, &half).is_none());
        // A shape the kernel does not handle (gate of another shape) falls back too.
        let other: Tensor<Flex, 3> = random([1, 2, 9]);
        assert!(super::gelu_new_gated(&x, &other).is_none());
    }
}
