//! The metrics endpoint of a running bootstrap node shows libp2p's metrics and its own
//! peer and routing-table gauges.

mod support;

use std::time::Duration;

use futures::StreamExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use support::{client_swarm, join, listen_on_memory, memory_bootstrap, within};

async fn get_metrics(addr: std::net::SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("write");
    let mut response = String::new();
    within("metrics response", stream.read_to_string(&mut response))
        .await
        .expect("read");
    response
}

#[tokio::test]
async fn metrics_show_libp2p_and_bootstrap_gauges() {
    let (node, bootstrap_addr) = memory_bootstrap(Vec::new(), true).await;
    let metrics_addr = node.metrics_addr().expect("metrics enabled");
    let client = node.client();

    let mut peer = client_swarm();
    listen_on_memory(&mut peer).await;
    join(&mut peer, &bootstrap_addr);
    let peer_id = *peer.local_peer_id();
    within("peer in routing table", async {
        let mut check = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = peer.select_next_some() => {}
                _ = check.tick() => {
                    if client.routing_table_peers().await.expect("answers").contains(&peer_id) {
                        return;
                    }
                }
            }
        }
    })
    .await;

    let response = get_metrics(metrics_addr).await;
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    for expected in [
        "libp2p_swarm_connections_established_total",
        "libp2p_identify_",
        "libp2p_bandwidth_bytes_total",
        "meshtune_bootstrap_connected_peers 1",
        "meshtune_bootstrap_routing_table_peers 1",
        "meshtune_bootstrap_build_info{version=",
    ] {
        assert!(
            response.contains(expected),
            "missing {expected}:\n{response}"
        );
    }

    node.shutdown(support::DEADLINE).await.expect("stops");
    assert!(TcpStream::connect(metrics_addr).await.is_err());
}
