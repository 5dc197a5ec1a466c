//! Shared by the integration tests: in-process bootstrap nodes and client swarms on the
//! memory transport, and a deadline for every wait.

#![allow(dead_code)]

use std::{path::PathBuf, time::Duration};

use futures::StreamExt;
use meshtune_bootstrap::{
    BootstrapBehaviour, BootstrapConfig, Event, PeerAddr, RunningBootstrap,
    behaviour::BehaviourConfig,
    libp2p::{Multiaddr, PeerId, Swarm, identity::Keypair, kad, swarm::SwarmEvent},
    start_with_transport,
};
use meshtune_net::transport;

/// Generous: the tests finish in well under a second on an idle machine, but CI boxes
/// share their cores with other builds.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {DEADLINE:?}: {what}"),
    }
}

/// A bootstrap node on `/memory/0`; returns it with its printed `/memory/<n>/p2p/<id>`.
pub async fn memory_bootstrap(
    peers: Vec<PeerAddr>,
    metrics: bool,
) -> (RunningBootstrap, Multiaddr) {
    memory_bootstrap_with(
        Keypair::generate_ed25519(),
        "/memory/0".parse().expect("memory addr"),
        peers,
        metrics,
    )
    .await
}

pub async fn memory_bootstrap_with(
    keypair: Keypair,
    listen: Multiaddr,
    peers: Vec<PeerAddr>,
    metrics: bool,
) -> (RunningBootstrap, Multiaddr) {
    let mut config = BootstrapConfig::new(PathBuf::from("unused-in-memory"));
    config.listen = vec![listen];
    config.peers = peers;
    config.redial_interval = Duration::from_millis(200);
    if metrics {
        config.metrics = Some(([127, 0, 0, 1], 0).into());
    }
    let transport = transport::memory_transport(&keypair, None).expect("memory transport");
    let mut node = start_with_transport(&config, keypair, transport)
        .await
        .expect("start bootstrap");
    let address = within("bootstrap listening", async {
        loop {
            match node.next_event().await {
                Some(Event::Listening { address }) => return address,
                Some(_) => {}
                None => panic!("bootstrap stopped before listening"),
            }
        }
    })
    .await;
    (node, address)
}

/// A plain peer: same behaviour as the bootstrap node, Kademlia explicitly in server
/// mode (automatic mode would keep it out of every routing table).
pub fn client_swarm() -> Swarm<BootstrapBehaviour> {
    let keypair = Keypair::generate_ed25519();
    let transport = transport::memory_transport(&keypair, None).expect("memory transport");
    let mut behaviour = BootstrapBehaviour::new(&keypair, &BehaviourConfig::default());
    behaviour.kademlia.set_mode(Some(kad::Mode::Server));
    transport::build_swarm(&keypair, transport, behaviour, Duration::from_secs(60))
}

pub async fn listen_on_memory(swarm: &mut Swarm<BootstrapBehaviour>) -> Multiaddr {
    swarm
        .listen_on("/memory/0".parse().expect("memory addr"))
        .expect("listen");
    within("client listening", async {
        loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                return address;
            }
        }
    })
    .await
}

/// Tells the client's Kademlia about the bootstrap node and dials it.
pub fn join(swarm: &mut Swarm<BootstrapBehaviour>, bootstrap: &Multiaddr) {
    let peer: PeerAddr = PeerAddr::from_multiaddr(bootstrap.clone()).expect("bootstrap address");
    swarm
        .behaviour_mut()
        .kademlia
        .add_address(&peer.peer_id, peer.addr.clone());
    swarm.dial(peer.to_multiaddr()).expect("dial bootstrap");
}

pub fn peer_id_of(addr: &Multiaddr) -> PeerId {
    PeerAddr::from_multiaddr(addr.clone())
        .expect("address ends in /p2p")
        .peer_id
}
