//! A peer's dialable address as operators write it: a multiaddr that ends in
//! `/p2p/<peer id>`, e.g. `/ip4/10.0.0.1/tcp/4001/p2p/12D3KooW…`. Used for
//! `--peer` here and `--bootstrap` in the node. Parsing only; no I/O.

use std::{fmt, str::FromStr};

use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};

/// A multiaddr split into the peer id it must reach and the transport address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    pub peer_id: PeerId,
    /// The transport part, without the trailing `/p2p/<peer id>`.
    pub addr: Multiaddr,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerAddrError {
    #[error("`{input}` is not a multiaddr: {reason}")]
    Invalid { input: String, reason: String },
    #[error("`{input}` does not end in /p2p/<peer id>; copy the full address the peer printed")]
    MissingPeerId { input: String },
    #[error("`{input}` has no transport address before /p2p/<peer id>")]
    MissingTransport { input: String },
}

impl PeerAddr {
    /// `addr` may already end in `/p2p/<peer_id>` (Kademlia and identify often hand out
    /// such addresses): every trailing copy is removed, so the address is never doubled.
    pub fn new(peer_id: PeerId, mut addr: Multiaddr) -> Self {
        while matches!(addr.iter().last(), Some(Protocol::P2p(id)) if id == peer_id) {
            addr.pop();
        }
        Self { peer_id, addr }
    }

    /// The full address, `addr` followed by `/p2p/<peer id>`, ready to dial or print.
    pub fn to_multiaddr(&self) -> Multiaddr {
        self.addr.clone().with(Protocol::P2p(self.peer_id))
    }

    /// Splits a parsed multiaddr; `input` is only used in error messages. Repeated trailing
    /// `/p2p/<peer id>` (as older peer tables wrote them) collapse to one.
    pub fn from_multiaddr(mut addr: Multiaddr) -> Result<Self, PeerAddrError> {
        let input = addr.to_string();
        let Some(Protocol::P2p(peer_id)) = addr.pop() else {
            return Err(PeerAddrError::MissingPeerId { input });
        };
        let peer = Self::new(peer_id, addr);
        if peer.addr.is_empty() {
            return Err(PeerAddrError::MissingTransport { input });
        }
        Ok(peer)
    }
}

impl FromStr for PeerAddr {
    type Err = PeerAddrError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let addr: Multiaddr = input
            .trim()
            .parse()
            .map_err(|error: libp2p::multiaddr::Error| PeerAddrError::Invalid {
                input: input.to_owned(),
                reason: error.to_string(),
            })?;
        Self::from_multiaddr(addr)
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_multiaddr())
    }
}

/// Appends `/p2p/<peer id>` unless the address already ends with it.
pub fn with_peer_id(addr: Multiaddr, peer_id: PeerId) -> Multiaddr {
    match addr.iter().last() {
        Some(Protocol::P2p(existing)) if existing == peer_id => addr,
        _ => addr.with(Protocol::P2p(peer_id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_full_address() {
        let peer_id = PeerId::random();
        let text = format!("/ip4/10.0.0.1/tcp/4001/p2p/{peer_id}");
        let parsed: PeerAddr = text.parse().expect("parse");
        assert_eq!(parsed.peer_id, peer_id);
        assert_eq!(parsed.addr.to_string(), "/ip4/10.0.0.1/tcp/4001");
        assert_eq!(parsed.to_string(), text);
    }

    #[test]
    fn dns_and_quic_addresses_parse() {
        let peer_id = PeerId::random();
        for transport in [
            "/dns4/boot.example.org/tcp/4001",
            "/ip6/::1/udp/4001/quic-v1",
        ] {
            let parsed: PeerAddr = format!("{transport}/p2p/{peer_id}").parse().expect("parse");
            assert_eq!(parsed.addr.to_string(), transport);
        }
    }

    #[test]
    fn rejects_missing_peer_id_and_garbage_with_the_input_in_the_message() {
        let error = "/ip4/10.0.0.1/tcp/4001"
            .parse::<PeerAddr>()
            .expect_err("no peer id");
        assert!(matches!(error, PeerAddrError::MissingPeerId { .. }));
        assert!(error.to_string().contains("/ip4/10.0.0.1/tcp/4001"));

        let error = "not-an-address".parse::<PeerAddr>().expect_err("garbage");
        assert!(matches!(error, PeerAddrError::Invalid { .. }));
        assert!(error.to_string().contains("not-an-address"));

        let error = format!("/p2p/{}", PeerId::random())
            .parse::<PeerAddr>()
            .expect_err("no transport");
        assert!(matches!(error, PeerAddrError::MissingTransport { .. }));
    }

    #[test]
    fn with_peer_id_does_not_duplicate() {
        let peer_id = PeerId::random();
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("addr");
        let once = with_peer_id(addr, peer_id);
        let twice = with_peer_id(once.clone(), peer_id);
        assert_eq!(once, twice);
    }

    #[test]
    fn a_peer_id_already_in_the_address_is_not_doubled() {
        let peer = PeerId::random();
        let base: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().expect("addr");
        let once = base.clone().with(Protocol::P2p(peer));
        let twice = once.clone().with(Protocol::P2p(peer));
        assert_eq!(PeerAddr::new(peer, once.clone()).addr, base);
        assert_eq!(PeerAddr::new(peer, twice.clone()).to_multiaddr(), once);
        let parsed: PeerAddr = twice.to_string().parse().expect("parse");
        assert_eq!(parsed, PeerAddr::new(peer, base));
    }
}
