//! Tensor names and shapes of FLAN-T5 checkpoints (Hugging Face key names), for sizing
//! manifests and benchmarks without loading a model.
//!
//! Owns: [`T5Dims`] and [`flan_t5_layout`]. Must not touch: weights (the model crate loads
//! them). The layout is T5 v1.1 as used by FLAN-T5: gated-GELU feed-forward (`wi_0`,
//! `wi_1`, `wo`), RMS layer norms without bias, relative attention bias in block 0 only,
//! untied `lm_head`. The tied aliases `encoder.embed_tokens.weight` and
//! `decoder.embed_tokens.weight` of `shared.weight` are not listed (one tensor, one entry).

use crate::tensor::{ModelLayout, TensorSpec};

/// The dimensions that determine a T5 layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct T5Dims {
    /// Hidden size.
    pub d_model: usize,
    /// Size of one attention head.
    pub d_kv: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Feed-forward inner size.
    pub d_ff: usize,
    /// Encoder blocks.
    pub encoder_layers: usize,
    /// Decoder blocks.
    pub decoder_layers: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Relative attention buckets.
    pub relative_attention_num_buckets: usize,
}

impl T5Dims {
    /// google/flan-t5-small: 76 961 152 parameters.
    pub const FLAN_T5_SMALL: Self = Self {
        d_model: 512,
        d_kv: 64,
        num_heads: 6,
        d_ff: 1024,
        encoder_layers: 8,
        decoder_layers: 8,
        vocab_size: 32128,
        relative_attention_num_buckets: 32,
    };

    /// google/flan-t5-base: 247 577 856 parameters.
    pub const FLAN_T5_BASE: Self = Self {
        d_model: 768,
        d_kv: 64,
        num_heads: 12,
        d_ff: 2048,
        encoder_layers: 12,
        decoder_layers: 12,
        vocab_size: 32128,
        relative_attention_num_buckets: 32,
    };

    /// google/flan-t5-xl: 2 849 757 184 parameters.
    pub const FLAN_T5_XL: Self = Self {
        d_model: 2048,
        d_kv: 64,
        num_heads: 32,
        d_ff: 5120,
        encoder_layers: 24,
        decoder_layers: 24,
        vocab_size: 32128,
        relative_attention_num_buckets: 32,
    };
}

/// The tensors of a FLAN-T5 model with dimensions `dims`, sorted by name.
#[must_use]
pub fn flan_t5_layout(dims: &T5Dims) -> ModelLayout {
    let d_model = dims.d_model;
    let inner = dims.num_heads * dims.d_kv;
    let mut specs = vec![
        TensorSpec::new("shared.weight", vec![dims.vocab_size, d_model]),
        TensorSpec::new("lm_head.weight", vec![dims.vocab_size, d_model]),
        TensorSpec::new("encoder.final_layer_norm.weight", vec![d_model]),
        TensorSpec::new("decoder.final_layer_norm.weight", vec![d_model]),
    ];
    let attention = |specs: &mut Vec<TensorSpec>, prefix: &str, kind: &str| {
        for projection in ["q", "k", "v"] {
            specs.push(TensorSpec::new(
                format!("{prefix}.{kind}.{projection}.weight"),
                vec![inner, d_model],
            ));
        }
        specs.push(TensorSpec::new(
            format!("{prefix}.{kind}.o.weight"),
            vec![d_model, inner],
        ));
        specs.push(TensorSpec::new(
            format!("{prefix}.layer_norm.weight"),
            vec![d_model],
        ));
    };
    let feed_forward = |specs: &mut Vec<TensorSpec>, prefix: &str| {
        for gate in ["wi_0", "wi_1"] {
            specs.push(TensorSpec::new(
                format!("{prefix}.DenseReluDense.{gate}.weight"),
                vec![dims.d_ff, d_model],
            ));
        }
        specs.push(TensorSpec::new(
            format!("{prefix}.DenseReluDense.wo.weight"),
            vec![d_model, dims.d_ff],
        ));
        specs.push(TensorSpec::new(
            format!("{prefix}.layer_norm.weight"),
            vec![d_model],
        ));
    };
    for stack in ["encoder", "decoder"] {
        specs.push(TensorSpec::new(
            format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            vec![dims.relative_attention_num_buckets, dims.num_heads],
        ));
    }
    for block in 0..dims.encoder_layers {
        attention(
            &mut specs,
            &format!("encoder.block.{block}.layer.0"),
            "SelfAttention",
        );
        feed_forward(&mut specs, &format!("encoder.block.{block}.layer.1"));
    }
    for block in 0..dims.decoder_layers {
        attention(
            &mut specs,
            &format!("decoder.block.{block}.layer.0"),
            "SelfAttention",
        );
        attention(
            &mut specs,
            &format!("decoder.block.{block}.layer.1"),
            "EncDecAttention",
        );
        feed_forward(&mut specs, &format!("decoder.block.{block}.layer.2"));
    }
    specs.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    ModelLayout::from_sorted_unchecked(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_published_checkpoints() {
        assert_eq!(
            flan_t5_layout(&T5Dims::FLAN_T5_SMALL).total_elements(),
            76_961_152
        );
        assert_eq!(
            flan_t5_layout(&T5Dims::FLAN_T5_BASE).total_elements(),
            247_577_856
        );
        let xl = flan_t5_layout(&T5Dims::FLAN_T5_XL);
        assert_eq!(xl.total_elements(), 2_849_757_184);
        assert_eq!(xl.len(), 2 + 2 + 2 + 24 * 9 + 24 * 14);
        assert!(
            xl.specs()
                .windows(2)
                .all(|pair| pair[0].name < pair[1].name)
        );
    }
}
