//! The settings of local training (`train.toml`, the `[train]` table of `node.toml`), shared
//! by `meshtune train`, the node's trainer thread and the testnet's baselines.
//!
//! Owns: [`TrainConfig`], its defaults and validation, and its translation into the model
//! crate's step arithmetic. Must not touch: data, devices (precision is resolved by the caller
//! from [`crate::device`]) or files.

use meshtune_model::lora::LoraConfig;
use meshtune_model::optim::{AdafactorConfig, AdamWConfig, OptimizerKind, ScheduleKind};
use meshtune_model::precision::{Precision, PrecisionChoice};
use meshtune_model::train::StepConfig;
use serde::{Deserialize, Serialize};

use crate::device::{DeviceChoice, device_info};

/// A train config that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum TrainConfigError {
    #[error("train config: `{0}` must be at least 1")]
    Zero(&'static str),
    #[error("train config: `lr` must be a positive number, got {0}")]
    LearningRate(f64),
    #[error("reading {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid train config {}: {source}", path.display())]
    Parse {
        path: std::path::PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
}

/// Everything that shapes a run; `train.toml` sets any subset of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub warmup_steps: usize,
    pub schedule: ScheduleKind,
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    pub prefix: String,
    pub source_max_len: usize,
    pub target_max_len: usize,
    pub eval_every: usize,
    pub eval_examples: usize,
    pub eval_max_new_tokens: usize,
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    pub lora: LoraConfig,
    /// Compute dtype of the matrix products: `auto` (from the device: bf16 on compute
    /// capability >= 8.0, fp16 with loss scaling on 5.3-7.x, f32 on CPU), `f32`, `bf16`,
    /// `fp16`. Master weights and optimizer state are f32 in every case.
    pub precision: PrecisionChoice,
    /// Recompute element-wise activations in the backward pass instead of keeping them
    /// (burn's balanced checkpointing): -16% peak memory, +6% step time on flan-t5-small.
    pub activation_checkpointing: bool,
    /// `adamw` (the `beta1`, `beta2`, `eps`, `weight_decay` above) or `adafactor` (the
    /// `[adafactor]` table: HF's Adafactor, factored second moments, what T5 was trained with).
    pub optimizer: OptimizerName,
    pub adafactor: AdafactorConfig,
}

/// `optimizer = "adamw" | "adafactor"` in train.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    #[default]
    AdamW,
    Adafactor,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 16,
            grad_accum: 1,
            lr: 1e-3,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 50,
            schedule: ScheduleKind::Linear,
            max_grad_norm: Some(1.0),
            seed: 42,
            prefix: "summarize: ".into(),
            source_max_len: 512,
            target_max_len: 128,
            eval_every: 100,
            eval_examples: 100,
            eval_max_new_tokens: 48,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            lora: LoraConfig::default(),
            precision: PrecisionChoice::Auto,
            activation_checkpointing: false,
            optimizer: OptimizerName::AdamW,
            adafactor: AdafactorConfig::default(),
        }
    }
}

impl TrainConfig {
    /// Reads a train config TOML file (`meshtune train --config`, `model export
    /// --train-config`); the error names the file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, TrainConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| TrainConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    pub fn validate(&self) -> Result<(), TrainConfigError> {
        for (name, value) in [
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("eval_every", self.eval_every),
            ("checkpoint_every", self.checkpoint_every),
            ("source_max_len", self.source_max_len),
            ("target_max_len", self.target_max_len),
        ] {
            if value == 0 {
                return Err(TrainConfigError::Zero(name));
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(TrainConfigError::LearningRate(self.lr));
        }
        Ok(())
    }

    /// Replaces `auto` with the precision `device` calls for, and logs the choice and why.
    pub fn resolve_precision(&mut self, device: DeviceChoice) -> Precision {
        let (precision, reason) =
            meshtune_model::precision::resolve_precision(self.precision, &device_info(device));
        tracing::info!(%precision, reason, "training precision");
        self.precision = PrecisionChoice::Fixed(precision);
        precision
    }

    /// The step arithmetic; an unresolved `auto` precision is f32 (the CPU choice).
    pub fn step_config(&self) -> StepConfig {
        StepConfig {
            lr: self.lr,
            adamw: AdamWConfig {
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay: self.weight_decay,
            },
            schedule: self.schedule,
            warmup_steps: self.warmup_steps,
            total_steps: self.steps,
            max_grad_norm: self.max_grad_norm,
            precision: match self.precision {
                PrecisionChoice::Auto => Precision::F32,
                PrecisionChoice::Fixed(p) => p,
            },
            optimizer: match self.optimizer {
                OptimizerName::AdamW => OptimizerKind::AdamW,
                OptimizerName::Adafactor => OptimizerKind::Adafactor(self.adafactor),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_optimizer_is_chosen_in_train_toml() {
        let config: TrainConfig =
            toml::from_str("optimizer = \"adafactor\"\n[adafactor]\nbeta1 = 0.9\n").expect("toml");
        match config.step_config().optimizer {
            OptimizerKind::Adafactor(a) => {
                assert_eq!(a.beta1, Some(0.9));
                assert!(a.scale_parameter && !a.relative_step);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            TrainConfig::default().step_config().optimizer,
            OptimizerKind::AdamW
        );
        let err = toml::from_str::<TrainConfig>("optimizer = \"sgd\"").expect_err("unknown");
        assert!(err.to_string().contains("sgd"), "{err}");
        let err = toml::from_str::<TrainConfig>("[adafactor]\nbeta = 0.9").expect_err("typo");
        assert!(err.to_string().contains("beta"), "{err}");
    }

    #[test]
    fn config_file_errors_name_the_key() {
        let err = toml::from_str::<TrainConfig>("stepz = 3").expect_err("unknown key");
        assert!(err.to_string().contains("stepz"), "{err}");
        let config: TrainConfig = toml::from_str(
            "steps = 7\n[lora]\nrank = 4\nalpha = 8.0\ndropout = 0.0\ntargets = [\"q\", \"v\"]",
        )
        .expect("valid");
        assert_eq!(config.steps, 7);
        assert_eq!(config.lora.rank, 4);
        let bad = TrainConfig {
            batch_size: 0,
            ..TrainConfig::default()
        };
        assert!(
            bad.validate()
                .expect_err("zero")
                .to_string()
                .contains("batch_size")
        );
    }

    #[test]
    fn a_missing_or_malformed_config_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.toml");
        let err = TrainConfig::from_file(&missing).expect_err("missing");
        assert!(matches!(err, TrainConfigError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.toml"), "{err}");
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "steps = \"seven\"").expect("write");
        let err = TrainConfig::from_file(&bad).expect_err("malformed");
        assert!(matches!(err, TrainConfigError::Parse { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("bad.toml") && text.contains("steps"),
            "{text}"
        );
    }
}
