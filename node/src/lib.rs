//! The meshtune node: command line, model commands, and the mesh: network actor
//! ([`network`]), pure round state machines ([`averaging`]), trainer thread ([`trainer`]), the
//! round loop that joins them ([`coordinator`]), and [`Node::spawn`], the one way to start a
//! node.

pub mod averaging;
pub mod cli;
pub mod commands;
pub mod coordinator;
pub mod device;
pub mod energy;
pub mod logging;
pub mod network;
pub mod node;
pub mod nvml;
pub mod plot;
pub mod trainer;

pub use node::{Node, NodeConfig, NodeError, NodeHandle};
