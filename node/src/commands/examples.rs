//! Shared by `score` and `generate`: load the model folder and the examples, tokenize, and
//! report progress.

use crate::device::DeviceChoice;
use anyhow::Context;
use burn::tensor::backend::Backend;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use meshtune_model::data::{SamsumRecord, load_samsum};
use meshtune_model::pretrained::Pretrained;
use std::path::PathBuf;

/// A model folder plus tokenized examples.
pub struct LoadedExamples<B: Backend> {
    pub pretrained: Pretrained<B>,
    pub records: Vec<SamsumRecord>,
    pub sources: Vec<Vec<u32>>,
}

pub fn load<B: Backend>(device: &B::Device, args: &DataArgs) -> anyhow::Result<LoadedExamples<B>> {
    if args.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    let pretrained = Pretrained::<B>::load(&args.model, args.tokenizer.as_deref(), device)
        .with_context(|| format!("loading model folder {}", args.model.display()))?;
    let records = load_samsum(&args.data)?;
    let sources = records
        .iter()
        .map(|r| {
            pretrained.tokenizer.encode(
                &format!("{}{}", args.prefix, r.dialogue),
                args.max_source_len,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    tracing::info!(
        model = %args.model.display(),
        examples = records.len(),
        parameters = pretrained.config.num_parameters().total(),
        "loaded"
    );
    Ok(LoadedExamples {
        pretrained,
        records,
        sources,
    })
}

pub fn progress(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    let style =
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} examples, {per_sec}, eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar
}

/// Where the model and the examples come from.
#[derive(Debug, Args, Clone)]
pub struct DataArgs {
    /// HF T5 folder: config.json, model.safetensors (or sharded index), tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Samsum examples: JSONL or a JSON array with `id`, `dialogue`, `summary`.
    #[arg(long)]
    pub data: PathBuf,
    /// Text put before each dialogue.
    #[arg(long, default_value = "summarize: ")]
    pub prefix: String,
    /// tokenizer.json to use instead of MODEL/tokenizer.json.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Truncate sources to this many tokens (including `</s>`); no truncation by default.
    #[arg(long)]
    pub max_source_len: Option<usize>,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// One JSON object per line on stdout.
    #[arg(long)]
    pub json: bool,
}
