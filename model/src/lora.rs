//! LoRA (low-rank adaptation) with PEFT's math: `W x + (alpha / r) * B(A x)`, A initialised
//! with `kaiming_uniform_(a=sqrt(5))` (bound `1/sqrt(in)`), B with zeros, base weights frozen.
//! Merge folds the adapters into the weights so the result exports as a plain HF folder.
//!
//! Owns: attaching, initialising, merging adapters. Must not touch the forward pass: it lives
//! in `t5.rs`.

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::DropoutConfig;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use safetensors::SafeTensors;

use crate::error::ModelError;
use crate::t5::{Attention, LoraAdapter, T5};
use crate::weight_key::WeightKey;

/// Which attention projections get adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
}

impl LoraTarget {
    fn proj(self) -> char {
        match self {
            LoraTarget::Q => 'q',
            LoraTarget::K => 'k',
            LoraTarget::V => 'v',
            LoraTarget::O => 'o',
        }
    }
}

/// Rank, alpha, dropout and targets; the default is rank 8 on q and v of every attention
/// (encoder self-attention, decoder self- and cross-attention).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec![LoraTarget::Q, LoraTarget::V],
        }
    }
}

/// Initial adapter weights for one projection, in our layout (`a`: `[in, r]`, `b`: `[r, out]`).
pub trait LoraInit<B: Backend> {
    /// `module` is the HF path of the projection, e.g. `encoder.block.0.layer.0.SelfAttention.q`.
    fn init(
        &mut self,
        module: &str,
        d_in: usize,
        d_out: usize,
        rank: usize,
    ) -> Result<(Tensor<B, 2>, Tensor<B, 2>), ModelError>;
}

/// PEFT's default initialisation from the backend's seeded generator.
pub struct PeftInit<B: Backend> {
    pub device: B::Device,
}

impl<B: Backend> LoraInit<B> for PeftInit<B> {
    fn init(
        &mut self,
        _module: &str,
        d_in: usize,
        d_out: usize,
        rank: usize,
    ) -> Result<(Tensor<B, 2>, Tensor<B, 2>), ModelError> {
        // kaiming_uniform_(a=sqrt(5)) on lora_A [r, in]: gain sqrt(2/(1+5)), bound
        // gain*sqrt(3/fan_in) = 1/sqrt(fan_in).
        let bound = 1.0 / (d_in as f64).sqrt();
        let a = Tensor::random(
            [d_in, rank],
            Distribution::Uniform(-bound, bound),
            &self.device,
        );
        Ok((a, Tensor::zeros([rank, d_out], &self.device)))
    }
}

/// Adapter weights saved with PEFT-style names (`<module>.lora_A.weight` `[r, in]`,
/// `<module>.lora_B.weight` `[out, r]`), e.g. by scripts/make_train_fixture.py.
pub struct SafetensorsLoraInit<B: Backend> {
    bytes: Vec<u8>,
    path: std::path::PathBuf,
    device: B::Device,
}

impl<B: Backend> SafetensorsLoraInit<B> {
    pub fn open(path: &Path, device: &B::Device) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        SafeTensors::deserialize(&bytes).map_err(|err| ModelError::Weights {
            path: path.to_path_buf(),
            reason: format!("not a valid safetensors file: {err}"),
        })?;
        Ok(Self {
            bytes,
            path: path.to_path_buf(),
            device: device.clone(),
        })
    }

    fn read(&self, key: &str, hf_shape: [usize; 2]) -> Result<Tensor<B, 2>, ModelError> {
        let st = SafeTensors::deserialize(&self.bytes).map_err(|err| ModelError::Weights {
            path: self.path.clone(),
            reason: err.to_string(),
        })?;
        let view = st.tensor(key).map_err(|_| ModelError::MissingTensor {
            path: self.path.clone(),
            key: key.to_string(),
        })?;
        if view.shape() != hf_shape {
            return Err(ModelError::ShapeMismatch {
                path: self.path.clone(),
                key: key.to_string(),
                expected: hf_shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(ModelError::UnsupportedDtype {
                path: self.path.clone(),
                key: key.to_string(),
                dtype: format!("{:?}", view.dtype()),
            });
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Tensor::<B, 2>::from_data(TensorData::new(values, hf_shape), &self.device).transpose())
    }
}

impl<B: Backend> LoraInit<B> for SafetensorsLoraInit<B> {
    fn init(
        &mut self,
        module: &str,
        d_in: usize,
        d_out: usize,
        rank: usize,
    ) -> Result<(Tensor<B, 2>, Tensor<B, 2>), ModelError> {
        let a = self.read(&format!("{module}.lora_A.weight"), [rank, d_in])?;
        let b = self.read(&format!("{module}.lora_B.weight"), [d_out, rank])?;
        Ok((a, b))
    }
}

/// Every attention of the model with its place in the HF layout.
fn attentions_mut<B: Backend>(model: &mut T5<B>) -> Vec<(bool, usize, bool, &mut Attention<B>)> {
    let mut out = Vec::new();
    for (block, layer) in model.encoder.blocks.iter_mut().enumerate() {
        out.push((false, block, false, &mut layer.self_attention));
    }
    for (block, layer) in model.decoder.blocks.iter_mut().enumerate() {
        out.push((true, block, false, &mut layer.self_attention));
        if let Some(cross) = layer.cross_attention.as_mut() {
            out.push((true, block, true, cross));
        }
    }
    out
}

fn slot<B: Backend>(
    attention: &mut Attention<B>,
    target: LoraTarget,
) -> &mut Option<LoraAdapter<B>> {
    match target {
        LoraTarget::Q => &mut attention.lora_q,
        LoraTarget::K => &mut attention.lora_k,
        LoraTarget::V => &mut attention.lora_v,
        LoraTarget::O => &mut attention.lora_o,
    }
}

/// Freezes the model and attaches trainable adapters to the configured projections.
pub fn attach_lora<B: Backend>(
    model: T5<B>,
    config: &LoraConfig,
    init: &mut dyn LoraInit<B>,
) -> Result<T5<B>, ModelError> {
    if config.rank == 0 {
        return Err(ModelError::Config {
            key: "lora.rank".into(),
            reason: "must be >= 1".into(),
        });
    }
    if config.targets.is_empty() {
        return Err(ModelError::Config {
            key: "lora.targets".into(),
            reason: "name at least one of q, k, v, o".into(),
        });
    }
    let mut model = model.no_grad();
    let scale = config.alpha / config.rank as f64;
    for (decoder, block, cross, attention) in attentions_mut(&mut model) {
        for &target in &config.targets {
            let weight = match target {
                LoraTarget::Q => &attention.q,
                LoraTarget::K => &attention.k,
                LoraTarget::V => &attention.v,
                LoraTarget::O => &attention.o,
            };
            let [d_in, d_out] = weight.dims();
            let key = WeightKey::Attention {
                decoder,
                block,
                cross,
                proj: target.proj(),
            }
            .hf_name();
            let module = key.trim_end_matches(".weight");
            let (a, b) = init.init(module, d_in, d_out, config.rank)?;
            *slot(attention, target) = Some(LoraAdapter {
                a: Param::from_tensor(a),
                b: Param::from_tensor(b),
                scale,
                dropout: DropoutConfig::new(config.dropout).init(),
            });
        }
    }
    Ok(model)
}

/// Folds every adapter into its weight (`W += scale * A^T B^T` in our layout) and removes it.
pub fn merge_lora<B: Backend>(mut model: T5<B>) -> T5<B> {
    for (_, _, _, attention) in attentions_mut(&mut model) {
        for target in [LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O] {
            if let Some(adapter) = slot(attention, target).take() {
                let weight = match target {
                    LoraTarget::Q => &mut attention.q,
                    LoraTarget::K => &mut attention.k,
                    LoraTarget::V => &mut attention.v,
                    LoraTarget::O => &mut attention.o,
                };
                let merged = weight.val() + adapter.merged_delta();
                *weight = Param::from_tensor(merged);
            }
        }
    }
    model
}

/// Number of trainable adapter parameters.
pub fn lora_parameter_count<B: Backend>(model: &mut T5<B>) -> usize {
    attentions_mut(model)
        .into_iter()
        .map(|(_, _, _, attention)| {
            [
                &attention.lora_q,
                &attention.lora_k,
                &attention.lora_v,
                &attention.lora_o,
            ]
            .into_iter()
            .flatten()
            .map(|a| a.a.val().shape().num_elements() + a.b.val().shape().num_elements())
            .sum::<usize>()
        })
        .sum()
}
