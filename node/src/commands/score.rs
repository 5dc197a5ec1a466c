//! `meshtune score`: per-example teacher-forced loss, as HF computes `loss` with `labels=`.

use burn::tensor::backend::Backend;
use meshtune_model::score::{Seq2SeqBatch, score_batch};

use crate::commands::examples;
use crate::commands::examples::DataArgs;
use crate::dispatch;
use clap::Args;

pub fn run(args: ScoreArgs) -> anyhow::Result<()> {
    dispatch!(args.data.device, score_on(&args))
}

fn score_on<B: Backend>(device: B::Device, args: &ScoreArgs) -> anyhow::Result<()> {
    let loaded = examples::load::<B>(&device, &args.data)?;
    let tokenizer = &loaded.pretrained.tokenizer;
    let config = &loaded.pretrained.config;
    let targets = loaded
        .records
        .iter()
        .map(|r| tokenizer.encode(&r.summary, args.max_target_len))
        .collect::<Result<Vec<_>, _>>()?;
    let bar = examples::progress(loaded.records.len(), "scoring");
    let mut total_nll = 0.0;
    let mut total_tokens = 0usize;
    for (start, chunk) in loaded
        .sources
        .chunks(args.data.batch_size)
        .enumerate()
        .map(|(i, c)| (i * args.data.batch_size, c))
    {
        let batch = Seq2SeqBatch::new(
            chunk,
            &targets[start..start + chunk.len()],
            config.pad_token_id,
            config.decoder_start_id(),
        )?;
        let losses = score_batch(&loaded.pretrained.model, &batch)?;
        for (record, loss) in loaded.records[start..].iter().zip(&losses) {
            total_nll += loss.loss * loss.tokens as f64;
            total_tokens += loss.tokens;
            let line = if args.data.json {
                serde_json::json!({"id": record.id, "loss": loss.loss, "tokens": loss.tokens})
                    .to_string()
            } else {
                format!(
                    "{:<16} loss {:>9.5}  tokens {:>4}",
                    record.id, loss.loss, loss.tokens
                )
            };
            bar.suspend(|| println!("{line}"));
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let mean = total_nll / total_tokens.max(1) as f64;
    tracing::info!(
        examples = loaded.records.len(),
        tokens = total_tokens,
        mean_token_loss = mean,
        "scored"
    );
    if !args.data.json {
        println!("mean token loss {mean:.5} over {total_tokens} tokens");
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Truncate targets to this many tokens (including `</s>`); no truncation by default.
    #[arg(long)]
    pub max_target_len: Option<usize>,
}
