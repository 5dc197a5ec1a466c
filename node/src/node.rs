//! The one way to start a node: [`Node::spawn`] puts a trainer, a network stack and the round
//! loop together and hands back a [`NodeHandle`]. The `meshtune node` command, the testnet's
//! in-process simulation and the mesh tests all start nodes through it.
//!
//! Owns: the wiring (the blob store shared by the network and the round loop, the metrics
//! registry, the shutdown token). Must not touch: command-line parsing, transports (built by
//! the caller: TCP/QUIC with a key and a link profile, or the memory transport of tests) or
//! the model (the caller builds the trainer).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use libp2p::identity::Keypair;
use meshtune_net::transport::BoxedTransport;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::coordinator::ledger::blocking;
use crate::coordinator::metrics::NodeMetrics;
use crate::coordinator::{self, CoordinatorConfig, RunError, RunSummary, Start};
use crate::network::store::BlobStore;
use crate::network::{self, Client, NetworkConfig, NetworkError};
use crate::trainer::{TrainerError, TrainerHandle};

/// Everything a node is made of.
pub struct NodeConfig {
    pub keypair: Keypair,
    /// Secured and multiplexed; see [`meshtune_net::transport`].
    pub transport: BoxedTransport,
    pub network: NetworkConfig,
    pub coordinator: CoordinatorConfig,
    pub trainer: TrainerHandle,
    /// Concurrent uploads of this node's state (`None`: the store's default).
    pub max_state_uploads: Option<usize>,
    /// Cancelling it stops the node (as a crash would for its peers: no goodbye).
    pub shutdown: CancellationToken,
}

/// Why a node could not start or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("the trainer could not hand over its model: {0}")]
    Trainer(TrainerError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("the round loop stopped: {0}")]
    Run(RunError),
    #[error("the round loop panicked: {0}")]
    Panicked(#[from] tokio::task::JoinError),
}

/// A running node.
pub struct NodeHandle {
    pub peer_id: PeerId,
    /// The node's network (to dial, to ask peers, to set a deny list).
    pub client: Client,
    pub trainer: TrainerHandle,
    pub metrics: NodeMetrics,
    /// Every metric of the node (network and rounds), for a `/metrics` endpoint.
    pub registry: Arc<Registry>,
    /// Cancelling it stops the node (as a crash would for its peers: no goodbye).
    pub shutdown: CancellationToken,
    /// The round loop; ends with the run's summary.
    pub rounds: tokio::task::JoinHandle<Result<RunSummary, RunError>>,
    network: tokio::task::JoinHandle<()>,
}

/// Starts nodes.
#[derive(Debug)]
pub struct Node;

impl Node {
    /// Starts the network stack and the round loop on the current Tokio runtime (it must be
    /// called within one). Waits for the trainer to report the model's layout, which every
    /// peer's manifest is checked against.
    pub fn spawn(config: NodeConfig) -> Result<NodeHandle, NodeError> {
        let NodeConfig {
            keypair,
            transport,
            network: network_config,
            coordinator: coordinator_config,
            trainer,
            max_state_uploads,
            shutdown,
        } = config;
        // The trainer is its own thread: waiting for it does not need the runtime to progress.
        let weights = blocking(|| futures::executor::block_on(trainer.weights()));
        let layout = weights.map_err(NodeError::Trainer)?.layout();
        let mut registry = Registry::default();
        let metrics = NodeMetrics::new(&mut registry);
        let store = Arc::new(Mutex::new(match max_state_uploads {
            Some(max) => BlobStore::with_max_state_uploads(max),
            None => BlobStore::default(),
        }));
        let running = network::start(
            &keypair,
            transport,
            network_config,
            Arc::new(layout),
            Arc::clone(&store),
            &mut registry,
            shutdown.child_token(),
        )?;
        let registry = Arc::new(registry);
        metrics.attach_registry(Arc::clone(&registry));
        let start = Start {
            config: coordinator_config,
            me: running.peer_id,
            trainer: trainer.clone(),
            client: running.client.clone(),
            store,
            metrics: metrics.clone(),
        };
        let rounds = tokio::spawn(coordinator::run(start, running.events, shutdown.clone()));
        Ok(NodeHandle {
            peer_id: running.peer_id,
            client: running.client,
            trainer,
            metrics,
            registry,
            shutdown,
            rounds,
            network: running.task,
        })
    }
}

impl NodeHandle {
    /// Waits for the round loop to end, then stops the network (at most 5 s for it).
    pub async fn join(self) -> Result<RunSummary, NodeError> {
        let summary = self.rounds.await;
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.network).await;
        summary?.map_err(NodeError::Run)
    }
}
