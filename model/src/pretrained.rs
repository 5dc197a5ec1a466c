//! A HF model folder as one unit: `config.json`, weights and `tokenizer.json`, checked
//! against each other.
//!
//! Owns: finding and cross-checking the three files of a folder. Must not parse weights or
//! tokenize itself: [`crate::weights`] and [`crate::tokenizer`] do.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

use crate::config::T5Config;
use crate::error::ModelError;
use crate::t5::T5;
use crate::tokenizer::T5Tokenizer;
use crate::weights::SafetensorsSource;

/// A loaded model folder.
#[derive(Debug)]
pub struct Pretrained<B: Backend> {
    pub dir: PathBuf,
    pub config: T5Config,
    pub model: T5<B>,
    pub tokenizer: T5Tokenizer,
}

impl<B: Backend> Pretrained<B> {
    /// Loads `dir` (tokenizer from `dir/tokenizer.json` unless `tokenizer` is given) and refuses
    /// a tokenizer whose vocabulary is larger than the model's.
    pub fn load(
        dir: &Path,
        tokenizer: Option<&Path>,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
            });
        }
        let tokenizer_path = tokenizer
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.join("tokenizer.json"));
        let config = T5Config::from_file(&dir.join("config.json"))?;
        let tokenizer = T5Tokenizer::from_file(&tokenizer_path)?;
        // Checked before the (possibly large) weights are read.
        tokenizer.check_fits_model(config.vocab_size)?;
        let mut source = SafetensorsSource::<B>::open(dir, device)?;
        let model = T5::from_source(&config, &mut source)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            model,
            tokenizer,
        })
    }
}
