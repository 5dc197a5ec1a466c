//! The node's Prometheus metrics (served at `/metrics` with libp2p's swarm metrics), and the
//! wire byte counters read back for per-round records.
//!
//! **Metrics** (`--metrics ADDR`): `meshtune_round`, `…_train_loss`, `…_eval_loss`,
//! `…_eval_rouge_l`, `…_round_seconds`, `…_mesh_peers`, `…_deltas_used`,
//! `…_payload_bytes_total{kind=delta_in|delta_out|state_in}`, `…_served_bytes_total{kind}`,
//! `…_rejected_total{reason}` (deltas), `…_gossip_rejected_total{reason}` (manifests),
//! `…_peer_strikes_total{reason}`, `…_blacklisted_peers`, `…_round_energy_joules{kind}`,
//! `…_tokens_per_s_per_w`, `…_granularity`, `…_utilization` and
//! `…_round_time_seconds{kind=comp|wait|comm}` (see `RoundTiming`), `…_final_state_adopted_total`,
//! `…_lineage_merges_total`, `…_wire_bytes_total{protocol,direction}` (substream bytes by
//! application protocol: blobs, kad, identify, ping, gossipsub, ...; `rounds.jsonl` has the
//! round's inbound split as `wire_in_by_protocol`), plus libp2p's swarm metrics and
//! `libp2p_bandwidth_bytes_total`.
//!
//! **Energy**: `--power` picks a reader (`node/src/energy.rs`: Jetson INA3221, NVML, RAPL, or
//! unavailable, logged at start); the coordinator reads joules around training and evaluation, so
//! each round records compute and communication energy, tokens/s/W and G = T_comp / T_comm (T_comm
//! = round time - training - evaluation).
//!
//! Owns: metric names and labels. Must not touch: anything but counters.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Handles to the node's metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct NodeMetrics {
    pub round: Gauge,
    pub train_loss: Gauge<f64, AtomicU64>,
    pub eval_rouge_l: Gauge<f64, AtomicU64>,
    pub eval_loss: Gauge<f64, AtomicU64>,
    pub round_seconds: Gauge<f64, AtomicU64>,
    pub mesh_peers: Gauge,
    pub deltas_used: Gauge,
    /// Times this node adopted the mesh's final state after the last round.
    pub final_state_adopted: Counter,
    /// Senders first heard on a model this node's rounds did not produce (a split healing).
    pub lineage_merges: Counter,
    energy_j: Family<KindLabel, Gauge<f64, AtomicU64>>,
    tokens_per_s_per_w: Gauge<f64, AtomicU64>,
    granularity: Gauge<f64, AtomicU64>,
    utilization: Gauge<f64, AtomicU64>,
    round_time: Family<KindLabel, Gauge<f64, AtomicU64>>,
    bytes: Family<KindLabel, Counter>,
    rejected: Family<ReasonLabel, Counter>,
    /// Filled in after registration is complete (the registry is shared with the server).
    registry: Arc<Mutex<Option<Arc<Registry>>>>,
}

impl NodeMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            round: Gauge::default(),
            train_loss: Gauge::default(),
            eval_rouge_l: Gauge::default(),
            eval_loss: Gauge::default(),
            round_seconds: Gauge::default(),
            mesh_peers: Gauge::default(),
            deltas_used: Gauge::default(),
            final_state_adopted: Counter::default(),
            lineage_merges: Counter::default(),
            energy_j: Family::default(),
            utilization: Gauge::default(),
            round_time: Family::default(),
            tokens_per_s_per_w: Gauge::default(),
            granularity: Gauge::default(),
            bytes: Family::default(),
            rejected: Family::default(),
            registry: Arc::new(Mutex::new(None)),
        };
        let sub = registry.sub_registry_with_prefix("meshtune");
        sub.register("round", "Current outer round", metrics.round.clone());
        sub.register(
            "train_loss",
            "Mean local training loss of the last round",
            metrics.train_loss.clone(),
        );
        sub.register(
            "eval_rouge_l",
            "Eval ROUGE-L F after the last evaluated round",
            metrics.eval_rouge_l.clone(),
        );
        sub.register(
            "eval_loss",
            "Eval loss (mean token cross-entropy) after the last evaluated round",
            metrics.eval_loss.clone(),
        );
        sub.register(
            "round_seconds",
            "Wall time of the last applied round",
            metrics.round_seconds.clone(),
        );
        sub.register(
            "mesh_peers",
            "Connected peers on the delta topic",
            metrics.mesh_peers.clone(),
        );
        sub.register(
            "deltas_used",
            "Deltas combined in the last round",
            metrics.deltas_used.clone(),
        );
        sub.register(
            "final_state_adopted",
            "Times this node adopted the final model most nodes ended on (it had missed part of the last round)",
            metrics.final_state_adopted.clone(),
        );
        sub.register(
            "lineage_merges",
            "Peers first heard on a model this node's rounds did not produce (halves of a split mesh merging)",
            metrics.lineage_merges.clone(),
        );
        sub.register(
            "round_energy_joules",
            "Energy of the last round by phase (compute, comm); absent without a power reader",
            metrics.energy_j.clone(),
        );
        sub.register(
            "tokens_per_s_per_w",
            "Training tokens per second per watt in the last round",
            metrics.tokens_per_s_per_w.clone(),
        );
        sub.register(
            "granularity",
            "G = compute time / communication time of the last round",
            metrics.granularity.clone(),
        );
        sub.register(
            "utilization",
            "Fraction of the last round's wall time the trainer trained",
            metrics.utilization.clone(),
        );
        sub.register(
            "round_time_seconds",
            "The last round's time training (comp), not training (wait), and from publishing to the aggregate (comm)",
            metrics.round_time.clone(),
        );
        sub.register(
            "payload_bytes",
            "Delta and state payload bytes by kind",
            metrics.bytes.clone(),
        );
        sub.register(
            "rejected",
            "Refused manifests and deltas by reason",
            metrics.rejected.clone(),
        );
        metrics
    }

    /// Gives the metrics read access to the finished registry (for [`Self::wire_bytes`]).
    pub fn attach_registry(&self, registry: Arc<Registry>) {
        // The slot holds one pointer, written whole: a poisoned lock still holds a valid one.
        *self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(registry);
    }

    /// Sets the energy gauges from a finished round (unmeasured values are left out).
    pub fn record_energy(&self, energy: &crate::energy::RoundEnergy) {
        for (kind, value) in [("compute", energy.compute_j), ("comm", energy.comm_j)] {
            if let Some(v) = value {
                self.energy_j
                    .get_or_create(&KindLabel { kind: kind.into() })
                    .set(v);
            }
        }
        if let Some(v) = energy.tokens_per_s_per_w {
            self.tokens_per_s_per_w.set(v);
        }
        if let Some(v) = energy.granularity {
            self.granularity.set(v);
        }
    }

    /// Sets the utilization gauges from a finished round.
    pub fn record_timing(&self, timing: &super::record::RoundTiming) {
        if let Some(u) = timing.utilization {
            self.utilization.set(u);
        }
        for (kind, value) in [
            ("comp", timing.t_comp_s),
            ("wait", timing.t_wait_s),
            ("comm", timing.t_comm_s),
        ] {
            if let Some(v) = value {
                self.round_time
                    .get_or_create(&KindLabel { kind: kind.into() })
                    .set(v);
            }
        }
    }

    pub fn bytes(&self, kind: &str, bytes: u64) {
        self.bytes
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc_by(bytes);
    }

    pub fn rejected(&self, reason: &str) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    /// The whole registry in Prometheus text (what `/metrics` serves); empty before
    /// [`Self::attach_registry`].
    pub fn text(&self) -> String {
        let mut text = String::new();
        let slot = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(registry) = slot.as_ref()
            && prometheus_client::encoding::text::encode(&mut text, registry).is_err()
        {
            text.clear();
        }
        text
    }

    /// Bytes received and sent on the wire so far, and received by application protocol.
    pub fn wire_bytes(&self) -> WireBytes {
        wire_bytes_in_text(&self.text())
    }
}

/// Bytes through the node's substreams so far (libp2p's transport counters), and the inbound
/// ones by application protocol (`meshtune_wire_bytes_total`, see
/// [`meshtune_net::wire`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WireBytes {
    pub inbound: u64,
    pub outbound: u64,
    pub inbound_by_protocol: BTreeMap<String, u64>,
}

impl WireBytes {
    /// What came and went after `start` was taken.
    pub fn since(&self, start: &WireBytes) -> WireBytes {
        WireBytes {
            inbound: self.inbound.saturating_sub(start.inbound),
            outbound: self.outbound.saturating_sub(start.outbound),
            inbound_by_protocol: self
                .inbound_by_protocol
                .iter()
                .map(|(p, n)| {
                    let before = start.inbound_by_protocol.get(p).copied().unwrap_or(0);
                    (p.clone(), n.saturating_sub(before))
                })
                .filter(|(_, n)| *n > 0)
                .collect(),
        }
    }
}

/// Reads `libp2p_bandwidth_bytes_total` (summed by direction) and the inbound
/// `meshtune_wire_bytes_total` by protocol from Prometheus text.
pub fn wire_bytes_in_text(text: &str) -> WireBytes {
    let mut wire = WireBytes::default();
    for line in text.lines() {
        let Some(value) = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
        else {
            continue;
        };
        if line.starts_with("libp2p_bandwidth_bytes_total{") {
            if line.contains("direction=\"Inbound\"") {
                wire.inbound += value;
            } else if line.contains("direction=\"Outbound\"") {
                wire.outbound += value;
            }
        } else if line.starts_with("meshtune_wire_bytes_total{")
            && line.contains("direction=\"inbound\"")
            && let Some(protocol) = line
                .split_once("protocol=\"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(p, _)| p)
        {
            *wire
                .inbound_by_protocol
                .entry(protocol.to_string())
                .or_default() += value;
        }
    }
    wire
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bandwidth_lines() {
        let text = "# HELP x\nlibp2p_bandwidth_bytes_total{protocols=\"/ip4/tcp\",direction=\"Inbound\"} 120\n\
                    libp2p_bandwidth_bytes_total{protocols=\"/ip4/udp/quic-v1\",direction=\"Inbound\"} 30\n\
                    libp2p_bandwidth_bytes_total{protocols=\"/ip4/tcp\",direction=\"Outbound\"} 7\n";
        let wire = wire_bytes_in_text(text);
        assert_eq!((wire.inbound, wire.outbound), (150, 7));
    }

    #[test]
    fn parses_bytes_by_protocol_and_takes_differences() {
        let at = |blobs: u64, kad: u64| {
            wire_bytes_in_text(&format!(
                "meshtune_wire_bytes_total{{protocol=\"blobs\",direction=\"inbound\"}} {blobs}\n\
                 meshtune_wire_bytes_total{{protocol=\"blobs\",direction=\"outbound\"}} 999\n\
                 meshtune_wire_bytes_total{{protocol=\"kad\",direction=\"inbound\"}} {kad}\n"
            ))
        };
        let start = at(100, 40);
        assert_eq!(start.inbound_by_protocol["blobs"], 100);
        let round = at(350, 40).since(&start);
        assert_eq!(
            round.inbound_by_protocol,
            BTreeMap::from([("blobs".to_string(), 250)])
        );
    }
}
