//! Writing an applied round down off the round's critical path. The coordinator takes the
//! checkpoint in the trainer's queue (a host copy, before any later training command) and
//! moves on to the next round at once; one persister task then waits, in round order, for the
//! trainer's writer thread to put the checkpoint on disk, encodes the state it serves to late
//! joiners, and reports [`Persisted`]. The coordinator appends the round's record only then,
//! so `rounds.jsonl` never names a round that a restart would train again.
//!
//! Owns: the order of the writes. Must not touch: the round machine or the trainer's model.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use libp2p::PeerId;
use meshtune_protocol::TensorSet;
use tokio::sync::mpsc;

use super::config::CoordinatorConfig;
use super::error::{RunError, ServeError};
use super::ledger::serve_state;
use super::record::RoundRecord;
use super::tasks::Done;
use crate::averaging::aggregate::OuterState;
use crate::network::store::BlobStore;
use crate::trainer::TrainerError;

/// A checkpoint being written: ends when it is on disk.
pub type Written = Pin<Box<dyn Future<Output = Result<PathBuf, TrainerError>> + Send>>;

/// One applied round to write down.
pub struct Persist {
    pub round: u64,
    pub record: RoundRecord,
    pub written: Written,
    /// The model after the round and the outer state, served as this node's state.
    pub base: TensorSet,
    pub outer: OuterState,
}

/// A round written down (or the error that stopped it).
pub struct Persisted {
    pub round: u64,
    pub record: RoundRecord,
    pub checkpoint_s: f64,
    pub serve_s: f64,
    pub result: Result<(), RunError>,
}

/// Starts the persister task; it ends when the returned sender is dropped. Two rounds may wait
/// (each holds a copy of the model): a third waits for the disk.
pub fn spawn_persister(
    store: Arc<Mutex<BlobStore>>,
    config: CoordinatorConfig,
    me: PeerId,
    done: mpsc::Sender<Done>,
) -> mpsc::Sender<Persist> {
    let (jobs, mut queue) = mpsc::channel::<Persist>(2);
    tokio::spawn(async move {
        while let Some(job) = queue.recv().await {
            let persisted = persist(job, &store, &config, me).await;
            if done
                .send(Done::Persisted(Box::new(persisted)))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    jobs
}

async fn persist(
    job: Persist,
    store: &Arc<Mutex<BlobStore>>,
    config: &CoordinatorConfig,
    me: PeerId,
) -> Persisted {
    let started = Instant::now();
    let written = job.written.await;
    let checkpoint_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let result = match written {
        Ok(_) => {
            let (store, config) = (Arc::clone(store), config.clone());
            let (round, base, outer) = (job.round, job.base, job.outer);
            tokio::task::spawn_blocking(move || {
                serve_state(&store, &config, me, round + 1, &base, &outer)
            })
            .await
            .unwrap_or_else(|err| Err(ServeError::Panicked(err)))
            .map_err(RunError::Serve)
        }
        Err(source) => Err(RunError::Checkpoint {
            round: job.round + 1,
            source: Box::new(source),
        }),
    };
    Persisted {
        round: job.round,
        record: job.record,
        checkpoint_s,
        serve_s: started.elapsed().as_secs_f64(),
        result,
    }
}
