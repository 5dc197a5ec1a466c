//! The request-response codec for blob pulls: one request and one response per stream,
//! each the protocol crate's encoding, read with a size cap checked before allocation. A
//! served chunk ([`BlobResponse::Chunk`]) is written as the protocol's header followed by
//! the chunk's bytes straight from the stored blob, with no copy into a message buffer.
//!
//! Owns: framing of [`ChunkRequest`] / [`ChunkResponse`] on a libp2p stream. Must not
//! touch: what is asked for or served (the event loop and the fetcher decide).

use std::io;

use bytes::Bytes;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;
use meshtune_protocol::{ChunkRequest, ChunkResponse, Limits};

/// A mesh id that cannot name a stream protocol.
#[derive(Debug, thiserror::Error)]
#[error("invalid mesh id `{mesh}` for a protocol name: {source}")]
pub struct BlobProtocolError {
    pub mesh: String,
    pub source: libp2p::swarm::InvalidProtocol,
}

/// `/meshtune/<mesh>/blobs/1.0.0`.
pub fn blob_protocol(mesh: &str) -> Result<StreamProtocol, BlobProtocolError> {
    StreamProtocol::try_from_owned(format!("/meshtune/{mesh}/blobs/1.0.0")).map_err(|source| {
        BlobProtocolError {
            mesh: mesh.to_owned(),
            source,
        }
    })
}

/// Reads at most `cap` bytes; a longer stream is an error, not a truncation.
async fn read_capped<T: AsyncRead + Unpin + Send>(io: &mut T, cap: usize) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    io.take(cap as u64 + 1).read_to_end(&mut bytes).await?;
    if bytes.len() > cap {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message exceeds the cap of {cap} bytes"),
        ));
    }
    Ok(bytes)
}

fn invalid(err: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err.to_string())
}

/// A response on a blob stream: a served chunk as a view of the stored blob, or any
/// protocol response (every response read from a peer is one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobResponse {
    Chunk(Bytes),
    Message(ChunkResponse),
}

impl From<ChunkResponse> for BlobResponse {
    fn from(response: ChunkResponse) -> Self {
        BlobResponse::Message(response)
    }
}

impl From<BlobResponse> for ChunkResponse {
    fn from(response: BlobResponse) -> Self {
        match response {
            BlobResponse::Chunk(bytes) => ChunkResponse::Chunk(bytes.into()),
            BlobResponse::Message(response) => response,
        }
    }
}

/// The bytes that precede a chunk of `len` bytes in [`ChunkResponse::Chunk`]'s encoding:
/// the protocol's encoding of an empty chunk, whose last byte is the length 0 (a LEB128
/// varint), with the real length in its place.
fn chunk_header(len: usize, limits: &Limits) -> io::Result<Vec<u8>> {
    if len as u64 > u64::from(limits.max_chunk_size) {
        return Err(invalid(format!(
            "chunk of {len} bytes exceeds the cap of {} bytes",
            limits.max_chunk_size
        )));
    }
    let mut header = ChunkResponse::Chunk(Vec::new())
        .encode(limits)
        .map_err(invalid)?;
    if header.pop() != Some(0) {
        return Err(invalid("unexpected encoding of an empty chunk"));
    }
    let mut value = len as u64;
    while value >= 0x80 {
        header.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    header.push(value as u8);
    Ok(header)
}

/// The codec; carries the limits both sides apply.
#[derive(Debug, Clone)]
pub struct BlobCodec {
    pub limits: Limits,
}

impl request_response::Codec for BlobCodec {
    type Protocol = StreamProtocol;
    type Request = ChunkRequest;
    type Response = BlobResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<ChunkRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = read_capped(io, ChunkRequest::max_encoded_len(&self.limits)).await?;
        ChunkRequest::decode(&bytes, &self.limits).map_err(invalid)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<BlobResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = read_capped(io, self.limits.max_response_bytes()).await?;
        ChunkResponse::decode(&bytes, &self.limits)
            .map(BlobResponse::Message)
            .map_err(invalid)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: ChunkRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = request.encode(&self.limits).map_err(invalid)?;
        io.write_all(&bytes).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: BlobResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match response {
            BlobResponse::Chunk(chunk) => {
                io.write_all(&chunk_header(chunk.len(), &self.limits)?)
                    .await?;
                io.write_all(&chunk).await?;
            }
            BlobResponse::Message(response) => {
                let bytes = response.encode(&self.limits).map_err(invalid)?;
                io.write_all(&bytes).await?;
            }
        }
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use libp2p::request_response::Codec;

    #[tokio::test]
    async fn round_trip_and_oversized_stream_is_refused() {
        let mut codec = BlobCodec {
            limits: Limits::default(),
        };
        let protocol = blob_protocol("test").expect("protocol");
        let request = ChunkRequest::LatestState {
            mesh_id: "test".into(),
        };
        let mut buffer = Cursor::new(Vec::new());
        codec
            .write_request(&protocol, &mut buffer, request.clone())
            .await
            .expect("write");
        let mut reader = Cursor::new(buffer.into_inner());
        assert_eq!(
            codec
                .read_request(&protocol, &mut reader)
                .await
                .expect("read"),
            request
        );
        let huge = vec![0u8; ChunkRequest::max_encoded_len(&codec.limits) + 10];
        let err = codec
            .read_request(&protocol, &mut Cursor::new(huge))
            .await
            .expect_err("too large");
        assert!(err.to_string().contains("exceeds the cap"), "{err}");
        let garbage = vec![7u8; 40];
        assert!(
            codec
                .read_response(&protocol, &mut Cursor::new(garbage))
                .await
                .is_err()
        );
    }

    /// A chunk written from a view of the stored blob is byte for byte the protocol's
    /// encoding of the same chunk, and reads back as it; an oversized one is refused.
    #[tokio::test]
    async fn a_served_chunk_is_the_protocol_encoding_of_the_chunk() {
        let mut codec = BlobCodec {
            limits: Limits::default(),
        };
        let protocol = blob_protocol("test").expect("protocol");
        let blob: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let blob = Bytes::from(blob);
        for (start, end) in [(0, 0), (0, 1), (5, 132), (100, 16_484), (0, 70_000)] {
            let chunk = blob.slice(start..end);
            let mut written = Cursor::new(Vec::new());
            codec
                .write_response(&protocol, &mut written, BlobResponse::Chunk(chunk.clone()))
                .await
                .expect("write");
            let expected = ChunkResponse::Chunk(chunk.to_vec())
                .encode(&codec.limits)
                .expect("encode");
            assert_eq!(written.get_ref(), &expected, "chunk {start}..{end}");
            let read = codec
                .read_response(&protocol, &mut Cursor::new(expected))
                .await
                .expect("read");
            assert_eq!(
                ChunkResponse::from(read),
                ChunkResponse::Chunk(chunk.to_vec())
            );
        }
        let too_big = Bytes::from(vec![0u8; codec.limits.max_chunk_size as usize + 1]);
        assert!(
            codec
                .write_response(
                    &protocol,
                    &mut Cursor::new(Vec::new()),
                    BlobResponse::Chunk(too_big)
                )
                .await
                .is_err()
        );
    }

    proptest::proptest! {
        /// Whatever a peer writes on a blob stream, reading it is an error or a message that
        /// re-encodes to the same bytes: never a panic.
        #[test]
        fn arbitrary_streams_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            runtime.block_on(async {
                let mut codec = BlobCodec { limits: Limits::default() };
                let protocol = blob_protocol("test").expect("protocol");
                if let Ok(request) = codec.read_request(&protocol, &mut Cursor::new(bytes.clone())).await {
                    proptest::prop_assert_eq!(request.encode(&codec.limits).expect("encodes"), bytes.clone());
                }
                if let Ok(response) = codec.read_response(&protocol, &mut Cursor::new(bytes.clone())).await {
                    proptest::prop_assert_eq!(ChunkResponse::from(response).encode(&codec.limits).expect("encodes"), bytes);
                }
                Ok(())
            })?;
        }
    }
}
