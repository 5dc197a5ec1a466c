//! `meshtune model info`: parameter counts from a preset or a folder's config.json.

use anyhow::Context;
use meshtune_model::config::{Preset, T5Config};

use meshtune_model::backend::Cpu;
use meshtune_model::pretrained::Pretrained;
use meshtune_model::weights::{ExportDtype, export_hf_folder};

use crate::cli::{ModelExportArgs, ModelInfoArgs};

/// `meshtune model export`: read a folder, write config.json, model.safetensors, tokenizer.json.
pub fn export(args: ModelExportArgs) -> anyhow::Result<()> {
    let dtype = match args.dtype.as_str() {
        "f32" | "float32" => ExportDtype::F32,
        "bf16" | "bfloat16" => ExportDtype::Bf16,
        "f16" | "float16" => ExportDtype::F16,
        other => anyhow::bail!("unknown --dtype {other:?}: expected f32, bf16 or f16"),
    };
    let device = Default::default();
    let loaded = Pretrained::<Cpu>::load(&args.model, None, &device)
        .with_context(|| format!("loading {}", args.model.display()))?;
    export_hf_folder(
        &loaded.model,
        &loaded.config,
        Some(loaded.tokenizer.path()),
        &args.out,
        dtype,
    )?;
    tracing::info!(from = %args.model.display(), to = %args.out.display(), dtype = %args.dtype, "exported");
    Ok(())
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
