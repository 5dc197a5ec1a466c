//! `meshtune data split` (one shard per node for federated experiments) and
//! `meshtune data synth` (regenerate the bundled synthetic corpus, tokenizer and tiny config)
//! and `meshtune data potluck` (regenerate the second, harder task of `fixtures/potluck/`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use meshtune_model::data::load_samsum;
use meshtune_model::potluck;
use meshtune_model::split::{SplitStrategy, label_of, split_records};
use meshtune_model::synthetic::{SyntheticConfig, to_jsonl, write_bundle};

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Split a Samsum file into one JSONL shard per node.
    Split(SplitArgs),
    /// Write the synthetic corpus (train/eval JSONL), a tokenizer trained on it and a tiny config.
    Synth(SynthArgs),
    /// Write the potluck corpus (the harder second task: `fixtures/potluck/` is its default).
    Potluck(PotluckArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyArg {
    Iid,
    Dirichlet,
    ByLength,
}

#[derive(Debug, Args)]
pub struct SplitArgs {
    /// Samsum JSONL or JSON array.
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long)]
    pub nodes: usize,
    #[arg(long, value_enum, default_value = "dirichlet")]
    pub strategy: StrategyArg,
    /// Dirichlet concentration: small (0.1) = skewed shards, large (100) = close to IID.
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Output directory: node-000.jsonl, node-001.jsonl, ...
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    #[arg(long, default_value_t = 4000)]
    pub examples: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct PotluckArgs {
    #[arg(long, default_value_t = potluck::FIXTURE_TRAIN)]
    pub train: usize,
    #[arg(long, default_value_t = potluck::FIXTURE_EVAL)]
    pub eval: usize,
    #[arg(long, default_value_t = potluck::FIXTURE_SEED)]
    pub seed: u64,
    /// Output directory: train.jsonl, eval.jsonl.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(command: DataCommand) -> anyhow::Result<()> {
    match command {
        DataCommand::Split(args) => split(args),
        DataCommand::Synth(args) => {
            let summary = write_bundle(
                &args.out,
                &SyntheticConfig {
                    examples: args.examples,
                    seed: args.seed,
                },
            )?;
            println!(
                "wrote {} train + {} eval examples, tokenizer ({} ids) and config.json (vocab {}) to {}",
                summary.train_examples,
                summary.eval_examples,
                summary.tokenizer_vocab,
                summary.model_vocab,
                args.out.display()
            );
            Ok(())
        }
        DataCommand::Potluck(args) => write_potluck(&args),
    }
}

/// The first `train` records of the stream as train.jsonl, the next `eval` as eval.jsonl.
fn write_potluck(args: &PotluckArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.train > 0 && args.eval > 0,
        "--train and --eval must be positive"
    );
    let mut records = potluck::generate_corpus(args.seed, args.train + args.eval);
    let eval = records.split_off(args.train);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for (name, part) in [("train.jsonl", &records), ("eval.jsonl", &eval)] {
        let path = args.out.join(name);
        std::fs::write(&path, to_jsonl(part)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "wrote {} train + {} eval potluck examples to {}",
        records.len(),
        eval.len(),
        args.out.display()
    );
    Ok(())
}

fn split(args: SplitArgs) -> anyhow::Result<()> {
    let records = load_samsum(&args.input)?;
    let strategy = match args.strategy {
        StrategyArg::Iid => SplitStrategy::Iid,
        StrategyArg::Dirichlet => SplitStrategy::Dirichlet { alpha: args.alpha },
        StrategyArg::ByLength => SplitStrategy::ByLength,
    };
    let shards = split_records(&records, args.nodes, &strategy, args.seed)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    println!(
        "{:<14} {:>8} {:>8}  labels (Dirichlet buckets)",
        "shard", "examples", "labels"
    );
    for (node, shard) in shards.iter().enumerate() {
        let path = args.out.join(format!("node-{node:03}.jsonl"));
        std::fs::write(&path, to_jsonl(shard)?)
            .with_context(|| format!("writing {}", path.display()))?;
        let mut labels = [0usize; 16];
        for record in shard {
            labels[label_of(record) % 16] += 1;
        }
        let distinct = labels.iter().filter(|&&c| c > 0).count();
        println!(
            "{:<14} {:>8} {:>8}  {:?}",
            format!("node-{node:03}"),
            shard.len(),
            distinct,
            &labels[..10]
        );
    }
    tracing::info!(input = %args.input.display(), nodes = args.nodes, strategy = ?strategy, "split written");
    Ok(())
}
