//! The coordinator's side of the network's event channel. The swarm never waits on a full
//! channel: every wait of the coordinator (for peers, for a state, for the final models)
//! drains it, and what a later stage needs is kept for it: manifests and mesh-size changes
//! that arrive before the round machine exists are replayed to it.
//!
//! Owns: the receiver and the kept events. Must not touch: rounds; manifests it does not keep
//! are reported `Ignore` (neither forwarded nor penalised).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libp2p::gossipsub::MessageAcceptance;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::network::store::BlobStore;
use crate::network::store::lock as lock_store;
use crate::network::{Client, NetworkEvent};

/// What a wait does with the events that arrive meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Kept for the round machine, in order.
    All,
    /// Dropped: manifests are reported `Ignore` (after the last round, or in sparse gossip,
    /// none can be used); the mesh's size is tracked in [`Inbox::mesh_peers`].
    Nothing,
}

/// The event channel plus the events kept for later.
pub struct Inbox {
    events: mpsc::Receiver<NetworkEvent>,
    kept: VecDeque<NetworkEvent>,
    client: Client,
    /// Connected peers of this mesh, as last reported.
    pub mesh_peers: usize,
}

impl Inbox {
    pub fn new(events: mpsc::Receiver<NetworkEvent>, client: Client) -> Self {
        Self {
            events,
            kept: VecDeque::new(),
            client,
            mesh_peers: 0,
        }
    }

    /// The next event: the kept ones first; `None` when the network stopped.
    pub async fn next(&mut self) -> Option<NetworkEvent> {
        match self.kept.pop_front() {
            Some(event) => Some(event),
            None => self.events.recv().await,
        }
    }

    /// Keeps only the kept events `keep` accepts; the others' manifests are reported `Ignore`.
    pub async fn retain_kept(&mut self, mut keep: impl FnMut(&NetworkEvent) -> bool) {
        let mut kept = VecDeque::with_capacity(self.kept.len());
        for event in std::mem::take(&mut self.kept) {
            if keep(&event) {
                kept.push_back(event);
            } else {
                self.ignore(event).await;
            }
        }
        self.kept = kept;
    }

    /// Waits (at most `timeout`) until `want` mesh peers are connected; manifests that arrive
    /// meanwhile (a mesh already running) are kept. Returns the peers connected then.
    pub async fn wait_for_peers(
        &mut self,
        want: usize,
        timeout: Duration,
        shutdown: &CancellationToken,
    ) -> usize {
        let until = tokio::time::Instant::now() + timeout;
        tracing::info!(want, "waiting for mesh peers");
        while self.mesh_peers < want {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(until) => {
                    tracing::warn!(have = self.mesh_peers, want, "starting with fewer mesh peers than wanted");
                    break;
                }
                event = self.events.recv() => match event {
                    Some(NetworkEvent::MeshPeers(n)) => self.mesh_peers = n,
                    Some(manifest @ NetworkEvent::Manifest { .. }) => self.kept.push_back(manifest),
                    Some(NetworkEvent::Listening(_)) => {}
                    None => break,
                },
            }
        }
        self.mesh_peers
    }

    /// Runs `work` while draining events (see [`Keep`]); `None` when `shutdown` fires or the
    /// network stops first.
    pub async fn drain_while<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
        keep: Keep,
        shutdown: &CancellationToken,
    ) -> Option<T> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return None,
                out = &mut work => return Some(out),
                event = self.events.recv() => match (event?, keep) {
                    (NetworkEvent::Listening(_), _) => {}
                    (NetworkEvent::MeshPeers(n), Keep::Nothing) => self.mesh_peers = n,
                    (event, Keep::All) => self.kept.push_back(event),
                    (event, Keep::Nothing) => self.ignore(event).await,
                }
            }
        }
    }

    /// Reports a manifest nobody will judge as `Ignore`; other events need no answer.
    pub async fn ignore(&self, event: NetworkEvent) {
        if let NetworkEvent::Manifest {
            message_id, source, ..
        } = event
        {
            let _ = self
                .client
                .report_manifest(message_id, source, MessageAcceptance::Ignore)
                .await;
        }
    }
}

/// Serves blobs until no peer fetched anything for `quiet` (at most `max`), draining network
/// events so the swarm never waits on a full channel.
pub async fn linger(
    store: &Mutex<BlobStore>,
    inbox: &mut Inbox,
    shutdown: &CancellationToken,
    quiet: Duration,
    max: Duration,
) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tracing::info!(
        quiet_s = quiet.as_secs_f64(),
        "last round applied; serving blobs while peers still fetch"
    );
    loop {
        let last = lock_store(store)
            .ok()
            .and_then(|s| s.last_served())
            .map_or(start, |t| t.max(start));
        let now = Instant::now();
        if now.duration_since(last) >= quiet || now.duration_since(start) >= max {
            break;
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
            event = inbox.next() => match event {
                None => break,
                Some(event) => inbox.ignore(event).await,
            },
        }
    }
    tracing::info!(
        seconds = start.elapsed().as_secs_f64(),
        "stopped serving: peers stopped fetching"
    );
}

/// Sleeps until `deadline`, or forever without one.
pub async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
