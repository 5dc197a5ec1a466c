//! Partitioning a Samsum-format corpus into one shard per node for federated experiments.
//!
//! Owns: the split strategies ([`SplitStrategy`]), the label that the Dirichlet strategy skews
//! ([`label_of`]). Must not read or write files, tokenize or touch tensors; its random draws
//! come from [`crate::seeded_rng`].
//!
//! Every strategy puts each record in exactly one shard, leaves no shard empty, keeps the
//! corpus order inside a shard and gives the same shards for the same seed.

use crate::data::SamsumRecord;
use crate::seeded_rng::SeededRng;

/// Number of label buckets the Dirichlet strategy draws proportions for.
pub const DIRICHLET_LABELS: usize = 10;

/// Draws of the Dirichlet proportions tried before an empty shard is filled by moving records.
const DIRICHLET_ATTEMPTS: usize = 64;

/// How records are spread over the nodes.
#[derive(Debug, Clone, PartialEq)]
pub enum SplitStrategy {
    /// Shuffled, then dealt round-robin: shard sizes differ by at most one.
    Iid,
    /// For every label (see [`label_of`]), node proportions drawn from Dir(alpha, ..., alpha)
    /// (Hsu et al. 2019, "Measuring the effects of non-identical data distribution"). Small
    /// alpha (0.1) gives each node a few labels; large alpha (100) approaches IID.
    Dirichlet { alpha: f64 },
    /// Sorted by dialogue length in characters; node `i` gets the `i`-th contiguous range
    /// (node 0 the shortest dialogues). Shard sizes differ by at most one; the seed is unused.
    ByLength,
}

/// Why a corpus cannot be split as asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SplitError {
    #[error("the number of nodes must be at least 1")]
    NoNodes,
    #[error("cannot give each of {nodes} nodes a non-empty shard from {records} records")]
    TooFewRecords { records: usize, nodes: usize },
    #[error("Dirichlet alpha must be a finite number > 0, got {0}")]
    InvalidAlpha(f64),
}

/// Splits `records` into `nodes` non-empty shards, each record in exactly one shard, records
/// inside a shard in corpus order.
pub fn split_records(
    records: &[SamsumRecord],
    nodes: usize,
    strategy: &SplitStrategy,
    seed: u64,
) -> Result<Vec<Vec<SamsumRecord>>, SplitError> {
    let assignment = assign_nodes(records, nodes, strategy, seed)?;
    let mut shards = vec![Vec::new(); nodes];
    for (record, node) in records.iter().zip(assignment) {
        shards[node].push(record.clone());
    }
    Ok(shards)
}

/// The node of every record (index-aligned with `records`); what [`split_records`] uses.
pub fn assign_nodes(
    records: &[SamsumRecord],
    nodes: usize,
    strategy: &SplitStrategy,
    seed: u64,
) -> Result<Vec<usize>, SplitError> {
    if nodes == 0 {
        return Err(SplitError::NoNodes);
    }
    if records.len() < nodes {
        return Err(SplitError::TooFewRecords {
            records: records.len(),
            nodes,
        });
    }
    match strategy {
        SplitStrategy::Iid => Ok(assign_iid(records.len(), nodes, seed)),
        SplitStrategy::Dirichlet { alpha } => {
            if !alpha.is_finite() || *alpha <= 0.0 {
                return Err(SplitError::InvalidAlpha(*alpha));
            }
            let labels: Vec<usize> = records.iter().map(label_of).collect();
            Ok(assign_dirichlet(&labels, nodes, *alpha, seed))
        }
        SplitStrategy::ByLength => Ok(assign_by_length(records, nodes)),
    }
}

/// The label the Dirichlet strategy skews: the last word of the summary's first sentence
/// (lowercased, letters and digits only, common function words skipped), hashed (FNV-1a)
/// into [`DIRICHLET_LABELS`] buckets. An empty summary is label 0.
///
/// Why this word: Samsum summaries often end their first sentence with the object of the
/// conversation ("... for the party."), so the label approximates a topic without a topic
/// model; in the bundled synthetic corpus it is the activity ("... to play tennis.").
/// Hashing keeps the label count fixed whatever the vocabulary.
pub fn label_of(record: &SamsumRecord) -> usize {
    const SKIPPED: &[&str] = &[
        "a", "an", "the", "it", "them", "him", "her", "us", "me", "you", "there", "here", "today",
        "tomorrow", "tonight", "together", "now", "later", "soon", "again", "too", "up", "out",
        "off", "on", "in", "at", "to", "of", "for", "with", "and", "or",
    ];
    let first_sentence = record
        .summary
        .split(['.', '!', '?', '\n'])
        .find(|s| !s.trim().is_empty())
        .unwrap_or("");
    let word = first_sentence
        .split_whitespace()
        .rev()
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric())
                .flat_map(char::to_lowercase)
                .collect::<String>()
        })
        .find(|w| !w.is_empty() && !SKIPPED.contains(&w.as_str()));
    match word {
        Some(word) => (fnv1a(word.as_bytes()) % DIRICHLET_LABELS as u64) as usize,
        None => 0,
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn assign_iid(len: usize, nodes: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    SeededRng::new(seed).shuffle(&mut order);
    let mut assignment = vec![0; len];
    for (position, &index) in order.iter().enumerate() {
        assignment[index] = position % nodes;
    }
    assignment
}

fn assign_by_length(records: &[SamsumRecord], nodes: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..records.len()).collect();
    // Stable sort: equal lengths keep corpus order, so the split needs no seed.
    order.sort_by_key(|&i| records[i].dialogue.chars().count());
    let mut assignment = vec![0; records.len()];
    let (base, larger) = (records.len() / nodes, records.len() % nodes);
    let mut position = 0;
    for node in 0..nodes {
        let size = base + usize::from(node < larger);
        for &index in &order[position..position + size] {
            assignment[index] = node;
        }
        position += size;
    }
    assignment
}

fn assign_dirichlet(labels: &[usize], nodes: usize, alpha: f64, seed: u64) -> Vec<usize> {
    let mut rng = SeededRng::new(seed);
    let mut by_label: Vec<Vec<usize>> = vec![Vec::new(); DIRICHLET_LABELS];
    for (index, &label) in labels.iter().enumerate() {
        by_label[label].push(index);
    }
    let mut assignment = vec![0; labels.len()];
    for _ in 0..DIRICHLET_ATTEMPTS {
        let mut sizes = vec![0usize; nodes];
        for members in by_label.iter().filter(|m| !m.is_empty()) {
            let mut members = members.clone();
            rng.shuffle(&mut members);
            let proportions = rng.dirichlet(alpha, nodes);
            let mut cumulative = 0.0;
            let mut start = 0;
            for (node, p) in proportions.iter().enumerate() {
                cumulative += p;
                let end = if node + 1 == nodes {
                    members.len()
                } else {
                    ((cumulative * members.len() as f64).round() as usize)
                        .clamp(start, members.len())
                };
                for &index in &members[start..end] {
                    assignment[index] = node;
                }
                sizes[node] += end - start;
                start = end;
            }
        }
        if sizes.iter().all(|&s| s > 0) {
            return assignment;
        }
    }
    fill_empty_nodes(&mut assignment, nodes);
    assignment
}

/// Gives every empty node the last record (in corpus order) of the currently largest node.
/// Only reached when many draws in a row left a node empty (tiny alpha, few labels).
fn fill_empty_nodes(assignment: &mut [usize], nodes: usize) {
    let mut sizes = vec![0usize; nodes];
    for &node in assignment.iter() {
        sizes[node] += 1;
    }
    for empty in 0..nodes {
        if sizes[empty] > 0 {
            continue;
        }
        let largest = (0..nodes).max_by_key(|&n| (sizes[n], std::cmp::Reverse(n)));
        let Some(largest) = largest else { return };
        if let Some(slot) = assignment.iter_mut().rev().find(|node| **node == largest) {
            *slot = empty;
            sizes[largest] -= 1;
            sizes[empty] += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{SyntheticConfig, generate_corpus};

    fn corpus(examples: usize) -> Vec<SamsumRecord> {
        generate_corpus(&SyntheticConfig { examples, seed: 11 })
    }

    fn strategies() -> Vec<SplitStrategy> {
        vec![
            SplitStrategy::Iid,
            SplitStrategy::Dirichlet { alpha: 0.1 },
            SplitStrategy::Dirichlet { alpha: 1.0 },
            SplitStrategy::Dirichlet { alpha: 100.0 },
            SplitStrategy::ByLength,
        ]
    }

    fn ids(shards: &[Vec<SamsumRecord>]) -> Vec<Vec<String>> {
        shards
            .iter()
            .map(|s| s.iter().map(|r| r.id.clone()).collect())
            .collect()
    }

    #[test]
    fn every_record_lands_in_exactly_one_non_empty_shard() {
        let records = corpus(300);
        for strategy in strategies() {
            for nodes in [1, 2, 7, 16, 300] {
                let shards = split_records(&records, nodes, &strategy, 5).expect("split");
                assert_eq!(shards.len(), nodes);
                assert!(shards.iter().all(|s| !s.is_empty()), "{strategy:?} {nodes}");
                let mut seen: Vec<String> = shards.concat().into_iter().map(|r| r.id).collect();
                seen.sort();
                let mut expected: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
                expected.sort();
                assert_eq!(seen, expected, "{strategy:?} {nodes}");
            }
        }
    }

    #[test]
    fn shards_keep_corpus_order() {
        let records = corpus(200);
        for strategy in strategies() {
            for shard in split_records(&records, 5, &strategy, 3).expect("split") {
                assert!(shard.windows(2).all(|w| w[0].id < w[1].id), "{strategy:?}");
            }
        }
    }

    #[test]
    fn deterministic_for_a_seed_and_seed_dependent() {
        let records = corpus(400);
        for strategy in strategies() {
            let a = split_records(&records, 6, &strategy, 42).expect("split");
            let b = split_records(&records, 6, &strategy, 42).expect("split");
            assert_eq!(ids(&a), ids(&b), "{strategy:?}");
            let c = split_records(&records, 6, &strategy, 43).expect("split");
            if strategy == SplitStrategy::ByLength {
                assert_eq!(ids(&a), ids(&c), "by-length ignores the seed");
            } else {
                assert_ne!(ids(&a), ids(&c), "{strategy:?}");
            }
        }
    }

    #[test]
    fn iid_and_by_length_are_balanced() {
        let records = corpus(103);
        for strategy in [SplitStrategy::Iid, SplitStrategy::ByLength] {
            let sizes: Vec<usize> = split_records(&records, 10, &strategy, 1)
                .expect("split")
                .iter()
                .map(Vec::len)
                .collect();
            let (min, max) = (sizes.iter().min(), sizes.iter().max());
            assert!(matches!((min, max), (Some(10), Some(11))), "{sizes:?}");
        }
    }

    #[test]
    fn by_length_gives_contiguous_length_ranges() {
        let records = corpus(250);
        let shards = split_records(&records, 4, &SplitStrategy::ByLength, 0).expect("split");
        let range = |s: &Vec<SamsumRecord>| {
            let lens = s.iter().map(|r| r.dialogue.chars().count());
            (lens.clone().min().unwrap_or(0), lens.max().unwrap_or(0))
        };
        for pair in shards.windows(2) {
            let (_, max_prev) = range(&pair[0]);
            let (min_next, _) = range(&pair[1]);
            assert!(max_prev <= min_next, "{max_prev} > {min_next}");
        }
    }

    #[test]
    fn iid_matches_global_label_distribution() {
        let records = corpus(2000);
        let shards = split_records(&records, 4, &SplitStrategy::Iid, 9).expect("split");
        assert!(mean_label_distance(&records, &shards) < 0.1);
    }

    /// Mean over nodes of the total-variation distance between the node's label
    /// distribution and the corpus's.
    fn mean_label_distance(records: &[SamsumRecord], shards: &[Vec<SamsumRecord>]) -> f64 {
        let histogram = |rs: &[SamsumRecord]| {
            let mut h = vec![0.0; DIRICHLET_LABELS];
            for r in rs {
                h[label_of(r)] += 1.0 / rs.len() as f64;
            }
            h
        };
        let global = histogram(records);
        let total: f64 = shards
            .iter()
            .map(|s| {
                let h = histogram(s);
                0.5 * h
                    .iter()
                    .zip(&global)
                    .map(|(a, b)| (a - b).abs())
                    .sum::<f64>()
            })
            .sum();
        total / shards.len() as f64
    }

    #[test]
    fn small_alpha_is_more_skewed_than_large_alpha() {
        let records = corpus(2000);
        let distance = |alpha: f64, seed: u64| {
            let strategy = SplitStrategy::Dirichlet { alpha };
            let shards = split_records(&records, 8, &strategy, seed).expect("split");
            mean_label_distance(&records, &shards)
        };
        for seed in 0..3 {
            let skewed = distance(0.1, seed);
            let near_iid = distance(100.0, seed);
            assert!(skewed > 0.4, "alpha 0.1: {skewed}");
            assert!(near_iid < 0.1, "alpha 100: {near_iid}");
        }
    }

    #[test]
    fn synthetic_corpus_uses_most_labels() {
        let records = corpus(1000);
        let mut used = [false; DIRICHLET_LABELS];
        for r in &records {
            used[label_of(r)] = true;
        }
        assert!(used.iter().filter(|&&u| u).count() >= 7, "{used:?}");
    }

    #[test]
    fn label_is_the_last_content_word_of_the_first_sentence() {
        let record = |summary: &str| SamsumRecord {
            id: "x".into(),
            dialogue: "A: hi".into(),
            summary: summary.into(),
        };
        let tennis = label_of(&record("Anna and Tom will meet to play tennis."));
        assert_eq!(
            label_of(&record("Kim plays Tennis today! Bob can't come.")),
            tennis
        );
        assert_eq!(label_of(&record("")), 0);
        assert_eq!(label_of(&record("...")), 0);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let records = corpus(3);
        let iid = SplitStrategy::Iid;
        assert_eq!(
            split_records(&records, 0, &iid, 0),
            Err(SplitError::NoNodes)
        );
        assert_eq!(
            split_records(&records, 4, &iid, 0),
            Err(SplitError::TooFewRecords {
                records: 3,
                nodes: 4
            })
        );
        for alpha in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let strategy = SplitStrategy::Dirichlet { alpha };
            assert!(matches!(
                split_records(&records, 2, &strategy, 0),
                Err(SplitError::InvalidAlpha(_))
            ));
        }
    }

    #[test]
    fn tiny_alpha_still_fills_every_node() {
        let records = corpus(40);
        let strategy = SplitStrategy::Dirichlet { alpha: 0.001 };
        for seed in 0..5 {
            let shards = split_records(&records, 40, &strategy, seed).expect("split");
            assert!(shards.iter().all(|s| s.len() == 1));
        }
    }
}
