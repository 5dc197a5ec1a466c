//! The network task's own counters, served at `/metrics` next to the node's and libp2p's.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// The event loop's own counters (served at `/metrics` next to the node's and libp2p's).
#[derive(Debug, Clone, Default)]
pub(crate) struct NetMetrics {
    /// Misbehaviours counted against peers, by reason.
    pub(crate) strikes: Family<Vec<(String, String)>, Counter>,
    /// Manifests refused at gossip validation, by reason.
    pub(crate) rejected_manifests: Family<Vec<(String, String)>, Counter>,
    /// Blob bytes this node served to peers, by kind (chunk, chunk_list, state_manifest).
    pub(crate) served_bytes: Family<Vec<(String, String)>, Counter>,
    /// Peers blacklisted so far (strikes or deny list).
    pub(crate) blacklisted: Gauge,
}

impl NetMetrics {
    pub(crate) fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self::default();
        let sub = registry.sub_registry_with_prefix("meshtune");
        sub.register(
            "peer_strikes",
            "Misbehaviours counted against peers, by reason",
            metrics.strikes.clone(),
        );
        sub.register(
            "gossip_rejected",
            "Manifests refused at gossip validation, by reason",
            metrics.rejected_manifests.clone(),
        );
        sub.register(
            "served_bytes",
            "Blob bytes served to peers, by kind",
            metrics.served_bytes.clone(),
        );
        sub.register(
            "blacklisted_peers",
            "Peers blacklisted after repeated misbehaviour",
            metrics.blacklisted.clone(),
        );
        metrics
    }

    pub(crate) fn count(
        family: &Family<Vec<(String, String)>, Counter>,
        key: &str,
        value: &str,
        by: u64,
    ) {
        family
            .get_or_create(&vec![(key.to_owned(), value.to_owned())])
            .inc_by(by);
    }
}
