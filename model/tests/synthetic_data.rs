//! The bundled synthetic task as committed in `fixtures/synthetic/`: the data is what the
//! generator produces, the tokenizer covers it without `<unk>` and keeps common words whole,
//! the config parses, and retraining the tokenizer gives the same properties.
//!
//! Regenerate the bundle (after changing the generator) with
//! `cargo test -p meshtune-model --test synthetic_data -- --ignored regenerate_bundle`.

use std::path::{Path, PathBuf};

use meshtune_model::T5Config;
use meshtune_model::data::{SamsumRecord, load_samsum};
use meshtune_model::synthetic::{
    self, ACTIVITIES, DAYS, NAMES, PLACES, SyntheticConfig, TIMES, TOKENIZER_VOCAB_SIZE,
    eval_examples_for, generate_corpus, train_tokenizer, write_bundle,
};
use meshtune_model::tokenizer::T5Tokenizer;

const PREFIX: &str = "summarize: ";

fn bundle_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/synthetic")
}

fn committed_tokenizer() -> T5Tokenizer {
    T5Tokenizer::from_file(&bundle_dir().join("tokenizer.json")).expect("committed tokenizer")
}

fn collapse_whitespace(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn encode(tokenizer: &T5Tokenizer, text: &str) -> Vec<u32> {
    tokenizer.encode(text, None).expect("encode")
}

/// Checks every record encodes without `<unk>`, ends in `</s>` and decodes back.
fn assert_round_trips(tokenizer: &T5Tokenizer, records: &[SamsumRecord]) {
    let unk = tokenizer.token_id("<unk>").expect("<unk>");
    for record in records {
        for text in [
            format!("{PREFIX}{}", record.dialogue),
            record.summary.clone(),
        ] {
            let ids = encode(tokenizer, &text);
            assert!(!ids.contains(&unk), "<unk> in {text:?}: {ids:?}");
            assert_eq!(ids.last(), Some(&1), "no </s> after {text:?}");
            let decoded = tokenizer.decode(&ids).expect("decode");
            assert_eq!(decoded, collapse_whitespace(&text));
        }
    }
}

/// Every word a summary is made of is one piece (plus `</s>`), and so are names followed
/// by punctuation ("Tom:" is "▁Tom" + ":").
fn assert_common_words_whole(tokenizer: &T5Tokenizer) {
    let mut words: Vec<&str> = vec!["will", "meet", "and", "at", "on", "to", "can't", "come"];
    words.extend(NAMES);
    words.extend(DAYS);
    words.extend(TIMES.iter().flat_map(|t| t.split(' ')));
    words.extend(PLACES.iter().chain(&ACTIVITIES).flat_map(|p| p.split(' ')));
    let split: Vec<(&str, usize)> = words
        .iter()
        .map(|w| (*w, encode(tokenizer, w).len() - 1))
        .filter(|(_, pieces)| *pieces != 1)
        .collect();
    assert!(split.is_empty(), "split into several pieces: {split:?}");
    for name in NAMES {
        let alone = encode(tokenizer, name);
        let speaking = encode(tokenizer, &format!("{name}:"));
        assert_eq!(speaking.len(), 3, "{name}:");
        assert_eq!(
            speaking[0], alone[0],
            "{name}: starts with another piece than {name}"
        );
    }
}

/// The pieces a corpus word should be: leading punctuation, the alphanumeric core, a
/// possessive "'s", trailing punctuation ("Tom's," -> 3, "Monday?" -> 2, ":)" -> 1).
fn expected_pieces(word: &str) -> usize {
    let Some(start) = word.find(char::is_alphanumeric) else {
        return 1;
    };
    let end = word
        .rfind(char::is_alphanumeric)
        .map_or(word.len(), |i| i + 1);
    let core = &word[start..end];
    usize::from(start > 0)
        + 1
        + usize::from(core.len() > 2 && core.ends_with("'s"))
        + usize::from(end < word.len())
}

/// Every word of the corpus is exactly [`expected_pieces`] pieces: word-level, with
/// punctuation as its own piece.
fn assert_every_word_whole(tokenizer: &T5Tokenizer, records: &[SamsumRecord]) {
    let words: std::collections::BTreeSet<&str> = records
        .iter()
        .flat_map(|r| {
            r.dialogue
                .split_whitespace()
                .chain(r.summary.split_whitespace())
        })
        .collect();
    let split: Vec<(&str, usize)> = words
        .iter()
        .map(|w| (*w, encode(tokenizer, w).len() - 1))
        .filter(|(w, pieces)| *pieces != expected_pieces(w))
        .collect();
    assert!(split.is_empty(), "{} words split: {split:?}", split.len());
}

#[test]
fn committed_data_is_what_the_generator_makes() {
    let config = SyntheticConfig::default();
    let train = load_samsum(&bundle_dir().join("train.jsonl")).expect("train.jsonl");
    let eval = load_samsum(&bundle_dir().join("eval.jsonl")).expect("eval.jsonl");
    assert_eq!(train.len(), config.examples);
    assert_eq!(eval.len(), eval_examples_for(config.examples));
    let mut all = train.clone();
    all.extend(eval.iter().cloned());
    let generated = generate_corpus(&SyntheticConfig {
        examples: all.len(),
        seed: config.seed,
    });
    assert!(
        all == generated,
        "fixtures/synthetic is stale: regenerate it (see fixtures/synthetic/README.md)"
    );
    assert!(
        eval.iter()
            .all(|e| train.iter().all(|t| t.dialogue != e.dialogue)),
        "an eval dialogue is also a training dialogue"
    );
    // The embedded copy is the committed one.
    assert_eq!(
        synthetic::embedded::train_records().expect("embedded"),
        train
    );
    assert_eq!(synthetic::embedded::eval_records().expect("embedded"), eval);
}

#[test]
fn committed_tokenizer_covers_the_corpus() {
    let tokenizer = committed_tokenizer();
    for (token, id) in [("<pad>", 0), ("</s>", 1), ("<unk>", 2)] {
        assert_eq!(tokenizer.token_id(token), Some(id), "{token}");
    }
    // The trainer stops at the pieces the corpus supports: about one per distinct word.
    let vocab = tokenizer.vocab_size();
    assert!(
        (400..=TOKENIZER_VOCAB_SIZE).contains(&vocab),
        "vocab {vocab}"
    );
    let mut records = synthetic::embedded::train_records().expect("train");
    records.extend(synthetic::embedded::eval_records().expect("eval"));
    assert_round_trips(&tokenizer, &records);
    assert_common_words_whole(&tokenizer);
    assert_every_word_whole(&tokenizer, &records);
    // Any printable ASCII, even unseen, is covered.
    let unk = tokenizer.token_id("<unk>").expect("<unk>");
    let odd = "Xavier: 42 #tags & {braces} | ~tilde ^caret `tick` \\ \"q\"";
    assert!(!encode(&tokenizer, odd).contains(&unk));
    let embedded = synthetic::embedded::tokenizer().expect("embedded tokenizer");
    assert_eq!(embedded.get_vocab_size(true), vocab);
}

#[test]
fn committed_config_is_a_tiny_flan_t5_for_the_tokenizer() {
    let config = T5Config::from_file(&bundle_dir().join("config.json")).expect("config.json");
    let vocab = committed_tokenizer().vocab_size();
    assert_eq!(config.vocab_size, vocab.div_ceil(8) * 8);
    assert_eq!(config.feed_forward_proj, "gated-gelu");
    assert!(!config.tie_word_embeddings);
    assert_eq!(
        (config.d_model, config.d_kv, config.num_heads),
        (128, 32, 4)
    );
    assert_eq!(
        (config.d_ff, config.num_layers, config.decoder_layers()),
        (256, 3, 3)
    );
    assert_eq!(config.decoder_start_id(), 0);
    assert_eq!((config.pad_token_id, config.eos_token_id), (0, 1));
    assert_eq!(config.dropout_rate, 0.0);
    committed_tokenizer()
        .check_fits_model(config.vocab_size)
        .expect("tokenizer fits");
    let embedded = T5Config::from_json_str(synthetic::embedded::CONFIG_JSON).expect("embedded");
    assert_eq!(embedded, config);
}

#[test]
fn corpus_lengths_suit_a_tiny_model() {
    let tokenizer = committed_tokenizer();
    let records = synthetic::embedded::train_records().expect("train");
    let source: Vec<usize> = records
        .iter()
        .map(|r| encode(&tokenizer, &format!("{PREFIX}{}", r.dialogue)).len())
        .collect();
    let target: Vec<usize> = records
        .iter()
        .map(|r| encode(&tokenizer, &r.summary).len())
        .collect();
    let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len() as f64;
    let max = |v: &[usize]| v.iter().copied().max().unwrap_or(0);
    println!(
        "{} records; source tokens mean {:.1} max {}; summary tokens mean {:.1} max {}",
        records.len(),
        mean(&source),
        max(&source),
        mean(&target),
        max(&target)
    );
    assert!(max(&source) <= 192, "source max {}", max(&source));
    assert!(max(&target) <= 48, "target max {}", max(&target));
}

#[test]
fn retrained_tokenizer_has_the_same_properties() {
    let records = generate_corpus(&SyntheticConfig {
        examples: 600,
        seed: 5,
    });
    let trained = train_tokenizer(&records, 1200).expect("train");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokenizer.json");
    trained.save(&path, false).expect("save");
    let tokenizer = T5Tokenizer::from_file(&path).expect("reload");
    for (token, id) in [("<pad>", 0), ("</s>", 1), ("<unk>", 2)] {
        assert_eq!(tokenizer.token_id(token), Some(id), "{token}");
    }
    assert!(tokenizer.vocab_size() <= 1200);
    assert_round_trips(&tokenizer, &records);
    assert_every_word_whole(&tokenizer, &records);
    // Unseen examples of the same generator are covered too.
    let unseen = generate_corpus(&SyntheticConfig {
        examples: 100,
        seed: 6,
    });
    assert_round_trips(&tokenizer, &unseen);
    for word in ["will", "meet", "and", "Monday", "library", "summarize"] {
        assert_eq!(encode(&tokenizer, word).len(), 2, "{word}");
    }
}

#[test]
fn write_bundle_writes_a_loadable_bundle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = SyntheticConfig {
        examples: 300,
        seed: 3,
    };
    let summary = write_bundle(dir.path(), &config).expect("write");
    assert_eq!(summary.train_examples, 300);
    assert_eq!(summary.eval_examples, 15);
    assert_eq!(summary.model_vocab, summary.tokenizer_vocab.div_ceil(8) * 8);
    let train = load_samsum(&dir.path().join("train.jsonl")).expect("train");
    let eval = load_samsum(&dir.path().join("eval.jsonl")).expect("eval");
    assert_eq!((train.len(), eval.len()), (300, 15));
    assert_eq!(eval[0].id, "synth-000300");
    let tokenizer = T5Tokenizer::from_file(&dir.path().join("tokenizer.json")).expect("tok");
    assert_eq!(tokenizer.vocab_size(), summary.tokenizer_vocab);
    let config = T5Config::from_file(&dir.path().join("config.json")).expect("config");
    assert_eq!(config.vocab_size, summary.model_vocab);
    assert!(
        write_bundle(
            dir.path(),
            &SyntheticConfig {
                examples: 0,
                seed: 1
            }
        )
        .is_err()
    );
}

#[test]
fn embedded_bundle_writes_the_committed_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    synthetic::embedded::write_to(dir.path()).expect("write");
    for name in ["train.jsonl", "eval.jsonl", "tokenizer.json", "config.json"] {
        let written = std::fs::read(dir.path().join(name)).expect("written");
        let committed = std::fs::read(bundle_dir().join(name)).expect("committed");
        assert!(written == committed, "{name} differs");
    }
}

/// Rewrites `fixtures/synthetic/` (data, a freshly trained tokenizer and the config).
/// The tokenizer is not bit-reproducible, so run this only when the generator changes.
#[test]
#[ignore = "rewrites the committed fixtures"]
fn regenerate_bundle() {
    let summary = write_bundle(&bundle_dir(), &SyntheticConfig::default()).expect("write");
    println!("{summary:?}");
}
