//! The checks every delta manifest passes, however it arrived (gossip or a direct answer).
//!
//! Owns: manifest *structure* checks (mesh id, signer == sender, layout). Must not touch:
//! timeliness (the round machine decides that).

use libp2p::PeerId;
use meshtune_protocol::{DeltaManifest, ModelLayout, WireError};

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

/// What a manifest this build cannot read names, when the reason is a codec it does not
/// know (a value format or segment flag from a newer meshtune) rather than a malformed or
/// hostile message: the peer is not at fault, its deltas are just unreadable here.
pub(crate) fn unknown_codec(error: &WireError) -> Option<String> {
    match error {
        WireError::UnknownTag {
            field: field @ ("tensor format" | "tensor flags"),
            tag,
        } => Some(format!("{field} {tag}")),
        _ => None,
    }
}

/// Peers already told about (one warning per peer, not one per round).
#[derive(Debug, Default)]
pub(crate) struct ToldOnce(std::collections::HashSet<PeerId>);

impl ToldOnce {
    /// True the first time `peer` is seen.
    pub(crate) fn first(&mut self, peer: PeerId) -> bool {
        self.0.insert(peer)
    }
}

#[cfg(test)]
mod tests {
    use meshtune_protocol::{
        CodecParams, Limits, ModelHash, Tensor, TensorSet, chunk_blob, encode_delta,
    };

    use super::*;

    /// The bytes of a one-tensor delta manifest in `codec`, and where its flags byte is.
    fn manifest_bytes(codec: &str) -> Vec<u8> {
        let delta = TensorSet::new(vec![
            Tensor::new("w", vec![8, 8], vec![1e-3; 64]).expect("valid"),
        ])
        .expect("valid");
        let params: CodecParams = codec.parse().expect("codec");
        let encoded = encode_delta(&delta, &params, None).expect("encodes");
        let manifest = DeltaManifest {
            mesh_id: "m".into(),
            round: 1,
            base_model: ModelHash::default(),
            sender: vec![1],
            sample_count: 1,
            training_steps: 1,
            blob: chunk_blob(&encoded.blob, 64).expect("chunks").descriptor(),
            tensors: encoded.tensors,
        };
        manifest.encode(&Limits::default()).expect("encodes")
    }

    #[test]
    fn a_codec_from_a_newer_build_is_told_apart_from_a_broken_manifest() {
        let limits = Limits::default();
        // f32 without zstd: the tensor's last bytes are `format=0 flags=0 length=256` (varint).
        let bytes = manifest_bytes("f32");
        let n = bytes.len();
        assert_eq!(&bytes[n - 4..], &[0, 0, 0x80, 0x02]);
        let mut newer_flag = bytes.clone();
        newer_flag[n - 3] = 0x40;
        let error = DeltaManifest::decode(&newer_flag, &limits).expect_err("unknown flag");
        assert_eq!(unknown_codec(&error).as_deref(), Some("tensor flags 64"));
        let mut newer_format = bytes.clone();
        newer_format[n - 4] = 9;
        let error = DeltaManifest::decode(&newer_format, &limits).expect_err("unknown format");
        assert_eq!(unknown_codec(&error).as_deref(), Some("tensor format 9"));
        // Truncated or a wrong magic: broken, not a newer codec.
        for broken in [&bytes[..n - 2], &bytes[1..]] {
            let error = DeltaManifest::decode(broken, &limits).expect_err("broken");
            assert_eq!(unknown_codec(&error), None, "{error}");
        }
        // A low-rank manifest reads in this build.
        assert!(DeltaManifest::decode(&manifest_bytes("rank2+int8/64"), &limits).is_ok());
        // Told once per peer, however many rounds it announces.
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut told = ToldOnce::default();
        assert_eq!(
            [a, a, b, a, b].map(|peer| told.first(peer)),
            [true, false, true, false, false]
        );
    }
}
