//! Pulling a blob by hash: its chunk list from the announcer (or another peer), then its
//! chunks from several peers in parallel, each chunk checked on arrival, with a per-peer
//! concurrency limit, a per-request timeout (the [`Client`]'s) and retries on other peers.
//!
//! Owns: the schedule of chunk requests. Must not touch: decoding (the caller decodes the
//! [`VerifiedBlob`]) or peer scoring (bad senders are returned; the caller strikes them).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::PeerId;
use meshtune_protocol::{
    BlobAssembler, BlobDescriptor, ChunkError, ChunkHash, ChunkList, ChunkRequest, ChunkResponse,
    ChunkSink, FileAssembler, Limits, VerifiedBlob, VerifiedFile,
};

use super::{Client, RequestError};

/// How hard to try.
#[derive(Debug, Clone, Copy)]
pub struct FetchConfig {
    /// Chunk requests in flight to one peer.
    pub per_peer_concurrency: usize,
    /// Attempts per chunk (and for the chunk list) across peers.
    pub max_attempts: usize,
    /// How long to keep waiting while every holder answers [`ChunkResponse::Busy`].
    pub busy_patience: Duration,
}

/// A holder that answered [`ChunkResponse::Busy`] is asked again after this long.
const BUSY_BACKOFF: Duration = Duration::from_millis(500);

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            per_peer_concurrency: 4,
            max_attempts: 6,
            busy_patience: Duration::from_secs(120),
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
    let list = fetch_chunk_list(client, descriptor, providers, config).await?;
    let blob_name = descriptor.blob_hash.to_string();
    let assembler =
        BlobAssembler::new(list.clone(), limits).map_err(|err| FetchError::BadData {
            blob: blob_name.clone(),
            reason: err.to_string(),
            bad_peers: vec![providers[0]],
        })?;
    let (assembler, bad_peers, payload_bytes) =
        fetch_chunks(client, descriptor, providers, assembler, config).await?;
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

/// [`fetch_blob`] streamed into `file` (created empty by the caller): memory holds a few
/// chunks in flight, never the blob, whatever its size.
pub async fn fetch_blob_to_file(
    client: &Client,
    descriptor: &BlobDescriptor,
    providers: &[PeerId],
    limits: &Limits,
    config: FetchConfig,
    file: std::fs::File,
) -> Result<(VerifiedFile, ChunkList), FetchError> {
    let list = fetch_chunk_list(client, descriptor, providers, config).await?;
    let blob_name = descriptor.blob_hash.to_string();
    let sink = FileAssembler::new(list.clone(), limits, file).map_err(|err| match err {
        ChunkError::Storage(reason) => FetchError::Unavailable {
            blob: blob_name.clone(),
            reason,
        },
        other => FetchError::BadData {
            blob: blob_name.clone(),
            reason: other.to_string(),
            bad_peers: vec![providers[0]],
        },
    })?;
    let (sink, bad_peers, _) = fetch_chunks(client, descriptor, providers, sink, config).await?;
    // Hashing the whole file is disk-bound: off the async threads.
    let verified = tokio::task::spawn_blocking(move || sink.finish())
        .await
        .map_err(|err| FetchError::Unavailable {
            blob: blob_name.clone(),
            reason: err.to_string(),
        })?
        .map_err(|err| FetchError::BadData {
            blob: blob_name.clone(),
            reason: err.to_string(),
            bad_peers,
        })?;
    Ok((verified, list))
}

/// The verified chunk list of `descriptor`, from the first provider that has it.
async fn fetch_chunk_list(
    client: &Client,
    descriptor: &BlobDescriptor,
    providers: &[PeerId],
    config: FetchConfig,
) -> Result<ChunkList, FetchError> {
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
    Ok(list)
}

/// Pulls every chunk `sink` is missing from `providers` (a few in flight per peer, retries
/// elsewhere); the sink checks each one. Returns the filled sink, the peers that sent bad
/// bytes, and the payload bytes received.
async fn fetch_chunks<S: ChunkSink>(
    client: &Client,
    descriptor: &BlobDescriptor,
    providers: &[PeerId],
    mut assembler: S,
    config: FetchConfig,
) -> Result<(S, Vec<PeerId>, u64), FetchError> {
    let blob_hash = descriptor.blob_hash;
    // Relay circuits are slow and capped: used for chunks only when no direct holder is left.
    let relayed = client.relayed_only_peers().await.unwrap_or_default();
    let mut schedule = ChunkSchedule::new(descriptor, providers, relayed, config, &assembler);
    let mut running = FuturesUnordered::new();
    loop {
        let now = Instant::now();
        for (pending, peer) in schedule.assign(now)? {
            let client = client.clone();
            running.push(async move {
                let (index, chunk_hash, _) = pending;
                let request = ChunkRequest::Chunk {
                    blob_hash,
                    index,
                    chunk_hash,
                };
                (pending, peer, client.request(peer, request).await)
            });
        }
        if running.is_empty() && !schedule.queue.is_empty() {
            // Every holder left is at its upload cap: wait for a slot, within patience.
            tokio::time::sleep(schedule.busy_nap(now)?).await;
            continue;
        }
        let Some((pending, peer, result)) = running.next().await else {
            break;
        };
        schedule.on_answer(&mut assembler, pending, peer, result)?;
        if assembler.complete() && running.is_empty() {
            break;
        }
    }
    Ok((assembler, schedule.bad_peers, schedule.payload_bytes))
}

/// A chunk still to fetch: index, expected hash, failed attempts so far.
type PendingChunk = (u64, ChunkHash, usize);

/// The schedule of one blob's chunk pulls: what is queued, who is asked, who is left out.
struct ChunkSchedule<'a> {
    providers: &'a [PeerId],
    relayed: HashSet<PeerId>,
    config: FetchConfig,
    blob_name: String,
    queue: VecDeque<PendingChunk>,
    in_flight: HashMap<PeerId, usize>,
    /// Peers that sent bytes not matching the hashes.
    bad_peers: Vec<PeerId>,
    /// Peers that said they do not hold the blob, or stopped answering.
    lacking: Vec<PeerId>,
    /// Donors at their upload cap, until when not to ask them again.
    busy: HashMap<PeerId, Instant>,
    busy_waited: Duration,
    /// Failed requests in a row per peer: a donor that left mid-transfer is dropped after two.
    failures: HashMap<PeerId, usize>,
    last_error: String,
    payload_bytes: u64,
}

impl<'a> ChunkSchedule<'a> {
    fn new<S: ChunkSink>(
        descriptor: &BlobDescriptor,
        providers: &'a [PeerId],
        relayed: HashSet<PeerId>,
        config: FetchConfig,
        sink: &S,
    ) -> Self {
        Self {
            providers,
            relayed,
            config,
            blob_name: descriptor.blob_hash.to_string(),
            queue: sink
                .missing()
                .into_iter()
                .map(|(index, hash)| (index, hash, 0))
                .collect(),
            in_flight: HashMap::new(),
            bad_peers: Vec::new(),
            lacking: Vec::new(),
            busy: HashMap::new(),
            busy_waited: Duration::ZERO,
            failures: HashMap::new(),
            last_error: String::new(),
            payload_bytes: 0,
        }
    }

    fn unavailable(&self, reason: String) -> FetchError {
        FetchError::Unavailable {
            blob: self.blob_name.clone(),
            reason,
        }
    }

    /// Peers to ask: not bad, not lacking, not busy; direct ones first (see
    /// [`prefer_direct`]). Waiting for a busy holder beats asking one that has nothing.
    fn usable(&self) -> Vec<PeerId> {
        prefer_direct(
            self.providers
                .iter()
                .filter(|p| {
                    !self.bad_peers.contains(*p)
                        && !self.lacking.contains(*p)
                        && !self.busy.contains_key(*p)
                })
                .copied()
                .collect(),
            &self.relayed,
        )
    }

    /// Takes the queued chunks that the per-peer limits let start now, each with the peer to
    /// ask; the rest stay queued. Fails when a chunk has used its attempts or nobody is left.
    fn assign(&mut self, now: Instant) -> Result<Vec<(PendingChunk, PeerId)>, FetchError> {
        let mut deferred = VecDeque::new();
        let mut started = Vec::new();
        self.busy.retain(|_, until| *until > now);
        while let Some((index, hash, attempt)) = self.queue.pop_front() {
            if attempt >= self.config.max_attempts {
                return Err(self.unavailable(format!(
                    "chunk {index} failed {attempt} times; last: {}",
                    self.last_error
                )));
            }
            let usable = self.usable();
            if usable.is_empty() && !self.busy.is_empty() {
                deferred.push_back((index, hash, attempt));
                continue;
            }
            if usable.is_empty() && self.bad_peers.is_empty() {
                return Err(
                    self.unavailable(format!("no peer holds it; last: {}", self.last_error))
                );
            }
            if usable.is_empty() {
                return Err(FetchError::BadData {
                    blob: self.blob_name.clone(),
                    reason: format!("every provider sent bad chunks; last: {}", self.last_error),
                    bad_peers: self.bad_peers.clone(),
                });
            }
            let start = (index as usize + attempt) % usable.len();
            let choice = (0..usable.len())
                .map(|k| usable[(start + k) % usable.len()])
                .find(|p| {
                    self.in_flight.get(p).copied().unwrap_or(0) < self.config.per_peer_concurrency
                });
            match choice {
                Some(peer) => {
                    *self.in_flight.entry(peer).or_insert(0) += 1;
                    started.push(((index, hash, attempt), peer));
                }
                None => deferred.push_back((index, hash, attempt)),
            }
        }
        self.queue = deferred;
        Ok(started)
    }

    /// How long to wait for a busy holder's slot (it fails once the waits exceed
    /// `busy_patience`).
    fn busy_nap(&mut self, now: Instant) -> Result<Duration, FetchError> {
        let wake = self.busy.values().min().copied().unwrap_or(now);
        let nap = wake
            .saturating_duration_since(now)
            .max(Duration::from_millis(10));
        self.busy_waited += nap;
        if self.busy_waited > self.config.busy_patience {
            return Err(self.unavailable(format!(
                "every holder stayed busy for {:.0} s",
                self.busy_waited.as_secs_f64()
            )));
        }
        Ok(nap)
    }

    /// `peer`'s answer for `pending`: a chunk goes to `sink` (bad bytes mark the peer bad),
    /// anything else requeues the chunk, as a failed attempt where it was one.
    fn on_answer<S: ChunkSink>(
        &mut self,
        sink: &mut S,
        pending: PendingChunk,
        peer: PeerId,
        result: Result<ChunkResponse, RequestError>,
    ) -> Result<(), FetchError> {
        let (index, hash, attempt) = pending;
        if let Some(n) = self.in_flight.get_mut(&peer) {
            *n = n.saturating_sub(1);
        }
        if matches!(result, Err(RequestError::Failed { .. })) {
            let failed = self.failures.entry(peer).or_insert(0);
            *failed += 1;
            if *failed >= 2 && !self.lacking.contains(&peer) {
                tracing::info!(peer = %peer, "a holder stopped answering; fetching from the others");
                self.lacking.push(peer);
            }
        } else {
            self.failures.remove(&peer);
        }
        match result {
            Ok(ChunkResponse::Busy) => {
                self.busy.insert(peer, Instant::now() + BUSY_BACKOFF);
                self.queue.push_back((index, hash, attempt));
            }
            Ok(ChunkResponse::Chunk(bytes)) => {
                self.payload_bytes += bytes.len() as u64;
                if let Err(err) = sink.accept(index, &bytes) {
                    tracing::debug!(peer = %peer, index, error = %err, "chunk refused");
                    self.last_error = err.to_string();
                    if !self.bad_peers.contains(&peer) {
                        self.bad_peers.push(peer);
                    }
                    self.queue.push_back((index, hash, attempt + 1));
                }
            }
            Ok(ChunkResponse::NotFound) => {
                self.last_error = format!("{peer} does not have chunk {index}");
                if peer == self.providers[0] {
                    // The announcer itself no longer has it: a real failed attempt.
                    self.queue.push_back((index, hash, attempt + 1));
                } else {
                    if !self.lacking.contains(&peer) {
                        self.lacking.push(peer);
                    }
                    self.queue.push_back((index, hash, attempt));
                }
            }
            Ok(_) => {
                self.last_error = format!("{peer} answered a chunk request with another kind");
                self.bad_peers.push(peer);
                self.queue.push_back((index, hash, attempt + 1));
            }
            Err(err @ (RequestError::Timeout { .. } | RequestError::Failed { .. })) => {
                tracing::debug!(peer = %peer, index, error = %err, "chunk request failed");
                self.last_error = err.to_string();
                self.queue.push_back((index, hash, attempt + 1));
            }
            Err(err) => return Err(self.unavailable(err.to_string())),
        }
        Ok(())
    }
}

/// `usable` without the peers reached only through a relay, unless nothing else is left: bulk
/// chunk transfer stays off relayed links while a direct path to a holder exists.
fn prefer_direct(usable: Vec<PeerId>, relayed: &HashSet<PeerId>) -> Vec<PeerId> {
    if usable.iter().any(|p| !relayed.contains(p)) {
        usable
            .into_iter()
            .filter(|p| !relayed.contains(p))
            .collect()
    } else {
        usable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_holders_are_used_only_when_no_direct_one_is_left() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let relayed: std::collections::HashSet<PeerId> = [b].into_iter().collect();
        assert_eq!(prefer_direct(vec![a, b, c], &relayed), vec![a, c]);
        assert_eq!(prefer_direct(vec![b], &relayed), vec![b]);
        assert_eq!(prefer_direct(vec![], &relayed), Vec::<PeerId>::new());
        assert_eq!(prefer_direct(vec![a, c], &relayed), vec![a, c]);
    }
}
