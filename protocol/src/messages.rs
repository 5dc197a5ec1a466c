//! Request/response messages for pulling blobs: a chunk list by its hash, a chunk by its
//! blob hash, index and hash, the latest state manifest of a mesh, a peer's current delta
//! manifest, and the manifest of a gossip link's q.
//!
//! Owns: [`ChunkRequest`], [`ChunkResponse`] and their wire format. Must not touch: the
//! transport (the node wraps these bytes in a libp2p request-response codec, capping reads
//! at [`Limits::max_response_bytes`]).
//!
//! Wire format (version 1): `"MTRQ" version tag fields` and `"MTRS" version tag fields`;
//! nested messages (chunk lists, state manifests) are length-prefixed complete messages
//! with their own magic and version.

use crate::chunk::ChunkList;
use crate::hash::{BlobHash, ChunkHash, ChunkListHash, ModelHash};
use crate::limits::Limits;
use crate::manifest::{DeltaManifest, StateManifest};
use crate::wire::{MessageKind, WireError, WireReader, WireWriter, over_cap};

/// What one peer asks another for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkRequest {
    /// The chunk list with this hash (named by a manifest).
    ChunkList {
        /// Hash of the encoded list.
        chunk_list_hash: ChunkListHash,
    },
    /// One chunk of a blob; the responder checks it still has a chunk with this hash.
    Chunk {
        /// The blob.
        blob_hash: BlobHash,
        /// Chunk index.
        index: u64,
        /// Expected hash of the chunk.
        chunk_hash: ChunkHash,
    },
    /// The latest state manifest the responder holds for a mesh (late joiners).
    LatestState {
        /// The mesh.
        mesh_id: String,
    },
    /// The delta manifest the responder published for its current round: a peer that
    /// connects after the gossip went out asks each new neighbour for it (gossip does not
    /// replay). The responder is authenticated by the connection, so the answer needs no
    /// signature: it must name the responder as its sender.
    CurrentManifest {
        /// The mesh.
        mesh_id: String,
        /// The manifest of this round if the responder still has it (it keeps a few), else
        /// its latest; `None`: its latest.
        round: Option<u64>,
    },
    /// Gossip averaging: the responder's q for the link to the requester, of round `round` or
    /// later. `copy` names the requester's copy of the responder (the hash of what it holds);
    /// the answer's `base_model` is that copy when the responder still knows it, else the
    /// mesh's anchor (the model every node started from), so a new or lost copy costs one
    /// q, never a whole model. `NotFound` while the responder has not published `round`.
    LinkDelta {
        /// The mesh.
        mesh_id: String,
        /// The round the requester is in.
        round: u64,
        /// The requester's copy of the responder; `None`: it holds none.
        copy: Option<ModelHash>,
    },
}

/// The answer to a [`ChunkRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkResponse {
    /// The chunk list asked for; check it with [`ChunkList::verify_against`].
    ChunkList(ChunkList),
    /// The chunk asked for; check it with [`crate::BlobAssembler::accept_chunk`].
    Chunk(Vec<u8>),
    /// The latest state manifest.
    State(StateManifest),
    /// The responder's own delta manifest of its current round.
    Manifest(DeltaManifest),
    /// The responder does not have it (any more).
    NotFound,
    /// The responder has it but serves as many peers as it allows at once (a donor's cap on
    /// concurrent state uploads): ask another holder, or again later.
    Busy,
}

const REQUEST_CHUNK_LIST: u8 = 0;
const REQUEST_CHUNK: u8 = 1;
const REQUEST_LATEST_STATE: u8 = 2;
const REQUEST_CURRENT_MANIFEST: u8 = 3;
const REQUEST_LINK_DELTA: u8 = 4;

const RESPONSE_CHUNK_LIST: u8 = 0;
const RESPONSE_CHUNK: u8 = 1;
const RESPONSE_STATE: u8 = 2;
const RESPONSE_NOT_FOUND: u8 = 3;
const RESPONSE_BUSY: u8 = 4;
const RESPONSE_MANIFEST: u8 = 5;

impl ChunkRequest {
    /// Largest encoded request these limits admit.
    #[must_use]
    pub fn max_encoded_len(limits: &Limits) -> usize {
        4 + 2 + 1 + 32 + 10 + 32 + limits.max_mesh_id_len
    }

    /// Encodes the request; fails where a receiver with `limits` would refuse it.
    pub fn encode(&self, limits: &Limits) -> Result<Vec<u8>, WireError> {
        let mut writer = WireWriter::new(MessageKind::ChunkRequest);
        match self {
            Self::ChunkList { chunk_list_hash } => {
                writer.u8(REQUEST_CHUNK_LIST);
                writer.raw(chunk_list_hash.as_bytes());
            }
            Self::Chunk {
                blob_hash,
                index,
                chunk_hash,
            } => {
                if *index >= limits.max_chunks {
                    return Err(over_cap("chunk index", *index, limits.max_chunks));
                }
                writer.u8(REQUEST_CHUNK);
                writer.raw(blob_hash.as_bytes());
                writer.varint(*index);
                writer.raw(chunk_hash.as_bytes());
            }
            Self::LatestState { mesh_id }
            | Self::CurrentManifest { mesh_id, .. }
            | Self::LinkDelta { mesh_id, .. } => {
                if mesh_id.len() > limits.max_mesh_id_len {
                    return Err(over_cap(
                        "mesh id",
                        mesh_id.len() as u64,
                        limits.max_mesh_id_len as u64,
                    ));
                }
                match self {
                    Self::CurrentManifest { round, .. } => {
                        writer.u8(REQUEST_CURRENT_MANIFEST);
                        writer.byte_string(mesh_id.as_bytes());
                        // 0: the latest; r + 1: round r.
                        writer.varint(round.map_or(0, |r| r.saturating_add(1)));
                    }
                    Self::LinkDelta { round, copy, .. } => {
                        writer.u8(REQUEST_LINK_DELTA);
                        writer.byte_string(mesh_id.as_bytes());
                        writer.varint(*round);
                        match copy {
                            None => writer.u8(0),
                            Some(hash) => {
                                writer.u8(1);
                                writer.raw(hash.as_bytes());
                            }
                        }
                    }
                    _ => {
                        writer.u8(REQUEST_LATEST_STATE);
                        writer.byte_string(mesh_id.as_bytes());
                    }
                }
            }
        }
        Ok(writer.into_bytes())
    }

    /// Decodes a request, checking its caps before allocating.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Self, WireError> {
        let kind = MessageKind::ChunkRequest;
        let mut reader = WireReader::open(bytes, kind, Self::max_encoded_len(limits))?;
        let request = match reader.u8("request tag")? {
            REQUEST_CHUNK_LIST => Self::ChunkList {
                chunk_list_hash: ChunkListHash(reader.array("chunk list hash")?),
            },
            REQUEST_CHUNK => Self::Chunk {
                blob_hash: BlobHash(reader.array("blob hash")?),
                index: reader.varint_capped("chunk index", limits.max_chunks.saturating_sub(1))?,
                chunk_hash: ChunkHash(reader.array("chunk hash")?),
            },
            REQUEST_LATEST_STATE => Self::LatestState {
                mesh_id: reader.string("mesh id", limits.max_mesh_id_len)?.to_owned(),
            },
            REQUEST_CURRENT_MANIFEST => Self::CurrentManifest {
                mesh_id: reader.string("mesh id", limits.max_mesh_id_len)?.to_owned(),
                round: reader.varint("round")?.checked_sub(1),
            },
            REQUEST_LINK_DELTA => Self::LinkDelta {
                mesh_id: reader.string("mesh id", limits.max_mesh_id_len)?.to_owned(),
                round: reader.varint("round")?,
                copy: match reader.u8("copy flag")? {
                    0 => None,
                    1 => Some(ModelHash(reader.array("copy hash")?)),
                    tag => {
                        return Err(WireError::UnknownTag {
                            field: "copy flag",
                            tag: u64::from(tag),
                        });
                    }
                },
            },
            tag => {
                return Err(WireError::UnknownTag {
                    field: "request tag",
                    tag: u64::from(tag),
                });
            }
        };
        reader.finish(kind)?;
        Ok(request)
    }
}

impl ChunkResponse {
    /// Encodes the response; fails where a receiver with `limits` would refuse it.
    pub fn encode(&self, limits: &Limits) -> Result<Vec<u8>, WireError> {
        let mut writer = WireWriter::new(MessageKind::ChunkResponse);
        match self {
            Self::ChunkList(chunk_list) => {
                let list = chunk_list.encode();
                if list.len() > limits.max_chunk_list_bytes() {
                    return Err(WireError::MessageTooLarge {
                        kind: MessageKind::ChunkList,
                        len: list.len(),
                        cap: limits.max_chunk_list_bytes(),
                    });
                }
                writer.u8(RESPONSE_CHUNK_LIST);
                writer.byte_string(&list);
            }
            Self::Chunk(chunk) => {
                if chunk.len() as u64 > u64::from(limits.max_chunk_size) {
                    return Err(over_cap(
                        "chunk",
                        chunk.len() as u64,
                        u64::from(limits.max_chunk_size),
                    ));
                }
                writer.u8(RESPONSE_CHUNK);
                writer.byte_string(chunk);
            }
            Self::State(manifest) => {
                writer.u8(RESPONSE_STATE);
                writer.byte_string(&manifest.encode(limits)?);
            }
            Self::Manifest(manifest) => {
                writer.u8(RESPONSE_MANIFEST);
                writer.byte_string(&manifest.encode(limits)?);
            }
            Self::NotFound => writer.u8(RESPONSE_NOT_FOUND),
            Self::Busy => writer.u8(RESPONSE_BUSY),
        }
        Ok(writer.into_bytes())
    }

    /// Decodes a response, checking its caps before allocating.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Self, WireError> {
        let kind = MessageKind::ChunkResponse;
        let mut reader = WireReader::open(bytes, kind, limits.max_response_bytes())?;
        let response = match reader.u8("response tag")? {
            RESPONSE_CHUNK_LIST => {
                let list = reader.byte_string("chunk list", limits.max_chunk_list_bytes())?;
                Self::ChunkList(ChunkList::decode(list, limits)?)
            }
            RESPONSE_CHUNK => Self::Chunk(
                reader
                    .byte_string("chunk", limits.max_chunk_size as usize)?
                    .to_vec(),
            ),
            RESPONSE_STATE => {
                let manifest =
                    reader.byte_string("state manifest", limits.max_state_manifest_bytes)?;
                Self::State(StateManifest::decode(manifest, limits)?)
            }
            RESPONSE_MANIFEST => {
                let manifest = reader.byte_string("delta manifest", limits.max_manifest_bytes)?;
                Self::Manifest(DeltaManifest::decode(manifest, limits)?)
            }
            RESPONSE_NOT_FOUND => Self::NotFound,
            RESPONSE_BUSY => Self::Busy,
            tag => {
                return Err(WireError::UnknownTag {
                    field: "response tag",
                    tag: u64::from(tag),
                });
            }
        };
        reader.finish(kind)?;
        Ok(response)
    }
}
