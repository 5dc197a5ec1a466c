//! One AdamW step over a flat parameter in one parallel pass, in place.
//!
//! Owns: the update's arithmetic over burn-flex buffers. Must not choose the backend (`dispatch`
//! does) or know about parameters and schedules ([`crate::optim`] does).

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use super::dispatch::{self, Cpu};
use super::{CHUNK, into_contiguous, simd};

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

/// One parameter's AdamW inputs, flat and of one length: the value, its gradient and the two
/// moments.
pub(crate) struct AdamWInput<B: Backend> {
    pub value: Tensor<B, 1>,
    pub grad: Tensor<B, 1>,
    pub exp_avg: Tensor<B, 1>,
    pub exp_avg_sq: Tensor<B, 1>,
}

impl<B: Backend> AdamWInput<B> {
    /// Whether the four tensors have one length and hold f32.
    fn fits(&self) -> bool {
        let tensors = [&self.value, &self.grad, &self.exp_avg, &self.exp_avg_sq];
        let len = self.value.dims()[0];
        tensors
            .iter()
            .all(|t| t.dims()[0] == len && t.dtype() == DType::F32)
    }
}

/// One AdamW step (torch's single-tensor `adamw`) in one multi-threaded pass, updating the
/// moments and the value in place where their buffers are not shared. Returns `(value,
/// exp_avg, exp_avg_sq)`, or the input back when `B` is not burn-flex or the input does not
/// fit.
pub(crate) fn adamw<B: Backend>(
    input: AdamWInput<B>,
    h: &AdamWScalars,
) -> Result<[Tensor<B, 1>; 3], AdamWInput<B>> {
    let Some(Cpu::Inference(flex)) = dispatch::cpu::<B>() else {
        return Err(input);
    };
    if !input.fits() {
        return Err(input);
    }
    // Written in place (a copy of every parameter and both moments per step otherwise).
    let mut value = into_contiguous(flex.take(input.value));
    let grad = flex.take(input.grad).to_contiguous();
    let mut m = into_contiguous(flex.take(input.exp_avg));
    let mut s = into_contiguous(flex.take(input.exp_avg_sq));
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
    Ok([flex.wrap(value), flex.wrap(m), flex.wrap(s)])
}
