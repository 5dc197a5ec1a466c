//! Analytic FLOPs, model FLOP utilisation (MFU) and a memory model for T5 training steps.
//!
//! FLOPs follow the convention of PaLM (Chowdhery et al. 2022, appendix B): count matrix
//! multiplications only, 2 FLOPs per multiply-add, backward = 2x forward, so a training step is
//! 3x the forward pass; attention score terms counted in full (no causal halving).
//! Per sequence, with `b` sequences of source length `S` and target length `T`,
//! `d` = d_model, `i` = num_heads*d_kv, `f` = d_ff (x3 matrices gated, x2 plain), `V` = vocab:
//!
//! - encoder layer:        2*S*(4*d*i + m*d*f) + 4*S*S*i
//! - decoder layer:        2*T*(4*d*i + 2*d*i + m*d*f) + 2*S*(2*d*i) + 4*T*T*i + 4*T*S*i
//!   (self-attention projections, cross q/o on targets, cross k/v on the encoder output, the
//!   self and cross score/value products)
//! - LM head:              2*T*d*V
//!
//! training FLOPs/step = 3 * b * (L_enc*enc + L_dec*dec + head); MFU = that / time / peak.
//!
//! Owns: the FLOP and memory arithmetic and the device peak table. Must not time anything or
//! run a model: the bench commands measure and divide.

use crate::config::T5Config;

/// Forward FLOPs of one sequence pair.
pub fn forward_flops_per_sequence(config: &T5Config, src_len: usize, tgt_len: usize) -> f64 {
    let d = config.d_model as f64;
    let i = config.inner_dim() as f64;
    let m = if config.feed_forward().gated {
        3.0
    } else {
        2.0
    };
    let f = config.d_ff as f64;
    let (s, t) = (src_len as f64, tgt_len as f64);
    let encoder_layer = 2.0 * s * (4.0 * d * i + m * d * f) + 4.0 * s * s * i;
    let decoder_layer = 2.0 * t * (6.0 * d * i + m * d * f)
        + 2.0 * s * (2.0 * d * i)
        + 4.0 * t * t * i
        + 4.0 * t * s * i;
    let head = 2.0 * t * d * config.vocab_size as f64;
    config.num_layers as f64 * encoder_layer + config.decoder_layers() as f64 * decoder_layer + head
}

/// Model FLOPs of one training step (forward + backward) over `batch` sequence pairs.
/// With LoRA the frozen weights need no weight gradients; the convention still counts 3x,
/// as the reference study and most MFU reports do (say so when comparing).
pub fn train_flops_per_step(
    config: &T5Config,
    batch: usize,
    src_len: usize,
    tgt_len: usize,
) -> f64 {
    3.0 * batch as f64 * forward_flops_per_sequence(config, src_len, tgt_len)
}

/// Dense peak throughput of a device, TFLOP/s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DevicePeak {
    pub name: &'static str,
    pub fp32: f64,
    pub bf16: f64,
    pub fp16: f64,
    pub source: &'static str,
}

/// Dense (non-sparse) peaks. Jetson tensor-core figures are NVIDIA's sparse INT8 GPU TOPS / 4
/// (dense FP16 is half of sparse FP16, which is half of sparse INT8); FP32 is CUDA cores x 2 x
/// max GPU clock. Data-center figures are the SXM datasheet values.
pub const DEVICE_PEAKS: [DevicePeak; 6] = [
    DevicePeak {
        name: "jetson-agx-orin-64gb",
        fp32: 5.3,
        bf16: 42.5,
        fp16: 42.5,
        source: "Jetson AGX Orin 64GB: 2048 CUDA cores @1.3 GHz; 170 sparse INT8 GPU TOPS",
    },
    DevicePeak {
        name: "jetson-agx-orin-32gb",
        fp32: 3.3,
        bf16: 27.0,
        fp16: 27.0,
        source: "Jetson AGX Orin 32GB: 1792 CUDA cores @0.93 GHz; 108 sparse INT8 GPU TOPS",
    },
    DevicePeak {
        name: "jetson-orin-nx-16gb",
        fp32: 1.9,
        bf16: 12.5,
        fp16: 12.5,
        source: "Jetson Orin NX 16GB: 1024 CUDA cores @0.92 GHz; 50 sparse INT8 GPU TOPS",
    },
    DevicePeak {
        name: "a100-sxm",
        fp32: 19.5,
        bf16: 312.0,
        fp16: 312.0,
        source: "NVIDIA A100 datasheet (dense tensor core BF16/FP16; FP32 without TF32)",
    },
    DevicePeak {
        name: "h100-sxm",
        fp32: 67.0,
        bf16: 989.0,
        fp16: 989.0,
        source: "NVIDIA H100 SXM datasheet (dense)",
    },
    DevicePeak {
        name: "h200-sxm",
        fp32: 67.0,
        bf16: 989.0,
        fp16: 989.0,
        source: "NVIDIA H200 SXM datasheet (dense; same compute as H100 SXM)",
    },
];

pub fn device_peak(name: &str) -> Option<&'static DevicePeak> {
    DEVICE_PEAKS.iter().find(|p| p.name == name)
}

/// MFU in [0, 1]: achieved model FLOP/s over the peak.
pub fn mfu(flops_per_step: f64, seconds_per_step: f64, peak_tflops: f64) -> f64 {
    if seconds_per_step <= 0.0 || peak_tflops <= 0.0 {
        return 0.0;
    }
    flops_per_step / seconds_per_step / (peak_tflops * 1e12)
}

/// Bytes a training step needs, by part (fp32 weights and optimizer state).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    pub weights: f64,
    pub gradients: f64,
    pub optimizer: f64,
    pub activations: f64,
}

impl MemoryEstimate {
    pub fn total(&self) -> f64 {
        self.weights + self.gradients + self.optimizer + self.activations
    }
}

/// A deliberately simple model of peak training memory: fp32 weights, gradients and AdamW
/// moments for the trainable parameters, and the activations autodiff keeps, per layer about
/// `S*(12*d + 3*f)` floats plus `3*H*S*S` for scores/probabilities (encoder; the decoder adds
/// its cross-attention `3*H*T*S`), plus 3 copies of the logits. `activation_bytes` is 2 for
/// bf16 compute, 4 for fp32. Checked against measured peaks in docs/BENCHMARKS.md.
pub fn training_memory(
    config: &T5Config,
    batch: usize,
    src_len: usize,
    tgt_len: usize,
    trainable_parameters: usize,
    activation_bytes: f64,
) -> MemoryEstimate {
    let total = config.num_parameters().total() as f64;
    let d = config.d_model as f64;
    let f = config.d_ff as f64;
    let h = config.num_heads as f64;
    let (s, t, b) = (src_len as f64, tgt_len as f64, batch as f64);
    let encoder = s * (12.0 * d + 3.0 * f) + 3.0 * h * s * s;
    let decoder = t * (18.0 * d + 3.0 * f) + 3.0 * h * t * t + 3.0 * h * t * s;
    let logits = 3.0 * t * config.vocab_size as f64;
    let activations = b
        * (config.num_layers as f64 * encoder + config.decoder_layers() as f64 * decoder + logits)
        * activation_bytes;
    MemoryEstimate {
        weights: total * 4.0,
        gradients: trainable_parameters as f64 * 4.0,
        optimizer: trainable_parameters as f64 * 8.0,
        activations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    #[test]
    fn flops_follow_six_n_for_short_sequences() {
        // With short sequences attention terms vanish and training FLOPs per token approach
        // 6 * (matmul parameters touched by that token), the PaLM rule of thumb.
        let config = Preset::FlanT5Base.config();
        let flops = train_flops_per_step(&config, 1, 1, 1);
        let d = config.d_model as f64;
        let i = config.inner_dim() as f64;
        let ff = 3.0 * d * config.d_ff as f64;
        let per_token = 6.0
            * (12.0 * (4.0 * d * i + ff)
                + 12.0 * (6.0 * d * i + ff)
                + 12.0 * 2.0 * d * i
                + d * config.vocab_size as f64);
        let attention = 3.0 * (12.0 * 4.0 * i + 12.0 * 8.0 * i);
        assert!((flops - per_token - attention).abs() / flops < 1e-12);
    }

    #[test]
    fn mfu_is_a_ratio() {
        assert!((mfu(1e12, 1.0, 2.0) - 0.5).abs() < 1e-12);
        assert_eq!(mfu(1e12, 0.0, 2.0), 0.0);
        assert!(device_peak("h100-sxm").is_some());
    }

    #[test]
    fn lora_needs_less_memory_than_full() {
        let config = Preset::FlanT5Xl.config();
        let params = config.num_parameters().total();
        let full = training_memory(&config, 1, 512, 128, params, 2.0);
        let lora = training_memory(&config, 1, 512, 128, params / 500, 2.0);
        assert!(full.total() > 4.0 * 4.0 * params as f64 * 0.99);
        assert!(lora.total() < full.total() / 2.0);
    }
}
