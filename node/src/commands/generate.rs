//! `meshtune generate`: greedy or beam-search summaries.

use burn::tensor::backend::Backend;
use meshtune_model::generate::{EarlyStopping, GenerationConfig, generate};

use crate::commands::examples;
use crate::commands::examples::DataArgs;
use crate::dispatch;
use clap::Args;

/// `--early-stopping false|true|never`, as HF's `early_stopping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EarlyStoppingArg {
    False,
    True,
    Never,
}

impl From<EarlyStoppingArg> for EarlyStopping {
    fn from(value: EarlyStoppingArg) -> Self {
        match value {
            EarlyStoppingArg::False => EarlyStopping::Heuristic,
            EarlyStoppingArg::True => EarlyStopping::Stop,
            EarlyStoppingArg::Never => EarlyStopping::Never,
        }
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    dispatch!(args.data.device, generate_on(&args))
}

fn generate_on<B: Backend>(device: B::Device, args: &GenerateArgs) -> anyhow::Result<()> {
    if args.num_beams == 0 {
        anyhow::bail!("--num-beams must be at least 1");
    }
    let loaded = examples::load::<B>(&device, &args.data)?;
    let config = &loaded.pretrained.config;
    let generation = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        num_beams: args.num_beams,
        length_penalty: args.length_penalty,
        early_stopping: args.early_stopping.into(),
        eos_token_id: config.eos_token_id,
        pad_token_id: config.pad_token_id,
        decoder_start_token_id: config.decoder_start_id(),
    };
    let bar = examples::progress(loaded.records.len(), "generating");
    for (start, chunk) in loaded
        .sources
        .chunks(args.data.batch_size)
        .enumerate()
        .map(|(i, c)| (i * args.data.batch_size, c))
    {
        let outputs = generate(&loaded.pretrained.model, chunk, &generation)?;
        for (record, output) in loaded.records[start..].iter().zip(outputs) {
            let text = loaded.pretrained.tokenizer.decode(&output.token_ids)?;
            let line = if args.data.json {
                serde_json::json!({"id": record.id, "token_ids": output.token_ids, "text": text})
                    .to_string()
            } else {
                format!("{}: {text}", record.id)
            };
            bar.suspend(|| println!("{line}"));
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(())
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 1 = greedy.
    #[arg(long, default_value_t = 1)]
    pub num_beams: usize,
    /// Beam score = log-prob / length^length_penalty.
    #[arg(long, default_value_t = 1.0)]
    pub length_penalty: f32,
    /// false (HF default heuristic), true, or never.
    #[arg(long, default_value = "false")]
    pub early_stopping: EarlyStoppingArg,
}
