//! What a node's network is told at start: [`NetworkConfig`].
//!
//! Owns: the settings and their defaults. Must not touch: the swarm (the behaviour and the
//! event loop read these).

use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::gossipsub::IdentTopic;
use meshtune_net::{MeshId, PeerAddr};
use meshtune_protocol::Limits;

/// How the node's network behaves.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub mesh: MeshId,
    pub listen: Vec<Multiaddr>,
    /// Bootstrap (or any known) peers to dial first.
    pub bootstrap: Vec<PeerAddr>,
    /// Addresses to announce in addition to the observed ones.
    pub external: Vec<Multiaddr>,
    pub limits: Limits,
    /// Random-walk interval of Kademlia (a lookup of a random key).
    pub random_walk_interval: Duration,
    /// How often a node with fewer than `target_peers` connections dials known peers it is
    /// not connected to (heals partitions and dropped links).
    pub reconnect_interval: Duration,
    pub target_peers: usize,
    /// Dial a newly discovered mesh member only while connected to fewer peers than this
    /// (`None`: dial every one, as all-to-all averaging wants a direct link to each delta's
    /// owner). Sparse gossip averaging needs a few links per node, not the whole mesh. (Links
    /// that Kademlia lookups open still stay: gossipsub keeps every connection alive. See
    /// docs/BENCHMARKS.md, scale simulation.)
    ///
    /// Such a sparse node also looks the mesh up more cheaply: a lookup of its own id on
    /// joining instead of Kademlia's bootstrap (a lookup per bucket), lookups that end on 8
    /// peers, no periodic bootstrap, and of the bootstrap libp2p-kad starts by itself on a
    /// new node only the first step.
    pub dial_discovered_below: Option<usize>,
    pub request_timeout: Duration,
    /// Inbound blob requests one peer may make per second (averaged over 10 s).
    pub max_requests_per_peer_per_s: u32,
    pub gossip_heartbeat: Duration,
    pub idle_connection_timeout: Duration,
    pub max_connections: u32,
    pub relay_client: bool,
    /// Relays to reserve a slot on (with `relay_client`): the node then also listens on
    /// `<relay>/p2p-circuit`, so peers that cannot reach it directly connect through the relay.
    pub relays: Vec<PeerAddr>,
    /// Where the known peers (Kademlia's table) are kept across restarts: a node whose
    /// bootstrap is gone rejoins through any peer it knew.
    pub peer_table: Option<std::path::PathBuf>,
    pub dcutr: bool,
    pub autonat: bool,
    pub mdns: bool,
    pub agent_version: String,
}

impl NetworkConfig {
    pub fn new(mesh: MeshId) -> Self {
        Self {
            mesh,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            external: Vec::new(),
            limits: Limits::default(),
            random_walk_interval: Duration::from_secs(30),
            reconnect_interval: Duration::from_secs(5),
            target_peers: 8,
            dial_discovered_below: None,
            request_timeout: Duration::from_secs(30),
            max_requests_per_peer_per_s: 200,
            gossip_heartbeat: Duration::from_millis(500),
            idle_connection_timeout: Duration::from_secs(120),
            max_connections: 256,
            relay_client: false,
            relays: Vec::new(),
            peer_table: None,
            dcutr: false,
            autonat: false,
            mdns: false,
            agent_version: format!("meshtune/{}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// `meshtune/<mesh>/deltas`.
    pub fn delta_topic(&self) -> IdentTopic {
        IdentTopic::new(format!("meshtune/{}/deltas", self.mesh))
    }
}
