//! One module per `meshtune` subcommand.

pub mod bench;
pub mod bench_fetch;
pub mod data;
pub mod demo;
pub mod eval;
pub mod examples;
pub mod generate;
pub mod model_info;
pub mod node;
pub mod rouge;
pub mod score;
pub mod train;
