//! What the network task hands the rest of the node: its events, and why it could not start.
//!
//! Owns: those two types. Must not touch: the swarm.

use std::sync::Arc;

use libp2p::core::transport::TransportError;
use libp2p::gossipsub::MessageId;
use libp2p::{Multiaddr, PeerId, noise};
use meshtune_protocol::DeltaManifest;

use super::codec;

/// What the network tells the node.
#[derive(Debug)]
pub enum NetworkEvent {
    /// Listening on this address (with `/p2p/<id>`).
    Listening(Multiaddr),
    /// A structurally valid manifest arrived; the node must call
    /// [`Client::report_manifest`] with its verdict.
    Manifest {
        message_id: MessageId,
        source: PeerId,
        manifest: Arc<DeltaManifest>,
    },
    /// Connected peers subscribed to this mesh's delta topic.
    MeshPeers(usize),
}

/// Why [`super::start`] could not start the network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: Multiaddr,
        source: TransportError<std::io::Error>,
    },
    #[error("gossipsub configuration: {0}")]
    GossipConfig(#[from] libp2p::gossipsub::ConfigBuilderError),
    /// libp2p-gossipsub reports these as text.
    #[error("gossipsub setup: {0}")]
    Gossipsub(String),
    #[error("cannot subscribe to the delta topic: {0}")]
    Subscribe(#[from] libp2p::gossipsub::SubscriptionError),
    #[error(transparent)]
    Protocol(#[from] codec::BlobProtocolError),
    #[error("cannot set up noise for the relay transport: {0}")]
    Noise(#[from] noise::Error),
}
