//! `meshtune-bootstrap`: the discovery node of a meshtune mesh, a thin service on top of
//! [`meshtune_net`] (the libp2p layer it shares with the `meshtune` node).
//!
//! A bootstrap node is what rust-libp2p's `misc/server` is: Kademlia in server mode,
//! identify, ping, an optional relay server and a Prometheus endpoint. It trains
//! nothing and relays no gossip; nodes dial it to find each other.
//!
//! - [`config`]: flags, the TOML file and the resolved [`BootstrapConfig`].
//! - [`behaviour`]: [`BootstrapBehaviour`] (Kademlia server, identify, ping, limits, relay).
//! - [`metrics`]: what the node records ([`metrics::BootstrapMetrics`]).
//! - [`service`]: the running node ([`start`], [`Client`], [`Event`]).
//!
//! The binary is a thin wrapper around [`service::start`].

pub mod behaviour;
pub mod config;
pub mod metrics;
pub mod service;

pub use behaviour::BootstrapBehaviour;
pub use config::BootstrapConfig;
pub use service::{Client, Event, RunningBootstrap, StartError, start, start_with_transport};

/// The types of [`BootstrapConfig`]'s fields, and libp2p as this crate uses it (so
/// dependents build swarms with the same version).
pub use meshtune_net::{MeshId, PeerAddr, libp2p};
