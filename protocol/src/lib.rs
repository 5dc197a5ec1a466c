//! meshtune wire protocol and delta codec: everything that crosses the network.
//!
//! Pure Rust: no ML framework, no libp2p, no async runtime. The node turns its tensors
//! into a [`TensorSet`], encodes it, and moves the bytes; receivers decode with the caps of
//! a [`Limits`] and the [`ModelLayout`] they expect.
//!
//! # Flow of a delta
//!
//! 1. Sender: [`encode_delta`] (with [`CodecParams`] and, for top-k, an [`ErrorFeedback`])
//!    gives a blob and its tensor index; [`chunk_blob`] gives the [`ChunkList`] whose
//!    [`ChunkList::descriptor`] goes into a [`DeltaManifest`], gossiped as
//!    [`DeltaManifest::encode`].
//! 2. Receiver: [`DeltaManifest::decode`] (caps checked before allocating),
//!    [`DeltaManifest::check_layout`] against its model, then a
//!    [`ChunkRequest::ChunkList`] by the manifest's chunk list hash
//!    ([`ChunkList::verify_against`]), then [`ChunkRequest::Chunk`]s from any peers into a
//!    [`BlobAssembler`] (each chunk's hash checked on arrival), whose
//!    [`BlobAssembler::finish`] checks the whole-blob hash and yields a [`VerifiedBlob`].
//! 3. [`decode_delta`] decodes every tensor into fresh buffers and validates it (shapes,
//!    names, lengths, scales, indices, NaN/Inf); the caller gets a complete [`TensorSet`]
//!    or a typed [`DecodeError`], never half a delta.
//!
//! Under gossip averaging a node asks each neighbour for the q of their link instead
//! ([`ChunkRequest::LinkDelta`], naming the copy it holds) and fetches it the same way.
//!
//! Late joiners do the same with a [`StateManifest`] ([`ChunkRequest::LatestState`],
//! [`encode_state`], [`decode_state`]); the decoded model must hash to the announced
//! [`ModelHash`].
//!
//! # Wire format
//!
//! Hand-written, little-endian, versioned and deterministic (one encoding per value, so
//! hashes of messages are stable): see [`wire`] for framing, [`manifest`] for the
//! manifests and the decision to keep chunk hashes out of them, [`chunk`] for chunk lists,
//! [`messages`] for requests and responses, and the codec module for blob segments.
//! Unknown versions are refused with [`WireError::UnsupportedVersion`].

pub mod bench;
pub mod chunk;
mod codec;
#[doc(hidden)]
pub mod fuzz_harness;
pub mod hash;
pub mod limits;
pub mod manifest;
pub mod messages;
pub mod t5_layout;
pub mod tensor;
pub mod wire;

pub use chunk::{
    BlobAssembler, BlobDescriptor, ChunkError, ChunkList, ChunkListBuilder, ChunkSink,
    FileAssembler, VerifiedBlob, VerifiedFile, chunk_blob,
};
pub use codec::{
    CodecParams, DecodeError, EncodeError, EncodedDelta, EncodedState, EncodedStateIndex,
    ErrorFeedback, MAX_LOW_RANK, ModelState, ParseCodecParamsError, Sparsity, StateCodecParams,
    TensorEncoding, ValueFormat, decode_delta, decode_state, decode_state_file, encode_delta,
    encode_state, encode_state_to,
};
pub use hash::{BlobHash, ChunkHash, ChunkListHash, ModelHash, ParseHashError};
pub use limits::{DEFAULT_CHUNK_SIZE, Limits, MAX_QUANT_BLOCK_SIZE};
pub use manifest::{DeltaManifest, StateManifest, TensorEntry};
pub use messages::{ChunkRequest, ChunkResponse};
pub use tensor::{ModelLayout, Tensor, TensorSet, TensorSetError, TensorSpec};
pub use wire::{FORMAT_VERSION, MessageKind, WireError};

/// The exchange a node uses when none is configured (`meshtune node`, `meshtune-testnet`):
/// the 2% largest entries of each tensor's delta (with error feedback), int8 values, zstd.
pub const DEFAULT_CODEC: &str = "top2%+int8/64+zstd:1";
