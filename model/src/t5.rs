//! The T5 network (HF `T5ForConditionalGeneration`, v1.0 and v1.1/FLAN), generic over a burn
//! [`Backend`].
//!
//! Owns: the layers, the forward pass for teacher forcing, and the incremental decoder with a
//! KV cache. Weights come in through [`WeightSource`](crate::weight_key::WeightSource);
//! nothing here reads files.
//!
//! Faithful details (checked against transformers' `modeling_t5.py`):
//! - RMS layer norm without mean subtraction or bias;
//! - attention scores are *not* scaled by 1/sqrt(d_kv);
//! - relative position buckets: bidirectional in the encoder, causal in the decoder, one table
//!   per stack (stored in block 0 in HF checkpoints) shared by all its layers; cross-attention
//!   has no position bias;
//! - tied embeddings (original T5) rescale the decoder output by d_model^-0.5.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::activation::{gelu, relu, silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::{attention, embedding, linear};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};

use crate::config::{DenseActivation, T5Config};
use crate::error::ModelError;
use crate::precision::Precision;
use crate::weight_key::{WeightKey, WeightSource};

/// Additive bias for masked positions. Finite so that bf16/f16 compute does not produce
/// `inf - inf`; `exp(-1e9 - max)` is exactly 0 in f32 just like HF's `finfo.min`.
pub const MASK_BIAS: f32 = -1.0e9;

/// T5 layer norm: `weight * x / sqrt(mean(x^2) + eps)`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let weight = self.weight.val();
        if let Some(normed) = crate::kernels::rms_norm(&x, &weight, self.eps) {
            return normed;
        }
        let variance = x.clone().powi_scalar(2).mean_dim(2);
        let inv = (variance + self.eps).sqrt().recip();
        x * inv * weight.unsqueeze::<3>()
    }
}

/// Multi-head attention with `inner_dim = num_heads * d_kv`, weights stored `[in, out]`.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q: Param<Tensor<B, 2>>,
    pub k: Param<Tensor<B, 2>>,
    pub v: Param<Tensor<B, 2>>,
    pub o: Param<Tensor<B, 2>>,
    /// Low-rank adapters (LoRA) on each projection, `None` when not adapted.
    pub lora_q: Option<LoraAdapter<B>>,
    pub lora_k: Option<LoraAdapter<B>>,
    pub lora_v: Option<LoraAdapter<B>>,
    pub lora_o: Option<LoraAdapter<B>>,
    pub num_heads: usize,
    pub d_kv: usize,
    pub dropout: Dropout,
    /// Dtype of the projections and score products (f32 master weights either way).
    #[module(skip)]
    pub precision: Precision,
}

/// LoRA: `x W + scale * dropout(x) A^T B^T`, stored in our `[in, out]` layout:
/// `a` is `[in, rank]` (PEFT's `lora_A.weight` transposed), `b` is `[rank, out]`.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    pub a: Param<Tensor<B, 2>>,
    pub b: Param<Tensor<B, 2>>,
    /// alpha / rank
    pub scale: f64,
    pub dropout: Dropout,
}

impl<B: Backend> LoraAdapter<B> {
    pub fn delta<const D: usize>(&self, x: Tensor<B, D>, precision: Precision) -> Tensor<B, D> {
        let low = mixed_linear(apply_dropout(&self.dropout, x), self.a.val(), precision);
        mixed_linear(low, self.b.val(), precision).mul_scalar(self.scale)
    }

    /// The dense update `scale * A^T B^T` (`[in, out]`), what merging adds to the weight.
    pub fn merged_delta(&self) -> Tensor<B, 2> {
        self.a.val().matmul(self.b.val()).mul_scalar(self.scale)
    }
}

/// `x W` with both operands cast to the compute dtype and the product cast back to f32 (what
/// autocast does for a linear layer); plain f32 `x W` under [`Precision::F32`]. The casts are
/// differentiable: gradients reach the f32 weight in f32.
///
/// The leading dimensions are flattened first, so that the product is one `[rows, in] x
/// [in, out]` matrix product rather than a batch of them against a broadcast weight: the
/// weight's gradient is then one product over all rows, instead of one `[in, out]` product per
/// batch element (with an inner dimension of one sequence) summed afterwards, which made
/// training much slower on CPU.
pub fn mixed_linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    precision: Precision,
) -> Tensor<B, D> {
    let dims = x.dims();
    let mut out_dims = dims;
    out_dims[D - 1] = weight.dims()[1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let flat: Tensor<B, 2> = x.reshape([rows, dims[D - 1]]);
    let product = match precision.compute_dtype() {
        None => match crate::kernels::matmul(&flat, &weight) {
            Some(product) => product,
            None => linear(flat, weight, None),
        },
        Some(dtype) => linear(flat.cast(dtype), weight.cast(dtype), None).cast(FloatDType::F32),
    };
    product.reshape(out_dims)
}

/// `a b` (batched) in the compute dtype, the product back in f32.
fn mixed_matmul<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
    precision: Precision,
) -> Tensor<B, D> {
    match precision.compute_dtype() {
        None => match crate::kernels::matmul(&a, &b) {
            Some(product) => product,
            None => a.matmul(b),
        },
        Some(dtype) => a.cast(dtype).matmul(b.cast(dtype)).cast(FloatDType::F32),
    }
}

fn adapted_linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: &Param<Tensor<B, 2>>,
    lora: &Option<LoraAdapter<B>>,
    precision: Precision,
) -> Tensor<B, D> {
    match lora {
        Some(adapter) => {
            mixed_linear(x.clone(), weight.val(), precision) + adapter.delta(x, precision)
        }
        None => mixed_linear(x, weight.val(), precision),
    }
}

impl<B: Backend> Attention<B> {
    /// `[B, L, d_model] -> [B, H, L, d_kv]`
    fn project(
        &self,
        x: Tensor<B, 3>,
        weight: &Param<Tensor<B, 2>>,
        lora: &Option<LoraAdapter<B>>,
    ) -> Tensor<B, 4> {
        let [batch, len, _] = x.dims();
        let heads = adapted_linear(x, weight, lora, self.precision).reshape([
            batch,
            len,
            self.num_heads,
            self.d_kv,
        ]);
        crate::kernels::swap_heads(&heads, true).unwrap_or_else(|| heads.swap_dims(1, 2))
    }

    pub fn keys_values(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        (
            self.project(x.clone(), &self.k, &self.lora_k),
            self.project(x, &self.v, &self.lora_v),
        )
    }

    pub fn queries(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        self.project(x, &self.q, &self.lora_q)
    }

    /// Attention of `q` over `k`/`v` with an additive `bias` broadcastable to
    /// `[B, H, Lq, Lk]`, followed by the output projection.
    pub fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        bias: &AttentionBias<B>,
    ) -> Tensor<B, 3> {
        let [batch, heads, q_len, d_kv] = q.dims();
        let k_len = k.dims()[2];
        let explicit = B::ad_enabled(&q.device()) && self.dropout.prob > 0.0;
        let context =
            if crate::kernels::fused::<B>() || explicit || self.precision != Precision::F32 {
                // The explicit form: training with dropout on the attention weights, as HF does;
                // mixed precision (products in the compute dtype, softmax in f32); and the CPU
                // backends, whose fused bias + softmax kernel beats their attention op.
                let scores = mixed_matmul(q, k.swap_dims(2, 3), self.precision);
                let weights = crate::kernels::softmax_with_bias(scores, &bias.terms)
                    .unwrap_or_else(|scores| {
                        softmax(
                            scores + bias.summed().expand([batch, heads, q_len, k_len]),
                            3,
                        )
                    });
                mixed_matmul(apply_dropout(&self.dropout, weights), v, self.precision)
            } else {
                let options = AttentionModuleOptions {
                    scale: Some(1.0),
                    softcap: None,
                    is_causal: false,
                };
                let bias = bias.summed().expand([batch, heads, q_len, k_len]);
                attention(q, k, v, None, Some(bias), options)
            };
        let merged = crate::kernels::swap_heads(&context, false)
            .unwrap_or_else(|| context.swap_dims(1, 2))
            .reshape([batch, q_len, heads * d_kv]);
        adapted_linear(merged, &self.o, &self.lora_o, self.precision)
    }
}

/// `dropout.forward(x)`, through the fused CPU kernel when training on CPU (burn's dropout draws
/// each mask element through its generic distribution sampler: an eighth of a LoRA training
/// step of flan-t5-small).
fn apply_dropout<B: Backend, const D: usize>(dropout: &Dropout, x: Tensor<B, D>) -> Tensor<B, D> {
    if dropout.prob > 0.0
        && B::ad_enabled(&x.device())
        && let Some(dropped) = crate::kernels::dropout(&x, dropout.prob)
    {
        return dropped;
    }
    dropout.forward(x)
}

/// HF `gelu_new` (tanh approximation) with the cube as two products: burn's
/// `gelu_approximate` computes `x^3` with `powf`, much slower on CPU.
pub fn gelu_new<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
    let cube = x.clone() * x.clone() * x.clone();
    let inner = (x.clone() + cube * 0.044715) * SQRT_2_OVER_PI;
    (x * (inner.tanh() + 1)) * 0.5
}

/// Additive attention bias as terms broadcastable to `[B, H, Lq, Lk]` (position bias, padding
/// mask, causal mask). The fused CPU kernel adds the terms row by row without materializing
/// their sum; for every other backend they are summed once, when the bias is built.
#[derive(Debug, Clone)]
pub struct AttentionBias<B: Backend> {
    terms: Vec<Tensor<B, 4>>,
}

impl<B: Backend> AttentionBias<B> {
    /// `terms` must not be empty.
    pub fn new(terms: Vec<Tensor<B, 4>>) -> Self {
        if crate::kernels::fused::<B>() {
            return Self { terms };
        }
        Self {
            terms: terms.into_iter().reduce(|a, b| a + b).into_iter().collect(),
        }
    }

    fn summed(&self) -> Tensor<B, 4> {
        self.terms
            .iter()
            .cloned()
            .reduce(|a, b| a + b)
            .expect("an attention bias has at least one term")
    }
}

/// T5 feed-forward block: `wo(act(wi_0 x) * wi_1 x)` when gated, `wo(act(wi x))` otherwise.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// `wi` (plain) or `wi_0` (gated, the activated branch), `[d_model, d_ff]`.
    pub wi: Param<Tensor<B, 2>>,
    /// `wi_1` (gated only, the linear branch), `[d_model, d_ff]`.
    pub wi_linear: Option<Param<Tensor<B, 2>>>,
    pub wo: Param<Tensor<B, 2>>,
    #[module(skip)]
    pub activation: DenseActivation,
    pub dropout: Dropout,
    #[module(skip)]
    pub precision: Precision,
}

impl<B: Backend> FeedForward<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let hidden = mixed_linear(x.clone(), self.wi.val(), self.precision);
        let gate = self
            .wi_linear
            .as_ref()
            .map(|wi_linear| mixed_linear(x, wi_linear.val(), self.precision));
        let fused = match (self.activation, &gate) {
            (DenseActivation::GeluNew, Some(gate)) => crate::kernels::gelu_new_gated(&hidden, gate),
            _ => None,
        };
        let hidden = fused.unwrap_or_else(|| {
            let activated = match self.activation {
                DenseActivation::Relu => relu(hidden),
                DenseActivation::Gelu => gelu(hidden),
                DenseActivation::GeluNew => gelu_new(hidden),
                DenseActivation::Silu => silu(hidden),
            };
            match gate {
                Some(gate) => activated * gate,
                None => activated,
            }
        });
        mixed_linear(
            apply_dropout(&self.dropout, hidden),
            self.wo.val(),
            self.precision,
        )
    }
}

/// One encoder or decoder block: self-attention, cross-attention (decoder only), feed-forward,
/// each pre-normed and residual.
#[derive(Module, Debug)]
pub struct T5Block<B: Backend> {
    pub self_norm: RmsNorm<B>,
    pub self_attention: Attention<B>,
    pub cross_norm: Option<RmsNorm<B>>,
    pub cross_attention: Option<Attention<B>>,
    pub ff_norm: RmsNorm<B>,
    pub feed_forward: FeedForward<B>,
    pub dropout: Dropout,
}

/// Keys and values of one decoder block, kept across generation steps.
#[derive(Debug, Clone)]
pub struct BlockCache<B: Backend> {
    pub self_k: Option<Tensor<B, 4>>,
    pub self_v: Option<Tensor<B, 4>>,
    pub cross_k: Tensor<B, 4>,
    pub cross_v: Tensor<B, 4>,
}

impl<B: Backend> T5Block<B> {
    fn self_attention_residual(
        &self,
        hidden: Tensor<B, 3>,
        bias: &AttentionBias<B>,
    ) -> Tensor<B, 3> {
        let normed = self.self_norm.forward(hidden.clone());
        let q = self.self_attention.queries(normed.clone());
        let (k, v) = self.self_attention.keys_values(normed);
        hidden + apply_dropout(&self.dropout, self.self_attention.attend(q, k, v, bias))
    }

    fn feed_forward_residual(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let normed = self.ff_norm.forward(hidden.clone());
        hidden + apply_dropout(&self.dropout, self.feed_forward.forward(normed))
    }

    fn cross_attention_residual(
        &self,
        hidden: Tensor<B, 3>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        cross_bias: &AttentionBias<B>,
    ) -> Tensor<B, 3> {
        match (&self.cross_norm, &self.cross_attention) {
            (Some(norm), Some(cross)) => {
                let q = cross.queries(norm.forward(hidden.clone()));
                hidden + apply_dropout(&self.dropout, cross.attend(q, k, v, cross_bias))
            }
            _ => hidden,
        }
    }

    fn cross_keys_values(&self, encoder_out: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        match &self.cross_attention {
            Some(cross) => cross.keys_values(encoder_out),
            None => unreachable_cross(),
        }
    }
}

fn unreachable_cross<T>() -> T {
    // Decoder blocks are always built with cross-attention (see `T5::from_source`).
    panic!("decoder block without cross-attention")
}

/// An encoder or decoder stack with its shared relative position bias table.
#[derive(Module, Debug)]
pub struct T5Stack<B: Backend> {
    /// `[num_buckets, num_heads]`, HF `block.0.layer.0.SelfAttention.relative_attention_bias`.
    pub relative_attention_bias: Param<Tensor<B, 2>>,
    pub blocks: Vec<T5Block<B>>,
    pub final_norm: RmsNorm<B>,
    pub dropout: Dropout,
    pub is_decoder: bool,
    pub num_buckets: usize,
    pub max_distance: usize,
}

impl<B: Backend> T5Stack<B> {
    /// Position bias `[1, H, q_len, k_len]` for queries at `q_offset..q_offset+q_len`.
    fn position_bias(&self, q_offset: usize, q_len: usize, k_len: usize) -> Tensor<B, 4> {
        let device = self.relative_attention_bias.device();
        let mut buckets = Vec::with_capacity(q_len * k_len);
        for q in q_offset..q_offset + q_len {
            for k in 0..k_len {
                let relative = k as i64 - q as i64;
                buckets.push(relative_position_bucket(
                    relative,
                    !self.is_decoder,
                    self.num_buckets,
                    self.max_distance,
                ) as i64);
            }
        }
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(buckets, [q_len, k_len]), &device);
        // [q, k, H] -> [H, q, k] -> [1, H, q, k]
        embedding(self.relative_attention_bias.val(), ids)
            .permute([2, 0, 1])
            .unsqueeze::<4>()
    }

    /// Full encoder pass. `mask_bias`: `[B, 1, 1, S]` (0 for tokens, [`MASK_BIAS`] for padding).
    pub fn encode(&self, embedded: Tensor<B, 3>, mask_bias: Tensor<B, 4>) -> Tensor<B, 3> {
        let len = embedded.dims()[1];
        let bias = AttentionBias::new(vec![self.position_bias(0, len, len), mask_bias]);
        let mut hidden = apply_dropout(&self.dropout, embedded);
        for block in &self.blocks {
            hidden = block.self_attention_residual(hidden, &bias);
            hidden = block.feed_forward_residual(hidden);
        }
        apply_dropout(&self.dropout, self.final_norm.forward(hidden))
    }

    /// Full (teacher-forced) decoder pass over `[B, T, d]` embeddings.
    pub fn decode(
        &self,
        embedded: Tensor<B, 3>,
        encoder_out: Tensor<B, 3>,
        cross_bias: Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let len = embedded.dims()[1];
        let device = embedded.device();
        let causal = causal_bias::<B>(len, &device);
        let bias = AttentionBias::new(vec![self.position_bias(0, len, len), causal]);
        let cross_bias = AttentionBias::new(vec![cross_bias]);
        let mut hidden = apply_dropout(&self.dropout, embedded);
        for block in &self.blocks {
            hidden = block.self_attention_residual(hidden, &bias);
            let (k, v) = block.cross_keys_values(encoder_out.clone());
            hidden = block.cross_attention_residual(hidden, k, v, &cross_bias);
            hidden = block.feed_forward_residual(hidden);
        }
        apply_dropout(&self.dropout, self.final_norm.forward(hidden))
    }

    /// One incremental decoder step over `[N, 1, d]` embeddings at position `step`.
    pub fn decode_step(
        &self,
        embedded: Tensor<B, 3>,
        step: usize,
        caches: &mut [BlockCache<B>],
        cross_bias: &Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let bias = AttentionBias::new(vec![self.position_bias(step, 1, step + 1)]);
        let cross_bias = AttentionBias::new(vec![cross_bias.clone()]);
        let mut hidden = embedded;
        for (block, cache) in self.blocks.iter().zip(caches.iter_mut()) {
            let normed = block.self_norm.forward(hidden.clone());
            let q = block.self_attention.queries(normed.clone());
            let (k_new, v_new) = block.self_attention.keys_values(normed);
            let k = match cache.self_k.take() {
                Some(past) => Tensor::cat(vec![past, k_new], 2),
                None => k_new,
            };
            let v = match cache.self_v.take() {
                Some(past) => Tensor::cat(vec![past, v_new], 2),
                None => v_new,
            };
            let attended = block.self_attention.attend(q, k.clone(), v.clone(), &bias);
            cache.self_k = Some(k);
            cache.self_v = Some(v);
            hidden = hidden + attended;
            hidden = block.cross_attention_residual(
                hidden,
                cache.cross_k.clone(),
                cache.cross_v.clone(),
                &cross_bias,
            );
            hidden = block.feed_forward_residual(hidden);
        }
        self.final_norm.forward(hidden)
    }
}

/// `[1, 1, T, T]` additive causal mask.
fn causal_bias<B: Backend>(len: usize, device: &B::Device) -> Tensor<B, 4> {
    let mut values = Vec::with_capacity(len * len);
    for q in 0..len {
        for k in 0..len {
            values.push(if k > q { MASK_BIAS } else { 0.0 });
        }
    }
    Tensor::<B, 2>::from_data(TensorData::new(values, [len, len]), device).unsqueeze::<4>()
}

/// HF `T5Attention._relative_position_bucket`, including its float32 rounding.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut num_buckets = num_buckets as i64;
    let mut bucket = 0i64;
    let position = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            bucket += num_buckets;
        }
        relative_position.abs()
    } else {
        -relative_position.min(0)
    };
    let max_exact = num_buckets / 2;
    if position < max_exact {
        bucket += position;
    } else {
        // torch: log(rp.float() / max_exact) / math.log(max_distance / max_exact) * (nb - me),
        // computed in float32 and truncated towards zero.
        let ratio = (position as f32 / max_exact as f32).ln();
        let scale = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
        let large = max_exact + (ratio / scale * (num_buckets - max_exact) as f32) as i64;
        bucket += large.min(num_buckets - 1);
    }
    bucket as usize
}

/// `T5ForConditionalGeneration`.
#[derive(Module, Debug)]
pub struct T5<B: Backend> {
    /// `[vocab, d_model]`
    pub shared: Param<Tensor<B, 2>>,
    pub encoder: T5Stack<B>,
    pub decoder: T5Stack<B>,
    /// `[d_model, vocab]`; `None` when tied to `shared`.
    pub lm_head: Option<Param<Tensor<B, 2>>>,
    pub d_model: usize,
    /// Multiply the decoder output by d_model^-0.5 before the head (original T5).
    pub scale_decoder_outputs: bool,
    /// Dtype of the matrix products ([`T5::with_precision`]); parameters stay f32.
    #[module(skip)]
    pub precision: Precision,
}

/// Encoder output plus the mask needed by cross-attention.
#[derive(Debug, Clone)]
pub struct EncoderOutput<B: Backend> {
    pub hidden: Tensor<B, 3>,
    /// `[B, 1, 1, S]`
    pub mask_bias: Tensor<B, 4>,
}

impl<B: Backend> T5<B> {
    /// Builds the network from a weight source (checkpoint or random init).
    pub fn from_source(
        config: &T5Config,
        source: &mut dyn WeightSource<B>,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let shared = source.param2(&WeightKey::Shared, [config.vocab_size, config.d_model])?;
        let encoder = build_stack(config, source, false)?;
        let decoder = build_stack(config, source, true)?;
        // As transformers 5.x: an untied head whenever the config says so or the checkpoint
        // carries `lm_head.weight` (HF then writes `tie_word_embeddings: true` regardless).
        let untied = !config.tie_word_embeddings || source.contains(&WeightKey::LmHead);
        let lm_head = if untied {
            Some(source.param2(&WeightKey::LmHead, [config.d_model, config.vocab_size])?)
        } else {
            None
        };
        source.finish()?;
        Ok(Self {
            shared,
            encoder,
            decoder,
            lm_head,
            d_model: config.d_model,
            scale_decoder_outputs: config.scales_decoder_outputs(),
            precision: Precision::F32,
        })
    }

    /// The same model computing its matrix products in `precision` (mixed precision: the
    /// parameters, norms, softmax and loss stay f32).
    #[must_use]
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        for block in self
            .encoder
            .blocks
            .iter_mut()
            .chain(self.decoder.blocks.iter_mut())
        {
            block.self_attention.precision = precision;
            if let Some(cross) = block.cross_attention.as_mut() {
                cross.precision = precision;
            }
            block.feed_forward.precision = precision;
        }
        self
    }

    pub fn tied(&self) -> bool {
        self.lm_head.is_none()
    }

    pub fn vocab_size(&self) -> usize {
        self.shared.dims()[0]
    }

    pub fn device(&self) -> B::Device {
        self.shared.device()
    }

    fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let table = self.shared.val();
        if let Some(embedded) = crate::kernels::embedding(&table, &ids) {
            return embedded;
        }
        embedding(table, ids)
    }

    /// `attention_mask`: `[B, S]`, 1 for tokens and 0 for padding.
    pub fn encode(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
    ) -> EncoderOutput<B> {
        crate::backend::flush_denormals();
        let [batch, len] = attention_mask.dims();
        let mask_bias = attention_mask
            .equal_elem(0)
            .float()
            .mul_scalar(MASK_BIAS)
            .reshape([batch, 1, 1, len]);
        let hidden = self
            .encoder
            .encode(self.embed(input_ids), mask_bias.clone());
        EncoderOutput { hidden, mask_bias }
    }

    /// Decoder hidden states -> logits `[B, T, vocab]`.
    pub fn lm_logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let hidden = if self.scale_decoder_outputs {
            hidden * (self.d_model as f64).powf(-0.5)
        } else {
            hidden
        };
        match &self.lm_head {
            Some(head) => mixed_linear(hidden, head.val(), self.precision),
            None => mixed_linear(hidden, self.shared.val().transpose(), self.precision),
        }
    }

    /// Teacher-forced logits for `decoder_input_ids` (`[B, T]`), HF `model(...).logits`.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
        decoder_input_ids: Tensor<B, 2, Int>,
    ) -> (EncoderOutput<B>, Tensor<B, 3>) {
        let encoded = self.encode(input_ids, attention_mask);
        let logits = self.decode(&encoded, decoder_input_ids);
        (encoded, logits)
    }

    pub fn decode(
        &self,
        encoded: &EncoderOutput<B>,
        decoder_input_ids: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        let hidden = self.decoder.decode(
            self.embed(decoder_input_ids),
            encoded.hidden.clone(),
            encoded.mask_bias.clone(),
        );
        self.lm_logits(hidden)
    }

    /// Empty KV caches with the cross-attention keys/values of `encoded` precomputed.
    pub fn init_caches(&self, encoded: &EncoderOutput<B>) -> Vec<BlockCache<B>> {
        self.decoder
            .blocks
            .iter()
            .map(|block| {
                let (cross_k, cross_v) = block.cross_keys_values(encoded.hidden.clone());
                BlockCache {
                    self_k: None,
                    self_v: None,
                    cross_k,
                    cross_v,
                }
            })
            .collect()
    }

    /// Logits `[N, vocab]` for the next token after `tokens` (`[N, 1]`) at position `step`.
    pub fn decode_step(
        &self,
        tokens: Tensor<B, 2, Int>,
        step: usize,
        caches: &mut [BlockCache<B>],
        cross_bias: &Tensor<B, 4>,
    ) -> Tensor<B, 2> {
        let hidden = self
            .decoder
            .decode_step(self.embed(tokens), step, caches, cross_bias);
        let logits = self.lm_logits(hidden);
        let [n, _, vocab] = logits.dims();
        logits.reshape([n, vocab])
    }
}

/// Reorders the self-attention caches along the batch dimension (beam search).
/// Cross-attention keys/values are left alone: beams are only ever reordered within one
/// example, whose encoder output is the same for all of its beams.
pub fn reorder_caches<B: Backend>(caches: &mut [BlockCache<B>], order: Tensor<B, 1, Int>) {
    for cache in caches {
        cache.self_k = cache.self_k.take().map(|t| t.select(0, order.clone()));
        cache.self_v = cache.self_v.take().map(|t| t.select(0, order.clone()));
    }
}

fn build_norm<B: Backend>(
    config: &T5Config,
    source: &mut dyn WeightSource<B>,
    key: WeightKey,
) -> Result<RmsNorm<B>, ModelError> {
    Ok(RmsNorm {
        weight: source.param1(&key, config.d_model)?,
        eps: config.layer_norm_epsilon,
    })
}

fn build_attention<B: Backend>(
    config: &T5Config,
    source: &mut dyn WeightSource<B>,
    decoder: bool,
    block: usize,
    cross: bool,
) -> Result<Attention<B>, ModelError> {
    let (d, inner) = (config.d_model, config.inner_dim());
    let key = |proj| WeightKey::Attention {
        decoder,
        block,
        cross,
        proj,
    };
    Ok(Attention {
        q: source.param2(&key('q'), [d, inner])?,
        k: source.param2(&key('k'), [d, inner])?,
        v: source.param2(&key('v'), [d, inner])?,
        o: source.param2(&key('o'), [inner, d])?,
        lora_q: None,
        lora_k: None,
        lora_v: None,
        lora_o: None,
        num_heads: config.num_heads,
        d_kv: config.d_kv,
        dropout: DropoutConfig::new(config.dropout_rate).init(),
        precision: Precision::F32,
    })
}

fn build_stack<B: Backend>(
    config: &T5Config,
    source: &mut dyn WeightSource<B>,
    decoder: bool,
) -> Result<T5Stack<B>, ModelError> {
    let relative_attention_bias = source.param2(
        &WeightKey::RelativeBias { decoder },
        [config.relative_attention_num_buckets, config.num_heads],
    )?;
    let layers = if decoder {
        config.decoder_layers()
    } else {
        config.num_layers
    };
    let ff = config.feed_forward();
    let mut blocks = Vec::with_capacity(layers);
    for block in 0..layers {
        let self_norm = build_norm(
            config,
            source,
            WeightKey::LayerNorm {
                decoder,
                block,
                sublayer: 0,
            },
        )?;
        let self_attention = build_attention(config, source, decoder, block, false)?;
        let (cross_norm, cross_attention) = if decoder {
            let norm = build_norm(
                config,
                source,
                WeightKey::LayerNorm {
                    decoder,
                    block,
                    sublayer: 1,
                },
            )?;
            (
                Some(norm),
                Some(build_attention(config, source, decoder, block, true)?),
            )
        } else {
            (None, None)
        };
        let ff_sublayer = if decoder { 2 } else { 1 };
        let ff_norm = build_norm(
            config,
            source,
            WeightKey::LayerNorm {
                decoder,
                block,
                sublayer: ff_sublayer,
            },
        )?;
        let ff_key = |name| WeightKey::FeedForward {
            decoder,
            block,
            name,
        };
        let (d, d_ff) = (config.d_model, config.d_ff);
        let feed_forward = if ff.gated {
            FeedForward {
                wi: source.param2(&ff_key("wi_0"), [d, d_ff])?,
                wi_linear: Some(source.param2(&ff_key("wi_1"), [d, d_ff])?),
                wo: source.param2(&ff_key("wo"), [d_ff, d])?,
                activation: ff.activation,
                dropout: DropoutConfig::new(config.dropout_rate).init(),
                precision: Precision::F32,
            }
        } else {
            FeedForward {
                wi: source.param2(&ff_key("wi"), [d, d_ff])?,
                wi_linear: None,
                wo: source.param2(&ff_key("wo"), [d_ff, d])?,
                activation: ff.activation,
                dropout: DropoutConfig::new(config.dropout_rate).init(),
                precision: Precision::F32,
            }
        };
        blocks.push(T5Block {
            self_norm,
            self_attention,
            cross_norm,
            cross_attention,
            ff_norm,
            feed_forward,
            dropout: DropoutConfig::new(config.dropout_rate).init(),
        });
    }
    let final_norm = build_norm(config, source, WeightKey::FinalNorm { decoder })?;
    Ok(T5Stack {
        relative_attention_bias,
        blocks,
        final_norm,
        dropout: DropoutConfig::new(config.dropout_rate).init(),
        is_decoder: decoder,
        num_buckets: config.relative_attention_num_buckets,
        max_distance: config.relative_attention_max_distance,
    })
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    /// Expected values printed by transformers 5.24 `T5Attention._relative_position_bucket`.
    #[test]
    fn buckets_match_hf() {
        let bidirectional: Vec<usize> = (-12..=12)
            .map(|rp| relative_position_bucket(rp, true, 32, 128))
            .collect();
        assert_eq!(
            bidirectional,
            [
                9, 8, 8, 8, 8, 7, 6, 5, 4, 3, 2, 1, 0, 17, 18, 19, 20, 21, 22, 23, 24, 24, 24, 24,
                25
            ]
        );
        let causal: Vec<usize> = (0..=20)
            .map(|d| relative_position_bucket(-d, false, 32, 128))
            .collect();
        assert_eq!(
            causal,
            [
                0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 16, 16, 17, 17
            ]
        );
        let causal_custom: Vec<usize> = (0..200)
            .step_by(7)
            .map(|d| relative_position_bucket(-d, false, 16, 40))
            .collect();
        let mut expected = vec![0, 7, 10, 12, 14];
        expected.resize(causal_custom.len(), 15);
        assert_eq!(causal_custom, expected);
        let bidirectional_custom: Vec<usize> = (-150..150)
            .step_by(11)
            .map(|rp| relative_position_bucket(rp, true, 16, 40))
            .collect();
        let mut expected = vec![7; 12];
        expected.extend([6, 4, 12, 14]);
        expected.resize(bidirectional_custom.len(), 15);
        assert_eq!(bidirectional_custom, expected);
        // Keys after the query never get their own bucket in the decoder.
        assert_eq!(relative_position_bucket(5, false, 32, 128), 0);
    }
}
