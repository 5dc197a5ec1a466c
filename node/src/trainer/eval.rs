//! Held-out evaluation: token-mean loss and ROUGE of greedy summaries.

use burn::tensor::backend::Backend;
use meshtune_model::config::T5Config;
use meshtune_model::data::SamsumRecord;
use meshtune_model::error::ModelError;
use meshtune_model::generate::{GenerationConfig, generate};
use meshtune_model::rouge::mean_f_scores;
use meshtune_model::score::score_batch;
use meshtune_model::t5::T5;
use meshtune_model::tokenizer::T5Tokenizer;

use super::config::TrainConfig;
use super::data::{TokenizedExample, to_batch};

/// Eval loss (token mean) and mean ROUGE F (1, 2, L) of greedy summaries.
pub fn evaluate<B: Backend>(
    model: &T5<B>,
    config: &T5Config,
    tokenizer: &T5Tokenizer,
    eval: &[TokenizedExample],
    records: &[SamsumRecord],
    train: &TrainConfig,
) -> Result<(f64, (f64, f64, f64)), ModelError> {
    let count = eval.len().min(train.eval_examples.max(1));
    let mut nll = 0.0;
    let mut tokens = 0usize;
    let mut predictions = Vec::with_capacity(count);
    let generation = GenerationConfig::for_model(config, train.eval_max_new_tokens, 1);
    let rows: Vec<usize> = (0..count).collect();
    for chunk in rows.chunks(train.batch_size.max(1)) {
        let batch = to_batch(eval, chunk, config)?;
        for loss in score_batch(model, &batch)? {
            nll += loss.loss * loss.tokens as f64;
            tokens += loss.tokens;
        }
        let sources: Vec<Vec<u32>> = chunk.iter().map(|&i| eval[i].source.clone()).collect();
        for out in generate(model, &sources, &generation)? {
            predictions.push(tokenizer.decode(&out.token_ids)?);
        }
    }
    let scores = mean_f_scores(
        predictions
            .iter()
            .map(String::as_str)
            .zip(records.iter().take(count).map(|r| r.summary.as_str())),
    );
    Ok((
        nll / tokens.max(1) as f64,
        (scores.rouge1, scores.rouge2, scores.rouge_l),
    ))
}
