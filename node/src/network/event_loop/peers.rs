//! Staying connected and keeping bad peers out: strikes, the operator's deny list, mesh
//! lookups, redials of known and bootstrap peers, and the saved peer table.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use meshtune_net::PeerAddr;

use super::EventLoop;
use crate::network::MAX_STRIKES;
use crate::network::behaviour::SPARSE_LOOKUP_RESULTS;
use crate::network::metrics::NetMetrics;
use crate::network::peer_table::write_peer_table;

/// Shortest time between two lookups of the mesh ([`EventLoop::look_up_mesh`]).
const MESH_LOOKUP_EVERY: Duration = Duration::from_secs(10);

impl EventLoop {
    pub(super) fn strike(&mut self, peer: PeerId, reason: &'static str) {
        let strikes = self.strikes.entry(peer).or_insert(0);
        *strikes += 1;
        let strikes = *strikes;
        tracing::warn!(peer = %peer, reason, strikes, "peer misbehaved");
        NetMetrics::count(&self.net_metrics.strikes, "reason", reason, 1);
        let gossipsub = &mut self.swarm.behaviour_mut().gossipsub;
        gossipsub.set_application_score(&peer, -100.0 * f64::from(strikes));
        if strikes == MAX_STRIKES {
            self.net_metrics.blacklisted.inc();
        }
        if strikes >= MAX_STRIKES {
            tracing::warn!(peer = %peer, strikes, "blacklisting and disconnecting peer");
            gossipsub.blacklist_peer(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Whether a discovered peer is worth a new connection (see `dial_discovered_below`).
    pub(super) fn wants_more_links(&self) -> bool {
        self.config
            .dial_discovered_below
            .is_none_or(|max| self.swarm.connected_peers().count() < max)
    }

    /// Looks the mesh up through the routing table (on joining, and while no mesh peer is
    /// connected). A node that dials every member runs Kademlia's bootstrap, which refreshes
    /// the whole table, each time it is asked. A sparse one wants a few links, which one
    /// lookup of its own id finds for a fraction of the bytes, at most one per
    /// [`MESH_LOOKUP_EVERY`]: a joiner's connection to the bootstrap node and the identify
    /// that follows both ask for one.
    pub(super) fn look_up_mesh(&mut self) {
        if self.config.dial_discovered_below.is_none() {
            let _ = self.swarm.behaviour_mut().kademlia.bootstrap();
            return;
        }
        let now = Instant::now();
        if self
            .last_mesh_lookup
            .is_some_and(|at| now.duration_since(at) < MESH_LOOKUP_EVERY)
        {
            return;
        }
        let me = *self.swarm.local_peer_id();
        let known: usize = self
            .swarm
            .behaviour_mut()
            .kademlia
            .kbuckets()
            .map(|b| b.num_entries())
            .sum();
        // With an empty table a lookup would end at once, finding nothing.
        if known > 0 {
            self.look_up(me);
            self.last_mesh_lookup = Some(now);
        }
    }

    /// A lookup of `key`'s closest peers (fewer of them on a sparse node).
    pub(super) fn look_up(&mut self, key: PeerId) {
        let kademlia = &mut self.swarm.behaviour_mut().kademlia;
        if self.config.dial_discovered_below.is_some() {
            kademlia.get_n_closest_peers(key, SPARSE_LOOKUP_RESULTS);
        } else {
            kademlia.get_closest_peers(key);
        }
    }

    pub(super) fn is_blacklisted(&self, peer: &PeerId) -> bool {
        self.strikes.get(peer).is_some_and(|s| *s >= MAX_STRIKES) || self.denied.contains(peer)
    }

    /// Saves the peer table; alone, redials the bootstrap nodes; connected to nobody on the
    /// mesh's topic, looks the mesh up; below `target_peers` connections, dials up to 4 peers
    /// from the routing table that are neither connected, blacklisted nor denied.
    pub(super) fn reconnect(&mut self) {
        let connected = self.swarm.connected_peers().count();
        self.save_peer_table();
        if connected == 0 {
            self.redial_bootstrap();
        } else {
            self.bootstrap_redial.connected();
            if self.mesh_peers == 0 {
                // Connected (to a bootstrap or relay node), yet nobody on the mesh's topic:
                // look the mesh up again instead of waiting for the next random walk.
                self.look_up_mesh();
            }
        }
        if connected < self.config.target_peers {
            self.dial_known_peers(connected);
        }
    }

    /// Alone: dials the bootstrap peers again, backing off per peer. Only a redial after a
    /// failed dial is worth a warning; before that the first dial is simply under way.
    fn redial_bootstrap(&mut self) {
        let due = self
            .bootstrap_redial
            .due(&self.config.bootstrap, Instant::now());
        for redial in due {
            let (bootstrap, attempt, retry_in_s) =
                (&redial.peer, redial.attempt, redial.retry_in.as_secs());
            if redial.after_failure {
                tracing::warn!(%bootstrap, attempt, retry_in_s, "no peers: dialing the bootstrap node again (training and checkpoints go on)");
            } else {
                tracing::info!(%bootstrap, attempt, retry_in_s, "no peers yet: dialing the bootstrap node");
            }
            let _ = self.swarm.dial(redial.peer.to_multiaddr());
        }
    }

    fn dial_known_peers(&mut self, connected: usize) {
        let me = *self.swarm.local_peer_id();
        let mut known = Vec::new();
        for bucket in self.swarm.behaviour_mut().kademlia.kbuckets() {
            for entry in bucket.iter() {
                known.push(*entry.node.key.preimage());
            }
        }
        let candidates: Vec<PeerId> = known
            .into_iter()
            .filter(|p| *p != me && !self.swarm.is_connected(p) && !self.is_blacklisted(p))
            .take(4)
            .collect();
        for peer in candidates {
            tracing::debug!(peer = %peer, connected, "dialing a known peer to stay connected");
            let _ = self.swarm.dial(peer);
        }
    }

    /// Writes Kademlia's known peers to `config.peer_table` when they changed.
    fn save_peer_table(&mut self) {
        let Some(path) = self.config.peer_table.clone() else {
            return;
        };
        let me = *self.swarm.local_peer_id();
        let mut peers = Vec::new();
        for bucket in self.swarm.behaviour_mut().kademlia.kbuckets() {
            for entry in bucket.iter() {
                let peer = *entry.node.key.preimage();
                if peer == me {
                    continue;
                }
                for addr in entry.node.value.iter() {
                    peers.push(PeerAddr::new(peer, addr.clone()).to_string());
                }
            }
        }
        for bootstrap in &self.config.bootstrap {
            peers.push(bootstrap.to_string());
        }
        peers.sort();
        peers.dedup();
        if peers == self.saved_peers {
            return;
        }
        match write_peer_table(&path, &peers) {
            Ok(()) => self.saved_peers = peers,
            Err(err) => {
                tracing::warn!(file = %path.display(), error = %err, "cannot save the peer table");
            }
        }
    }

    pub(super) fn set_denied(&mut self, peers: HashSet<PeerId>) {
        let added: Vec<PeerId> = peers.difference(&self.denied).copied().collect();
        let removed: Vec<PeerId> = self.denied.difference(&peers).copied().collect();
        for peer in &added {
            self.swarm.behaviour_mut().denied.block_peer(*peer);
            self.swarm.behaviour_mut().gossipsub.blacklist_peer(peer);
        }
        for peer in &removed {
            self.swarm.behaviour_mut().denied.unblock_peer(*peer);
            if self.strikes.get(peer).is_none_or(|s| *s < MAX_STRIKES) {
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .remove_blacklisted_peer(peer);
            }
        }
        if !added.is_empty() || !removed.is_empty() {
            tracing::info!(
                denied = peers.len(),
                added = added.len(),
                removed = removed.len(),
                "deny list updated"
            );
        }
        self.denied = peers;
        // Peers that left the list are dialed again at once.
        for peer in removed {
            if !self.swarm.is_connected(&peer) {
                let _ = self.swarm.dial(peer);
            }
        }
        self.update_mesh_peers();
    }
}
