//! `meshtune-testnet`: launches a local mesh (bootstrap + N node processes on loopback, or
//! each in its own network namespace),
//! watches it round by round, runs the baselines it is compared with, and writes a report.
//!
//! Owns: processes, run directories, the live table and the report. Must not touch: node
//! internals; it drives the node through its command line (`__node` re-executes this binary
//! with the node's own arguments) and reads what nodes write (`rounds.jsonl`,
//! `metrics.jsonl`).

pub mod chart;
pub mod docker;
pub mod frontier;
pub mod local;
pub mod netns;
pub mod png;
pub mod report;
pub mod rng;
pub mod simulate;
pub mod soak;
pub mod task;
