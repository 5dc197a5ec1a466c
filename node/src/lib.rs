//! The meshtune node: command line, model commands, and the mesh: network actor
//! ([`network`]), pure round state machine ([`averaging`]), trainer thread ([`trainer`]) and
//! the round loop that joins them ([`coordinator`]).

pub mod averaging;
pub mod cli;
pub mod commands;
pub mod coordinator;
pub mod device;
pub mod energy;
pub mod logging;
pub mod network;
pub mod plot;
pub mod trainer;
