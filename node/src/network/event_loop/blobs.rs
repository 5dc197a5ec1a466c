//! Blob requests on the request-response protocol: answers to this node's own requests go
//! back to the waiting [`Client`](crate::network::Client); inbound requests are rate-limited
//! per peer and answered from the [`BlobStore`](crate::network::store::BlobStore), with state
//! chunks kept in files read on a blocking thread (never on the swarm task) and chunks in
//! memory sent as views of the stored blob.

use std::time::{Duration, Instant};

use bytes::Bytes;
use libp2p::PeerId;
use libp2p::request_response::{self, InboundRequestId, ResponseChannel};
use meshtune_protocol::{ChunkRequest, ChunkResponse};

use super::{EventLoop, InboundWindow};
use crate::network::client::RequestError;
use crate::network::codec::BlobResponse;
use crate::network::metrics::NetMetrics;
use crate::network::store::{self, FileChunk, Served};
use crate::network::uploads::Admit;

/// How long the window of [`EventLoop::allow_inbound`]'s rate limit lasts.
const INBOUND_WINDOW: Duration = Duration::from_secs(10);

/// A chunk response waiting for its turn on the uplink (see [`crate::network::uploads`]).
pub(super) type Upload = (PeerId, ResponseChannel<BlobResponse>, BlobResponse);

/// A state chunk read from its file on a blocking thread, with where its answer goes.
pub(super) struct FileRead {
    request_id: InboundRequestId,
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
                    request_id,
                    request,
                    channel,
                } => self.on_request(peer, request_id, request, channel),
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
            request_response::Event::InboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                tracing::debug!(peer = %peer, error = %error, "inbound blob request failed");
                self.upload_ended(request_id, false);
            }
            request_response::Event::ResponseSent { request_id, .. } => {
                self.upload_ended(request_id, true);
            }
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
        request_id: InboundRequestId,
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
            Served::Response(response) => {
                self.respond(peer, channel, response.into());
            }
            Served::Chunk(chunk) => {
                self.upload(request_id, (peer, channel, BlobResponse::Chunk(chunk)));
            }
            Served::FileChunk(chunk) => self.read_file_chunk(request_id, peer, channel, chunk),
        }
    }

    /// Sends a chunk response when the uplink's queue lets it go (now, after the responses
    /// ahead of it, or never: `Busy`).
    fn upload(&mut self, request_id: InboundRequestId, upload: Upload) {
        let bytes = match &upload.2 {
            BlobResponse::Chunk(bytes) => bytes.len() as u64,
            BlobResponse::Message(_) => 0,
        };
        match self
            .uploads
            .admit(Instant::now(), request_id, bytes, upload)
        {
            Admit::Send(upload) => self.send_upload(request_id, upload),
            Admit::Queued => {}
            Admit::Busy((peer, channel, _)) => {
                self.respond(peer, channel, ChunkResponse::Busy.into());
            }
        }
    }

    fn send_upload(&mut self, request_id: InboundRequestId, (peer, channel, response): Upload) {
        if !self.respond(peer, channel, response) {
            self.upload_ended(request_id, false);
        }
    }

    /// A response left (or failed): the next queued chunk goes out; those that waited too
    /// long are answered `Busy`.
    fn upload_ended(&mut self, request_id: InboundRequestId, sent: bool) {
        let released = self.uploads.finished(Instant::now(), request_id, sent);
        for (peer, channel, _) in released.busy {
            self.respond(peer, channel, ChunkResponse::Busy.into());
        }
        if let Some((next, upload)) = released.next {
            self.send_upload(next, upload);
        }
    }

    /// Reads `chunk` on a blocking thread; [`EventLoop::on_file_read`] sends it.
    fn read_file_chunk(
        &mut self,
        request_id: InboundRequestId,
        peer: PeerId,
        channel: ResponseChannel<BlobResponse>,
        chunk: FileChunk,
    ) {
        self.file_reads
            .push(tokio::task::spawn_blocking(move || FileRead {
                request_id,
                peer,
                channel,
                chunk: chunk.read(),
            }));
    }

    pub(super) fn on_file_read(&mut self, read: Result<FileRead, tokio::task::JoinError>) {
        match read {
            Ok(FileRead {
                request_id,
                peer,
                channel,
                chunk,
            }) => match chunk {
                Ok(chunk) => self.upload(request_id, (peer, channel, BlobResponse::Chunk(chunk))),
                // Logged by `FileChunk::read`.
                Err(_) => {
                    self.respond(peer, channel, ChunkResponse::NotFound.into());
                }
            },
            Err(err) => {
                // The requester's channel went down with the task: its request fails.
                tracing::error!(error = %err, "reading a state chunk failed");
            }
        }
    }

    /// Hands `response` to the swarm; false when the peer went away first.
    fn respond(
        &mut self,
        peer: PeerId,
        channel: ResponseChannel<BlobResponse>,
        response: BlobResponse,
    ) -> bool {
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
        let sent = self
            .swarm
            .behaviour_mut()
            .blobs
            .send_response(channel, response)
            .is_ok();
        if !sent {
            tracing::debug!(peer = %peer, "peer went away before its response");
        }
        sent
    }
}
