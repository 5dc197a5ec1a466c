//! T5 configuration: the Hugging Face `config.json` schema, its validation, the
//! FLAN-T5 presets and analytic parameter counts.
//!
//! Owns: turning `config.json` into a checked [`T5Config`]. Must not touch weights or devices.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// The activation used inside the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseActivation {
    Relu,
    /// Exact (erf) GELU, HF `gelu`.
    Gelu,
    /// Tanh-approximated GELU, HF `gelu_new` (what `gated-gelu` means).
    GeluNew,
    Silu,
}

/// Parsed `feed_forward_proj`, following HF `T5Config.__init__`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedForwardProj {
    pub activation: DenseActivation,
    pub gated: bool,
}

impl FeedForwardProj {
    /// Parses HF's `feed_forward_proj` string (`relu`, `gated-gelu`, `gated-silu`, ...).
    pub fn parse(value: &str) -> Result<Self, ModelError> {
        let parts: Vec<&str> = value.split('-').collect();
        let invalid = || ModelError::Config {
            key: "feed_forward_proj".into(),
            reason: format!(
                "unknown value {value:?}: expected `ACT` or `gated-ACT` with ACT one of relu, gelu, gelu_new, silu"
            ),
        };
        let (gated, act) = match parts.as_slice() {
            [act] => (false, *act),
            ["gated", act] => (true, *act),
            _ => return Err(invalid()),
        };
        let activation = match act {
            "relu" => DenseActivation::Relu,
            // HF maps `gated-gelu` to `gelu_new` for backwards compatibility.
            "gelu" if gated => DenseActivation::GeluNew,
            "gelu" => DenseActivation::Gelu,
            "gelu_new" => DenseActivation::GeluNew,
            "silu" | "swish" => DenseActivation::Silu,
            _ => return Err(invalid()),
        };
        Ok(Self { activation, gated })
    }
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_dropout() -> f64 {
    0.1
}
fn default_ff() -> String {
    "relu".into()
}
fn default_true() -> bool {
    true
}
fn default_eos() -> u32 {
    1
}
fn default_initializer_factor() -> f64 {
    1.0
}

/// `config.json` of a HF T5 model, limited to the fields that define the network.
/// Unknown fields are kept so that an export writes them back unchanged.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_dropout")]
    pub dropout_rate: f64,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_initializer_factor")]
    pub initializer_factor: f64,
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
    /// HF's class default is `true` (original T5); FLAN-T5 sets `false`.
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// transformers >= 5.24 writes this to say whether the decoder output is scaled by
    /// d_model^-0.5 before `lm_head` (it then always writes `tie_word_embeddings: true` and
    /// decides tying from the weights). Absent: scaling follows `tie_word_embeddings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_decoder_outputs: Option<bool>,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    /// Absent in some configs; HF then uses `pad_token_id`.
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl T5Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|err| match err {
            ModelError::Config { key, reason } => ModelError::Config {
                key,
                reason: format!("{reason} (in {})", path.display()),
            },
            other => other,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self, ModelError> {
        let config: T5Config = serde_json::from_str(text).map_err(|err| ModelError::Config {
            key: "<json>".into(),
            reason: err.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value the network shape depends on.
    pub fn validate(&self) -> Result<(), ModelError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_decoder_layers", self.decoder_layers()),
            ("num_heads", self.num_heads),
            (
                "relative_attention_num_buckets",
                self.relative_attention_num_buckets,
            ),
            (
                "relative_attention_max_distance",
                self.relative_attention_max_distance,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ModelError::Config {
                    key: key.into(),
                    reason: "must be > 0".into(),
                });
            }
        }
        if self.relative_attention_num_buckets < 4 {
            return Err(ModelError::Config {
                key: "relative_attention_num_buckets".into(),
                reason: "must be >= 4 (buckets are halved per direction, then split exact/log)"
                    .into(),
            });
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            return Err(ModelError::Config {
                key: "layer_norm_epsilon".into(),
                reason: format!("must be a positive number, got {}", self.layer_norm_epsilon),
            });
        }
        for (key, id) in [
            ("pad_token_id", self.pad_token_id),
            ("eos_token_id", self.eos_token_id),
            ("decoder_start_token_id", self.decoder_start_id()),
        ] {
            if id as usize >= self.vocab_size {
                return Err(ModelError::Config {
                    key: key.into(),
                    reason: format!("{id} is outside the vocabulary of {}", self.vocab_size),
                });
            }
        }
        FeedForwardProj::parse(&self.feed_forward_proj)?;
        Ok(())
    }

    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }

    /// Whether the decoder output is multiplied by d_model^-0.5 before the LM head.
    pub fn scales_decoder_outputs(&self) -> bool {
        self.scale_decoder_outputs
            .unwrap_or(self.tie_word_embeddings)
    }

    pub fn decoder_start_id(&self) -> u32 {
        self.decoder_start_token_id.unwrap_or(self.pad_token_id)
    }

    /// Validated by [`T5Config::validate`]; falls back to relu only for unvalidated configs.
    pub fn feed_forward(&self) -> FeedForwardProj {
        FeedForwardProj::parse(&self.feed_forward_proj).unwrap_or(FeedForwardProj {
            activation: DenseActivation::Relu,
            gated: false,
        })
    }

    /// Number of parameters, counted the way `model.num_parameters()` does in HF
    /// (a tied `lm_head` is counted once).
    pub fn num_parameters(&self) -> ParameterCount {
        let d = self.d_model;
        let inner = self.inner_dim();
        let ff = if self.feed_forward().gated { 3 } else { 2 } * d * self.d_ff;
        let attention = 4 * d * inner;
        let bias = self.relative_attention_num_buckets * self.num_heads;
        let encoder = self.num_layers * (attention + ff + 2 * d) + bias + d;
        let decoder = self.decoder_layers() * (2 * attention + ff + 3 * d) + bias + d;
        let embedding = self.vocab_size * d;
        let lm_head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        ParameterCount {
            embedding,
            encoder,
            decoder,
            lm_head,
        }
    }

    /// The JSON HF writes, with our known fields and everything unknown we read.
    pub fn to_hf_json(&self) -> Result<String, ModelError> {
        let mut value = serde_json::to_value(self).map_err(|err| ModelError::Config {
            key: "<json>".into(),
            reason: err.to_string(),
        })?;
        if let Some(map) = value.as_object_mut() {
            map.insert("num_decoder_layers".into(), self.decoder_layers().into());
            map.insert(
                "decoder_start_token_id".into(),
                self.decoder_start_id().into(),
            );
            map.entry("model_type").or_insert_with(|| "t5".into());
            map.entry("architectures")
                .or_insert_with(|| serde_json::json!(["T5ForConditionalGeneration"]));
            map.entry("is_encoder_decoder").or_insert(true.into());
        }
        serde_json::to_string_pretty(&value).map_err(|err| ModelError::Config {
            key: "<json>".into(),
            reason: err.to_string(),
        })
    }
}

/// Parameter counts per part of the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterCount {
    pub embedding: usize,
    pub encoder: usize,
    pub decoder: usize,
    pub lm_head: usize,
}

impl ParameterCount {
    pub fn total(&self) -> usize {
        self.embedding + self.encoder + self.decoder + self.lm_head
    }
}

/// The published FLAN-T5 configurations (google/flan-t5-*), for random-init runs
/// with no download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    FlanT5Small,
    FlanT5Base,
    FlanT5Large,
    FlanT5Xl,
}

impl Preset {
    pub const ALL: [Preset; 4] = [
        Preset::FlanT5Small,
        Preset::FlanT5Base,
        Preset::FlanT5Large,
        Preset::FlanT5Xl,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::FlanT5Small => "flan-t5-small",
            Preset::FlanT5Base => "flan-t5-base",
            Preset::FlanT5Large => "flan-t5-large",
            Preset::FlanT5Xl => "flan-t5-xl",
        }
    }

    /// Parameter count published on the model cards.
    pub fn published_parameters(self) -> &'static str {
        match self {
            Preset::FlanT5Small => "77M",
            Preset::FlanT5Base => "248M",
            Preset::FlanT5Large => "783M",
            Preset::FlanT5Xl => "2.85B",
        }
    }

    pub fn config(self) -> T5Config {
        let (d_model, d_ff, num_heads, layers) = match self {
            Preset::FlanT5Small => (512, 1024, 6, 8),
            Preset::FlanT5Base => (768, 2048, 12, 12),
            Preset::FlanT5Large => (1024, 2816, 16, 24),
            Preset::FlanT5Xl => (2048, 5120, 32, 24),
        };
        T5Config {
            vocab_size: 32128,
            d_model,
            d_kv: 64,
            d_ff,
            num_layers: layers,
            num_decoder_layers: Some(layers),
            num_heads,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            dropout_rate: 0.1,
            layer_norm_epsilon: 1e-6,
            initializer_factor: 1.0,
            feed_forward_proj: "gated-gelu".into(),
            tie_word_embeddings: false,
            scale_decoder_outputs: None,
            pad_token_id: 0,
            eos_token_id: 1,
            decoder_start_token_id: Some(0),
            extra: serde_json::Map::new(),
        }
    }
}

impl std::str::FromStr for Preset {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| ModelError::Config {
                key: "preset".into(),
                reason: format!(
                    "unknown preset {s:?}; expected one of {}",
                    Preset::ALL.map(|p| p.name()).join(", ")
                ),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_parameter_counts_match_published_models() {
        // Exact counts of google/flan-t5-* (`model.num_parameters()`).
        let expected = [
            (Preset::FlanT5Small, 76_961_152),
            (Preset::FlanT5Base, 247_577_856),
            (Preset::FlanT5Large, 783_150_080),
            (Preset::FlanT5Xl, 2_849_757_184),
        ];
        for (preset, count) in expected {
            assert_eq!(
                preset.config().num_parameters().total(),
                count,
                "{preset:?}"
            );
        }
    }

    #[test]
    fn feed_forward_proj_parsing_follows_hf() {
        let gg = FeedForwardProj::parse("gated-gelu").expect("valid");
        assert!(gg.gated);
        assert_eq!(gg.activation, DenseActivation::GeluNew);
        let relu = FeedForwardProj::parse("relu").expect("valid");
        assert!(!relu.gated);
        for bad in ["swiglu", "gated-gelu-x", "", "mish"] {
            let err = FeedForwardProj::parse(bad).expect_err(bad);
            assert!(err.to_string().contains("feed_forward_proj"), "{err}");
        }
    }

    #[test]
    fn malformed_config_names_the_key() {
        let mut value = serde_json::to_value(Preset::FlanT5Small.config()).expect("json");
        value["feed_forward_proj"] = "gated-mish".into();
        let err = T5Config::from_json_str(&value.to_string()).expect_err("must fail");
        assert!(err.to_string().contains("feed_forward_proj"), "{err}");
        value["feed_forward_proj"] = "relu".into();
        value["d_model"] = 0.into();
        let err = T5Config::from_json_str(&value.to_string()).expect_err("must fail");
        assert!(err.to_string().contains("d_model"), "{err}");
        let err = T5Config::from_json_str("{\"d_model\": 4}").expect_err("missing keys");
        assert!(err.to_string().contains("vocab_size"), "{err}");
    }
}
