//! Blob requests on the request-response protocol: answers to this node's own requests go
//! back to the waiting [`Client`](crate::network::Client); inbound requests are rate-limited
//! per peer and answered from the [`BlobStore`](crate::network::store::BlobStore), with state
//! chunks kept in files read on a blocking thread (never on the swarm task) and chunks in
//! memory sent as views of the stored blob.

use std::time::{Duration, Instant};

use bytes::Bytes;
use libp2p::PeerId;
use libp2p::request_response::{self, ResponseChannel};
use meshtune_protocol::{ChunkRequest, ChunkResponse};

use super::{EventLoop, InboundWindow};
use crate::network::client::RequestError;
use crate::network::codec::BlobResponse;
use crate::network::metrics::NetMetrics;
use crate::network::store::{self, FileChunk, Served};

/// How long the window of [`EventLoop::allow_inbound`]'s rate limit lasts.
const INBOUND_WINDOW: Duration = Duration::from_secs(10);

/// A state chunk read from its file on a blocking thread, with where its answer goes.
pub(super) struct FileRead {
    peer: PeerId,
    channel: ResponseChannel<BlobResponse>,
    chunk: std::io::Result<Bytes>,
}

impl EventLoop {
    pub(super) fn on_blob_event(
        &mut self,
        event: request_response::Event<ChunkRequest, BlobResponse>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.on_request(peer, request, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    let response = ChunkResponse::from(response);
                    if let Some(peer) = self.manifest_requests.remove(&request_id) {
                        self.on_direct_manifest(peer, response);
                    } else if let Some(reply) = self.pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if self.manifest_requests.remove(&request_id).is_some() {
                    tracing::debug!(peer = %peer, error = %error, "no current manifest from a new neighbour");
                } else if let Some(reply) = self.pending.remove(&request_id) {
                    let error = match error {
                        request_response::OutboundFailure::Timeout => {
                            RequestError::Timeout { peer }
                        }
                        other => RequestError::Failed {
                            peer,
                            reason: other.to_string(),
                        },
                    };
                    let _ = reply.send(Err(error));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(peer = %peer, error = %error, "inbound blob request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn allow_inbound(&mut self, peer: PeerId) -> bool {
        let now = Instant::now();
        let window = self.inbound.entry(peer).or_insert(InboundWindow {
            started: now,
            count: 0,
        });
        if now.duration_since(window.started) >= INBOUND_WINDOW {
            window.started = now;
            window.count = 0;
        }
        window.count += 1;
        window.count <= self.config.max_requests_per_peer_per_s.saturating_mul(10)
    }

    fn on_request(
        &mut self,
        peer: PeerId,
        request: ChunkRequest,
        channel: ResponseChannel<BlobResponse>,
    ) {
        if self.is_blacklisted(&peer) {
            return;
        }
        if !self.allow_inbound(peer) {
            // Dropping the channel fails the peer's request; a flood earns strikes.
            let over = self
                .inbound
                .get(&peer)
                .map_or(0, |w| w.count)
                .saturating_sub(self.config.max_requests_per_peer_per_s.saturating_mul(10));
            if over % 100 == 1 {
                self.strike(peer, "request flood");
            }
            return;
        }
        let served = match store::lock(&self.store) {
            Ok(mut store) => store.serve(peer, &request, self.config.mesh.as_str()),
            // Logged by `lock`; the peer asks another holder.
            Err(store::StorePoisoned) => Served::Response(ChunkResponse::NotFound),
        };
        match served {
            Served::Response(response) => self.respond(peer, channel, response.into()),
            Served::Chunk(chunk) => self.respond(peer, channel, BlobResponse::Chunk(chunk)),
            Served::FileChunk(chunk) => self.read_file_chunk(peer, channel, chunk),
        }
    }

    /// Reads `chunk` on a blocking thread; [`EventLoop::on_file_read`] sends it.
    fn read_file_chunk(
        &mut self,
        peer: PeerId,
        channel: ResponseChannel<BlobResponse>,
        chunk: FileChunk,
    ) {
        self.file_reads
            .push(tokio::task::spawn_blocking(move || FileRead {
                peer,
                channel,
                chunk: chunk.read(),
            }));
    }

    pub(super) fn on_file_read(&mut self, read: Result<FileRead, tokio::task::JoinError>) {
        match read {
            Ok(FileRead {
                peer,
                channel,
                chunk,
            }) => {
                // A failed read was logged by `FileChunk::read`.
                let response = chunk.map_or(
                    BlobResponse::Message(ChunkResponse::NotFound),
                    BlobResponse::Chunk,
                );
                self.respond(peer, channel, response);
            }
            Err(err) => {
                // The requester's channel went down with the task: its request fails.
                tracing::error!(error = %err, "reading a state chunk failed");
            }
        }
    }

    fn respond(
        &mut self,
        peer: PeerId,
        channel: ResponseChannel<BlobResponse>,
        response: BlobResponse,
    ) {
        let served = match &response {
            BlobResponse::Chunk(bytes) => Some(("chunk", bytes.len())),
            BlobResponse::Message(ChunkResponse::Chunk(bytes)) => Some(("chunk", bytes.len())),
            BlobResponse::Message(ChunkResponse::ChunkList(list)) => {
                Some(("chunk_list", 32 * list.chunk_hashes().len()))
            }
            BlobResponse::Message(ChunkResponse::State(_)) => Some(("state_manifest", 0)),
            BlobResponse::Message(ChunkResponse::Manifest(_)) => Some(("delta_manifest", 0)),
            BlobResponse::Message(ChunkResponse::NotFound | ChunkResponse::Busy) => None,
        };
        if let Some((kind, bytes)) = served {
            NetMetrics::count(&self.net_metrics.served_bytes, "kind", kind, bytes as u64);
        }
        if self
            .swarm
            .behaviour_mut()
            .blobs
            .send_response(channel, response)
            .is_err()
        {
            tracing::debug!(peer = %peer, "peer went away before its response");
        }
    }
}
