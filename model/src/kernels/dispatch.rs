//! The one place that decides whether a kernel runs, and the only code in the crate that looks
//! at a backend's concrete type.
//!
//! Owns: recognising the CPU backends ([`Flex`] for inference, `Autodiff<Flex, _>` for training
//! with or without checkpointing) by [`TypeId`], the conversions between `Tensor<B, D>` and
//! their concrete primitives, and recording a kernel in the autodiff graph under the backend's
//! checkpoint strategy. Must not hold any arithmetic: the kernels' files do.
//!
//! Why not burn's backend-extension mechanism (a trait `Backend: burn::tensor::backend::Backend`
//! with the fused ops, implemented for each backend): the model, and every caller of it in the
//! node and testnet crates, is generic over plain `B: Backend`; the extension trait would become
//! their bound, and every other backend (CUDA through fusion, each autodiff wrapper) would need
//! an implementation that only forwards to the generic composition. Here the choice is made once,
//! per call, by [`cpu`]: `None` sends the caller to the generic composition.
//!
//! Soundness of the conversions: a [`Primitives`] value exists only after [`cpu`] has checked
//! that `B` is one of the three CPU backends, whose float primitive is exactly `T`; converting
//! through [`Any`] therefore cannot fail, and the `unreachable!`s of [`Primitives`] state it.

use std::any::{Any, TypeId};
use std::marker::PhantomData;
use std::sync::OnceLock;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::ops::{Backward, OpsKind};
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_flex::{Flex, FlexTensor};

/// The autodiff tensor of the CPU training backends (the same type for both strategies).
pub(super) type AdTensor = <Autodiff<Flex> as BackendTypes>::FloatTensorPrimitive;

/// Set `MESHTUNE_GENERIC_KERNELS=1` to run the generic tensor-op composition on CPU too (for
/// benchmarks and tests comparing the two paths).
fn fused_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("MESHTUNE_GENERIC_KERNELS").is_none())
}

/// Where a kernel call on backend `B` runs.
pub(super) enum Cpu<B: Backend> {
    /// burn-flex itself: inference, no graph.
    Inference(Primitives<B, FlexTensor>),
    /// burn-flex under autodiff: the kernel's backward is recorded.
    Training(Training<B>),
}

/// `B`'s kernel route: `None` for every backend but the CPU ones (and when the kernels are
/// turned off), where the caller runs the generic composition of tensor ops.
pub(super) fn cpu<B: Backend>() -> Option<Cpu<B>> {
    if !fused_enabled() {
        return None;
    }
    let id = TypeId::of::<B>();
    let training = |strategy| {
        Cpu::Training(Training {
            primitives: Primitives(PhantomData),
            strategy,
        })
    };
    if id == TypeId::of::<Flex>() {
        Some(Cpu::Inference(Primitives(PhantomData)))
    } else if id == TypeId::of::<Autodiff<Flex, NoCheckpointing>>() {
        Some(training(Strategy::None))
    } else if id == TypeId::of::<Autodiff<Flex, BalancedCheckpointing>>() {
        Some(training(Strategy::Balanced))
    } else {
        None
    }
}

/// Whether the kernels run for backend `B`.
pub(crate) fn fused<B: Backend>() -> bool {
    cpu::<B>().is_some()
}

/// The burn-flex tensor behind `t` when `B` is burn-flex (inference) and `t` holds f32.
pub(super) fn inference_f32<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<FlexTensor> {
    match cpu::<B>()? {
        Cpu::Inference(flex) => flex.f32(t),
        Cpu::Training(_) => None,
    }
}

/// `value` as `U` when `T` is `U`, else `value` back. Moves, without a heap allocation.
fn cast<T: 'static, U: 'static>(value: T) -> Result<U, T> {
    let mut slot = Some(value);
    let taken = (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<U>>()
        .and_then(Option::take);
    match (taken, slot) {
        (Some(cast), _) => Ok(cast),
        (None, Some(value)) => Err(value),
        (None, None) => unreachable!("the slot is emptied only by a successful cast"),
    }
}

/// Proof that `B`'s float primitive is `T` (made only by [`cpu`]): the conversions between
/// `Tensor<B, D>` and `T` cannot fail.
pub(super) struct Primitives<B, T>(PhantomData<(B, T)>);

impl<B: Backend, T: 'static> Primitives<B, T> {
    /// `t`'s primitive (a second handle on its buffer).
    fn of<const D: usize>(&self, t: &Tensor<B, D>) -> T {
        self.take(t.clone())
    }

    /// `t`'s primitive, `t` consumed (the only handle on its buffer when `t` was).
    pub(super) fn take<const D: usize>(&self, t: Tensor<B, D>) -> T {
        let primitive: B::FloatTensorPrimitive = t.into_primitive().tensor();
        match cast(primitive) {
            Ok(primitive) => primitive,
            Err(_) => unreachable!("`cpu` made this proof after checking `B`'s type"),
        }
    }

    /// `primitive` as a tensor of `B`.
    pub(super) fn wrap<const D: usize>(&self, primitive: T) -> Tensor<B, D> {
        match cast::<T, B::FloatTensorPrimitive>(primitive) {
            Ok(primitive) => Tensor::from_primitive(TensorPrimitive::Float(primitive)),
            Err(_) => unreachable!("`cpu` made this proof after checking `B`'s type"),
        }
    }
}

impl<B: Backend> Primitives<B, FlexTensor> {
    /// The burn-flex tensor behind `t` when it holds f32.
    pub(super) fn f32<const D: usize>(&self, t: &Tensor<B, D>) -> Option<FlexTensor> {
        (t.dtype() == DType::F32).then(|| self.of(t))
    }
}

/// The checkpoint strategy of a CPU training backend.
#[derive(Clone, Copy)]
enum Strategy {
    None,
    Balanced,
}

/// A CPU training backend: its primitives and its checkpoint strategy.
pub(super) struct Training<B: Backend> {
    primitives: Primitives<B, AdTensor>,
    strategy: Strategy,
}

impl<B: Backend> Training<B> {
    /// The autodiff tensor behind `t` when it holds f32.
    pub(super) fn f32<const D: usize>(&self, t: &Tensor<B, D>) -> Option<AdTensor> {
        (t.dtype() == DType::F32).then(|| self.primitives.of(t))
    }

    /// Records `out = op(inputs)` in the autodiff graph and returns it as a tensor of `B`. When
    /// a parent requires a gradient, `state` turns the inputs' primitives into what `op`'s
    /// backward keeps; otherwise they are dropped here.
    pub(super) fn record<O, const N: usize, const D: usize>(
        &self,
        op: O,
        inputs: [AdTensor; N],
        state: impl FnOnce([FlexTensor; N]) -> O::State,
        out: FlexTensor,
    ) -> Tensor<B, D>
    where
        O: Backward<Flex, N>,
    {
        let recorded = match self.strategy {
            Strategy::None => record_with::<NoCheckpointing, O, N>(op, inputs, state, out),
            Strategy::Balanced => {
                record_with::<BalancedCheckpointing, O, N>(op, inputs, state, out)
            }
        };
        self.primitives.wrap(recorded)
    }
}

/// Runs a two-input kernel whose backward keeps both inputs: `forward` on the inputs' f32
/// burn-flex tensors, and when training, `op` recorded with them. `None` where the generic
/// path must run (another backend or dtype, or `forward` refusing the shapes).
pub(super) fn binary<B, O, const DA: usize, const DB: usize, const DO: usize>(
    a: &Tensor<B, DA>,
    b: &Tensor<B, DB>,
    op: O,
    forward: impl FnOnce(&FlexTensor, &FlexTensor) -> Option<FlexTensor>,
) -> Option<Tensor<B, DO>>
where
    B: Backend,
    O: Backward<Flex, 2, State = (FlexTensor, FlexTensor)>,
{
    match cpu::<B>()? {
        Cpu::Inference(flex) => Some(flex.wrap(forward(&flex.f32(a)?, &flex.f32(b)?)?)),
        Cpu::Training(ad) => {
            let (a, b) = (ad.f32(a)?, ad.f32(b)?);
            let out = forward(&a.primitive, &b.primitive)?;
            Some(ad.record(op, [a, b], |[a, b]| (a, b), out))
        }
    }
}

fn record_with<C, O, const N: usize>(
    op: O,
    inputs: [AdTensor; N],
    state: impl FnOnce([FlexTensor; N]) -> O::State,
    out: FlexTensor,
) -> AdTensor
where
    C: CheckpointStrategy,
    O: Backward<Flex, N>,
{
    let nodes = inputs.each_ref().map(|t| t.node.clone());
    match op.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state(inputs.map(|t| t.primitive)), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[cfg(test)]
mod tests {
    use super::cast;

    #[test]
    fn cast_moves_a_value_of_the_same_type_and_returns_any_other() {
        assert_eq!(
            cast::<String, String>("kept".into()),
            Ok("kept".to_string())
        );
        assert_eq!(cast::<u32, u64>(7), Err(7));
    }
}
