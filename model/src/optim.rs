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

/// HF transformers' `Adafactor` (`transformers.optimization.Adafactor`, what T5 was trained
/// with) hyper-parameters; defaults are the usual T5 fine-tuning recipe: an external learning
/// rate (the schedule's), steps scaled by each parameter's RMS, no first moment.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdafactorConfig {
    /// Added to the squared gradient (HF `eps[0]`).
    pub eps1: f64,
    /// Floor of the parameter scale (HF `eps[1]`).
    pub eps2: f64,
    /// The update's RMS is clipped to this.
    pub clip_threshold: f64,
    /// Second-moment decay: `beta2_t = 1 - t^decay_rate`.
    pub decay_rate: f64,
    /// First-moment coefficient; `None` keeps no first moment (the memory saving).
    pub beta1: Option<f64>,
    pub weight_decay: f64,
    /// Multiply the learning rate by `max(eps2, RMS(parameter))`.
    pub scale_parameter: bool,
    /// Ignore the schedule: lr = `min(1e-2, 1/sqrt(t))` (`1e-6 t` with `warmup_init`).
    pub relative_step: bool,
    pub warmup_init: bool,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        Self {
            eps1: 1e-30,
            eps2: 1e-3,
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            weight_decay: 0.0,
            scale_parameter: true,
            relative_step: false,
            warmup_init: false,
        }
    }
}

/// Which optimizer a run uses.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// `torch.optim.AdamW` with [`AdamWConfig`].
    #[default]
    AdamW,
    /// HF `Adafactor` with [`AdafactorConfig`]: factored second moments for matrices (rows
    /// plus columns instead of one value per weight).
    Adafactor(AdafactorConfig),
}

/// Lengths of the two saved moment vectors of a parameter of `shape`: `(first, second)`.
/// AdamW keeps both per element; Adafactor keeps a first moment only with `beta1`, and for a
/// matrix a per-row and a per-column second moment (`rows + cols`).
pub fn moment_lengths(adafactor: Option<&AdafactorConfig>, shape: &[usize]) -> (usize, usize) {
    let numel: usize = shape.iter().product();
    match adafactor {
        None => (numel, numel),
        Some(config) => (
            if config.beta1.is_some() { numel } else { 0 },
            if shape.len() == 2 {
                shape[0] + shape[1]
            } else {
                numel
            },
        ),
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
///
/// With `adafactor` set, the same state table holds HF Adafactor's moments instead (see
/// [`moment_lengths`]) and [`AdamW::step`] applies Adafactor's update.
#[derive(Debug)]
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    pub adafactor: Option<AdafactorConfig>,
    pub state: HashMap<ParamId, Moments<B>>,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            adafactor: None,
            state: HashMap::new(),
        }
    }

    /// The optimizer `kind` names (AdamW's hyper-parameters from `adamw`).
    pub fn of_kind(kind: OptimizerKind, adamw: AdamWConfig) -> Self {
        let mut optimizer = Self::new(adamw);
        if let OptimizerKind::Adafactor(config) = kind {
            optimizer.adafactor = Some(config);
        }
        optimizer
    }

    /// One update of every parameter that has a gradient in `grads` (others, e.g. frozen
    /// weights under LoRA, are left as they are). Gradients are multiplied by `grad_scale`
    /// first (the clipping coefficient).
    pub fn step<AB, M>(&mut self, lr: f64, module: M, grads: GradientsParams, grad_scale: f64) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        if let Some(config) = self.adafactor {
            let mut mapper = AdafactorMapper::<AB> {
                config,
                state: &mut self.state,
                grads,
                lr,
                grad_scale,
            };
            return module.map(&mut mapper);
        }
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
        let grad: Tensor<AB::InnerBackend, 1> = grad.reshape([numel]);
        let value: Tensor<AB::InnerBackend, 1> = tensor.inner().reshape([numel]);
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
        let decays = config.weight_decay != 0.0 && D >= 2;
        let bias_correction1 = 1.0 - config.beta1.powi(step as i32);
        let bias_correction2 = 1.0 - config.beta2.powi(step as i32);
        let step_size = self.lr / bias_correction1;
        let scalars = crate::kernels::AdamWScalars {
            grad_scale: self.grad_scale,
            decay: if decays {
                1.0 - self.lr * config.weight_decay
            } else {
                1.0
            },
            lerp_weight: 1.0 - config.beta1,
            beta2: config.beta2,
            bias_correction2_sqrt: bias_correction2.sqrt(),
            eps: config.eps,
            step_size,
        };
        let input = crate::kernels::AdamWInput {
            value,
            grad,
            exp_avg,
            exp_avg_sq,
        };
        let [value, exp_avg, exp_avg_sq] = match crate::kernels::adamw(input, &scalars) {
            Ok(updated) => updated,
            Err(crate::kernels::AdamWInput {
                mut value,
                grad,
                exp_avg,
                exp_avg_sq,
            }) => {
                // The generic composition (every backend but the CPU one).
                let grad = grad.mul_scalar(self.grad_scale);
                if decays {
                    value = value.mul_scalar(scalars.decay);
                }
                let exp_avg = lerp(exp_avg, grad.clone(), scalars.lerp_weight);
                let exp_avg_sq = exp_avg_sq.mul_scalar(config.beta2)
                    + grad.clone().mul(grad).mul_scalar(1.0 - config.beta2);
                let denom = exp_avg_sq
                    .clone()
                    .sqrt()
                    .div_scalar(scalars.bias_correction2_sqrt)
                    .add_scalar(config.eps);
                let value = value - exp_avg.clone().div(denom).mul_scalar(step_size);
                [value, exp_avg, exp_avg_sq]
            }
        };
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

struct AdafactorMapper<'a, AB: AutodiffBackend> {
    config: AdafactorConfig,
    state: &'a mut HashMap<ParamId, Moments<AB::InnerBackend>>,
    grads: GradientsParams,
    lr: f64,
    grad_scale: f64,
}

/// HF's `_rms`: `norm(x) / sqrt(numel)`.
fn rms<B: Backend>(x: &Tensor<B, 1>) -> f64 {
    let numel = x.dims()[0].max(1) as f64;
    let sum: f64 = x.clone().powi_scalar(2).sum().into_scalar().elem();
    (sum / numel).sqrt()
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for AdafactorMapper<'_, AB> {
    /// `transformers.optimization.Adafactor.step` for one parameter. Our matrices are stored
    /// `[in, out]`, HF's `[out, in]`: HF's per-row statistic (mean over `in`) is our mean over
    /// dimension 0, its per-column one our mean over dimension 1.
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<AB::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let config = self.config;
        let shape = tensor.shape();
        let dims: Vec<usize> = tensor.dims().to_vec();
        let numel = shape.num_elements();
        let grad: Tensor<AB::InnerBackend, 1> = grad.reshape([numel]).mul_scalar(self.grad_scale);
        let mut value: Tensor<AB::InnerBackend, 1> = tensor.inner().reshape([numel]);
        let device = value.device();
        let (first_len, second_len) = moment_lengths(Some(&config), &dims);
        let previous = self.state.remove(&id);
        let (exp_avg, exp_avg_sq, step) = match previous {
            Some(m) => (m.exp_avg, m.exp_avg_sq, m.step),
            None => (
                Tensor::zeros([first_len], &device),
                Tensor::zeros([second_len], &device),
                0,
            ),
        };
        let step = step + 1;
        let t = step as f64;
        let mut lr = if config.relative_step {
            let min_step = if config.warmup_init { 1e-6 * t } else { 1e-2 };
            min_step.min(1.0 / t.sqrt())
        } else {
            self.lr
        };
        if config.scale_parameter {
            lr *= config.eps2.max(rms(&value));
        }
        let beta2t = 1.0 - t.powf(config.decay_rate);
        let squared = grad.clone().powi_scalar(2).add_scalar(config.eps1);
        let (update, exp_avg_sq) = if dims.len() == 2 {
            let (rows, cols) = (dims[0], dims[1]);
            let squared = squared.reshape([rows, cols]);
            // HF row (per output) = our columns; HF column (per input) = our rows.
            let hf_row = exp_avg_sq.clone().narrow(0, 0, cols).mul_scalar(beta2t)
                + squared
                    .clone()
                    .mean_dim(0)
                    .reshape([cols])
                    .mul_scalar(1.0 - beta2t);
            let hf_col = exp_avg_sq.narrow(0, cols, rows).mul_scalar(beta2t)
                + squared.mean_dim(1).reshape([rows]).mul_scalar(1.0 - beta2t);
            let row_mean: f64 = hf_row.clone().mean().into_scalar().elem();
            let row_factor = hf_row.clone().div_scalar(row_mean).sqrt().recip();
            let col_factor = hf_col.clone().sqrt().recip();
            let approx = col_factor.reshape([rows, 1]) * row_factor.reshape([1, cols]);
            let update = (approx * grad.reshape([rows, cols])).reshape([numel]);
            (update, Tensor::cat(vec![hf_row, hf_col], 0))
        } else {
            let v = exp_avg_sq.mul_scalar(beta2t) + squared.mul_scalar(1.0 - beta2t);
            (v.clone().sqrt().recip() * grad, v)
        };
        let clip = (rms(&update) / config.clip_threshold).max(1.0);
        let update = update.div_scalar(clip);
        let mut update = update.mul_scalar(lr);
        let exp_avg = match config.beta1 {
            Some(beta1) => {
                let m = exp_avg.mul_scalar(beta1) + update.clone().mul_scalar(1.0 - beta1);
                update = m.clone();
                m
            }
            None => exp_avg,
        };
        if config.weight_decay != 0.0 {
            value = value.clone() - value.mul_scalar(config.weight_decay * lr);
        }
        let value = value - update;
        self.state.insert(
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
        /// Sums taken on the host by the CPU kernel.
        host_sum: f64,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for NormVisitor<'_, AB> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            if let Some(grad) = self.grads.get::<AB::InnerBackend, D>(param.id) {
                if let Some(sum) = crate::kernels::sum_of_squares(&grad) {
                    self.host_sum += sum;
                    return;
                }
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
        host_sum: 0.0,
    };
    module.visit(&mut visitor);
    let device_sum = match visitor.sum_squares {
        Some(total) => total.into_scalar().elem(),
        None => 0.0,
    };
    (device_sum + visitor.host_sum).sqrt()
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
