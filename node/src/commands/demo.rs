//! `meshtune demo`: the main job until the local testnet lands. On the bundled tiny FLAN-T5
//! fixture and the bundled Samsum-format examples (no arguments needed): loads the model,
//! scores every example, generates with greedy and beam search, and reports ROUGE against the
//! references with timings.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use meshtune_model::backend::Cpu;
use meshtune_model::data::load_samsum;
use meshtune_model::generate::{GenerationConfig, generate};
use meshtune_model::pretrained::Pretrained;
use meshtune_model::rouge::mean_f_scores;
use meshtune_model::score::{Seq2SeqBatch, score_batch};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Model folder (default: the bundled fixtures/models/flan-sharded-f16).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Examples (default: the bundled fixtures/samsum_tiny.jsonl).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    pub num_beams: usize,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
}

fn bundled(relative: &str) -> anyhow::Result<PathBuf> {
    let candidates = [
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(relative),
        PathBuf::from(relative),
    ];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .with_context(|| {
            format!("bundled {relative} not found: run from the meshtune checkout or pass a path")
        })
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let model_dir = match args.model {
        Some(dir) => dir,
        None => bundled("fixtures/models/flan-sharded-f16")?,
    };
    let data = match args.data {
        Some(path) => path,
        None => bundled("fixtures/samsum_tiny.jsonl")?,
    };
    let device = Default::default();
    let started = Instant::now();
    let loaded = Pretrained::<Cpu>::load(&model_dir, None, &device)
        .with_context(|| format!("loading {}", model_dir.display()))?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let records = load_samsum(&data)?;
    let tokenizer = &loaded.tokenizer;
    let config = &loaded.config;
    let sources = records
        .iter()
        .map(|r| tokenizer.encode(&format!("summarize: {}", r.dialogue), None))
        .collect::<Result<Vec<_>, _>>()?;
    let targets = records
        .iter()
        .map(|r| tokenizer.encode(&r.summary, None))
        .collect::<Result<Vec<_>, _>>()?;

    let t = Instant::now();
    let batch = Seq2SeqBatch::new(
        &sources,
        &targets,
        config.pad_token_id,
        config.decoder_start_id(),
    )?;
    let losses = score_batch(&loaded.model, &batch)?;
    let score_ms = t.elapsed().as_secs_f64() * 1e3;

    let mut generation = GenerationConfig::for_model(config, args.max_new_tokens, 1);
    let t = Instant::now();
    let greedy = generate(&loaded.model, &sources, &generation)?;
    let greedy_ms = t.elapsed().as_secs_f64() * 1e3;
    generation.num_beams = args.num_beams.max(1);
    let t = Instant::now();
    let beam = generate(&loaded.model, &sources, &generation)?;
    let beam_ms = t.elapsed().as_secs_f64() * 1e3;

    let count = config.num_parameters().total();
    println!(
        "model {} ({} parameters, {} + {} layers, vocab {}), loaded in {load_ms:.0} ms",
        model_dir.display(),
        count,
        config.num_layers,
        config.decoder_layers(),
        config.vocab_size
    );
    println!("data  {} ({} examples)\n", data.display(), records.len());
    let mut greedy_texts = Vec::new();
    let mut beam_texts = Vec::new();
    for (i, record) in records.iter().enumerate() {
        let g = tokenizer.decode(&greedy[i].token_ids)?;
        let b = tokenizer.decode(&beam[i].token_ids)?;
        println!(
            "[{}] loss {:.3} over {} tokens",
            record.id, losses[i].loss, losses[i].tokens
        );
        println!("  reference : {}", record.summary);
        println!("  greedy    : {g}");
        println!("  beam x{}   : {b}", generation.num_beams);
        greedy_texts.push(g);
        beam_texts.push(b);
    }
    let rouge = |texts: &[String]| {
        mean_f_scores(
            texts
                .iter()
                .map(String::as_str)
                .zip(records.iter().map(|r| r.summary.as_str())),
        )
    };
    let (rg, rb) = (rouge(&greedy_texts), rouge(&beam_texts));
    let nll: f64 = losses.iter().map(|l| l.loss * l.tokens as f64).sum();
    let tokens: usize = losses.iter().map(|l| l.tokens).sum();
    println!();
    println!(
        "{:<22} {:>10} {:>10} {:>10}",
        "", "ROUGE-1", "ROUGE-2", "ROUGE-L"
    );
    println!(
        "{:<22} {:>10.4} {:>10.4} {:>10.4}",
        "greedy", rg.rouge1, rg.rouge2, rg.rouge_l
    );
    println!(
        "{:<22} {:>10.4} {:>10.4} {:>10.4}",
        format!("beam x{}", generation.num_beams),
        rb.rouge1,
        rb.rouge2,
        rb.rouge_l
    );
    println!(
        "\nmean token loss {:.4} ({tokens} tokens); score {score_ms:.0} ms, greedy {greedy_ms:.0} ms, beam {beam_ms:.0} ms",
        nll / tokens.max(1) as f64
    );
    tracing::info!(
        examples = records.len(),
        rouge_l_greedy = rg.rouge_l,
        rouge_l_beam = rb.rouge_l,
        "demo finished"
    );
    Ok(())
}
