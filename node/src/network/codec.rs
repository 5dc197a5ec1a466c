//! The request-response codec for blob pulls: one request and one response per stream,
//! each the protocol crate's encoding, read with a size cap checked before allocation.
//!
//! Owns: framing of [`ChunkRequest`] / [`ChunkResponse`] on a libp2p stream. Must not
//! touch: what is asked for or served (the event loop and the fetcher decide).

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;
use meshtune_protocol::{ChunkRequest, ChunkResponse, Limits};

/// `/meshtune/<mesh>/blobs/1.0.0`.
pub fn blob_protocol(mesh: &str) -> Result<StreamProtocol, String> {
    StreamProtocol::try_from_owned(format!("/meshtune/{mesh}/blobs/1.0.0"))
        .map_err(|err| format!("invalid mesh id `{mesh}` for a protocol name: {err}"))
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

/// The codec; carries the limits both sides apply.
#[derive(Debug, Clone)]
pub struct BlobCodec {
    pub limits: Limits,
}

impl request_response::Codec for BlobCodec {
    type Protocol = StreamProtocol;
    type Request = ChunkRequest;
    type Response = ChunkResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<ChunkRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = read_capped(io, ChunkRequest::max_encoded_len(&self.limits)).await?;
        ChunkRequest::decode(&bytes, &self.limits).map_err(invalid)
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<ChunkResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = read_capped(io, self.limits.max_response_bytes()).await?;
        ChunkResponse::decode(&bytes, &self.limits).map_err(invalid)
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
        response: ChunkResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = response.encode(&self.limits).map_err(invalid)?;
        io.write_all(&bytes).await?;
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
                    proptest::prop_assert_eq!(response.encode(&codec.limits).expect("encodes"), bytes);
                }
                Ok(())
            })?;
        }
    }
}
