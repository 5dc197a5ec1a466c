//! One optimizer step of local fine-tuning: gradient accumulation over micro-batches, global
//! gradient-norm clipping, the learning-rate schedule, and torch-semantics AdamW.
//!
//! Owns: the step arithmetic. Must not touch data order, checkpoints or progress reporting:
//! they belong to callers (the `meshtune train` command and the node's trainer thread).

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::ElementConversion;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::backend::Backend;

use crate::error::ModelError;
use crate::optim::{
    AdamW, AdamWConfig, OptimizerKind, ScheduleKind, clip_coefficient, global_grad_norm,
    lr_multiplier,
};
use crate::precision::{LossScaler, Precision};
use crate::score::{Seq2SeqBatch, batch_loss};
use crate::t5::T5;

/// Optimizer and schedule settings of a run (the parts that change the arithmetic).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepConfig {
    pub lr: f64,
    pub adamw: AdamWConfig,
    pub schedule: ScheduleKind,
    pub warmup_steps: usize,
    pub total_steps: usize,
    /// Global-norm clipping threshold; `None` disables clipping.
    pub max_grad_norm: Option<f64>,
    /// Dtype of the matrix products (master weights and optimizer state stay f32); fp16 adds
    /// dynamic loss scaling.
    #[serde(default)]
    pub precision: Precision,
    /// AdamW (with `adamw`) or Adafactor.
    #[serde(default)]
    pub optimizer: OptimizerKind,
}

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StepStats {
    /// 0-based index of the step just taken.
    pub step: usize,
    /// Sum over micro-batches of (micro-batch mean token loss / number of micro-batches).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used for this step.
    pub lr: f64,
    /// Target tokens seen.
    pub tokens: usize,
    /// The loss scale this step used (fp16 only).
    pub loss_scale: Option<f64>,
    /// The scaled gradients overflowed: no update was made and the scale was halved.
    pub skipped: bool,
}

/// A model under training with its optimizer state and step counter.
#[derive(Debug)]
pub struct TrainState<B: AutodiffBackend> {
    pub model: T5<B>,
    pub optimizer: AdamW<B::InnerBackend>,
    pub step: usize,
    pub config: StepConfig,
    /// Dynamic loss scaling (fp16 only).
    pub scaler: Option<LossScaler>,
}

impl<B: AutodiffBackend> TrainState<B> {
    /// `model` computing in `config.precision`.
    pub fn new(model: T5<B>, config: StepConfig) -> Self {
        Self {
            model: model.with_precision(config.precision),
            optimizer: AdamW::of_kind(config.optimizer, config.adamw),
            step: 0,
            scaler: config
                .precision
                .needs_loss_scaling()
                .then(LossScaler::default),
            config,
        }
    }

    pub fn current_lr(&self) -> f64 {
        self.config.lr
            * lr_multiplier(
                self.config.schedule,
                self.step,
                self.config.warmup_steps,
                self.config.total_steps,
            )
    }

    /// One optimizer step over `micro_batches` (gradient accumulation: each micro-batch's mean
    /// loss is divided by their number, as `loss / accum` then `backward` in PyTorch).
    pub fn step(&mut self, micro_batches: &[Seq2SeqBatch]) -> Result<StepStats, ModelError> {
        if micro_batches.is_empty() {
            return Err(ModelError::Input(
                "a training step needs at least one batch".into(),
            ));
        }
        let device = self.model.device();
        let accum = micro_batches.len() as f64;
        let mut accumulator = GradientsAccumulator::<T5<B>>::new();
        let mut loss_sum = 0.0;
        let mut tokens = 0;
        let loss_scale = self.scaler.as_ref().map(|s| s.scale);
        for batch in micro_batches {
            let t = batch.tensors::<B>(&device);
            let (_, logits) =
                self.model
                    .forward(t.input_ids, t.attention_mask, t.decoder_input_ids);
            let loss = batch_loss(logits, t.labels).div_scalar(accum);
            let value: f64 = loss.clone().into_scalar().elem();
            if !value.is_finite() {
                return Err(ModelError::Input(format!(
                    "loss is {value} at step {}: stopping before the update (the last good \
                     weights are unchanged)",
                    self.step
                )));
            }
            loss_sum += value;
            tokens += batch.target_tokens();
            let loss = match loss_scale {
                Some(scale) => loss.mul_scalar(scale),
                None => loss,
            };
            let grads = GradientsParams::from_grads::<B, T5<B>>(loss.backward(), &self.model);
            accumulator.accumulate::<B>(&self.model, grads);
        }
        let grads = accumulator.grads();
        let grad_norm = global_grad_norm::<B, T5<B>>(&self.model, &grads);
        if let (Some(scaler), Some(scale)) = (self.scaler.as_mut(), loss_scale)
            && !scaler.update(grad_norm.is_finite())
        {
            // fp16 overflow: skip the update (the schedule does not advance either, as in
            // HF's Trainer) and retry the next batch at half the scale.
            return Ok(StepStats {
                step: self.step,
                loss: loss_sum,
                grad_norm,
                lr: self.current_lr(),
                tokens,
                loss_scale: Some(scale),
                skipped: true,
            });
        }
        // Scaled gradients: the norm, and the factor the optimizer applies, are unscaled.
        let unscale = loss_scale.unwrap_or(1.0);
        let grad_norm = grad_norm / unscale;
        if !grad_norm.is_finite() {
            return Err(ModelError::Input(format!(
                "gradient norm is {grad_norm} at step {}: skipping the update",
                self.step
            )));
        }
        let lr = self.current_lr();
        let coefficient = clip_coefficient(grad_norm, self.config.max_grad_norm) / unscale;
        // The optimizer gets the only handle on every parameter, so that it updates them in
        // place: a clone left in `self.model` would make it copy each one first.
        let placeholder = self.model.clone().map(&mut Emptied);
        let model = std::mem::replace(&mut self.model, placeholder);
        self.model = self
            .optimizer
            .step::<B, T5<B>>(lr, model, grads, coefficient);
        let stats = StepStats {
            step: self.step,
            loss: loss_sum,
            grad_norm,
            lr,
            tokens,
            loss_scale,
            skipped: false,
        };
        self.step += 1;
        Ok(stats)
    }

    /// The model without autodiff, for evaluation and export.
    pub fn inference_model(&self) -> T5<B::InnerBackend> {
        self.model.valid()
    }
}

/// Maps every parameter to a one-element zero tensor: a stand-in model that shares no buffer
/// with the real one, held by [`TrainState::model`] while the optimizer owns the real one.
struct Emptied;

impl<B: Backend> ModuleMapper<B> for Emptied {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let stand_in = Tensor::zeros([1; D], &tensor.device());
        Param::from_mapped_value(id, stand_in, mapper)
    }
}
