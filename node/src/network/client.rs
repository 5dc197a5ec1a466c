//! The handle the rest of the node holds on the network task: a cloneable [`Client`] that
//! sends [`Command`]s over a bounded channel and awaits `oneshot` replies with deadlines.
//!
//! Owns: the command vocabulary and the request deadlines. Must not touch: the swarm (only
//! the event loop does).

use std::collections::HashSet;
use std::time::Duration;

use libp2p::gossipsub::{MessageAcceptance, MessageId};
use libp2p::{Multiaddr, PeerId};
use meshtune_protocol::{ChunkRequest, ChunkResponse};
use tokio::sync::{mpsc, oneshot};

/// Why a request through the [`Client`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the network task has stopped")]
    Stopped,
    #[error("request to {peer} failed: {reason}")]
    Failed { peer: PeerId, reason: String },
    #[error("request to {peer} timed out")]
    Timeout { peer: PeerId },
    #[error("publishing failed: {0}")]
    Publish(String),
}

#[derive(Debug)]
pub(crate) enum Command {
    Publish {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Request {
        peer: PeerId,
        request: ChunkRequest,
        reply: oneshot::Sender<Result<ChunkResponse, RequestError>>,
    },
    Report {
        message_id: MessageId,
        source: PeerId,
        acceptance: MessageAcceptance,
    },
    Strike {
        peer: PeerId,
        reason: &'static str,
    },
    MeshPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    RelayedOnly {
        reply: oneshot::Sender<HashSet<PeerId>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Dial {
        addr: Multiaddr,
    },
    SetDenied {
        peers: HashSet<PeerId>,
    },
}

/// Talks to the network task.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    request_deadline: Duration,
}

impl Client {
    pub(crate) fn new(commands: mpsc::Sender<Command>, request_deadline: Duration) -> Self {
        Self {
            commands,
            request_deadline,
        }
    }
}

impl Client {
    async fn send(&self, command: Command) -> Result<(), RequestError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| RequestError::Stopped)
    }

    /// Publishes a manifest on the delta topic.
    pub async fn publish(&self, data: Vec<u8>) -> Result<(), RequestError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Publish { data, reply }).await?;
        match tokio::time::timeout(self.request_deadline, answer).await {
            Ok(Ok(result)) => result.map_err(RequestError::Publish),
            Ok(Err(_)) | Err(_) => Err(RequestError::Stopped),
        }
    }

    /// Sends `request` to `peer` and waits for the answer (bounded by the request timeout).
    pub async fn request(
        &self,
        peer: PeerId,
        request: ChunkRequest,
    ) -> Result<ChunkResponse, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Request {
            peer,
            request,
            reply,
        })
        .await?;
        match tokio::time::timeout(self.request_deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RequestError::Stopped),
            Err(_) => Err(RequestError::Timeout { peer }),
        }
    }

    /// The verdict on a manifest delivered as [`NetworkEvent::Manifest`].
    pub async fn report_manifest(
        &self,
        message_id: MessageId,
        source: PeerId,
        acceptance: MessageAcceptance,
    ) -> Result<(), RequestError> {
        self.send(Command::Report {
            message_id,
            source,
            acceptance,
        })
        .await
    }

    /// Counts a misbehaviour of `peer` (lowers its gossip score; blacklists at
    /// [`MAX_STRIKES`](super::MAX_STRIKES)).
    pub async fn strike(&self, peer: PeerId, reason: &'static str) -> Result<(), RequestError> {
        self.send(Command::Strike { peer, reason }).await
    }

    /// Connected peers subscribed to the delta topic.
    pub async fn mesh_peers(&self) -> Result<Vec<PeerId>, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::MeshPeers { reply }).await?;
        answer.await.map_err(|_| RequestError::Stopped)
    }

    /// Peers reached only through a relay circuit (no direct connection): slow and limited
    /// links that bulk transfers avoid while a direct path to another holder exists.
    pub async fn relayed_only_peers(&self) -> Result<HashSet<PeerId>, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::RelayedOnly { reply }).await?;
        answer.await.map_err(|_| RequestError::Stopped)
    }

    /// Addresses this node listens on (with `/p2p/<id>`).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::ListenAddrs { reply }).await?;
        answer.await.map_err(|_| RequestError::Stopped)
    }

    /// Dials an address (tests and `--peer`).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), RequestError> {
        self.send(Command::Dial { addr }).await
    }

    /// Replaces the operator's deny list (`--deny-file`): these peers are disconnected and
    /// refused until they leave the list.
    pub async fn set_denied(&self, peers: HashSet<PeerId>) -> Result<(), RequestError> {
        self.send(Command::SetDenied { peers }).await
    }
}
