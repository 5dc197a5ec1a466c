//! NAT traversal: a node that no peer can reach directly reserves a slot on a relay (a
//! `meshtune-bootstrap --relay`) and is reached through its `/p2p-circuit` address.

mod common;

use std::time::Duration;

use common::bare_network;

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use meshtune_bootstrap::BootstrapConfig;
use meshtune_net::PeerAddr;
use meshtune_net::transport::memory_transport;
use meshtune_node::network::{NetworkConfig, RunningNetwork};
use meshtune_protocol::{ChunkRequest, ChunkResponse};
use tokio_util::sync::CancellationToken;

/// A node with no listen address of its own: nobody can dial it directly.
fn unreachable_node(relays: Vec<PeerAddr>, shutdown: &CancellationToken) -> RunningNetwork {
    let mut config = NetworkConfig::new("test".parse().expect("mesh"));
    config.relay_client = true;
    config.relays = relays;
    config.request_timeout = Duration::from_secs(5);
    bare_network(config, shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_nat_is_reached_through_a_relay() {
    let shutdown = CancellationToken::new();
    // The relay: a bootstrap node with the relay server on and a confirmed external address
    // (a relay hands its addresses to the peers it reserves slots for).
    let keypair = Keypair::generate_ed25519();
    let relay_addr: Multiaddr = "/memory/7100".parse().expect("addr");
    let mut config = BootstrapConfig::new("unused".into());
    config.listen = vec![relay_addr.clone()];
    config.external = vec![relay_addr.clone()];
    config.behaviour.mesh = "test".parse().expect("mesh");
    config.behaviour.relay = true;
    let transport = memory_transport(&keypair, None).expect("transport");
    let relay = meshtune_bootstrap::start_with_transport(&config, keypair, transport)
        .await
        .expect("relay");
    let relay_peer = PeerAddr::new(relay.peer_id(), relay_addr);

    // Behind NAT: no listen address, only the reservation on the relay.
    let behind_nat = unreachable_node(vec![relay_peer.clone()], &shutdown);
    let nat_id: PeerId = behind_nat.peer_id;
    let nat_client = behind_nat.client.clone();
    let mut nat_events = behind_nat.events;
    let drain_nat = tokio::spawn(async move { while nat_events.recv().await.is_some() {} });
    let mut circuit = None;
    for _ in 0..400 {
        let addrs = nat_client.listen_addrs().await.expect("listen addrs");
        if let Some(addr) = addrs
            .into_iter()
            .find(|a| a.iter().any(|p| p == Protocol::P2pCircuit))
        {
            circuit = Some(addr);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let circuit = circuit.expect("the relay accepted a reservation: a /p2p-circuit listen address");
    println!("reachable through {circuit}");

    // Another node that cannot be dialed either: the only path between the two is the relay.
    let dialer = unreachable_node(Vec::new(), &shutdown);
    let dialer_client = dialer.client.clone();
    let mut dialer_events = dialer.events;
    let drain_dialer = tokio::spawn(async move { while dialer_events.recv().await.is_some() {} });
    let target = if circuit
        .iter()
        .any(|p| matches!(p, Protocol::P2p(id) if id == nat_id))
    {
        circuit
    } else {
        circuit.with(Protocol::P2p(nat_id))
    };
    dialer_client
        .dial(target)
        .await
        .expect("dial through the relay");
    let mut answered = None;
    for _ in 0..40 {
        match dialer_client
            .request(
                nat_id,
                ChunkRequest::LatestState {
                    mesh_id: "test".into(),
                },
            )
            .await
        {
            Ok(response) => {
                answered = Some(response);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    // It has no state yet, and says so: a blob request went through the circuit and back.
    assert_eq!(answered, Some(ChunkResponse::NotFound));
    drain_nat.abort();
    drain_dialer.abort();
    drop(relay);
    shutdown.cancel();
}
