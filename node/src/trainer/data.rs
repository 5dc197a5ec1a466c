//! Local data as the trainer feeds it: tokenized examples, the deterministic batch order of
//! each epoch (seeded shuffle, length bucketing) and padded batches.
//!
//! Owns: the order in which a node sees its examples. Must not touch: the model or files.

use meshtune_model::config::T5Config;
use meshtune_model::data::SamsumRecord;
use meshtune_model::error::ModelError;
use meshtune_model::score::Seq2SeqBatch;
use meshtune_model::tokenizer::T5Tokenizer;
use rand::{RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;

use super::config::TrainConfig;

/// A tokenized example.
#[derive(Debug, Clone)]
pub struct TokenizedExample {
    pub source: Vec<u32>,
    pub target: Vec<u32>,
}

/// Deterministic order of the batches of epoch `epoch`: shuffle by `seed + epoch`, sort windows
/// of 50 batches' worth of examples by source length (length bucketing keeps padding small),
/// cut into batches, shuffle the batches.
pub fn epoch_batches(
    examples: &[TokenizedExample],
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut rng = SplitMix64::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..examples.len()).collect();
    shuffle(&mut order, &mut rng);
    let window = batch_size * 50;
    let mut batches = Vec::new();
    for chunk in order.chunks_mut(window) {
        chunk.sort_by_key(|&i| (examples[i].source.len(), i));
        batches.extend(chunk.chunks(batch_size).map(<[usize]>::to_vec));
    }
    shuffle(&mut batches, &mut rng);
    batches
}

fn shuffle<T>(items: &mut [T], rng: &mut SplitMix64) {
    for i in (1..items.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

pub fn tokenize(
    records: &[SamsumRecord],
    tokenizer: &T5Tokenizer,
    config: &TrainConfig,
) -> Result<Vec<TokenizedExample>, ModelError> {
    records
        .iter()
        .map(|r| {
            Ok(TokenizedExample {
                source: tokenizer.encode(
                    &format!("{}{}", config.prefix, r.dialogue),
                    Some(config.source_max_len),
                )?,
                target: tokenizer.encode(&r.summary, Some(config.target_max_len))?,
            })
        })
        .collect()
}

pub fn to_batch(
    examples: &[TokenizedExample],
    rows: &[usize],
    model: &T5Config,
) -> Result<Seq2SeqBatch, ModelError> {
    let sources: Vec<Vec<u32>> = rows.iter().map(|&i| examples[i].source.clone()).collect();
    let targets: Vec<Vec<u32>> = rows.iter().map(|&i| examples[i].target.clone()).collect();
    Seq2SeqBatch::new(
        &sources,
        &targets,
        model.pad_token_id,
        model.decoder_start_id(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(n: usize) -> Vec<TokenizedExample> {
        (0..n)
            .map(|i| TokenizedExample {
                source: vec![5; 1 + (i * 7) % 23],
                target: vec![6; 2],
            })
            .collect()
    }

    #[test]
    fn batches_are_deterministic_and_cover_every_example_once() {
        let ex = examples(103);
        let a = epoch_batches(&ex, 8, 7, 0);
        assert_eq!(a, epoch_batches(&ex, 8, 7, 0));
        assert_ne!(a, epoch_batches(&ex, 8, 7, 1));
        let mut seen: Vec<usize> = a.concat();
        seen.sort_unstable();
        assert_eq!(seen, (0..103).collect::<Vec<_>>());
    }

    #[test]
    fn bucketing_reduces_padding() {
        let ex = examples(400);
        let padded = |batches: &[Vec<usize>]| -> usize {
            batches
                .iter()
                .map(|b| {
                    let max = b.iter().map(|&i| ex[i].source.len()).max().unwrap_or(0);
                    b.iter().map(|&i| max - ex[i].source.len()).sum::<usize>()
                })
                .sum()
        };
        let bucketed = epoch_batches(&ex, 8, 1, 0);
        let mut rng = SplitMix64::seed_from_u64(1);
        let mut order: Vec<usize> = (0..400).collect();
        shuffle(&mut order, &mut rng);
        let plain: Vec<Vec<usize>> = order.chunks(8).map(<[usize]>::to_vec).collect();
        assert!(
            padded(&bucketed) * 3 < padded(&plain),
            "{} vs {}",
            padded(&bucketed),
            padded(&plain)
        );
    }

    /// The published splitmix64 reference outputs (Vigna's `splitmix64.c`, seed 1234567): the
    /// batch order of every node and every run depends on this stream staying the same.
    #[test]
    fn the_shuffle_stream_is_the_reference_splitmix64() {
        let mut rng = SplitMix64::seed_from_u64(1_234_567);
        let first: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(
            first,
            [
                6_457_827_717_110_365_317,
                3_203_168_211_198_807_973,
                9_817_491_932_198_370_423
            ]
        );
    }
}
