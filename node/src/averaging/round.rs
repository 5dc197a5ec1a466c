//! The gossip-averaging round as a pure state machine: [`RoundMachine::handle`] takes an
//! [`Input`] and the current time and returns [`Action`]s. No I/O, no clocks, no channels;
//! the node's coordinator performs the actions and feeds back what happened. Tests drive it
//! with simulated time.
//!
//! One round `r` from base model `B_r` (hash `H_r`):
//! 1. [`Action::Train`] `r` from `H_r`; the coordinator trains K steps, encodes and publishes
//!    the delta, and reports [`Input::LocalDeltaPublished`].
//! 2. Every peer manifest of round `r` becomes an [`Action::Fetch`]; the coordinator pulls,
//!    verifies and decodes the blob and reports [`Input::DeltaReady`] or
//!    [`Input::DeltaFailed`].
//! 3. When the quorum is ready and nothing is in flight, or at the collect deadline with at
//!    least `min_deltas` ready, [`Action::Aggregate`] names the senders whose deltas to combine
//!    (sorted, so that every node with the same set computes the same model).
//! 4. The coordinator applies the aggregate and reports [`Input::RoundApplied`] with the new
//!    base hash; round `r + 1` starts.
//!
//! What arrives at the wrong time, and why:
//! - Deltas of a **past** round are dropped, not down-weighted: the current model already
//!   contains that round's aggregate, so applying one more of its deltas counts that node
//!   twice. One round behind is an honest straggler ([`Verdict::Ignore`]); two or more is a
//!   peer that should have resynchronised first ([`Verdict::Reject`], its score drops).
//! - Deltas of the next `future_window` rounds are fetched at once and kept for their round
//!   (a faster peer is not punished).
//! - Deltas of the current round from another base are used: a delta is a direction, and the
//!   bases differ by at most the previous round's disagreement. But when more peers announce
//!   one other base than share ours, or announce a round beyond the window, this node is the
//!   one that fell behind: [`Action::SyncState`] fetches that peer's state, and the round
//!   restarts from it ([`Input::StateSynced`]). "More" means a majority of the whole mesh
//!   (connected peers and announcers), never of the manifests heard so far, so a hostile
//!   minority that announces a made-up base or a far-future round first cannot make an honest
//!   node adopt its state. Exact halves (a healed partition) are broken by hash: the side
//!   with the larger hash syncs, since adding the same averaged delta to two bases would keep
//!   them apart forever. A mesh of two has no majority to protect it: there the tie rule
//!   decides.
//! - A second, different manifest from one sender for one round is equivocation: rejected.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meshtune_protocol::{BlobHash, ModelHash};

use super::PeerKey;

/// How a round decides it has heard enough.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundConfig {
    /// Fraction of the mesh (connected peers + this node) whose deltas end a round early.
    pub quorum: f64,
    /// Deltas (own included) needed to aggregate at the deadline; below it the round waits
    /// for one more deadline.
    pub min_deltas: usize,
    /// How long after publishing its own delta a node waits for the quorum (the first
    /// rounds' deadline; with `adaptive` set, later ones follow the observed arrivals).
    pub collect_timeout: Duration,
    /// Deadlines that adapt to when peers' deltas actually arrive.
    pub adaptive: Option<AdaptiveDeadline>,
    /// Future rounds whose manifests are kept rather than treated as "I am behind".
    pub future_window: u64,
}

impl Default for RoundConfig {
    fn default() -> Self {
        Self {
            quorum: 1.0,
            min_deltas: 1,
            collect_timeout: Duration::from_secs(60),
            future_window: 1,
            adaptive: Some(AdaptiveDeadline::default()),
        }
    }
}

/// Deadline = `2 x p95 + 2 s` of the recent arrival delays (how long after this node started
/// collecting a peer's delta was ready, or its manifest arrived when it came after the
/// round), bounded by `[min(min, collect_timeout), max]`. A fast LAN stops waiting for a dead peer after seconds; a
/// slow link whose deltas came after the deadline raises it until they fit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveDeadline {
    pub min: Duration,
    pub max: Duration,
}

impl Default for AdaptiveDeadline {
    fn default() -> Self {
        Self {
            min: Duration::from_secs(10),
            max: Duration::from_secs(600),
        }
    }
}

/// Arrival delays remembered for the adaptive deadline.
const ARRIVALS_KEPT: usize = 64;
/// Arrivals needed before the deadline adapts.
const ARRIVALS_NEEDED: usize = 4;

/// What the machine is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Local training of the current round is running.
    Training,
    /// Own delta published; collecting peers' deltas since `since`.
    Collecting { since: Instant },
    /// [`Action::Aggregate`] was issued; waiting for [`Input::RoundApplied`].
    Applying,
    /// [`Action::SyncState`] was issued; waiting for [`Input::StateSynced`] or
    /// [`Input::SyncFailed`].
    Syncing,
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Input<P> {
    /// The coordinator published this node's delta for `round`, trained from `base`.
    LocalDeltaPublished { round: u64, base: ModelHash },
    /// Local training of `round` failed; the round completes on peers' deltas alone.
    LocalTrainingFailed { round: u64 },
    /// Local training of `round` finished while this node was syncing, so its delta was not
    /// announced: after the sync the round is trained again from the adopted (or, if the
    /// sync failed, the current) base.
    LocalDeltaWithheld { round: u64 },
    /// A peer's manifest passed gossip validation.
    ManifestReceived {
        sender: P,
        round: u64,
        base: ModelHash,
        blob: BlobHash,
    },
    /// The delta of `sender` for `round` was fetched, verified and decoded.
    DeltaReady { sender: P, round: u64 },
    /// Fetching or decoding it failed; `bad_data` when the peer sent invalid bytes (as
    /// opposed to timing out).
    DeltaFailed {
        sender: P,
        round: u64,
        bad_data: bool,
    },
    /// Number of connected peers of this mesh.
    PeerCount(usize),
    /// The connected peers of this mesh, by id: the round then knows whether a sender that
    /// was heard from is still among them (a blacklisted or departed sender is not counted
    /// twice when judging the quorum).
    Peers(Vec<P>),
    /// The aggregate of `round` was applied; the new base hashes to `new_base`.
    RoundApplied { round: u64, new_base: ModelHash },
    /// A verified state was adopted: the node is now at the start of `round` on `base`.
    StateSynced { round: u64, base: ModelHash },
    /// The state fetch failed.
    SyncFailed { from: P },
    /// Time passed.
    Tick,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action<P> {
    /// Train round `round` from the model hashing to `base`.
    Train { round: u64, base: ModelHash },
    /// Fetch and decode `sender`'s delta for `round`.
    Fetch { sender: P, round: u64 },
    /// Combine these deltas (`own` first if present, then peers sorted) and apply them.
    Aggregate {
        round: u64,
        own: bool,
        peers: Vec<P>,
    },
    /// Fetch the latest state from `from`, expected at `round` or later.
    SyncState { from: P, round: u64 },
    /// Forget the stored deltas of rounds before `round`.
    Forget { before_round: u64 },
    /// Tell the network how to treat the peer's manifest.
    Judge {
        sender: P,
        round: u64,
        verdict: Verdict,
    },
}

/// The fate of a manifest at gossip validation and in scoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Not forwarded, not penalized.
    Ignore,
    /// Not forwarded; the sender's score drops.
    Reject(RejectReason),
}

/// Why a peer's manifest or delta was refused (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    StaleRound,
    Equivocation,
    BadData,
}

impl RejectReason {
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::StaleRound => "stale_round",
            RejectReason::Equivocation => "equivocation",
            RejectReason::BadData => "bad_data",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fetch {
    /// Beyond the future window when it arrived; fetched once its round is near.
    Deferred,
    InFlight,
    Ready,
    Failed,
}

#[derive(Debug, Clone)]
struct Announced {
    base: ModelHash,
    blob: BlobHash,
    fetch: Fetch,
}

/// The round state machine of one node.
#[derive(Debug)]
pub struct RoundMachine<P> {
    me: P,
    config: RoundConfig,
    round: u64,
    base: ModelHash,
    phase: Phase,
    own_published: bool,
    /// This round's training finished unannounced (see [`Input::LocalDeltaWithheld`]).
    withheld: bool,
    peers: usize,
    /// The connected peers when known ([`Input::Peers`]); empty when only a count is known.
    peer_set: std::collections::BTreeSet<P>,
    /// Manifests by round, then sender.
    announced: BTreeMap<u64, BTreeMap<P, Announced>>,
    /// Recent arrival delays (seconds after collecting started), newest last.
    arrivals: std::collections::VecDeque<f64>,
    /// When the previous round started collecting (late manifests are timed from it).
    previous_since: Option<Instant>,
}

impl<P: PeerKey> RoundMachine<P> {
    /// A node at the start of `round` on `base`; the first action trains it.
    pub fn new(me: P, round: u64, base: ModelHash, config: RoundConfig) -> (Self, Vec<Action<P>>) {
        let machine = Self {
            me,
            config,
            round,
            base,
            phase: Phase::Training,
            own_published: false,
            withheld: false,
            peer_set: std::collections::BTreeSet::new(),
            peers: 0,
            announced: BTreeMap::new(),
            arrivals: std::collections::VecDeque::new(),
            previous_since: None,
        };
        (machine, vec![Action::Train { round, base }])
    }

    pub fn round(&self) -> u64 {
        self.round
    }

    pub fn base(&self) -> ModelHash {
        self.base
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// When the machine next needs a [`Input::Tick`] (the collect deadline), if ever.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Collecting { since } => Some(since + self.collect_window()),
            _ => None,
        }
    }

    /// How long this round collects: the deadline, twice over while a peer's delta is still
    /// being fetched. On a slow link a delta can take longer than the first rounds' deadline;
    /// aggregating without it splits the mesh (each side on another base, then a state sync
    /// over the same slow link). A fetch from a sender that died fails within seconds (its
    /// connection is gone) and ends the wait; a stalled one waits one deadline more at most.
    fn collect_window(&self) -> Duration {
        let fetching = self
            .announced
            .get(&self.round)
            .is_some_and(|m| m.values().any(|a| a.fetch == Fetch::InFlight));
        self.collect_timeout() * if fetching { 2 } else { 1 }
    }

    /// The deadline for collecting now: fixed, or adapted to recent arrivals.
    pub fn collect_timeout(&self) -> Duration {
        let Some(bounds) = self.config.adaptive else {
            return self.config.collect_timeout;
        };
        if self.arrivals.len() < ARRIVALS_NEEDED {
            return self.config.collect_timeout;
        }
        let mut sorted: Vec<f64> = self.arrivals.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let p95 = sorted[((sorted.len() as f64 * 0.95).ceil() as usize).clamp(1, sorted.len()) - 1];
        // The configured deadline is also a floor's ceiling: a short `collect_timeout` is not
        // lengthened by a longer default minimum.
        let min = bounds.min.min(self.config.collect_timeout);
        Duration::from_secs_f64(2.0 * p95 + 2.0).clamp(min, bounds.max.max(min))
    }

    fn record_arrival(&mut self, seconds: f64) {
        if self.arrivals.len() == ARRIVALS_KEPT {
            self.arrivals.pop_front();
        }
        self.arrivals.push_back(seconds.max(0.0));
    }

    /// Processes one input.
    pub fn handle(&mut self, now: Instant, input: Input<P>) -> Vec<Action<P>> {
        let mut actions = Vec::new();
        match input {
            Input::LocalDeltaPublished { round, base } => {
                if round == self.round && base == self.base {
                    // Also during a sync: if the sync fails, this delta still counts.
                    self.own_published = true;
                    if self.phase == Phase::Training {
                        self.phase = Phase::Collecting { since: now };
                    }
                }
            }
            Input::LocalDeltaWithheld { round } => {
                if round == self.round && !self.own_published {
                    self.withheld = true;
                }
            }
            Input::LocalTrainingFailed { round } => {
                if round == self.round && self.phase == Phase::Training {
                    self.own_published = false;
                    self.phase = Phase::Collecting { since: now };
                }
            }
            Input::ManifestReceived {
                sender,
                round,
                base,
                blob,
            } => {
                // A manifest of the round this node already closed came after its deadline:
                // remember how late, so the deadline grows for a slow peer.
                if round + 1 == self.round
                    && let Some(since) = self.previous_since
                {
                    self.record_arrival((now - since).as_secs_f64());
                }
                self.on_manifest(sender, round, base, blob, &mut actions);
            }
            Input::DeltaReady { sender, round } => {
                if round == self.round
                    && self
                        .announced
                        .get(&round)
                        .and_then(|r| r.get(&sender))
                        .is_some_and(|a| a.fetch == Fetch::InFlight)
                {
                    // Ready before this node published counts as no wait at all.
                    let delay = match self.phase {
                        Phase::Collecting { since } => (now - since).as_secs_f64(),
                        _ => 0.0,
                    };
                    self.record_arrival(delay);
                }
                self.set_fetch(sender, round, Fetch::Ready);
            }
            Input::DeltaFailed {
                sender,
                round,
                bad_data,
            } => {
                self.set_fetch(sender, round, Fetch::Failed);
                if bad_data {
                    actions.push(Action::Judge {
                        sender,
                        round,
                        verdict: Verdict::Reject(RejectReason::BadData),
                    });
                }
            }
            Input::PeerCount(count) => {
                self.peers = count;
                self.peer_set.clear();
            }
            Input::Peers(peers) => {
                self.peers = peers.len();
                self.peer_set = peers.into_iter().collect();
            }
            Input::RoundApplied { round, new_base } => {
                if round == self.round && self.phase == Phase::Applying {
                    self.start_round(round + 1, new_base, &mut actions);
                }
            }
            Input::StateSynced { round, base } => {
                if self.phase == Phase::Syncing {
                    if round == self.round && self.own_published {
                        // This round's delta is already out (from the old base: peers still
                        // use it as a direction). Training the round again would publish a
                        // second, conflicting manifest: collect on the adopted base instead.
                        self.base = base;
                        self.phase = Phase::Collecting { since: now };
                    } else {
                        self.start_round(round, base, &mut actions);
                    }
                }
            }
            Input::SyncFailed { from } => {
                if self.phase == Phase::Syncing {
                    tracing::warn!(peer = %from, round = self.round, "state sync failed; going on with the current model");
                    // The round's own training was never cancelled: wait for it, or collect if
                    // it already published (retraining would publish a second, conflicting
                    // manifest for the round).
                    if self.own_published {
                        self.phase = Phase::Collecting { since: now };
                    } else if self.withheld {
                        // Its training finished unannounced: train the round again.
                        let (round, base) = (self.round, self.base);
                        self.start_round(round, base, &mut actions);
                    } else {
                        self.phase = Phase::Training;
                    }
                }
            }
            Input::Tick => {}
        }
        self.check_complete(now, &mut actions);
        actions
    }

    fn on_manifest(
        &mut self,
        sender: P,
        round: u64,
        base: ModelHash,
        blob: BlobHash,
        actions: &mut Vec<Action<P>>,
    ) {
        if sender == self.me {
            return;
        }
        let judge = |verdict| Action::Judge {
            sender,
            round,
            verdict,
        };
        if round < self.round {
            let verdict = if round + 1 == self.round {
                Verdict::Ignore
            } else {
                Verdict::Reject(RejectReason::StaleRound)
            };
            actions.push(judge(verdict));
            return;
        }
        if let Some(existing) = self.announced.get(&round).and_then(|r| r.get(&sender)) {
            let verdict = if existing.blob == blob && existing.base == base {
                Verdict::Ignore
            } else {
                Verdict::Reject(RejectReason::Equivocation)
            };
            actions.push(judge(verdict));
            return;
        }
        actions.push(judge(Verdict::Accept));
        let beyond_window = round > self.round + self.config.future_window;
        self.announced.entry(round).or_default().insert(
            sender,
            Announced {
                base,
                blob,
                fetch: if beyond_window {
                    Fetch::Deferred
                } else {
                    Fetch::InFlight
                },
            },
        );
        if beyond_window {
            // One peer far ahead may be lying; half the mesh ahead means we are behind.
            let ahead = self
                .announced
                .range(self.round + self.config.future_window + 1..)
                .flat_map(|(_, m)| m.keys())
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            // A majority of the other peers: a hostile minority cannot pull the node away.
            let needed = self.mesh_size(round).saturating_sub(1) / 2 + 1;
            if self.phase != Phase::Syncing && ahead >= needed {
                tracing::info!(peer = %sender, round, local_round = self.round, "behind the mesh: syncing state");
                self.phase = Phase::Syncing;
                actions.push(Action::SyncState {
                    from: sender,
                    round,
                });
            }
            return;
        }
        actions.push(Action::Fetch { sender, round });
        if round == self.round && self.phase != Phase::Syncing {
            self.check_base_majority(actions);
        }
        // Most of the mesh already announces the next round while this node has not even
        // published the current one: they aggregated it without us (a restart, a long stall).
        // Our delta for it is useless; catch up on their state instead of making them wait.
        if round == self.round + 1 && self.phase == Phase::Training {
            let ahead = self.announced.get(&round).map_or(0, BTreeMap::len);
            if ahead > self.peers / 2 && ahead > 0 {
                tracing::info!(peer = %sender, round, local_round = self.round, ahead, "the mesh moved on without this node: syncing state");
                self.phase = Phase::Syncing;
                actions.push(Action::SyncState {
                    from: sender,
                    round,
                });
            }
        }
    }

    /// The mesh as this round sees it, this node included: the connected peers plus whoever
    /// announced for `round` without being among them (or, when only a count of peers is
    /// known, the larger of that count and the announcers).
    fn mesh_size(&self, round: u64) -> usize {
        let manifests = self.announced.get(&round);
        let others = match manifests {
            Some(m) if !self.peer_set.is_empty() => {
                self.peer_set.len() + m.keys().filter(|p| !self.peer_set.contains(p)).count()
            }
            m => self.peers.max(m.map_or(0, BTreeMap::len)),
        };
        others + 1
    }

    /// A majority of the whole mesh on one other base: we are the odd one out.
    ///
    /// Counted against the whole mesh, not against the manifests heard so far, so the order of
    /// arrival does not matter: a hostile minority announcing a made-up base first can never
    /// make an honest node adopt its state. With no majority anywhere (halves of a healed
    /// partition, a three-way split), once every expected node has announced, the base with
    /// the most nodes wins, ties to the smaller hash, so every node picks the same one and the
    /// mesh ends on one model. That fallback is where a liar can win: only when the honest
    /// nodes are themselves split with no majority (and always in a mesh of two).
    fn check_base_majority(&mut self, actions: &mut Vec<Action<P>>) {
        let Some(manifests) = self.announced.get(&self.round) else {
            return;
        };
        let mesh = self.mesh_size(self.round);
        let mut counts: BTreeMap<ModelHash, (usize, P)> = BTreeMap::new();
        for (peer, a) in manifests {
            counts.entry(a.base).or_insert((0, *peer)).0 += 1;
        }
        let ours = counts.get(&self.base).map_or(0, |c| c.0) + 1;
        // Everyone expected this round has announced: with no majority anywhere (a mesh split
        // three ways, or into halves) every node can compute the same winner, the base most
        // nodes are on, ties to the smaller hash, and the others move to it.
        let complete = manifests.len() + 1 >= mesh;
        let plurality_winner = complete
            && counts
                .iter()
                .map(|(base, (count, _))| (*count + usize::from(*base == self.base), *base))
                .chain(std::iter::once((ours, self.base)))
                .max_by_key(|(count, base)| (*count, std::cmp::Reverse(*base)))
                .is_some_and(|(_, winner)| winner != self.base);
        if let Some((_, (count, peer))) = counts
            .iter()
            .filter(|(base, _)| **base != self.base)
            .max_by_key(|(base, (count, _))| (*count, std::cmp::Reverse(**base)))
            && (*count * 2 > mesh || (plurality_winner && ours * 2 <= mesh))
            && self.phase != Phase::Applying
        {
            tracing::info!(peer = %peer, round = self.round, agreeing = count, "most peers are on another base: syncing state");
            self.phase = Phase::Syncing;
            actions.push(Action::SyncState {
                from: *peer,
                round: self.round,
            });
        }
    }

    fn set_fetch(&mut self, sender: P, round: u64, state: Fetch) {
        if let Some(a) = self
            .announced
            .get_mut(&round)
            .and_then(|r| r.get_mut(&sender))
            && a.fetch == Fetch::InFlight
        {
            a.fetch = state;
        }
    }

    fn start_round(&mut self, round: u64, base: ModelHash, actions: &mut Vec<Action<P>>) {
        self.round = round;
        self.base = base;
        self.phase = Phase::Training;
        self.own_published = false;
        self.withheld = false;
        self.announced = self.announced.split_off(&round);
        actions.push(Action::Forget {
            before_round: round,
        });
        actions.push(Action::Train { round, base });
        let window_end = round + self.config.future_window;
        for (&r, manifests) in self.announced.range_mut(round..=window_end) {
            for (sender, a) in manifests.iter_mut() {
                if a.fetch == Fetch::Deferred {
                    a.fetch = Fetch::InFlight;
                    actions.push(Action::Fetch {
                        sender: *sender,
                        round: r,
                    });
                }
            }
        }
        // Manifests that arrived early for this round may show that we are the odd one out.
        self.check_base_majority(actions);
    }

    fn check_complete(&mut self, now: Instant, actions: &mut Vec<Action<P>>) {
        let Phase::Collecting { since } = self.phase else {
            return;
        };
        let manifests = self.announced.get(&self.round);
        let ready: Vec<P> = manifests
            .map(|m| {
                m.iter()
                    .filter(|(_, a)| a.fetch == Fetch::Ready)
                    .map(|(p, _)| *p)
                    .collect()
            })
            .unwrap_or_default();
        // A sender whose delta failed (bad data, or unavailable after every retry) has been
        // heard from: nothing more will come from it this round, so once everyone is heard
        // a byzantine peer cannot make the honest mesh wait for the deadline.
        let failed = manifests.map_or(0, |m| {
            m.values().filter(|a| a.fetch == Fetch::Failed).count()
        });
        let in_flight = manifests.is_some_and(|m| {
            m.values()
                .any(|a| matches!(a.fetch, Fetch::InFlight | Fetch::Deferred))
        });
        let have = ready.len() + usize::from(self.own_published);
        // Everyone expected this round: the connected peers and whoever announced for it.
        let mesh = self.mesh_size(self.round);
        let wanted = ((self.config.quorum * mesh as f64).ceil() as usize).clamp(1, mesh);
        // A partial quorum counts usable deltas only; a failed sender ends the round early only
        // once everyone expected has been heard from (nothing more can arrive).
        let all_heard =
            have + failed >= mesh && !in_flight && have >= self.config.min_deltas.max(1);
        let quorum_done = (have >= wanted && !in_flight) || all_heard;
        let timeout = self.collect_window();
        let deadline_done = now >= since + timeout && have >= self.config.min_deltas.max(1);
        if quorum_done || deadline_done {
            if deadline_done && !quorum_done {
                tracing::info!(
                    round = self.round,
                    have,
                    wanted,
                    "collect deadline reached: aggregating what arrived"
                );
            }
            self.phase = Phase::Applying;
            self.previous_since = Some(since);
            actions.push(Action::Aggregate {
                round: self.round,
                own: self.own_published,
                peers: ready,
            });
        } else if now >= since + timeout {
            // Too few deltas: wait one more deadline.
            self.phase = Phase::Collecting { since: now };
        }
    }
}

/// After the last round: the model the mesh ended on, seen from a node on `own` that asked its
/// peers for their final states (`peers`: each peer's model hash for the final round).
///
/// The model most nodes hold wins (this node counts too), ties to the smaller hash, the rule
/// [`RoundMachine`] uses for bases, so every node that sees the same reports picks the same
/// model. Returns a peer holding the winner when it is not `own`: this node missed part of
/// the last round (a delta it could not fetch before its sender left) and must adopt that
/// state, since no later round exists to bring it back.
#[must_use]
pub fn final_state_winner<P: PeerKey>(
    own: ModelHash,
    peers: &[(P, ModelHash)],
) -> Option<(P, ModelHash, usize)> {
    let mut counts: BTreeMap<ModelHash, (usize, Option<P>)> = BTreeMap::new();
    counts.insert(own, (1, None));
    for (peer, hash) in peers {
        let entry = counts.entry(*hash).or_insert((0, Some(*peer)));
        entry.0 += 1;
        entry.1.get_or_insert(*peer);
    }
    let (winner, (count, holder)) = counts
        .into_iter()
        .max_by_key(|(hash, (count, _))| (*count, std::cmp::Reverse(*hash)))?;
    if winner == own {
        return None;
    }
    holder.map(|peer| (peer, winner, count))
}

/// Before its first round, a node that asked its mesh peers for their latest states
/// (`(peer, round, model)`) and is at `round`: when most of them are past it (they ran rounds
/// without it), the peer to sync from and its round, the state held by the most peers (ties
/// to the later round, then the smaller hash). A minority ahead is not followed (it may be
/// lying about its round), the same rule as for manifests beyond the window.
#[must_use]
pub fn ahead_majority<P: PeerKey>(round: u64, states: &[(P, u64, ModelHash)]) -> Option<(P, u64)> {
    let ahead: Vec<&(P, u64, ModelHash)> = states.iter().filter(|(_, r, _)| *r > round).collect();
    if ahead.len() * 2 <= states.len() {
        return None;
    }
    let mut counts: BTreeMap<(u64, ModelHash), (usize, P)> = BTreeMap::new();
    for (peer, r, hash) in ahead {
        counts.entry((*r, *hash)).or_insert((0, *peer)).0 += 1;
    }
    counts
        .into_iter()
        .max_by_key(|((r, hash), (count, _))| (*count, *r, std::cmp::Reverse(*hash)))
        .map(|((r, _), (_, peer))| (peer, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::averaging::test_peer::PeerId;

    type Input = super::Input<PeerId>;
    type Action = super::Action<PeerId>;
    type RoundMachine = super::RoundMachine<PeerId>;

    #[test]
    fn a_node_catches_up_only_when_most_peers_are_ahead() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        // Everyone where this node is, or behind: nothing to do.
        assert_eq!(ahead_majority(2, &[(a, 2, hash(1)), (b, 1, hash(2))]), None);
        assert_eq!(ahead_majority::<PeerId>(2, &[]), None);
        // One of three ahead (maybe lying): not followed; half is not a majority either.
        assert_eq!(
            ahead_majority(2, &[(a, 9, hash(1)), (b, 2, hash(2)), (c, 2, hash(2))]),
            None
        );
        assert_eq!(ahead_majority(2, &[(a, 6, hash(1)), (b, 2, hash(2))]), None);
        // The mesh finished while this node was down: the final state, from a peer holding it.
        assert_eq!(
            ahead_majority(2, &[(a, 6, hash(1)), (b, 6, hash(1)), (c, 2, hash(2))]),
            Some((a, 6))
        );
        // A lone peer is the whole mesh (a mesh of two has no majority to protect it).
        assert_eq!(ahead_majority(0, &[(c, 3, hash(4))]), Some((c, 3)));
        // Ahead but split: the state most peers hold, not the furthest one.
        let (d, e) = (PeerId::random(), PeerId::random());
        let split = [
            (a, 7, hash(1)),
            (b, 5, hash(2)),
            (c, 5, hash(2)),
            (d, 5, hash(2)),
            (e, 1, hash(3)),
        ];
        assert_eq!(ahead_majority(1, &split).map(|(_, r)| r), Some(5));
        // Equal counts: the later round.
        assert_eq!(
            ahead_majority(1, &[(a, 4, hash(1)), (b, 5, hash(2))]),
            Some((b, 5))
        );
    }

    fn hash(n: u8) -> ModelHash {
        ModelHash([n; 32])
    }

    fn blob(n: u8) -> BlobHash {
        BlobHash([n; 32])
    }

    fn setup(quorum: f64) -> (RoundMachine, Instant) {
        let now = Instant::now();
        let (machine, actions) = RoundMachine::new(
            PeerId::random(),
            0,
            hash(0),
            RoundConfig {
                quorum,
                min_deltas: 1,
                collect_timeout: Duration::from_secs(10),
                future_window: 1,
                adaptive: None,
            },
        );
        assert_eq!(
            actions,
            vec![Action::Train {
                round: 0,
                base: hash(0)
            }]
        );
        (machine, now)
    }

    fn manifest(sender: PeerId, round: u64, base: u8, b: u8) -> Input {
        Input::ManifestReceived {
            sender,
            round,
            base: hash(base),
            blob: blob(b),
        }
    }

    fn aggregate_of(actions: &[Action]) -> Option<(bool, Vec<PeerId>)> {
        actions.iter().find_map(|a| match a {
            Action::Aggregate { own, peers, .. } => Some((*own, peers.clone())),
            _ => None,
        })
    }

    #[test]
    fn full_round_waits_for_every_peer_then_aggregates_sorted() {
        let (mut m, t0) = setup(1.0);
        let mut peers = [PeerId::random(), PeerId::random()];
        m.handle(t0, Input::PeerCount(2));
        let a = m.handle(t0, manifest(peers[1], 0, 0, 1));
        assert!(a.contains(&Action::Fetch {
            sender: peers[1],
            round: 0
        }));
        m.handle(
            t0,
            Input::LocalDeltaPublished {
                round: 0,
                base: hash(0),
            },
        );
        assert!(matches!(m.phase(), Phase::Collecting { .. }));
        assert!(
            aggregate_of(&m.handle(
                t0,
                Input::DeltaReady {
                    sender: peers[1],
                    round: 0
                }
            ))
            .is_none()
        );
        m.handle(t0, manifest(peers[0], 0, 0, 2));
        let done = m.handle(
            t0,
            Input::DeltaReady {
                sender: peers[0],
                round: 0,
            },
        );
        peers.sort();
        assert_eq!(aggregate_of(&done), Some((true, peers.to_vec())));
        assert_eq!(m.phase(), Phase::Applying);
        let next = m.handle(
            t0,
            Input::RoundApplied {
                round: 0,
                new_base: hash(1),
            },
        );
        assert!(next.contains(&Action::Train {
            round: 1,
            base: hash(1)
        }));
        assert_eq!(m.round(), 1);
    }

    /// Round 0 with `peers` connected, two of which announced: the first one's delta is
    /// ready, the second one's still being fetched, this node's own published.
    fn one_of_two_ready(peers: usize) -> (RoundMachine, Instant, PeerId, PeerId) {
        let (mut m, t0) = setup(1.0);
        let (fast, slow) = (PeerId::random(), PeerId::random());
        m.handle(t0, Input::PeerCount(peers));
        m.handle(t0, manifest(fast, 0, 0, 1));
        m.handle(t0, manifest(slow, 0, 0, 2));
        let base = hash(0);
        m.handle(t0, Input::LocalDeltaPublished { round: 0, base });
        let ready = Input::DeltaReady {
            sender: fast,
            round: 0,
        };
        assert!(aggregate_of(&m.handle(t0, ready)).is_none());
        (m, t0, fast, slow)
    }

    #[test]
    fn deadline_aggregates_what_arrived_and_abandons_slow_fetches() {
        let (mut m, t0, fast, slow) = one_of_two_ready(2);
        // The slow delta is still being fetched: the deadline (10 s) counts twice.
        assert_eq!(m.deadline(), Some(t0 + Duration::from_secs(20)));
        assert!(aggregate_of(&m.handle(t0 + Duration::from_secs(10), Input::Tick)).is_none());
        assert!(aggregate_of(&m.handle(t0 + Duration::from_secs(19), Input::Tick)).is_none());
        let done = m.handle(t0 + Duration::from_secs(20), Input::Tick);
        assert_eq!(aggregate_of(&done), Some((true, vec![fast])));
        // The slow delta arriving now changes nothing.
        let late = Input::DeltaReady {
            sender: slow,
            round: 0,
        };
        assert!(m.handle(t0 + Duration::from_secs(21), late).is_empty());
    }

    #[test]
    fn a_delta_still_arriving_at_the_deadline_is_waited_for_once_more() {
        let (mut m, t0, fast, slow) = one_of_two_ready(2);
        assert!(aggregate_of(&m.handle(t0 + Duration::from_secs(10), Input::Tick)).is_none());
        // It arrives after the deadline, within the second one: the round uses it.
        let ready = Input::DeltaReady {
            sender: slow,
            round: 0,
        };
        let done = m.handle(t0 + Duration::from_secs(15), ready);
        let mut both = vec![fast, slow];
        both.sort();
        assert_eq!(aggregate_of(&done), Some((true, both)));
    }

    #[test]
    fn a_failed_fetch_does_not_extend_the_deadline() {
        let (mut m, t0, fast, dead) = one_of_two_ready(3);
        // The third peer never announced; the dead one's fetch failed (not its fault).
        m.handle(
            t0 + Duration::from_secs(1),
            Input::DeltaFailed {
                sender: dead,
                round: 0,
                bad_data: false,
            },
        );
        assert_eq!(m.deadline(), Some(t0 + Duration::from_secs(10)));
        let done = m.handle(t0 + Duration::from_secs(10), Input::Tick);
        assert_eq!(aggregate_of(&done), Some((true, vec![fast])));
    }

    #[test]
    fn quorum_below_one_finishes_early() {
        let (mut m, t0) = setup(0.5);
        let peers: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        m.handle(t0, Input::PeerCount(3));
        m.handle(
            t0,
            Input::LocalDeltaPublished {
                round: 0,
                base: hash(0),
            },
        );
        m.handle(t0, manifest(peers[0], 0, 0, 1));
        let done = m.handle(
            t0,
            Input::DeltaReady {
                sender: peers[0],
                round: 0,
            },
        );
        assert_eq!(aggregate_of(&done), Some((true, vec![peers[0]])));
    }

    #[test]
    fn stale_rounds_are_ignored_or_rejected_and_future_ones_kept() {
        let (mut m, t0) = setup(1.0);
        let p = PeerId::random();
        // Move to round 2.
        for r in 0..2 {
            m.handle(
                t0,
                Input::LocalDeltaPublished {
                    round: r,
                    base: hash(r as u8),
                },
            );
            m.handle(
                t0,
                Input::RoundApplied {
                    round: r,
                    new_base: hash(r as u8 + 1),
                },
            );
        }
        assert_eq!(m.round(), 2);
        let judged = |actions: Vec<Action>| {
            actions.into_iter().find_map(|a| match a {
                Action::Judge { verdict, .. } => Some(verdict),
                _ => None,
            })
        };
        assert_eq!(
            judged(m.handle(t0, manifest(p, 1, 1, 1))),
            Some(Verdict::Ignore)
        );
        assert_eq!(
            judged(m.handle(t0, manifest(p, 0, 0, 1))),
            Some(Verdict::Reject(RejectReason::StaleRound))
        );
        // Our round-2 delta is out; p is already at round 3 (faster): fetched now, used later.
        m.handle(t0, Input::PeerCount(1));
        m.handle(
            t0,
            Input::LocalDeltaPublished {
                round: 2,
                base: hash(2),
            },
        );
        let a = m.handle(t0, manifest(p, 3, 3, 9));
        assert!(a.contains(&Action::Fetch {
            sender: p,
            round: 3
        }));
        m.handle(
            t0,
            Input::DeltaReady {
                sender: p,
                round: 3,
            },
        );
        // Round 2 waits for p (quorum 1.0 over 2 nodes); at the deadline it goes alone.
        let done = m.handle(t0 + Duration::from_secs(10), Input::Tick);
        assert_eq!(aggregate_of(&done), Some((true, vec![])));
        m.handle(
            t0,
            Input::RoundApplied {
                round: 2,
                new_base: hash(3),
            },
        );
        // Round 3 already has p's delta: done as soon as its own is published.
        let done = m.handle(
            t0,
            Input::LocalDeltaPublished {
                round: 3,
                base: hash(3),
            },
        );
        assert_eq!(aggregate_of(&done), Some((true, vec![p])));
    }

    #[test]
    fn equivocation_is_rejected_and_duplicates_ignored() {
        let (mut m, t0) = setup(1.0);
        let p = PeerId::random();
        m.handle(t0, manifest(p, 0, 0, 1));
        assert!(m.handle(t0, manifest(p, 0, 0, 1)).contains(&Action::Judge {
            sender: p,
            round: 0,
            verdict: Verdict::Ignore
        }));
        assert!(m.handle(t0, manifest(p, 0, 0, 2)).contains(&Action::Judge {
            sender: p,
            round: 0,
            verdict: Verdict::Reject(RejectReason::Equivocation)
        }));
    }

    #[test]
    fn far_future_round_triggers_state_sync_then_training_restarts() {
        let (mut m, t0) = setup(1.0);
        let p = PeerId::random();
        let a = m.handle(t0, manifest(p, 7, 7, 1));
        assert!(a.contains(&Action::SyncState { from: p, round: 7 }));
        assert_eq!(m.phase(), Phase::Syncing);
        // Own training of the old round finishing meanwhile is not published into a round.
        m.handle(
            t0,
            Input::LocalDeltaPublished {
                round: 0,
                base: hash(0),
            },
        );
        assert_eq!(m.phase(), Phase::Syncing);
        let a = m.handle(
            t0,
            Input::StateSynced {
                round: 7,
                base: hash(7),
            },
        );
        assert!(a.contains(&Action::Train {
            round: 7,
            base: hash(7)
        }));
        assert!(a.contains(&Action::Forget { before_round: 7 }));
        // p's round-7 manifest, deferred while it was beyond the window, is fetched now.
        assert!(a.contains(&Action::Fetch {
            sender: p,
            round: 7
        }));
        assert_eq!(m.round(), 7);
    }

    #[test]
    fn one_peer_far_ahead_of_a_larger_mesh_does_not_trigger_sync() {
        let (mut m, t0) = setup(1.0);
        m.handle(t0, Input::PeerCount(4));
        let liar = PeerId::random();
        let a = m.handle(t0, manifest(liar, 1_000_000, 9, 1));
        assert!(!a.iter().any(|x| matches!(x, Action::SyncState { .. })));
        // Two of four other peers are not a majority of them either.
        let other = PeerId::random();
        let a = m.handle(t0, manifest(other, 1_000_000, 9, 2));
        assert!(!a.iter().any(|x| matches!(x, Action::SyncState { .. })));
        let third = PeerId::random();
        let a = m.handle(t0, manifest(third, 1_000_000, 9, 3));
        assert!(a.iter().any(|x| matches!(x, Action::SyncState { .. })));
    }

    #[test]
    fn a_hostile_minority_announcing_a_small_base_first_is_never_adopted() {
        // Four nodes, one hostile: its manifest on base 0 (smaller than ours) arrives before
        // any honest one. Counting against the manifests heard so far would make that a tie
        // (1 vs 1) broken toward the hostile's smaller hash.
        let (mut m, _) = RoundMachine::new(PeerId::random(), 0, hash(9), RoundConfig::default());
        let t0 = Instant::now();
        let (hostile, h1, h2) = (PeerId::random(), PeerId::random(), PeerId::random());
        m.handle(t0, Input::Peers(vec![hostile, h1, h2]));
        let mut actions = m.handle(t0, manifest(hostile, 0, 0, 1));
        actions.extend(m.handle(t0, manifest(h1, 0, 9, 2)));
        actions.extend(m.handle(t0, manifest(h2, 0, 9, 3)));
        assert!(
            !actions
                .iter()
                .any(|x| matches!(x, Action::SyncState { .. })),
            "{actions:?}"
        );
        assert_eq!(m.base(), hash(9));
        // Five nodes, two colluding on base 0 and first: 2 of 5 is no majority.
        let (mut m, _) = RoundMachine::new(PeerId::random(), 0, hash(9), RoundConfig::default());
        let (x, y, h1, h2) = (
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
        );
        m.handle(t0, Input::Peers(vec![x, y, h1, h2]));
        let mut actions = m.handle(t0, manifest(x, 0, 0, 1));
        actions.extend(m.handle(t0, manifest(y, 0, 0, 2)));
        assert!(
            !actions
                .iter()
                .any(|x| matches!(x, Action::SyncState { .. })),
            "{actions:?}"
        );
        // Two liars far ahead of a mesh of five are no majority of the other four.
        let mut actions = m.handle(t0, manifest(x, 50, 0, 3));
        actions.extend(m.handle(t0, manifest(y, 50, 0, 4)));
        assert!(
            !actions
                .iter()
                .any(|x| matches!(x, Action::SyncState { .. })),
            "{actions:?}"
        );
        // Honest peers on our base keep it that way; a real majority elsewhere still moves it.
        let (mut m, _) = RoundMachine::new(PeerId::random(), 0, hash(9), RoundConfig::default());
        m.handle(t0, Input::Peers(vec![x, y, h1, h2]));
        let mut actions = m.handle(t0, manifest(x, 0, 5, 1));
        actions.extend(m.handle(t0, manifest(y, 0, 5, 2)));
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, Action::SyncState { .. }))
        );
        let actions = m.handle(t0, manifest(h1, 0, 5, 3));
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::SyncState { .. }))
        );
    }

    #[test]
    fn failed_sync_keeps_the_published_delta_and_does_not_retrain() {
        let (mut m, t0) = setup(1.0);
        let p = PeerId::random();
        m.handle(t0, manifest(p, 9, 9, 1));
        assert_eq!(m.phase(), Phase::Syncing);
        m.handle(
            t0,
            Input::LocalDeltaPublished {
                round: 0,
                base: hash(0),
            },
        );
        let a = m.handle(t0, Input::SyncFailed { from: p });
        assert!(!a.iter().any(|x| matches!(x, Action::Train { .. })));
        // Alone in the mesh, its own delta is the quorum: straight on to aggregation.
        assert_eq!(aggregate_of(&a), Some((true, vec![])));
    }

    #[test]
    fn syncing_within_the_round_already_published_does_not_retrain() {
        let (mut m, t0) = setup(1.0);
        let (a, b) = (PeerId::random(), PeerId::random());
        m.handle(t0, Input::PeerCount(2));
        m.handle(
            t0,
            Input::LocalDeltaPublished {
                round: 0,
                base: hash(0),
            },
        );
        m.handle(t0, manifest(a, 0, 5, 1));
        let sync = m.handle(t0, manifest(b, 0, 5, 2));
        assert!(sync.iter().any(|x| matches!(x, Action::SyncState { .. })));
        let after = m.handle(
            t0,
            Input::StateSynced {
                round: 0,
                base: hash(5),
            },
        );
        assert!(!after.iter().any(|x| matches!(x, Action::Train { .. })));
        assert_eq!(m.base(), hash(5));
        m.handle(
            t0,
            Input::DeltaReady {
                sender: a,
                round: 0,
            },
        );
        let done = m.handle(
            t0,
            Input::DeltaReady {
                sender: b,
                round: 0,
            },
        );
        assert!(aggregate_of(&done).is_some());
    }

    #[test]
    fn a_mesh_one_round_ahead_of_an_unpublished_round_triggers_sync() {
        let (mut m, t0) = setup(1.0);
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        m.handle(t0, Input::PeerCount(3));
        assert!(
            !m.handle(t0, manifest(a, 1, 1, 1))
                .iter()
                .any(|x| matches!(x, Action::SyncState { .. }))
        );
        let sync = m.handle(t0, manifest(b, 1, 1, 2));
        assert!(
            sync.iter()
                .any(|x| matches!(x, Action::SyncState { round: 1, .. }))
        );
        // After publishing our own delta, peers one round ahead are just faster: no sync.
        let (mut m, t0) = setup(1.0);
        m.handle(t0, Input::PeerCount(3));
        m.handle(
            t0,
            Input::LocalDeltaPublished {
                round: 0,
                base: hash(0),
            },
        );
        m.handle(t0, manifest(a, 1, 1, 1));
        let none = m.handle(t0, manifest(b, 1, 1, 2));
        assert!(!none.iter().any(|x| matches!(x, Action::SyncState { .. })));
        let _ = c;
    }

    #[test]
    fn majority_on_another_base_triggers_sync() {
        let (mut m, t0) = setup(1.0);
        let (a, b) = (PeerId::random(), PeerId::random());
        m.handle(t0, Input::PeerCount(2));
        let first = m.handle(t0, manifest(a, 0, 5, 1));
        assert!(!first.iter().any(|x| matches!(x, Action::SyncState { .. })));
        let second = m.handle(t0, manifest(b, 0, 5, 2));
        assert!(
            second
                .iter()
                .any(|x| matches!(x, Action::SyncState { round: 0, .. }))
        );
    }

    #[test]
    fn a_tie_between_two_bases_moves_only_the_side_with_the_larger_hash() {
        let config = RoundConfig {
            quorum: 1.0,
            min_deltas: 1,
            collect_timeout: Duration::from_secs(10),
            future_window: 1,
            adaptive: None,
        };
        let t0 = Instant::now();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        // Our base 9, one peer with us, two on base 5: the smaller hash wins the tie.
        let (mut larger, _) = RoundMachine::new(PeerId::random(), 0, hash(9), config.clone());
        larger.handle(t0, Input::PeerCount(3));
        let mut actions = larger.handle(t0, manifest(a, 0, 9, 1));
        actions.extend(larger.handle(t0, manifest(b, 0, 5, 2)));
        actions.extend(larger.handle(t0, manifest(c, 0, 5, 3)));
        assert!(
            actions
                .iter()
                .any(|x| matches!(x, Action::SyncState { round: 0, .. })),
            "{actions:?}"
        );
        // The same split seen from the side with the smaller hash: it stays.
        let (mut smaller, _) = RoundMachine::new(PeerId::random(), 0, hash(0), config);
        smaller.handle(t0, Input::PeerCount(3));
        let mut actions = smaller.handle(t0, manifest(a, 0, 0, 1));
        actions.extend(smaller.handle(t0, manifest(b, 0, 5, 2)));
        actions.extend(smaller.handle(t0, manifest(c, 0, 5, 3)));
        assert!(
            !actions
                .iter()
                .any(|x| matches!(x, Action::SyncState { .. })),
            "{actions:?}"
        );
    }

    /// One round where `ready` peers' deltas are ready `after` publishing and the other
    /// peers' fetches fail then (`fail_rest`; else they stay in flight); returns the time the
    /// round aggregated (ticking each second until it does).
    fn timed_round(
        m: &mut RoundMachine,
        start: Instant,
        (peers, ready): (&[PeerId], &[PeerId]),
        after: Duration,
        fail_rest: bool,
    ) -> Instant {
        let round = m.round();
        let base = m.base();
        m.handle(start, Input::LocalDeltaPublished { round, base });
        for (k, p) in peers.iter().enumerate() {
            m.handle(
                start,
                Input::ManifestReceived {
                    sender: *p,
                    round,
                    base,
                    blob: blob(100 + k as u8 + 10 * round as u8),
                },
            );
        }
        let mut now = start + after;
        for p in ready {
            if let Some(agg) = aggregate_of(&m.handle(now, Input::DeltaReady { sender: *p, round }))
            {
                assert_eq!(agg.1.len(), ready.len());
            }
        }
        for p in peers.iter().filter(|p| fail_rest && !ready.contains(p)) {
            let sender = *p;
            let failed = Input::DeltaFailed {
                sender,
                round,
                bad_data: false,
            };
            m.handle(now, failed);
        }
        while m.phase() != Phase::Applying {
            now += Duration::from_secs(1);
            m.handle(now, Input::Tick);
            assert!(now < start + Duration::from_secs(1000), "never aggregated");
        }
        m.handle(
            now,
            Input::RoundApplied {
                round,
                new_base: hash(round as u8 + 1),
            },
        );
        now
    }

    #[test]
    fn the_deadline_adapts_to_observed_arrivals() {
        let config = RoundConfig {
            quorum: 1.0,
            min_deltas: 1,
            collect_timeout: Duration::from_secs(30),
            future_window: 1,
            adaptive: Some(AdaptiveDeadline {
                min: Duration::from_secs(5),
                max: Duration::from_secs(120),
            }),
        };
        let (a, b) = (PeerId::random(), PeerId::random());
        // A fast LAN: deltas ready 0.3 s after publishing. After two rounds (four arrivals)
        // the deadline drops from 30 s to its 5 s floor, so a peer that died costs 5 s.
        let (mut m, _) = RoundMachine::new(PeerId::random(), 0, hash(0), config.clone());
        m.handle(Instant::now(), Input::Peers(vec![a, b]));
        assert_eq!(m.collect_timeout(), Duration::from_secs(30));
        let mut now = Instant::now();
        for _ in 0..2 {
            now = timed_round(
                &mut m,
                now,
                (&[a, b], &[a, b]),
                Duration::from_millis(300),
                true,
            );
        }
        assert_eq!(m.collect_timeout(), Duration::from_secs(5));
        let start = now;
        // b died before announcing: the round waits out the deadline.
        let done = timed_round(
            &mut m,
            start,
            (&[a], &[a]),
            Duration::from_millis(300),
            true,
        );
        let waited = done - start;
        assert!(
            waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
            "a dead peer held the round {waited:?}"
        );
        // b died after announcing: its fetch fails (its connection is gone) and everyone has
        // been heard, so the round ends then.
        let start = done;
        let done = timed_round(
            &mut m,
            start,
            (&[a, b], &[a]),
            Duration::from_millis(300),
            true,
        );
        assert_eq!(done - start, Duration::from_millis(300));
        // A peer whose delta is still coming at the deadline is waited for one deadline more.
        let start = done;
        let done = timed_round(
            &mut m,
            start,
            (&[a, b], &[a]),
            Duration::from_millis(300),
            false,
        );
        let waited = done - start;
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
            "a fetch in flight held the round {waited:?}"
        );

        // A slow link: b's manifests come 40 s after this node started collecting, after the
        // 30 s deadline. Recorded as late arrivals, they raise the deadline (2 x p95 + 2 s)
        // until b fits: 82 s, bounded by the 120 s ceiling.
        let (mut m, _) = RoundMachine::new(PeerId::random(), 0, hash(0), config);
        m.handle(Instant::now(), Input::Peers(vec![a, b]));
        let mut now = Instant::now();
        for _ in 0..3 {
            let start = now;
            let round = m.round();
            now = timed_round(
                &mut m,
                start,
                (&[a], &[a]),
                Duration::from_millis(300),
                true,
            );
            assert!(now - start < Duration::from_secs(83), "{:?}", now - start);
            m.handle(
                start + Duration::from_secs(40),
                manifest(b, round, round as u8, 200 + round as u8),
            );
            now = now.max(start + Duration::from_secs(40));
        }
        assert_eq!(m.collect_timeout(), Duration::from_secs(82));
        for _ in 0..64 {
            m.record_arrival(500.0);
        }
        assert_eq!(m.collect_timeout(), Duration::from_secs(120));
    }

    #[test]
    fn a_three_way_split_ends_on_the_smallest_hash_once_everyone_announced() {
        let t0 = Instant::now();
        let (a, b) = (PeerId::random(), PeerId::random());
        let sync_of = |ours: u8, theirs: [u8; 2]| {
            let (mut m, _) =
                RoundMachine::new(PeerId::random(), 0, hash(ours), RoundConfig::default());
            m.handle(t0, Input::Peers(vec![a, b]));
            let mut actions = m.handle(t0, manifest(a, 0, theirs[0], 1));
            // One of two peers heard: no decision yet.
            assert!(
                !actions
                    .iter()
                    .any(|x| matches!(x, Action::SyncState { .. }))
            );
            actions.extend(m.handle(t0, manifest(b, 0, theirs[1], 2)));
            actions.iter().find_map(|x| match x {
                Action::SyncState { from, .. } => Some(*from),
                _ => None,
            })
        };
        assert_eq!(sync_of(9, [5, 7]), Some(a));
        assert_eq!(sync_of(7, [9, 5]), Some(b));
        assert_eq!(sync_of(5, [7, 9]), None);
    }

    #[test]
    fn a_delta_withheld_during_a_sync_is_trained_again_after_it() {
        for sync_succeeds in [true, false] {
            let (mut m, t0) = setup(1.0);
            let (a, b) = (PeerId::random(), PeerId::random());
            m.handle(t0, Input::PeerCount(2));
            m.handle(t0, manifest(a, 0, 5, 1));
            let sync = m.handle(t0, manifest(b, 0, 5, 2));
            assert!(sync.iter().any(|x| matches!(x, Action::SyncState { .. })));
            // The round's training finishes while syncing: not announced.
            m.handle(t0, Input::LocalDeltaWithheld { round: 0 });
            let after = if sync_succeeds {
                m.handle(
                    t0,
                    Input::StateSynced {
                        round: 0,
                        base: hash(5),
                    },
                )
            } else {
                m.handle(t0, Input::SyncFailed { from: a })
            };
            let base = if sync_succeeds { hash(5) } else { hash(0) };
            assert!(
                after.contains(&Action::Train { round: 0, base }),
                "sync ok {sync_succeeds}: {after:?}"
            );
            if sync_succeeds {
                assert_eq!(m.phase(), Phase::Training);
            }
        }
    }

    #[test]
    fn a_refused_sender_that_left_is_not_counted_twice() {
        let (mut m, t0) = setup(1.0);
        let (a, b, bad) = (PeerId::random(), PeerId::random(), PeerId::random());
        m.handle(t0, Input::Peers(vec![a, b, bad]));
        m.handle(t0, manifest(bad, 0, 0, 9));
        m.handle(t0, manifest(a, 0, 0, 1));
        m.handle(
            t0,
            Input::LocalDeltaPublished {
                round: 0,
                base: hash(0),
            },
        );
        m.handle(
            t0,
            Input::DeltaFailed {
                sender: bad,
                round: 0,
                bad_data: true,
            },
        );
        // The bad sender is blacklisted and disconnected: the connected set shrinks.
        let early = m.handle(t0, Input::Peers(vec![a, b]));
        let early2 = m.handle(
            t0,
            Input::DeltaReady {
                sender: a,
                round: 0,
            },
        );
        assert_eq!(aggregate_of(&early), None);
        assert_eq!(aggregate_of(&early2), None, "b has not been heard from yet");
        m.handle(t0, manifest(b, 0, 0, 2));
        let done = m.handle(
            t0,
            Input::DeltaReady {
                sender: b,
                round: 0,
            },
        );
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(aggregate_of(&done), Some((true, want)));
    }

    #[test]
    fn bad_data_is_judged_and_does_not_block_the_round() {
        let (mut m, t0) = setup(1.0);
        let p = PeerId::random();
        m.handle(t0, Input::PeerCount(1));
        m.handle(t0, manifest(p, 0, 0, 1));
        m.handle(
            t0,
            Input::LocalDeltaPublished {
                round: 0,
                base: hash(0),
            },
        );
        let a = m.handle(
            t0,
            Input::DeltaFailed {
                sender: p,
                round: 0,
                bad_data: true,
            },
        );
        assert!(a.contains(&Action::Judge {
            sender: p,
            round: 0,
            verdict: Verdict::Reject(RejectReason::BadData)
        }));
        // Every sender is heard from (one with a bad delta): the round ends at once with
        // only the good deltas, instead of waiting for the deadline.
        assert_eq!(aggregate_of(&a), Some((true, vec![])));
    }

    #[test]
    fn the_final_state_most_nodes_hold_wins() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        // Alone on a model the two others share: adopt theirs.
        let (peer, winner, count) =
            final_state_winner(hash(9), &[(a, hash(5)), (b, hash(5))]).expect("adopt");
        assert!(peer == a || peer == b);
        assert_eq!((winner, count), (hash(5), 2));
        // With the majority: stay.
        assert_eq!(
            final_state_winner(hash(5), &[(a, hash(5)), (b, hash(9))]),
            None
        );
        // Nobody reported: stay.
        assert_eq!(final_state_winner::<PeerId>(hash(5), &[]), None);
        // A tie goes to the smaller hash, from either side.
        assert_eq!(
            final_state_winner(hash(9), &[(a, hash(5))]),
            Some((a, hash(5), 1))
        );
        assert_eq!(final_state_winner(hash(5), &[(a, hash(9))]), None);
        // Three-way split with two on the smaller hash of the pair of pairs.
        assert_eq!(
            final_state_winner(hash(7), &[(a, hash(7)), (b, hash(3)), (c, hash(3))]),
            Some((b, hash(3), 2))
        );
    }
}
