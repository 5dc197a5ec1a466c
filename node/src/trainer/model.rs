//! The model a node or a training run starts from: its config and tokenizer (from an HF
//! folder or a preset), and its weights (the folder's, or a seeded random init).
//!
//! Owns: the checks that the tokenizer fits the model. Must not touch: training or the mesh.

use std::path::Path;

use burn::tensor::backend::Backend;
use meshtune_model::config::{Preset, T5Config};
use meshtune_model::error::ModelError;
use meshtune_model::t5::T5;
use meshtune_model::tokenizer::T5Tokenizer;
use meshtune_model::weights::{RandomInit, SafetensorsSource};

use super::error::ModelSourceError;

/// The model's config and tokenizer from `--model DIR` (its `config.json`, and
/// `DIR/tokenizer.json` unless `--tokenizer` is given) or `--preset NAME` (needs `--tokenizer`),
/// checked against each other. Shared by `meshtune train` and `meshtune node`.
pub fn model_config_and_tokenizer(
    model: Option<&Path>,
    preset: Option<&str>,
    tokenizer: Option<&Path>,
) -> Result<(T5Config, T5Tokenizer), ModelSourceError> {
    let (config, tokenizer_path) = match (model, preset) {
        (Some(dir), _) => (
            T5Config::from_file(&dir.join("config.json"))?,
            tokenizer.map_or_else(|| dir.join("tokenizer.json"), Path::to_path_buf),
        ),
        (None, Some(preset)) => (
            preset.parse::<Preset>()?.config(),
            tokenizer
                .ok_or(ModelSourceError::NoTokenizer)?
                .to_path_buf(),
        ),
        (None, None) => return Err(ModelSourceError::NoModel),
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
) -> Result<T5<B>, ModelError> {
    B::seed(device, seed);
    Ok(match (model_dir, random_init) {
        (Some(dir), false) => {
            T5::from_source(config, &mut SafetensorsSource::<B>::open(dir, device)?)?
        }
        _ => T5::from_source(config, &mut RandomInit::<B>::new(config, device, seed))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_model_or_tokenizer_is_named() {
        let err = model_config_and_tokenizer(None, None, None).expect_err("no model");
        assert!(matches!(err, ModelSourceError::NoModel), "{err:?}");
        let err = model_config_and_tokenizer(None, Some("flan-t5-small"), None)
            .expect_err("no tokenizer");
        assert!(matches!(err, ModelSourceError::NoTokenizer), "{err:?}");
        let err = model_config_and_tokenizer(None, Some("flan-t5-huge"), None)
            .expect_err("no such preset");
        assert!(err.to_string().contains("flan-t5-huge"), "{err}");
        let missing = Path::new("/nonexistent/model");
        let err = model_config_and_tokenizer(Some(missing), None, None).expect_err("no dir");
        assert!(err.to_string().contains("/nonexistent/model"), "{err}");
    }
}
