//! The order chunks leave this node in. Chunk responses go out first come, first served, one
//! at a time, so the uplink carries one response at its full rate instead of every requested
//! chunk at a fraction of it. (All at once, three peers pulling a 2.7 MB delta over a
//! 1 Mbit/s uplink each got nine 1 MiB chunks at a ninth of the rate: every one would have
//! needed over a minute, past the requesters' 30 s timeout, and the pull failed.) A request
//! that would finish later than `budget` from now, at the upload rate measured on earlier
//! responses, is answered `Busy` at once: the requester asks another holder or comes back.
//! Before the first measurement one response may wait; one that would still end past `budget`
//! from its admission when its turn comes (the rate fell) is answered `Busy` then, since its
//! requester would give up on it before it arrived.
//!
//! Pure: the event loop passes time in, sends what [`UploadQueue`] releases and reports each
//! response's end. Owns: the queue and the rate estimate. Must not touch: the swarm.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Weight of the newest response in the upload-rate estimate.
const RATE_WEIGHT: f64 = 0.5;

/// What to do with a chunk response now.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<T> {
    /// Send it now (the queue was idle).
    Send(T),
    /// Queued: [`UploadQueue::finished`] releases it.
    Queued,
    /// It would finish too late: answer `Busy` instead.
    Busy(T),
}

/// What [`UploadQueue::finished`] lets go.
#[derive(Debug, PartialEq, Eq)]
pub struct Released<K, T> {
    /// The response to send now.
    pub next: Option<(K, T)>,
    /// Responses that would end past the budget from their admission: answer `Busy`.
    pub busy: Vec<T>,
}

/// Chunk responses in the order they go out (see the module docs). `K` names a response (the
/// request's id), `T` is what the event loop needs to send it.
#[derive(Debug)]
pub struct UploadQueue<K, T> {
    budget: Duration,
    /// The response being sent: its key, bytes and start.
    active: Option<(K, u64, Instant)>,
    /// Waiting responses: key, bytes, when admitted.
    queue: VecDeque<(K, u64, Instant, T)>,
    queued_bytes: u64,
    /// Bytes per second of the responses sent so far (`None` before the first).
    rate: Option<f64>,
}

impl<K: PartialEq + Copy, T> UploadQueue<K, T> {
    /// A queue that answers `Busy` when a response would end more than `budget` from now.
    pub fn new(budget: Duration) -> Self {
        Self {
            budget,
            active: None,
            queue: VecDeque::new(),
            queued_bytes: 0,
            rate: None,
        }
    }

    /// A response of `bytes` for request `key`, ready to send at `now`.
    pub fn admit(&mut self, now: Instant, key: K, bytes: u64, response: T) -> Admit<T> {
        let Some((_, active_bytes, started)) = self.active else {
            self.active = Some((key, bytes, now));
            return Admit::Send(response);
        };
        let fits = match self.rate {
            // Nothing is known about the link yet: one response may wait.
            None => self.queue.is_empty(),
            Some(rate) => {
                let sent = rate * now.duration_since(started).as_secs_f64();
                let active_left = (active_bytes as f64 - sent).max(0.0);
                let ahead = active_left + self.queued_bytes as f64 + bytes as f64;
                ahead / rate <= self.budget.as_secs_f64()
            }
        };
        if !fits {
            return Admit::Busy(response);
        }
        self.queued_bytes += bytes;
        self.queue.push_back((key, bytes, now, response));
        Admit::Queued
    }

    /// Request `key`'s response left (`sent`) or failed at `now`. When it was the active one,
    /// returns the next response to send and those that waited past the budget (to answer
    /// `Busy`); a waiting one that failed (its requester gave up) leaves the queue; any other
    /// key changes nothing.
    pub fn finished(&mut self, now: Instant, key: K, sent: bool) -> Released<K, T> {
        let mut released = Released {
            next: None,
            busy: Vec::new(),
        };
        let Some((active, bytes, started)) = self.active else {
            return released;
        };
        if active != key {
            if let Some(at) = self.queue.iter().position(|(k, ..)| *k == key)
                && let Some((_, bytes, _, _)) = self.queue.remove(at)
            {
                self.queued_bytes -= bytes;
            }
            return released;
        }
        if sent {
            let seconds = now.duration_since(started).as_secs_f64().max(1e-6);
            let measured = bytes as f64 / seconds;
            self.rate = Some(match self.rate {
                Some(rate) => RATE_WEIGHT * measured + (1.0 - RATE_WEIGHT) * rate,
                None => measured,
            });
        }
        self.active = None;
        while let Some((key, bytes, admitted, response)) = self.queue.pop_front() {
            self.queued_bytes -= bytes;
            let own = self.rate.map_or(0.0, |rate| bytes as f64 / rate);
            let end = now.duration_since(admitted).as_secs_f64() + own;
            if end > self.budget.as_secs_f64() {
                released.busy.push(response);
                continue;
            }
            self.active = Some((key, bytes, now));
            released.next = Some((key, response));
            break;
        }
        released
    }

    /// The measured upload rate in bytes per second.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// Responses waiting behind the active one.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn next<K, T>(released: Released<K, T>) -> Option<(K, T)> {
        assert!(released.busy.is_empty());
        released.next
    }

    /// A queue whose upload rate is measured: 1 MiB in `seconds`, ending at the returned time.
    fn measured(budget: u64, seconds: u64) -> (UploadQueue<u32, u32>, Instant) {
        let t0 = Instant::now();
        let mut q = UploadQueue::new(Duration::from_secs(budget));
        assert_eq!(q.admit(t0, 0, MIB, 0), Admit::Send(0));
        let t1 = t0 + Duration::from_secs(seconds);
        assert_eq!(next(q.finished(t1, 0, true)), None);
        (q, t1)
    }

    #[test]
    fn responses_go_out_one_at_a_time_in_arrival_order() {
        let (mut q, t0) = measured(15, 1);
        assert_eq!(q.admit(t0, 1, MIB, 1), Admit::Send(1));
        assert_eq!(q.admit(t0, 2, MIB, 2), Admit::Queued);
        assert_eq!(q.admit(t0, 3, MIB, 3), Admit::Queued);
        assert_eq!(q.waiting(), 2);
        // Another key's end (a response that never queued here) releases nothing.
        assert_eq!(next(q.finished(t0, 9, true)), None);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(next(q.finished(t1, 1, true)), Some((2, 2)));
        assert_eq!(
            next(q.finished(t1 + Duration::from_secs(1), 2, true)),
            Some((3, 3))
        );
        assert_eq!(next(q.finished(t1 + Duration::from_secs(2), 3, true)), None);
        // 1 MiB per second, measured.
        let rate = q.rate().expect("measured");
        assert!((rate - MIB as f64).abs() < 1.0, "{rate}");
        // Idle again: the next response goes out at once.
        assert_eq!(
            q.admit(t1 + Duration::from_secs(3), 4, MIB, 4),
            Admit::Send(4)
        );
    }

    #[test]
    fn before_the_first_measurement_one_response_waits() {
        let t0 = Instant::now();
        let mut q = UploadQueue::new(Duration::from_secs(15));
        assert_eq!(q.admit(t0, 1, MIB, 1), Admit::Send(1));
        assert_eq!(q.admit(t0, 2, MIB, 2), Admit::Queued);
        assert_eq!(q.admit(t0, 3, MIB, 3), Admit::Busy(3));
        assert_eq!(q.rate(), None);
    }

    #[test]
    fn a_response_that_would_end_past_the_budget_is_busy() {
        // 1 MiB in 4 s: 256 KiB/s, a slow uplink.
        let (mut q, t1) = measured(10, 4);
        assert_eq!(q.admit(t1, 1, MIB, 1), Admit::Send(1));
        assert_eq!(q.admit(t1, 2, MIB, 2), Admit::Queued);
        // 1 (active, 4 s left), 2 queued and its own 4 s: 12 s, over the 10 s budget.
        assert_eq!(q.admit(t1, 3, MIB, 3), Admit::Busy(3));
        // Two seconds on, 1 is half sent: 2 s + 4 s + a quarter MiB (1 s) fits; another MiB
        // then would end after 11 s.
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(q.admit(t2, 4, MIB / 4, 4), Admit::Queued);
        assert_eq!(q.admit(t2, 5, MIB, 5), Admit::Busy(5));
    }

    #[test]
    fn a_response_that_waited_past_the_budget_is_busy_when_its_turn_comes() {
        let (mut q, t1) = measured(10, 4);
        assert_eq!(q.admit(t1, 1, MIB, 1), Admit::Send(1));
        assert_eq!(q.admit(t1, 2, MIB, 2), Admit::Queued);
        assert_eq!(q.admit(t1, 3, MIB / 4, 3), Admit::Queued);
        // The link slowed down: 1 took 8 s (now 1 MiB in 5.3 s, averaged). 2 would end 8 + 5.3 s
        // after its admission, past the budget; the quarter MiB still fits (8 + 1.3 s).
        let released = q.finished(t1 + Duration::from_secs(8), 1, true);
        assert_eq!(released.busy, vec![2]);
        assert_eq!(released.next, Some((3, 3)));
        assert_eq!(q.waiting(), 0);
    }

    #[test]
    fn a_failed_response_frees_its_turn_and_a_failed_waiting_one_leaves_the_queue() {
        let t0 = Instant::now();
        let mut q = UploadQueue::new(Duration::from_secs(10));
        assert_eq!(q.admit(t0, 1, MIB, "a"), Admit::Send("a"));
        assert_eq!(q.admit(t0, 2, MIB, "b"), Admit::Queued);
        // 2's requester gave up while it waited: it leaves the queue.
        assert_eq!(next(q.finished(t0, 2, false)), None);
        assert_eq!(q.waiting(), 0);
        assert_eq!(q.admit(t0, 3, MIB, "c"), Admit::Queued);
        // 1's requester went away after a moment: no rate from that; 3 goes out.
        let t1 = t0 + Duration::from_millis(1);
        assert_eq!(next(q.finished(t1, 1, false)), Some((3, "c")));
        assert_eq!(q.rate(), None);
    }
}
