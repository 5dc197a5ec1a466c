//! `meshtune eval`: generate summaries for a Samsum file and score them (teacher-forced loss and
//! ROUGE against the references).

use burn::tensor::backend::Backend;
use clap::Args;
use meshtune_model::generate::{GenerationConfig, generate};
use meshtune_model::rouge::mean_f_scores;
use meshtune_model::score::{Seq2SeqBatch, score_batch};

use crate::commands::examples;
use crate::commands::examples::DataArgs;
use crate::dispatch;

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long, default_value_t = 1)]
    pub num_beams: usize,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    dispatch!(args.data.device, eval_on(&args))
}

fn eval_on<B: Backend>(device: B::Device, args: &EvalArgs) -> anyhow::Result<()> {
    if args.num_beams == 0 {
        anyhow::bail!("--num-beams must be at least 1");
    }
    let loaded = examples::load::<B>(&device, &args.data)?;
    let config = &loaded.pretrained.config;
    let tokenizer = &loaded.pretrained.tokenizer;
    let targets = loaded
        .records
        .iter()
        .map(|r| tokenizer.encode(&r.summary, None))
        .collect::<Result<Vec<_>, _>>()?;
    let generation = GenerationConfig::for_model(config, args.max_new_tokens, args.num_beams);
    let bar = examples::progress(loaded.records.len(), "evaluating");
    let (mut nll, mut tokens) = (0.0, 0usize);
    let mut predictions = Vec::with_capacity(loaded.records.len());
    let size = args.data.batch_size;
    for (i, chunk) in loaded.sources.chunks(size).enumerate() {
        let start = i * size;
        let batch = Seq2SeqBatch::new(
            chunk,
            &targets[start..start + chunk.len()],
            config.pad_token_id,
            config.decoder_start_id(),
        )?;
        for loss in score_batch(&loaded.pretrained.model, &batch)? {
            nll += loss.loss * loss.tokens as f64;
            tokens += loss.tokens;
        }
        for out in generate(&loaded.pretrained.model, chunk, &generation)? {
            predictions.push(tokenizer.decode(&out.token_ids)?);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let scores = mean_f_scores(
        predictions
            .iter()
            .map(String::as_str)
            .zip(loaded.records.iter().map(|r| r.summary.as_str())),
    );
    let loss = nll / tokens.max(1) as f64;
    if args.data.json {
        println!(
            "{}",
            serde_json::json!({"examples": loaded.records.len(), "loss": loss, "rouge1": scores.rouge1,
                "rouge2": scores.rouge2, "rougeL": scores.rouge_l, "rougeLsum": scores.rouge_lsum})
        );
    } else {
        println!("examples   {}", loaded.records.len());
        println!("loss       {loss:.4} (mean token cross-entropy)");
        println!("ROUGE-1    {:.4}", scores.rouge1);
        println!("ROUGE-2    {:.4}", scores.rouge2);
        println!("ROUGE-L    {:.4}", scores.rouge_l);
        println!("ROUGE-Lsum {:.4}", scores.rouge_lsum);
    }
    Ok(())
}
