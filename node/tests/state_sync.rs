//! State sync from several donors: a late joiner pulls the mesh's state from every peer that
//! serves the same blob, a donor that dies mid-transfer is dropped while the others finish
//! it, and a donor at its upload cap answers `Busy` so joiners spread over the donors.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::bare_network_with_store;
use libp2p::PeerId;
use meshtune_net::PeerAddr;
use meshtune_node::averaging::aggregate::OuterState;
use meshtune_node::coordinator::{CoordinatorConfig, fetch_state, serve_state};
use meshtune_node::network::store::BlobStore;
use meshtune_node::network::{NetworkConfig, RunningNetwork};
use meshtune_protocol::{ModelHash, Tensor, TensorSet};
use tokio_util::sync::CancellationToken;

const MESH: &str = "sync";

/// A 4 MiB model (two tensors), deterministic.
fn model() -> TensorSet {
    let tensor = |name: &str, n: usize, k: f32| {
        Tensor::new(
            name,
            vec![n],
            (0..n).map(|i| ((i as f32) * 0.001 + k).sin()).collect(),
        )
        .expect("tensor")
    };
    TensorSet::new(vec![tensor("a", 600_000, 0.5), tensor("b", 448_576, 1.5)]).expect("set")
}

fn coordinator_config() -> CoordinatorConfig {
    let mut config = CoordinatorConfig::new(MESH, std::env::temp_dir());
    // Small chunks, one request in flight per donor: the transfer takes many requests, so a
    // donor can die in the middle of it.
    config.chunk_size = 16 * 1024;
    config.fetch.per_peer_concurrency = 1;
    config
}

struct Donor {
    network: RunningNetwork,
    store: Arc<Mutex<BlobStore>>,
    shutdown: CancellationToken,
    addr: PeerAddr,
}

fn donor(port: u64, max_uploads: usize, base: &TensorSet) -> Donor {
    let store = Arc::new(Mutex::new(BlobStore::with_max_state_uploads(max_uploads)));
    let config = coordinator_config();
    serve_state(
        &store,
        &config,
        PeerId::random(),
        5,
        base,
        &OuterState::default(),
    )
    .expect("serve state");
    let mut net = NetworkConfig::new(MESH.parse().expect("mesh"));
    let addr: libp2p::Multiaddr = format!("/memory/{port}").parse().expect("addr");
    net.listen = vec![addr.clone()];
    net.gossip_heartbeat = Duration::from_millis(200);
    net.max_requests_per_peer_per_s = 100_000;
    let shutdown = CancellationToken::new();
    let mut network = bare_network_with_store(net, Arc::clone(&store), &shutdown);
    let events = std::mem::replace(&mut network.events, tokio::sync::mpsc::channel(1).1);
    drain(events);
    Donor {
        addr: PeerAddr::new(network.peer_id, addr),
        network,
        store,
        shutdown,
    }
}

fn drain(mut events: tokio::sync::mpsc::Receiver<meshtune_node::network::NetworkEvent>) {
    tokio::spawn(async move { while events.recv().await.is_some() {} });
}

/// A joiner connected to `donors`, once all of them are in its gossip mesh.
async fn joiner(port: u64, donors: &[&Donor], shutdown: &CancellationToken) -> RunningNetwork {
    let mut net = NetworkConfig::new(MESH.parse().expect("mesh"));
    net.listen = vec![format!("/memory/{port}").parse().expect("addr")];
    net.bootstrap = donors.iter().map(|d| d.addr.clone()).collect();
    net.gossip_heartbeat = Duration::from_millis(200);
    net.request_timeout = Duration::from_secs(5);
    let mut network = bare_network_with_store(net, Arc::default(), shutdown);
    let events = std::mem::replace(&mut network.events, tokio::sync::mpsc::channel(1).1);
    drain(events);
    for _ in 0..200 {
        let peers = network.client.mesh_peers().await.unwrap_or_default();
        if donors.iter().all(|d| peers.contains(&d.network.peer_id)) {
            return network;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the donors never joined the joiner's gossip mesh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_sync_survives_its_first_donor_dying_mid_transfer() {
    common::init_logs();
    let base = model();
    let donors: Vec<Donor> = (0..3).map(|i| donor(7_500 + i, 0, &base)).collect();
    let shutdown = CancellationToken::new();
    let joiner = joiner(7_510, &donors.iter().collect::<Vec<_>>(), &shutdown).await;

    // Kill donor 0 (no goodbye) once it has served a few chunks.
    let victim = Arc::clone(&donors[0].store);
    let kill = donors[0].shutdown.clone();
    let killer = tokio::spawn(async move {
        loop {
            let served = victim.lock().expect("store").served_counts().0;
            if served >= 4 {
                kill.cancel();
                return served;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let layout = base.layout();
    let (round, model, _) = fetch_state(
        &joiner.client,
        donors[0].network.peer_id,
        5,
        layout,
        &coordinator_config(),
        None,
    )
    .await
    .expect("the sync completes on the remaining donors");
    let served_before_death = killer.await.expect("killer");
    assert_eq!(round, 5);
    assert_eq!(
        ModelHash::of_tensors(&model),
        ModelHash::of_tensors(&base),
        "the synced state verifies against the donors' model"
    );
    let chunks = {
        let store = donors[1].store.lock().expect("store");
        let blob = store.state().expect("state").blob;
        blob.blob_size.div_ceil(u64::from(blob.chunk_size)) as usize
    };
    let served: Vec<u64> = donors
        .iter()
        .map(|d| d.store.lock().expect("store").served_counts().0)
        .collect();
    println!(
        "chunks served per donor: {served:?} (of {chunks} chunks; donor 0 died after {served_before_death})"
    );
    assert!(
        (served[0] as usize) < chunks / 2,
        "donor 0 died early in the transfer: {served:?}"
    );
    assert!(
        served[1] > 0 && served[2] > 0,
        "both remaining donors served chunks: {served:?}"
    );
    shutdown.cancel();
    for d in &donors {
        d.shutdown.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn donors_at_their_upload_cap_spread_joiners_over_the_mesh() {
    common::init_logs();
    let base = model();
    // Each donor serves one joiner at a time; three joiners sync at once.
    let donors: Vec<Donor> = (0..2).map(|i| donor(7_600 + i, 1, &base)).collect();
    let shutdown = CancellationToken::new();
    let refs: Vec<&Donor> = donors.iter().collect();
    let mut joiners = Vec::new();
    for i in 0..3 {
        joiners.push(joiner(7_610 + i, &refs, &shutdown).await);
    }
    let from = donors[0].network.peer_id;
    let syncs = joiners.iter().map(|j| {
        let layout = base.layout();
        async move {
            fetch_state(&j.client, from, 5, layout, &coordinator_config(), None)
                .await
                .map(|(_, model, _)| ModelHash::of_tensors(&model))
        }
    });
    let results = futures::future::join_all(syncs).await;
    let want = ModelHash::of_tensors(&base);
    for result in &results {
        assert_eq!(result.as_ref().ok(), Some(&want), "{results:?}");
    }
    let counts: Vec<(u64, u64)> = donors
        .iter()
        .map(|d| d.store.lock().expect("store").served_counts())
        .collect();
    println!("(chunks served, busy answers) per donor: {counts:?}");
    assert!(
        counts.iter().any(|c| c.1 > 0),
        "three joiners on two donors with one slot each: someone was told to wait"
    );
    assert!(
        counts.iter().all(|c| c.0 > 0),
        "both donors served: {counts:?}"
    );
    shutdown.cancel();
    for d in &donors {
        d.shutdown.cancel();
    }
}
