//! Byte-level framing shared by every message: magic, version, canonical LEB128 varints,
//! capped length prefixes.
//!
//! Owns: [`WireError`], [`MessageKind`], and the crate-private reader/writer. Every message
//! starts with a 4-byte magic naming its kind and a little-endian `u16` format version;
//! integers are unsigned LEB128 in their shortest form (anything longer is refused, so a
//! message has exactly one encoding and re-encoding a decoded message gives back the same
//! bytes); byte strings are a varint length then the bytes; digests are 32 raw bytes.
//! A message must be consumed exactly: trailing bytes are an error.
//! Must not touch: what the fields mean (see [`crate::manifest`], [`crate::messages`]).

use std::fmt;

/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u16 = 1;

/// Upper bound of a [`crate::ChunkList`] header (magic, version, blob hash, two varints).
pub(crate) const CHUNK_LIST_HEADER_MAX: usize = 4 + 2 + 32 + 10 + 10;

/// Upper bound of the framing around the payload of a [`crate::ChunkResponse`].
pub(crate) const RESPONSE_OVERHEAD_MAX: usize = 4 + 2 + 1 + 32 + 10 + 10;

/// The kinds of message on the wire, each with its own magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// [`crate::DeltaManifest`], gossiped.
    DeltaManifest,
    /// [`crate::StateManifest`], sent on request to late joiners.
    StateManifest,
    /// [`crate::ChunkList`], fetched by its hash.
    ChunkList,
    /// [`crate::ChunkRequest`].
    ChunkRequest,
    /// [`crate::ChunkResponse`].
    ChunkResponse,
}

impl MessageKind {
    /// The four bytes every message of this kind starts with.
    #[must_use]
    pub const fn magic(self) -> [u8; 4] {
        match self {
            Self::DeltaManifest => *b"MTDM",
            Self::StateManifest => *b"MTSM",
            Self::ChunkList => *b"MTCL",
            Self::ChunkRequest => *b"MTRQ",
            Self::ChunkResponse => *b"MTRS",
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::DeltaManifest => "delta manifest",
            Self::StateManifest => "state manifest",
            Self::ChunkList => "chunk list",
            Self::ChunkRequest => "chunk request",
            Self::ChunkResponse => "chunk response",
        })
    }
}

/// A message that does not follow the wire format or breaks one of its invariants.
/// Returned by every `decode`, and by `encode` when the value would be refused by a
/// receiver with the same [`crate::Limits`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The whole message is larger than its cap; nothing was parsed.
    #[error("{kind} of {len} bytes is over the cap of {cap} bytes")]
    MessageTooLarge {
        /// What was being decoded.
        kind: MessageKind,
        /// Its length.
        len: usize,
        /// The cap.
        cap: usize,
    },
    /// The message does not start with the magic of the expected kind.
    #[error("not a {kind}: starts with {found:02x?}")]
    BadMagic {
        /// What was being decoded.
        kind: MessageKind,
        /// The first four bytes found.
        found: [u8; 4],
    },
    /// A format version this build does not know.
    #[error(
        "{kind} has format version {found}, this build only reads version {supported}: \
         upgrade meshtune or ask the sender to downgrade"
    )]
    UnsupportedVersion {
        /// What was being decoded.
        kind: MessageKind,
        /// The version in the message.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// The message ended in the middle of a field.
    #[error("truncated in {field}: needs {needed} more bytes, {remaining} left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes left.
        remaining: usize,
    },
    /// Bytes left after a complete message.
    #[error("{count} bytes left after a complete {kind}")]
    TrailingBytes {
        /// What was decoded.
        kind: MessageKind,
        /// How many bytes were left.
        count: usize,
    },
    /// A length, count or value is over its cap in [`crate::Limits`].
    #[error("{field} is {value}, over the cap of {cap}")]
    OverCap {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The cap.
        cap: u64,
    },
    /// A varint with redundant continuation bytes.
    #[error("{field}: varint is not in its shortest form")]
    NonCanonicalVarint {
        /// The field.
        field: &'static str,
    },
    /// A varint that does not fit in 64 bits.
    #[error("{field}: varint overflows 64 bits")]
    VarintOverflow {
        /// The field.
        field: &'static str,
    },
    /// A string that is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field.
        field: &'static str,
    },
    /// An enum tag or flag combination this version does not define.
    #[error("{field}: unknown tag {tag}")]
    UnknownTag {
        /// The field.
        field: &'static str,
        /// The tag found.
        tag: u64,
    },
    /// A field that is well formed but breaks an invariant of the message.
    #[error("{field}: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// The invariant broken.
        reason: &'static str,
    },
}

pub(crate) fn over_cap(field: &'static str, value: u64, cap: u64) -> WireError {
    WireError::OverCap { field, value, cap }
}

pub(crate) fn invalid(field: &'static str, reason: &'static str) -> WireError {
    WireError::InvalidField { field, reason }
}

/// Reads one message front to back; never allocates.
pub(crate) struct WireReader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> WireReader<'a> {
    /// Checks the size cap, the magic and the version, and positions after them.
    pub(crate) fn open(bytes: &'a [u8], kind: MessageKind, cap: usize) -> Result<Self, WireError> {
        if bytes.len() > cap {
            return Err(WireError::MessageTooLarge {
                kind,
                len: bytes.len(),
                cap,
            });
        }
        let mut reader = Self { bytes, position: 0 };
        let magic: [u8; 4] = reader.array("magic")?;
        if magic != kind.magic() {
            return Err(WireError::BadMagic { kind, found: magic });
        }
        let version = u16::from_le_bytes(reader.array("version")?);
        if version != FORMAT_VERSION {
            return Err(WireError::UnsupportedVersion {
                kind,
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        Ok(reader)
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.position
    }

    pub(crate) fn bytes(&mut self, field: &'static str, len: u64) -> Result<&'a [u8], WireError> {
        let remaining = self.remaining();
        let truncated = WireError::Truncated {
            field,
            needed: len,
            remaining,
        };
        let len = usize::try_from(len).map_err(|_| truncated.clone())?;
        if len > remaining {
            return Err(truncated);
        }
        let start = self.position;
        self.position += len;
        Ok(&self.bytes[start..start + len])
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], WireError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.bytes(field, N as u64)?);
        Ok(array)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.bytes(field, 1)?[0])
    }

    /// Unsigned LEB128, refusing overlong forms and overflow.
    pub(crate) fn varint(&mut self, field: &'static str) -> Result<u64, WireError> {
        let mut value = 0u64;
        let mut shift = 0u32;
        loop {
            let byte = self.u8(field)?;
            if shift == 63 && byte > 1 {
                return Err(WireError::VarintOverflow { field });
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                if byte == 0 && shift > 0 {
                    return Err(WireError::NonCanonicalVarint { field });
                }
                return Ok(value);
            }
            shift += 7;
        }
    }

    /// A varint that must be at most `cap`.
    pub(crate) fn varint_capped(
        &mut self,
        field: &'static str,
        cap: u64,
    ) -> Result<u64, WireError> {
        let value = self.varint(field)?;
        if value > cap {
            return Err(over_cap(field, value, cap));
        }
        Ok(value)
    }

    /// A count or length that must be at most `cap`, as a `usize`.
    pub(crate) fn len_capped(
        &mut self,
        field: &'static str,
        cap: usize,
    ) -> Result<usize, WireError> {
        let value = self.varint_capped(field, cap as u64)?;
        usize::try_from(value).map_err(|_| over_cap(field, value, cap as u64))
    }

    /// A length-prefixed byte string of at most `cap` bytes.
    pub(crate) fn byte_string(
        &mut self,
        field: &'static str,
        cap: usize,
    ) -> Result<&'a [u8], WireError> {
        let len = self.len_capped(field, cap)?;
        self.bytes(field, len as u64)
    }

    /// A length-prefixed UTF-8 string of at most `cap` bytes.
    pub(crate) fn string(&mut self, field: &'static str, cap: usize) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.byte_string(field, cap)?)
            .map_err(|_| WireError::InvalidUtf8 { field })
    }

    /// Fails unless every byte was consumed.
    pub(crate) fn finish(self, kind: MessageKind) -> Result<(), WireError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(WireError::TrailingBytes { kind, count }),
        }
    }
}

/// Writes one message; the counterpart of [`WireReader`].
pub(crate) struct WireWriter {
    bytes: Vec<u8>,
}

impl WireWriter {
    pub(crate) fn new(kind: MessageKind) -> Self {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(&kind.magic());
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        Self { bytes }
    }

    pub(crate) fn u8(&mut self, value: u8) {
        self.bytes.push(value);
    }

    pub(crate) fn raw(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }

    pub(crate) fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.bytes.push((value as u8 & 0x7f) | 0x80);
            value >>= 7;
        }
        self.bytes.push(value as u8);
    }

    pub(crate) fn byte_string(&mut self, bytes: &[u8]) {
        self.varint(bytes.len() as u64);
        self.raw(bytes);
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reader(payload: &[u8]) -> (Vec<u8>, MessageKind) {
        let mut writer = WireWriter::new(MessageKind::ChunkRequest);
        writer.raw(payload);
        (writer.into_bytes(), MessageKind::ChunkRequest)
    }

    proptest! {
        #[test]
        fn varint_round_trips(value: u64) {
            let mut writer = WireWriter::new(MessageKind::ChunkList);
            writer.varint(value);
            let bytes = writer.into_bytes();
            let mut reader = WireReader::open(&bytes, MessageKind::ChunkList, 64).expect("header");
            prop_assert_eq!(reader.varint("v").expect("varint"), value);
            prop_assert!(reader.finish(MessageKind::ChunkList).is_ok());
        }

        #[test]
        fn any_accepted_varint_is_canonical(payload in proptest::collection::vec(any::<u8>(), 0..12)) {
            let (bytes, kind) = reader(&payload);
            let mut reader = WireReader::open(&bytes, kind, 64).expect("header");
            if let Ok(value) = reader.varint("v") {
                let consumed = payload.len() - reader.remaining();
                let mut writer = WireWriter::new(kind);
                writer.varint(value);
                prop_assert_eq!(&writer.into_bytes()[6..], &payload[..consumed]);
            }
        }
    }

    #[test]
    fn refuses_overlong_and_overflowing_varints() {
        let (bytes, kind) = reader(&[0x80, 0x00]);
        let mut r = WireReader::open(&bytes, kind, 64).expect("header");
        assert_eq!(
            r.varint("v"),
            Err(WireError::NonCanonicalVarint { field: "v" })
        );
        let (bytes, kind) = reader(&[0xff; 9].iter().copied().chain([0x02]).collect::<Vec<_>>());
        let mut r = WireReader::open(&bytes, kind, 64).expect("header");
        assert_eq!(r.varint("v"), Err(WireError::VarintOverflow { field: "v" }));
        let (bytes, kind) = reader(&[0xff; 9].iter().copied().chain([0x01]).collect::<Vec<_>>());
        let mut r = WireReader::open(&bytes, kind, 64).expect("header");
        assert_eq!(r.varint("v"), Ok(u64::MAX));
    }

    #[test]
    fn refuses_unknown_version_and_magic() {
        let mut bytes = MessageKind::ChunkList.magic().to_vec();
        bytes.extend_from_slice(&7u16.to_le_bytes());
        let error = WireReader::open(&bytes, MessageKind::ChunkList, 64).err();
        assert_eq!(
            error,
            Some(WireError::UnsupportedVersion {
                kind: MessageKind::ChunkList,
                found: 7,
                supported: FORMAT_VERSION
            })
        );
        let message = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("version 7"), "{message}");
        assert!(matches!(
            WireReader::open(&bytes, MessageKind::DeltaManifest, 64),
            Err(WireError::BadMagic { .. })
        ));
        assert!(matches!(
            WireReader::open(&bytes, MessageKind::ChunkList, 3),
            Err(WireError::MessageTooLarge { .. })
        ));
    }
}
