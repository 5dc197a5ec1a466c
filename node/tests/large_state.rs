//! A large state moves between nodes with bounded memory: the donor encodes it straight to a
//! file and serves chunks from there; the joiner streams chunks to a file and decodes it
//! tensor by tensor. The joiner's peak RSS during the sync stays near the size of the model
//! it receives (which it must hold), not twice that (blob + model), as with an in-memory
//! transfer.
//!
//! 384 MiB here (a 3B-parameter state is about 12 GB; the same code path). Its own test
//! binary, so no other test's allocations are counted.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::bare_network_with_store;
use libp2p::PeerId;
use meshtune_net::PeerAddr;
use meshtune_node::averaging::aggregate::OuterState;
use meshtune_node::coordinator::{CoordinatorConfig, fetch_state, serve_state};
use meshtune_node::network::NetworkConfig;
use meshtune_node::network::store::BlobStore;
use meshtune_protocol::{ModelHash, Tensor, TensorSet};
use tokio_util::sync::CancellationToken;

const MESH: &str = "large";
/// 384 MiB of f32 unless `MESHTUNE_STATE_MIB` asks for more (docs/BENCHMARKS.md runs 4 GiB).
fn floats() -> usize {
    std::env::var("MESHTUNE_STATE_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(384)
        << 18
}
/// Like a real model, no tensor is a large part of it.
const TENSORS: usize = 16;

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} missing from /proc/self/status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_state_syncs_through_files_with_bounded_memory() {
    common::init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let config = |name: &str| {
        let mut c = CoordinatorConfig::new(MESH, dir.path().join(name));
        c.stream_state_bytes = 64 << 20;
        c
    };
    let floats = floats();
    // The donor's model: values that do not compress.
    let tensors: Vec<Tensor> = (0..TENSORS as u32)
        .map(|t| {
            let mut x = 0x9E37_79B9u32.wrapping_mul(t + 1);
            let values = (0..floats / TENSORS)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x as f32 / u32::MAX as f32) - 0.5
                })
                .collect();
            Tensor::new(format!("t{t:02}"), vec![floats / TENSORS], values).expect("tensor")
        })
        .collect();
    let model = TensorSet::new(tensors).expect("model");
    let want = ModelHash::of_tensors(&model);
    let layout = model.layout();
    let state_bytes = (floats * 4) as f64;

    let store = Arc::new(Mutex::new(BlobStore::default()));
    serve_state(
        &store,
        &config("donor"),
        PeerId::random(),
        7,
        &model,
        &OuterState::default(),
    )
    .expect("serve");
    drop(model);
    let files: Vec<_> = std::fs::read_dir(dir.path().join("donor/state"))
        .expect("state dir")
        .flatten()
        .collect();
    assert_eq!(files.len(), 1, "the donor's state is a file");

    let shutdown = CancellationToken::new();
    let mut net = NetworkConfig::new(MESH.parse().expect("mesh"));
    let addr: libp2p::Multiaddr = "/memory/7700".parse().expect("addr");
    net.listen = vec![addr.clone()];
    net.gossip_heartbeat = Duration::from_millis(200);
    net.max_requests_per_peer_per_s = 100_000;
    let mut donor = bare_network_with_store(net, Arc::clone(&store), &shutdown);
    let events = std::mem::replace(&mut donor.events, tokio::sync::mpsc::channel(1).1);
    tokio::spawn(async move {
        let mut events = events;
        while events.recv().await.is_some() {}
    });
    let mut net = NetworkConfig::new(MESH.parse().expect("mesh"));
    net.listen = vec!["/memory/7701".parse().expect("addr")];
    net.bootstrap = vec![PeerAddr::new(donor.peer_id, addr)];
    net.request_timeout = Duration::from_secs(30);
    let mut joiner = bare_network_with_store(net, Arc::default(), &shutdown);
    let events = std::mem::replace(&mut joiner.events, tokio::sync::mpsc::channel(1).1);
    tokio::spawn(async move {
        let mut events = events;
        while events.recv().await.is_some() {}
    });

    // Measure from here: reset the peak to the current resident size.
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    let before = status_kib("VmRSS:");
    let mut synced = None;
    for _ in 0..50 {
        match fetch_state(
            &joiner.client,
            donor.peer_id,
            7,
            layout.clone(),
            &config("joiner"),
            None,
        )
        .await
        {
            Ok(state) => {
                synced = Some(state);
                break;
            }
            // Until the connection is up.
            Err(err)
                if err.to_string().contains("not connected")
                    || err.to_string().contains("dial") =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("sync failed: {err}"),
        }
    }
    let (round, synced, _) = synced.expect("synced");
    let peak = status_kib("VmHWM:");
    let growth = (peak.saturating_sub(before) * 1024) as f64;
    println!(
        "state {:.0} MiB: joiner's peak RSS grew {:.0} MiB ({:.2}x the state) during the sync",
        state_bytes / 1048576.0,
        growth / 1048576.0,
        growth / state_bytes
    );
    assert_eq!(round, 7);
    assert_eq!(ModelHash::of_tensors(&synced), want);
    // The decoded model is one copy; decoding one tensor takes a few buffers of its size
    // (the encoded segment, the decompressed bytes, the values). An in-memory transfer would
    // add the whole blob: 2x the state and more.
    let largest = state_bytes / TENSORS as f64;
    let bound = state_bytes + 4.0 * largest + 32.0 * 1048576.0;
    assert!(
        growth <= bound,
        "peak RSS grew {:.0} MiB, more than the model plus a few tensors ({:.0} MiB)",
        growth / 1048576.0,
        bound / 1048576.0
    );
    // The joiner's temporary file is gone; the donor's stays while it serves.
    let joiner_files = std::fs::read_dir(dir.path().join("joiner/state"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(joiner_files, 0);
    shutdown.cancel();
}
