//! 32-byte blake3 digests, one newtype per thing hashed, so a chunk hash can never be
//! passed where a blob hash is expected.
//!
//! Owns: the digest newtypes, their hex `Display`/`FromStr`, and the canonical
//! [`ModelHash`] of a tensor set. Must not touch: wire framing (see [`crate::wire`]).

use std::fmt;
use std::str::FromStr;

use crate::tensor::TensorSet;

/// Length of every digest in this crate (blake3 default output).
pub const HASH_LEN: usize = 32;

/// A hex string that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected {HASH_LEN} bytes as {} hex digits, got {length} characters (or a non-hex digit)", HASH_LEN * 2)]
pub struct ParseHashError {
    /// Number of characters in the rejected string.
    pub length: usize,
}

macro_rules! digest_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub [u8; HASH_LEN]);

        impl $name {
            /// blake3 of `bytes`.
            #[must_use]
            pub fn of_bytes(bytes: &[u8]) -> Self {
                Self(*blake3::hash(bytes).as_bytes())
            }

            /// The raw digest.
            #[must_use]
            pub fn as_bytes(&self) -> &[u8; HASH_LEN] {
                &self.0
            }
        }

        impl From<blake3::Hash> for $name {
            fn from(hash: blake3::Hash) -> Self {
                Self(*hash.as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                for byte in &self.0 {
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(", stringify!($name))?;
                for byte in &self.0[..8] {
                    write!(f, "{byte:02x}")?;
                }
                write!(f, "…)")
            }
        }

        impl FromStr for $name {
            type Err = ParseHashError;

            fn from_str(hex: &str) -> Result<Self, Self::Err> {
                parse_hex_digest(hex).map(Self)
            }
        }
    };
}

digest_newtype!(
    /// Canonical hash of a model's weights ([`ModelHash::of_tensors`]); names the base a
    /// delta applies to.
    ModelHash
);
digest_newtype!(
    /// blake3 of a whole encoded blob.
    BlobHash
);
digest_newtype!(
    /// blake3 of one chunk of a blob.
    ChunkHash
);
digest_newtype!(
    /// blake3 of an encoded [`crate::ChunkList`]; the list is fetched by this hash.
    ChunkListHash
);

fn parse_hex_digest(hex: &str) -> Result<[u8; HASH_LEN], ParseHashError> {
    let error = ParseHashError { length: hex.len() };
    let digits = hex.as_bytes();
    if digits.len() != HASH_LEN * 2 {
        return Err(error);
    }
    let mut digest = [0u8; HASH_LEN];
    for (byte, pair) in digest.iter_mut().zip(digits.chunks_exact(2)) {
        let high = hex_value(pair[0]).ok_or(error.clone())?;
        let low = hex_value(pair[1]).ok_or(error.clone())?;
        *byte = (high << 4) | low;
    }
    Ok(digest)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Domain separator of the model hash, so it can never collide with a blob or chunk hash.
const MODEL_HASH_DOMAIN: &[u8] = b"meshtune/model-hash/v1\0";

impl ModelHash {
    /// The canonical hash of a set of f32 tensors: blake3 over a domain tag, the tensor
    /// count, and for each tensor (in name order) its name, shape and little-endian f32
    /// values. Bitwise: `-0.0` and `0.0` hash differently.
    #[must_use]
    pub fn of_tensors(tensors: &TensorSet) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(MODEL_HASH_DOMAIN);
        hasher.update(&(tensors.len() as u64).to_le_bytes());
        let mut staging = [0u8; 4 * 1024];
        for tensor in tensors.tensors() {
            hasher.update(&(tensor.name.len() as u64).to_le_bytes());
            hasher.update(tensor.name.as_bytes());
            hasher.update(&(tensor.shape.len() as u64).to_le_bytes());
            for &dim in &tensor.shape {
                hasher.update(&(dim as u64).to_le_bytes());
            }
            for values in tensor.values.chunks(staging.len() / 4) {
                let bytes = &mut staging[..values.len() * 4];
                for (out, value) in bytes.chunks_exact_mut(4).zip(values) {
                    out.copy_from_slice(&value.to_le_bytes());
                }
                hasher.update(bytes);
            }
        }
        hasher.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let hash = BlobHash::of_bytes(b"meshtune");
        let text = hash.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<BlobHash>(), Ok(hash));
        assert_eq!(text.to_uppercase().parse::<BlobHash>(), Ok(hash));
    }

    #[test]
    fn hex_rejects_bad_input() {
        assert!("".parse::<ChunkHash>().is_err());
        assert!("zz".repeat(32).parse::<ChunkHash>().is_err());
        assert!("00".repeat(33).parse::<ChunkHash>().is_err());
        assert!("é".repeat(32).parse::<ChunkHash>().is_err());
    }
}
