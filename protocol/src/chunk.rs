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
    /// Reading or writing the file a blob is streamed to failed.
    #[error("blob file: {0}")]
    Storage(String),
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
        let range = check_chunk(&self.chunk_list, &self.received, index, chunk)?;
        self.bytes[range.start as usize..range.end as usize].copy_from_slice(chunk);
        self.received[index as usize] = true;
        self.missing -= 1;
        Ok(())
    }

    /// Chunks not received yet, with the hash each must have.
    pub fn missing_chunks(&self) -> impl Iterator<Item = (u64, ChunkHash)> + '_ {
        missing_chunks(&self.chunk_list, &self.received)
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

/// Checks chunk `index` against `list` (index, not received yet, length, hash): the byte range
/// it fills.
fn check_chunk(
    list: &ChunkList,
    received: &[bool],
    index: u64,
    chunk: &[u8],
) -> Result<Range<u64>, ChunkError> {
    let count = list.chunk_count();
    let range = list
        .chunk_range(index)
        .ok_or(ChunkError::IndexOutOfRange { index, count })?;
    // index < count <= received.len(), so these conversions are exact.
    let slot = index as usize;
    if received[slot] {
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
    let wanted = list.chunk_hashes[slot];
    if hash != wanted {
        return Err(ChunkError::ChunkHashMismatch {
            index,
            expected: wanted,
            found: hash,
        });
    }
    Ok(range)
}

fn missing_chunks<'a>(
    list: &'a ChunkList,
    received: &'a [bool],
) -> impl Iterator<Item = (u64, ChunkHash)> + 'a {
    received
        .iter()
        .zip(&list.chunk_hashes)
        .enumerate()
        .filter(|(_, (received, _))| !**received)
        .map(|(index, (_, &hash))| (index as u64, hash))
}

/// Where fetched chunks go: memory ([`BlobAssembler`]) or a file ([`FileAssembler`]).
pub trait ChunkSink {
    /// Checks and stores chunk `index`; on error nothing is stored.
    fn accept(&mut self, index: u64, chunk: &[u8]) -> Result<(), ChunkError>;
    /// Chunks still missing, with their hashes.
    fn missing(&self) -> Vec<(u64, ChunkHash)>;
    /// Whether every chunk arrived.
    fn complete(&self) -> bool;
}

impl ChunkSink for BlobAssembler {
    fn accept(&mut self, index: u64, chunk: &[u8]) -> Result<(), ChunkError> {
        self.accept_chunk(index, chunk)
    }
    fn missing(&self) -> Vec<(u64, ChunkHash)> {
        self.missing_chunks().collect()
    }
    fn complete(&self) -> bool {
        self.is_complete()
    }
}

/// A [`ChunkList`] computed while a blob is written piece by piece (e.g. a state encoded
/// straight to a file): the same list [`chunk_blob`] gives for the whole blob.
#[derive(Debug)]
pub struct ChunkListBuilder {
    chunk_size: u32,
    blob: blake3::Hasher,
    chunk: blake3::Hasher,
    in_chunk: u64,
    size: u64,
    hashes: Vec<ChunkHash>,
}

impl ChunkListBuilder {
    pub fn new(chunk_size: u32) -> Result<Self, ChunkError> {
        if chunk_size == 0 {
            return Err(ChunkError::ZeroChunkSize);
        }
        Ok(Self {
            chunk_size,
            blob: blake3::Hasher::new(),
            chunk: blake3::Hasher::new(),
            in_chunk: 0,
            size: 0,
            hashes: Vec::new(),
        })
    }

    /// The next bytes of the blob.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.blob.update(bytes);
        self.size += bytes.len() as u64;
        while !bytes.is_empty() {
            let room = u64::from(self.chunk_size) - self.in_chunk;
            let take = bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            self.chunk.update(&bytes[..take]);
            self.in_chunk += take as u64;
            bytes = &bytes[take..];
            if self.in_chunk == u64::from(self.chunk_size) {
                self.hashes.push(self.chunk.finalize().into());
                self.chunk.reset();
                self.in_chunk = 0;
            }
        }
    }

    #[must_use]
    pub fn finish(mut self) -> ChunkList {
        if self.in_chunk > 0 {
            self.hashes.push(self.chunk.finalize().into());
        }
        ChunkList {
            blob_hash: self.blob.finalize().into(),
            blob_size: self.size,
            chunk_size: self.chunk_size,
            chunk_hashes: self.hashes,
        }
    }
}

/// A blob on disk whose every byte was checked against its hash; read it with
/// [`VerifiedFile::read_at`]. Large states live here instead of in memory.
#[derive(Debug)]
pub struct VerifiedFile {
    hash: BlobHash,
    size: u64,
    file: std::fs::File,
}

impl VerifiedFile {
    /// Hashes `file` (streaming, 4 MiB at a time) and checks it against `list`'s blob hash
    /// and size.
    pub fn verify(file: std::fs::File, list: &ChunkList) -> Result<Self, ChunkError> {
        let storage = |err: std::io::Error| ChunkError::Storage(err.to_string());
        let size = file.metadata().map_err(storage)?.len();
        if size != list.blob_size {
            return Err(ChunkError::Storage(format!(
                "the file holds {size} bytes, the blob has {}",
                list.blob_size
            )));
        }
        let mut hasher = blake3::Hasher::new();
        let mut buffer = vec![0u8; 4 << 20];
        let mut offset = 0u64;
        while offset < size {
            let len = usize::try_from((size - offset).min(buffer.len() as u64)).unwrap_or(0);
            read_exact_at(&file, &mut buffer[..len], offset).map_err(storage)?;
            hasher.update(&buffer[..len]);
            offset += len as u64;
        }
        let found: BlobHash = hasher.finalize().into();
        if found != list.blob_hash {
            return Err(ChunkError::BlobHashMismatch {
                expected: list.blob_hash,
                found,
            });
        }
        Ok(Self {
            hash: found,
            size,
            file,
        })
    }

    /// A file this process has just written together with `list` (e.g. by
    /// [`crate::encode_state_to`], which hashed every byte on the way out): trusted without
    /// reading it back, except for its size.
    pub fn written(file: std::fs::File, list: &ChunkList) -> Result<Self, ChunkError> {
        let size = file
            .metadata()
            .map_err(|err| ChunkError::Storage(err.to_string()))?
            .len();
        if size != list.blob_size {
            return Err(ChunkError::Storage(format!(
                "the file holds {size} bytes, the blob has {}",
                list.blob_size
            )));
        }
        Ok(Self {
            hash: list.blob_hash,
            size,
            file,
        })
    }

    #[must_use]
    pub fn hash(&self) -> BlobHash {
        self.hash
    }

    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fills `buffer` from byte `offset` of the blob.
    pub fn read_at(&self, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
        read_exact_at(&self.file, buffer, offset)
    }
}

#[cfg(unix)]
fn read_exact_at(file: &std::fs::File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buffer, offset)
}

#[cfg(unix)]
fn write_all_at(file: &std::fs::File, buffer: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buffer, offset)
}

#[cfg(not(unix))]
fn read_exact_at(file: &std::fs::File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buffer.len() {
        let n = std::os::windows::fs::FileExt::seek_read(
            file,
            &mut buffer[done..],
            offset + done as u64,
        )?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        done += n;
    }
    Ok(())
}

#[cfg(not(unix))]
fn write_all_at(file: &std::fs::File, buffer: &[u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buffer.len() {
        done +=
            std::os::windows::fs::FileExt::seek_write(file, &buffer[done..], offset + done as u64)?;
    }
    Ok(())
}

/// [`BlobAssembler`] writing into a file instead of memory: memory stays at one chunk
/// whatever the blob's size (a 3B-parameter state is 12 GB).
#[derive(Debug)]
pub struct FileAssembler {
    chunk_list: ChunkList,
    file: std::fs::File,
    received: Vec<bool>,
    missing: u64,
}

impl FileAssembler {
    /// Sizes `file` (created empty by the caller) for the blob of `chunk_list`, which must be
    /// within `limits`.
    pub fn new(
        chunk_list: ChunkList,
        limits: &Limits,
        file: std::fs::File,
    ) -> Result<Self, ChunkError> {
        check_chunking(chunk_list.blob_size, chunk_list.chunk_size, limits)?;
        file.set_len(chunk_list.blob_size)
            .map_err(|err| ChunkError::Storage(err.to_string()))?;
        let count = chunk_list.chunk_hashes.len();
        Ok(Self {
            received: vec![false; count],
            missing: count as u64,
            chunk_list,
            file,
        })
    }

    /// The blob file, once every chunk arrived and the whole file hashes to the blob's hash.
    pub fn finish(self) -> Result<VerifiedFile, ChunkError> {
        if self.missing > 0 {
            return Err(ChunkError::Incomplete {
                missing: self.missing,
            });
        }
        VerifiedFile::verify(self.file, &self.chunk_list)
    }
}

impl ChunkSink for FileAssembler {
    fn accept(&mut self, index: u64, chunk: &[u8]) -> Result<(), ChunkError> {
        let range = check_chunk(&self.chunk_list, &self.received, index, chunk)?;
        write_all_at(&self.file, chunk, range.start)
            .map_err(|err| ChunkError::Storage(err.to_string()))?;
        self.received[index as usize] = true;
        self.missing -= 1;
        Ok(())
    }
    fn missing(&self) -> Vec<(u64, ChunkHash)> {
        missing_chunks(&self.chunk_list, &self.received).collect()
    }
    fn complete(&self) -> bool {
        self.missing == 0
    }
}

#[cfg(test)]
mod streaming_tests {
    use super::*;

    #[test]
    fn a_chunk_list_built_piece_by_piece_equals_the_whole_blob_list() {
        let blob: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for chunk_size in [1u32, 7, 1000, 4096, 20_000] {
            let whole = chunk_blob(&blob, chunk_size).expect("chunks");
            for piece in [1usize, 3, 999, 10_000] {
                let mut builder = ChunkListBuilder::new(chunk_size).expect("builder");
                for part in blob.chunks(piece) {
                    builder.update(part);
                }
                assert_eq!(builder.finish(), whole, "chunk {chunk_size}, piece {piece}");
            }
        }
        assert!(matches!(
            ChunkListBuilder::new(0),
            Err(ChunkError::ZeroChunkSize)
        ));
    }

    #[test]
    fn a_file_assembler_checks_each_chunk_and_the_whole_file() {
        let blob: Vec<u8> = (0..5_000u32).map(|i| (i % 253) as u8).collect();
        let list = chunk_blob(&blob, 1024).expect("chunks");
        let dir = tempfile::tempdir().expect("tmp");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("blob"))
            .expect("file");
        let mut sink = FileAssembler::new(list.clone(), &Limits::default(), file).expect("sink");
        // A wrong chunk is refused and stays missing.
        assert!(matches!(
            sink.accept(1, &blob[..1024]),
            Err(ChunkError::ChunkHashMismatch { index: 1, .. })
        ));
        for index in (0..list.chunk_count()).rev() {
            let range = list.chunk_range(index).expect("range");
            sink.accept(index, &blob[range.start as usize..range.end as usize])
                .expect("chunk");
        }
        assert!(sink.complete() && sink.missing().is_empty());
        let verified = sink.finish().expect("verified");
        assert_eq!(
            (verified.hash(), verified.size()),
            (list.blob_hash(), 5_000)
        );
        let mut back = vec![0u8; 100];
        verified.read_at(&mut back, 4_900).expect("read");
        assert_eq!(back, blob[4_900..]);
    }
}
