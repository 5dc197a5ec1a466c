//! Gossip averaging without I/O: the round state machine ([`round`]) and the arithmetic of
//! combining deltas and applying them ([`aggregate`]).

pub mod aggregate;
pub mod round;
