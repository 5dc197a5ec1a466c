//! `meshtune-net`: the libp2p layer every meshtune peer shares, the `meshtune` node and the
//! `meshtune-bootstrap` discovery node alike. Each module says what it owns:
//!
//! - [`identity`]: the persistent ed25519 key file.
//! - [`transport`]: TCP + noise + yamux, QUIC, DNS, optional pnet key; memory transport
//!   for in-process tests; [`transport::build_swarm`]; bandwidth and wire counters.
//! - [`discovery`]: the per-mesh Kademlia protocol name ([`MeshId`]) and configs, and the
//!   identify to Kademlia address hand-off.
//! - [`peer_addr`]: `/ip4/…/tcp/…/p2p/<id>` arguments split into peer id and address.
//! - [`metrics`]: the `/metrics` HTTP endpoint.
//! - [`wire`]: bytes on the wire by application protocol (blobs, Kademlia, identify, ...).
//! - [`shaping`]: link profiles (bandwidth, delay, loss) for testing slow networks. Not part
//!   of the production path: [`transport::network_transport`] puts a TCP connection through
//!   it only when a profile is set (`--link`); otherwise the stream is never wrapped.
//!
//! No swarm is driven here: the node's and the bootstrap node's event loops do that.

pub mod discovery;
pub mod identity;
pub mod metrics;
pub mod peer_addr;
pub mod shaping;
pub mod transport;
pub mod wire;

pub use discovery::MeshId;
pub use peer_addr::PeerAddr;

/// libp2p as this crate uses it, so dependents build swarms with the same version.
pub use libp2p;
