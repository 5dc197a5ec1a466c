//! A split mesh heals: two halves started from different bootstrap nodes train apart (each
//! unaware of the other) until one link exists between them; then Kademlia walks find the
//! other half, gossip connects it, the halves' models merge (the base rules pick one), and
//! the run ends as one mesh on one model.

mod common;

use std::time::Duration;

use common::*;
use meshtune_node::averaging::aggregate::relative_disagreement;

/// Enough rounds after the link for the Kademlia walks (every 2 s here) to connect every node
/// to the other half: rounds take well under 100 ms, and with 12 the run often ended first.
const ROUNDS: u64 = 40;

fn configure(c: &mut meshtune_node::coordinator::CoordinatorConfig) {
    c.rounds = Some(ROUNDS);
    c.local_steps = 2;
    c.round.collect_timeout = Duration::from_secs(4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_halves_from_different_bootstraps_merge_once_one_link_exists() {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_boot_a, a) = start_bootstrap(5_000).await;
    let (_boot_b, b) = start_bootstrap(5_100).await;
    let data = shards(4, 48);
    let nodes: Vec<TestNode> = (0..4)
        .map(|i| {
            start_node(
                None,
                5_001 + i as u64 + if i >= 2 { 100 } else { 0 },
                if i < 2 { &a } else { &b },
                &data[i],
                &dir.path().join(format!("node{i}")),
                1,
                configure,
            )
        })
        .collect();
    wait_for_round(&dir.path().join("node0"), 2).await;
    wait_for_round(&dir.path().join("node2"), 2).await;
    // Two separate meshes: every round so far combined two deltas.
    for i in 0..4 {
        let seen = records(&dir.path().join(format!("node{i}")));
        assert!(
            seen.iter().all(|r| r.deltas <= 2),
            "node {i} saw the other half before the link: {:?}",
            seen.iter().map(|r| r.deltas).collect::<Vec<_>>()
        );
    }
    // One link: node 0 (half A) dials half B's bootstrap node.
    nodes[0]
        .client
        .dial(b.to_multiaddr())
        .await
        .expect("dial half B's bootstrap");
    let merges: Vec<_> = nodes
        .iter()
        .map(|n| n.metrics.lineage_merges.clone())
        .collect();
    let done = finish(nodes).await;
    for (i, (summary, _)) in done.iter().enumerate() {
        let deltas: Vec<usize> = summary.rounds.iter().map(|r| r.deltas).collect();
        println!("node {i}: deltas per round {deltas:?}");
        assert_eq!(summary.final_round, ROUNDS);
        // The last round this node aggregated (a node that caught up on the mesh's final
        // state last has a catch-up record after it).
        let last_aggregated = summary
            .rounds
            .iter()
            .rev()
            .find(|r| r.synced_from.is_none());
        assert_eq!(
            last_aggregated.map(|r| r.deltas),
            Some(4),
            "node {i} ended in one mesh of four"
        );
    }
    let detected: u64 = merges
        .iter()
        .map(prometheus_client::metrics::counter::Counter::get)
        .sum();
    assert!(detected > 0, "no node noticed the other half joining");
    let weights: Vec<_> = done.iter().map(|(_, w)| w.clone()).collect();
    let disagreement = relative_disagreement(&weights);
    assert!(disagreement <= 1e-5, "disagreement {disagreement}");
}
