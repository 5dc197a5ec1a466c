//! The model a node or a training run starts from: its config and tokenizer (from an HF
//! folder or a preset), and its weights (the folder's, or a seeded random init).
//!
//! Owns: the checks that the tokenizer fits the model. Must not touch: training or the mesh.

use std::path::Path;

use anyhow::Context;
use burn::tensor::backend::Backend;
use meshtune_model::config::{Preset, T5Config};
use meshtune_model::t5::T5;
use meshtune_model::tokenizer::T5Tokenizer;
use meshtune_model::weights::{RandomInit, SafetensorsSource};

/// The model's config and tokenizer from `--model DIR` (its `config.json`, and
/// `DIR/tokenizer.json` unless `--tokenizer` is given) or `--preset NAME` (needs `--tokenizer`),
/// checked against each other. Shared by `meshtune train` and `meshtune node`.
pub fn model_config_and_tokenizer(
    model: Option<&Path>,
    preset: Option<&str>,
    tokenizer: Option<&Path>,
) -> anyhow::Result<(T5Config, T5Tokenizer)> {
    let (config, tokenizer_path) = match (model, preset) {
        (Some(dir), _) => (
            T5Config::from_file(&dir.join("config.json"))?,
            tokenizer.map_or_else(|| dir.join("tokenizer.json"), Path::to_path_buf),
        ),
        (None, Some(preset)) => (
            preset.parse::<Preset>()?.config(),
            tokenizer
                .context("--preset needs --tokenizer FILE")?
                .to_path_buf(),
        ),
        (None, None) => anyhow::bail!("give --model DIR or --preset NAME"),
    };
    let tokenizer = T5Tokenizer::from_file(&tokenizer_path)?;
    tokenizer.check_fits_model(config.vocab_size)?;
    Ok((config, tokenizer))
}

/// The starting model: the weights in `model_dir`, or random weights from `seed` (with
/// `random_init` or a preset). Also seeds the backend generator (dropout) with `seed`.
pub fn initial_model<B: Backend>(
    config: &T5Config,
    model_dir: Option<&Path>,
    random_init: bool,
    seed: u64,
    device: &B::Device,
) -> anyhow::Result<T5<B>> {
    B::seed(device, seed);
    Ok(match (model_dir, random_init) {
        (Some(dir), false) => {
            T5::from_source(config, &mut SafetensorsSource::<B>::open(dir, device)?)?
        }
        _ => T5::from_source(config, &mut RandomInit::<B>::new(config, device, seed))?,
    })
}
