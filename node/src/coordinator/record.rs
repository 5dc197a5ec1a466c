//! What a node writes about its rounds: one [`RoundRecord`] per applied round (or catch-up) in
//! `OUT/rounds.jsonl`, appended and fsynced, rewritten atomically when the last record changes.
//!
//! Owns: the record's fields and the file's format. Must not touch: rounds or the network.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::PeerId;
use meshtune_protocol::ModelHash;
use serde::{Deserialize, Serialize};

use super::metrics::WireBytes;
use crate::averaging::overlap::Busy;
use crate::energy::RoundEnergy;
use crate::trainer::{EvalReport, TrainReport};

/// What one applied round did, as written to `rounds.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoundRecord {
    pub round: u64,
    pub peer_id: String,
    pub train_loss: Option<f64>,
    pub train_samples: u64,
    pub eval_loss: Option<f64>,
    pub rouge_l: Option<f64>,
    /// Deltas combined (own included).
    pub deltas: usize,
    pub mesh_peers: usize,
    /// Size of this node's encoded delta.
    pub delta_bytes: u64,
    /// Size of the same delta as raw f32.
    pub raw_delta_bytes: u64,
    /// Blob payload this node pulled from peers this round.
    pub payload_in: u64,
    /// Bytes through substreams this round (all protocols; noise and yamux framing not counted).
    pub wire_in: u64,
    pub wire_out: u64,
    /// `wire_in / payload_in` (1.0 is the ideal of receiving each needed byte once).
    pub amplification: Option<f64>,
    /// `wire_in` by application protocol (`blobs`, `kad`, `identify`, `ping`, `gossipsub`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub wire_in_by_protocol: BTreeMap<String, u64>,
    pub seconds_train: f64,
    pub seconds_total: f64,
    /// Evaluation time inside `seconds_total`.
    #[serde(default)]
    pub seconds_eval: f64,
    /// The collect deadline in force for this round (adaptive unless configured fixed).
    #[serde(default)]
    pub deadline_s: f64,
    /// Training tokens (source + target, no padding).
    #[serde(default)]
    pub tokens: u64,
    /// Compute vs communication energy, tokens/s/W and granularity G.
    #[serde(default, flatten)]
    pub energy: RoundEnergy,
    /// Compute utilization and where the round's wall time went.
    #[serde(default, flatten)]
    pub timing: RoundTiming,
    pub model_hash: String,
    /// The model the round's deltas were applied to.
    #[serde(default)]
    pub base_hash: String,
    /// Peer ids whose deltas were combined (this node's own included), sorted.
    #[serde(default)]
    pub contributors: Vec<String>,
    /// Resident memory of the node process after the round (Linux), and its peak so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    pub rejected: BTreeMap<String, u64>,
    /// Last round only: the peer whose final state this node adopted after the round (it had
    /// missed part of it); `model_hash` is then the adopted model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted_final_state: Option<String>,
    /// The peer whose state this node adopted instead of taking part in the rounds since its
    /// previous record (it was down, or fell too far behind): the record of a catch-up, not of
    /// a round this node trained or aggregated, so it has no loss, deltas or base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_from: Option<String>,
}

/// Where a round's wall time went. The window is from the previous record to this one, so
/// an overlapped node's training of the next round during this round's exchange counts here.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct RoundTiming {
    /// `t_comp_s / (t_comp_s + t_wait_s)`: the fraction of the window the trainer trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization: Option<f64>,
    /// Seconds the trainer trained in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t_comp_s: Option<f64>,
    /// Seconds it did not (waiting for deltas, encoding, evaluating, checkpointing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t_wait_s: Option<f64>,
    /// Seconds from announcing this node's delta to the round's aggregate being applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t_comm_s: Option<f64>,
}

impl RoundTiming {
    /// The timing of a window of `busy`, whose exchange started at `published`.
    pub fn new(busy: Busy, published: Option<std::time::Instant>) -> Self {
        Self {
            utilization: Some(busy.utilization()),
            t_comp_s: Some(busy.busy.as_secs_f64()),
            t_wait_s: Some(busy.idle().as_secs_f64()),
            t_comm_s: published.map(|at| at.elapsed().as_secs_f64()),
        }
    }
}

impl RoundRecord {
    /// A record of `round` by `me` ending on `hash`, with nothing trained, pulled or
    /// combined yet: the caller fills in what the round did. Memory is read now.
    pub fn empty(round: u64, me: PeerId, hash: ModelHash) -> Self {
        RoundRecord {
            round,
            peer_id: me.to_string(),
            train_loss: None,
            train_samples: 0,
            eval_loss: None,
            rouge_l: None,
            deltas: 0,
            mesh_peers: 0,
            delta_bytes: 0,
            raw_delta_bytes: 0,
            payload_in: 0,
            wire_in: 0,
            wire_out: 0,
            amplification: None,
            wire_in_by_protocol: BTreeMap::new(),
            seconds_train: 0.0,
            seconds_total: 0.0,
            seconds_eval: 0.0,
            deadline_s: 0.0,
            tokens: 0,
            energy: RoundEnergy::default(),
            timing: RoundTiming::default(),
            model_hash: hash.to_string(),
            base_hash: String::new(),
            contributors: Vec::new(),
            rss_bytes: process_memory("VmRSS:"),
            peak_rss_bytes: process_memory("VmHWM:"),
            rejected: BTreeMap::new(),
            adopted_final_state: None,
            synced_from: None,
        }
    }

    /// The record of adopting `peer`'s state after `round`: `hash` is the adopted model.
    pub fn synced(
        round: u64,
        me: PeerId,
        peer: PeerId,
        hash: ModelHash,
        mesh_peers: usize,
    ) -> Self {
        RoundRecord {
            mesh_peers,
            synced_from: Some(peer.to_string()),
            ..RoundRecord::empty(round, me, hash)
        }
    }
}

/// What every round did, whichever machine ran it: training, evaluation, traffic and time.
pub struct RoundWork {
    /// `None` when this node trained nothing in the round.
    pub report: Option<TrainReport>,
    pub eval: Option<EvalReport>,
    /// Wire bytes since the round started.
    pub wire: WireBytes,
    /// Blob payload pulled from peers.
    pub payload_in: u64,
    pub seconds_total: f64,
    /// Joules the whole round took, when a power reader measures them.
    pub round_j: Option<f64>,
}

impl RoundRecord {
    /// The record of `round` from what it did; the caller adds what its machine knows
    /// (deltas, peers, bytes of its own delta, deadline, base, contributors).
    pub fn of_work(round: u64, me: PeerId, hash: ModelHash, work: RoundWork) -> Self {
        let RoundWork {
            report,
            eval,
            wire,
            payload_in,
            seconds_total,
            round_j,
        } = work;
        let report = report.unwrap_or(TrainReport {
            steps: 0,
            samples: 0,
            loss: f64::NAN,
            seconds: 0.0,
            tokens: 0,
            energy_j: None,
        });
        let seconds_eval = eval.map_or(0.0, |e| e.seconds);
        let comm_j = round_j.zip(report.energy_j).map(|(total, compute)| {
            (total - compute - eval.and_then(|e| e.energy_j).unwrap_or(0.0)).max(0.0)
        });
        RoundRecord {
            train_loss: report.loss.is_finite().then_some(report.loss),
            train_samples: report.samples,
            eval_loss: eval.map(|e| e.loss),
            rouge_l: eval.map(|e| e.rouge_l),
            payload_in,
            wire_in: wire.inbound,
            wire_out: wire.outbound,
            amplification: (payload_in > 0).then(|| wire.inbound as f64 / payload_in as f64),
            wire_in_by_protocol: wire.inbound_by_protocol,
            seconds_train: report.seconds,
            seconds_total,
            seconds_eval,
            tokens: report.tokens,
            energy: RoundEnergy::new(
                report.tokens,
                report.seconds,
                (seconds_total - report.seconds - seconds_eval).max(0.0),
                report.energy_j,
                comm_j,
            ),
            ..RoundRecord::empty(round, me, hash)
        }
    }
}

/// Reading or writing `rounds.jsonl` failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding a round record: {0}")]
    Encode(#[from] serde_json::Error),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> RecordError + '_ {
    move |source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The records of rounds before `before_round` in `path` (none when the file is missing);
/// lines that do not parse (a torn last line after a crash) are skipped.
pub fn read_records(path: &Path, before_round: u64) -> Vec<RoundRecord> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &RoundRecord| r.round < before_round)
        .collect()
}

/// Appends `record` to `path` and syncs it to disk.
pub fn append_record(path: &Path, record: &RoundRecord) -> Result<(), RecordError> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_error(path))?;
    writeln!(file, "{}", serde_json::to_string(record)?).map_err(io_error(path))?;
    file.sync_data().map_err(io_error(path))
}

/// Replaces `path` with `records` (atomically: temporary file, then rename).
pub fn rewrite_records(path: &Path, records: &[RoundRecord]) -> Result<(), RecordError> {
    let mut text = String::new();
    for record in records {
        text.push_str(&serde_json::to_string(record)?);
        text.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, text).map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

/// A memory figure of this process from `/proc/self/status` (`VmRSS:`, `VmHWM:`, ...), in bytes;
/// `None` where there is no procfs.
pub fn process_memory(field: &str) -> Option<u64> {
    let kib: u64 = std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rounds.jsonl");
        let me = PeerId::random();
        let hash = ModelHash([3; 32]);
        for round in 0..3 {
            append_record(&path, &RoundRecord::empty(round, me, hash)).expect("append");
        }
        let mut text = std::fs::read_to_string(&path).expect("read");
        text.push_str("{\"round\": 3, \"peer");
        std::fs::write(&path, text).expect("write");
        let records = read_records(&path, 2);
        assert_eq!(records.iter().map(|r| r.round).collect::<Vec<_>>(), [0, 1]);
        let mut all = read_records(&path, u64::MAX);
        assert_eq!(all.len(), 3);
        all[2].adopted_final_state = Some("peer".into());
        rewrite_records(&path, &all).expect("rewrite");
        assert_eq!(read_records(&path, u64::MAX), all);
        let missing = dir.path().join("none").join("rounds.jsonl");
        assert!(matches!(
            append_record(&missing, &all[0]),
            Err(RecordError::Io { ref path, .. }) if *path == missing
        ));
    }
}
