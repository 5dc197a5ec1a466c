//! Blobs in hashed chunks: cutting a blob up, listing its chunk hashes, and putting it back
//! together from chunks that arrive in any order from any peer.
//!
//! Owns: [`BlobDescriptor`] (what a manifest says about its blob), [`ChunkList`] (the
//! chunk hashes, fetched separately by their own hash, see [`crate::manifest`] for why),
//! [`BlobAssembler`], and [`VerifiedBlob`], the only form in which the codec accepts a
//! blob, so that no code path decodes bytes whose whole-blob hash was not checked.
//! Must not touch: what is inside the blob.
//!
//! Chunk `i` covers bytes `[i * chunk_size, min((i + 1) * chunk_size, blob_size))`; every
//! chunk but the last is exactly `chunk_size` bytes. A chunk list is
//! `"MTCL" version blob_hash blob_size chunk_size hash_0 .. hash_{n-1}` with
//! `n = ceil(blob_size / chunk_size)`.

use std::ops::Range;

use crate::hash::{BlobHash, ChunkHash, ChunkListHash, HASH_LEN};
use crate::limits::Limits;
use crate::wire::{MessageKind, WireError, WireReader, WireWriter, invalid, over_cap};

/// What a manifest says about its blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobDescriptor {
    /// blake3 of the whole blob.
    pub blob_hash: BlobHash,
    /// Bytes in the blob.
    pub blob_size: u64,
    /// Bytes per chunk (the last may be shorter).
    pub chunk_size: u32,
    /// Hash of the blob's [`ChunkList`]; fetch the list by this hash.
    pub chunk_list_hash: ChunkListHash,
}

impl BlobDescriptor {
    /// Number of chunks.
    #[must_use]
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.blob_size, self.chunk_size)
    }

    /// Checks the caps of `limits`.
    pub fn validate(&self, limits: &Limits) -> Result<(), WireError> {
        check_chunking(self.blob_size, self.chunk_size, limits)
    }
}

fn chunk_count(blob_size: u64, chunk_size: u32) -> u64 {
    if chunk_size == 0 {
        return 0;
    }
    blob_size.div_ceil(u64::from(chunk_size))
}

fn check_chunking(blob_size: u64, chunk_size: u32, limits: &Limits) -> Result<(), WireError> {
    if blob_size > limits.max_blob_size {
        return Err(over_cap("blob size", blob_size, limits.max_blob_size));
    }
    if chunk_size == 0 {
        return Err(invalid("chunk size", "is zero"));
    }
    if chunk_size > limits.max_chunk_size {
        return Err(over_cap(
            "chunk size",
            u64::from(chunk_size),
            u64::from(limits.max_chunk_size),
        ));
    }
    let count = chunk_count(blob_size, chunk_size);
    if count > limits.max_chunks {
        return Err(over_cap("chunk count", count, limits.max_chunks));
    }
    Ok(())
}

/// A chunk or blob that is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// A chunk size of zero.
    #[error("chunk size must be at least 1 byte")]
    ZeroChunkSize,
    /// The blob, its chunking or its chunk list is over a cap of [`Limits`] or malformed.
    #[error("invalid chunk list: {0}")]
    InvalidChunkList(#[from] WireError),
    /// The chunk list does not hash to what the manifest names.
    #[error("chunk list hashes to {found}, manifest names {expected}")]
    ChunkListHashMismatch {
        /// Hash in the manifest.
        expected: ChunkListHash,
        /// Hash of the list received.
        found: ChunkListHash,
    },
    /// The chunk list describes another blob than the manifest.
    #[error("chunk list does not match the manifest's {field}")]
    ChunkListMismatch {
        /// The differing field.
        field: &'static str,
    },
    /// A chunk index past the last chunk.
    #[error("chunk {index} does not exist (the blob has {count} chunks)")]
    IndexOutOfRange {
        /// Index received.
        index: u64,
        /// Number of chunks.
        count: u64,
    },
    /// A chunk already received.
    #[error("chunk {index} was already received")]
    Duplicate {
        /// Its index.
        index: u64,
    },
    /// A chunk shorter than its place in the blob.
    #[error("chunk {index} is truncated: {found} bytes, expected {expected}")]
    Truncated {
        /// Its index.
        index: u64,
        /// Expected length.
        expected: u64,
        /// Length received.
        found: u64,
    },
    /// A chunk longer than its place in the blob.
    #[error("chunk {index} is oversized: {found} bytes, expected {expected}")]
    Oversized {
        /// Its index.
        index: u64,
        /// Expected length.
        expected: u64,
        /// Length received.
        found: u64,
    },
    /// A chunk whose hash is not the one in the chunk list.
    #[error("chunk {index} hashes to {found}, expected {expected}")]
    ChunkHashMismatch {
        /// Its index.
        index: u64,
        /// Hash in the chunk list.
        expected: ChunkHash,
        /// Hash of the bytes received.
        found: ChunkHash,
    },
    /// `finish` before every chunk arrived.
    #[error("{missing} chunks are still missing")]
    Incomplete {
        /// How many.
        missing: u64,
    },
    /// A blob of another size than announced.
    #[error("blob is {found} bytes, expected {expected}")]
    BlobSizeMismatch {
        /// Announced size.
        expected: u64,
        /// Actual size.
        found: u64,
    },
    /// The assembled or given blob does not hash to the announced blob hash.
    #[error("blob hashes to {found}, expected {expected}")]
    BlobHashMismatch {
        /// Announced hash.
        expected: BlobHash,
        /// Hash of the bytes.
        found: BlobHash,
    },
}

/// The hashes of every chunk of one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkList {
    blob_hash: BlobHash,
    blob_size: u64,
    chunk_size: u32,
    chunk_hashes: Vec<ChunkHash>,
}

/// Cuts `blob` into chunks of `chunk_size` bytes and hashes each one and the whole blob.
pub fn chunk_blob(blob: &[u8], chunk_size: u32) -> Result<ChunkList, ChunkError> {
    if chunk_size == 0 {
        return Err(ChunkError::ZeroChunkSize);
    }
    let chunk_hashes = blob
        .chunks(chunk_size as usize)
        .map(ChunkHash::of_bytes)
        .collect();
    Ok(ChunkList {
        blob_hash: BlobHash::of_bytes(blob),
        blob_size: blob.len() as u64,
        chunk_size,
        chunk_hashes,
    })
}

impl ChunkList {
    /// blake3 of the whole blob.
    #[must_use]
    pub fn blob_hash(&self) -> BlobHash {
        self.blob_hash
    }

    /// Bytes in the blob.
    #[must_use]
    pub fn blob_size(&self) -> u64 {
        self.blob_size
    }

    /// Bytes per chunk.
    #[must_use]
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Hash of each chunk, in order.
    #[must_use]
    pub fn chunk_hashes(&self) -> &[ChunkHash] {
        &self.chunk_hashes
    }

    /// Number of chunks.
    #[must_use]
    pub fn chunk_count(&self) -> u64 {
        self.chunk_hashes.len() as u64
    }

    /// Byte range of chunk `index` in the blob.
    #[must_use]
    pub fn chunk_range(&self, index: u64) -> Option<Range<u64>> {
        if index >= self.chunk_count() {
            return None;
        }
        let start = index * u64::from(self.chunk_size);
        Some(start..(start + u64::from(self.chunk_size)).min(self.blob_size))
    }

    /// Chunk `index` of `blob` (which this list was made from), for serving a request.
    #[must_use]
    pub fn chunk<'blob>(&self, blob: &'blob [u8], index: u64) -> Option<&'blob [u8]> {
        let range = self.chunk_range(index)?;
        blob.get(usize::try_from(range.start).ok()?..usize::try_from(range.end).ok()?)
    }

    /// The descriptor to put in a manifest.
    #[must_use]
    pub fn descriptor(&self) -> BlobDescriptor {
        BlobDescriptor {
            blob_hash: self.blob_hash,
            blob_size: self.blob_size,
            chunk_size: self.chunk_size,
            chunk_list_hash: self.hash(),
        }
    }

    /// Hash of the encoded list: its address.
    #[must_use]
    pub fn hash(&self) -> ChunkListHash {
        ChunkListHash::of_bytes(&self.encode())
    }

    /// The wire form. Infallible: a list is only made by [`chunk_blob`] or
    /// [`ChunkList::decode`].
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = WireWriter::new(MessageKind::ChunkList);
        writer.raw(self.blob_hash.as_bytes());
        writer.varint(self.blob_size);
        writer.varint(u64::from(self.chunk_size));
        for hash in &self.chunk_hashes {
            writer.raw(hash.as_bytes());
        }
        writer.into_bytes()
    }

    /// Decodes a list, checking its caps before allocating.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Self, WireError> {
        let kind = MessageKind::ChunkList;
        let mut reader = WireReader::open(bytes, kind, limits.max_chunk_list_bytes())?;
        let blob_hash = BlobHash(reader.array("blob hash")?);
        let blob_size = reader.varint_capped("blob size", limits.max_blob_size)?;
        let chunk_size =
            reader.varint_capped("chunk size", u64::from(limits.max_chunk_size))? as u32;
        check_chunking(blob_size, chunk_size, limits)?;
        let count = chunk_count(blob_size, chunk_size);
        let needed = count * HASH_LEN as u64;
        if needed != reader.remaining() as u64 {
            return Err(if needed > reader.remaining() as u64 {
                WireError::Truncated {
                    field: "chunk hashes",
                    needed,
                    remaining: reader.remaining(),
                }
            } else {
                WireError::TrailingBytes {
                    kind,
                    count: reader.remaining() - needed as usize,
                }
            });
        }
        let mut chunk_hashes = Vec::with_capacity(count as usize);
        for _ in 0..count {
            chunk_hashes.push(ChunkHash(reader.array("chunk hash")?));
        }
        reader.finish(kind)?;
        Ok(Self {
            blob_hash,
            blob_size,
            chunk_size,
            chunk_hashes,
        })
    }

    /// Checks that this list is the one `descriptor` names.
    pub fn verify_against(&self, descriptor: &BlobDescriptor) -> Result<(), ChunkError> {
        let found = self.hash();
        if found != descriptor.chunk_list_hash {
            return Err(ChunkError::ChunkListHashMismatch {
                expected: descriptor.chunk_list_hash,
                found,
            });
        }
        // The hash covers these fields, so they can only differ if the sender lied.
        if self.blob_hash != descriptor.blob_hash {
            return Err(ChunkError::ChunkListMismatch { field: "blob hash" });
        }
        if self.blob_size != descriptor.blob_size {
            return Err(ChunkError::ChunkListMismatch { field: "blob size" });
        }
        if self.chunk_size != descriptor.chunk_size {
            return Err(ChunkError::ChunkListMismatch {
                field: "chunk size",
            });
        }
        Ok(())
    }
}

/// A blob whose bytes hash to `hash`: checked on construction, immutable after.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifiedBlob {
    hash: BlobHash,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for VerifiedBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedBlob")
            .field("hash", &self.hash)
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl VerifiedBlob {
    /// Checks `bytes` against the size and hash of `descriptor` (e.g. a blob the node made
    /// itself or read back from disk).
    pub fn verify(bytes: Vec<u8>, descriptor: &BlobDescriptor) -> Result<Self, ChunkError> {
        if bytes.len() as u64 != descriptor.blob_size {
            return Err(ChunkError::BlobSizeMismatch {
                expected: descriptor.blob_size,
                found: bytes.len() as u64,
            });
        }
        let found = BlobHash::of_bytes(&bytes);
        if found != descriptor.blob_hash {
            return Err(ChunkError::BlobHashMismatch {
                expected: descriptor.blob_hash,
                found,
            });
        }
        Ok(Self { hash: found, bytes })
    }

    /// The verified hash.
    #[must_use]
    pub fn hash(&self) -> BlobHash {
        self.hash
    }

    /// The bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The bytes, giving up the proof.
    #[must_use]
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// Puts a blob together from chunks arriving in any order. Each chunk is checked (index,
/// length, hash) on arrival and refused whole if anything is off; the whole-blob hash is
/// checked by [`BlobAssembler::finish`].
pub struct BlobAssembler {
    chunk_list: ChunkList,
    bytes: Vec<u8>,
    received: Vec<bool>,
    missing: u64,
}

impl std::fmt::Debug for BlobAssembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobAssembler")
            .field("blob_hash", &self.chunk_list.blob_hash)
            .field("chunks", &self.chunk_list.chunk_count())
            .field("missing", &self.missing)
            .finish()
    }
}

impl BlobAssembler {
    /// An assembler for the blob of `chunk_list`, which must be within `limits` (checked
    /// before the blob's buffer is allocated).
    pub fn new(chunk_list: ChunkList, limits: &Limits) -> Result<Self, ChunkError> {
        check_chunking(chunk_list.blob_size, chunk_list.chunk_size, limits)?;
        let size = usize::try_from(chunk_list.blob_size)
            .map_err(|_| over_cap("blob size", chunk_list.blob_size, usize::MAX as u64))?;
        let count = chunk_list.chunk_hashes.len();
        Ok(Self {
            bytes: vec![0; size],
            received: vec![false; count],
            missing: count as u64,
            chunk_list,
        })
    }

    /// Takes chunk `index`. On error nothing is stored and the chunk can be asked for again
    /// (from another peer).
    pub fn accept_chunk(&mut self, index: u64, chunk: &[u8]) -> Result<(), ChunkError> {
        let count = self.chunk_list.chunk_count();
        let range = self
            .chunk_list
            .chunk_range(index)
            .ok_or(ChunkError::IndexOutOfRange { index, count })?;
        // index < count <= received.len(), so these conversions are exact.
        let slot = index as usize;
        if self.received[slot] {
            return Err(ChunkError::Duplicate { index });
        }
        let expected = range.end - range.start;
        let found = chunk.len() as u64;
        if found < expected {
            return Err(ChunkError::Truncated {
                index,
                expected,
                found,
            });
        }
        if found > expected {
            return Err(ChunkError::Oversized {
                index,
                expected,
                found,
            });
        }
        let hash = ChunkHash::of_bytes(chunk);
        let wanted = self.chunk_list.chunk_hashes[slot];
        if hash != wanted {
            return Err(ChunkError::ChunkHashMismatch {
                index,
                expected: wanted,
                found: hash,
            });
        }
        self.bytes[range.start as usize..range.end as usize].copy_from_slice(chunk);
        self.received[slot] = true;
        self.missing -= 1;
        Ok(())
    }

    /// Chunks not received yet, with the hash each must have.
    pub fn missing_chunks(&self) -> impl Iterator<Item = (u64, ChunkHash)> + '_ {
        self.received
            .iter()
            .zip(&self.chunk_list.chunk_hashes)
            .enumerate()
            .filter(|(_, (received, _))| !**received)
            .map(|(index, (_, &hash))| (index as u64, hash))
    }

    /// Number of chunks not received yet.
    #[must_use]
    pub fn missing_count(&self) -> u64 {
        self.missing
    }

    /// Whether every chunk was received.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.missing == 0
    }

    /// The chunk list being assembled.
    #[must_use]
    pub fn chunk_list(&self) -> &ChunkList {
        &self.chunk_list
    }

    /// The blob, once every chunk arrived and the whole-blob hash matches.
    pub fn finish(self) -> Result<VerifiedBlob, ChunkError> {
        if self.missing > 0 {
            return Err(ChunkError::Incomplete {
                missing: self.missing,
            });
        }
        let found = BlobHash::of_bytes(&self.bytes);
        if found != self.chunk_list.blob_hash {
            return Err(ChunkError::BlobHashMismatch {
                expected: self.chunk_list.blob_hash,
                found,
            });
        }
        Ok(VerifiedBlob {
            hash: found,
            bytes: self.bytes,
        })
    }
}
