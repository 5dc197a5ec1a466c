//! The running bootstrap node: one task ([`EventLoop`]) owns the swarm; the rest of the
//! program talks to it through a cloneable [`Client`] (bounded command channel, oneshot
//! replies with a deadline) and receives [`Event`]s on a bounded channel, as in
//! rust-libp2p's file-sharing example. A second task serves metrics. Both stop when the
//! shutdown token is cancelled ([`RunningBootstrap::shutdown`]).

use std::{net::SocketAddr, time::Duration};

use futures::StreamExt;
use libp2p::metrics::Recorder;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, identify,
    identity::Keypair,
    kad,
    swarm::{
        SwarmEvent,
        dial_opts::{DialOpts, PeerCondition},
    },
};
use prometheus_client::registry::Registry;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use meshtune_net::{
    discovery::add_identified_addresses,
    identity::{self, IdentityError, KeyOrigin},
    metrics::{MetricsError, MetricsServer},
    peer_addr::{PeerAddr, with_peer_id},
    transport::{self, BoxedTransport, PskError, TransportBuildError, TransportConfig, is_quic},
};

use crate::{
    behaviour::{BootstrapBehaviour, BootstrapBehaviourEvent},
    config::BootstrapConfig,
    metrics::BootstrapMetrics,
};

const COMMAND_CHANNEL_CAPACITY: usize = 32;
const EVENT_CHANNEL_CAPACITY: usize = 64;
/// How long a [`Client`] call waits for the event loop before giving up.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(10);

/// What the node tells its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Listening on `address`, which ends in `/p2p/<local peer id>`: ready to paste.
    Listening { address: Multiaddr },
    /// `address` (with `/p2p/<local peer id>`) is no longer served.
    ListenAddrExpired { address: Multiaddr },
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Psk(#[from] PskError),
    #[error(transparent)]
    Transport(#[from] TransportBuildError),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("no address to listen on{hint}")]
    NoListenAddrs { hint: &'static str },
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("the bootstrap node has stopped")]
    Stopped,
    #[error("the bootstrap node did not answer within {CLIENT_DEADLINE:?}")]
    Timeout,
}

#[derive(Debug, thiserror::Error)]
#[error("the bootstrap node did not stop within {0:?}")]
pub struct ShutdownTimeout(pub Duration);

/// Loads the key (and PSK), builds the TCP/QUIC/DNS transport and starts the node.
/// With a PSK, QUIC listen addresses are skipped with a warning.
pub async fn start(config: &BootstrapConfig) -> Result<RunningBootstrap, StartError> {
    let (keypair, origin) = identity::load_or_create(&config.key_file)?;
    let peer_id = keypair.public().to_peer_id();
    match origin {
        KeyOrigin::Created => {
            tracing::info!(peer = %peer_id, path = %config.key_file.display(), "created identity")
        }
        KeyOrigin::Loaded => {
            tracing::info!(peer = %peer_id, path = %config.key_file.display(), "loaded identity")
        }
    }
    let psk = config
        .psk_file
        .as_deref()
        .map(transport::load_psk)
        .transpose()?;
    let transport_config = TransportConfig {
        psk,
        ..TransportConfig::default()
    };
    let mut config = config.clone();
    if let Some(psk) = &psk {
        tracing::info!(
            fingerprint = %psk.fingerprint(),
            "private network: pre-shared key set, QUIC disabled (TCP only)"
        );
        config.listen.retain(|addr| {
            let keep = !is_quic(addr);
            if !keep {
                tracing::warn!(addr = %addr, "skipping QUIC listen address: QUIC cannot carry the pre-shared key");
            }
            keep
        });
        if config.listen.is_empty() {
            return Err(StartError::NoListenAddrs {
                hint: " (all were QUIC, which a pre-shared key disables; add a TCP address)",
            });
        }
    }
    let transport = transport::network_transport(&keypair, &transport_config)?;
    start_with_transport(&config, keypair, transport).await
}

/// Starts the node on any transport (for in-process tests: [`transport::memory_transport`]).
/// `config.key_file` and `config.psk_file` are not read.
pub async fn start_with_transport(
    config: &BootstrapConfig,
    keypair: Keypair,
    transport: BoxedTransport,
) -> Result<RunningBootstrap, StartError> {
    if config.listen.is_empty() {
        return Err(StartError::NoListenAddrs { hint: "" });
    }
    let peer_id = keypair.public().to_peer_id();
    let mut registry = Registry::default();
    let transport = transport::with_bandwidth_metrics(transport, &mut registry);
    let metrics = BootstrapMetrics::new(&mut registry);
    let behaviour = BootstrapBehaviour::new(&keypair, &config.behaviour);
    let mut swarm = transport::build_swarm(
        &keypair,
        transport,
        behaviour,
        config.idle_connection_timeout,
    );

    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|error| StartError::Listen {
                addr: addr.clone(),
                reason: error.to_string(),
            })?;
    }
    for addr in &config.external {
        tracing::info!(addr = %addr, "announcing external address");
        swarm.add_external_address(addr.clone());
    }
    if config.behaviour.relay {
        if config.external.is_empty() {
            tracing::warn!(
                "relay enabled without --external: peers behind NAT get no relay address to announce"
            );
        } else {
            tracing::info!("circuit relay server enabled");
        }
    }
    let peers: Vec<PeerAddr> = config
        .peers
        .iter()
        .filter(|peer| {
            let other = peer.peer_id != peer_id;
            if !other {
                tracing::warn!(addr = %peer, "ignoring --peer that is this node itself");
            }
            other
        })
        .cloned()
        .collect();

    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let metrics_addr = match config.metrics {
        Some(addr) => {
            let server = MetricsServer::bind(addr, registry).await?;
            let local = server.local_addr();
            tracing::info!(addr = %format!("http://{local}/metrics"), "serving metrics");
            tasks.spawn(server.serve(shutdown.child_token()));
            Some(local)
        }
        None => None,
    };

    let (command_sender, command_receiver) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
    let (event_sender, event_receiver) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
    let event_loop = EventLoop {
        kad_protocol: config.behaviour.mesh.kad_protocol(),
        swarm,
        commands: Some(command_receiver),
        events: event_sender,
        metrics,
        peers,
        redial_interval: config.redial_interval,
    };
    tasks.spawn(event_loop.run(shutdown.child_token()));

    Ok(RunningBootstrap {
        peer_id,
        client: Client {
            commands: command_sender,
        },
        events: event_receiver,
        metrics_addr,
        shutdown,
        tasks,
    })
}

/// A started bootstrap node. Dropping it stops the node; [`RunningBootstrap::shutdown`]
/// stops it and waits.
pub struct RunningBootstrap {
    peer_id: PeerId,
    client: Client,
    events: mpsc::Receiver<Event>,
    metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl RunningBootstrap {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The bound metrics address (useful with port 0).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The next event; `None` once the node has stopped.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Stops the node: listeners close, connections drop. Waits at most `deadline`.
    pub async fn shutdown(mut self, deadline: Duration) -> Result<(), ShutdownTimeout> {
        self.shutdown.cancel();
        let tasks = &mut self.tasks;
        let joined = tokio::time::timeout(deadline, async move {
            while let Some(result) = tasks.join_next().await {
                if let Err(error) = result {
                    tracing::error!(%error, "bootstrap task failed");
                }
            }
        })
        .await;
        joined.map_err(|_| ShutdownTimeout(deadline))
    }
}

impl Drop for RunningBootstrap {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A handle to the event loop. Every call has a deadline ([`CLIENT_DEADLINE`]).
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
}

impl Client {
    /// The addresses the node listens on, each ending in `/p2p/<peer id>`.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, ClientError> {
        self.request(Command::ListenAddrs).await
    }

    /// Peers in the Kademlia routing table.
    pub async fn routing_table_peers(&self) -> Result<Vec<PeerId>, ClientError> {
        self.request(Command::RoutingTablePeers).await
    }

    /// Peers with at least one open connection.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, ClientError> {
        self.request(Command::ConnectedPeers).await
    }

    async fn request<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, ClientError> {
        let (reply, response) = oneshot::channel();
        tokio::time::timeout(CLIENT_DEADLINE, async {
            self.commands
                .send(command(reply))
                .await
                .map_err(|_| ClientError::Stopped)?;
            response.await.map_err(|_| ClientError::Stopped)
        })
        .await
        .map_err(|_| ClientError::Timeout)?
    }
}

#[derive(Debug)]
enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    RoutingTablePeers(oneshot::Sender<Vec<PeerId>>),
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
}

/// Owns the swarm. Nothing else touches it.
struct EventLoop {
    swarm: Swarm<BootstrapBehaviour>,
    /// `None` once every [`Client`] is gone; the loop then runs until shutdown.
    commands: Option<mpsc::Receiver<Command>>,
    events: mpsc::Sender<Event>,
    metrics: BootstrapMetrics,
    kad_protocol: StreamProtocol,
    /// Configured other bootstrap nodes, kept connected.
    peers: Vec<PeerAddr>,
    redial_interval: Duration,
}

impl EventLoop {
    async fn run(mut self, shutdown: CancellationToken) {
        let local = *self.swarm.local_peer_id();
        tracing::info!(
            peer = %local,
            kad_protocol = %self.kad_protocol,
            "bootstrap node running"
        );
        // First tick is immediate: configured peers are dialed right away.
        let mut redial = tokio::time::interval(self.redial_interval);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = next_command(&mut self.commands) => match command {
                    Some(command) => self.on_command(command),
                    None => self.commands = None,
                },
                _ = redial.tick() => self.redial_peers(),
            }
        }
        tracing::info!(peer = %local, "bootstrap node stopped");
    }

    fn on_command(&mut self, command: Command) {
        // A caller that gave up (deadline) has dropped its receiver; that is fine.
        match command {
            Command::ListenAddrs(reply) => {
                let local = *self.swarm.local_peer_id();
                let addrs = self
                    .swarm
                    .listeners()
                    .map(|addr| with_peer_id(addr.clone(), local))
                    .collect();
                let _ = reply.send(addrs);
            }
            Command::RoutingTablePeers(reply) => {
                let _ = reply.send(self.swarm.behaviour_mut().routing_table_peers());
            }
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
        }
    }

    fn redial_peers(&mut self) {
        for peer in &self.peers {
            if self.swarm.is_connected(&peer.peer_id) {
                continue;
            }
            // Kademlia drops addresses that failed; put the configured one back.
            self.swarm
                .behaviour_mut()
                .kademlia
                .add_address(&peer.peer_id, peer.addr.clone());
            let opts = DialOpts::peer_id(peer.peer_id)
                .addresses(vec![peer.addr.clone()])
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    tracing::debug!(peer = %peer.peer_id, addr = %peer.addr, "dialing bootstrap peer")
                }
                Err(error) => {
                    tracing::debug!(peer = %peer.peer_id, addr = %peer.addr, %error, "not dialing bootstrap peer")
                }
            }
        }
        self.update_gauges();
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BootstrapBehaviourEvent>) {
        self.metrics.libp2p.record(&event);
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let address = with_peer_id(address, *self.swarm.local_peer_id());
                tracing::info!(addr = %address, "listening");
                self.emit(Event::Listening { address });
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                let address = with_peer_id(address, *self.swarm.local_peer_id());
                tracing::info!(addr = %address, "no longer listening");
                self.emit(Event::ListenAddrExpired { address });
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!(%error, "listener error");
            }
            SwarmEvent::ListenerClosed {
                addresses, reason, ..
            } => {
                tracing::warn!(addrs = ?addresses, ?reason, "listener closed");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                tracing::debug!(
                    peer = %peer_id,
                    addr = %endpoint.get_remote_address(),
                    connections = num_established.get(),
                    "connection established"
                );
                if num_established.get() == 1 && self.is_configured_peer(&peer_id) {
                    tracing::info!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected to bootstrap peer");
                }
                self.update_gauges();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                endpoint,
                num_established,
                cause,
                ..
            } => {
                tracing::debug!(
                    peer = %peer_id,
                    addr = %endpoint.get_remote_address(),
                    connections = num_established,
                    cause = ?cause,
                    "connection closed"
                );
                self.update_gauges();
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => match peer_id {
                Some(peer) if self.is_configured_peer(&peer) => {
                    tracing::warn!(peer = %peer, %error, "cannot reach bootstrap peer; will retry");
                }
                _ => tracing::debug!(peer = ?peer_id, %error, "outgoing connection failed"),
            },
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                // A peer with the wrong pre-shared key ends up here.
                tracing::debug!(addr = %send_back_addr, %error, "incoming connection failed");
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BootstrapBehaviourEvent) {
        match event {
            BootstrapBehaviourEvent::Limits(never) => match never {},
            BootstrapBehaviourEvent::Identify(event) => {
                self.metrics.libp2p.record(&event);
                match event {
                    identify::Event::Received { peer_id, info, .. } => {
                        let added = add_identified_addresses(
                            &mut self.swarm.behaviour_mut().kademlia,
                            &peer_id,
                            &info,
                            &self.kad_protocol,
                        );
                        tracing::info!(
                            peer = %peer_id,
                            agent = %info.agent_version,
                            addrs_added = added,
                            "identified peer"
                        );
                        for addr in info.listen_addrs.iter().take(added) {
                            tracing::debug!(peer = %peer_id, addr = %addr, "peer listens on");
                        }
                    }
                    identify::Event::Error { peer_id, error, .. } => {
                        tracing::debug!(peer = %peer_id, %error, "identify failed");
                    }
                    _ => {}
                }
            }
            BootstrapBehaviourEvent::Kademlia(event) => {
                self.metrics.libp2p.record(&event);
                match event {
                    kad::Event::RoutingUpdated {
                        peer,
                        is_new_peer: true,
                        addresses,
                        ..
                    } => {
                        tracing::debug!(peer = %peer, addr = %addresses.first(), "added to routing table");
                        self.update_gauges();
                    }
                    kad::Event::RoutingUpdated { .. } => self.update_gauges(),
                    kad::Event::OutboundQueryProgressed {
                        result: kad::QueryResult::Bootstrap(result),
                        step,
                        ..
                    } if step.last => match result {
                        Ok(_) => tracing::debug!("kademlia bootstrap finished"),
                        Err(error) => tracing::debug!(%error, "kademlia bootstrap failed"),
                    },
                    _ => {}
                }
            }
            BootstrapBehaviourEvent::Ping(event) => {
                self.metrics.libp2p.record(&event);
                if let Err(error) = &event.result {
                    tracing::debug!(peer = %event.peer, %error, "ping failed");
                }
            }
            BootstrapBehaviourEvent::Relay(event) => {
                self.metrics.libp2p.record(&event);
                tracing::info!(?event, "relay");
            }
        }
    }

    fn is_configured_peer(&self, peer_id: &PeerId) -> bool {
        self.peers.iter().any(|peer| &peer.peer_id == peer_id)
    }

    fn update_gauges(&mut self) {
        let routing_table = self.swarm.behaviour_mut().routing_table_size();
        self.metrics.set_routing_table_peers(routing_table);
        self.metrics
            .set_connected_peers(self.swarm.connected_peers().count());
    }

    /// Never blocks the swarm: a full channel means the owner is not reading, and the
    /// same facts are available through [`Client::listen_addrs`].
    fn emit(&self, event: Event) {
        match self.events.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                tracing::warn!(?event, "event channel full; event dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

async fn next_command(commands: &mut Option<mpsc::Receiver<Command>>) -> Option<Command> {
    match commands {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}
