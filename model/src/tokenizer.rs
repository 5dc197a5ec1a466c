//! `tokenizer.json` through the `tokenizers` crate, with its post-processor applied (T5's
//! appends `</s>`), and the batching/padding of token ids.
//!
//! Owns: text <-> ids. Must not touch tensors.

use std::path::{Path, PathBuf};

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::ModelError;

/// A loaded tokenizer plus the path it came from (for error messages and export).
#[derive(Clone)]
pub struct T5Tokenizer {
    inner: Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl T5Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        if !path.exists() {
            return Err(ModelError::Tokenizer {
                path: path.to_path_buf(),
                reason: "file not found".into(),
            });
        }
        let inner = Tokenizer::from_file(path).map_err(|err| ModelError::Tokenizer {
            path: path.to_path_buf(),
            reason: err.to_string(),
        })?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Refuses a tokenizer that can emit ids the model has no embedding for.
    pub fn check_fits_model(&self, model_vocab: usize) -> Result<(), ModelError> {
        let size = self.vocab_size();
        if size > model_vocab {
            return Err(ModelError::Tokenizer {
                path: self.path.clone(),
                reason: format!(
                    "tokenizer vocabulary ({size}) is larger than the model's vocab_size ({model_vocab})"
                ),
            });
        }
        Ok(())
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encodes with special tokens (post-processor applied), truncating to `max_len`
    /// the way HF's `tokenizer(text, truncation=True, max_length=max_len)` does
    /// (room is kept for the appended `</s>`).
    pub fn encode(&self, text: &str, max_len: Option<usize>) -> Result<Vec<u32>, ModelError> {
        let mut tokenizer = self.inner.clone();
        let truncation = max_len.map(|max_length| TruncationParams {
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        });
        tokenizer
            .with_truncation(truncation)
            .map_err(|err| ModelError::Tokenizer {
                path: self.path.clone(),
                reason: err.to_string(),
            })?;
        let encoding = tokenizer
            .encode(text, true)
            .map_err(|err| ModelError::Tokenizer {
                path: self.path.clone(),
                reason: format!("cannot encode text: {err}"),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner
            .decode(ids, true)
            .map_err(|err| ModelError::Tokenizer {
                path: self.path.clone(),
                reason: format!("cannot decode ids: {err}"),
            })
    }
}

/// Right-pads rows to the longest; returns `(ids, mask, max_len)` flattened row-major.
pub fn pad_batch(rows: &[Vec<u32>], pad_id: u32) -> (Vec<i64>, Vec<i64>, usize) {
    let max_len = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * max_len);
    let mut mask = Vec::with_capacity(rows.len() * max_len);
    for row in rows {
        for i in 0..max_len {
            match row.get(i) {
                Some(&id) => {
                    ids.push(id as i64);
                    mask.push(1);
                }
                None => {
                    ids.push(pad_id as i64);
                    mask.push(0);
                }
            }
        }
    }
    (ids, mask, max_len)
}
