//! ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum, equal to Google's `rouge-score`
//! package as evaluation scripts usually call it:
//! `RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)`.
//!
//! This module owns tokenization, stemming and scoring of text pairs. It must not do
//! I/O; reading prediction/reference files is the caller's business.
//! Parity with the Python package is checked by `tests/rouge_parity.rs`
//! against fixtures written by `scripts/make_rouge_fixture.py`; anything that
//! looks odd here (which LCS the backtrack picks, the `max(count, 1)`
//! denominators) is there because the Python does it.

mod porter;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

pub use porter::stem;

/// Only tokens longer than this are stemmed; tokens of up to three characters
/// are kept as they are (rouge-score's rule, not Porter's).
const MAX_UNSTEMMED_LEN: usize = 3;

/// Precision, recall and F-measure of one ROUGE type for one pair.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RougeScore {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

impl RougeScore {
    fn new(precision: f64, recall: f64) -> Self {
        Self {
            precision,
            recall,
            fmeasure: fmeasure(precision, recall),
        }
    }
}

/// All four ROUGE types for one prediction/reference pair.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RougeScoresDetailed {
    pub rouge1: RougeScore,
    pub rouge2: RougeScore,
    #[serde(rename = "rougeL")]
    pub rouge_l: RougeScore,
    #[serde(rename = "rougeLsum")]
    pub rouge_lsum: RougeScore,
}

impl RougeScoresDetailed {
    /// The F-measures alone.
    pub fn f_measures(&self) -> RougeScores {
        RougeScores {
            rouge1: self.rouge1.fmeasure,
            rouge2: self.rouge2.fmeasure,
            rouge_l: self.rouge_l.fmeasure,
            rouge_lsum: self.rouge_lsum.fmeasure,
        }
    }
}

/// F-measures of the four ROUGE types. Serializes with rouge-score's names:
/// `{"rouge1":…,"rouge2":…,"rougeL":…,"rougeLsum":…}`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RougeScores {
    pub rouge1: f64,
    pub rouge2: f64,
    #[serde(rename = "rougeL")]
    pub rouge_l: f64,
    #[serde(rename = "rougeLsum")]
    pub rouge_lsum: f64,
}

/// Scores one prediction against one reference. Text that yields no tokens
/// (empty, punctuation only, non-Latin scripts) scores 0.
pub fn score(prediction: &str, reference: &str) -> RougeScoresDetailed {
    let prediction_tokens = tokenize(prediction);
    let reference_tokens = tokenize(reference);
    RougeScoresDetailed {
        rouge1: score_ngrams(&prediction_tokens, &reference_tokens, 1),
        rouge2: score_ngrams(&prediction_tokens, &reference_tokens, 2),
        rouge_l: score_lcs(&prediction_tokens, &reference_tokens),
        rouge_lsum: score_summary_lcs(
            &tokenize_sentences(prediction),
            &tokenize_sentences(reference),
        ),
    }
}

/// Mean over `(prediction, reference)` pairs of each pair's F-measures, the
/// corpus figure summarization papers report. No pairs gives all zeros.
pub fn mean_f_scores<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> RougeScores {
    let mut sum = RougeScores::default();
    let mut count = 0usize;
    for (prediction, reference) in pairs {
        let f = score(prediction, reference).f_measures();
        sum.rouge1 += f.rouge1;
        sum.rouge2 += f.rouge2;
        sum.rouge_l += f.rouge_l;
        sum.rouge_lsum += f.rouge_lsum;
        count += 1;
    }
    if count == 0 {
        return sum;
    }
    let n = count as f64;
    RougeScores {
        rouge1: sum.rouge1 / n,
        rouge2: sum.rouge2 / n,
        rouge_l: sum.rouge_l / n,
        rouge_lsum: sum.rouge_lsum / n,
    }
}

/// rouge-score's tokenizer with stemming: lowercase, every run of characters
/// outside `[a-z0-9]` becomes a separator, tokens longer than three
/// characters are Porter-stemmed.
///
/// Lowercasing is Unicode-aware before the ASCII filter, as Python's
/// `str.lower()` is, so `İ` gives `i` and the Kelvin sign gives `k`, while
/// `é`, `ü` and CJK characters separate tokens (`café` -> `caf`).
pub fn tokenize(text: &str) -> Vec<String> {
    let normalized: String = text
        .chars()
        .flat_map(char::to_lowercase)
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                ' '
            }
        })
        .collect();
    normalized
        .split(' ')
        .filter(|token| !token.is_empty())
        .map(|token| {
            if token.len() > MAX_UNSTEMMED_LEN {
                stem(token)
            } else {
                token.to_string()
            }
        })
        // rouge-score drops anything a stemmer made empty or invalid.
        .filter(|token| {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        .collect()
}

/// Sentences for ROUGE-Lsum: split on `\n` only, empty lines dropped before
/// tokenizing (a line of punctuation stays as an empty sentence).
fn tokenize_sentences(text: &str) -> Vec<Vec<String>> {
    text.split('\n')
        .filter(|sentence| !sentence.is_empty())
        .map(tokenize)
        .collect()
}

/// `scoring.fmeasure`: harmonic mean, 0 when both are 0.
fn fmeasure(precision: f64, recall: f64) -> f64 {
    if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    }
}

fn ngram_counts(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    if tokens.len() >= n {
        for ngram in tokens.windows(n) {
            *counts.entry(ngram).or_insert(0) += 1;
        }
    }
    counts
}

/// ROUGE-N with clipped counts. The denominators are `max(count, 1)` as in
/// rouge-score, so a side with no n-grams scores 0 instead of dividing by 0.
fn score_ngrams(prediction: &[String], reference: &[String], n: usize) -> RougeScore {
    let prediction_counts = ngram_counts(prediction, n);
    let reference_counts = ngram_counts(reference, n);
    let overlap: usize = reference_counts
        .iter()
        .map(|(ngram, &count)| count.min(prediction_counts.get(ngram).copied().unwrap_or(0)))
        .sum();
    let prediction_total: usize = prediction_counts.values().sum();
    let reference_total: usize = reference_counts.values().sum();
    RougeScore::new(
        overlap as f64 / prediction_total.max(1) as f64,
        overlap as f64 / reference_total.max(1) as f64,
    )
}

/// rouge-score's `_lcs_table`: `table[i][j]` is the LCS length of
/// `reference[..i]` and `candidate[..j]`.
fn lcs_table(reference: &[String], candidate: &[String]) -> Vec<Vec<usize>> {
    let mut table = vec![vec![0usize; candidate.len() + 1]; reference.len() + 1];
    for i in 1..=reference.len() {
        for j in 1..=candidate.len() {
            table[i][j] = if reference[i - 1] == candidate[j - 1] {
                table[i - 1][j - 1] + 1
            } else {
                table[i - 1][j].max(table[i][j - 1])
            };
        }
    }
    table
}

fn score_lcs(prediction: &[String], reference: &[String]) -> RougeScore {
    if prediction.is_empty() || reference.is_empty() {
        return RougeScore::default();
    }
    let lcs = lcs_table(reference, prediction)[reference.len()][prediction.len()];
    RougeScore::new(
        lcs as f64 / prediction.len() as f64,
        lcs as f64 / reference.len() as f64,
    )
}

/// Indices into `reference` of one LCS with `candidate`. Which LCS matters
/// for ROUGE-Lsum's union, so this is `_backtrack_norec` step for step:
/// take a match when the tokens agree, otherwise move left only when that
/// cell is strictly larger.
fn lcs_indices(reference: &[String], candidate: &[String]) -> Vec<usize> {
    let table = lcs_table(reference, candidate);
    let (mut i, mut j) = (reference.len(), candidate.len());
    let mut indices = Vec::new();
    while i > 0 && j > 0 {
        if reference[i - 1] == candidate[j - 1] {
            indices.push(i - 1);
            i -= 1;
            j -= 1;
        } else if table[i][j - 1] > table[i - 1][j] {
            j -= 1;
        } else {
            i -= 1;
        }
    }
    indices.reverse();
    indices
}

/// Summary-level LCS (ROUGE paper section 3.2) with ROUGE-1.5.5's guard
/// against counting a token more often than it occurs on either side.
fn score_summary_lcs(prediction: &[Vec<String>], reference: &[Vec<String>]) -> RougeScore {
    if prediction.is_empty() || reference.is_empty() {
        return RougeScore::default();
    }
    let reference_len: usize = reference.iter().map(Vec::len).sum();
    let prediction_len: usize = prediction.iter().map(Vec::len).sum();
    if reference_len == 0 || prediction_len == 0 {
        return RougeScore::default();
    }

    let mut reference_counts: HashMap<&str, usize> = HashMap::new();
    for token in reference.iter().flatten() {
        *reference_counts.entry(token).or_insert(0) += 1;
    }
    let mut prediction_counts: HashMap<&str, usize> = HashMap::new();
    for token in prediction.iter().flatten() {
        *prediction_counts.entry(token).or_insert(0) += 1;
    }

    let mut hits = 0usize;
    for sentence in reference {
        let mut union: Vec<usize> = prediction
            .iter()
            .flat_map(|candidate| lcs_indices(sentence, candidate))
            .collect();
        union.sort_unstable();
        union.dedup();
        for index in union {
            let token = sentence[index].as_str();
            let (Some(in_prediction), Some(in_reference)) = (
                prediction_counts.get_mut(token),
                reference_counts.get_mut(token),
            ) else {
                continue;
            };
            if *in_prediction > 0 && *in_reference > 0 {
                hits += 1;
                *in_prediction -= 1;
                *in_reference -= 1;
            }
        }
    }
    RougeScore::new(
        hits as f64 / prediction_len as f64,
        hits as f64 / reference_len as f64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_lowercases_splits_and_stems() {
        assert_eq!(
            tokenize("The Cats were RUNNING, café 2019!"),
            ["the", "cat", "were", "run", "caf", "2019"]
        );
    }

    #[test]
    fn empty_text_scores_zero() {
        assert_eq!(score("", "a reference"), RougeScoresDetailed::default());
        assert_eq!(score("a prediction", ""), RougeScoresDetailed::default());
        assert_eq!(mean_f_scores([]), RougeScores::default());
    }

    #[test]
    fn identical_text_scores_one() {
        let scores = score("one two three\nfour", "one two three\nfour").f_measures();
        assert_eq!(
            scores,
            RougeScores {
                rouge1: 1.0,
                rouge2: 1.0,
                rouge_l: 1.0,
                rouge_lsum: 1.0
            }
        );
    }

    #[test]
    fn rouge_n_clips_repeated_tokens() {
        let scores = score("the the the the", "the cat");
        assert_eq!(scores.rouge1.precision, 0.25);
        assert_eq!(scores.rouge1.recall, 0.5);
    }
}
