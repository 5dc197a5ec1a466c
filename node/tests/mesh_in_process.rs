//! In-process meshes on libp2p's memory transport: a bootstrap node plus N meshtune nodes with
//! a tiny T5 each, discovering each other only through the bootstrap node. Checks that they
//! converge to the same parameters, that their loss drops, what the wire costs, and that
//! hostile peers are refused while the honest ones keep training.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use meshtune_bootstrap::transport::memory_transport;
use meshtune_bootstrap::{BootstrapConfig, PeerAddr};
use meshtune_model::backend::CpuTrain;
use meshtune_model::config::T5Config;
use meshtune_model::data::{SamsumRecord, load_samsum};
use meshtune_model::t5::T5;
use meshtune_model::tokenizer::T5Tokenizer;
use meshtune_model::weights::RandomInit;
use meshtune_node::averaging::aggregate::relative_disagreement;
use meshtune_node::averaging::round::RoundConfig;
use meshtune_node::commands::train::TrainConfig;
use meshtune_node::coordinator::metrics::NodeMetrics;
use meshtune_node::coordinator::{self, CoordinatorConfig, RunSummary};
use meshtune_node::network::store::BlobStore;
use meshtune_node::network::{self, NetworkConfig};
use meshtune_node::trainer::{T5Trainer, TrainerHandle};
use meshtune_protocol::TensorSet;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// `RUST_LOG=meshtune_node=debug cargo test …` shows the nodes' events.
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/synthetic")
}

fn tiny_config() -> T5Config {
    let tokenizer = T5Tokenizer::from_file(&fixtures().join("tokenizer.json")).expect("tokenizer");
    serde_json::from_value(serde_json::json!({
        "vocab_size": tokenizer.vocab_size().max(432), "d_model": 32, "d_kv": 8, "d_ff": 64,
        "num_layers": 1, "num_decoder_layers": 1, "num_heads": 4,
        "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
        "feed_forward_proj": "gated-gelu", "tie_word_embeddings": false,
        "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1
    }))
    .expect("config")
}

fn train_config() -> TrainConfig {
    TrainConfig {
        batch_size: 8,
        lr: 3e-3,
        warmup_steps: 0,
        schedule: meshtune_model::optim::ScheduleKind::Constant,
        source_max_len: 48,
        target_max_len: 24,
        eval_examples: 8,
        eval_max_new_tokens: 8,
        steps: 1000,
        ..TrainConfig::default()
    }
}

fn trainer(records: &[SamsumRecord], config: &TrainConfig) -> TrainerHandle {
    let model_config = tiny_config();
    let device = Default::default();
    // Every node starts from the same seed: the same model.
    let model: T5<CpuTrain> = T5::from_source(
        &model_config,
        &mut RandomInit::<CpuTrain>::new(&model_config, &device, 7),
    )
    .expect("model");
    let tokenizer = T5Tokenizer::from_file(&fixtures().join("tokenizer.json")).expect("tokenizer");
    let eval = load_samsum(&fixtures().join("eval.jsonl")).expect("eval");
    let trainer = T5Trainer::new(
        model,
        model_config,
        tokenizer,
        config.clone(),
        false,
        records,
        eval.into_iter().take(8).collect(),
        device,
    )
    .expect("trainer");
    TrainerHandle::spawn("test", trainer).expect("spawn")
}

struct TestNode {
    peer_id: PeerId,
    trainer: TrainerHandle,
    handle: tokio::task::JoinHandle<anyhow::Result<RunSummary>>,
    shutdown: CancellationToken,
    metrics: NodeMetrics,
}

async fn start_bootstrap(port: u64) -> (meshtune_bootstrap::RunningBootstrap, PeerAddr) {
    let keypair = Keypair::generate_ed25519();
    let mut config = BootstrapConfig::new(PathBuf::from("unused"));
    let addr: Multiaddr = format!("/memory/{port}").parse().expect("addr");
    config.listen = vec![addr.clone()];
    config.behaviour.mesh = "test".parse().expect("mesh");
    let transport = memory_transport(&keypair, None).expect("transport");
    let bootstrap = meshtune_bootstrap::start_with_transport(&config, keypair, transport)
        .await
        .expect("bootstrap");
    let peer = PeerAddr::new(bootstrap.peer_id(), addr);
    (bootstrap, peer)
}

#[allow(clippy::too_many_arguments)]
fn start_node(
    port: u64,
    bootstrap: &PeerAddr,
    records: &[SamsumRecord],
    out: &Path,
    peers_expected: usize,
    configure: impl FnOnce(&mut CoordinatorConfig),
) -> TestNode {
    let keypair = Keypair::generate_ed25519();
    let peer_id = keypair.public().to_peer_id();
    let trainer = trainer(records, &train_config());
    let weights: TensorSet = futures::executor::block_on(trainer.weights()).expect("weights");
    let layout = Arc::new(weights.layout());
    let mut net = NetworkConfig::new("test".parse().expect("mesh"));
    net.listen = vec![format!("/memory/{port}").parse().expect("addr")];
    net.bootstrap = vec![bootstrap.clone()];
    net.random_walk_interval = Duration::from_secs(2);
    net.request_timeout = Duration::from_secs(10);
    let mut registry = Registry::default();
    let metrics = NodeMetrics::new(&mut registry);
    let store = Arc::new(Mutex::new(BlobStore::default()));
    let shutdown = CancellationToken::new();
    let running = network::start(
        &keypair,
        memory_transport(&keypair, None).expect("transport"),
        net,
        layout,
        Arc::clone(&store),
        &mut registry,
        shutdown.child_token(),
    )
    .expect("network");
    metrics.attach_registry(Arc::new(registry));
    let mut config = CoordinatorConfig::new("test", out.to_path_buf());
    config.local_steps = 3;
    config.rounds = Some(4);
    config.final_exchange = true;
    config.codec = "int8/64+zstd:1".parse().expect("codec");
    config.eval_every = 0;
    config.round = RoundConfig {
        quorum: 1.0,
        min_deltas: 1,
        collect_timeout: Duration::from_secs(60),
        future_window: 1,
    };
    config.wait_for_peers = peers_expected;
    config.wait_timeout = Duration::from_secs(30);
    configure(&mut config);
    let handle = tokio::spawn(coordinator::run(
        config,
        peer_id,
        trainer.clone(),
        running.client,
        running.events,
        store,
        metrics.clone(),
        shutdown.clone(),
    ));
    TestNode {
        peer_id,
        trainer,
        handle,
        shutdown,
        metrics,
    }
}

fn shards(n: usize, per_node: usize) -> Vec<Vec<SamsumRecord>> {
    let all = load_samsum(&fixtures().join("train.jsonl")).expect("train");
    (0..n)
        .map(|i| all[i * per_node..(i + 1) * per_node].to_vec())
        .collect()
}

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
        node.shutdown.cancel();
        let _ = node.metrics;
        let _ = node.peer_id;
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
                2_001 + i as u64,
                &boot_addr,
                &data[i],
                &dir.path().join(format!("node{i}")),
                honest, // the two other honest nodes and the hostile one
                |c| {
                    // The hostile peer never sends a usable delta: rounds end at the deadline
                    // or when the honest quorum (3 of 4) is in.
                    c.round.quorum = 0.75;
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
    // 1. NaN deltas for the first rounds: the right layout, a blob that hashes correctly,
    //    values that do not decode to finite numbers.
    let f32_raw: CodecParams = "f32".parse().expect("codec");
    for round in 0..3u64 {
        let zeros = TensorSet::new(
            base.tensors()
                .iter()
                .map(|t| Tensor::new(t.name.clone(), t.shape.clone(), vec![0.0; t.values.len()]))
                .collect::<Result<Vec<_>, _>>()
                .expect("tensors"),
        )
        .expect("set");
        let mut encoded = encode_delta(&zeros, &f32_raw, None).expect("encode");
        let start = encoded.tensors[0].offset as usize;
        let end = start + encoded.tensors[0].length as usize;
        for value in encoded.blob[start..end].chunks_exact_mut(4) {
            value.copy_from_slice(&f32::NAN.to_le_bytes());
        }
        encoded.blob[end - 1] ^= round as u8; // a distinct blob per round
        let chunks = chunk_blob(&encoded.blob, 1 << 16).expect("chunks");
        let manifest = DeltaManifest {
            mesh_id: "test".into(),
            round,
            base_model: base_hash,
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
    // 4. A flood of chunk requests at one honest node.
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
        for r in &summary.rounds {
            assert!(
                r.deltas <= honest,
                "node {i} used a hostile delta in round {}",
                r.round
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
