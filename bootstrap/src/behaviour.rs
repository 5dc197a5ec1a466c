//! The bootstrap node's behaviour: Kademlia in server mode, identify, ping, connection
//! limits and an optional relay server (the shared discovery pieces come from
//! [`meshtune_net::discovery`]). This module holds no state of its own and does no I/O.

use std::time::Duration;

use libp2p::{
    PeerId, connection_limits, identify,
    identity::Keypair,
    kad, ping, relay,
    swarm::{NetworkBehaviour, behaviour::toggle::Toggle},
};
use meshtune_net::discovery::{MeshId, identify_config, kademlia};

/// How the bootstrap node behaves.
#[derive(Debug, Clone)]
pub struct BehaviourConfig {
    pub mesh: MeshId,
    /// Serve as a circuit relay v2 for peers behind NAT.
    pub relay: bool,
    pub bootstrap_interval: Duration,
    /// Established connections, all peers together.
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    pub max_pending_incoming: u32,
    pub agent_version: String,
}

impl Default for BehaviourConfig {
    fn default() -> Self {
        Self {
            mesh: MeshId::default(),
            relay: false,
            bootstrap_interval: Duration::from_secs(5 * 60),
            max_connections: 1024,
            max_connections_per_peer: 4,
            max_pending_incoming: 128,
            agent_version: format!("meshtune-bootstrap/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Kademlia server + identify + ping + connection limits (+ relay server).
#[derive(NetworkBehaviour)]
pub struct BootstrapBehaviour {
    /// First, so a connection over the limits is denied before the others set up handlers.
    pub limits: connection_limits::Behaviour,
    pub kademlia: kad::Behaviour<kad::store::MemoryStore>,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub relay: Toggle<relay::Behaviour>,
}

impl BootstrapBehaviour {
    pub fn new(keypair: &Keypair, config: &BehaviourConfig) -> Self {
        let local_peer_id = keypair.public().to_peer_id();
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(config.max_connections))
            .with_max_established_per_peer(Some(config.max_connections_per_peer))
            .with_max_pending_incoming(Some(config.max_pending_incoming));
        Self {
            limits: connection_limits::Behaviour::new(limits),
            kademlia: kademlia(local_peer_id, &config.mesh, Some(config.bootstrap_interval)),
            identify: identify::Behaviour::new(identify_config(
                keypair.public(),
                &config.mesh,
                config.agent_version.clone(),
            )),
            ping: ping::Behaviour::new(ping::Config::new()),
            relay: config
                .relay
                .then(|| relay::Behaviour::new(local_peer_id, relay::Config::default()))
                .into(),
        }
    }

    /// Peers in the Kademlia routing table.
    pub fn routing_table_peers(&mut self) -> Vec<PeerId> {
        self.kademlia
            .kbuckets()
            .flat_map(|bucket| {
                bucket
                    .iter()
                    .map(|entry| *entry.node.key.preimage())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Number of peers in the Kademlia routing table.
    pub fn routing_table_size(&mut self) -> usize {
        self.kademlia
            .kbuckets()
            .map(|bucket| bucket.num_entries())
            .sum()
    }
}
