//! `meshtune-bootstrap`: the discovery node of a meshtune mesh, plus the network
//! helpers that every meshtune peer shares.
//!
//! A bootstrap node is what rust-libp2p's `misc/server` is: Kademlia in server mode,
//! identify, ping, an optional relay server and a Prometheus endpoint. It trains
//! nothing and relays no gossip; nodes dial it to find each other.
//!
//! Reusable by the `meshtune` node (see each module's docs):
//! - [`identity`]: the persistent ed25519 key file.
//! - [`transport`]: TCP + noise + yamux, QUIC, DNS, optional pnet key; memory transport
//!   for in-process tests; [`transport::build_swarm`].
//! - [`behaviour`]: the per-mesh Kademlia protocol name and configs, the identify to
//!   Kademlia address hand-off, and the bootstrap node's own behaviour.
//! - [`peer_addr`]: `/ip4/…/tcp/…/p2p/<id>` arguments split into peer id and address.
//! - [`metrics`]: the `/metrics` HTTP endpoint.
//! - [`shaping`]: link profiles (bandwidth, delay, loss) applied inside the TCP transport.
//! - [`wire`]: bytes on the wire by application protocol (blobs, Kademlia, identify, ...).
//!
//! The binary is a thin wrapper around [`service::start`].

pub mod behaviour;
pub mod config;
pub mod identity;
pub mod metrics;
pub mod peer_addr;
pub mod service;
pub mod shaping;
pub mod transport;
pub mod wire;

pub use behaviour::{BootstrapBehaviour, MeshId};
pub use config::BootstrapConfig;
pub use peer_addr::PeerAddr;
pub use service::{Client, Event, RunningBootstrap, StartError, start, start_with_transport};

/// libp2p as this crate uses it, so dependents build swarms with the same version.
pub use libp2p;
