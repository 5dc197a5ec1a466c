//! Command-line interface of `meshtune`. Parsing only; each command lives in `commands/`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands;
use crate::device::DeviceChoice;
use crate::logging::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "meshtune",
    version,
    about = "Peer-to-peer federated fine-tuning of FLAN-T5"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "MESHTUNE_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Score and generate with the bundled tiny model on the bundled examples (no arguments).
    Demo(commands::demo::DemoArgs),
    /// Join a mesh: train locally and average deltas with peers, round after round.
    Node(Box<commands::node::NodeArgs>),
    /// Fine-tune locally (full or LoRA), with checkpoints, eval and curves.
    Train(Box<commands::train::TrainArgs>),
    /// Teacher-forced loss of every example (mean token cross-entropy over the summary).
    Score(commands::score::ScoreArgs),
    /// Generate summaries with greedy or beam search.
    Generate(commands::generate::GenerateArgs),
    /// Generate and score: loss and ROUGE of a model on a Samsum file.
    Eval(commands::eval::EvalArgs),
    /// Mean ROUGE F-measures (rouge-score with stemming) of predictions vs references.
    Rouge(commands::rouge::RougeArgs),
    /// Datasets: federated shards and the bundled synthetic corpus.
    #[command(subcommand)]
    Data(commands::data::DataCommand),
    /// Model inspection.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Benchmarks that print ratios against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Parameter counts of a preset or a model folder.
    Info(commands::model_info::ModelInfoArgs),
    /// Load a HF T5 folder and write it back (HF key names) in another precision.
    Export(commands::model_info::ModelExportArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Forward pass (encoder + teacher-forced decoder) throughput.
    Forward(commands::bench::ForwardBenchArgs),
    /// One training step (forward, backward, clipping, AdamW): tokens/s, MFU, peak memory,
    /// and PyTorch eager on the same step with --compare-pytorch.
    Train(commands::bench::TrainBenchArgs),
    /// Delta codecs: compression ratio, encode/decode GB/s, reconstruction error.
    Codec(commands::bench::CodecBenchArgs),
    /// Link shaping (`--link` profiles): measured vs expected throughput and round trip.
    Link(commands::bench::LinkBenchArgs),
    /// A blob pull between nodes on shaped links: measured vs what the link allows.
    Fetch(commands::bench_fetch::FetchBenchArgs),
}

impl Command {
    /// The compute device a command runs on, checked before the command starts.
    fn device(&self) -> Option<DeviceChoice> {
        match self {
            Command::Node(args) => Some(args.device),
            Command::Train(args) => Some(args.device),
            Command::Score(args) => Some(args.data.device),
            Command::Generate(args) => Some(args.data.device),
            Command::Eval(args) => Some(args.data.device),
            Command::Bench(BenchCommand::Forward(args)) => Some(args.device),
            Command::Bench(BenchCommand::Train(args)) => Some(args.device),
            _ => None,
        }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    if let Some(device) = cli.command.device()
        && let Err(err) = crate::device::check_device(device)
    {
        eprintln!("error: {err}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Demo(args) => commands::demo::run(args),
        Command::Score(args) => commands::score::run(args),
        Command::Train(args) => commands::train::run(*args),
        Command::Node(args) => commands::node::run(*args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Rouge(args) => commands::rouge::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Data(command) => commands::data::run(command),
        Command::Model(ModelCommand::Info(args)) if args.memory.memory => {
            commands::model_info::memory(
                &args.memory,
                args.preset.as_deref(),
                args.model.as_deref(),
            )
        }
        Command::Model(ModelCommand::Info(args)) => commands::model_info::run(args),
        Command::Model(ModelCommand::Export(args)) => commands::model_info::export(args),
        Command::Bench(BenchCommand::Forward(args)) => commands::bench::forward(args),
        Command::Bench(BenchCommand::Train(args)) => commands::bench::train(args),
        Command::Bench(BenchCommand::Codec(args)) => commands::bench::codec(args),
        Command::Bench(BenchCommand::Link(args)) => commands::bench::link(args),
        Command::Bench(BenchCommand::Fetch(args)) => commands::bench_fetch::fetch(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
