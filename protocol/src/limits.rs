//! Caps on everything a peer can make us parse or allocate.
//!
//! Owns: [`Limits`], the single place where sizes of hostile input are bounded. Every
//! length or count read from the network is compared with a field of [`Limits`] before a
//! single byte is allocated for it. Must not touch: the parsing itself.

/// Default chunk size of a blob: 1 MiB, small enough to retry cheaply on a flaky link and
/// to pull one blob from several peers at once.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;

/// Largest quantization block a decoder accepts (per-block scale, see
/// [`crate::ValueFormat`]).
pub const MAX_QUANT_BLOCK_SIZE: u32 = 1 << 20;

/// Caps on decoded messages and blobs. The defaults fit a 3B-parameter model with its
/// optimizer state; a node may tighten them (e.g. `max_total_elements` to its own model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded delta manifest (gossiped: gossipsub's default `max_transmit_size`
    /// is 64 KiB).
    pub max_manifest_bytes: usize,
    /// Largest encoded state manifest (sent over request/response, and with optimizer
    /// state it indexes two to three times as many tensors as a delta).
    pub max_state_manifest_bytes: usize,
    /// Most tensors in one manifest (a delta, or each half of a state).
    pub max_tensors: usize,
    /// Longest tensor name, in bytes.
    pub max_name_len: usize,
    /// Most dimensions of one tensor.
    pub max_dims: usize,
    /// Most elements of one tensor (sparse indices are `u32`, so at most `u32::MAX`).
    pub max_tensor_elements: u64,
    /// Most elements over all tensors of one manifest.
    pub max_total_elements: u64,
    /// Largest blob.
    pub max_blob_size: u64,
    /// Largest chunk.
    pub max_chunk_size: u32,
    /// Most chunks of one blob (bounds the [`crate::ChunkList`]).
    pub max_chunks: u64,
    /// Longest mesh id, in bytes.
    pub max_mesh_id_len: usize,
    /// Longest sender id (opaque peer id bytes).
    pub max_sender_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_manifest_bytes: 64 * 1024,
            max_state_manifest_bytes: 1024 * 1024,
            max_tensors: 4096,
            max_name_len: 256,
            max_dims: 8,
            max_tensor_elements: 1 << 31,
            max_total_elements: 1 << 34,
            max_blob_size: 1 << 36,
            max_chunk_size: 16 << 20,
            max_chunks: 1 << 16,
            max_mesh_id_len: 64,
            max_sender_len: 128,
        }
    }
}

impl Limits {
    /// Largest encoded [`crate::ChunkList`] these limits admit.
    #[must_use]
    pub fn max_chunk_list_bytes(&self) -> usize {
        let hashes = usize::try_from(self.max_chunks)
            .unwrap_or(usize::MAX)
            .saturating_mul(crate::hash::HASH_LEN);
        hashes.saturating_add(crate::wire::CHUNK_LIST_HEADER_MAX)
    }

    /// Largest encoded [`crate::ChunkResponse`] these limits admit: what a request/response
    /// codec should cap a read at.
    #[must_use]
    pub fn max_response_bytes(&self) -> usize {
        let chunk = self.max_chunk_size as usize;
        chunk
            .max(self.max_chunk_list_bytes())
            .max(self.max_manifest_bytes)
            .max(self.max_state_manifest_bytes)
            .saturating_add(crate::wire::RESPONSE_OVERHEAD_MAX)
    }
}
