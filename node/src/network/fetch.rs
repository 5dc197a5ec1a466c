//! Pulling a blob by hash: its chunk list from the announcer (or another peer), then its
//! chunks from several peers in parallel, each chunk checked on arrival, with a per-peer
//! concurrency limit, a per-request timeout (the [`Client`]'s) and retries on other peers.
//!
//! Owns: the schedule of chunk requests. Must not touch: decoding (the caller decodes the
//! [`VerifiedBlob`]) or peer scoring (bad senders are returned; the caller strikes them).

use std::collections::{HashMap, VecDeque};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::PeerId;
use meshtune_protocol::{
    BlobAssembler, BlobDescriptor, ChunkList, ChunkRequest, ChunkResponse, Limits, VerifiedBlob,
};

use super::{Client, RequestError};

/// How hard to try.
#[derive(Debug, Clone, Copy)]
pub struct FetchConfig {
    /// Chunk requests in flight to one peer.
    pub per_peer_concurrency: usize,
    /// Attempts per chunk (and for the chunk list) across peers.
    pub max_attempts: usize,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            per_peer_concurrency: 4,
            max_attempts: 6,
        }
    }
}

/// A verified blob and what it took.
#[derive(Debug)]
pub struct Fetched {
    pub blob: VerifiedBlob,
    pub chunks: ChunkList,
    /// Peers that sent bytes not matching the hashes.
    pub bad_peers: Vec<PeerId>,
    /// Bytes of chunk payload received (retries included).
    pub payload_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Nobody served it in time (not necessarily anyone's fault).
    #[error("blob {blob} unavailable: {reason}")]
    Unavailable { blob: String, reason: String },
    /// The announcer's data does not match its own manifest.
    #[error("blob {blob}: {reason}")]
    BadData {
        blob: String,
        reason: String,
        bad_peers: Vec<PeerId>,
    },
}

/// Fetches the blob `descriptor` names. `providers[0]` is the announcer; the rest are peers
/// that may hold a copy (anyone who fetched it serves it).
pub async fn fetch_blob(
    client: &Client,
    descriptor: &BlobDescriptor,
    providers: &[PeerId],
    limits: &Limits,
    config: FetchConfig,
) -> Result<Fetched, FetchError> {
    let blob_name = descriptor.blob_hash.to_string();
    let unavailable = |reason: String| FetchError::Unavailable {
        blob: blob_name.clone(),
        reason,
    };
    if providers.is_empty() {
        return Err(unavailable("no peers to ask".into()));
    }
    let mut bad_peers = Vec::new();
    // The chunk list.
    let mut chunk_list = None;
    let mut last_error = String::new();
    for (attempt, provider) in providers
        .iter()
        .cycle()
        .take(config.max_attempts.max(1))
        .enumerate()
    {
        if bad_peers.contains(provider) {
            continue;
        }
        if attempt > 0 {
            // Peers other than the announcer may still be fetching the blob themselves (and
            // the announcer may be reachable only through them): give them time, 200 ms more
            // per attempt (3 s over six attempts).
            tokio::time::sleep(std::time::Duration::from_millis(200 * attempt as u64)).await;
        }
        match client
            .request(
                *provider,
                ChunkRequest::ChunkList {
                    chunk_list_hash: descriptor.chunk_list_hash,
                },
            )
            .await
        {
            Ok(ChunkResponse::ChunkList(list)) => match list.verify_against(descriptor) {
                Ok(()) => {
                    chunk_list = Some(list);
                    break;
                }
                Err(err) => {
                    last_error = err.to_string();
                    bad_peers.push(*provider);
                }
            },
            Ok(ChunkResponse::NotFound) => last_error = format!("{provider} does not have it"),
            Ok(_) => {
                last_error = format!("{provider} answered with the wrong kind of response");
                bad_peers.push(*provider);
            }
            Err(err) => last_error = err.to_string(),
        }
    }
    let Some(list) = chunk_list else {
        if bad_peers.first() == providers.first() {
            return Err(FetchError::BadData {
                blob: blob_name,
                reason: format!("chunk list: {last_error}"),
                bad_peers,
            });
        }
        return Err(unavailable(format!("chunk list: {last_error}")));
    };
    let mut assembler =
        BlobAssembler::new(list.clone(), limits).map_err(|err| FetchError::BadData {
            blob: blob_name.clone(),
            reason: err.to_string(),
            bad_peers: vec![providers[0]],
        })?;
    let blob_hash = descriptor.blob_hash;
    let mut queue: VecDeque<(u64, meshtune_protocol::ChunkHash, usize)> = assembler
        .missing_chunks()
        .map(|(index, hash)| (index, hash, 0))
        .collect();
    let mut in_flight: HashMap<PeerId, usize> = HashMap::new();
    let mut running = FuturesUnordered::new();
    let mut payload_bytes = 0u64;
    let mut lacking: Vec<PeerId> = Vec::new();
    loop {
        // Start what the per-peer limits allow.
        let mut deferred = VecDeque::new();
        while let Some((index, hash, attempt)) = queue.pop_front() {
            if attempt >= config.max_attempts {
                return Err(unavailable(format!(
                    "chunk {index} failed {attempt} times; last: {last_error}"
                )));
            }
            // Peers that sent bad bytes, or said they do not hold this blob, are not asked
            // again; waiting for a busy holder beats asking one that has nothing.
            let usable: Vec<PeerId> = providers
                .iter()
                .filter(|p| !bad_peers.contains(*p) && !lacking.contains(*p))
                .copied()
                .collect();
            if usable.is_empty() && bad_peers.is_empty() {
                return Err(unavailable(format!("no peer holds it; last: {last_error}")));
            }
            if usable.is_empty() {
                return Err(FetchError::BadData {
                    blob: blob_name,
                    reason: format!("every provider sent bad chunks; last: {last_error}"),
                    bad_peers,
                });
            }
            let start = (index as usize + attempt) % usable.len();
            let choice = (0..usable.len())
                .map(|k| usable[(start + k) % usable.len()])
                .find(|p| in_flight.get(p).copied().unwrap_or(0) < config.per_peer_concurrency);
            match choice {
                Some(peer) => {
                    *in_flight.entry(peer).or_insert(0) += 1;
                    let client = client.clone();
                    running.push(async move {
                        let result = client
                            .request(
                                peer,
                                ChunkRequest::Chunk {
                                    blob_hash,
                                    index,
                                    chunk_hash: hash,
                                },
                            )
                            .await;
                        (index, hash, attempt, peer, result)
                    });
                }
                None => deferred.push_back((index, hash, attempt)),
            }
        }
        queue = deferred;
        let Some((index, hash, attempt, peer, result)) = running.next().await else {
            break;
        };
        if let Some(n) = in_flight.get_mut(&peer) {
            *n = n.saturating_sub(1);
        }
        match result {
            Ok(ChunkResponse::Chunk(bytes)) => {
                payload_bytes += bytes.len() as u64;
                if let Err(err) = assembler.accept_chunk(index, &bytes) {
                    tracing::debug!(peer = %peer, index, error = %err, "chunk refused");
                    last_error = err.to_string();
                    if !bad_peers.contains(&peer) {
                        bad_peers.push(peer);
                    }
                    queue.push_back((index, hash, attempt + 1));
                }
            }
            Ok(ChunkResponse::NotFound) => {
                last_error = format!("{peer} does not have chunk {index}");
                if peer == providers[0] {
                    // The announcer itself no longer has it: a real failed attempt.
                    queue.push_back((index, hash, attempt + 1));
                } else {
                    if !lacking.contains(&peer) {
                        lacking.push(peer);
                    }
                    queue.push_back((index, hash, attempt));
                }
            }
            Ok(_) => {
                last_error = format!("{peer} answered a chunk request with another kind");
                bad_peers.push(peer);
                queue.push_back((index, hash, attempt + 1));
            }
            Err(err @ (RequestError::Timeout { .. } | RequestError::Failed { .. })) => {
                tracing::debug!(peer = %peer, index, error = %err, "chunk request failed");
                last_error = err.to_string();
                queue.push_back((index, hash, attempt + 1));
            }
            Err(err) => return Err(unavailable(err.to_string())),
        }
        if assembler.is_complete() && running.is_empty() {
            break;
        }
    }
    let blob = assembler.finish().map_err(|err| FetchError::BadData {
        blob: blob_name.clone(),
        reason: err.to_string(),
        bad_peers: bad_peers.clone(),
    })?;
    Ok(Fetched {
        blob,
        chunks: list,
        bad_peers,
        payload_bytes,
    })
}
