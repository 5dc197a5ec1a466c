//! Taking a peer's state: who is ahead, who holds the same state blob, fetching and verifying
//! it (from several donors at once), and asking every peer for its final model after the last
//! round.
//!
//! **State sync from several donors**: the joiner asks every mesh peer for its `StateManifest`;
//! all that serve the identical blob are donors (up to 8), chunks come from all of them (≤ 4 in
//! flight each), and a donor whose requests fail twice in a row (it left) is dropped while the
//! others finish. A donor serves state chunks to at most `max_state_uploads` (4) peers at once;
//! the next one gets `Busy` and pulls from other donors, or waits (up to 2 min). States of
//! `stream_state_mib` (256) or more never sit in memory as a blob: the donor encodes them tensor
//! by tensor straight to `OUT/state/` (chunk hashes computed on the way) and serves chunks from
//! the file; the joiner writes each verified chunk into a file at its offset, hashes the whole
//! file, and decodes it one tensor at a time, so its memory is the model it receives plus a few
//! tensor-sized buffers (measured in docs/BENCHMARKS.md).
//!
//! **The last round**: no later round can repair a node that missed part of the last one (a delta
//! whose sender left before it was fetched). So after applying it, each node asks its mesh peers
//! for their `StateManifest` every 0.5 s until all of them report the final round (bounded by 2 x
//! the deadline + 2 x the last round's time), which keeps it serving the slower ones meanwhile;
//! the model most nodes hold wins (ties to the smaller hash, as for bases) and a node on another
//! model adopts it (logged, `meshtune_final_state_adopted_total`, checkpointed,
//! `adopted_final_state` in the run summary). Then it serves blobs until no peer fetched anything
//! for `linger_quiet_s` (5 s).
//!
//! Owns: the requests for states and their checks (mesh, round, hashes, the outer optimizer's
//! layout). Must not touch: the node's own model or files (the caller adopts what it gets).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use meshtune_protocol::{
    ChunkRequest, ChunkResponse, DecodeError, Limits, ModelHash, ModelLayout, ModelState,
    StateManifest, TensorSet, decode_state, decode_state_file,
};

use super::config::CoordinatorConfig;
use super::ledger::create_scratch_file;
use super::metrics::NodeMetrics;
use crate::averaging::aggregate::{AggregateError, OuterState};
use crate::network::Client;
use crate::network::RequestError;
use crate::network::fetch::{FetchError, fetch_blob, fetch_blob_to_file};

/// Donors one state sync pulls from at most.
pub const MAX_STATE_DONORS: usize = 8;

/// A synced state: its round, model, and the mesh's outer optimizer state.
pub type SyncedState = (u64, Box<TensorSet>, OuterState);

/// Why a peer's state could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("asking for the state: {0}")]
    Request(#[from] RequestError),
    #[error("peer has no state to serve")]
    NoState,
    #[error("state is for mesh `{0}`")]
    OtherMesh(String),
    #[error("peer's state is for round {have}, older than round {want}")]
    Old { have: u64, want: u64 },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fetching the state: {0}")]
    Fetch(#[from] FetchError),
    #[error("decoder task: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("state does not verify (this node's outer optimizer is `{outer}`): {source}")]
    Verify {
        outer: String,
        #[source]
        source: DecodeError,
    },
    #[error("peer's outer optimizer state: {0}")]
    Outer(#[from] AggregateError),
}

/// Every mesh peer's latest state of `mesh_id`, asked all at once (5 s each); peers that do
/// not answer, have no state, or serve another mesh are left out.
pub async fn latest_states(client: &Client, mesh_id: &str) -> Vec<(PeerId, StateManifest)> {
    let peers = client.mesh_peers().await.unwrap_or_default();
    let asks = peers.into_iter().map(|peer| {
        let request = ChunkRequest::LatestState {
            mesh_id: mesh_id.to_owned(),
        };
        async move {
            match tokio::time::timeout(Duration::from_secs(5), client.request(peer, request)).await
            {
                Ok(Ok(ChunkResponse::State(m))) if m.mesh_id == mesh_id => Some((peer, m)),
                _ => None,
            }
        }
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Mesh peers other than `from` that serve the very state blob `manifest` names (up to
/// [`MAX_STATE_DONORS`] - 1), asked all at once.
pub async fn same_state_holders(
    client: &Client,
    mesh_id: &str,
    manifest: &StateManifest,
    from: PeerId,
) -> Vec<PeerId> {
    latest_states(client, mesh_id)
        .await
        .into_iter()
        .filter(|(peer, m)| *peer != from && m.blob == manifest.blob)
        .map(|(peer, _)| peer)
        .take(MAX_STATE_DONORS - 1)
        .collect()
}

/// Asks every mesh peer for its latest state: when most of them are past `round` (they ran
/// rounds without this node), the peer to sync from and its round: the most advanced state
/// held by the most peers. A minority ahead is not followed (it may be lying), and peers of
/// another mesh or without a state do not count for either side.
pub async fn mesh_ahead(client: &Client, mesh_id: &str, round: u64) -> Option<(PeerId, u64)> {
    let states: Vec<(PeerId, u64, ModelHash)> = latest_states(client, mesh_id)
        .await
        .into_iter()
        .map(|(peer, m)| (peer, m.round, m.model_hash))
        .collect();
    crate::averaging::round::ahead_majority(round, &states)
}

/// Asks every mesh peer for its latest state until all of them report `final_round` (or
/// `wait` runs out): the final model hash of each peer that finished. A peer still in an
/// earlier round is asked again every half second, so this node keeps serving it meanwhile.
pub async fn final_states(
    client: &Client,
    mesh_id: &str,
    final_round: u64,
    wait: Duration,
) -> Vec<(PeerId, ModelHash)> {
    let start = Instant::now();
    let mut finished: HashMap<PeerId, ModelHash> = HashMap::new();
    loop {
        let peers = client.mesh_peers().await.unwrap_or_default();
        let mut behind = Vec::new();
        let unfinished: Vec<PeerId> = peers
            .into_iter()
            .filter(|p| !finished.contains_key(p))
            .collect();
        for peer in unfinished {
            let request = ChunkRequest::LatestState {
                mesh_id: mesh_id.to_owned(),
            };
            match tokio::time::timeout(Duration::from_secs(5), client.request(peer, request)).await
            {
                Ok(Ok(ChunkResponse::State(m)))
                    if m.mesh_id == mesh_id && m.round == final_round =>
                {
                    finished.insert(peer, m.model_hash);
                }
                // A peer configured for more rounds: not part of this ending.
                Ok(Ok(ChunkResponse::State(m))) if m.round > final_round => {}
                _ => behind.push(peer),
            }
        }
        if behind.is_empty() {
            break;
        }
        if start.elapsed() >= wait {
            tracing::warn!(
                waiting_for = ?behind, seconds = wait.as_secs_f64(),
                "peers did not finish the last round in time; comparing final models without them"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tracing::info!(
        finished = finished.len(),
        "compared final models with peers"
    );
    finished.into_iter().collect()
}

/// Fetches and verifies `from`'s latest state (of `round` or later), pulling chunks from every
/// mesh peer that serves the same blob.
pub async fn fetch_state(
    client: &Client,
    from: PeerId,
    round: u64,
    layout: ModelLayout,
    config: &CoordinatorConfig,
    metrics: Option<&NodeMetrics>,
) -> Result<SyncedState, SyncError> {
    let request = ChunkRequest::LatestState {
        mesh_id: config.mesh_id.clone(),
    };
    let ChunkResponse::State(manifest) = client.request(from, request).await? else {
        return Err(SyncError::NoState);
    };
    if manifest.mesh_id != config.mesh_id {
        return Err(SyncError::OtherMesh(manifest.mesh_id));
    }
    if manifest.round < round {
        return Err(SyncError::Old {
            have: manifest.round,
            want: round,
        });
    }
    // Every peer serving the same state blob is a donor: chunks come from all of them (a few
    // in flight per donor), and a donor that leaves mid-transfer is dropped while the others
    // finish the blob.
    let mut donors = vec![from];
    donors.extend(same_state_holders(client, &config.mesh_id, &manifest, from).await);
    tracing::info!(peer = %from, round = manifest.round, donors = donors.len(), bytes = manifest.blob.blob_size, "syncing state");
    let synced_round = manifest.round;
    let state = if manifest.blob.blob_size >= config.stream_state_bytes {
        fetch_state_to_file(client, manifest, &donors, layout, config, metrics).await?
    } else {
        fetch_state_in_memory(client, manifest, &donors, layout, config, metrics).await?
    };
    let outer = OuterState::from_tensors(&state.optimizer)?;
    Ok((synced_round, Box::new(state.model), outer))
}

fn verify_error(config: &CoordinatorConfig) -> impl FnOnce(DecodeError) -> SyncError + '_ {
    move |source| SyncError::Verify {
        outer: config.outer.to_string(),
        source,
    }
}

/// Counts `bytes` of state received and runs `decode` (with the limits and the outer
/// optimizer's layout) on a blocking thread.
async fn decode_off_thread(
    config: &CoordinatorConfig,
    metrics: Option<&NodeMetrics>,
    bytes: u64,
    outer_layout: ModelLayout,
    decode: impl FnOnce(Limits, ModelLayout) -> Result<ModelState, DecodeError> + Send + 'static,
) -> Result<ModelState, SyncError> {
    if let Some(metrics) = metrics {
        metrics.bytes("state_in", bytes);
    }
    let limits = config.limits.clone();
    tokio::task::spawn_blocking(move || decode(limits, outer_layout))
        .await?
        .map_err(verify_error(config))
}

/// A small state: fetched into memory and decoded there.
async fn fetch_state_in_memory(
    client: &Client,
    manifest: StateManifest,
    donors: &[PeerId],
    layout: ModelLayout,
    config: &CoordinatorConfig,
    metrics: Option<&NodeMetrics>,
) -> Result<ModelState, SyncError> {
    let fetched = fetch_blob(client, &manifest.blob, donors, &config.limits, config.fetch).await?;
    let bytes = fetched.blob.as_bytes().len() as u64;
    let outer_layout = OuterState::layout(config.outer, &layout);
    decode_off_thread(
        config,
        metrics,
        bytes,
        outer_layout,
        move |limits, outer_layout| {
            decode_state(&manifest, &fetched.blob, &layout, &outer_layout, &limits)
        },
    )
    .await
}

/// A large state: streamed to a file and decoded from it tensor by tensor, so memory holds the
/// decoded model and a few chunks, never a second copy of the blob.
async fn fetch_state_to_file(
    client: &Client,
    manifest: StateManifest,
    donors: &[PeerId],
    layout: ModelLayout,
    config: &CoordinatorConfig,
    metrics: Option<&NodeMetrics>,
) -> Result<ModelState, SyncError> {
    let dir = config.out.join("state");
    let io = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| SyncError::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let path = dir.join(format!("incoming-{}.part", manifest.blob.blob_hash));
    let file = create_scratch_file(&path).map_err(io(&path))?;
    let fetched = fetch_blob_to_file(
        client,
        &manifest.blob,
        donors,
        &config.limits,
        config.fetch,
        file,
    )
    .await;
    let decoded = match fetched {
        Ok((verified, _)) => {
            let outer_layout = OuterState::layout(config.outer, &layout);
            decode_off_thread(
                config,
                metrics,
                verified.size(),
                outer_layout,
                move |limits, outer_layout| {
                    decode_state_file(&manifest, &verified, &layout, &outer_layout, &limits)
                },
            )
            .await
        }
        Err(err) => Err(err.into()),
    };
    let _ = std::fs::remove_file(&path);
    decoded
}
