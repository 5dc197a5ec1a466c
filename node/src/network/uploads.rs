//! The order chunks leave this node in. Chunk responses go out first come, first served, one
//! at a time, so the uplink carries one response at its full rate instead of every requested
//! chunk at a fraction of it. (All at once, three peers pulling a 2.7 MB delta over a
//! 1 Mbit/s uplink each got nine 1 MiB chunks at a ninth of the rate: every one would have
//! needed over a minute, past the requesters' 30 s timeout, and the pull failed.) A request
//! that would finish later than `budget` from now, at the upload rate measured on earlier
//! responses, is answered `Busy` at once: the requester asks another holder or comes back.
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

/// Chunk responses in the order they go out (see the module docs). `K` names a response (the
/// request's id), `T` is what the event loop needs to send it.
#[derive(Debug)]
pub struct UploadQueue<K, T> {
    budget: Duration,
    /// The response being sent: its key, bytes and start.
    active: Option<(K, u64, Instant)>,
    queue: VecDeque<(K, u64, T)>,
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
        if self.active.is_none() {
            self.active = Some((key, bytes, now));
            return Admit::Send(response);
        }
        if let Some(rate) = self.rate {
            let (_, active_bytes, started) = self.active.as_ref().map_or((key, 0, now), |a| *a);
            let active_left =
                (active_bytes as f64 - rate * now.duration_since(started).as_secs_f64()).max(0.0);
            let ahead = active_left + self.queued_bytes as f64 + bytes as f64;
            if ahead / rate > self.budget.as_secs_f64() {
                return Admit::Busy(response);
            }
        }
        self.queued_bytes += bytes;
        self.queue.push_back((key, bytes, response));
        Admit::Queued
    }

    /// Request `key`'s response left (`sent`) or failed at `now`; returns the next response to
    /// send, if this one was the active one and another waits. A key that is not the active
    /// one (a response never queued here) changes nothing.
    pub fn finished(&mut self, now: Instant, key: K, sent: bool) -> Option<(K, T)> {
        let (active, bytes, started) = self.active?;
        if active != key {
            return None;
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
        let (key, bytes, response) = self.queue.pop_front()?;
        self.queued_bytes -= bytes;
        self.active = Some((key, bytes, now));
        Some((key, response))
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

    #[test]
    fn responses_go_out_one_at_a_time_in_arrival_order() {
        let t0 = Instant::now();
        let mut q = UploadQueue::new(Duration::from_secs(15));
        assert_eq!(q.admit(t0, 1, MIB, "a"), Admit::Send("a"));
        assert_eq!(q.admit(t0, 2, MIB, "b"), Admit::Queued);
        assert_eq!(q.admit(t0, 3, MIB, "c"), Admit::Queued);
        assert_eq!(q.waiting(), 2);
        // Another key's end (a response that never queued) releases nothing.
        assert_eq!(q.finished(t0, 9, true), None);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(q.finished(t1, 1, true), Some((2, "b")));
        assert_eq!(
            q.finished(t1 + Duration::from_secs(1), 2, true),
            Some((3, "c"))
        );
        assert_eq!(q.finished(t1 + Duration::from_secs(2), 3, true), None);
        // 1 MiB per second, measured.
        let rate = q.rate().expect("measured");
        assert!((rate - MIB as f64).abs() < 1.0, "{rate}");
        // Idle again: the next response goes out at once.
        assert_eq!(
            q.admit(t1 + Duration::from_secs(3), 4, MIB, "d"),
            Admit::Send("d")
        );
    }

    #[test]
    fn a_response_that_would_end_past_the_budget_is_busy() {
        let t0 = Instant::now();
        let mut q = UploadQueue::new(Duration::from_secs(10));
        // Before any measurement everything queues: nothing is known about the link.
        assert_eq!(q.admit(t0, 1, MIB, 1), Admit::Send(1));
        for key in 2..6 {
            assert_eq!(q.admit(t0, key, MIB, key), Admit::Queued);
        }
        // 1 MiB in 4 s: 256 KiB/s, a slow uplink.
        let t1 = t0 + Duration::from_secs(4);
        assert_eq!(q.finished(t1, 1, true), Some((2, 2)));
        // 2 (active, 4 s left), 3, 4 and 5 queued, and its own 4 s: 20 s, over the 10 s budget.
        assert_eq!(q.admit(t1, 6, MIB, 6), Admit::Busy(6));
        // Two ends later, 4 is half sent (2 s left) and 5 queued (4 s): a quarter MiB (1 s)
        // ends within 7 s and queues; another MiB then would end after 11 s.
        let t2 = t1 + Duration::from_secs(4);
        assert_eq!(q.finished(t2, 2, true), Some((3, 3)));
        let t3 = t2 + Duration::from_secs(4);
        assert_eq!(q.finished(t3, 3, true), Some((4, 4)));
        let t4 = t3 + Duration::from_secs(2);
        assert_eq!(q.admit(t4, 7, MIB / 4, 7), Admit::Queued);
        assert_eq!(q.admit(t4, 8, MIB, 8), Admit::Busy(8));
    }

    #[test]
    fn a_failed_response_frees_its_turn_without_a_measurement() {
        let t0 = Instant::now();
        let mut q = UploadQueue::new(Duration::from_secs(10));
        assert_eq!(q.admit(t0, 1, MIB, "a"), Admit::Send("a"));
        assert_eq!(q.admit(t0, 2, MIB, "b"), Admit::Queued);
        // The requester went away after a moment: no rate from that.
        assert_eq!(
            q.finished(t0 + Duration::from_millis(1), 1, false),
            Some((2, "b"))
        );
        assert_eq!(q.rate(), None);
    }
}
