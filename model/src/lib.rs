//! FLAN-T5 in burn: configuration, weights, tokenizer, Samsum data, scoring and generation.
//!
//! No networking lives here: the node crate drives this one.

pub mod alloc;
pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod exchange;
pub mod flops;
pub mod generate;
mod kernels;
pub mod lora;
pub mod optim;
pub mod potluck;
pub mod precision;
pub mod pretrained;
pub mod rouge;
pub mod score;
mod seeded_rng;
pub mod split;
pub mod synthetic;
pub mod t5;
pub mod tokenizer;
pub mod train;
pub mod weight_key;
pub mod weights;

pub use config::{Preset, T5Config};
pub use error::ModelError;
pub use t5::T5;
