//! A node whose bootstrap node is gone rejoins through the peers it saved in its peer table.

mod common;

use std::time::Duration;

use common::bare_network;
use libp2p::PeerId;
use meshtune_bootstrap::PeerAddr;
use meshtune_node::network::{self, NetworkConfig};
use meshtune_protocol::{ChunkRequest, ChunkResponse};
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
