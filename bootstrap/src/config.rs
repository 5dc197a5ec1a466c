//! The bootstrap node's settings: command-line flags ([`Cli`]), an optional TOML file
//! ([`FileConfig`]) and the resolved [`BootstrapConfig`]. Flags (and their environment
//! variables) override the file; the file overrides the defaults. Relative paths in the
//! file are relative to the file's directory. Parsing only; nothing here opens a socket.

use std::{
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Parser, ValueEnum};
use libp2p::Multiaddr;
use serde::Deserialize;

use meshtune_net::{
    PeerAddr,
    discovery::{DEFAULT_IDLE_CONNECTION_TIMEOUT, MeshId},
};

use crate::behaviour::BehaviourConfig;

/// A config file bigger than this is refused unread.
const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

pub const DEFAULT_LISTEN: [&str; 2] = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"];

/// Everything the bootstrap node needs to start.
#[derive(Debug, Clone)]
pub struct BootstrapConfig {
    pub listen: Vec<Multiaddr>,
    /// Addresses other peers should dial (public IP, DNS name), announced via identify.
    pub external: Vec<Multiaddr>,
    pub key_file: PathBuf,
    pub psk_file: Option<PathBuf>,
    /// Other bootstrap nodes to join into one network.
    pub peers: Vec<PeerAddr>,
    pub metrics: Option<SocketAddr>,
    pub behaviour: BehaviourConfig,
    pub idle_connection_timeout: Duration,
    /// How often configured `peers` that are not connected are dialed again.
    pub redial_interval: Duration,
}

impl BootstrapConfig {
    /// Defaults for everything but the key file.
    pub fn new(key_file: PathBuf) -> Self {
        Self {
            listen: default_listen(),
            external: Vec::new(),
            key_file,
            psk_file: None,
            peers: Vec::new(),
            metrics: None,
            behaviour: BehaviourConfig::default(),
            idle_connection_timeout: DEFAULT_IDLE_CONNECTION_TIMEOUT,
            redial_interval: Duration::from_secs(30),
        }
    }
}

fn default_listen() -> Vec<Multiaddr> {
    DEFAULT_LISTEN
        .iter()
        .filter_map(|addr| addr.parse().ok())
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// meshtune-bootstrap: the discovery node of a meshtune mesh.
///
/// Runs Kademlia (server mode), identify and ping, optionally a circuit relay, and
/// prints its full multiaddrs (ending in /p2p/<peer id>), one per line, to stdout as soon
/// as it listens: paste one into `meshtune node --bootstrap`. Logs go to stderr.
#[derive(Debug, Parser)]
#[command(name = "meshtune-bootstrap", version, about, long_about)]
pub struct Cli {
    /// Multiaddr to listen on; repeat for several. Default: /ip4/0.0.0.0/tcp/4001 and
    /// /ip4/0.0.0.0/udp/4001/quic-v1.
    #[arg(
        long,
        value_name = "MULTIADDR",
        env = "MESHTUNE_BOOTSTRAP_LISTEN",
        value_delimiter = ','
    )]
    pub listen: Vec<Multiaddr>,

    /// Multiaddr other peers should dial to reach this node (public IP or DNS name behind
    /// NAT or in a container); repeat for several. Needed for --relay.
    #[arg(
        long,
        value_name = "MULTIADDR",
        env = "MESHTUNE_BOOTSTRAP_EXTERNAL",
        value_delimiter = ','
    )]
    pub external: Vec<Multiaddr>,

    /// ed25519 identity key file; created with mode 0600 on first start. A key file
    /// readable by group or others is refused.
    #[arg(long, value_name = "FILE", env = "MESHTUNE_BOOTSTRAP_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// Private mesh pre-shared key (go-libp2p swarm.key format: `/key/swarm/psk/1.0.0/`,
    /// `/base16/`, 64 hex digits). Peers without the same key cannot connect. The key
    /// wraps TCP only: QUIC cannot carry it, so with --psk-file QUIC is disabled and QUIC
    /// listen addresses are skipped.
    #[arg(long, value_name = "FILE", env = "MESHTUNE_BOOTSTRAP_PSK_FILE")]
    pub psk_file: Option<PathBuf>,

    /// Another bootstrap node, as /ip4/…/tcp/…/p2p/<peer id>; repeat for several. The
    /// nodes keep connected and bootstrap Kademlia through each other, forming one network.
    #[arg(
        long = "peer",
        value_name = "MULTIADDR",
        env = "MESHTUNE_BOOTSTRAP_PEERS",
        value_delimiter = ','
    )]
    pub peers: Vec<PeerAddr>,

    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9100.
    #[arg(long, value_name = "ADDR", env = "MESHTUNE_BOOTSTRAP_METRICS")]
    pub metrics: Option<SocketAddr>,

    /// Also act as a circuit relay v2 server for peers behind NAT (give --external).
    #[arg(long)]
    pub relay: bool,

    /// Mesh name; the Kademlia protocol is /meshtune/<mesh>/kad/1.0.0. Default: default.
    #[arg(long, value_name = "NAME", env = "MESHTUNE_MESH")]
    pub mesh: Option<MeshId>,

    /// Seconds between Kademlia bootstraps (a self lookup plus a random-key lookup per
    /// bucket). Default: 300.
    #[arg(long, value_name = "SECONDS")]
    pub bootstrap_interval: Option<u64>,

    /// Most established connections at once. Default: 1024.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<u32>,

    /// Log format on stderr. Default: text. Filter with RUST_LOG (default: info).
    #[arg(long, value_enum, value_name = "FORMAT", env = "MESHTUNE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,

    /// TOML config file; flags override it. Keys: listen, external, key_file, psk_file,
    /// peers, metrics, relay, mesh, bootstrap_interval_secs, max_connections, log_format.
    #[arg(long, value_name = "FILE", env = "MESHTUNE_BOOTSTRAP_CONFIG")]
    pub config: Option<PathBuf>,
}

/// The TOML file. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub listen: Vec<String>,
    #[serde(default)]
    pub external: Vec<String>,
    pub key_file: Option<PathBuf>,
    pub psk_file: Option<PathBuf>,
    #[serde(default)]
    pub peers: Vec<String>,
    pub metrics: Option<SocketAddr>,
    pub relay: Option<bool>,
    pub mesh: Option<String>,
    pub bootstrap_interval_secs: Option<u64>,
    pub max_connections: Option<u32>,
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is larger than {MAX_CONFIG_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config file {path}: `{key}` entry `{value}` is invalid: {reason}")]
    Value {
        path: PathBuf,
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("no key file: pass --key-file FILE (or set key_file in --config)")]
    MissingKeyFile,
    #[error("{what} must be at least 1")]
    Zero { what: &'static str },
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read_error = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let mut text = String::new();
        file.take(MAX_CONFIG_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_error)?;
        if text.len() as u64 > MAX_CONFIG_FILE_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        let mut config: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new(""));
        for file in [&mut config.key_file, &mut config.psk_file]
            .into_iter()
            .flatten()
        {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        Ok(config)
    }
}

impl Cli {
    /// Merges flags over the config file (if any) over defaults.
    pub fn resolve(self) -> Result<(BootstrapConfig, LogFormat), ConfigError> {
        let (file, path) = match &self.config {
            Some(path) => (FileConfig::load(path)?, path.clone()),
            None => (FileConfig::default(), PathBuf::new()),
        };
        let value_error = |key: &'static str, value: &str, reason: String| ConfigError::Value {
            path: path.clone(),
            key,
            value: value.to_owned(),
            reason,
        };
        let parse_addrs = |key: &'static str, values: &[String]| {
            values
                .iter()
                .map(|value| {
                    value
                        .parse::<Multiaddr>()
                        .map_err(|error| value_error(key, value, error.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()
        };

        let key_file = self
            .key_file
            .or(file.key_file)
            .ok_or(ConfigError::MissingKeyFile)?;
        let mut config = BootstrapConfig::new(key_file);

        let listen = if self.listen.is_empty() {
            parse_addrs("listen", &file.listen)?
        } else {
            self.listen
        };
        if !listen.is_empty() {
            config.listen = listen;
        }
        config.external = if self.external.is_empty() {
            parse_addrs("external", &file.external)?
        } else {
            self.external
        };
        config.psk_file = self.psk_file.or(file.psk_file);
        config.peers = if self.peers.is_empty() {
            file.peers
                .iter()
                .map(|value| {
                    value
                        .parse::<PeerAddr>()
                        .map_err(|error| value_error("peers", value, error.to_string()))
                })
                .collect::<Result<_, _>>()?
        } else {
            self.peers
        };
        config.metrics = self.metrics.or(file.metrics);
        config.behaviour.relay = self.relay || file.relay.unwrap_or(false);
        if let Some(mesh) = self.mesh {
            config.behaviour.mesh = mesh;
        } else if let Some(mesh) = &file.mesh {
            config.behaviour.mesh =
                MeshId::new(mesh).map_err(|error| value_error("mesh", mesh, error.to_string()))?;
        }
        if let Some(secs) = self.bootstrap_interval.or(file.bootstrap_interval_secs) {
            if secs == 0 {
                return Err(ConfigError::Zero {
                    what: "bootstrap interval",
                });
            }
            config.behaviour.bootstrap_interval = Duration::from_secs(secs);
        }
        if let Some(max) = self.max_connections.or(file.max_connections) {
            if max == 0 {
                return Err(ConfigError::Zero {
                    what: "max connections",
                });
            }
            config.behaviour.max_connections = max;
        }
        let log_format = self.log_format.or(file.log_format).unwrap_or_default();
        Ok((config, log_format))
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("meshtune-bootstrap").chain(args.iter().copied()))
            .expect("parse")
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_says_quic_is_off_with_a_psk() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("QUIC is disabled"), "{help}");
    }

    #[test]
    fn defaults_need_only_a_key_file() {
        let (config, format) = cli(&["--key-file", "k"]).resolve().expect("resolve");
        assert_eq!(config.key_file, PathBuf::from("k"));
        assert_eq!(config.listen.len(), 2);
        assert_eq!(format, LogFormat::Text);
        assert!(!config.behaviour.relay);
        assert!(matches!(
            cli(&[]).resolve(),
            Err(ConfigError::MissingKeyFile)
        ));
    }

    #[test]
    fn flags_override_the_file_and_file_paths_are_relative_to_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let peer = libp2p::PeerId::random();
        let path = dir.path().join("bootstrap.toml");
        std::fs::write(
            &path,
            format!(
                r#"
listen = ["/ip4/127.0.0.1/tcp/5000"]
key_file = "keys/bootstrap.key"
psk_file = "/abs/swarm.key"
peers = ["/ip4/10.0.0.2/tcp/4001/p2p/{peer}"]
metrics = "127.0.0.1:9100"
relay = true
mesh = "lab"
bootstrap_interval_secs = 60
log_format = "json"
"#
            ),
        )
        .expect("write");
        let path_arg = path.display().to_string();

        let (config, format) = cli(&["--config", &path_arg]).resolve().expect("file only");
        assert_eq!(config.listen[0].to_string(), "/ip4/127.0.0.1/tcp/5000");
        assert_eq!(config.key_file, dir.path().join("keys/bootstrap.key"));
        assert_eq!(config.psk_file, Some(PathBuf::from("/abs/swarm.key")));
        assert_eq!(config.peers[0].peer_id, peer);
        assert_eq!(config.metrics, Some(([127, 0, 0, 1], 9100).into()));
        assert!(config.behaviour.relay);
        assert_eq!(config.behaviour.mesh.as_str(), "lab");
        assert_eq!(config.behaviour.bootstrap_interval, Duration::from_secs(60));
        assert_eq!(format, LogFormat::Json);

        let (config, format) = cli(&[
            "--config",
            &path_arg,
            "--listen",
            "/ip4/0.0.0.0/tcp/6000",
            "--key-file",
            "other.key",
            "--metrics",
            "127.0.0.1:9200",
            "--mesh",
            "prod",
            "--log-format",
            "text",
        ])
        .resolve()
        .expect("flags win");
        assert_eq!(config.listen.len(), 1);
        assert_eq!(config.listen[0].to_string(), "/ip4/0.0.0.0/tcp/6000");
        assert_eq!(config.key_file, PathBuf::from("other.key"));
        assert_eq!(config.metrics, Some(([127, 0, 0, 1], 9200).into()));
        assert_eq!(config.behaviour.mesh.as_str(), "prod");
        assert_eq!(format, LogFormat::Text);
        // Not overridden: still from the file.
        assert_eq!(config.peers.len(), 1);
    }

    #[test]
    fn the_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("bootstrap.example.toml");
        let (config, format) = cli(&["--config", &path.display().to_string()])
            .resolve()
            .expect("example parses");
        assert_eq!(config.listen.len(), 2);
        assert_eq!(
            config.key_file,
            Path::new(env!("CARGO_MANIFEST_DIR")).join("bootstrap.key")
        );
        assert_eq!(config.metrics, Some(([127, 0, 0, 1], 9100).into()));
        assert_eq!(format, LogFormat::Text);
    }

    #[test]
    fn bad_file_values_name_the_file_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.toml");
        let path_arg = path.display().to_string();

        std::fs::write(
            &path,
            "key_file = \"k\"\npeers = [\"/ip4/1.2.3.4/tcp/1\"]\n",
        )
        .expect("write");
        let error = cli(&["--config", &path_arg])
            .resolve()
            .expect_err("no peer id");
        let message = error.to_string();
        assert!(
            message.contains("bad.toml") && message.contains("peers"),
            "{message}"
        );

        std::fs::write(&path, "key_file = \"k\"\nunknown_key = 1\n").expect("write");
        let error = cli(&["--config", &path_arg])
            .resolve()
            .expect_err("unknown key");
        assert!(matches!(error, ConfigError::Parse { .. }), "{error}");
        assert!(error.to_string().contains("bad.toml"));
    }

    #[test]
    fn bad_flags_are_rejected_by_the_parser() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("meshtune-bootstrap").chain(args.iter().copied()))
        };
        assert!(parse(&["--peer", "/ip4/1.2.3.4/tcp/1"]).is_err());
        assert!(parse(&["--listen", "not-a-multiaddr"]).is_err());
        assert!(parse(&["--mesh", "a/b"]).is_err());
        assert!(parse(&["--log-format", "xml"]).is_err());
        assert!(parse(&["--metrics", "localhost"]).is_err());
    }
}
