//! The names of the network's parameters and the interface through which a model receives
//! them while it is built.
//!
//! Owns: [`WeightKey`], the one key-rename table between HF checkpoint names and our modules
//! (with each parameter's layout and HF's initial standard deviation), and the
//! [`WeightSource`] trait. Must not read files or know how the network is assembled:
//! [`crate::t5`] builds the network from a [`WeightSource`], and [`crate::weights`] implements
//! the sources and the export, so both depend on this module and neither on the other's
//! loading side.

use burn::module::Param;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::config::T5Config;
use crate::error::ModelError;

/// A parameter of the network, named the way HF checkpoints name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WeightKey {
    Shared,
    LmHead,
    RelativeBias {
        decoder: bool,
    },
    Attention {
        decoder: bool,
        block: usize,
        cross: bool,
        /// `q`, `k`, `v` or `o`
        proj: char,
    },
    LayerNorm {
        decoder: bool,
        block: usize,
        sublayer: usize,
    },
    FeedForward {
        decoder: bool,
        block: usize,
        /// `wi`, `wi_0`, `wi_1` or `wo`
        name: &'static str,
    },
    FinalNorm {
        decoder: bool,
    },
}

fn stack_name(decoder: bool) -> &'static str {
    if decoder { "decoder" } else { "encoder" }
}

impl WeightKey {
    /// The HF state-dict key.
    pub fn hf_name(&self) -> String {
        match self {
            WeightKey::Shared => "shared.weight".into(),
            WeightKey::LmHead => "lm_head.weight".into(),
            WeightKey::RelativeBias { decoder } => format!(
                "{}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                stack_name(*decoder)
            ),
            WeightKey::Attention {
                decoder,
                block,
                cross,
                proj,
            } => {
                let (layer, module) = if *cross {
                    (1, "EncDecAttention")
                } else {
                    (0, "SelfAttention")
                };
                format!(
                    "{}.block.{block}.layer.{layer}.{module}.{proj}.weight",
                    stack_name(*decoder)
                )
            }
            WeightKey::LayerNorm {
                decoder,
                block,
                sublayer,
            } => format!(
                "{}.block.{block}.layer.{sublayer}.layer_norm.weight",
                stack_name(*decoder)
            ),
            WeightKey::FeedForward {
                decoder,
                block,
                name,
            } => {
                let layer = if *decoder { 2 } else { 1 };
                format!(
                    "{}.block.{block}.layer.{layer}.DenseReluDense.{name}.weight",
                    stack_name(*decoder)
                )
            }
            WeightKey::FinalNorm { decoder } => {
                format!("{}.final_layer_norm.weight", stack_name(*decoder))
            }
        }
    }

    /// HF stores `nn.Linear` weights as `[out, in]`; we keep `[in, out]` so that
    /// `x.matmul(w)` needs no transpose at run time.
    pub fn transposed(&self) -> bool {
        matches!(
            self,
            WeightKey::LmHead | WeightKey::Attention { .. } | WeightKey::FeedForward { .. }
        )
    }

    /// Standard deviation of HF's `T5PreTrainedModel._init_weights` (None: ones).
    pub(crate) fn init_std(&self, config: &T5Config) -> Option<f64> {
        let factor = config.initializer_factor;
        let d = config.d_model as f64;
        match self {
            WeightKey::Shared | WeightKey::LmHead => Some(factor),
            WeightKey::RelativeBias { .. } => Some(factor * d.powf(-0.5)),
            WeightKey::Attention { proj: 'q', .. } => {
                Some(factor * (d * config.d_kv as f64).powf(-0.5))
            }
            WeightKey::Attention { proj: 'o', .. } => {
                Some(factor * (config.inner_dim() as f64).powf(-0.5))
            }
            WeightKey::Attention { .. } => Some(factor * d.powf(-0.5)),
            WeightKey::FeedForward { name: "wo", .. } => {
                Some(factor * (config.d_ff as f64).powf(-0.5))
            }
            WeightKey::FeedForward { .. } => Some(factor * d.powf(-0.5)),
            WeightKey::LayerNorm { .. } | WeightKey::FinalNorm { .. } => None,
        }
    }
}

/// Where parameters come from while a model is being built.
pub trait WeightSource<B: Backend> {
    /// A matrix parameter in our layout (`shape` is `[in, out]` for linear weights).
    fn param2(
        &mut self,
        key: &WeightKey,
        shape: [usize; 2],
    ) -> Result<Param<Tensor<B, 2>>, ModelError>;
    fn param1(&mut self, key: &WeightKey, len: usize) -> Result<Param<Tensor<B, 1>>, ModelError>;
    /// Whether the source holds `key` (decides tying when the config allows both).
    fn contains(&self, key: &WeightKey) -> bool;
    /// Called once every parameter was taken; reports keys that were never used.
    fn finish(&mut self) -> Result<(), ModelError> {
        Ok(())
    }
}
