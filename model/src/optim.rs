//! Optimizers with PyTorch semantics, because burn's defaults differ (burn's AdamW: eps 1e-5,
//! weight decay 1e-4, per-tensor clipping).
//!
//! Owns: `torch.optim.AdamW` (single-tensor path, `foreach=False`), global-norm gradient
//! clipping over all parameters (`torch.nn.utils.clip_grad_norm_`) and the HF learning-rate
//! schedules. Must not know about data or the network.
//!
//! Decay follows HF Trainer's grouping: parameters of rank >= 2 decay, rank-1 parameters
//! (T5's layer norms; T5 has no biases) do not.

use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};

/// `torch.optim.AdamW` hyper-parameters (its defaults except `weight_decay`, which HF sets).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// First and second moments of one parameter, flattened.
#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    pub exp_avg: Tensor<B, 1>,
    pub exp_avg_sq: Tensor<B, 1>,
    /// torch keeps a step count per parameter.
    pub step: u64,
}

/// AdamW with exactly torch's update order:
/// `p *= 1 - lr*wd; m.lerp_(g, 1-b1); v = b2*v + (1-b2)*g*g;`
/// `p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`.
#[derive(Debug)]
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    pub state: HashMap<ParamId, Moments<B>>,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            state: HashMap::new(),
        }
    }

    /// One update of every parameter that has a gradient in `grads` (others, e.g. frozen
    /// weights under LoRA, are left as they are). Gradients are multiplied by `grad_scale`
    /// first (the clipping coefficient).
    pub fn step<AB, M>(&mut self, lr: f64, module: M, grads: GradientsParams, grad_scale: f64) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let mut mapper = AdamWMapper::<AB> {
            optimizer: self,
            grads,
            lr,
            grad_scale,
        };
        module.map(&mut mapper)
    }
}

struct AdamWMapper<'a, AB: AutodiffBackend> {
    optimizer: &'a mut AdamW<AB::InnerBackend>,
    grads: GradientsParams,
    lr: f64,
    grad_scale: f64,
}

/// torch's `lerp_` for a scalar weight: `self + w*(end-self)` when w < 0.5.
fn lerp<B: Backend>(start: Tensor<B, 1>, end: Tensor<B, 1>, weight: f64) -> Tensor<B, 1> {
    if weight < 0.5 {
        start.clone() + (end - start).mul_scalar(weight)
    } else {
        end.clone() - (end - start).mul_scalar(1.0 - weight)
    }
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for AdamWMapper<'_, AB> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<AB::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let config = self.optimizer.config;
        let shape = tensor.shape();
        let numel = shape.num_elements();
        let grad: Tensor<AB::InnerBackend, 1> = grad.reshape([numel]).mul_scalar(self.grad_scale);
        let mut value: Tensor<AB::InnerBackend, 1> = tensor.inner().reshape([numel]);
        let device = value.device();
        let previous = self.optimizer.state.remove(&id);
        let (exp_avg, exp_avg_sq, step) = match previous {
            Some(m) => (m.exp_avg, m.exp_avg_sq, m.step),
            None => (
                Tensor::zeros([numel], &device),
                Tensor::zeros([numel], &device),
                0,
            ),
        };
        let step = step + 1;
        if config.weight_decay != 0.0 && D >= 2 {
            value = value.mul_scalar(1.0 - self.lr * config.weight_decay);
        }
        let exp_avg = lerp(exp_avg, grad.clone(), 1.0 - config.beta1);
        let exp_avg_sq = exp_avg_sq.mul_scalar(config.beta2)
            + grad.clone().mul(grad).mul_scalar(1.0 - config.beta2);
        let bias_correction1 = 1.0 - config.beta1.powi(step as i32);
        let bias_correction2 = 1.0 - config.beta2.powi(step as i32);
        let step_size = self.lr / bias_correction1;
        let denom = exp_avg_sq
            .clone()
            .sqrt()
            .div_scalar(bias_correction2.sqrt())
            .add_scalar(config.eps);
        let value = value - exp_avg.clone().div(denom).mul_scalar(step_size);
        self.optimizer.state.insert(
            id,
            Moments {
                exp_avg,
                exp_avg_sq,
                step,
            },
        );
        let updated = Tensor::<AB, D>::from_inner(value.reshape(shape)).require_grad();
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// Global L2 norm of all gradients of `module`'s parameters (those that have one).
pub fn global_grad_norm<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    module: &M,
    grads: &GradientsParams,
) -> f64 {
    struct NormVisitor<'a, AB: AutodiffBackend> {
        grads: &'a GradientsParams,
        sum_squares: Option<Tensor<AB::InnerBackend, 1>>,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for NormVisitor<'_, AB> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            if let Some(grad) = self.grads.get::<AB::InnerBackend, D>(param.id) {
                let sq = grad.clone().mul(grad).sum();
                self.sum_squares = Some(match self.sum_squares.take() {
                    Some(acc) => acc + sq,
                    None => sq,
                });
            }
        }
    }
    let mut visitor = NormVisitor::<AB> {
        grads,
        sum_squares: None,
    };
    module.visit(&mut visitor);
    match visitor.sum_squares {
        Some(total) => {
            let value: f64 = total.into_scalar().elem();
            value.sqrt()
        }
        None => 0.0,
    }
}

/// torch `clip_grad_norm_`'s coefficient: `min(1, max_norm / (total_norm + 1e-6))`.
pub fn clip_coefficient(total_norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(max_norm) => (max_norm / (total_norm + 1e-6)).min(1.0),
        None => 1.0,
    }
}

/// Learning-rate schedule shape after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    #[default]
    Linear,
    Cosine,
    Constant,
}

/// HF `get_{linear,cosine,constant}_schedule_with_warmup`: the multiplier of the base lr for
/// optimizer step `step` (0-based; with warm-up the first step's lr is 0, as in HF).
pub fn lr_multiplier(kind: ScheduleKind, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / progress_steps;
    match kind {
        ScheduleKind::Constant => 1.0,
        ScheduleKind::Linear => ((total.saturating_sub(step)) as f64 / progress_steps).max(0.0),
        ScheduleKind::Cosine => {
            (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_hf() {
        // get_linear_schedule_with_warmup(warmup=3, total=20)
        let lin: Vec<f64> = (0..6)
            .map(|s| lr_multiplier(ScheduleKind::Linear, s, 3, 20))
            .collect();
        let expected = [0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0, 16.0 / 17.0, 15.0 / 17.0];
        for (a, b) in lin.iter().zip(expected) {
            assert!((a - b).abs() < 1e-12, "{lin:?}");
        }
        assert_eq!(lr_multiplier(ScheduleKind::Linear, 20, 3, 20), 0.0);
        assert!((lr_multiplier(ScheduleKind::Cosine, 3, 3, 20) - 1.0).abs() < 1e-12);
        assert!(lr_multiplier(ScheduleKind::Cosine, 20, 3, 20).abs() < 1e-12);
        assert!((lr_multiplier(ScheduleKind::Cosine, 11, 2, 20) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn clip_coefficient_matches_torch() {
        assert_eq!(clip_coefficient(0.5, Some(1.0)), 1.0);
        assert!((clip_coefficient(4.0, Some(1.0)) - 1.0 / (4.0 + 1e-6)).abs() < 1e-15);
        assert_eq!(clip_coefficient(100.0, None), 1.0);
    }
}
