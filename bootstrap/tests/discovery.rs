//! In-process discovery on the memory transport: clients that know only a bootstrap
//! address find each other through Kademlia, also across two joined bootstrap nodes.

mod support;

use std::{collections::HashSet, time::Duration};

use futures::StreamExt;
use meshtune_bootstrap::{
    BootstrapBehaviour, Client, MeshId, PeerAddr,
    behaviour::BootstrapBehaviourEvent,
    libp2p::{
        Multiaddr, PeerId, Swarm, identify,
        identity::Keypair,
        kad::{self, QueryResult},
        swarm::{
            SwarmEvent,
            dial_opts::{DialOpts, PeerCondition},
        },
    },
};
use meshtune_net::discovery::add_identified_addresses;
use support::{
    client_swarm, join, listen_on_memory, memory_bootstrap, memory_bootstrap_with, peer_id_of,
    within,
};

/// Handles what a real peer would: identify-reported addresses go to Kademlia.
fn on_client_event(
    swarm: &mut Swarm<BootstrapBehaviour>,
    event: SwarmEvent<BootstrapBehaviourEvent>,
) -> Option<SwarmEvent<BootstrapBehaviourEvent>> {
    if let SwarmEvent::Behaviour(BootstrapBehaviourEvent::Identify(identify::Event::Received {
        peer_id,
        info,
        ..
    })) = &event
    {
        add_identified_addresses(
            &mut swarm.behaviour_mut().kademlia,
            peer_id,
            info,
            &MeshId::default().kad_protocol(),
        );
    }
    Some(event)
}

/// Drives both clients until every `(node, peers)` pair reports all `peers` in its
/// routing table, and each client has its own bootstrap node in its table.
async fn settle(
    a: &mut Swarm<BootstrapBehaviour>,
    b: &mut Swarm<BootstrapBehaviour>,
    expectations: &[(&Client, Vec<PeerId>)],
    a_knows: PeerId,
    b_knows: PeerId,
) {
    within("routing tables filled", async {
        let mut check = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                event = a.select_next_some() => { on_client_event(a, event); }
                event = b.select_next_some() => { on_client_event(b, event); }
                _ = check.tick() => {
                    let mut done = routing_table(a).contains(&a_knows)
                        && routing_table(b).contains(&b_knows);
                    for (client, peers) in expectations {
                        let table: HashSet<PeerId> = client
                            .routing_table_peers()
                            .await
                            .expect("bootstrap answers")
                            .into_iter()
                            .collect();
                        done &= peers.iter().all(|peer| table.contains(peer));
                    }
                    if done {
                        return;
                    }
                }
            }
        }
    })
    .await;
}

fn routing_table(swarm: &mut Swarm<BootstrapBehaviour>) -> HashSet<PeerId> {
    swarm
        .behaviour_mut()
        .routing_table_peers()
        .into_iter()
        .collect()
}

/// One `get_closest_peers(B)` from A; then A dials B by peer id alone, with the
/// addresses Kademlia found. Returns the peers the lookup reported.
async fn a_finds_b(a: &mut Swarm<BootstrapBehaviour>, b: &mut Swarm<BootstrapBehaviour>) {
    let b_id = *b.local_peer_id();
    let query = a.behaviour_mut().kademlia.get_closest_peers(b_id);
    let found = within("A's lookup of B", async {
        loop {
            tokio::select! {
                event = a.select_next_some() => {
                    if let Some(SwarmEvent::Behaviour(BootstrapBehaviourEvent::Kademlia(
                        kad::Event::OutboundQueryProgressed { id, result: QueryResult::GetClosestPeers(result), step, .. },
                    ))) = on_client_event(a, event)
                        && id == query
                    {
                        assert!(step.last, "one result expected");
                        return result.expect("lookup succeeds").peers;
                    }
                }
                event = b.select_next_some() => { on_client_event(b, event); }
            }
        }
    })
    .await;
    let b_info = found
        .iter()
        .find(|peer| peer.peer_id == b_id)
        .unwrap_or_else(|| panic!("B {b_id} not among {found:?}"));
    assert!(!b_info.addrs.is_empty(), "B found without addresses");

    // Dial by peer id only (a new connection even though the lookup opened one): the
    // address must come from what Kademlia learned.
    a.dial(
        DialOpts::peer_id(b_id)
            .condition(PeerCondition::Always)
            .build(),
    )
    .expect("A has addresses for B");
    within("A connects to B by peer id", async {
        loop {
            tokio::select! {
                event = a.select_next_some() => {
                    if let Some(SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. }) = on_client_event(a, event)
                        && peer_id == b_id
                        && endpoint.is_dialer()
                    {
                        return;
                    }
                }
                event = b.select_next_some() => { on_client_event(b, event); }
            }
        }
    })
    .await;
}

#[tokio::test]
async fn clients_that_only_know_the_bootstrap_find_each_other() {
    let (bootstrap, bootstrap_addr) = memory_bootstrap(Vec::new(), false).await;
    let bootstrap_id = peer_id_of(&bootstrap_addr);
    let mut a = client_swarm();
    let mut b = client_swarm();
    assert_eq!(a.behaviour_mut().kademlia.mode(), kad::Mode::Server);
    listen_on_memory(&mut a).await;
    listen_on_memory(&mut b).await;
    join(&mut a, &bootstrap_addr);
    join(&mut b, &bootstrap_addr);

    let client = bootstrap.client();
    let (a_id, b_id) = (*a.local_peer_id(), *b.local_peer_id());
    settle(
        &mut a,
        &mut b,
        &[(&client, vec![a_id, b_id])],
        bootstrap_id,
        bootstrap_id,
    )
    .await;
    assert!(
        !routing_table(&mut a).contains(&b_id),
        "A must not know B before the lookup"
    );

    a_finds_b(&mut a, &mut b).await;
    assert!(routing_table(&mut a).contains(&b_id));

    let connected = client.connected_peers().await.expect("connected peers");
    assert!(connected.contains(&a_id) && connected.contains(&b_id));
    bootstrap
        .shutdown(support::DEADLINE)
        .await
        .expect("clean shutdown");
}

#[tokio::test]
async fn two_bootstrap_nodes_form_one_network() {
    let (first, first_addr) = memory_bootstrap(Vec::new(), false).await;
    let first_id = peer_id_of(&first_addr);
    let peer = PeerAddr::from_multiaddr(first_addr.clone()).expect("peer addr");
    let (second, second_addr) = memory_bootstrap(vec![peer], false).await;
    let second_id = peer_id_of(&second_addr);

    // A knows only the first bootstrap node, B only the second.
    let mut a = client_swarm();
    let mut b = client_swarm();
    listen_on_memory(&mut a).await;
    listen_on_memory(&mut b).await;
    join(&mut a, &first_addr);
    join(&mut b, &second_addr);

    let (a_id, b_id) = (*a.local_peer_id(), *b.local_peer_id());
    let (first_client, second_client) = (first.client(), second.client());
    settle(
        &mut a,
        &mut b,
        &[
            (&first_client, vec![second_id, a_id]),
            (&second_client, vec![first_id, b_id]),
        ],
        first_id,
        second_id,
    )
    .await;

    a_finds_b(&mut a, &mut b).await;

    second
        .shutdown(support::DEADLINE)
        .await
        .expect("second stops");
    first
        .shutdown(support::DEADLINE)
        .await
        .expect("first stops");
}

#[tokio::test]
async fn a_bootstrap_peer_that_starts_late_is_dialed_until_it_is_up() {
    // The second node is told about the first before the first exists; it must keep
    // dialing and join once the first is up.
    let first_key = Keypair::generate_ed25519();
    let first_id = first_key.public().to_peer_id();
    let first_listen: Multiaddr = "/memory/4001001".parse().expect("memory addr");
    let (second, _) =
        memory_bootstrap(vec![PeerAddr::new(first_id, first_listen.clone())], false).await;
    let second_client = second.client();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        second_client
            .connected_peers()
            .await
            .expect("answers")
            .is_empty()
    );

    let (first, _) = memory_bootstrap_with(first_key, first_listen, Vec::new(), false).await;
    within("second reconnects to first", async {
        loop {
            let connected = second_client.connected_peers().await.expect("answers");
            let table = second_client.routing_table_peers().await.expect("answers");
            if connected.contains(&first_id) && table.contains(&first_id) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    second.shutdown(support::DEADLINE).await.expect("stops");
    first.shutdown(support::DEADLINE).await.expect("stops");
}
