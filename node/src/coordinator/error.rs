//! Why the round loop stopped, and why this node's own delta or served state could not be
//! made. A peer's bad delta is not here: it is a [`DeltaError`](super::tasks::DeltaError)
//! that screens the peer, and the round goes on.

use std::path::PathBuf;

use meshtune_protocol::{ChunkError, DecodeError, EncodeError, WireError};

use super::record::RecordError;
use crate::averaging::aggregate::AggregateError;
use crate::averaging::gossip::LayoutMismatch;
use crate::network::store::StorePoisoned;
use crate::trainer::TrainerError;

/// Why the round loop stopped before its last round.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// (Boxed: the model's errors carry paths and shapes, and every `Result` of the round
    /// loop would carry their size.)
    #[error("the trainer: {0}")]
    Trainer(Box<TrainerError>),
    #[error("checkpoint before round {round}: {source}")]
    Checkpoint {
        round: u64,
        #[source]
        source: Box<TrainerError>,
    },
    #[error("creating {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serving this node's state: {0}")]
    Serve(#[from] ServeError),
    #[error("writing a round record: {0}")]
    Record(#[from] RecordError),
    #[error("aggregating the round: {0}")]
    Aggregate(#[from] AggregateError),
    #[error("this node's delta: {0}")]
    OwnDelta(#[from] BuildDeltaError),
    /// The checkpoint holds something this node cannot use.
    #[error("the checkpoint's {what}: {detail}")]
    Checkpointed { what: &'static str, detail: String },
    #[error("the gossip machine: {0}")]
    Gossip(#[from] LayoutMismatch),
    #[error(transparent)]
    Store(#[from] StorePoisoned),
    #[error("the persister task stopped")]
    PersisterStopped,
    #[error("the gossip shell runs only a gossip topology")]
    WrongTopology,
}

impl From<TrainerError> for RunError {
    fn from(error: TrainerError) -> Self {
        RunError::Trainer(Box::new(error))
    }
}

/// Why this node's delta could not become a blob and a manifest.
#[derive(Debug, thiserror::Error)]
pub enum BuildDeltaError {
    #[error(transparent)]
    Layout(#[from] AggregateError),
    #[error("the delta's layout differs from the model's")]
    Mismatch(#[from] LayoutMismatch),
    #[error("encoding: {0}")]
    Encode(#[from] EncodeError),
    #[error("decoding it back: {0}")]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error("its manifest: {0}")]
    Manifest(#[from] WireError),
    #[error(transparent)]
    Store(#[from] StorePoisoned),
}

/// Why this node's state could not be served to late joiners.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("encoding: {0}")]
    Encode(#[from] EncodeError),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error(transparent)]
    Store(#[from] StorePoisoned),
    #[error("encoding to {}: {source}", path.display())]
    EncodeFile {
        path: PathBuf,
        #[source]
        source: EncodeError,
    },
    #[error("reading back {}: {source}", path.display())]
    ReadBack {
        path: PathBuf,
        #[source]
        source: ChunkError,
    },
    #[error("the encoding task panicked: {0}")]
    Panicked(#[from] tokio::task::JoinError),
    #[error("{doing} {}: {source}", path.display())]
    Io {
        doing: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
