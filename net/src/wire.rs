//! Bytes on the wire by application protocol: `meshtune_wire_bytes_total{protocol,direction}`.
//!
//! libp2p's bandwidth counter only splits by transport (`/ip4/tcp`, `/memory`). To see what a
//! node's bytes are spent on (delta blobs against identify, Kademlia, ping and gossipsub
//! control traffic), [`ByProtocol`] wraps the stream muxer and reads the multistream-select
//! proposal at the head of each substream (`/multistream/1.0.0\n` then the protocol name,
//! each length-prefixed). The name is mapped onto a fixed set of labels ([`AppProtocol`]): a
//! peer proposing made-up protocol names cannot grow the metric. Bytes counted are the same
//! as libp2p's (what passes through substreams, before yamux and noise framing).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use futures::{AsyncRead, AsyncWrite};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerBox, StreamMuxerEvent, SubstreamBox};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

/// What a substream carries, from the protocol it negotiated.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum AppProtocol {
    /// meshtune's blob request-response (`/meshtune/<mesh>/blobs/...`): deltas, states.
    blobs,
    gossipsub,
    kad,
    identify,
    identify_push,
    ping,
    relay,
    dcutr,
    autonat,
    /// A protocol name none of the above (a peer's proposal this node may not speak).
    other,
    /// The substream ended before its protocol name was seen.
    unknown,
}

impl AppProtocol {
    /// The label of a proposed protocol name.
    pub fn of(name: &str) -> Self {
        if name.starts_with("/ipfs/ping/") {
            Self::ping
        } else if name.starts_with("/ipfs/id/push/") {
            Self::identify_push
        } else if name.starts_with("/ipfs/id/") {
            Self::identify
        } else if name.contains("/kad/") {
            Self::kad
        } else if name.starts_with("/meshsub/") || name.starts_with("/floodsub/") {
            Self::gossipsub
        } else if name.starts_with("/meshtune/") && name.contains("/blobs/") {
            Self::blobs
        } else if name.starts_with("/libp2p/circuit/relay/") {
            Self::relay
        } else if name.starts_with("/libp2p/dcutr") {
            Self::dcutr
        } else if name.starts_with("/libp2p/autonat/") {
            Self::autonat
        } else {
            Self::other
        }
    }
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Direction {
    inbound,
    outbound,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    protocol: AppProtocol,
    direction: Direction,
}

/// The counters, registered as `meshtune_wire_bytes_total`.
#[derive(Debug, Clone, Default)]
pub struct WireCounters {
    family: Family<Labels, Counter>,
}

impl WireCounters {
    pub fn register(registry: &mut Registry) -> Self {
        let counters = Self::default();
        registry.sub_registry_with_prefix("meshtune").register(
            "wire_bytes",
            "Bytes through substreams by application protocol and direction",
            counters.family.clone(),
        );
        counters
    }

    fn counter(&self, protocol: AppProtocol, direction: Direction) -> Counter {
        self.family
            .get_or_create(&Labels {
                protocol,
                direction,
            })
            .clone()
    }

    fn add(&self, protocol: AppProtocol, direction: Direction, bytes: u64) {
        if bytes > 0 {
            self.counter(protocol, direction).inc_by(bytes);
        }
    }

    /// Wraps a connection's muxer so its substreams count here.
    pub fn wrap(&self, muxer: StreamMuxerBox) -> StreamMuxerBox {
        StreamMuxerBox::new(ByProtocol {
            inner: muxer,
            counters: self.clone(),
        })
    }
}

/// Longest head of a substream read for its protocol name.
const SNIFF_LIMIT: usize = 512;

/// The protocol name proposed at the head of a substream, once it is all there: `Ok(None)`
/// while more bytes are needed, `Err(())` when the head is not multistream-select.
fn proposed_protocol(head: &[u8]) -> Result<Option<&str>, ()> {
    let mut rest = head;
    loop {
        // Unsigned varint length (protocol names are short: at most two bytes).
        let (len, used) = match rest {
            [] => return Ok(None),
            [b, ..] if b & 0x80 == 0 => (usize::from(*b), 1),
            [_] => return Ok(None),
            [a, b, ..] if b & 0x80 == 0 => (usize::from(a & 0x7f) | (usize::from(*b) << 7), 2),
            _ => return Err(()),
        };
        let Some(message) = rest.get(used..used + len) else {
            return Ok(None);
        };
        rest = &rest[used + len..];
        let text = std::str::from_utf8(message)
            .map_err(|_| ())?
            .trim_end_matches('\n');
        if text.starts_with("/multistream/") {
            continue;
        }
        return if text.starts_with('/') {
            Ok(Some(text))
        } else {
            Err(())
        };
    }
}

struct ByProtocol {
    inner: StreamMuxerBox,
    counters: WireCounters,
}

impl ByProtocol {
    fn counted(&self, inner: SubstreamBox, outbound: bool) -> SubstreamBox {
        SubstreamBox::new(Counted {
            inner,
            outbound,
            counters: self.counters.clone(),
            head: Vec::new(),
            known: None,
            pending: [0, 0],
        })
    }
}

impl StreamMuxer for ByProtocol {
    type Substream = SubstreamBox;
    type Error = io::Error;

    fn poll_inbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let stream = std::task::ready!(Pin::new(&mut self.inner).poll_inbound(cx))?;
        Poll::Ready(Ok(self.counted(stream, false)))
    }

    fn poll_outbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let stream = std::task::ready!(Pin::new(&mut self.inner).poll_outbound(cx))?;
        Poll::Ready(Ok(self.counted(stream, true)))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// A substream counting into its protocol's counters. Until the name is seen (in what this
/// end writes on a substream it opened, in what it reads on one the peer opened), bytes wait
/// in `pending` (inbound, outbound); then the two counters are looked up once and kept in
/// `known` (inbound, outbound), so each read and write is one atomic add.
struct Counted {
    inner: SubstreamBox,
    outbound: bool,
    counters: WireCounters,
    head: Vec<u8>,
    known: Option<[Counter; 2]>,
    pending: [u64; 2],
}

impl Counted {
    fn count(&mut self, direction: Direction, bytes: &[u8]) {
        let slot = match direction {
            Direction::inbound => 0,
            Direction::outbound => 1,
        };
        if let Some(known) = &self.known {
            known[slot].inc_by(bytes.len() as u64);
            return;
        }
        self.pending[slot] += bytes.len() as u64;
        // The proposer's side of the head: our writes on a substream we opened.
        if self.outbound == (direction == Direction::outbound) {
            let take = bytes.len().min(SNIFF_LIMIT - self.head.len());
            self.head.extend_from_slice(&bytes[..take]);
            let found = match proposed_protocol(&self.head) {
                Ok(Some(name)) => Some(AppProtocol::of(name)),
                Ok(None) if self.head.len() < SNIFF_LIMIT => None,
                _ => Some(AppProtocol::other),
            };
            if let Some(protocol) = found {
                self.head = Vec::new();
                let known = [
                    self.counters.counter(protocol, Direction::inbound),
                    self.counters.counter(protocol, Direction::outbound),
                ];
                for (counter, bytes) in known.iter().zip(std::mem::take(&mut self.pending)) {
                    counter.inc_by(bytes);
                }
                self.known = Some(known);
            }
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let [inbound, outbound] = self.pending;
        self.counters
            .add(AppProtocol::unknown, Direction::inbound, inbound);
        self.counters
            .add(AppProtocol::unknown, Direction::outbound, outbound);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        self.count(Direction::inbound, &buf[..n]);
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.count(Direction::outbound, &buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(text: &str) -> Vec<u8> {
        let mut out = vec![u8::try_from(text.len() + 1).expect("short")];
        out.extend_from_slice(text.as_bytes());
        out.push(b'\n');
        out
    }

    #[test]
    fn reads_the_proposal_after_the_multistream_header() {
        let mut head = message("/multistream/1.0.0");
        head.extend(message("/meshtune/lab/blobs/1.0.0"));
        head.extend_from_slice(b"payload");
        assert_eq!(
            proposed_protocol(&head),
            Ok(Some("/meshtune/lab/blobs/1.0.0"))
        );
        assert_eq!(proposed_protocol(&head[..5]), Ok(None));
        assert_eq!(proposed_protocol(&head[..22]), Ok(None));
        assert_eq!(proposed_protocol(b"\x05hello"), Err(()));
    }

    #[test]
    fn maps_names_onto_a_fixed_set() {
        for (name, label) in [
            ("/ipfs/ping/1.0.0", AppProtocol::ping),
            ("/ipfs/id/1.0.0", AppProtocol::identify),
            ("/ipfs/id/push/1.0.0", AppProtocol::identify_push),
            ("/meshtune/lab/kad/1.0.0", AppProtocol::kad),
            ("/meshsub/1.2.0", AppProtocol::gossipsub),
            ("/meshtune/lab/blobs/1.0.0", AppProtocol::blobs),
            ("/libp2p/circuit/relay/0.2.0/hop", AppProtocol::relay),
            ("/made/up/9", AppProtocol::other),
        ] {
            assert_eq!(AppProtocol::of(name), label, "{name}");
        }
    }
}
