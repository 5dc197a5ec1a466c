//! Gossip averaging without I/O: the all-to-all round state machine ([`round`]), the sparse
//! gossip state machine ([`gossip`]), the overlap of the exchange with the next local phase
//! ([`overlap`]) and the arithmetic of combining deltas and applying them
//! ([`aggregate`]). Nothing here touches tokio, libp2p or burn: inputs are events and time,
//! outputs are actions, tested on simulated time.

pub mod aggregate;
pub mod gossip;
pub mod overlap;
pub mod round;

/// A peer's identity as the state machines see it: anything small, copyable and totally
/// ordered (the node uses libp2p's `PeerId`; the tests use integers).
pub trait PeerKey: Copy + Ord + std::hash::Hash + std::fmt::Debug + std::fmt::Display {}

impl<T: Copy + Ord + std::hash::Hash + std::fmt::Debug + std::fmt::Display> PeerKey for T {}

/// Test peers of the state machines' unit tests: distinct, ordered integers.
#[cfg(test)]
pub(crate) mod test_peer {
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub struct PeerId(pub u64);

    impl std::fmt::Display for PeerId {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "peer-{}", self.0)
        }
    }

    impl PeerId {
        /// A peer never handed out before.
        pub fn random() -> Self {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            PeerId(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
        }
    }
}
