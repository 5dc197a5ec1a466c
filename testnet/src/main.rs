//! `meshtune-testnet`: with no arguments, a local mesh of 1 bootstrap + 4 nodes as real
//! processes on loopback, fine-tuning the bundled tiny FLAN-T5 on the bundled synthetic corpus
//! split non-IID, with a live per-round table and a report directory; `--model DIR --train
//! FILE` runs the same on your own model and data.
//!
//! The processes are this same executable started with a hidden role (`__node`,
//! `__bootstrap`, `__train`), so the one binary `cargo run -p meshtune-testnet` builds is all
//! the testnet needs.

use std::process::ExitCode;

/// The allocator the `meshtune` binary ships with, so the testnet's re-executed nodes (and the
/// soak's) train and measure memory as a `meshtune node` does (see `meshtune_model::alloc`).
#[global_allocator]
static ALLOCATOR: meshtune_model::alloc::CachingAllocator = meshtune_model::alloc::CachingAllocator;

use clap::{Parser, Subcommand};
use meshtune_testnet::local::{TestnetArgs, run_testnet};

#[derive(Debug, Parser)]
#[command(
    name = "meshtune-testnet",
    version,
    about = "Run a local meshtune mesh and report on it"
)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    #[command(flatten)]
    testnet: TestnetArgs,
    #[command(flatten)]
    task: meshtune_testnet::task::TaskArgs,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// (internal) run one mesh node, as `meshtune node`.
    #[command(name = "__node", hide = true)]
    Node(Box<meshtune_node::commands::node::NodeArgs>),
    /// (internal) run the bootstrap node; prints its addresses on stdout.
    #[command(name = "__bootstrap", hide = true)]
    Bootstrap(meshtune_testnet::local::BootstrapArgs),
    /// N nodes (real round machine, coordinator and libp2p on the memory transport) with a
    /// synthetic trainer in one process: round time, bytes per node, consensus distance and
    /// memory per node at mesh sizes a laptop cannot run as processes.
    Simulate(meshtune_testnet::simulate::SimulateArgs),
    /// Endurance: node processes on loopback for many rounds with random SIGKILLs and
    /// restarts and a late joiner; then every checkpoint must load, no accepted delta may be
    /// lost, the final models must agree and memory must not grow (RSS per round printed).
    Soak(meshtune_testnet::soak::SoakArgs),
    /// The compression frontier: final ROUGE-L against bytes per node per round for each
    /// codec on several workloads (bundled, long local phases, fine-tuning full and LoRA) over
    /// several seeds, with the verdict on the default codec.
    Frontier(meshtune_testnet::frontier::FrontierArgs),
    /// (internal) local training for the baselines, as `meshtune train`.
    #[command(name = "__train", hide = true)]
    Train(Box<meshtune_node::commands::train::TrainArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.role {
        Some(Role::Node(args)) => {
            meshtune_node::logging::init(meshtune_node::logging::LogFormat::Json);
            meshtune_node::commands::node::run(*args)
        }
        Some(Role::Train(args)) => {
            meshtune_node::logging::init(meshtune_node::logging::LogFormat::Json);
            meshtune_node::commands::train::run(*args)
        }
        Some(Role::Simulate(args)) => {
            meshtune_node::logging::init(meshtune_node::logging::LogFormat::Text);
            meshtune_testnet::simulate::run(args)
        }
        Some(Role::Soak(args)) => {
            meshtune_node::logging::init(meshtune_node::logging::LogFormat::Text);
            meshtune_testnet::soak::run(args)
        }
        Some(Role::Frontier(args)) => {
            meshtune_node::logging::init(meshtune_node::logging::LogFormat::Text);
            meshtune_testnet::frontier::run(args).map(|out| {
                println!("\nfrontier: {}", out.join("frontier.md").display());
            })
        }
        Some(Role::Bootstrap(args)) => {
            meshtune_node::logging::init(meshtune_node::logging::LogFormat::Json);
            meshtune_testnet::local::run_bootstrap(args)
        }
        None => {
            meshtune_node::logging::init(meshtune_node::logging::LogFormat::Text);
            run_testnet(cli.testnet, cli.task).map(|report| {
                println!("\nreport: {}", report.display());
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
