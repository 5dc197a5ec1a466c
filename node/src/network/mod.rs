//! The node's network actor: one task ([`EventLoop`]) owns the libp2p swarm; the rest of the
//! node talks to it through a cloneable [`Client`] (bounded command channel, oneshot replies
//! with deadlines) and receives [`NetworkEvent`]s on a bounded channel, as in rust-libp2p's
//! file-sharing example.
//!
//! Behaviours: Kademlia (server mode, per-mesh protocol, periodic random walks), identify,
//! ping, gossipsub for delta manifests only (signed, strict, content-hash message ids, peer
//! scoring, manifest-sized transmit cap), request-response for blob chunks (served from the
//! [`BlobStore`] right here, per-peer rate limit), connection limits, and optional relay
//! client, DCUtR, AutoNAT and mDNS.
//!
//! Owns: the swarm, gossip validation of manifest *structure* (size caps, mesh id, signer ==
//! sender, layout) and peer strikes. Must not touch: rounds, models or files; whether a
//! well-formed manifest is timely is the round machine's call, reported back through
//! [`Client::report_manifest`].

pub mod codec;
pub mod fetch;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::Transport;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{OrTransport, upgrade::Version};
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageId, TopicHash};
use libp2p::identity::Keypair;
use libp2p::kad;
use libp2p::metrics::Recorder;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle};
use libp2p::{
    Multiaddr, PeerId, Swarm, allow_block_list, autonat, connection_limits, dcutr, identify, mdns,
    noise, ping, relay, yamux,
};
use meshtune_bootstrap::PeerAddr;
use meshtune_bootstrap::behaviour::{MeshId, add_identified_addresses, identify_config, kademlia};
use meshtune_bootstrap::transport::BoxedTransport;
use meshtune_protocol::{ChunkRequest, ChunkResponse, DeltaManifest, Limits, ModelLayout};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use self::codec::{BlobCodec, blob_protocol};
use self::store::BlobStore;

const COMMAND_CHANNEL_CAPACITY: usize = 256;
const EVENT_CHANNEL_CAPACITY: usize = 256;
/// Extra room over the manifest cap for gossipsub framing and the signature.
const GOSSIP_FRAMING_ALLOWANCE: usize = 4096;
/// Strikes after which a peer is blacklisted and disconnected.
pub const MAX_STRIKES: u32 = 5;

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

/// Why a structurally decoded delta manifest is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestFault {
    Mesh,
    /// It does not name the peer that vouches for it (gossip signer or connection).
    Sender,
    Layout,
}

impl ManifestFault {
    pub fn reason(self) -> &'static str {
        match self {
            ManifestFault::Mesh => "manifest for another mesh",
            ManifestFault::Sender => "manifest names another sender than the peer",
            ManifestFault::Layout => "manifest does not match the model layout",
        }
    }
}

/// The checks every delta manifest passes, however it arrived: this mesh, sent by `from`
/// (the gossip signer or the peer on the connection), tensors matching the model layout.
pub fn check_manifest(
    manifest: &DeltaManifest,
    mesh: &str,
    from: PeerId,
    layout: &ModelLayout,
) -> Result<(), ManifestFault> {
    if manifest.mesh_id != mesh {
        return Err(ManifestFault::Mesh);
    }
    if PeerId::from_bytes(&manifest.sender).ok() != Some(from) {
        return Err(ManifestFault::Sender);
    }
    manifest
        .check_layout(layout)
        .map_err(|_| ManifestFault::Layout)
}

/// Message ids of manifests received over request-response rather than gossip.
const DIRECT_MANIFEST_PREFIX: &[u8] = b"direct/";

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

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("gossipsub setup: {0}")]
    Gossipsub(String),
    #[error("invalid mesh id for the blob protocol: {0}")]
    Protocol(String),
    #[error("cannot set up noise for the relay transport: {0}")]
    Noise(#[from] noise::Error),
}

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
enum Command {
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
    /// [`MAX_STRIKES`]).
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

/// Everything a meshtune node speaks.
#[derive(NetworkBehaviour)]
pub struct NodeBehaviour {
    denied: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    limits: connection_limits::Behaviour,
    kademlia: kad::Behaviour<kad::store::MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    gossipsub: gossipsub::Behaviour,
    blobs: request_response::Behaviour<BlobCodec>,
    relay_client: Toggle<relay::client::Behaviour>,
    dcutr: Toggle<dcutr::Behaviour>,
    autonat: Toggle<autonat::Behaviour>,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// Gossipsub for manifests: signed by their author, strictly validated, message id = blake3
/// of the content (so a republished manifest is the same message), scored.
fn gossipsub_behaviour(
    keypair: &Keypair,
    config: &NetworkConfig,
) -> Result<gossipsub::Behaviour, NetworkError> {
    let gossip_config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .message_id_fn(|message: &gossipsub::Message| {
            MessageId::from(blake3::hash(&message.data).as_bytes().to_vec())
        })
        .max_transmit_size(config.limits.max_manifest_bytes + GOSSIP_FRAMING_ALLOWANCE)
        .heartbeat_interval(config.gossip_heartbeat)
        .build()
        .map_err(|err| NetworkError::Gossipsub(err.to_string()))?;
    let mut behaviour = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(keypair.clone()),
        gossip_config,
    )
    .map_err(|err| NetworkError::Gossipsub(err.to_string()))?;
    let topic = config.delta_topic().hash();
    let mut params = gossipsub::PeerScoreParams::default();
    // Manifests are a few per round: delivery-rate penalties (P3, P3b) would punish quiet
    // honest peers, so only invalid deliveries (P4) and the application score (P5) count.
    params.topics.insert(
        topic,
        gossipsub::TopicScoreParams {
            topic_weight: 1.0,
            mesh_message_deliveries_weight: 0.0,
            mesh_failure_penalty_weight: 0.0,
            invalid_message_deliveries_weight: -50.0,
            invalid_message_deliveries_decay: 0.9,
            ..gossipsub::TopicScoreParams::default()
        },
    );
    params.app_specific_weight = 1.0;
    // Local testnets run every node on one loopback address.
    params
        .ip_colocation_factor_whitelist
        .insert(IpAddr::V4(Ipv4Addr::LOCALHOST));
    behaviour
        .with_peer_score(params, gossipsub::PeerScoreThresholds::default())
        .map_err(|err| NetworkError::Gossipsub(err.to_string()))?;
    behaviour
        .subscribe(&config.delta_topic())
        .map_err(|err| NetworkError::Gossipsub(err.to_string()))?;
    Ok(behaviour)
}

/// Kademlia's periodic bootstrap for a node: every 5 minutes, except on a sparse node
/// (gossip), which needs a few links, not a fresh view of every bucket. There each bootstrap
/// (~8 lookups of ~50 requests, each answered with 20 peer records) runs for minutes on a
/// loaded machine, and in a mesh of 200 under churn Kademlia cost 0.6-1.7x the round's deltas
/// (docs/BENCHMARKS.md, churn against N); its links and the random walk keep it connected.
fn kad_bootstrap_interval(config: &NetworkConfig) -> Option<Duration> {
    config
        .dial_discovered_below
        .is_none()
        .then_some(Duration::from_secs(300))
}

/// How many closest peers a sparse node's own lookups end on (Kademlia's k is 20): each
/// lookup then asks ~15 peers instead of ~50, and still learns of more peers than the links
/// the node dials.
const SPARSE_LOOKUP_RESULTS: NonZeroUsize = NonZeroUsize::new(8).expect("nonzero");

/// A started network task.
pub struct RunningNetwork {
    pub client: Client,
    pub events: mpsc::Receiver<NetworkEvent>,
    pub peer_id: PeerId,
    pub task: tokio::task::JoinHandle<()>,
}

/// Builds the swarm on `transport` (already secured and multiplexed; see
/// [`meshtune_bootstrap::transport`]), listens, dials the bootstrap peers and spawns the
/// event loop. `layout` is what every manifest must match; `store` is what this node serves.
pub fn start(
    keypair: &Keypair,
    transport: BoxedTransport,
    config: NetworkConfig,
    layout: Arc<ModelLayout>,
    store: Arc<Mutex<BlobStore>>,
    registry: &mut prometheus_client::registry::Registry,
    shutdown: CancellationToken,
) -> Result<RunningNetwork, NetworkError> {
    let peer_id = keypair.public().to_peer_id();
    let (transport, relay_client) = if config.relay_client {
        let (relay_transport, behaviour) = relay::client::new(peer_id);
        let relay_transport = relay_transport
            .upgrade(Version::V1Lazy)
            .authenticate(noise::Config::new(keypair)?)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
        let combined = OrTransport::new(relay_transport, transport)
            .map(|either, _| either.into_inner())
            .boxed();
        (combined, Some(behaviour))
    } else {
        (transport, None)
    };
    let transport = meshtune_bootstrap::transport::with_bandwidth_metrics(transport, registry);
    let protocol = blob_protocol(config.mesh.as_str()).map_err(NetworkError::Protocol)?;
    let blobs = request_response::Behaviour::with_codec(
        BlobCodec {
            limits: config.limits.clone(),
        },
        [(protocol, ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(config.request_timeout)
            .with_max_concurrent_streams(64),
    );
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(2))
        .with_max_pending_incoming(Some(64));
    let mdns = if config.mdns {
        match mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id) {
            Ok(b) => Some(b),
            Err(err) => {
                tracing::warn!(error = %err, "mDNS unavailable; continuing without it");
                None
            }
        }
    } else {
        None
    };
    let behaviour = NodeBehaviour {
        denied: allow_block_list::Behaviour::default(),
        limits: connection_limits::Behaviour::new(limits),
        kademlia: kademlia(peer_id, &config.mesh, kad_bootstrap_interval(&config)),
        identify: identify::Behaviour::new(identify_config(
            keypair.public(),
            &config.mesh,
            config.agent_version.clone(),
        )),
        ping: ping::Behaviour::default(),
        gossipsub: gossipsub_behaviour(keypair, &config)?,
        blobs,
        relay_client: relay_client.into(),
        dcutr: config.dcutr.then(|| dcutr::Behaviour::new(peer_id)).into(),
        autonat: config
            .autonat
            .then(|| autonat::Behaviour::new(peer_id, autonat::Config::default()))
            .into(),
        mdns: mdns.into(),
    };
    let metrics = libp2p::metrics::Metrics::new(registry);
    let net_metrics = NetMetrics::register(registry);
    let mut swarm = meshtune_bootstrap::transport::build_swarm(
        keypair,
        transport,
        behaviour,
        config.idle_connection_timeout,
    );
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|err| NetworkError::Listen {
                addr: addr.clone(),
                reason: err.to_string(),
            })?;
    }
    for addr in &config.external {
        swarm.add_external_address(addr.clone());
    }
    if let Some(path) = &config.peer_table {
        let known = load_peer_table(path);
        if !known.is_empty() {
            tracing::info!(peers = known.len(), file = %path.display(), "known peers from the last run");
        }
        for peer in known.iter().filter(|p| p.peer_id != peer_id) {
            swarm
                .behaviour_mut()
                .kademlia
                .add_address(&peer.peer_id, peer.addr.clone());
        }
        for peer in known.iter().filter(|p| p.peer_id != peer_id).take(4) {
            let _ = swarm.dial(peer.to_multiaddr());
        }
    }
    if config.relay_client {
        for relay in &config.relays {
            // Listening on a circuit address makes the relay client dial the relay and ask for
            // a reservation; once accepted the circuit address is reported as a listen address.
            let circuit = relay
                .to_multiaddr()
                .with(libp2p::multiaddr::Protocol::P2pCircuit);
            swarm
                .listen_on(circuit.clone())
                .map_err(|err| NetworkError::Listen {
                    addr: circuit,
                    reason: err.to_string(),
                })?;
        }
    }
    for peer in &config.bootstrap {
        if peer.peer_id == peer_id {
            continue;
        }
        swarm
            .behaviour_mut()
            .kademlia
            .add_address(&peer.peer_id, peer.addr.clone());
        if let Err(err) = swarm.dial(peer.to_multiaddr()) {
            tracing::warn!(peer = %peer, error = %err, "cannot dial bootstrap peer");
        }
    }
    let (command_sender, command_receiver) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
    let (event_sender, event_receiver) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
    let request_deadline = config.request_timeout + Duration::from_secs(5);
    let event_loop = EventLoop {
        topic: config.delta_topic().hash(),
        config,
        swarm,
        layout,
        store,
        metrics,
        net_metrics,
        commands: command_receiver,
        events: event_sender,
        pending: HashMap::new(),
        manifest_requests: HashMap::new(),
        inbound: HashMap::new(),
        strikes: HashMap::new(),
        bootstrap_retry: HashMap::new(),
        saved_peers: Vec::new(),
        last_mesh_lookup: None,
        denied: HashSet::new(),
        mesh_peers: 0,
        links: HashMap::new(),
    };
    let task = tokio::spawn(event_loop.run(shutdown));
    Ok(RunningNetwork {
        client: Client {
            commands: command_sender,
            request_deadline,
        },
        events: event_receiver,
        peer_id,
        task,
    })
}

/// The event loop's own counters (served at `/metrics` next to the node's and libp2p's).
#[derive(Debug, Clone, Default)]
struct NetMetrics {
    /// Misbehaviours counted against peers, by reason.
    strikes: Family<Vec<(String, String)>, Counter>,
    /// Manifests refused at gossip validation, by reason.
    rejected_manifests: Family<Vec<(String, String)>, Counter>,
    /// Blob bytes this node served to peers, by kind (chunk, chunk_list, state_manifest).
    served_bytes: Family<Vec<(String, String)>, Counter>,
    /// Peers blacklisted so far (strikes or deny list).
    blacklisted: Gauge,
}

impl NetMetrics {
    fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self::default();
        let sub = registry.sub_registry_with_prefix("meshtune");
        sub.register(
            "peer_strikes",
            "Misbehaviours counted against peers, by reason",
            metrics.strikes.clone(),
        );
        sub.register(
            "gossip_rejected",
            "Manifests refused at gossip validation, by reason",
            metrics.rejected_manifests.clone(),
        );
        sub.register(
            "served_bytes",
            "Blob bytes served to peers, by kind",
            metrics.served_bytes.clone(),
        );
        sub.register(
            "blacklisted_peers",
            "Peers blacklisted after repeated misbehaviour",
            metrics.blacklisted.clone(),
        );
        metrics
    }

    fn count(family: &Family<Vec<(String, String)>, Counter>, key: &str, value: &str, by: u64) {
        family
            .get_or_create(&vec![(key.to_owned(), value.to_owned())])
            .inc_by(by);
    }
}

/// Wait before the `attempt`-th redial of an unreachable bootstrap node: 5 s doubling to 5 min.
pub fn bootstrap_backoff(attempt: u32) -> Duration {
    Duration::from_secs(
        5u64.saturating_mul(1 << attempt.saturating_sub(1).min(6))
            .min(300),
    )
}

/// The peers saved by a previous run; a missing or unreadable file is an empty table (with a
/// warning for a corrupt one: the node still starts from its bootstrap addresses).
pub fn load_peer_table(path: &std::path::Path) -> Vec<PeerAddr> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    match serde_json::from_slice::<Vec<String>>(&bytes) {
        Ok(entries) => entries
            .iter()
            .filter_map(|e| match e.parse::<PeerAddr>() {
                Ok(peer) => Some(peer),
                Err(err) => {
                    tracing::warn!(file = %path.display(), entry = e, error = %err, "skipping a bad peer table entry");
                    None
                }
            })
            .collect(),
        Err(err) => {
            tracing::warn!(file = %path.display(), error = %err, "ignoring a corrupt peer table");
            Vec::new()
        }
    }
}

struct InboundWindow {
    started: Instant,
    count: u32,
}

/// Owns the swarm.
struct EventLoop {
    config: NetworkConfig,
    topic: TopicHash,
    swarm: Swarm<NodeBehaviour>,
    layout: Arc<ModelLayout>,
    store: Arc<Mutex<BlobStore>>,
    metrics: libp2p::metrics::Metrics,
    net_metrics: NetMetrics,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetworkEvent>,
    pending: HashMap<OutboundRequestId, oneshot::Sender<Result<ChunkResponse, RequestError>>>,
    /// Requests for a new neighbour's current delta manifest, by id.
    manifest_requests: HashMap<OutboundRequestId, PeerId>,
    inbound: HashMap<PeerId, InboundWindow>,
    strikes: HashMap<PeerId, u32>,
    /// Failed bootstrap dials so far and when to try again, while the node has no peer.
    bootstrap_retry: HashMap<PeerId, (u32, Instant)>,
    /// The peer table as last written to `config.peer_table`.
    saved_peers: Vec<String>,
    denied: HashSet<PeerId>,
    mesh_peers: usize,
    /// Open connections per peer, direct and through a relay circuit.
    links: HashMap<PeerId, Links>,
    /// When [`EventLoop::look_up_mesh`] last started a lookup (sparse nodes).
    last_mesh_lookup: Option<Instant>,
}

#[derive(Debug, Default)]
struct Links {
    direct: usize,
    relayed: usize,
}

impl Links {
    fn count(&mut self, endpoint: &libp2p::core::ConnectedPoint, delta: isize) {
        let relayed = endpoint
            .get_remote_address()
            .iter()
            .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit));
        let slot = if relayed {
            &mut self.relayed
        } else {
            &mut self.direct
        };
        *slot = slot.saturating_add_signed(delta);
    }
}

/// A node with all the links it wants (see `dial_discovered_below`) makes one random walk in
/// this many walk intervals.
const WELL_CONNECTED_WALK_EVERY: u64 = 4;

/// Shortest time between two lookups of the mesh ([`EventLoop::look_up_mesh`]).
const MESH_LOOKUP_EVERY: Duration = Duration::from_secs(10);

impl EventLoop {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut walk = tokio::time::interval(self.config.random_walk_interval);
        walk.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reconnect = tokio::time::interval(self.config.reconnect_interval);
        reconnect.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut walks = 0u64;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                _ = walk.tick() => {
                    // A lookup of a random key finds peers across the keyspace. Each one
                    // contacts ~20 peers (new connections, for a node with few links): a node
                    // that has all the links it wants walks at a quarter of the rate.
                    walks += 1;
                    if self.wants_more_links() || walks % WELL_CONNECTED_WALK_EVERY == 1 {
                        self.look_up(PeerId::random());
                    }
                }
                _ = reconnect.tick() => self.reconnect(),
            }
        }
        tracing::debug!("network task stopped");
    }

    fn emit(&mut self, event: NetworkEvent) {
        match self.events.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("node is not keeping up with network events; dropping one");
            }
            // The node is shutting down: nobody listens any more.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn update_mesh_peers(&mut self) {
        let topic = &self.topic;
        let count = self
            .swarm
            .behaviour()
            .gossipsub
            .all_peers()
            .filter(|(_, topics)| topics.contains(&topic))
            .count();
        if count != self.mesh_peers {
            self.mesh_peers = count;
            self.emit(NetworkEvent::MeshPeers(count));
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Publish { data, reply } => {
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.topic.clone(), data)
                    .map(|_| ())
                    .map_err(|err| err.to_string());
                let _ = reply.send(result);
            }
            Command::Request {
                peer,
                request,
                reply,
            } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .blobs
                    .send_request(&peer, request);
                self.pending.insert(id, reply);
            }
            Command::Report {
                message_id,
                source,
                acceptance,
            } => {
                // Manifests a neighbour handed over directly were never in gossip's cache.
                if !message_id.0.starts_with(DIRECT_MANIFEST_PREFIX) {
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(&message_id, &source, acceptance);
                }
            }
            Command::Strike { peer, reason } => self.strike(peer, reason),
            Command::MeshPeers { reply } => {
                let topic = &self.topic;
                let peers = self
                    .swarm
                    .behaviour()
                    .gossipsub
                    .all_peers()
                    .filter(|(_, topics)| topics.contains(&topic))
                    .map(|(p, _)| *p)
                    .collect();
                let _ = reply.send(peers);
            }
            Command::RelayedOnly { reply } => {
                let relayed = self
                    .links
                    .iter()
                    .filter(|(_, l)| l.relayed > 0 && l.direct == 0)
                    .map(|(p, _)| *p)
                    .collect();
                let _ = reply.send(relayed);
            }
            Command::ListenAddrs { reply } => {
                let me = *self.swarm.local_peer_id();
                let addrs = self
                    .swarm
                    .listeners()
                    .map(|a| meshtune_bootstrap::peer_addr::with_peer_id(a.clone(), me))
                    .collect();
                let _ = reply.send(addrs);
            }
            Command::Dial { addr } => {
                if let Err(err) = self.swarm.dial(addr.clone()) {
                    tracing::warn!(addr = %addr, error = %err, "dial failed");
                }
            }
            Command::SetDenied { peers } => self.set_denied(peers),
        }
    }

    fn strike(&mut self, peer: PeerId, reason: &'static str) {
        let strikes = self.strikes.entry(peer).or_insert(0);
        *strikes += 1;
        let strikes = *strikes;
        tracing::warn!(peer = %peer, reason, strikes, "peer misbehaved");
        NetMetrics::count(&self.net_metrics.strikes, "reason", reason, 1);
        let gossipsub = &mut self.swarm.behaviour_mut().gossipsub;
        gossipsub.set_application_score(&peer, -100.0 * f64::from(strikes));
        if strikes == MAX_STRIKES {
            self.net_metrics.blacklisted.inc();
        }
        if strikes >= MAX_STRIKES {
            tracing::warn!(peer = %peer, strikes, "blacklisting and disconnecting peer");
            gossipsub.blacklist_peer(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Whether a discovered peer is worth a new connection (see `dial_discovered_below`).
    fn wants_more_links(&self) -> bool {
        self.config
            .dial_discovered_below
            .is_none_or(|max| self.swarm.connected_peers().count() < max)
    }

    /// Looks the mesh up through the routing table (on joining, and while no mesh peer is
    /// connected). A node that dials every member runs Kademlia's bootstrap, which refreshes
    /// the whole table, each time it is asked. A sparse one wants a few links, which one
    /// lookup of its own id finds for a fraction of the bytes, at most one per
    /// [`MESH_LOOKUP_EVERY`]: a joiner's connection to the bootstrap node and the identify
    /// that follows both ask for one.
    fn look_up_mesh(&mut self) {
        if self.config.dial_discovered_below.is_none() {
            let _ = self.swarm.behaviour_mut().kademlia.bootstrap();
            return;
        }
        let now = Instant::now();
        if self
            .last_mesh_lookup
            .is_some_and(|at| now.duration_since(at) < MESH_LOOKUP_EVERY)
        {
            return;
        }
        let me = *self.swarm.local_peer_id();
        let known: usize = self
            .swarm
            .behaviour_mut()
            .kademlia
            .kbuckets()
            .map(|b| b.num_entries())
            .sum();
        // With an empty table a lookup would end at once, finding nothing.
        if known > 0 {
            self.look_up(me);
            self.last_mesh_lookup = Some(now);
        }
    }

    /// A lookup of `key`'s closest peers (fewer of them on a sparse node).
    fn look_up(&mut self, key: PeerId) {
        let kademlia = &mut self.swarm.behaviour_mut().kademlia;
        if self.config.dial_discovered_below.is_some() {
            kademlia.get_n_closest_peers(key, SPARSE_LOOKUP_RESULTS);
        } else {
            kademlia.get_closest_peers(key);
        }
    }

    fn is_blacklisted(&self, peer: &PeerId) -> bool {
        self.strikes.get(peer).is_some_and(|s| *s >= MAX_STRIKES) || self.denied.contains(peer)
    }

    /// Below `target_peers` connections, dials up to 4 peers from the routing table that are
    /// neither connected, blacklisted nor denied.
    fn reconnect(&mut self) {
        let me = *self.swarm.local_peer_id();
        let connected = self.swarm.connected_peers().count();
        self.save_peer_table();
        if connected == 0 {
            // Alone: dial the bootstrap peers again, backing off per peer.
            let now = Instant::now();
            for peer in self.config.bootstrap.clone() {
                let (attempts, next) = self.bootstrap_retry.entry(peer.peer_id).or_insert((0, now));
                if now < *next {
                    continue;
                }
                *attempts += 1;
                let wait = bootstrap_backoff(*attempts);
                *next = now + wait;
                tracing::warn!(bootstrap = %peer, attempt = *attempts, retry_in_s = wait.as_secs(), "no peers: dialing the bootstrap node again (training and checkpoints go on)");
                let _ = self.swarm.dial(peer.to_multiaddr());
            }
        } else {
            self.bootstrap_retry.clear();
            if self.mesh_peers == 0 {
                // Connected (to a bootstrap or relay node), yet nobody on the mesh's topic:
                // look the mesh up again instead of waiting for the next random walk.
                self.look_up_mesh();
            }
        }
        if connected >= self.config.target_peers {
            return;
        }
        let mut known = Vec::new();
        for bucket in self.swarm.behaviour_mut().kademlia.kbuckets() {
            for entry in bucket.iter() {
                known.push(*entry.node.key.preimage());
            }
        }
        let candidates: Vec<PeerId> = known
            .into_iter()
            .filter(|p| *p != me && !self.swarm.is_connected(p) && !self.is_blacklisted(p))
            .take(4)
            .collect();
        for peer in candidates {
            tracing::debug!(peer = %peer, connected, "dialing a known peer to stay connected");
            let _ = self.swarm.dial(peer);
        }
    }

    /// Writes Kademlia's known peers to `config.peer_table` when they changed (atomically:
    /// temporary file, then rename).
    fn save_peer_table(&mut self) {
        let Some(path) = self.config.peer_table.clone() else {
            return;
        };
        let me = *self.swarm.local_peer_id();
        let mut peers = Vec::new();
        for bucket in self.swarm.behaviour_mut().kademlia.kbuckets() {
            for entry in bucket.iter() {
                let peer = *entry.node.key.preimage();
                if peer == me {
                    continue;
                }
                for addr in entry.node.value.iter() {
                    peers.push(PeerAddr::new(peer, addr.clone()).to_string());
                }
            }
        }
        for bootstrap in &self.config.bootstrap {
            peers.push(bootstrap.to_string());
        }
        peers.sort();
        peers.dedup();
        if peers == self.saved_peers {
            return;
        }
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec_pretty(&peers)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        match written {
            Ok(()) => self.saved_peers = peers,
            Err(err) => {
                tracing::warn!(file = %path.display(), error = %err, "cannot save the peer table");
            }
        }
    }

    fn set_denied(&mut self, peers: HashSet<PeerId>) {
        let added: Vec<PeerId> = peers.difference(&self.denied).copied().collect();
        let removed: Vec<PeerId> = self.denied.difference(&peers).copied().collect();
        for peer in &added {
            self.swarm.behaviour_mut().denied.block_peer(*peer);
            self.swarm.behaviour_mut().gossipsub.blacklist_peer(peer);
        }
        for peer in &removed {
            self.swarm.behaviour_mut().denied.unblock_peer(*peer);
            if self.strikes.get(peer).is_none_or(|s| *s < MAX_STRIKES) {
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .remove_blacklisted_peer(peer);
            }
        }
        if !added.is_empty() || !removed.is_empty() {
            tracing::info!(
                denied = peers.len(),
                added = added.len(),
                removed = removed.len(),
                "deny list updated"
            );
        }
        self.denied = peers;
        // Peers that left the list are dialed again at once.
        for peer in removed {
            if !self.swarm.is_connected(&peer) {
                let _ = self.swarm.dial(peer);
            }
        }
        self.update_mesh_peers();
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<NodeBehaviourEvent>) {
        self.metrics.record(&event);
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let me = *self.swarm.local_peer_id();
                let full = meshtune_bootstrap::peer_addr::with_peer_id(address, me);
                tracing::info!(address = %full, "listening");
                self.emit(NetworkEvent::Listening(full));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                let links = self.links.entry(peer_id).or_default();
                links.count(&endpoint, 1);
                if links.relayed > 0 && links.direct == 0 {
                    tracing::info!(peer = %peer_id, "connected through a relay only: bulk transfers prefer direct peers");
                }
                if self.is_blacklisted(&peer_id) {
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                if self.config.bootstrap.iter().any(|b| b.peer_id == peer_id) {
                    // Fill the routing table from the bootstrap node.
                    self.look_up_mesh();
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id, endpoint, ..
            } => {
                if let Some(links) = self.links.get_mut(&peer_id) {
                    links.count(&endpoint, -1);
                    if links.direct == 0 && links.relayed == 0 {
                        self.links.remove(&peer_id);
                    }
                }
                self.update_mesh_peers();
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                if let Some(bootstrap) = self.config.bootstrap.iter().find(|b| b.peer_id == peer) {
                    tracing::warn!(bootstrap = %bootstrap, error = %error, "cannot reach the bootstrap node");
                }
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: NodeBehaviourEvent) {
        match event {
            NodeBehaviourEvent::Identify(event) => {
                self.metrics.record(&event);
                if let identify::Event::Received { peer_id, info, .. } = event {
                    let protocol = self.config.mesh.kad_protocol();
                    add_identified_addresses(
                        &mut self.swarm.behaviour_mut().kademlia,
                        &peer_id,
                        &info,
                        &protocol,
                    );
                    if self.config.bootstrap.iter().any(|b| b.peer_id == peer_id) {
                        // Now the bootstrap node is surely in the routing table (on a fresh
                        // start it may not be yet when the connection opens, and a
                        // bootstrap query with an empty table does nothing): look up the mesh
                        // through it.
                        self.look_up_mesh();
                    }
                }
            }
            NodeBehaviourEvent::Kademlia(event) => {
                self.metrics.record(&event);
                if let kad::Event::OutboundQueryProgressed {
                    id,
                    result: kad::QueryResult::Bootstrap(_),
                    step,
                    ..
                } = &event
                    && !step.last
                    && self.config.dial_discovered_below.is_some()
                {
                    // libp2p-kad bootstraps a new node by itself (a lookup per bucket; the
                    // switch is test-only in 0.49). A sparse node keeps the first step, the
                    // lookup of its own id, and ends the rest before they send a request.
                    if let Some(mut query) = self.swarm.behaviour_mut().kademlia.query_mut(id) {
                        query.finish();
                    }
                }
                if let kad::Event::RoutingUpdated { peer, .. } = event
                    && !self.swarm.is_connected(&peer)
                    && !self.is_blacklisted(&peer)
                    && peer != *self.swarm.local_peer_id()
                    && self.wants_more_links()
                {
                    // Gossip needs connections: dial the mesh members discovered (all of them,
                    // or up to `dial_discovered_below` links).
                    let _ = self.swarm.dial(peer);
                }
            }
            NodeBehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    self.swarm
                        .behaviour_mut()
                        .kademlia
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) && self.wants_more_links() {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            NodeBehaviourEvent::Gossipsub(event) => {
                self.metrics.record(&event);
                match event {
                    gossipsub::Event::Message {
                        propagation_source,
                        message_id,
                        message,
                    } => self.on_manifest(propagation_source, message_id, message),
                    gossipsub::Event::Subscribed { peer_id, topic } => {
                        self.update_mesh_peers();
                        if topic == self.topic && !self.is_blacklisted(&peer_id) {
                            // Gossip does not replay: ask the new neighbour for the manifest it
                            // announced before this node was there to hear it.
                            let request = ChunkRequest::CurrentManifest {
                                mesh_id: self.config.mesh.as_str().to_owned(),
                                round: None,
                            };
                            let id = self
                                .swarm
                                .behaviour_mut()
                                .blobs
                                .send_request(&peer_id, request);
                            self.manifest_requests.insert(id, peer_id);
                        }
                    }
                    gossipsub::Event::Unsubscribed { .. } => self.update_mesh_peers(),
                    _ => {}
                }
            }
            NodeBehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. }) => {
                // Kademlia starts in server mode (most nodes of a mesh are reachable, and the
                // bootstrap needs servers to answer lookups). Once AutoNAT finds this node
                // behind NAT, it stops advertising itself as a server peers cannot dial.
                let mode = match new {
                    autonat::NatStatus::Private => Some(kad::Mode::Client),
                    autonat::NatStatus::Public(_) => Some(kad::Mode::Server),
                    autonat::NatStatus::Unknown => None,
                };
                if let Some(mode) = mode {
                    tracing::info!(?mode, "reachability changed: Kademlia mode set");
                    self.swarm.behaviour_mut().kademlia.set_mode(Some(mode));
                }
            }
            NodeBehaviourEvent::Blobs(event) => self.on_blob_event(event),
            NodeBehaviourEvent::Ping(event) => self.metrics.record(&event),
            _ => {}
        }
    }

    /// Structural validation; timeliness is left to the node.
    fn on_manifest(&mut self, source: PeerId, message_id: MessageId, message: gossipsub::Message) {
        let verdict = (|| {
            let author = message.source.ok_or("unsigned message")?;
            let manifest = DeltaManifest::decode(&message.data, &self.config.limits)
                .map_err(|_| "undecodable manifest")?;
            check_manifest(&manifest, self.config.mesh.as_str(), author, &self.layout).map_err(
                |reason| match reason {
                    ManifestFault::Sender => "manifest sender is not its signer",
                    other => other.reason(),
                },
            )?;
            Ok(manifest)
        })();
        match verdict {
            Ok(manifest) => self.emit(NetworkEvent::Manifest {
                message_id,
                source,
                manifest: Arc::new(manifest),
            }),
            Err(reason) => {
                tracing::warn!(peer = %source, reason, "rejecting manifest");
                NetMetrics::count(&self.net_metrics.rejected_manifests, "reason", reason, 1);
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(
                        &message_id,
                        &source,
                        MessageAcceptance::Reject,
                    );
            }
        }
    }

    /// A new neighbour's answer to [`ChunkRequest::CurrentManifest`]: the same checks as a
    /// gossiped manifest, with the connection (not a signature) vouching for the sender.
    fn on_direct_manifest(&mut self, peer: PeerId, response: ChunkResponse) {
        let manifest = match response {
            ChunkResponse::Manifest(manifest) => manifest,
            ChunkResponse::NotFound => return,
            _ => {
                tracing::warn!(peer = %peer, "answered a manifest request with something else");
                return;
            }
        };
        let verdict = check_manifest(&manifest, self.config.mesh.as_str(), peer, &self.layout)
            .map_err(ManifestFault::reason);
        match verdict {
            Ok(()) => {
                let id = format!(
                    "{}{peer}/{}",
                    String::from_utf8_lossy(DIRECT_MANIFEST_PREFIX),
                    manifest.round
                );
                self.emit(NetworkEvent::Manifest {
                    message_id: MessageId::new(id.as_bytes()),
                    source: peer,
                    manifest: Arc::new(manifest),
                });
            }
            Err(reason) => {
                tracing::warn!(peer = %peer, reason, "rejecting manifest");
                NetMetrics::count(&self.net_metrics.rejected_manifests, "reason", reason, 1);
                self.strike(peer, reason);
            }
        }
    }

    fn allow_inbound(&mut self, peer: PeerId) -> bool {
        let now = Instant::now();
        let window = self.inbound.entry(peer).or_insert(InboundWindow {
            started: now,
            count: 0,
        });
        if now.duration_since(window.started) >= Duration::from_secs(10) {
            window.started = now;
            window.count = 0;
        }
        window.count += 1;
        window.count <= self.config.max_requests_per_peer_per_s.saturating_mul(10)
    }

    fn on_blob_event(&mut self, event: request_response::Event<ChunkRequest, ChunkResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.on_request(peer, request, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(peer) = self.manifest_requests.remove(&request_id) {
                        self.on_direct_manifest(peer, response);
                    } else if let Some(reply) = self.pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if self.manifest_requests.remove(&request_id).is_some() {
                    tracing::debug!(peer = %peer, error = %error, "no current manifest from a new neighbour");
                } else if let Some(reply) = self.pending.remove(&request_id) {
                    let error = match error {
                        request_response::OutboundFailure::Timeout => {
                            RequestError::Timeout { peer }
                        }
                        other => RequestError::Failed {
                            peer,
                            reason: other.to_string(),
                        },
                    };
                    let _ = reply.send(Err(error));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(peer = %peer, error = %error, "inbound blob request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_request(
        &mut self,
        peer: PeerId,
        request: ChunkRequest,
        channel: ResponseChannel<ChunkResponse>,
    ) {
        if self.is_blacklisted(&peer) {
            return;
        }
        if !self.allow_inbound(peer) {
            // Dropping the channel fails the peer's request; a flood earns strikes.
            let over = self
                .inbound
                .get(&peer)
                .map_or(0, |w| w.count)
                .saturating_sub(self.config.max_requests_per_peer_per_s.saturating_mul(10));
            if over % 100 == 1 {
                self.strike(peer, "request flood");
            }
            return;
        }
        let response = match self.store.lock() {
            Ok(mut store) => store.answer(peer, &request, self.config.mesh.as_str()),
            Err(_) => ChunkResponse::NotFound,
        };
        let served = match &response {
            ChunkResponse::Chunk(bytes) => Some(("chunk", bytes.len())),
            ChunkResponse::ChunkList(list) => Some(("chunk_list", 32 * list.chunk_hashes().len())),
            ChunkResponse::State(_) => Some(("state_manifest", 0)),
            ChunkResponse::Manifest(_) => Some(("delta_manifest", 0)),
            ChunkResponse::NotFound | ChunkResponse::Busy => None,
        };
        if let Some((kind, bytes)) = served {
            NetMetrics::count(&self.net_metrics.served_bytes, "kind", kind, bytes as u64);
        }
        if self
            .swarm
            .behaviour_mut()
            .blobs
            .send_response(channel, response)
            .is_err()
        {
            tracing::debug!(peer = %peer, "peer went away before its response");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_redials_back_off_to_five_minutes() {
        let waits: Vec<u64> = (1..=9).map(|a| bootstrap_backoff(a).as_secs()).collect();
        assert_eq!(waits, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn a_missing_or_corrupt_peer_table_is_empty_and_bad_entries_are_skipped() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("peers.json");
        assert!(load_peer_table(&path).is_empty());
        std::fs::write(&path, b"{not json").expect("write");
        assert!(load_peer_table(&path).is_empty());
        let good = PeerAddr::new(
            PeerId::random(),
            "/ip4/10.0.0.7/tcp/4001".parse().expect("addr"),
        );
        std::fs::write(
            &path,
            serde_json::to_vec(&vec![good.to_string(), "/ip4/1.2.3.4/tcp/1".to_owned()])
                .expect("json"),
        )
        .expect("write");
        assert_eq!(load_peer_table(&path), vec![good]);
    }
}
