//! Nodes that were not there from the start: a late joiner syncs the mesh's state and then
//! trains with it; a node stopped mid-run restarts from its checkpoint and rejoins. Both end
//! on the same model as the others after the final exchange.

mod common;

use std::time::Duration;

use common::*;
use libp2p::identity::Keypair;
use meshtune_node::averaging::aggregate::{OuterOptimizer, relative_disagreement};

const ROUNDS: u64 = 8;

fn configure(c: &mut meshtune_node::coordinator::CoordinatorConfig) {
    c.rounds = Some(ROUNDS);
    c.local_steps = 4;
    c.round.collect_timeout = Duration::from_secs(4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_syncs_the_state_then_trains_with_the_mesh() {
    late_joiner(3_000, OuterOptimizer::Average).await;
}

/// With a stateful outer optimizer the joiner must also adopt the mesh's outer state (shipped
/// in the `StateManifest`): with its momentum starting from zero, its next outer step would
/// differ from everyone else's and the models would drift apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_adopts_the_outer_optimizer_state() {
    late_joiner(
        3_100,
        OuterOptimizer::Nesterov {
            lr: 0.7,
            momentum: 0.9,
        },
    )
    .await;
}

async fn late_joiner(port: u64, outer: OuterOptimizer) {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_bootstrap, boot) = start_bootstrap(port).await;
    let data = shards(4, 64);
    let configure = move |c: &mut meshtune_node::coordinator::CoordinatorConfig| {
        configure(c);
        c.outer = outer;
    };
    let mut nodes: Vec<TestNode> = (0..3)
        .map(|i| {
            start_node(
                None,
                port + 1 + i as u64,
                &boot,
                &data[i],
                &dir.path().join(format!("node{i}")),
                2,
                configure,
            )
        })
        .collect();
    wait_for_round(&dir.path().join("node0"), 3).await;
    let late_out = dir.path().join("late");
    nodes.push(start_node(
        None,
        port + 10,
        &boot,
        &data[3],
        &late_out,
        1,
        configure,
    ));
    let done = finish(nodes).await;
    let late = &done[3].0;
    println!(
        "late joiner rounds: {:?}",
        late.rounds
            .iter()
            .map(|r| (r.round, r.deltas))
            .collect::<Vec<_>>()
    );
    // It did not train round 0 alone: its first record is the catch-up to a round the mesh
    // was in, and every record after it a round it took part in.
    let first = late.rounds.first().expect("a round");
    assert!(
        first.round >= 2 && first.synced_from.is_some(),
        "late joiner started over: {:?}",
        late.rounds.iter().map(|r| r.round).collect::<Vec<_>>()
    );
    assert!(late.rounds[1..].iter().all(|r| r.synced_from.is_none()));
    assert_eq!(late.final_round, ROUNDS);
    // Once in, its delta counted for the others.
    let last = done[0].0.rounds.last().expect("round");
    assert_eq!(
        last.deltas, 4,
        "the others used the late joiner's delta in the last round"
    );
    let weights: Vec<_> = done.iter().map(|(_, w)| w.clone()).collect();
    let disagreement = relative_disagreement(&weights);
    assert!(disagreement <= 1e-5, "disagreement {disagreement}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_resumes_from_its_checkpoint_and_rejoins() {
    restarted_node(4_000, None, Variant::Plain).await;
}

/// Under `keep_residual` a node's own model is the mesh's plus its residual, but every
/// checkpoint holds the mesh's model (the residual is saved apart): each one's weights hash to
/// the model its `state.json` names, a node stopped mid-run comes back and rejoins, and all
/// nodes end holding the one model the mesh agreed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_keeps_its_residual_checkpoints_the_mesh_model_and_restarts() {
    restarted_node(4_600, None, Variant::KeepResidual).await;
}

/// With `--overlap` a node trains the next round while the current one is exchanged, so a
/// stop lands in the middle of an ahead phase: that phase is lost (it was never
/// checkpointed), every checkpoint still holds the mesh's model (not the node's ahead one),
/// and the restarted node rejoins and ends on the mesh's model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlapped_node_stopped_mid_phase_restarts_from_the_mesh_model() {
    restarted_node(4_900, None, Variant::Overlap).await;
}

/// Down while the mesh ran on for several rounds, the node comes back far behind: it adopts a
/// peer's state instead of replaying the rounds, and its `rounds.jsonl` says so (a catch-up
/// record), so that it still ends on a record of the mesh's last model, however far the
/// state it adopted was (even past the last round, once the others finished).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_after_the_mesh_moved_on_catches_up_on_a_peers_state() {
    restarted_node(4_300, Some(ROUNDS as usize - 3), Variant::Plain).await;
}

/// How every node of [`restarted_node`]'s mesh runs.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Plain,
    /// `keep_residual` with a lossy codec.
    KeepResidual,
    /// `overlap`.
    Overlap,
}

/// Stops node 2 after its second round and starts it again on the same directory, at once or
/// once node 0 has applied `restart_after` rounds, every node running as `variant` says.
async fn restarted_node(port: u64, restart_after: Option<usize>, variant: Variant) {
    init_logs();
    let configure = move |c: &mut meshtune_node::coordinator::CoordinatorConfig| {
        configure(c);
        match variant {
            Variant::Plain => {}
            Variant::KeepResidual => {
                c.keep_residual = true;
                c.codec = "top10%+int8/64+zstd:1".parse().expect("codec");
            }
            Variant::Overlap => c.overlap = true,
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (_bootstrap, boot) = start_bootstrap(port).await;
    let data = shards(3, 64);
    let keys: Vec<Keypair> = (0..3).map(|_| Keypair::generate_ed25519()).collect();
    let mut nodes: Vec<Option<TestNode>> = (0..3)
        .map(|i| {
            Some(start_node(
                Some(keys[i].clone()),
                port + 1 + i as u64,
                &boot,
                &data[i],
                &dir.path().join(format!("node{i}")),
                2,
                configure,
            ))
        })
        .collect();
    let out2 = dir.path().join("node2");
    wait_for_round(&out2, 2).await;
    // Stop node 2 (as a crash would: no goodbye), then start it again on the same directory.
    let stopped = nodes[2].take().expect("node 2");
    stopped.shutdown.cancel();
    stopped.handle.abort();
    let _ = stopped.handle.await;
    let applied_before = records(&out2).len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Some(applied) = restart_after {
        wait_for_round(&dir.path().join("node0"), applied).await;
    }
    nodes[2] = Some(start_node(
        Some(keys[2].clone()),
        port + 11,
        &boot,
        &data[2],
        &out2,
        2,
        configure,
    ));
    let done = finish(nodes.into_iter().flatten().collect()).await;
    let restarted = &done[2].0;
    let rounds: Vec<u64> = restarted.rounds.iter().map(|r| r.round).collect();
    println!("restarted node's rounds: {rounds:?} (had applied {applied_before} before the stop)");
    // Resumed, not restarted: the rounds before the stop are kept, none is applied twice.
    assert!(rounds.len() >= applied_before);
    assert!(
        rounds.windows(2).all(|w| w[0] < w[1]),
        "rounds repeat: {rounds:?}"
    );
    assert_eq!(restarted.final_round, ROUNDS);
    // Its record of the last round is of the model it ended on.
    let last = restarted.rounds.last().expect("a round");
    for (summary, _) in &done {
        let l = summary.rounds.last().expect("a round");
        println!(
            "final {} record {} {} adopted {:?}",
            summary.model_hash, l.round, l.model_hash, summary.adopted_final_state
        );
    }
    assert_eq!(last.round, ROUNDS - 1, "rounds: {rounds:?}");
    assert_eq!(last.model_hash, restarted.model_hash.to_string());
    if variant != Variant::Plain {
        // Every checkpoint of every node (the restarted one's from before and after the stop)
        // holds the model its `state.json` names: the mesh's, not the node's own.
        for i in 0..3 {
            let checked = checkpoints_hold_their_hash(&dir.path().join(format!("node{i}")));
            assert!(checked >= 1, "node {i} left no checkpoint");
        }
    }
    if restart_after.is_some() {
        let caught_up: Vec<u64> = restarted
            .rounds
            .iter()
            .filter(|r| r.synced_from.is_some())
            .map(|r| r.round)
            .collect();
        println!("caught up at rounds {caught_up:?}");
        assert!(
            caught_up.len() == 1 && caught_up[0] > 1,
            "no catch-up record: {rounds:?}"
        );
    }
    let weights: Vec<_> = done.iter().map(|(_, w)| w.clone()).collect();
    let disagreement = relative_disagreement(&weights);
    assert!(disagreement <= 1e-5, "disagreement {disagreement}");
}

/// A node that ends the last round on a model of its own (here: it aggregates with the median
/// while the others take the mean, so its last outer step differs) adopts the model the other
/// two ended on: no later round exists to bring it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_ends_on_another_model_adopts_the_mesh_final_state() {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_bootstrap, boot) = start_bootstrap(4_200).await;
    let data = shards(3, 48);
    let nodes: Vec<TestNode> = (0..3)
        .map(|i| {
            start_node(
                None,
                4_201 + i as u64,
                &boot,
                &data[i],
                &dir.path().join(format!("node{i}")),
                2,
                move |c: &mut meshtune_node::coordinator::CoordinatorConfig| {
                    c.rounds = Some(3);
                    c.final_exchange = false;
                    c.round.collect_timeout = Duration::from_secs(4);
                    if i == 2 {
                        c.aggregation = meshtune_node::averaging::aggregate::Aggregation::Median;
                    }
                },
            )
        })
        .collect();
    let done = finish(nodes).await;
    let adopted: Vec<Option<String>> = done
        .iter()
        .map(|(s, _)| s.adopted_final_state.clone())
        .collect();
    println!("adopted final state from: {adopted:?}");
    assert!(adopted[0].is_none() && adopted[1].is_none(), "{adopted:?}");
    assert!(adopted[2].is_some(), "node 2 kept its own model");
    let weights: Vec<_> = done.iter().map(|(_, w)| w.clone()).collect();
    let disagreement = relative_disagreement(&weights);
    assert!(disagreement <= 1e-5, "disagreement {disagreement}");
    // Its summary reports the adopted model.
    assert_eq!(done[2].0.model_hash, done[0].0.model_hash);
}

/// Loads every checkpoint under `out/checkpoints` into the test model and checks its weights
/// against the model hash in its `state.json`; returns how many were checked.
fn checkpoints_hold_their_hash(out: &std::path::Path) -> usize {
    let mut checked = 0;
    for entry in std::fs::read_dir(out.join("checkpoints")).expect("checkpoints") {
        let dir = entry.expect("entry").path();
        if !dir.join("params.safetensors").exists() {
            continue;
        }
        let (config, device) = (tiny_config(), Default::default());
        let model = meshtune_model::t5::T5::<meshtune_model::backend::Cpu>::from_source(
            &config,
            &mut meshtune_model::weights::RandomInit::new(&config, &device, 0),
        )
        .expect("model");
        let model = meshtune_model::checkpoint::load_params(&dir, model).expect("params");
        let tensors = meshtune_model::exchange::module_tensors(
            &model,
            meshtune_model::exchange::ExchangeScope::All,
        )
        .expect("tensors");
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("state.json")).expect("state"))
                .expect("json");
        assert_eq!(
            meshtune_protocol::ModelHash::of_tensors(&tensors).to_string(),
            state["model_hash"].as_str().expect("model_hash"),
            "{}: the parameters are not the model its state names",
            dir.display()
        );
        checked += 1;
    }
    checked
}
