//! Parity of `meshtune_model::rouge` with Google's `rouge-score` (and the NLTK
//! Porter stemmer it calls), against fixtures committed under
//! `fixtures/rouge/` by `scripts/make_rouge_fixture.py`. No Python needed.

use std::path::PathBuf;

use meshtune_model::rouge::{self, RougeScore, RougeScores};
use serde::Deserialize;

const TOLERANCE: f64 = 1e-4;

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/rouge")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

#[derive(Debug, Deserialize)]
struct ExpectedScore {
    p: f64,
    r: f64,
    f: f64,
}

#[derive(Debug, Deserialize)]
struct Case {
    prediction: String,
    reference: String,
    rouge1: ExpectedScore,
    rouge2: ExpectedScore,
    #[serde(rename = "rougeL")]
    rouge_l: ExpectedScore,
    #[serde(rename = "rougeLsum")]
    rouge_lsum: ExpectedScore,
}

/// Largest absolute difference between our precision/recall/F and Python's.
fn max_difference(actual: &RougeScore, expected: &ExpectedScore) -> f64 {
    [
        (actual.precision - expected.p).abs(),
        (actual.recall - expected.r).abs(),
        (actual.fmeasure - expected.f).abs(),
    ]
    .into_iter()
    .fold(0.0, f64::max)
}

#[test]
fn every_case_matches_rouge_score() {
    let cases: Vec<Case> = fixture("cases.jsonl")
        .lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("cases.jsonl line {}: {e}", i + 1))
        })
        .collect();
    assert!(cases.len() >= 300, "only {} cases in fixture", cases.len());

    let mut failures = Vec::new();
    let mut worst = 0.0f64;
    for (i, case) in cases.iter().enumerate() {
        let actual = rouge::score(&case.prediction, &case.reference);
        for (kind, actual, expected) in [
            ("rouge1", &actual.rouge1, &case.rouge1),
            ("rouge2", &actual.rouge2, &case.rouge2),
            ("rougeL", &actual.rouge_l, &case.rouge_l),
            ("rougeLsum", &actual.rouge_lsum, &case.rouge_lsum),
        ] {
            let difference = max_difference(actual, expected);
            worst = worst.max(difference);
            if difference > TOLERANCE {
                failures.push(format!(
                    "line {}: {kind} {actual:?} != {expected:?}\n  prediction={:?}\n  reference={:?}",
                    i + 1,
                    case.prediction,
                    case.reference
                ));
            }
        }
    }
    println!("{} cases, max |difference| {worst:e}", cases.len());
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_stem_matches_nltk() {
    let text = fixture("stems.tsv");
    let mut count = 0;
    let mut failures = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let (word, expected) = line
            .split_once('\t')
            .unwrap_or_else(|| panic!("stems.tsv line {} has no tab", i + 1));
        let actual = rouge::stem(word);
        if actual != expected {
            failures.push(format!("{word}: got {actual}, nltk {expected}"));
        }
        count += 1;
    }
    assert!(count >= 2000, "only {count} stems in fixture");
    assert!(
        failures.is_empty(),
        "{} of {count} stems differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn corpus_means_match_rouge_score() {
    let predictions = fixture("predictions.txt");
    let references = fixture("references.txt");
    let predictions: Vec<&str> = predictions.lines().collect();
    let references: Vec<&str> = references.lines().collect();
    assert_eq!(predictions.len(), references.len());

    let expected: RougeScores = serde_json::from_str(&fixture("corpus_expected.json"))
        .unwrap_or_else(|e| panic!("corpus_expected.json: {e}"));
    let actual = rouge::mean_f_scores(predictions.iter().copied().zip(references.iter().copied()));
    for (kind, actual, expected) in [
        ("rouge1", actual.rouge1, expected.rouge1),
        ("rouge2", actual.rouge2, expected.rouge2),
        ("rougeL", actual.rouge_l, expected.rouge_l),
        ("rougeLsum", actual.rouge_lsum, expected.rouge_lsum),
    ] {
        assert!(
            (actual - expected).abs() <= TOLERANCE,
            "{kind}: {actual} != {expected}"
        );
    }

    // The CLI prints this struct as JSON; the keys must be rouge-score's.
    let json = serde_json::to_value(actual).unwrap_or_else(|e| panic!("serialize: {e}"));
    let mut keys: Vec<&str> = json
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort_unstable();
    assert_eq!(keys, ["rouge1", "rouge2", "rougeL", "rougeLsum"]);
}
