//! The Prometheus endpoint: [`MetricsServer`] answers `GET /metrics` (and `HEAD`) with
//! the OpenMetrics text of one [`Registry`] (the node's and the bootstrap node's metrics).
//!
//! The server is a minimal HTTP/1.1 responder on tokio, not a web framework: one request
//! per connection, request head capped at [`MAX_REQUEST_HEAD_BYTES`], each connection
//! bounded by [`CONNECTION_DEADLINE`], at most [`MAX_CONCURRENT_CONNECTIONS`] at once.
//! It only reads the registry; it never touches the swarm.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

pub const MAX_REQUEST_HEAD_BYTES: usize = 8 * 1024;
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
pub const MAX_CONCURRENT_CONNECTIONS: usize = 16;
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}: {source}")]
pub struct MetricsError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// A bound metrics endpoint; call [`MetricsServer::serve`] to answer requests.
pub struct MetricsServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    registry: Arc<Registry>,
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks a free port; see [`MetricsServer::local_addr`]).
    /// Metrics must be registered before: the registry is read-only from here on.
    pub async fn bind(
        addr: SocketAddr,
        registry: impl Into<Arc<Registry>>,
    ) -> Result<Self, MetricsError> {
        let error = |source| MetricsError { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(error)?;
        let local_addr = listener.local_addr().map_err(error)?;
        Ok(Self {
            listener,
            local_addr,
            registry: registry.into(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Answers requests until `shutdown` is cancelled; then drops in-flight connections.
    pub async fn serve(self, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_CONNECTIONS));
        let mut connections = JoinSet::new();
        loop {
            // Wait for a free slot before accepting: excess clients queue in the backlog.
            let permit = tokio::select! {
                () = shutdown.cancelled() => break,
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            // Reap finished connection tasks so the set stays small.
            while connections.try_join_next().is_some() {}
            match accepted {
                Ok((stream, peer)) => {
                    let registry = Arc::clone(&self.registry);
                    connections.spawn(async move {
                        let _permit = permit;
                        let answered =
                            tokio::time::timeout(CONNECTION_DEADLINE, answer(stream, &registry))
                                .await;
                        match answered {
                            Ok(Ok(())) => {}
                            Ok(Err(error)) => {
                                tracing::debug!(%peer, %error, "metrics request failed");
                            }
                            Err(_) => tracing::debug!(%peer, "metrics request timed out"),
                        }
                    });
                }
                Err(error) => {
                    // Typically EMFILE; back off instead of spinning.
                    tracing::warn!(%error, "metrics endpoint cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        connections.shutdown().await;
        tracing::debug!(addr = %self.local_addr, "metrics endpoint stopped");
    }
}

async fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let response = match read_request_head(&mut stream).await? {
        Ok(head) => respond(&head, registry),
        Err(status) => Response::status(status),
    };
    stream.write_all(&response.into_bytes()).await?;
    stream.shutdown().await
}

/// Reads up to the blank line ending the request head. The outer `Err` is I/O; the
/// inner one an HTTP status to answer with.
async fn read_request_head(stream: &mut TcpStream) -> std::io::Result<Result<String, Status>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Ok(Err(Status::BadRequest));
        }
        head.extend_from_slice(&chunk[..read]);
        if let Some(end) = find_head_end(&head) {
            head.truncate(end);
            return Ok(String::from_utf8(head).map_err(|_| Status::BadRequest));
        }
        if head.len() > MAX_REQUEST_HEAD_BYTES {
            return Ok(Err(Status::HeaderTooLarge));
        }
    }
}

fn find_head_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|window| window == b"\r\n\r\n")
}

fn respond(head: &str, registry: &Registry) -> Response {
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::status(Status::BadRequest);
    };
    if !version.starts_with("HTTP/1.") {
        return Response::status(Status::BadRequest);
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return Response::status(Status::NotFound);
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Response::status(Status::MethodNotAllowed),
    };
    let mut body = String::new();
    if encode(&mut body, registry).is_err() {
        return Response::status(Status::InternalError);
    }
    Response {
        status: Status::Ok,
        content_type: CONTENT_TYPE,
        body,
        head_only,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    HeaderTooLarge,
    InternalError,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::HeaderTooLarge => "431 Request Header Fields Too Large",
            Status::InternalError => "500 Internal Server Error",
        }
    }
}

struct Response {
    status: Status,
    content_type: &'static str,
    body: String,
    head_only: bool,
}

impl Response {
    fn status(status: Status) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{}\n", status.line()),
            head_only: false,
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        let allow = if self.status == Status::MethodNotAllowed {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        let mut bytes = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            self.status.line(),
            self.content_type,
            self.body.len(),
        )
        .into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binding_a_taken_port_names_the_address() {
        let server = MetricsServer::bind(([127, 0, 0, 1], 0).into(), Registry::default())
            .await
            .expect("bind");
        let taken = server.local_addr();
        let error = MetricsServer::bind(taken, Registry::default())
            .await
            .err()
            .expect("second bind must fail");
        assert!(error.to_string().contains(&taken.to_string()), "{error}");
    }
}
