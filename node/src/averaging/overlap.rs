//! Overlapping the exchange with the next local phase (`--overlap`): a pure state machine that
//! sits between the round machine's [`Action::Train`](super::round::Action::Train) and the
//! trainer, and a [`BusyClock`] that measures how much of each round the trainer computed.
//!
//! **The method: one-step delayed application** (DiLoCoX). As soon as the trainer is done with
//! round r's delta P_r (trained from θ_r), it trains round r + 1's local phase *ahead* while
//! round r's deltas are exchanged, starting from θ_r + P_r / n: the base plus this node's own
//! share of the average it just contributed to (the others' deltas are not known yet; starting
//! from its whole own model θ_r + P_r instead doubles each node's drift on non-IID data: 72.4
//! against 82.2 ROUGE-L on the bundled task, docs/BENCHMARKS.md). When round r's aggregate
//! θ_{r+1} is ready and the ahead phase has learnt P_{r+1}, the node **rebases**: its model
//! becomes θ_{r+1} + P_{r+1} and it publishes P_{r+1} as its delta of round r + 1 on base
//! θ_{r+1}. The mesh's algebra is unchanged (θ_{r+2} = θ_{r+1} + outer(mean P_{r+1})), every
//! node still aggregates the same decoded deltas and holds bit-identical models; the cost is
//! that the gradients of round r + 1's local phase were taken without the others' round-r
//! contributions (one round of staleness).
//!
//! Why not Streaming DiLoCo's merge at arrival: merging the aggregate into the running inner
//! state when it happens to arrive makes a node's delta depend on network timing, so two runs
//! of one seed differ and a node's restart cannot reproduce its delta. The rebase here happens
//! at a fixed point (the end of the local phase), so overlapped runs are as deterministic as
//! sequential ones.
//!
//! The interleavings ([`OverlapMachine::handle`]): the aggregate is ready before the ahead phase
//! ends (the trainer never waits; the rebase follows the phase), or after it (the trainer
//! waits for the link: the round takes max(T_comp, T_comm), not the sum); the round machine
//! asks for another round than the one trained ahead (a sync moved the node), or the ahead
//! phase failed: the ahead work is dropped and the round trains from its base as without
//! overlap. A restart loses an ahead phase in flight (it is not checkpointed; its batches are
//! not trained again).

use std::time::{Duration, Instant};

use meshtune_protocol::ModelHash;

/// Which rounds train ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlapConfig {
    /// Train the next round ahead while this one is exchanged.
    pub enabled: bool,
    /// Rounds in the run, if bounded: nothing is trained ahead for a round past the end.
    pub rounds: Option<u64>,
    /// Whether the last round trains (false under `final_exchange`, whose last round trains
    /// zero steps).
    pub last_round_trains: bool,
}

/// What happened, as the machine's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The round machine asked for `round` to be trained from `base`.
    Requested { round: u64, base: ModelHash },
    /// The trainer is done with `round`'s delta (trained, or rebased onto the mesh's model):
    /// the next round can train ahead.
    TrainerFree { round: u64 },
    /// The ahead phase of `round` ended (`ok: false` when it failed).
    AheadDone { round: u64, ok: bool },
}

/// What the coordinator should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Train `round` from `base` and publish its delta (as without overlap).
    Train { round: u64, base: ModelHash },
    /// Train `round`'s local phase ahead, on from the trainer's current model.
    TrainAhead { round: u64 },
    /// Rebase the ahead-trained progress of `round` onto `base` and publish it as the delta.
    Publish { round: u64, base: ModelHash },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ahead {
    None,
    Running(u64),
    Ready(u64),
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct OverlapMachine {
    config: OverlapConfig,
    ahead: Ahead,
    /// A round requested while its ahead phase (or another) was still running.
    waiting: Option<(u64, ModelHash)>,
}

impl OverlapMachine {
    pub fn new(config: OverlapConfig) -> Self {
        Self {
            config,
            ahead: Ahead::None,
            waiting: None,
        }
    }

    /// Whether an ahead phase is running.
    pub fn training_ahead(&self) -> bool {
        matches!(self.ahead, Ahead::Running(_))
    }

    fn trains(&self, round: u64) -> bool {
        match self.config.rounds {
            None => true,
            Some(n) if round + 1 == n => self.config.last_round_trains,
            Some(n) => round < n,
        }
    }

    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        match input {
            Input::Requested { round, base } => match self.ahead {
                Ahead::Running(_) => {
                    self.waiting = Some((round, base));
                    Vec::new()
                }
                Ahead::Ready(ready) => {
                    self.ahead = Ahead::None;
                    if ready == round {
                        vec![Action::Publish { round, base }]
                    } else {
                        vec![Action::Train { round, base }]
                    }
                }
                Ahead::None => vec![Action::Train { round, base }],
            },
            Input::TrainerFree { round } => {
                let next = round + 1;
                if !self.config.enabled || self.ahead != Ahead::None || !self.trains(next) {
                    return Vec::new();
                }
                self.ahead = Ahead::Running(next);
                vec![Action::TrainAhead { round: next }]
            }
            Input::AheadDone { round, ok } => {
                if self.ahead != Ahead::Running(round) {
                    return Vec::new();
                }
                self.ahead = if ok { Ahead::Ready(round) } else { Ahead::None };
                match self.waiting.take() {
                    Some((round, base)) => self.handle(Input::Requested { round, base }),
                    None => Vec::new(),
                }
            }
        }
    }
}

/// How long the trainer computed since the last [`BusyClock::take`]: utilization = busy / wall.
#[derive(Debug, Clone)]
pub struct BusyClock {
    window_start: Instant,
    busy_since: Option<Instant>,
    busy: Duration,
}

/// One window of a [`BusyClock`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Busy {
    pub busy: Duration,
    pub wall: Duration,
}

impl Busy {
    /// Busy time over wall time (1.0 for an empty window).
    pub fn utilization(&self) -> f64 {
        if self.wall.is_zero() {
            1.0
        } else {
            (self.busy.as_secs_f64() / self.wall.as_secs_f64()).min(1.0)
        }
    }

    /// Wall time the trainer did not compute.
    pub fn idle(&self) -> Duration {
        self.wall.saturating_sub(self.busy)
    }
}

impl BusyClock {
    pub fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            busy_since: None,
            busy: Duration::ZERO,
        }
    }

    /// The trainer starts computing (a second start while busy is ignored).
    pub fn start(&mut self, now: Instant) {
        self.busy_since.get_or_insert(now);
    }

    /// The trainer stops computing.
    pub fn stop(&mut self, now: Instant) {
        if let Some(since) = self.busy_since.take() {
            self.busy += now.saturating_duration_since(since.max(self.window_start));
        }
    }

    /// The window since the last take (busy time of a computation still running counts up to
    /// `now`), and a new window from `now`.
    pub fn take(&mut self, now: Instant) -> Busy {
        let running = self.busy_since.map_or(Duration::ZERO, |since| {
            now.saturating_duration_since(since.max(self.window_start))
        });
        let window = Busy {
            busy: self.busy + running,
            wall: now.saturating_duration_since(self.window_start),
        };
        self.window_start = now;
        self.busy = Duration::ZERO;
        window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> ModelHash {
        ModelHash([n; 32])
    }

    fn machine(rounds: Option<u64>, last_round_trains: bool) -> OverlapMachine {
        OverlapMachine::new(OverlapConfig {
            enabled: true,
            rounds,
            last_round_trains,
        })
    }

    #[test]
    fn without_overlap_every_round_trains_from_its_base() {
        let mut m = OverlapMachine::new(OverlapConfig {
            enabled: false,
            rounds: Some(3),
            last_round_trains: true,
        });
        let base = hash(1);
        assert_eq!(
            m.handle(Input::Requested { round: 0, base }),
            vec![Action::Train { round: 0, base }]
        );
        assert!(m.handle(Input::TrainerFree { round: 0 }).is_empty());
        assert_eq!(
            m.handle(Input::Requested { round: 1, base }),
            vec![Action::Train { round: 1, base }]
        );
    }

    #[test]
    fn an_aggregate_ready_during_the_ahead_phase_is_applied_when_the_phase_ends() {
        let mut m = machine(Some(3), true);
        let (b0, b1) = (hash(0), hash(1));
        assert_eq!(
            m.handle(Input::Requested { round: 0, base: b0 }),
            vec![Action::Train { round: 0, base: b0 }]
        );
        assert_eq!(
            m.handle(Input::TrainerFree { round: 0 }),
            vec![Action::TrainAhead { round: 1 }]
        );
        assert!(m.training_ahead());
        // Round 0 aggregates while round 1 trains ahead: nothing to do until the phase ends.
        assert!(m.handle(Input::Requested { round: 1, base: b1 }).is_empty());
        assert_eq!(
            m.handle(Input::AheadDone { round: 1, ok: true }),
            vec![Action::Publish { round: 1, base: b1 }]
        );
        // The rebase frees the trainer: round 2 trains ahead.
        assert_eq!(
            m.handle(Input::TrainerFree { round: 1 }),
            vec![Action::TrainAhead { round: 2 }]
        );
    }

    #[test]
    fn an_aggregate_after_the_ahead_phase_publishes_at_once() {
        let mut m = machine(Some(3), true);
        m.handle(Input::Requested {
            round: 0,
            base: hash(0),
        });
        m.handle(Input::TrainerFree { round: 0 });
        assert!(m.handle(Input::AheadDone { round: 1, ok: true }).is_empty());
        assert!(!m.training_ahead());
        assert_eq!(
            m.handle(Input::Requested {
                round: 1,
                base: hash(1)
            }),
            vec![Action::Publish {
                round: 1,
                base: hash(1)
            }]
        );
    }

    #[test]
    fn a_sync_to_another_round_drops_the_ahead_work() {
        let mut m = machine(Some(10), true);
        m.handle(Input::Requested {
            round: 0,
            base: hash(0),
        });
        m.handle(Input::TrainerFree { round: 0 });
        // The node synced to round 4 while round 1 trained ahead: wait for the trainer, then
        // train round 4 from the adopted base.
        assert!(
            m.handle(Input::Requested {
                round: 4,
                base: hash(4)
            })
            .is_empty()
        );
        assert_eq!(
            m.handle(Input::AheadDone { round: 1, ok: true }),
            vec![Action::Train {
                round: 4,
                base: hash(4)
            }]
        );
        // Ahead work that finished before the sync is dropped as well.
        m.handle(Input::TrainerFree { round: 4 });
        m.handle(Input::AheadDone { round: 5, ok: true });
        assert_eq!(
            m.handle(Input::Requested {
                round: 7,
                base: hash(7)
            }),
            vec![Action::Train {
                round: 7,
                base: hash(7)
            }]
        );
    }

    #[test]
    fn a_failed_ahead_phase_trains_the_round_again() {
        let mut m = machine(None, true);
        m.handle(Input::Requested {
            round: 0,
            base: hash(0),
        });
        m.handle(Input::TrainerFree { round: 0 });
        m.handle(Input::Requested {
            round: 1,
            base: hash(1),
        });
        assert_eq!(
            m.handle(Input::AheadDone {
                round: 1,
                ok: false
            }),
            vec![Action::Train {
                round: 1,
                base: hash(1)
            }]
        );
    }

    #[test]
    fn nothing_trains_ahead_past_the_last_round_or_into_a_final_exchange() {
        let mut m = machine(Some(2), true);
        m.handle(Input::Requested {
            round: 0,
            base: hash(0),
        });
        assert_eq!(
            m.handle(Input::TrainerFree { round: 0 }),
            vec![Action::TrainAhead { round: 1 }]
        );
        m.handle(Input::AheadDone { round: 1, ok: true });
        m.handle(Input::Requested {
            round: 1,
            base: hash(1),
        });
        assert!(m.handle(Input::TrainerFree { round: 1 }).is_empty());

        let mut m = machine(Some(2), false);
        m.handle(Input::Requested {
            round: 0,
            base: hash(0),
        });
        assert!(m.handle(Input::TrainerFree { round: 0 }).is_empty());
    }

    #[test]
    fn a_stale_or_repeated_report_changes_nothing() {
        let mut m = machine(None, true);
        m.handle(Input::Requested {
            round: 0,
            base: hash(0),
        });
        m.handle(Input::TrainerFree { round: 0 });
        // A second "free" while round 1 trains ahead starts nothing more.
        assert!(m.handle(Input::TrainerFree { round: 0 }).is_empty());
        // A report for a round not running ahead is ignored.
        assert!(m.handle(Input::AheadDone { round: 3, ok: true }).is_empty());
        assert!(m.training_ahead());
    }

    #[test]
    fn the_busy_clock_splits_each_window_into_compute_and_idle_time() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut clock = BusyClock::new(t0);
        clock.start(t0 + s(1));
        clock.stop(t0 + s(4));
        let first = clock.take(t0 + s(5));
        assert_eq!(first.busy, s(3));
        assert_eq!(first.wall, s(5));
        assert_eq!(first.idle(), s(2));
        assert!((first.utilization() - 0.6).abs() < 1e-12);
        // A computation that spans the window's end counts on both sides of it.
        clock.start(t0 + s(6));
        let second = clock.take(t0 + s(8));
        assert_eq!((second.busy, second.wall), (s(2), s(3)));
        clock.stop(t0 + s(9));
        let third = clock.take(t0 + s(10));
        assert_eq!((third.busy, third.wall), (s(1), s(2)));
        assert!((third.utilization() - 0.5).abs() < 1e-12);
        // Nothing happened: no time, fully "utilized" by convention.
        assert!((clock.take(t0 + s(10)).utilization() - 1.0).abs() < 1e-12);
    }
}
