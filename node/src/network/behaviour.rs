//! What a node speaks ([`NodeBehaviour`]): Kademlia (server mode, per-mesh protocol),
//! identify, ping, gossipsub for delta manifests only (signed, strict, content-hash message
//! ids, peer scoring, manifest-sized transmit cap), request-response for blob chunks,
//! connection limits, a deny list, and optional relay client, DCUtR, AutoNAT and mDNS.
//!
//! Owns: the behaviours' configuration. Must not touch: the swarm's events (the event loop
//! handles them).

use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroUsize;
use std::time::Duration;

use libp2p::gossipsub::{self, MessageId};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, behaviour::toggle::Toggle};
use libp2p::{
    PeerId, allow_block_list, autonat, connection_limits, dcutr, identify, kad, mdns, ping, relay,
};
use meshtune_net::discovery::{identify_config, kademlia};

use super::codec::{BlobCodec, blob_protocol};
use super::config::NetworkConfig;
use super::event::NetworkError;

/// Extra room over the manifest cap for gossipsub framing and the signature.
const GOSSIP_FRAMING_ALLOWANCE: usize = 4096;

/// Everything a meshtune node speaks.
#[derive(NetworkBehaviour)]
pub struct NodeBehaviour {
    pub(crate) denied: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) kademlia: kad::Behaviour<kad::store::MemoryStore>,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) gossipsub: gossipsub::Behaviour,
    pub(crate) blobs: request_response::Behaviour<BlobCodec>,
    pub(crate) relay_client: Toggle<relay::client::Behaviour>,
    pub(crate) dcutr: Toggle<dcutr::Behaviour>,
    pub(crate) autonat: Toggle<autonat::Behaviour>,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
}

impl NodeBehaviour {
    /// Every behaviour a node runs, set up from `config`; `relay_client` is the client half
    /// of the relay transport when the node uses relays.
    pub(crate) fn new(
        keypair: &Keypair,
        config: &NetworkConfig,
        relay_client: Option<relay::client::Behaviour>,
    ) -> Result<Self, NetworkError> {
        let peer_id = keypair.public().to_peer_id();
        let protocol = blob_protocol(config.mesh.as_str())?;
        let blobs = request_response::Behaviour::with_codec(
            BlobCodec {
                limits: config.limits.clone(),
            },
            [(protocol, ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(config.request_timeout)
                .with_max_concurrent_streams(64),
        );
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(config.max_connections))
            .with_max_established_per_peer(Some(2))
            .with_max_pending_incoming(Some(64));
        Ok(Self {
            denied: allow_block_list::Behaviour::default(),
            limits: connection_limits::Behaviour::new(limits),
            kademlia: kademlia(peer_id, &config.mesh, kad_bootstrap_interval(config)),
            identify: identify::Behaviour::new(identify_config(
                keypair.public(),
                &config.mesh,
                config.agent_version.clone(),
            )),
            ping: ping::Behaviour::default(),
            gossipsub: gossipsub_behaviour(keypair, config)?,
            blobs,
            relay_client: relay_client.into(),
            dcutr: config.dcutr.then(|| dcutr::Behaviour::new(peer_id)).into(),
            autonat: config
                .autonat
                .then(|| autonat::Behaviour::new(peer_id, autonat::Config::default()))
                .into(),
            mdns: config
                .mdns
                .then(|| mdns_behaviour(peer_id))
                .flatten()
                .into(),
        })
    }
}

/// mDNS when the host allows it; without it the node still finds peers through Kademlia.
fn mdns_behaviour(peer_id: PeerId) -> Option<mdns::tokio::Behaviour> {
    match mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id) {
        Ok(behaviour) => Some(behaviour),
        Err(err) => {
            tracing::warn!(error = %err, "mDNS unavailable; continuing without it");
            None
        }
    }
}

/// Gossipsub for manifests: signed by their author, strictly validated, message id = blake3
/// of the content (so a republished manifest is the same message), scored.
fn gossipsub_behaviour(
    keypair: &Keypair,
    config: &NetworkConfig,
) -> Result<gossipsub::Behaviour, NetworkError> {
    let gossip_config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .message_id_fn(|message: &gossipsub::Message| {
            MessageId::from(blake3::hash(&message.data).as_bytes().to_vec())
        })
        .max_transmit_size(config.limits.max_manifest_bytes + GOSSIP_FRAMING_ALLOWANCE)
        .heartbeat_interval(config.gossip_heartbeat)
        .build()?;
    let mut behaviour = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(keypair.clone()),
        gossip_config,
    )
    .map_err(|err| NetworkError::Gossipsub(err.to_string()))?;
    let topic = config.delta_topic().hash();
    let mut params = gossipsub::PeerScoreParams::default();
    // Manifests are a few per round: delivery-rate penalties (P3, P3b) would punish quiet
    // honest peers, so only invalid deliveries (P4) and the application score (P5) count.
    params.topics.insert(
        topic,
        gossipsub::TopicScoreParams {
            topic_weight: 1.0,
            mesh_message_deliveries_weight: 0.0,
            mesh_failure_penalty_weight: 0.0,
            invalid_message_deliveries_weight: -50.0,
            invalid_message_deliveries_decay: 0.9,
            ..gossipsub::TopicScoreParams::default()
        },
    );
    params.app_specific_weight = 1.0;
    // Local testnets run every node on one loopback address.
    params
        .ip_colocation_factor_whitelist
        .insert(IpAddr::V4(Ipv4Addr::LOCALHOST));
    behaviour
        .with_peer_score(params, gossipsub::PeerScoreThresholds::default())
        .map_err(|err| NetworkError::Gossipsub(err.to_string()))?;
    behaviour.subscribe(&config.delta_topic())?;
    Ok(behaviour)
}

/// Kademlia's periodic bootstrap for a node: every 5 minutes, except on a sparse node
/// (gossip), which needs a few links, not a fresh view of every bucket. There each bootstrap
/// (~8 lookups of ~50 requests, each answered with 20 peer records) runs for minutes on a
/// loaded machine, and in a mesh of 200 under churn Kademlia cost 0.6-1.7x the round's deltas
/// (docs/BENCHMARKS.md, churn against N); its links and the random walk keep it connected.
fn kad_bootstrap_interval(config: &NetworkConfig) -> Option<Duration> {
    config
        .dial_discovered_below
        .is_none()
        .then_some(Duration::from_secs(300))
}

/// How many closest peers a sparse node's own lookups end on (Kademlia's k is 20): each
/// lookup then asks ~15 peers instead of ~50, and still learns of more peers than the links
/// the node dials.
pub(crate) const SPARSE_LOOKUP_RESULTS: NonZeroUsize = NonZeroUsize::new(8).expect("nonzero");
