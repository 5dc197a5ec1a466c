//! The node's network actor: one task ([`EventLoop`](event_loop)) owns the libp2p swarm; the
//! rest of the node talks to it through a cloneable [`Client`] (bounded command channel,
//! oneshot replies with deadlines) and receives [`NetworkEvent`]s on a bounded channel, as in
//! rust-libp2p's file-sharing example.
//!
//! Modules: [`config`] (what the network is told), [`client`] (the handle), [`behaviour`]
//! (what a node speaks), `event_loop` (the swarm task), [`peer_table`] (`peers.json` and
//! bootstrap redials), [`manifest`] (structure checks of delta manifests), [`codec`] (blob
//! stream framing), [`store`] (what a node serves), [`fetch`] (pulling blobs).
//!
//! Owns: the swarm, gossip validation of manifest *structure* (size caps, mesh id, signer ==
//! sender, layout) and peer strikes. Must not touch: rounds, models or files; whether a
//! well-formed manifest is timely is the round machine's call, reported back through
//! [`Client::report_manifest`].

pub mod behaviour;
pub mod client;
pub mod codec;
pub mod config;
pub mod event;
mod event_loop;
pub mod fetch;
pub mod manifest;
mod metrics;
pub mod peer_table;
pub mod store;
pub mod uploads;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::core::Transport;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{OrTransport, upgrade::Version};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId, Swarm, noise, relay, yamux};
use meshtune_net::transport::{BoxedTransport, build_swarm, with_bandwidth_metrics};
use meshtune_protocol::ModelLayout;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use self::behaviour::NodeBehaviour;
pub use self::client::{Client, RequestError};
pub use self::config::NetworkConfig;
pub use self::event::{NetworkError, NetworkEvent};
use self::event_loop::{EventLoop, EventLoopParts};
pub use self::manifest::{ManifestFault, check_manifest};
use self::metrics::NetMetrics;
pub use self::peer_table::{bootstrap_backoff, load_peer_table};
use self::store::BlobStore;

const COMMAND_CHANNEL_CAPACITY: usize = 256;
const EVENT_CHANNEL_CAPACITY: usize = 256;
/// Strikes after which a peer is blacklisted and disconnected.
pub const MAX_STRIKES: u32 = 5;

/// A started network task.
pub struct RunningNetwork {
    pub client: Client,
    pub events: mpsc::Receiver<NetworkEvent>,
    pub peer_id: PeerId,
    pub task: tokio::task::JoinHandle<()>,
}

/// Builds the swarm on `transport` (already secured and multiplexed; see
/// [`meshtune_net::transport`]), listens, dials the bootstrap peers and spawns the
/// event loop. `layout` is what every manifest must match; `store` is what this node serves.
/// The event loop ends, and the node goes offline, once every [`Client`] clone is dropped or
/// `shutdown` fires: a caller that only serves must keep its client.
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
    let (transport, relay_client) = with_relay_client(keypair, transport, config.relay_client)?;
    let transport = with_bandwidth_metrics(transport, registry);
    let behaviour = NodeBehaviour::new(keypair, &config, relay_client)?;
    let metrics = libp2p::metrics::Metrics::new(registry);
    let net_metrics = NetMetrics::register(registry);
    let mut swarm = build_swarm(
        keypair,
        transport,
        behaviour,
        config.idle_connection_timeout,
    );
    listen(&mut swarm, &config)?;
    dial_known_peers(&mut swarm, &config);
    let (command_sender, commands) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
    let (events, event_receiver) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
    let request_deadline = config.request_timeout + Duration::from_secs(5);
    let event_loop = EventLoop::new(EventLoopParts {
        config,
        swarm,
        layout,
        store,
        metrics,
        net_metrics,
        commands,
        events,
    });
    let task = tokio::spawn(event_loop.run(shutdown));
    Ok(RunningNetwork {
        client: Client::new(command_sender, request_deadline),
        events: event_receiver,
        peer_id,
        task,
    })
}

/// `transport`, or with `relay_client` the relay client's transport in front of it (secured
/// and multiplexed the same way) and the client behaviour that goes with it.
fn with_relay_client(
    keypair: &Keypair,
    transport: BoxedTransport,
    relay_client: bool,
) -> Result<(BoxedTransport, Option<relay::client::Behaviour>), NetworkError> {
    if !relay_client {
        return Ok((transport, None));
    }
    let (relay_transport, behaviour) = relay::client::new(keypair.public().to_peer_id());
    let relay_transport = relay_transport
        .upgrade(Version::V1Lazy)
        .authenticate(noise::Config::new(keypair)?)
        .multiplex(yamux::Config::default())
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
    let combined = OrTransport::new(relay_transport, transport)
        .map(|either, _| either.into_inner())
        .boxed();
    Ok((combined, Some(behaviour)))
}

/// Listens on the configured addresses and, with a relay client, on each relay's circuit;
/// announces the external addresses.
fn listen(swarm: &mut Swarm<NodeBehaviour>, config: &NetworkConfig) -> Result<(), NetworkError> {
    let listen_on = |swarm: &mut Swarm<NodeBehaviour>, addr: Multiaddr| {
        swarm
            .listen_on(addr.clone())
            .map(|_| ())
            .map_err(|source| NetworkError::Listen { addr, source })
    };
    for addr in &config.listen {
        listen_on(swarm, addr.clone())?;
    }
    for addr in &config.external {
        swarm.add_external_address(addr.clone());
    }
    if config.relay_client {
        for relay in &config.relays {
            // Listening on a circuit address makes the relay client dial the relay and ask for
            // a reservation; once accepted the circuit address is reported as a listen address.
            let circuit = relay
                .to_multiaddr()
                .with(libp2p::multiaddr::Protocol::P2pCircuit);
            listen_on(swarm, circuit)?;
        }
    }
    Ok(())
}

/// Adds the peers of the last run's table and the bootstrap peers to Kademlia and dials
/// them (up to 4 of the former).
fn dial_known_peers(swarm: &mut Swarm<NodeBehaviour>, config: &NetworkConfig) {
    let me = *swarm.local_peer_id();
    if let Some(path) = &config.peer_table {
        let known = load_peer_table(path);
        if !known.is_empty() {
            tracing::info!(peers = known.len(), file = %path.display(), "known peers from the last run");
        }
        for peer in known.iter().filter(|p| p.peer_id != me) {
            swarm
                .behaviour_mut()
                .kademlia
                .add_address(&peer.peer_id, peer.addr.clone());
        }
        for peer in known.iter().filter(|p| p.peer_id != me).take(4) {
            let _ = swarm.dial(peer.to_multiaddr());
        }
    }
    for peer in config.bootstrap.iter().filter(|p| p.peer_id != me) {
        swarm
            .behaviour_mut()
            .kademlia
            .add_address(&peer.peer_id, peer.addr.clone());
        tracing::info!(bootstrap = %peer, "dialing the bootstrap node");
        if let Err(err) = swarm.dial(peer.to_multiaddr()) {
            tracing::warn!(peer = %peer, error = %err, "cannot dial bootstrap peer");
        }
    }
}
