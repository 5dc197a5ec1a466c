//! The node's round loop: it drives a pure state machine from [`crate::averaging`] (the
//! all-to-all [`RoundMachine`](crate::averaging::round::RoundMachine) or the sparse
//! [`GossipMachine`](crate::averaging::gossip::GossipMachine)), performs its actions with the
//! trainer thread, the network client and the blob store, and records what every round did.
//!
//! - [`all_to_all`] and [`gossip`]: the two shells, one per machine;
//! - [`tasks`]: the all-to-all shell's spawned work (train + publish, fetch, apply, sync);
//! - [`ledger`]: checkpoints, `rounds.jsonl` ([`record`]) and the served state; [`persist`]:
//!   writing an applied round down while the next one trains;
//! - [`inbox`]: the network's event channel, drained during every wait;
//! - [`sync`]: taking a peer's state; [`metrics`]: the node's Prometheus metrics.
//!
//! Owns: the current model, the error-feedback residuals, the outer optimizer state, the
//! decoded deltas of the open rounds and everything under `OUT/`. Must not touch: the swarm
//! (only through [`Client`]) or the model's internals (only through [`TrainerHandle`]).

pub mod all_to_all;
pub mod config;
pub mod error;
pub mod gossip;
pub mod inbox;
pub mod ledger;
pub mod metrics;
pub mod persist;
pub mod record;
pub mod sync;
pub mod tasks;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::inbox::Inbox;
use crate::network::NetworkEvent;

pub use self::config::{CoordinatorConfig, Misbehaviour, MisbehaviourError, RunSummary, Start};
pub use self::error::{BuildDeltaError, RunError, ServeError};
pub use self::ledger::serve_state;
pub use self::record::{RoundRecord, process_memory};
pub use self::sync::{SyncError, SyncedState, fetch_state};
pub use crate::averaging::gossip::Topology;

/// Runs rounds until `config.rounds` are applied or `shutdown` fires, with the machine the
/// topology calls for.
pub async fn run(
    start: Start,
    events: mpsc::Receiver<NetworkEvent>,
    shutdown: CancellationToken,
) -> Result<RunSummary, RunError> {
    let mut inbox = Inbox::new(events, start.client.clone());
    match start.config.topology {
        Topology::All => {
            let (coordinator, done) =
                all_to_all::Coordinator::start(start, &mut inbox, &shutdown).await?;
            coordinator.run(inbox, done, shutdown).await
        }
        Topology::Gossip { .. } => gossip::run(start, inbox, shutdown).await,
    }
}
