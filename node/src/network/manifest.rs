//! The checks every delta manifest passes, however it arrived (gossip or a direct answer).
//!
//! Owns: manifest *structure* checks (mesh id, signer == sender, layout). Must not touch:
//! timeliness (the round machine decides that).

use libp2p::PeerId;
use meshtune_protocol::{DeltaManifest, ModelLayout};

/// Why a structurally decoded delta manifest is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ManifestFault {
    #[error("manifest for another mesh")]
    Mesh,
    /// It does not name the peer that vouches for it (gossip signer or connection).
    #[error("manifest names another sender than the peer")]
    Sender,
    #[error("manifest does not match the model layout")]
    Layout,
}

impl ManifestFault {
    pub fn reason(self) -> &'static str {
        match self {
            ManifestFault::Mesh => "manifest for another mesh",
            ManifestFault::Sender => "manifest names another sender than the peer",
            ManifestFault::Layout => "manifest does not match the model layout",
        }
    }
}

/// The checks every delta manifest passes, however it arrived: this mesh, sent by `from`
/// (the gossip signer or the peer on the connection), tensors matching the model layout.
pub fn check_manifest(
    manifest: &DeltaManifest,
    mesh: &str,
    from: PeerId,
    layout: &ModelLayout,
) -> Result<(), ManifestFault> {
    if manifest.mesh_id != mesh {
        return Err(ManifestFault::Mesh);
    }
    if PeerId::from_bytes(&manifest.sender).ok() != Some(from) {
        return Err(ManifestFault::Sender);
    }
    manifest
        .check_layout(layout)
        .map_err(|_| ManifestFault::Layout)
}

/// Message ids of manifests received over request-response rather than gossip.
pub(crate) const DIRECT_MANIFEST_PREFIX: &[u8] = b"direct/";
