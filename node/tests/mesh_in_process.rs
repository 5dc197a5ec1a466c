//! In-process meshes on libp2p's memory transport: a bootstrap node plus N meshtune nodes with
//! a tiny T5 each, discovering each other only through the bootstrap node. Checks that they
//! converge to the same parameters, that their loss drops, what the wire costs, and that
//! hostile peers are refused while the honest ones keep training.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use libp2p::identity::Keypair;
use meshtune_net::transport::memory_transport;
use meshtune_node::averaging::aggregate::relative_disagreement;
use meshtune_node::network::store::BlobStore;
use meshtune_node::network::{self, NetworkConfig};
use meshtune_protocol::TensorSet;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_nodes_converge_to_one_model_and_their_loss_drops() {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let (bootstrap, boot_addr) = start_bootstrap(1_000).await;
    let n = std::env::var("MESH_TEST_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let data = shards(n, 64);
    let nodes: Vec<TestNode> = (0..n)
        .map(|i| {
            start_node(
                None,
                1_001 + i as u64,
                &boot_addr,
                &data[i],
                &dir.path().join(format!("node{i}")),
                n - 1,
                |_| {},
            )
        })
        .collect();
    let mut summaries = Vec::new();
    let mut weights = Vec::new();
    // Every node is stopped only once all have finished: a node that stops early takes its
    // blobs with it (in the product, `run` lingers while peers still fetch).
    let stops: Vec<CancellationToken> = nodes.iter().map(|n| n.shutdown.clone()).collect();
    for node in nodes {
        let summary = tokio::time::timeout(Duration::from_secs(600), node.handle)
            .await
            .expect("node finished in time")
            .expect("task")
            .expect("run");
        let w = node.trainer.weights().await.expect("weights");
        assert_eq!(
            meshtune_protocol::ModelHash::of_tensors(&w),
            summary.model_hash,
            "the trainer holds the model the node applied"
        );
        weights.push(w);
        summaries.push(summary);
        let _ = node.metrics;
        let _ = node.peer_id;
    }
    for stop in stops {
        stop.cancel();
    }
    drop(bootstrap);
    for (i, summary) in summaries.iter().enumerate() {
        for r in &summary.rounds {
            println!(
                "node {i} round {} loss {:?} deltas {} peers {} delta_bytes {} payload_in {} wire_in {} amp {:?} train {:.2}s total {:.2}s hash {} rejected {:?}",
                r.round,
                r.train_loss,
                r.deltas,
                r.mesh_peers,
                r.delta_bytes,
                r.payload_in,
                r.wire_in,
                r.amplification,
                r.seconds_train,
                r.seconds_total,
                &r.model_hash[..8],
                r.rejected
            );
        }
    }
    let disagreement = relative_disagreement(&weights);
    println!("relative disagreement after the final exchange: {disagreement:e}");
    assert!(disagreement <= 1e-5, "disagreement {disagreement}");
    let hashes: std::collections::BTreeSet<String> =
        summaries.iter().map(|s| s.model_hash.to_string()).collect();
    assert_eq!(hashes.len(), 1, "every node ends on the same model hash");
    let mut amplification = Vec::new();
    for (i, summary) in summaries.iter().enumerate() {
        assert_eq!(summary.rounds.len(), 4, "node {i} applied every round");
        for record in &summary.rounds {
            assert_eq!(
                record.deltas, n,
                "node {i} round {} used every delta",
                record.round
            );
            if let Some(a) = record.amplification {
                amplification.push(a);
            }
            // The split by protocol covers the same bytes (but for the head of substreams
            // still negotiating when the counters were read), and the deltas came as blobs. (A round's
            // payload may have arrived before its wire counters were read, so blobs are not
            // compared with `payload_in`.)
            let by_protocol: u64 = record.wire_in_by_protocol.values().sum();
            assert!(
                by_protocol.abs_diff(record.wire_in) <= 4096,
                "node {i} round {}: {by_protocol} of {} bytes split by protocol",
                record.round,
                record.wire_in
            );
            if record.payload_in > 0 {
                let blobs = record
                    .wire_in_by_protocol
                    .get("blobs")
                    .copied()
                    .unwrap_or(0);
                assert!(
                    blobs > 0
                        && record
                            .wire_in_by_protocol
                            .values()
                            .all(|&bytes| bytes <= blobs),
                    "node {i} round {}: deltas not counted as blobs: {:?}",
                    record.round,
                    record.wire_in_by_protocol
                );
            }
        }
        let first = summary.rounds[0].train_loss.expect("loss");
        let last = summary.rounds[2].train_loss.expect("loss");
        assert!(last < first, "node {i}: loss {first} -> {last}");
    }
    amplification.sort_by(f64::total_cmp);
    println!(
        "gossip amplification (wire bytes in / delta payload in) per node-round: median {:.3}, max {:.3}",
        amplification[amplification.len() / 2],
        amplification[amplification.len() - 1]
    );
}

/// A peer that joins through the bootstrap node like any other and then misbehaves: garbage
/// and wrong-layout manifests, deltas full of NaN (hash-consistent, so only decoding catches
/// them), and a flood of chunk requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_nodes_refuse_a_hostile_peer_and_keep_training() {
    use meshtune_protocol::{
        CodecParams, DeltaManifest, Limits, ModelHash, Tensor, chunk_blob, encode_delta,
    };
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let (bootstrap, boot_addr) = start_bootstrap(2_000).await;
    let honest = 3;
    let data = shards(honest, 64);
    let nodes: Vec<TestNode> = (0..honest)
        .map(|i| {
            start_node(
                None,
                2_001 + i as u64,
                &boot_addr,
                &data[i],
                &dir.path().join(format!("node{i}")),
                honest, // the two other honest nodes and the hostile one
                |c| {
                    // Every honest node waits for every sender (the hostile one's refused
                    // deltas count as heard; rounds it skips end at the 5 s deadline), so all
                    // honest nodes aggregate the same set. With a partial quorum a scaled
                    // hostile delta (usable until the norm screen) can complete one node's
                    // quorum before another's, and the honest nodes then only agree again
                    // after a state sync.
                    c.round.quorum = 1.0;
                    c.round.collect_timeout = Duration::from_secs(5);
                },
            )
        })
        .collect();

    // The hostile node: the same network stack, no coordinator.
    let keypair = Keypair::generate_ed25519();
    let hostile_id = keypair.public().to_peer_id();
    let base = trainer(&data[0], &train_config())
        .weights()
        .await
        .expect("weights");
    let base_hash = ModelHash::of_tensors(&base);
    let layout = Arc::new(base.layout());
    let mut net = NetworkConfig::new("test".parse().expect("mesh"));
    net.listen = vec!["/memory/2100".parse().expect("addr")];
    net.bootstrap = vec![boot_addr.clone()];
    net.random_walk_interval = Duration::from_secs(2);
    net.request_timeout = Duration::from_secs(5);
    let store = Arc::new(Mutex::new(BlobStore::default()));
    let mut registry = Registry::default();
    let shutdown = CancellationToken::new();
    let mut hostile = network::start(
        &keypair,
        memory_transport(&keypair, None).expect("transport"),
        net,
        layout,
        Arc::clone(&store),
        &mut registry,
        shutdown.child_token(),
    )
    .expect("hostile network");
    let drain = tokio::spawn(async move { while hostile.events.recv().await.is_some() {} });
    let client = hostile.client.clone();
    // Wait for the honest nodes on the topic.
    for _ in 0..200 {
        if client.mesh_peers().await.expect("peers").len() >= honest {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let limits = Limits::default();
    // 0. A poisoned model whose hash is smaller than the honest base's, served as this peer's
    //    state. Its round-0 manifest names it as its base and arrives before any honest one:
    //    counted against the manifests heard so far, that is a 1-to-1 tie that the smaller
    //    hash wins, and every honest node would adopt the poison. Counted against the mesh
    //    (4 nodes) it is a minority and nobody moves.
    let poison = (1..)
        .map(|k| {
            TensorSet::new(
                base.tensors()
                    .iter()
                    .map(|t| {
                        Tensor::new(
                            t.name.clone(),
                            t.shape.clone(),
                            vec![100.0 + k as f32; t.values.len()],
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .expect("tensors"),
            )
            .expect("set")
        })
        .find(|p| ModelHash::of_tensors(p) < base_hash)
        .expect("some fill hashes below the base");
    let poison_hash = ModelHash::of_tensors(&poison);
    let state = meshtune_protocol::encode_state(
        &poison,
        &TensorSet::new(Vec::new()).expect("empty"),
        &meshtune_protocol::StateCodecParams::default(),
    )
    .expect("state");
    let state_chunks = chunk_blob(&state.blob, 1 << 16).expect("chunks");
    store.lock().expect("store").set_state(
        meshtune_protocol::StateManifest {
            mesh_id: "test".into(),
            round: 0,
            model_hash: poison_hash,
            sender: hostile_id.to_bytes(),
            training_steps: 0,
            blob: state_chunks.descriptor(),
            model: state.model,
            optimizer: state.optimizer,
        },
        Arc::new(state.blob),
        state_chunks,
    );
    // 1. Deltas for the first rounds with the right layout and a blob that hashes correctly:
    //    rounds 0 and 2 hold NaN (refused at decoding), round 1 is finite but scaled far
    //    beyond the honest deltas (left out by the norm screen before averaging). Round 0's
    //    names the poisoned base; a manifest a million rounds ahead claims the mesh moved on.
    let f32_raw: CodecParams = "f32".parse().expect("codec");
    for round in [0, 1, 2, 1_000_000u64] {
        let fill = if round == 1 { 1_000.0 } else { 0.0 };
        let values = TensorSet::new(
            base.tensors()
                .iter()
                .map(|t| Tensor::new(t.name.clone(), t.shape.clone(), vec![fill; t.values.len()]))
                .collect::<Result<Vec<_>, _>>()
                .expect("tensors"),
        )
        .expect("set");
        let mut encoded = encode_delta(&values, &f32_raw, None).expect("encode");
        if round != 1 {
            let start = encoded.tensors[0].offset as usize;
            let end = start + encoded.tensors[0].length as usize;
            for value in encoded.blob[start..end].chunks_exact_mut(4) {
                value.copy_from_slice(&f32::NAN.to_le_bytes());
            }
            encoded.blob[end - 1] ^= (round % 251) as u8 + 1; // a distinct blob per round
        }
        let chunks = chunk_blob(&encoded.blob, 1 << 16).expect("chunks");
        let manifest = DeltaManifest {
            mesh_id: "test".into(),
            round,
            base_model: if round == 1 { base_hash } else { poison_hash },
            sender: hostile_id.to_bytes(),
            sample_count: 64,
            training_steps: 3,
            blob: chunks.descriptor(),
            tensors: encoded.tensors,
        };
        store
            .lock()
            .expect("store")
            .insert(round, Arc::new(encoded.blob), chunks);
        publish_until_accepted(&client, manifest.encode(&limits).expect("manifest")).await;
    }
    // 2. Garbage on the topic (after the NaN deltas: two invalid messages push the sender's
    //    gossip score below the graylist threshold, and nothing it sends is heard after).
    publish_until_accepted(&client, vec![0xde; 300]).await;
    // 3. A manifest for another model layout.
    let bogus = TensorSet::new(vec![
        Tensor::new("bogus", vec![2], vec![1.0, 2.0]).expect("t"),
    ])
    .expect("set");
    let encoded = encode_delta(&bogus, &CodecParams::lossless(), None).expect("encode");
    let chunks = chunk_blob(&encoded.blob, 1 << 16).expect("chunks");
    let wrong_layout = DeltaManifest {
        mesh_id: "test".into(),
        round: 0,
        base_model: base_hash,
        sender: hostile_id.to_bytes(),
        sample_count: 64,
        training_steps: 3,
        blob: chunks.descriptor(),
        tensors: encoded.tensors,
    };
    publish_until_accepted(&client, wrong_layout.encode(&limits).expect("manifest")).await;
    // 4. A manifest in an honest node's name, signed by another peer (a fresh one: this
    //    hostile peer is graylisted by now, and nothing it sends is heard). Its blob is valid;
    //    the signer check must refuse it before anything is fetched.
    let forger_key = Keypair::generate_ed25519();
    let forger_store = Arc::new(Mutex::new(BlobStore::default()));
    let mut forger_net = NetworkConfig::new("test".parse().expect("mesh"));
    forger_net.listen = vec!["/memory/2101".parse().expect("addr")];
    forger_net.bootstrap = vec![boot_addr.clone()];
    forger_net.random_walk_interval = Duration::from_secs(2);
    // The forger leaves once its manifest is out: a silent peer that stays would count in every
    // honest node's mesh and hold each round until its deadline, which is not what this case
    // checks (the signer check is).
    let forger_shutdown = shutdown.child_token();
    let mut forger = network::start(
        &forger_key,
        memory_transport(&forger_key, None).expect("transport"),
        forger_net,
        Arc::new(base.layout()),
        Arc::clone(&forger_store),
        &mut Registry::default(),
        forger_shutdown.clone(),
    )
    .expect("forger network");
    let forger_client = forger.client.clone();
    let forger_drain = tokio::spawn(async move { while forger.events.recv().await.is_some() {} });
    let honest_ids: Vec<_> = nodes.iter().map(|n| n.peer_id).collect();
    for _ in 0..400 {
        let peers = forger_client.mesh_peers().await.expect("peers");
        if honest_ids.iter().all(|id| peers.contains(id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let zeros = TensorSet::new(
        base.tensors()
            .iter()
            .map(|t| Tensor::new(t.name.clone(), t.shape.clone(), vec![0.0; t.values.len()]))
            .collect::<Result<Vec<_>, _>>()
            .expect("tensors"),
    )
    .expect("set");
    let encoded = encode_delta(&zeros, &f32_raw, None).expect("encode");
    let chunks = chunk_blob(&encoded.blob, 1 << 16).expect("chunks");
    let forged = DeltaManifest {
        mesh_id: "test".into(),
        round: 1,
        base_model: base_hash,
        sender: honest_ids[1].to_bytes(),
        sample_count: 64,
        training_steps: 3,
        blob: chunks.descriptor(),
        tensors: encoded.tensors,
    };
    forger_store
        .lock()
        .expect("store")
        .insert(1, Arc::new(encoded.blob), chunks);
    publish_until_accepted(&forger_client, forged.encode(&limits).expect("manifest")).await;
    let refused = |text: String| {
        text.contains(
            "meshtune_gossip_rejected_total{reason=\"manifest sender is not its signer\"}",
        )
    };
    for _ in 0..400 {
        if nodes.iter().all(|n| refused(n.metrics.text())) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    forger_shutdown.cancel();
    // 5. A flood of chunk requests at one honest node.
    let target = nodes[0].peer_id;
    let mut failed = 0usize;
    for _ in 0..2_500 {
        let request = meshtune_protocol::ChunkRequest::ChunkList {
            chunk_list_hash: meshtune_protocol::ChunkListHash([7; 32]),
        };
        if client.request(target, request).await.is_err() {
            failed += 1;
        }
    }
    println!("flood: {failed} of 2500 requests refused");
    assert!(failed > 0, "the flood was never throttled");

    let mut weights = Vec::new();
    for (i, node) in nodes.into_iter().enumerate() {
        let summary = tokio::time::timeout(Duration::from_secs(300), node.handle)
            .await
            .expect("node finished in time")
            .expect("task")
            .expect("run");
        assert_eq!(summary.rounds.len(), 4, "node {i} applied every round");
        let rejected: u64 = summary
            .rounds
            .iter()
            .filter_map(|r| r.rejected.get("bad_data"))
            .sum();
        println!(
            "node {i}: rounds {:?}",
            summary
                .rounds
                .iter()
                .map(|r| (r.round, r.deltas, r.rejected.clone()))
                .collect::<Vec<_>>()
        );
        assert!(rejected >= 1, "node {i} never refused a NaN delta");
        let screened: u64 = summary
            .rounds
            .iter()
            .filter_map(|r| r.rejected.get("norm_outlier"))
            .sum();
        assert!(screened >= 1, "node {i} averaged the scaled delta");
        for r in &summary.rounds {
            // Every honest delta, and only those: a hostile delta would make it 4, a lost
            // honest one 2.
            assert_eq!(
                r.deltas, honest,
                "node {i} round {}: used {} deltas",
                r.round, r.deltas
            );
        }
        let text = node.metrics.text();
        let strikes: f64 = text
            .lines()
            .filter(|l| l.starts_with("meshtune_peer_strikes_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(
            strikes >= 1.0,
            "node {i} never struck the hostile peer:\n{text}"
        );
        // The forged manifest reached every honest node and was refused at the signer check.
        assert!(
            text.contains(
                "meshtune_gossip_rejected_total{reason=\"manifest sender is not its signer\"}"
            ),
            "node {i} did not refuse the manifest signed by another peer:\n{text}"
        );
        if i == 0 {
            // The flooded node scored the flood down (strikes lower the gossip score; five
            // blacklist the peer).
            assert!(
                text.contains("meshtune_peer_strikes_total{reason=\"request flood\"}"),
                "the flood earned no strike:\n{text}"
            );
        }
        let first = summary.rounds[0].train_loss.expect("loss");
        let last = summary.rounds[2].train_loss.expect("loss");
        assert!(last < first, "node {i}: loss {first} -> {last}");
        weights.push(node.trainer.weights().await.expect("weights"));
        node.shutdown.cancel();
    }
    let disagreement = relative_disagreement(&weights);
    assert!(
        disagreement <= 1e-5,
        "honest nodes disagree: {disagreement}"
    );
    shutdown.cancel();
    drain.abort();
    forger_drain.abort();
    drop(bootstrap);
}

async fn publish_until_accepted(client: &network::Client, data: Vec<u8>) {
    for _ in 0..100 {
        if client.publish(data.clone()).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("could not publish: no mesh peers");
}

/// Large deltas in many chunks, pulled from the announcer and from peers that already hold
/// them: every node must get every chunk of every delta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_chunk_deltas_arrive_whole() {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_bootstrap, boot_addr) = start_bootstrap(5_000).await;
    let n = 4;
    let data = shards(n, 32);
    let nodes: Vec<TestNode> = (0..n)
        .map(|i| {
            start_node(
                None,
                5_001 + i as u64,
                &boot_addr,
                &data[i],
                &dir.path().join(format!("node{i}")),
                n - 1,
                |c| {
                    c.codec = "f32".parse().expect("codec");
                    c.chunk_size = 8 * 1024;
                    c.rounds = Some(3);
                    c.round.collect_timeout = Duration::from_secs(20);
                },
            )
        })
        .collect();
    for (i, node) in nodes.into_iter().enumerate() {
        let summary = tokio::time::timeout(Duration::from_secs(120), node.handle)
            .await
            .expect("in time")
            .expect("task")
            .expect("run");
        for r in &summary.rounds {
            assert_eq!(r.deltas, n, "node {i} round {}: {:?}", r.round, r.rejected);
            assert!(r.raw_delta_bytes > 20 * 8 * 1024, "deltas span many chunks");
        }
        node.shutdown.cancel();
    }
}

/// A private mesh: nodes and bootstrap share a pre-shared key; a node without it, given the
/// same bootstrap address, never connects to anyone and the members train without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_mesh_key_cannot_join() {
    use libp2p::pnet::PreSharedKey;
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let psk = PreSharedKey::new([0x42; 32]);
    let (_bootstrap, boot_addr) = start_bootstrap_with_psk(6_000, Some(psk)).await;
    let data = shards(3, 32);
    let members: Vec<TestNode> = (0..2)
        .map(|i| {
            spawn_test_node(
                NodeSpec {
                    psk: Some(psk),
                    keypair: None,
                    port: 6_001 + i as u64,
                    bootstrap: &boot_addr,
                    records: &data[i],
                    out: &dir.path().join(format!("node{i}")),
                    peers_expected: 1,
                },
                |c| c.rounds = Some(3),
            )
        })
        .collect();
    // The outsider: right address, no key.
    let keypair = Keypair::generate_ed25519();
    let base = trainer(&data[2], &train_config())
        .weights()
        .await
        .expect("weights");
    let mut net = NetworkConfig::new("test".parse().expect("mesh"));
    net.listen = vec!["/memory/6100".parse().expect("addr")];
    net.bootstrap = vec![boot_addr.clone()];
    let shutdown = CancellationToken::new();
    let mut outsider = network::start(
        &keypair,
        memory_transport(&keypair, None).expect("transport"),
        net,
        Arc::new(base.layout()),
        Arc::new(Mutex::new(BlobStore::default())),
        &mut Registry::default(),
        shutdown.child_token(),
    )
    .expect("outsider network");
    for (i, node) in members.into_iter().enumerate() {
        let summary = tokio::time::timeout(Duration::from_secs(120), node.handle)
            .await
            .expect("in time")
            .expect("task")
            .expect("run");
        assert_eq!(summary.rounds.len(), 3, "member {i}");
        for r in &summary.rounds {
            assert_eq!(r.deltas, 2, "member {i} round {}", r.round);
        }
        node.shutdown.cancel();
    }
    let peers = outsider.client.mesh_peers().await.expect("peers");
    assert!(peers.is_empty(), "the outsider reached {peers:?}");
    while let Ok(event) = outsider.events.try_recv() {
        assert!(
            !matches!(event, network::NetworkEvent::Manifest { .. }),
            "the outsider received a manifest"
        );
    }
    shutdown.cancel();
}
