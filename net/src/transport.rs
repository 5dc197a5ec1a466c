//! How meshtune peers reach each other: TCP + noise + yamux, QUIC and DNS for real
//! networks, a memory transport (same noise + yamux stack) for in-process tests, an
//! optional private-network pre-shared key, and [`build_swarm`].
//!
//! The pnet key (go-libp2p's `/key/swarm/psk/1.0.0/` file) encrypts the raw TCP stream
//! before noise runs, so a peer without the key fails the noise handshake. QUIC brings
//! its own TLS handshake and has no place for a pre-shared key, so with a key QUIC is
//! off: otherwise anyone could join the "private" mesh over UDP.
//!
//! With a [`LinkProfile`] set (the testnet's slow and lossy links, `--link`), TCP connections
//! pass through [`Shaped`] first; without one they are never wrapped: shaping is a test
//! tool, not part of the production path.
//!
//! This module builds transports and swarms; it never drives a swarm.

use std::{
    io::{self, Read},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::shaping::{LinkProfile, SharedLink};

use libp2p::{
    Multiaddr, PeerId, Swarm, Transport,
    core::{
        muxing::StreamMuxerBox,
        transport::{Boxed, MemoryTransport},
        upgrade::Version,
    },
    dns,
    identity::Keypair,
    multiaddr::Protocol,
    noise,
    pnet::{PnetConfig, PreSharedKey},
    quic,
    swarm::NetworkBehaviour,
    tcp, yamux,
};
use prometheus_client::registry::Registry;

/// The transport every meshtune swarm is built on.
pub type BoxedTransport = Boxed<(PeerId, StreamMuxerBox)>;

/// A PSK file holds three short lines; anything bigger is refused unread.
const MAX_PSK_FILE_BYTES: u64 = 1024;

/// Bounds a connection's whole setup (pnet nonces, noise, yamux), so a peer that opens
/// a socket and goes silent cannot hold it forever.
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(20);

/// What [`network_transport`] builds.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Private-network key; when set, only TCP is used.
    pub psk: Option<PreSharedKey>,
    /// Whether QUIC is wanted. It is still off when `psk` is set.
    pub quic: bool,
    pub upgrade_timeout: Duration,
    /// Shaping of every TCP connection (bandwidth, delay, loss); QUIC is off when set.
    pub link: LinkProfile,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            psk: None,
            quic: true,
            upgrade_timeout: DEFAULT_UPGRADE_TIMEOUT,
            link: LinkProfile::UNLIMITED,
        }
    }
}

impl TransportConfig {
    /// QUIC runs only when wanted, no pnet key is set (QUIC cannot carry the key) and no
    /// link shaping is asked for (shaping works on TCP streams).
    pub fn quic_enabled(&self) -> bool {
        self.quic && self.psk.is_none() && self.link.is_unlimited()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportBuildError {
    #[error("cannot set up noise with the local key: {0}")]
    Noise(#[from] noise::Error),
    #[error("cannot read the system DNS configuration (/etc/resolv.conf): {0}")]
    Dns(io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum PskError {
    #[error("cannot read pre-shared key file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("pre-shared key file {path} is larger than {MAX_PSK_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error(
        "pre-shared key file {path} is not a `/key/swarm/psk/1.0.0/` + `/base16/` + 64 hex \
         digits file: {reason}"
    )]
    Invalid { path: PathBuf, reason: String },
}

/// TCP (optionally behind the pnet key) + noise + yamux, QUIC unless a key is set, all
/// behind DNS resolution.
pub fn network_transport(
    keypair: &Keypair,
    config: &TransportConfig,
) -> Result<BoxedTransport, TransportBuildError> {
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let tcp = if config.link.is_unlimited() {
        secure_and_multiplex(tcp, keypair, config.psk, config.upgrade_timeout)?
    } else {
        // One link for the node: its connections share the upload and download rates.
        let link = SharedLink::new(config.link);
        let connections = Arc::new(AtomicU64::new(0));
        let shaped = tcp.map(move |stream, _| {
            let seed = connections.fetch_add(1, Ordering::Relaxed);
            link.shape(stream, seed)
        });
        secure_and_multiplex(shaped, keypair, config.psk, config.upgrade_timeout)?
    };
    let transport = if config.quic_enabled() {
        let mut quic_config = quic::Config::new(keypair);
        quic_config.handshake_timeout = config.upgrade_timeout;
        let quic = quic::tokio::Transport::new(quic_config)
            .map(|(peer_id, muxer), _| (peer_id, StreamMuxerBox::new(muxer)));
        tcp.or_transport(quic)
            .map(|either, _| either.into_inner())
            .boxed()
    } else {
        tcp
    };
    Ok(dns::tokio::Transport::system(transport)
        .map_err(TransportBuildError::Dns)?
        .boxed())
}

/// The in-memory transport (`/memory/<n>` addresses) with the same security and
/// multiplexing as the network one, for deterministic in-process tests.
pub fn memory_transport(
    keypair: &Keypair,
    psk: Option<PreSharedKey>,
) -> Result<BoxedTransport, TransportBuildError> {
    secure_and_multiplex(
        MemoryTransport::default(),
        keypair,
        psk,
        DEFAULT_UPGRADE_TIMEOUT,
    )
}

fn secure_and_multiplex<T>(
    transport: T,
    keypair: &Keypair,
    psk: Option<PreSharedKey>,
    timeout: Duration,
) -> Result<BoxedTransport, TransportBuildError>
where
    T: Transport + Send + Unpin + 'static,
    T::Output: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static,
    T::Error: Send + Sync + 'static,
    T::Dial: Send + 'static,
    T::ListenerUpgrade: Send + 'static,
{
    let noise = noise::Config::new(keypair)?;
    let yamux = yamux::Config::default();
    Ok(match psk {
        Some(psk) => transport
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux)
            .timeout(timeout)
            .boxed(),
        None => transport
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux)
            .timeout(timeout)
            .boxed(),
    })
}

/// Counts bytes per transport protocol stack into `registry`
/// (`libp2p_bandwidth_bytes_total{protocols,direction}`), and the same bytes by application
/// protocol (`meshtune_wire_bytes_total{protocol,direction}`, see [`crate::wire`]).
pub fn with_bandwidth_metrics(
    transport: BoxedTransport,
    registry: &mut Registry,
) -> BoxedTransport {
    let counters = crate::wire::WireCounters::register(registry);
    let transport = transport.map(move |(peer_id, muxer), _| (peer_id, counters.wrap(muxer)));
    libp2p::metrics::BandwidthTransport::new(transport, registry)
        .map(|(peer_id, muxer), _| (peer_id, StreamMuxerBox::new(muxer)))
        .boxed()
}

/// A swarm on the tokio executor. `idle_connection_timeout` keeps connections that no
/// behaviour uses open for a while (identify and Kademlia are short-lived exchanges).
pub fn build_swarm<B: NetworkBehaviour>(
    keypair: &Keypair,
    transport: BoxedTransport,
    behaviour: B,
    idle_connection_timeout: Duration,
) -> Swarm<B> {
    Swarm::new(
        transport,
        behaviour,
        keypair.public().to_peer_id(),
        libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(idle_connection_timeout),
    )
}

/// Whether `addr` is a QUIC address, which a swarm with a pnet key cannot serve.
pub fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|protocol| matches!(protocol, Protocol::QuicV1 | Protocol::Quic))
}

/// Reads a go-libp2p swarm key file (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits).
/// A file readable by group or others is used, with a warning: container secrets are
/// often mounted that way, and the key only keeps strangers out of the mesh.
pub fn load_psk(path: &Path) -> Result<PreSharedKey, PskError> {
    let read_error = |source| PskError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let metadata = file.metadata().map_err(read_error)?;
    if metadata.len() > MAX_PSK_FILE_BYTES {
        return Err(PskError::TooLarge {
            path: path.to_owned(),
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "pre-shared key file is accessible by group or others; consider chmod 600"
            );
        }
    }
    let mut text = zeroize::Zeroizing::new(String::new());
    file.take(MAX_PSK_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    if text.len() as u64 > MAX_PSK_FILE_BYTES {
        return Err(PskError::TooLarge {
            path: path.to_owned(),
        });
    }
    text.parse::<PreSharedKey>()
        .map_err(|error| PskError::Invalid {
            path: path.to_owned(),
            reason: format!("{error:?}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file_text(byte: u8) -> String {
        PreSharedKey::new([byte; 32]).to_key_file()
    }

    #[test]
    fn loads_the_standard_psk_file_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("swarm.key");
        std::fs::write(&path, key_file_text(0xab)).expect("write");
        let psk = load_psk(&path).expect("load");
        assert_eq!(psk, PreSharedKey::new([0xab; 32]));
    }

    #[test]
    fn rejects_bad_psk_files_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("swarm.key");
        for bad in [
            "".to_owned(),
            "/key/swarm/psk/1.0.0/\n/base16/\nabc\n".to_owned(),
            "/key/swarm/psk/1.0.0/\n/base64/\n".to_owned() + &"a".repeat(64),
            "/key/swarm/psk/9.9.9/\n/base16/\n".to_owned() + &"a".repeat(64),
            "/key/swarm/psk/1.0.0/\n/base16/\n".to_owned() + &"z".repeat(64),
        ] {
            std::fs::write(&path, &bad).expect("write");
            let error = load_psk(&path).expect_err("must refuse");
            assert!(
                matches!(error, PskError::Invalid { .. }),
                "{bad:?}: {error}"
            );
            assert!(error.to_string().contains(&path.display().to_string()));
        }
        std::fs::write(&path, "x".repeat(MAX_PSK_FILE_BYTES as usize + 1)).expect("write");
        assert!(matches!(load_psk(&path), Err(PskError::TooLarge { .. })));

        let missing = dir.path().join("missing.key");
        let error = load_psk(&missing).expect_err("missing");
        assert!(error.to_string().contains("missing.key"));
    }

    #[test]
    fn quic_is_off_with_a_psk() {
        let mut config = TransportConfig::default();
        assert!(config.quic_enabled());
        config.psk = Some(PreSharedKey::new([1; 32]));
        assert!(!config.quic_enabled());
    }

    #[tokio::test]
    async fn a_psk_transport_cannot_listen_on_quic() {
        let keypair = Keypair::generate_ed25519();
        let config = TransportConfig {
            psk: Some(PreSharedKey::new([1; 32])),
            ..TransportConfig::default()
        };
        let transport = network_transport(&keypair, &config).expect("transport");
        let mut swarm = build_swarm(
            &keypair,
            transport,
            libp2p::swarm::dummy::Behaviour,
            Duration::from_secs(1),
        );
        let quic: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("addr");
        assert!(is_quic(&quic));
        assert!(swarm.listen_on(quic).is_err());
        let tcp: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().expect("addr");
        assert!(!is_quic(&tcp));
        assert!(swarm.listen_on(tcp).is_ok());
    }
}
