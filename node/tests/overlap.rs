//! `--overlap`: nodes train round r + 1 while round r is exchanged, then rebase what they
//! learnt onto the mesh's new model (see `averaging::overlap`). Checked against the algorithm
//! written out here on plain trainers (train, read weights, add, set), with the sequential
//! mesh (FedAvg) as the control the test must tell apart.

mod common;

use std::time::Duration;

use common::*;
use meshtune_node::coordinator::CoordinatorConfig;
use meshtune_protocol::{ModelHash, TensorSet};

const NODES: usize = 2;
const ROUNDS: u64 = 3;
const STEPS: usize = 3;

fn configure(c: &mut CoordinatorConfig) {
    c.rounds = Some(ROUNDS);
    c.local_steps = STEPS;
    c.final_exchange = false;
    c.codec = "f32".parse().expect("codec");
    c.round.collect_timeout = Duration::from_secs(120);
    c.round.adaptive = None;
    c.overlap = true;
}

fn sub(a: &TensorSet, b: &TensorSet) -> Vec<Vec<f64>> {
    a.tensors()
        .iter()
        .zip(b.tensors())
        .map(|(x, y)| {
            x.values
                .iter()
                .zip(&y.values)
                .map(|(p, q)| f64::from(*p) - f64::from(*q))
                .collect()
        })
        .collect()
}

/// `base` plus each of `deltas` times `scale`.
fn add(base: &TensorSet, deltas: &[&Vec<Vec<f64>>], scale: f64) -> TensorSet {
    let mut out = base.clone();
    for (t, (_, values)) in out.values_mut().enumerate() {
        for (j, v) in values.iter_mut().enumerate() {
            let sum: f64 = deltas.iter().map(|d| d[t][j]).sum();
            *v = (f64::from(*v) + scale * sum) as f32;
        }
    }
    out
}

fn max_abs_diff(a: &TensorSet, b: &TensorSet) -> f64 {
    sub(a, b)
        .iter()
        .flatten()
        .fold(0.0_f64, |m, d| m.max(d.abs()))
}

/// The mesh's model after `ROUNDS` rounds on plain trainers: FedAvg (`overlap` false: every
/// local phase starts from the mesh's model θ_r), or one-step delayed application: round r's
/// phase (r >= 1) starts from the base of the previous round plus the node's share of it,
/// θ_{r-1} + P_{r-1} / n, and its progress P_r joins θ_r.
async fn reference(data: &[Vec<meshtune_model::data::SamsumRecord>], overlap: bool) -> TensorSet {
    let trainers: Vec<_> = data.iter().map(|d| trainer(d, &train_config())).collect();
    let mut mesh = trainers[0].weights().await.expect("weights");
    // Where each node's next ahead phase starts.
    let mut own: Vec<TensorSet> = vec![mesh.clone(); NODES];
    for round in 0..ROUNDS {
        let mut progress = Vec::new();
        for (i, t) in trainers.iter().enumerate() {
            let start = if overlap && round > 0 {
                own[i].clone()
            } else {
                mesh.clone()
            };
            t.set_weights(start.clone()).await.expect("set");
            t.train(STEPS).await.expect("train");
            let end = t.weights().await.expect("weights");
            let p = sub(&end, &start);
            // θ_r + P_r / n, in f32 as the node computes it: its model after the round's
            // phase (rebased onto θ_r from round 1 on: θ_r + (end - start)), then its share.
            let mut next_start = end;
            let share = 1.0 / NODES as f32;
            let rebased = overlap && round > 0;
            let tensors = mesh.tensors().iter().zip(start.tensors());
            for ((_, values), (base, from)) in next_start.values_mut().zip(tensors) {
                for ((v, b), s) in values.iter_mut().zip(&base.values).zip(&from.values) {
                    let model = if rebased { b + (*v - s) } else { *v };
                    *v = b + share * (model - b);
                }
            }
            own[i] = next_start;
            progress.push(p);
        }
        let refs: Vec<&Vec<Vec<f64>>> = progress.iter().collect();
        mesh = add(&mesh, &refs, 1.0 / NODES as f64);
    }
    mesh
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlapped_mesh_moves_each_ahead_phase_onto_the_mesh_model() {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = 7_000;
    let (_bootstrap, boot) = start_bootstrap(port).await;
    let data = shards(NODES, 48);
    let nodes = start_keyed_nodes(port, 11, &boot, &data, dir.path(), configure);
    let finished = finish(nodes).await;
    let delayed = reference(&data, true).await;
    let fedavg = reference(&data, false).await;
    let hashes: std::collections::BTreeSet<ModelHash> =
        finished.iter().map(|(s, _)| s.model_hash).collect();
    assert_eq!(hashes.len(), 1, "every node ends on the same model");
    for (i, (summary, weights)) in finished.iter().enumerate() {
        assert_eq!(
            ModelHash::of_tensors(weights),
            summary.model_hash,
            "node {i}'s trainer ends on the mesh's model"
        );
        let to_delayed = max_abs_diff(weights, &delayed);
        let to_fedavg = max_abs_diff(weights, &fedavg);
        println!("node {i}: |mesh - delayed| {to_delayed:e}, |mesh - fedavg| {to_fedavg:e}");
        assert!(
            to_delayed <= 1e-6,
            "node {i}: the mesh is {to_delayed:e} from one-step delayed application"
        );
        assert!(
            to_fedavg >= 100.0 * to_delayed.max(1e-7),
            "node {i}: the test cannot tell overlap from FedAvg ({to_fedavg:e})"
        );
        assert_eq!(summary.rounds.len(), ROUNDS as usize);
        let mut trained = 0.0;
        for record in &summary.rounds {
            let t = record.timing;
            let (comp, wait) = (t.t_comp_s.expect("t_comp_s"), t.t_wait_s.expect("t_wait_s"));
            let utilization = t.utilization.expect("utilization");
            assert!(comp >= 0.0 && wait >= 0.0, "{t:?}");
            assert!(
                (utilization - comp / (comp + wait)).abs() < 1e-9,
                "utilization is the trained share of the round: {t:?}"
            );
            assert!(t.t_comm_s.expect("t_comm_s") >= 0.0);
            trained += comp;
        }
        assert!(trained > 0.0);
    }
}
