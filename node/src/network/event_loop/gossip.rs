//! Delta manifests arriving by gossip or as a new neighbour's direct answer: structural
//! validation here, timeliness left to the node.

use std::sync::Arc;

use libp2p::PeerId;
use libp2p::gossipsub::{self, MessageAcceptance, MessageId};
use libp2p::metrics::Recorder;
use meshtune_protocol::{ChunkRequest, ChunkResponse, DeltaManifest};

use super::EventLoop;
use crate::network::NetworkEvent;
use crate::network::manifest::{
    DIRECT_MANIFEST_PREFIX, ManifestFault, check_manifest, unknown_codec,
};
use crate::network::metrics::NetMetrics;

impl EventLoop {
    pub(super) fn on_gossipsub(&mut self, event: gossipsub::Event) {
        self.metrics.record(&event);
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => self.on_manifest(propagation_source, message_id, message),
            gossipsub::Event::Subscribed { peer_id, topic } => {
                self.update_mesh_peers();
                if topic == self.topic && !self.is_blacklisted(&peer_id) {
                    // Gossip does not replay: ask the new neighbour for the manifest it
                    // announced before this node was there to hear it.
                    let request = ChunkRequest::CurrentManifest {
                        mesh_id: self.config.mesh.as_str().to_owned(),
                        round: None,
                    };
                    let id = self
                        .swarm
                        .behaviour_mut()
                        .blobs
                        .send_request(&peer_id, request);
                    self.manifest_requests.insert(id, peer_id);
                }
            }
            gossipsub::Event::Unsubscribed { .. } => self.update_mesh_peers(),
            _ => {}
        }
    }

    /// Structural validation; timeliness is left to the node.
    fn on_manifest(&mut self, source: PeerId, message_id: MessageId, message: gossipsub::Message) {
        let decoded = DeltaManifest::decode(&message.data, &self.config.limits);
        if let (Some(author), Err(error)) = (message.source, &decoded)
            && let Some(what) = unknown_codec(error)
        {
            self.ignore_unknown_codec(author, source, &message_id, &what);
            return;
        }
        let verdict = (|| {
            let author = message.source.ok_or("unsigned message")?;
            let manifest = decoded.map_err(|_| "undecodable manifest")?;
            check_manifest(&manifest, self.config.mesh.as_str(), author, &self.layout).map_err(
                |reason| match reason {
                    ManifestFault::Sender => "manifest sender is not its signer",
                    other => other.reason(),
                },
            )?;
            Ok(manifest)
        })();
        match verdict {
            Ok(manifest) => self.emit(NetworkEvent::Manifest {
                message_id,
                source,
                manifest: Arc::new(manifest),
            }),
            Err(reason) => {
                tracing::warn!(peer = %source, reason, "rejecting manifest");
                NetMetrics::count(&self.net_metrics.rejected_manifests, "reason", reason, 1);
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(
                        &message_id,
                        &source,
                        MessageAcceptance::Reject,
                    );
            }
        }
    }

    /// A peer announcing deltas in a codec this build does not know: said once per peer (a
    /// warning naming the codec field), then ignored without penalty; not a fault of the peer.
    fn ignore_unknown_codec(
        &mut self,
        author: PeerId,
        source: PeerId,
        message_id: &MessageId,
        what: &str,
    ) {
        if self.unknown_codec_peers.first(author) {
            tracing::warn!(
                peer = %author,
                codec = what,
                "this peer's deltas use a codec this build of meshtune cannot decode; they are \
                 ignored: upgrade meshtune, or run the mesh with a codec every node knows"
            );
        }
        NetMetrics::count(
            &self.net_metrics.rejected_manifests,
            "reason",
            "unknown codec",
            1,
        );
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(message_id, &source, MessageAcceptance::Ignore);
    }

    /// A new neighbour's answer to [`ChunkRequest::CurrentManifest`]: the same checks as a
    /// gossiped manifest, with the connection (not a signature) vouching for the sender.
    pub(super) fn on_direct_manifest(&mut self, peer: PeerId, response: ChunkResponse) {
        let manifest = match response {
            ChunkResponse::Manifest(manifest) => manifest,
            ChunkResponse::NotFound => return,
            _ => {
                tracing::warn!(peer = %peer, "answered a manifest request with something else");
                return;
            }
        };
        let verdict = check_manifest(&manifest, self.config.mesh.as_str(), peer, &self.layout)
            .map_err(ManifestFault::reason);
        match verdict {
            Ok(()) => {
                let id = format!(
                    "{}{peer}/{}",
                    String::from_utf8_lossy(DIRECT_MANIFEST_PREFIX),
                    manifest.round
                );
                self.emit(NetworkEvent::Manifest {
                    message_id: MessageId::new(id.as_bytes()),
                    source: peer,
                    manifest: Arc::new(manifest),
                });
            }
            Err(reason) => {
                tracing::warn!(peer = %peer, reason, "rejecting manifest");
                NetMetrics::count(&self.net_metrics.rejected_manifests, "reason", reason, 1);
                self.strike(peer, reason);
            }
        }
    }
}
