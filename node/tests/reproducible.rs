//! Reproducibility of the in-process simulation: the same seeds, identities and data give
//! the same per-node losses and the same final model, run after run, bit for bit.
//!
//! What makes that hold (see docs/TESTING.md, "Determinism"): every trainer seeds the
//! backend's generator per step under a process-wide lock; node identities are fixed, so
//! deltas are summed in the same order; every round waits for every delta (quorum 1, no
//! deadline in reach), so each round combines the same set.

mod common;

use std::time::Duration;

use common::*;
use meshtune_protocol::ModelHash;

/// Per node: the training loss of every round, and the final model hash.
type Run = Vec<(Vec<Option<f64>>, ModelHash)>;

async fn run_once(port: u64) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_bootstrap, boot) = start_bootstrap(port).await;
    let data = shards(3, 48);
    let configure = |c: &mut meshtune_node::coordinator::CoordinatorConfig| {
        c.rounds = Some(4);
        c.local_steps = 3;
        c.round.collect_timeout = Duration::from_secs(120);
        c.round.adaptive = None;
    };
    let nodes = start_keyed_nodes(port, 1, &boot, &data, dir.path(), configure);
    finish(nodes)
        .await
        .into_iter()
        .map(|(summary, weights)| {
            let losses = summary.rounds.iter().map(|r| r.train_loss).collect();
            (losses, ModelHash::of_tensors(&weights))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seeds_and_data_give_the_same_losses_run_after_run() {
    init_logs();
    let first = run_once(6_000).await;
    let second = run_once(6_100).await;
    for (i, (a, b)) in first.iter().zip(&second).enumerate() {
        println!("node {i}: losses {:?} / {:?}", a.0, b.0);
        assert_eq!(a.0.len(), 4, "node {i} applied every round");
        assert_eq!(a, b, "node {i} differs between identical runs");
    }
    // And the nodes themselves ended on one model.
    assert!(first.iter().all(|n| n.1 == first[0].1));
}
