//! What the bootstrap node records into its [`Registry`]: libp2p's swarm/kad/identify/
//! ping/relay metrics, connected peers and routing table size (served by
//! [`meshtune_net::metrics::MetricsServer`]).

use prometheus_client::{
    metrics::{gauge::Gauge, info::Info},
    registry::Registry,
};

/// Metrics the bootstrap node records.
pub struct BootstrapMetrics {
    /// libp2p's own: `libp2p_swarm_*`, `libp2p_kad_*`, `libp2p_identify_*`, ….
    pub libp2p: libp2p::metrics::Metrics,
    connected_peers: Gauge,
    routing_table_peers: Gauge,
}

impl BootstrapMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let libp2p = libp2p::metrics::Metrics::new(registry);
        let ours = registry.sub_registry_with_prefix("meshtune_bootstrap");
        let connected_peers = Gauge::default();
        ours.register(
            "connected_peers",
            "Peers with at least one open connection",
            connected_peers.clone(),
        );
        let routing_table_peers = Gauge::default();
        ours.register(
            "routing_table_peers",
            "Peers in the Kademlia routing table",
            routing_table_peers.clone(),
        );
        ours.register(
            "build",
            "Constant 1, labelled with the version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Self {
            libp2p,
            connected_peers,
            routing_table_peers,
        }
    }

    pub fn set_connected_peers(&self, peers: usize) {
        self.connected_peers.set(saturating_i64(peers));
    }

    pub fn set_routing_table_peers(&self, peers: usize) {
        self.routing_table_peers.set(saturating_i64(peers));
    }
}

fn saturating_i64(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use meshtune_net::metrics::{MAX_REQUEST_HEAD_BYTES, MetricsServer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_util::sync::CancellationToken;

    use super::*;

    async fn started(
        registry: Registry,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let server = MetricsServer::bind(([127, 0, 0, 1], 0).into(), registry)
            .await
            .expect("bind");
        let addr = server.local_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.serve(shutdown.clone()));
        (addr, shutdown, task)
    }

    async fn request(addr: SocketAddr, raw: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(raw).await.expect("write");
        let mut response = String::new();
        tokio::time::timeout(
            Duration::from_secs(10),
            stream.read_to_string(&mut response),
        )
        .await
        .expect("response within deadline")
        .expect("read");
        response
    }

    #[tokio::test]
    async fn serves_registry_text_and_rejects_everything_else() {
        let mut registry = Registry::default();
        let metrics = BootstrapMetrics::new(&mut registry);
        metrics.set_connected_peers(3);
        metrics.set_routing_table_peers(7);
        let (addr, shutdown, task) = started(registry).await;

        let ok = request(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("application/openmetrics-text"), "{ok}");
        assert!(ok.contains("meshtune_bootstrap_connected_peers 3"), "{ok}");
        assert!(
            ok.contains("meshtune_bootstrap_routing_table_peers 7"),
            "{ok}"
        );
        assert!(ok.contains("libp2p_swarm_"), "{ok}");
        assert!(ok.trim_end().ends_with("# EOF"), "{ok}");
        let (head, body) = ok.split_once("\r\n\r\n").expect("head and body");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );

        let query = request(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(query.starts_with("HTTP/1.1 200 OK"), "{query}");

        let head_only = request(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(head_only.starts_with("HTTP/1.1 200 OK"), "{head_only}");
        assert!(head_only.ends_with("\r\n\r\n"), "{head_only}");

        let missing = request(addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

        let post = request(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(post.contains("Allow: GET, HEAD"), "{post}");

        let garbage = request(addr, b"hello\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");

        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_REQUEST_HEAD_BYTES + 10));
        let too_large = request(addr, &huge).await;
        assert!(too_large.starts_with("HTTP/1.1 431"), "{too_large}");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("stops within deadline")
            .expect("task");
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
