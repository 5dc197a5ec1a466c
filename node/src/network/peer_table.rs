//! The peers a node remembers across restarts (`peers.json`) and how it redials its
//! bootstrap nodes while it has no peer.
//!
//! Owns: the file format (a JSON array of `/…/p2p/<id>` strings, written atomically) and the
//! redial schedule ([`BootstrapRedial`], time passed in). Must not touch: the swarm (the
//! event loop dials what [`BootstrapRedial::due`] returns and reads Kademlia's table).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use meshtune_net::PeerAddr;

/// Wait before the `attempt`-th redial of an unreachable bootstrap node: 5 s doubling to 5 min.
pub fn bootstrap_backoff(attempt: u32) -> Duration {
    Duration::from_secs(
        5u64.saturating_mul(1 << attempt.saturating_sub(1).min(6))
            .min(300),
    )
}

/// The peers saved by a previous run; a missing or unreadable file is an empty table (with a
/// warning for a corrupt one: the node still starts from its bootstrap addresses).
pub fn load_peer_table(path: &Path) -> Vec<PeerAddr> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    match serde_json::from_slice::<Vec<String>>(&bytes) {
        Ok(entries) => entries
            .iter()
            .filter_map(|e| match e.parse::<PeerAddr>() {
                Ok(peer) => Some(peer),
                Err(err) => {
                    tracing::warn!(file = %path.display(), entry = e, error = %err, "skipping a bad peer table entry");
                    None
                }
            })
            .collect(),
        Err(err) => {
            tracing::warn!(file = %path.display(), error = %err, "ignoring a corrupt peer table");
            Vec::new()
        }
    }
}

/// Writes `peers` (sorted `/…/p2p/<id>` strings) to `path` atomically: a temporary file,
/// then a rename.
pub(crate) fn write_peer_table(path: &Path, peers: &[String]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec_pretty(peers).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// One redial of a bootstrap node that [`BootstrapRedial::due`] asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Redial {
    pub(crate) peer: PeerAddr,
    pub(crate) attempt: u32,
    pub(crate) retry_in: Duration,
    /// Whether a dial of this bootstrap node has failed since the node last had a peer: only
    /// then is being alone worth a warning (at start the first dial is simply under way).
    pub(crate) after_failure: bool,
}

/// Per bootstrap node: redials so far, when the next one is due, and whether a dial failed.
#[derive(Debug, Default)]
pub(crate) struct BootstrapRedial {
    state: HashMap<PeerId, RedialState>,
}

#[derive(Debug)]
struct RedialState {
    attempts: u32,
    next: Instant,
    failed: bool,
}

impl BootstrapRedial {
    /// While the node has no peer: the bootstrap nodes to dial again at `now`, each backing
    /// off by [`bootstrap_backoff`].
    pub(crate) fn due(&mut self, bootstrap: &[PeerAddr], now: Instant) -> Vec<Redial> {
        let mut redials = Vec::new();
        for peer in bootstrap {
            let state = self.state.entry(peer.peer_id).or_insert(RedialState {
                attempts: 0,
                next: now,
                failed: false,
            });
            if now < state.next {
                continue;
            }
            state.attempts += 1;
            let retry_in = bootstrap_backoff(state.attempts);
            state.next = now + retry_in;
            redials.push(Redial {
                peer: peer.clone(),
                attempt: state.attempts,
                retry_in,
                after_failure: state.failed,
            });
        }
        redials
    }

    /// A dial of `peer` (a bootstrap node) failed.
    pub(crate) fn failed(&mut self, peer: PeerId) {
        self.state
            .entry(peer)
            .or_insert(RedialState {
                attempts: 0,
                next: Instant::now(),
                failed: true,
            })
            .failed = true;
    }

    /// The node has peers again: the next time it is alone starts afresh.
    pub(crate) fn connected(&mut self) {
        self.state.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_redials_back_off_to_five_minutes() {
        let waits: Vec<u64> = (1..=9).map(|a| bootstrap_backoff(a).as_secs()).collect();
        assert_eq!(waits, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    /// The first dial of a bootstrap node is no failure; only a redial after a failed dial
    /// is (what the event loop logs at warn level). A node that had peers starts afresh.
    #[test]
    fn a_redial_counts_as_after_a_failure_only_once_a_dial_failed() {
        let bootstrap = vec![PeerAddr::new(
            PeerId::random(),
            "/ip4/10.0.0.1/tcp/4001".parse().expect("addr"),
        )];
        let start = Instant::now();
        let mut redial = BootstrapRedial::default();
        let first = redial.due(&bootstrap, start);
        assert_eq!(first.len(), 1);
        assert!(!first[0].after_failure, "nothing failed yet");
        assert_eq!((first[0].attempt, first[0].retry_in.as_secs()), (1, 5));
        assert!(redial.due(&bootstrap, start).is_empty(), "backing off");
        redial.failed(bootstrap[0].peer_id);
        let second = redial.due(&bootstrap, start + Duration::from_secs(5));
        assert_eq!(second.len(), 1);
        assert!(second[0].after_failure);
        assert_eq!((second[0].attempt, second[0].retry_in.as_secs()), (2, 10));
        redial.connected();
        let later = redial.due(&bootstrap, start + Duration::from_secs(6));
        assert_eq!((later[0].attempt, later[0].after_failure), (1, false));
    }

    #[test]
    fn a_missing_or_corrupt_peer_table_is_empty_and_bad_entries_are_skipped() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("peers.json");
        assert!(load_peer_table(&path).is_empty());
        std::fs::write(&path, b"{not json").expect("write");
        assert!(load_peer_table(&path).is_empty());
        let good = PeerAddr::new(
            PeerId::random(),
            "/ip4/10.0.0.7/tcp/4001".parse().expect("addr"),
        );
        std::fs::write(
            &path,
            serde_json::to_vec(&vec![good.to_string(), "/ip4/1.2.3.4/tcp/1".to_owned()])
                .expect("json"),
        )
        .expect("write");
        assert_eq!(load_peer_table(&path), vec![good]);
    }

    #[test]
    fn a_written_table_loads_back() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("peers.json");
        let peer = PeerAddr::new(
            PeerId::random(),
            "/ip4/10.0.0.8/tcp/4001".parse().expect("addr"),
        );
        write_peer_table(&path, &[peer.to_string()]).expect("write");
        assert_eq!(load_peer_table(&path), vec![peer]);
        assert!(!path.with_extension("tmp").exists());
    }
}
