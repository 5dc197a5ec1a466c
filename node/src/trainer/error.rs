//! What can go wrong in local training, as the round loop sees it: the model's own errors,
//! weights that do not fit the model, and a trainer or checkpoint-writer thread that has gone.

use std::path::PathBuf;

use meshtune_model::error::ModelError;
use meshtune_protocol::TensorSetError;

use super::config::TrainConfigError;

/// Why a trainer command failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Config(#[from] TrainConfigError),
    #[error("the weights: {0}")]
    Tensors(#[from] TensorSetError),
    #[error("no training examples")]
    NoExamples,
    /// Weights handed to the trainer do not have the model's tensors and shapes.
    #[error("{doing}: the weights' layout differs from the model's ({detail})")]
    Layout { doing: &'static str, detail: String },
    #[error("restoring {}: {source}", dir.display())]
    Restore {
        dir: PathBuf,
        #[source]
        source: ModelError,
    },
    /// Shared state of the trainer (a simulation's ledger, say) was poisoned by a panic.
    #[error("{0} is poisoned (a thread panicked while holding it)")]
    Poisoned(&'static str),
    #[error("the trainer thread has stopped")]
    Stopped,
    #[error("the trainer thread stopped (panicked?) mid-command")]
    StoppedMidCommand,
    #[error("the checkpoint writer thread stopped")]
    WriterStopped,
    #[error("spawning the {thread} thread: {source}")]
    Spawn {
        thread: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Why [`model_config_and_tokenizer`](super::model::model_config_and_tokenizer) found no model.
#[derive(Debug, thiserror::Error)]
pub enum ModelSourceError {
    #[error("give --model DIR or --preset NAME")]
    NoModel,
    #[error("--preset needs --tokenizer FILE")]
    NoTokenizer,
    #[error(transparent)]
    Model(#[from] ModelError),
}
