//! What a meshtune peer speaks for discovery, node and bootstrap node alike: [`MeshId`]
//! (one Kademlia protocol name per mesh, so two meshes never share a routing table),
//! [`kademlia`] (always in server mode: automatic mode would put loopback and LAN peers in
//! client mode, and client-mode peers are never added to anyone's routing table),
//! [`identify_config`], and [`add_identified_addresses`] (Kademlia only learns a dialer's
//! ephemeral port; the addresses a peer listens on arrive through identify).
//!
//! This module holds no state of its own and does no I/O.

use std::{fmt, str::FromStr, time::Duration};

use libp2p::{PeerId, StreamProtocol, identify, identity::PublicKey, kad};

/// How many identify-reported listen addresses of one peer go into Kademlia. The list
/// comes from the remote peer; real peers have a handful.
pub const MAX_IDENTIFY_ADDRS_PER_PEER: usize = 16;

/// Kademlia and identify run on every connection; without a generous idle timeout the
/// swarm would close a connection between the identify exchange and the next lookup.
pub const DEFAULT_IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// The name of one mesh. Peers of different meshes do not find each other: the name is
/// part of the Kademlia protocol (`/meshtune/<mesh>/kad/1.0.0`) and of the identify
/// protocol version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MeshId {
    name: String,
    kad_protocol: StreamProtocol,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("mesh id `{0}` must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")]
pub struct MeshIdError(String);

impl MeshId {
    pub const MAX_LEN: usize = 64;

    pub fn new(name: &str) -> Result<Self, MeshIdError> {
        let valid = !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(MeshIdError(name.to_owned()));
        }
        let kad_protocol = StreamProtocol::try_from_owned(format!("/meshtune/{name}/kad/1.0.0"))
            .map_err(|_| MeshIdError(name.to_owned()))?;
        Ok(Self {
            name: name.to_owned(),
            kad_protocol,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// `/meshtune/<mesh>/kad/1.0.0`.
    pub fn kad_protocol(&self) -> StreamProtocol {
        self.kad_protocol.clone()
    }

    /// `/meshtune/<mesh>/1.0.0`, sent in identify.
    pub fn identify_protocol_version(&self) -> String {
        format!("/meshtune/{}/1.0.0", self.name)
    }
}

impl Default for MeshId {
    fn default() -> Self {
        Self {
            name: "default".to_owned(),
            kad_protocol: StreamProtocol::new("/meshtune/default/kad/1.0.0"),
        }
    }
}

impl FromStr for MeshId {
    type Err = MeshIdError;
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::new(name)
    }
}

impl fmt::Display for MeshId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// A Kademlia behaviour for `mesh`, in server mode, bootstrapping itself every
/// `bootstrap_interval` if one is given (a self-lookup plus a random-key lookup per bucket
/// beyond the closest peer's: ~8 lookups of ~50 requests each in a mesh of 200) and, while
/// its routing table holds fewer than 20 peers, shortly after new peers enter it (libp2p-kad
/// 0.49 cannot turn that off).
pub fn kademlia(
    local_peer_id: PeerId,
    mesh: &MeshId,
    bootstrap_interval: Option<Duration>,
) -> kad::Behaviour<kad::store::MemoryStore> {
    let mut config = kad::Config::new(mesh.kad_protocol());
    config.set_periodic_bootstrap_interval(bootstrap_interval);
    // The memory store is bounded by its default limits (records, providers).
    let store = kad::store::MemoryStore::new(local_peer_id);
    let mut kademlia = kad::Behaviour::with_config(local_peer_id, store, config);
    kademlia.set_mode(Some(kad::Mode::Server));
    kademlia
}

/// Identify for `mesh`, with `agent_version` such as `meshtune-bootstrap/0.1.0`.
pub fn identify_config(
    public_key: PublicKey,
    mesh: &MeshId,
    agent_version: String,
) -> identify::Config {
    identify::Config::new(mesh.identify_protocol_version(), public_key)
        .with_agent_version(agent_version)
        .with_push_listen_addr_updates(true)
}

/// Adds the listen addresses a peer reported through identify to Kademlia, if the peer
/// speaks this mesh's Kademlia protocol (at most [`MAX_IDENTIFY_ADDRS_PER_PEER`]).
/// Returns how many were added.
pub fn add_identified_addresses(
    kademlia: &mut kad::Behaviour<kad::store::MemoryStore>,
    peer_id: &PeerId,
    info: &identify::Info,
    kad_protocol: &StreamProtocol,
) -> usize {
    if !info.protocols.contains(kad_protocol) {
        return 0;
    }
    let mut added = 0;
    for addr in info.listen_addrs.iter().take(MAX_IDENTIFY_ADDRS_PER_PEER) {
        match kademlia.add_address(peer_id, addr.clone()) {
            kad::RoutingUpdate::Success | kad::RoutingUpdate::Pending => added += 1,
            kad::RoutingUpdate::Failed => {}
        }
    }
    added
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;

    #[test]
    fn mesh_ids_name_the_protocols() {
        let mesh = MeshId::new("lab-1.eu_west").expect("valid");
        assert_eq!(
            mesh.kad_protocol().as_ref(),
            "/meshtune/lab-1.eu_west/kad/1.0.0"
        );
        assert_eq!(
            mesh.identify_protocol_version(),
            "/meshtune/lab-1.eu_west/1.0.0"
        );
        assert_eq!(
            MeshId::default(),
            MeshId::new("default").expect("default is valid")
        );
    }

    #[test]
    fn mesh_ids_reject_separators_and_oversize() {
        for bad in ["", "a/b", "a b", "ü", &"x".repeat(MeshId::MAX_LEN + 1)] {
            assert!(MeshId::new(bad).is_err(), "{bad:?}");
        }
        assert!(MeshId::new(&"x".repeat(MeshId::MAX_LEN)).is_ok());
    }

    #[test]
    fn kademlia_starts_in_server_mode() {
        let mut kademlia = kademlia(
            PeerId::random(),
            &MeshId::default(),
            Some(Duration::from_secs(60)),
        );
        assert_eq!(kademlia.mode(), kad::Mode::Server);
        assert_eq!(
            kademlia.protocol_names(),
            &[MeshId::default().kad_protocol()]
        );
        assert_eq!(kademlia.kbuckets().count(), 0);
    }

    #[test]
    fn identify_addresses_reach_kademlia_only_for_mesh_peers() {
        let mesh = MeshId::default();
        let mut kademlia = kademlia(PeerId::random(), &mesh, Some(Duration::from_secs(60)));
        let remote = Keypair::generate_ed25519();
        let remote_id = remote.public().to_peer_id();
        let listen_addrs: Vec<_> = (0..40)
            .map(|port| {
                format!("/ip4/10.0.0.1/tcp/{}", 1000 + port)
                    .parse()
                    .expect("addr")
            })
            .collect();
        let mut info = identify::Info {
            public_key: remote.public(),
            protocol_version: mesh.identify_protocol_version(),
            agent_version: "test".into(),
            listen_addrs,
            protocols: vec![StreamProtocol::new("/other/kad/1.0.0")],
            observed_addr: "/ip4/10.0.0.2/tcp/1".parse().expect("addr"),
            signed_peer_record: None,
        };
        let kad_protocol = mesh.kad_protocol();
        assert_eq!(
            add_identified_addresses(&mut kademlia, &remote_id, &info, &kad_protocol),
            0
        );
        info.protocols.push(kad_protocol.clone());
        assert_eq!(
            add_identified_addresses(&mut kademlia, &remote_id, &info, &kad_protocol),
            MAX_IDENTIFY_ADDRS_PER_PEER
        );
        let in_table: usize = kademlia.kbuckets().map(|b| b.num_entries()).sum();
        assert_eq!(in_table, 1);
    }
}
