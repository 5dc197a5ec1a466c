//! Errors of the model crate. Every variant names the file, key or shape at fault.
//!
//! Owns: [`ModelError`]. Must not hold recovery logic: callers decide what an error means.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config value `{key}`: {reason}")]
    Config { key: String, reason: String },
    #[error("{path}: {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error("{path}: tensor `{key}` is missing")]
    MissingTensor { path: PathBuf, key: String },
    #[error("{path}: tensor `{key}` has shape {found:?} but config.json implies {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{key}` has unsupported dtype {dtype} (expected F32, F16 or BF16)")]
    UnsupportedDtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("data {path}: {source}")]
    Data {
        path: PathBuf,
        #[source]
        source: crate::data::DataError,
    },
    #[error("invalid input: {0}")]
    Input(String),
}
