//! The task that owns the swarm ([`EventLoop`]): it runs the commands the [`Client`]s send,
//! turns swarm events into [`NetworkEvent`]s, serves blob requests, and keeps the node
//! connected (lookups, redials, strikes, the deny list, the peer table).
//!
//! Owns: the swarm and everything keyed by peer. Must not touch: rounds, models or files
//! other than `peers.json` (state chunks are read by the store's [`FileChunk`] on a
//! blocking thread, never on this task).
//!
//! [`Client`]: super::Client
//! [`FileChunk`]: super::store::FileChunk

mod blobs;
mod gossip;
mod peers;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::gossipsub::TopicHash;
use libp2p::metrics::Recorder;
use libp2p::request_response::OutboundRequestId;
use libp2p::swarm::SwarmEvent;
use libp2p::{PeerId, Swarm, autonat, identify, kad, mdns};
use meshtune_net::discovery::add_identified_addresses;
use meshtune_net::peer_addr::with_peer_id;
use meshtune_protocol::{ChunkResponse, ModelLayout};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use self::blobs::{FileRead, Upload};
use super::behaviour::{NodeBehaviour, NodeBehaviourEvent};
use super::client::{Command, RequestError};
use super::config::NetworkConfig;
use super::event::NetworkEvent;
use super::manifest::{DIRECT_MANIFEST_PREFIX, ToldOnce};
use super::metrics::NetMetrics;
use super::peer_table::BootstrapRedial;
use super::store::BlobStore;
use super::uploads::UploadQueue;

/// A node with all the links it wants (see `dial_discovered_below`) makes one random walk in
/// this many walk intervals.
const WELL_CONNECTED_WALK_EVERY: u64 = 4;

/// Inbound requests one peer made in the current 10-second window.
struct InboundWindow {
    started: Instant,
    count: u32,
}

/// Open connections to one peer, direct and through a relay circuit.
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

/// What [`EventLoop::new`] is given besides the swarm.
pub(crate) struct EventLoopParts {
    pub(crate) config: NetworkConfig,
    pub(crate) swarm: Swarm<NodeBehaviour>,
    pub(crate) layout: Arc<ModelLayout>,
    pub(crate) store: Arc<Mutex<BlobStore>>,
    pub(crate) metrics: libp2p::metrics::Metrics,
    pub(crate) net_metrics: NetMetrics,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) events: mpsc::Sender<NetworkEvent>,
}

/// Owns the swarm.
pub(crate) struct EventLoop {
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
    /// State chunks being read from their files on blocking threads.
    file_reads: FuturesUnordered<tokio::task::JoinHandle<FileRead>>,
    /// Chunk responses in the order they leave (see [`crate::network::uploads`]).
    uploads: UploadQueue<libp2p::request_response::InboundRequestId, Upload>,
    inbound: HashMap<PeerId, InboundWindow>,
    strikes: HashMap<PeerId, u32>,
    /// Bootstrap redials while the node has no peer.
    bootstrap_redial: BootstrapRedial,
    /// The peer table as last written to `config.peer_table`.
    saved_peers: Vec<String>,
    denied: HashSet<PeerId>,
    mesh_peers: usize,
    /// Open connections per peer, direct and through a relay circuit.
    links: HashMap<PeerId, Links>,
    /// When [`EventLoop::look_up_mesh`] last started a lookup (sparse nodes).
    last_mesh_lookup: Option<Instant>,
    /// Peers already told about as sending a codec this build cannot decode.
    unknown_codec_peers: ToldOnce,
}

impl EventLoop {
    pub(crate) fn new(parts: EventLoopParts) -> Self {
        // 70% of the requesters' timeout (the same setting on every node): a queued chunk
        // arrives in time with room for the delay and the request's own trip, and on a slow
        // uplink one 1 MiB chunk can wait behind the one being sent, so the link never idles
        // between them.
        let upload_budget = parts.config.request_timeout.mul_f64(0.7);
        Self {
            topic: parts.config.delta_topic().hash(),
            config: parts.config,
            swarm: parts.swarm,
            layout: parts.layout,
            store: parts.store,
            metrics: parts.metrics,
            net_metrics: parts.net_metrics,
            commands: parts.commands,
            events: parts.events,
            pending: HashMap::new(),
            manifest_requests: HashMap::new(),
            file_reads: FuturesUnordered::new(),
            uploads: UploadQueue::new(upload_budget),
            inbound: HashMap::new(),
            strikes: HashMap::new(),
            bootstrap_redial: BootstrapRedial::default(),
            saved_peers: Vec::new(),
            denied: HashSet::new(),
            mesh_peers: 0,
            links: HashMap::new(),
            last_mesh_lookup: None,
            unknown_codec_peers: ToldOnce::default(),
        }
    }

    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
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
                Some(read) = self.file_reads.next(), if !self.file_reads.is_empty() => {
                    self.on_file_read(read);
                }
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

    /// Connected peers subscribed to this mesh's delta topic.
    fn topic_peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        let topic = &self.topic;
        self.swarm
            .behaviour()
            .gossipsub
            .all_peers()
            .filter(move |(_, topics)| topics.contains(&topic))
            .map(|(p, _)| *p)
    }

    fn update_mesh_peers(&mut self) {
        let count = self.topic_peers().count();
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
                let _ = reply.send(self.topic_peers().collect());
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
                    .map(|a| with_peer_id(a.clone(), me))
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

    fn is_bootstrap(&self, peer: &PeerId) -> bool {
        self.config.bootstrap.iter().any(|b| b.peer_id == *peer)
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<NodeBehaviourEvent>) {
        self.metrics.record(&event);
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let me = *self.swarm.local_peer_id();
                let full = with_peer_id(address, me);
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
                if self.is_bootstrap(&peer_id) {
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
                    self.bootstrap_redial.failed(peer);
                }
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: NodeBehaviourEvent) {
        match event {
            NodeBehaviourEvent::Identify(event) => self.on_identify(event),
            NodeBehaviourEvent::Kademlia(event) => self.on_kademlia(event),
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
            NodeBehaviourEvent::Gossipsub(event) => self.on_gossipsub(event),
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

    fn on_identify(&mut self, event: identify::Event) {
        self.metrics.record(&event);
        if let identify::Event::Received { peer_id, info, .. } = event {
            let protocol = self.config.mesh.kad_protocol();
            add_identified_addresses(
                &mut self.swarm.behaviour_mut().kademlia,
                &peer_id,
                &info,
                &protocol,
            );
            if self.is_bootstrap(&peer_id) {
                // Now the bootstrap node is surely in the routing table (on a fresh start it
                // may not be yet when the connection opens, and a bootstrap query with an
                // empty table does nothing): look up the mesh through it.
                self.look_up_mesh();
            }
        }
    }

    fn on_kademlia(&mut self, event: kad::Event) {
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
            // libp2p-kad bootstraps a new node by itself (a lookup per bucket; the switch is
            // test-only in 0.49). A sparse node keeps the first step, the lookup of its own
            // id, and ends the rest before they send a request.
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
            // Gossip needs connections: dial the mesh members discovered (all of them, or up
            // to `dial_discovered_below` links).
            let _ = self.swarm.dial(peer);
        }
    }
}
