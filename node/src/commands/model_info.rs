//! `meshtune model info`: parameter counts from a preset or a folder's config.json, and with
//! `--memory` the estimated peak training memory of every preset (full fine-tuning vs LoRA,
//! fp32 vs bf16 activations) against the usable memory of a Jetson AGX Orin.
//! `meshtune model export`: a HF folder written back in another precision.
//!
//! The memory figures come from `meshtune_model::flops::training_memory` only; this module
//! chooses the shapes and budgets and prints, it does not model memory itself.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use meshtune_model::config::{Preset, T5Config};
use meshtune_model::flops::{MemoryEstimate, training_memory};
use meshtune_model::lora::LoraConfig;

use meshtune_model::backend::Cpu;
use meshtune_model::checkpoint::{checkpoint_param_names, latest_checkpoint, load_params};
use meshtune_model::lora::{PeftInit, attach_lora, merge_lora};
use meshtune_model::pretrained::Pretrained;
use meshtune_model::t5::T5;
use meshtune_model::weights::{ExportDtype, export_hf_folder};

use crate::trainer::TrainConfig;
use crate::trainer::model::{initial_model, model_config_and_tokenizer};

/// `meshtune model export`: read a folder, write config.json, model.safetensors, tokenizer.json.
pub fn export(args: ModelExportArgs) -> anyhow::Result<()> {
    let dtype = match args.dtype.as_str() {
        "f32" | "float32" => ExportDtype::F32,
        "bf16" | "bfloat16" => ExportDtype::Bf16,
        "f16" | "float16" => ExportDtype::F16,
        other => anyhow::bail!("unknown --dtype {other:?}: expected f32, bf16 or f16"),
    };
    let device = Default::default();
    if let Some(checkpoint) = &args.checkpoint {
        // Only config.json and tokenizer.json are read from `--model` (a testnet's `data/`
        // folder has no weights): every weight comes from the checkpoint.
        let (config, tokenizer) = model_config_and_tokenizer(Some(&args.model), None, None)?;
        let skeleton = initial_model::<Cpu>(&config, None, true, 0, &device)?;
        let model = checkpoint_model(skeleton, checkpoint, args.train_config.as_deref())?;
        export_hf_folder(&model, &config, Some(tokenizer.path()), &args.out, dtype)?;
    } else {
        let loaded = Pretrained::<Cpu>::load(&args.model, None, &device)
            .with_context(|| format!("loading {}", args.model.display()))?;
        export_hf_folder(
            &loaded.model,
            &loaded.config,
            Some(loaded.tokenizer.path()),
            &args.out,
            dtype,
        )?;
    }
    tracing::info!(from = %args.model.display(), to = %args.out.display(), dtype = %args.dtype, "exported");
    Ok(())
}

/// `model` with the weights of a training or node checkpoint: `path` is one
/// `checkpoint-<n>/` folder or a `checkpoints/` root (its latest). A checkpoint of LoRA
/// training holds adapters: they are attached as `train_config`'s `[lora]` says (the
/// defaults without one), loaded, and merged into the weights.
fn checkpoint_model(
    model: T5<Cpu>,
    path: &Path,
    train_config: Option<&Path>,
) -> anyhow::Result<T5<Cpu>> {
    let dir = if path.join("params.safetensors").exists() {
        path.to_path_buf()
    } else {
        latest_checkpoint(path)?.with_context(|| {
            format!(
                "{} is neither a checkpoint (no params.safetensors) nor a folder of them \
                 (no `latest`)",
                path.display()
            )
        })?
    };
    let names = checkpoint_param_names(&dir)?;
    let lora = names.iter().any(|name| name.contains(".lora_"));
    let model = if lora {
        let config = match train_config {
            Some(file) => TrainConfig::from_file(file)?,
            None => TrainConfig::default(),
        };
        let device = Default::default();
        attach_lora(model, &config.lora, &mut PeftInit::<Cpu> { device })?
    } else {
        model
    };
    let model = load_params(&dir, model).with_context(|| {
        format!(
            "loading {} into the model's structure{}",
            dir.display(),
            if lora {
                " with LoRA adapters (pass the --train-config the run used if its [lora] \
                 differs from the defaults)"
            } else {
                ""
            }
        )
    })?;
    tracing::info!(checkpoint = %dir.display(), lora, "weights from checkpoint");
    Ok(if lora { merge_lora(model) } else { model })
}

pub fn run(args: ModelInfoArgs) -> anyhow::Result<()> {
    let (name, config, published) = match (&args.preset, &args.model) {
        (Some(preset), _) => {
            let preset: Preset = preset.parse()?;
            (
                preset.name().to_string(),
                preset.config(),
                Some(preset.published_parameters()),
            )
        }
        (None, Some(dir)) => {
            let config = T5Config::from_file(&dir.join("config.json"))
                .with_context(|| format!("reading {}", dir.display()))?;
            (dir.display().to_string(), config, None)
        }
        (None, None) => anyhow::bail!("give --preset NAME or --model DIR"),
    };
    let count = config.num_parameters();
    println!("model            {name}");
    println!(
        "shape            d_model {} d_kv {} heads {} d_ff {} layers {}+{} vocab {} ({}{})",
        config.d_model,
        config.d_kv,
        config.num_heads,
        config.d_ff,
        config.num_layers,
        config.decoder_layers(),
        config.vocab_size,
        config.feed_forward_proj,
        if config.tie_word_embeddings {
            ", tied"
        } else {
            ", untied lm_head"
        }
    );
    println!("embedding        {:>14}", count.embedding);
    println!("encoder          {:>14}", count.encoder);
    println!("decoder          {:>14}", count.decoder);
    println!("lm_head          {:>14}", count.lm_head);
    println!(
        "total            {:>14}  ({:.1}M)",
        count.total(),
        count.total() as f64 / 1e6
    );
    if let Some(published) = published {
        println!("published        {published:>14}");
    }
    println!(
        "fp32 weights     {:>11.1} MiB",
        count.total() as f64 * 4.0 / (1024.0 * 1024.0)
    );
    Ok(())
}

/// `meshtune model info --memory`: the training-memory table.
#[derive(Debug, Clone, Args)]
pub struct MemoryArgs {
    /// Print estimated peak training memory (full vs LoRA, fp32 vs bf16 activations) of every
    /// preset, or of --preset / --model only, against Jetson AGX Orin 32 GB and 64 GB.
    #[arg(long)]
    pub memory: bool,
    /// Sequences per training step.
    #[arg(long, default_value_t = 8, requires = "memory")]
    pub batch: usize,
    /// Source (dialogue) tokens per sequence.
    #[arg(long, default_value_t = 512, requires = "memory")]
    pub src_len: usize,
    /// Target (summary) tokens per sequence.
    #[arg(long, default_value_t = 128, requires = "memory")]
    pub tgt_len: usize,
    /// LoRA rank (default: the `meshtune train` default); targets are the default's.
    #[arg(long, requires = "memory")]
    pub lora_rank: Option<usize>,
}

/// Training memory that a device leaves to meshtune.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryBudget {
    pub name: &'static str,
    pub usable_gib: f64,
}

/// Jetson AGX Orin modules. Their memory is unified (CPU and GPU share it), so the OS, the
/// CUDA context and the node's own buffers come out of the same pool: an assumed headroom,
/// not a measurement.
pub const JETSON_AGX_ORIN_BUDGETS: [MemoryBudget; 2] = [
    MemoryBudget {
        name: "AGX Orin 32GB",
        usable_gib: 28.0,
    },
    MemoryBudget {
        name: "AGX Orin 64GB",
        usable_gib: 58.0,
    },
];

/// What a training step updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Full,
    Lora,
}

/// One line of the table: a model, a method and an activation precision.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryRow {
    pub model: String,
    pub parameters: usize,
    pub method: Method,
    pub trainable: usize,
    /// Bytes per activation element: 4 (fp32) or 2 (bf16).
    pub activation_bytes: f64,
    pub estimate: MemoryEstimate,
}

impl MemoryRow {
    pub fn total_gib(&self) -> f64 {
        self.estimate.total() / GIB
    }

    pub fn fits(&self, budget: &MemoryBudget) -> bool {
        self.total_gib() <= budget.usable_gib
    }
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Trainable parameters with LoRA, estimated exactly as `meshtune train` does before it
/// allocates: one attention per encoder layer, two (self, cross) per decoder layer, and per
/// target `2 * rank * max(d_model, inner_dim)` (an upper bound of `rank * (d_in + d_out)`).
pub fn lora_trainable_estimate(config: &T5Config, lora: &LoraConfig) -> usize {
    let attentions = config.num_layers + 2 * config.decoder_layers();
    attentions * lora.targets.len() * lora.rank * 2 * config.d_model.max(config.inner_dim())
}

/// Full and LoRA, each with fp32 and bf16 activations, for one model and one step shape.
pub fn memory_rows(
    model: &str,
    config: &T5Config,
    batch: usize,
    src_len: usize,
    tgt_len: usize,
    lora: &LoraConfig,
) -> Vec<MemoryRow> {
    let parameters = config.num_parameters().total();
    let mut rows = Vec::with_capacity(4);
    for (method, trainable) in [
        (Method::Full, parameters),
        (Method::Lora, lora_trainable_estimate(config, lora)),
    ] {
        for activation_bytes in [4.0, 2.0] {
            rows.push(MemoryRow {
                model: model.to_string(),
                parameters,
                method,
                trainable,
                activation_bytes,
                estimate: training_memory(
                    config,
                    batch,
                    src_len,
                    tgt_len,
                    trainable,
                    activation_bytes,
                ),
            });
        }
    }
    rows
}

/// `meshtune model info --memory [--preset NAME | --model DIR]`.
pub fn memory(args: &MemoryArgs, preset: Option<&str>, model: Option<&Path>) -> anyhow::Result<()> {
    if args.batch == 0 || args.src_len == 0 || args.tgt_len == 0 {
        anyhow::bail!("--batch, --src-len and --tgt-len must be at least 1");
    }
    let mut lora = TrainConfig::default().lora;
    if let Some(rank) = args.lora_rank {
        if rank == 0 {
            anyhow::bail!("--lora-rank must be at least 1");
        }
        lora.rank = rank;
    }
    let models: Vec<(String, T5Config)> = match (preset, model) {
        (Some(preset), _) => {
            let preset: Preset = preset.parse()?;
            vec![(preset.name().to_string(), preset.config())]
        }
        (None, Some(dir)) => {
            let config = T5Config::from_file(&dir.join("config.json"))
                .with_context(|| format!("reading {}", dir.display()))?;
            vec![(dir.display().to_string(), config)]
        }
        (None, None) => Preset::ALL
            .iter()
            .map(|p| (p.name().to_string(), p.config()))
            .collect(),
    };
    let targets: Vec<String> = lora
        .targets
        .iter()
        .map(|t| format!("{t:?}").to_lowercase())
        .collect();
    println!(
        "estimated peak training memory (meshtune_model::flops::training_memory): batch {}, source {} tokens, target {} tokens",
        args.batch, args.src_len, args.tgt_len
    );
    println!(
        "weights fp32; gradients + AdamW moments fp32 for the trainable parameters (12 B each)"
    );
    println!(
        "lora: rank {} on {} of every attention, trainable parameters estimated as `meshtune train` does",
        lora.rank,
        targets.join(", ")
    );
    println!(
        "act: activations kept for backward in fp32 (4 B) or bf16 (2 B); meshtune trains in fp32 today, bf16 rows are for comparison"
    );
    println!(
        "fits: total <= usable memory; assumed usable on Jetson AGX Orin (unified CPU+GPU memory, after OS and CUDA context): {}",
        JETSON_AGX_ORIN_BUDGETS
            .iter()
            .map(|b| format!("{} -> {:.0} GiB", b.name, b.usable_gib))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    let width = models
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0)
        .max(16);
    println!(
        "{:<width$} {:>8} {:<5} {:>10} {:<4} {:>9} {:>10} {:>9} {:>9} {:>6} {:>6}",
        "model",
        "params",
        "mode",
        "trainable",
        "act",
        "weights",
        "grad+adam",
        "activ.",
        "total",
        "32GB",
        "64GB"
    );
    for (name, config) in &models {
        for row in memory_rows(name, config, args.batch, args.src_len, args.tgt_len, &lora) {
            let fits: Vec<&str> = JETSON_AGX_ORIN_BUDGETS
                .iter()
                .map(|b| if row.fits(b) { "yes" } else { "no" })
                .collect();
            println!(
                "{:<width$} {:>7.1}M {:<5} {:>9.2}M {:<4} {:>5.2} GiB {:>6.2} GiB {:>5.2} GiB {:>5.2} GiB {:>6} {:>6}",
                row.model,
                row.parameters as f64 / 1e6,
                match row.method {
                    Method::Full => "full",
                    Method::Lora => "lora",
                },
                row.trainable as f64 / 1e6,
                if row.activation_bytes == 4.0 {
                    "fp32"
                } else {
                    "bf16"
                },
                row.estimate.weights / GIB,
                (row.estimate.gradients + row.estimate.optimizer) / GIB,
                row.estimate.activations / GIB,
                row.total_gib(),
                fits[0],
                fits[1]
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samsum_rows(preset: Preset) -> Vec<MemoryRow> {
        memory_rows(
            preset.name(),
            &preset.config(),
            8,
            512,
            128,
            &TrainConfig::default().lora,
        )
    }

    fn row(rows: &[MemoryRow], method: Method, activation_bytes: f64) -> &MemoryRow {
        rows.iter()
            .find(|r| r.method == method && r.activation_bytes == activation_bytes)
            .expect("every method and precision has a row")
    }

    #[test]
    fn lora_and_bf16_need_less_than_full_and_fp32() {
        for preset in Preset::ALL {
            let rows = samsum_rows(preset);
            assert_eq!(rows.len(), 4);
            for bytes in [4.0, 2.0] {
                let full = row(&rows, Method::Full, bytes);
                let lora = row(&rows, Method::Lora, bytes);
                assert!(lora.trainable < full.trainable, "{}", preset.name());
                assert!(lora.total_gib() < full.total_gib(), "{}", preset.name());
                // Only the trainable state differs: same weights, same activations.
                assert_eq!(lora.estimate.weights, full.estimate.weights);
                assert_eq!(lora.estimate.activations, full.estimate.activations);
            }
            for method in [Method::Full, Method::Lora] {
                let fp32 = row(&rows, method, 4.0);
                let bf16 = row(&rows, method, 2.0);
                assert!(bf16.total_gib() < fp32.total_gib(), "{}", preset.name());
                assert!((fp32.estimate.activations - 2.0 * bf16.estimate.activations).abs() < 1.0);
            }
        }
    }

    #[test]
    fn lora_estimate_bounds_the_adapter_parameters() {
        // Each adapter holds A [d_in, r] and B [r, d_out]; q and v map d_model -> inner_dim.
        for preset in Preset::ALL {
            let config = preset.config();
            let lora = TrainConfig::default().lora;
            let attentions = config.num_layers + 2 * config.decoder_layers();
            let exact =
                attentions * lora.targets.len() * lora.rank * (config.d_model + config.inner_dim());
            let estimate = lora_trainable_estimate(&config, &lora);
            assert!(estimate >= exact);
            assert!(estimate <= 2 * exact);
        }
    }

    #[test]
    fn full_xl_does_not_fit_32gb_and_a_bigger_budget_fits_more() {
        let [small_budget, big_budget] = JETSON_AGX_ORIN_BUDGETS;
        assert!(small_budget.usable_gib < big_budget.usable_gib);
        // Weights, gradients and both AdamW moments in fp32 are 16 bytes per parameter before
        // any activation: for 2.85B parameters that alone is more than the 32 GB module has.
        let rows = samsum_rows(Preset::FlanT5Xl);
        let full = row(&rows, Method::Full, 4.0);
        assert!(16.0 * full.parameters as f64 / GIB > small_budget.usable_gib);
        assert!(!full.fits(&small_budget));
        for preset in Preset::ALL {
            for r in samsum_rows(preset) {
                if r.fits(&small_budget) {
                    assert!(r.fits(&big_budget), "{} {:?}", r.model, r.method);
                }
            }
        }
    }

    #[test]
    fn bigger_presets_need_more_memory() {
        let totals: Vec<f64> = Preset::ALL
            .iter()
            .map(|&p| row(&samsum_rows(p), Method::Full, 4.0).total_gib())
            .collect();
        assert!(totals.windows(2).all(|w| w[0] < w[1]), "{totals:?}");
    }
}

#[derive(Debug, Args)]
pub struct ModelExportArgs {
    /// A HF T5 folder; with `--checkpoint`, only its config.json and tokenizer.json are read
    /// (a testnet's `data/` folder will do).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Write the weights of this checkpoint instead of `--model`'s (config and tokenizer
    /// still come from `--model`, the run's starting model): a `checkpoint-<n>/` folder or a
    /// `checkpoints/` root such as a node's `OUT/checkpoints` (its latest, the mesh's model).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// The train config of a LoRA run whose checkpoint is exported (its `[lora]` rank and
    /// targets); the adapters are merged into the weights.
    #[arg(long, requires = "checkpoint")]
    pub train_config: Option<PathBuf>,
    /// On-disk precision: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

#[derive(Debug, Args)]
pub struct ModelInfoArgs {
    /// flan-t5-small, flan-t5-base, flan-t5-large, flan-t5-xl.
    #[arg(long, conflicts_with = "model")]
    pub preset: Option<String>,
    /// A HF T5 folder (reads config.json only).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub memory: MemoryArgs,
}
