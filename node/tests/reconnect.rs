//! A node whose bootstrap node is gone rejoins through the peers it saved in its peer table.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{bare_network, bare_network_with_store};
use libp2p::PeerId;
use meshtune_net::PeerAddr;
use meshtune_node::network::store::BlobStore;
use meshtune_node::network::{self, NetworkConfig, NetworkEvent};
use meshtune_protocol::{ChunkRequest, ChunkResponse, DeltaManifest, ModelHash, chunk_blob};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_rejoins_through_its_saved_peers_when_the_bootstrap_is_gone() {
    let shutdown = CancellationToken::new();
    let dir = tempfile::tempdir().expect("tmp");
    // A peer that is still up.
    let mut config = NetworkConfig::new("test".parse().expect("mesh"));
    config.listen = vec!["/memory/7300".parse().expect("addr")];
    let alive = bare_network(config, &shutdown);
    let alive_id = alive.peer_id;
    let mut alive_events = alive.events;
    let drain_alive = tokio::spawn(async move { while alive_events.recv().await.is_some() {} });

    // The restarted node: its bootstrap address answers nothing, its peer table from the last
    // run lists the live peer.
    let table = dir.path().join("peers.json");
    let saved = PeerAddr::new(alive_id, "/memory/7300".parse().expect("addr"));
    std::fs::write(
        &table,
        serde_json::to_vec(&vec![saved.to_string()]).expect("json"),
    )
    .expect("write table");
    let mut config = NetworkConfig::new("test".parse().expect("mesh"));
    config.listen = vec!["/memory/7301".parse().expect("addr")];
    config.bootstrap = vec![PeerAddr::new(
        PeerId::random(),
        "/memory/7399".parse().expect("addr"),
    )];
    config.peer_table = Some(table.clone());
    config.reconnect_interval = Duration::from_millis(200);
    config.request_timeout = Duration::from_secs(5);
    let restarted = bare_network(config, &shutdown);
    let client = restarted.client.clone();
    let mut events = restarted.events;
    let drain = tokio::spawn(async move { while events.recv().await.is_some() {} });

    let mut answered = None;
    for _ in 0..50 {
        if let Ok(response) = client
            .request(
                alive_id,
                ChunkRequest::LatestState {
                    mesh_id: "test".into(),
                },
            )
            .await
        {
            answered = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        answered,
        Some(ChunkResponse::NotFound),
        "never reached the saved peer"
    );
    // The table is kept up to date: it still holds the live peer (and the bootstrap address).
    let mut kept = Vec::new();
    for _ in 0..50 {
        kept = network::load_peer_table(&table);
        if kept.iter().any(|p| p.peer_id == alive_id) && kept.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(kept.iter().any(|p| p.peer_id == alive_id), "{kept:?}");
    drain.abort();
    drain_alive.abort();
    shutdown.cancel();
}

fn manifest_from(sender: PeerId, round: u64) -> DeltaManifest {
    DeltaManifest {
        mesh_id: "test".into(),
        round,
        base_model: ModelHash::default(),
        sender: sender.to_bytes(),
        sample_count: 4,
        training_steps: 1,
        blob: chunk_blob(&[], 1).expect("blob").descriptor(),
        tensors: Vec::new(),
    }
}

/// Gossip does not replay a manifest to a peer that connects after it went out: a new
/// neighbour is asked for its current manifest directly, and the answer counts only when it
/// names the peer that sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_connects_late_gets_the_manifest_it_missed_and_no_forgery() {
    let shutdown = CancellationToken::new();
    let start = |port: u64, store: &Arc<Mutex<BlobStore>>, bootstrap: Vec<PeerAddr>| {
        let mut config = NetworkConfig::new("test".parse().expect("mesh"));
        config.listen = vec![format!("/memory/{port}").parse().expect("addr")];
        config.bootstrap = bootstrap;
        bare_network_with_store(config, Arc::clone(store), &shutdown)
    };
    // A announced round 3 before anyone could hear it.
    let store_a = Arc::new(Mutex::new(BlobStore::default()));
    let a = start(7310, &store_a, Vec::new());
    store_a
        .lock()
        .expect("store")
        .set_current_manifest(manifest_from(a.peer_id, 3));
    // M serves a manifest in A's name (round 4): the connection vouches for M, not for A.
    let store_m = Arc::new(Mutex::new(BlobStore::default()));
    let m = start(7311, &store_m, Vec::new());
    store_m
        .lock()
        .expect("store")
        .set_current_manifest(manifest_from(a.peer_id, 4));
    let mut drains = Vec::new();
    for mut events in [a.events, m.events] {
        drains.push(tokio::spawn(async move {
            while events.recv().await.is_some() {}
        }));
    }
    // B joins later, through both.
    let b = start(
        7312,
        &Arc::new(Mutex::new(BlobStore::default())),
        vec![
            PeerAddr::new(a.peer_id, "/memory/7310".parse().expect("addr")),
            PeerAddr::new(m.peer_id, "/memory/7311".parse().expect("addr")),
        ],
    );
    let mut events = b.events;
    let mut heard = Vec::new();
    let mut both_subscribed_at = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(100), events.recv()).await
            && let NetworkEvent::Manifest {
                message_id,
                source,
                manifest,
            } = event
        {
            heard.push((message_id, source, manifest.round));
        }
        let peers = b.client.mesh_peers().await.expect("peers");
        if both_subscribed_at.is_none() && peers.contains(&a.peer_id) && peers.contains(&m.peer_id)
        {
            both_subscribed_at = Some(Instant::now());
        }
        // Both neighbours were asked; give the answers a moment after A's arrived.
        if !heard.is_empty()
            && both_subscribed_at.is_some_and(|t| t.elapsed() > Duration::from_secs(2))
        {
            break;
        }
    }
    assert_eq!(heard.len(), 1, "{heard:?}");
    let (id, source, round) = &heard[0];
    assert_eq!((*source, *round), (a.peer_id, 3));
    assert!(
        String::from_utf8_lossy(&id.0).starts_with("direct/"),
        "{id:?}"
    );
    for drain in drains {
        drain.abort();
    }
    shutdown.cancel();
}
