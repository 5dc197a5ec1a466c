//! Codec parameters: what a sender asks for ([`CodecParams`], with a compact text form
//! for configuration and the command line) and what one tensor's segment actually is
//! ([`TensorEncoding`], recorded in the manifest).
//!
//! Owns: the parameter types and their text form. Must not encode values: `encode` and
//! `values` do.

use std::fmt;
use std::str::FromStr;

use super::EncodeError;
use super::lowrank::matrix_dims;
use super::sparse::max_index_section_len;
use super::values::value_section_len;
use crate::limits::MAX_QUANT_BLOCK_SIZE;

/// How each value (dense) or each kept value (top-k) is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueFormat {
    /// IEEE f32, lossless.
    F32,
    /// IEEE binary16 (range ±65504, 11-bit mantissa).
    F16,
    /// bfloat16 (f32 range, 8-bit mantissa).
    Bf16,
    /// Signed bytes with one f32 scale (`absmax / 127`) per block; error at most scale/2.
    Int8 {
        /// Values per scale.
        block_size: u32,
    },
    /// Signed nibbles in `-7..=7` with one f32 scale (`absmax / 7`) per block; error at
    /// most scale/2.
    Int4 {
        /// Values per scale.
        block_size: u32,
    },
}

impl fmt::Display for ValueFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::F32 => f.write_str("f32"),
            Self::F16 => f.write_str("f16"),
            Self::Bf16 => f.write_str("bf16"),
            Self::Int8 { block_size } => write!(f, "int8/{block_size}"),
            Self::Int4 { block_size } => write!(f, "int4/{block_size}"),
        }
    }
}

/// Which elements of a tensor are sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sparsity {
    /// All of them.
    Dense,
    /// The `ceil(keep_fraction * len)` largest magnitudes (at least one). Pair with
    /// [`crate::ErrorFeedback`] so the rest is sent in later rounds.
    TopK {
        /// In `(0, 1]`.
        keep_fraction: f64,
    },
    /// Each matrix (a tensor of two or more dimensions, viewed as `shape[0] x rest`) as two
    /// rank-`rank` factors (PowerSGD-style, see `lowrank.rs`); tensors that rank would not
    /// shrink (vectors, small matrices) are sent dense. Pair with [`crate::ErrorFeedback`].
    LowRank {
        /// In `1..=`[`MAX_LOW_RANK`].
        rank: u32,
    },
}

/// Largest rank a low-rank segment may have (decoding costs `rank` multiply-adds per element).
pub const MAX_LOW_RANK: u32 = 256;

/// What a sender asks the codec for. Composable: any [`ValueFormat`] with any
/// [`Sparsity`], byte shuffle and zstd level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodecParams {
    /// Storage of values.
    pub values: ValueFormat,
    /// Dense or top-k.
    pub sparsity: Sparsity,
    /// Byte-shuffle float arrays before zstd.
    pub byte_shuffle: bool,
    /// zstd level per segment; `None` for no zstd.
    pub zstd_level: Option<i32>,
}

impl Default for CodecParams {
    /// `int8/64+zstd:1`: much smaller than f32 (ratios in docs/BENCHMARKS.md), fast, no sender
    /// state.
    fn default() -> Self {
        Self::int8_zstd()
    }
}

impl CodecParams {
    /// Dense f32: the receiver decodes exactly what was sent (no error feedback needed).
    #[must_use]
    pub fn is_lossless(&self) -> bool {
        self.values == ValueFormat::F32 && self.sparsity == Sparsity::Dense
    }

    /// `f32+shuffle+zstd:3`: lossless.
    #[must_use]
    pub const fn lossless() -> Self {
        Self {
            values: ValueFormat::F32,
            sparsity: Sparsity::Dense,
            byte_shuffle: true,
            zstd_level: Some(3),
        }
    }

    /// `int8/64+zstd:1`.
    #[must_use]
    pub const fn int8_zstd() -> Self {
        Self {
            values: ValueFormat::Int8 { block_size: 64 },
            sparsity: Sparsity::Dense,
            byte_shuffle: false,
            zstd_level: Some(1),
        }
    }

    /// `top<100 * keep_fraction>%+int8/64+zstd:1`; use with [`crate::ErrorFeedback`].
    #[must_use]
    pub const fn top_k_int8(keep_fraction: f64) -> Self {
        Self {
            values: ValueFormat::Int8 { block_size: 64 },
            sparsity: Sparsity::TopK { keep_fraction },
            byte_shuffle: false,
            zstd_level: Some(1),
        }
    }

    /// Checks block sizes, the top-k fraction and the zstd level.
    pub fn validate(&self) -> Result<(), EncodeError> {
        let invalid = |reason| Err(EncodeError::InvalidParams { reason });
        if let ValueFormat::Int8 { block_size } | ValueFormat::Int4 { block_size } = self.values
            && !(1..=MAX_QUANT_BLOCK_SIZE).contains(&block_size)
        {
            return invalid("quantization block size must be in 1..=2^20");
        }
        if let Sparsity::TopK { keep_fraction } = self.sparsity
            && !(keep_fraction > 0.0 && keep_fraction <= 1.0)
        {
            return invalid("top-k keep fraction must be in (0, 1]");
        }
        if let Sparsity::LowRank { rank } = self.sparsity
            && !(1..=MAX_LOW_RANK).contains(&rank)
        {
            return invalid("low rank must be in 1..=256");
        }
        if let Some(level) = self.zstd_level
            && !zstd::compression_level_range().contains(&level)
        {
            return invalid("zstd level out of range");
        }
        Ok(())
    }
}

/// `top1%+int8/64+shuffle+zstd:1`: parts joined by `+`, in any order when parsing:
/// exactly one of `f32`, `f16`, `bf16`, `int8[/block]`, `int4[/block]` (block defaults to
/// 64); optionally one of `top<percent>%` and `rank<r>`, and `shuffle`, `zstd[:level]`
/// (level defaults to 3).
impl fmt::Display for CodecParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Sparsity::TopK { keep_fraction } = self.sparsity {
            // Rounded to 9 decimals so 0.07 shows as 7, not 7.000000000000001; tiny
            // fractions keep all their digits so that the text still parses.
            let percent = keep_fraction * 100.0;
            let rounded = (percent * 1e9).round() / 1e9;
            let shown = if rounded > 0.0 { rounded } else { percent };
            write!(f, "top{shown}%+")?;
        }
        if let Sparsity::LowRank { rank } = self.sparsity {
            write!(f, "rank{rank}+")?;
        }
        write!(f, "{}", self.values)?;
        if self.byte_shuffle {
            f.write_str("+shuffle")?;
        }
        if let Some(level) = self.zstd_level {
            write!(f, "+zstd:{level}")?;
        }
        Ok(())
    }
}

/// A codec string that [`CodecParams::from_str`] does not understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid codec {text:?}: {reason} (expected e.g. \"top1%+int8/64+zstd:1\")")]
pub struct ParseCodecParamsError {
    /// The rejected string.
    pub text: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for CodecParams {
    type Err = ParseCodecParamsError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| ParseCodecParamsError {
            text: text.to_owned(),
            reason,
        };
        let mut values = None;
        let mut sparsity = None;
        let mut byte_shuffle = false;
        let mut zstd_level = None;
        let block_size = |suffix: &str| -> Result<u32, ParseCodecParamsError> {
            match suffix.strip_prefix('/') {
                None if suffix.is_empty() => Ok(64),
                Some(number) => number
                    .parse()
                    .map_err(|_| fail(format!("bad block size {number:?}"))),
                None => Err(fail(format!("unexpected {suffix:?} after the format"))),
            }
        };
        for part in text.split('+') {
            let part = part.trim();
            let format = match part {
                "f32" => Some(ValueFormat::F32),
                "f16" => Some(ValueFormat::F16),
                "bf16" => Some(ValueFormat::Bf16),
                _ => {
                    if let Some(rest) = part.strip_prefix("int8") {
                        Some(ValueFormat::Int8 {
                            block_size: block_size(rest)?,
                        })
                    } else if let Some(rest) = part.strip_prefix("int4") {
                        Some(ValueFormat::Int4 {
                            block_size: block_size(rest)?,
                        })
                    } else {
                        None
                    }
                }
            };
            if let Some(format) = format {
                if values.replace(format).is_some() {
                    return Err(fail("more than one value format".into()));
                }
            } else if let Some(percent) = part
                .strip_prefix("top")
                .and_then(|rest| rest.strip_suffix('%'))
            {
                let percent: f64 = percent
                    .parse()
                    .map_err(|_| fail(format!("bad top-k percentage {percent:?}")))?;
                if sparsity
                    .replace(Sparsity::TopK {
                        keep_fraction: percent / 100.0,
                    })
                    .is_some()
                {
                    return Err(fail("more than one of top-k and rank".into()));
                }
            } else if let Some(rank) = part.strip_prefix("rank") {
                let rank: u32 = rank
                    .parse()
                    .map_err(|_| fail(format!("bad rank {rank:?}")))?;
                if sparsity.replace(Sparsity::LowRank { rank }).is_some() {
                    return Err(fail("more than one of top-k and rank".into()));
                }
            } else if part == "shuffle" {
                byte_shuffle = true;
            } else if let Some(rest) = part.strip_prefix("zstd") {
                let level = match rest.strip_prefix(':') {
                    None if rest.is_empty() => 3,
                    Some(number) => number
                        .parse()
                        .map_err(|_| fail(format!("bad zstd level {number:?}")))?,
                    None => return Err(fail(format!("unexpected {rest:?} after zstd"))),
                };
                zstd_level = Some(level);
            } else {
                return Err(fail(format!("unknown part {part:?}")));
            }
        }
        let params = Self {
            values: values
                .ok_or_else(|| fail("no value format (f32, f16, bf16, int8, int4)".into()))?,
            sparsity: sparsity.unwrap_or(Sparsity::Dense),
            byte_shuffle,
            zstd_level,
        };
        params.validate().map_err(|error| fail(error.to_string()))?;
        Ok(params)
    }
}

/// How one tensor's segment of the blob is encoded; recorded per tensor in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TensorEncoding {
    /// Storage of the values (or kept values).
    pub values: ValueFormat,
    /// `Some(k)`: top-k, `k` values and their indices; `None`: dense.
    pub kept: Option<u64>,
    /// `Some(r)`: two rank-`r` factors (see [`Sparsity::LowRank`]); never with `kept`.
    pub rank: Option<u32>,
    /// Float arrays are byte-shuffled.
    pub byte_shuffle: bool,
    /// The segment is one zstd frame.
    pub zstd: bool,
}

impl TensorEncoding {
    /// Lossless and dense: f32, no top-k.
    #[must_use]
    pub fn is_lossless(&self) -> bool {
        self.values == ValueFormat::F32 && self.kept.is_none() && self.rank.is_none()
    }

    /// The factors' shape `(rows, columns, rank)` of a low-rank segment of a tensor of
    /// `shape` (checked by [`Self::check`]).
    pub(crate) fn low_rank(&self, shape: &[usize]) -> Option<(usize, usize, usize)> {
        let rank = self.rank?;
        let (rows, cols) = matrix_dims(shape)?;
        Some((rows, cols, rank as usize))
    }

    /// Whether this encoding is valid for a tensor of `shape` (`elements` values).
    pub(crate) fn check(&self, shape: &[usize], elements: u64) -> Result<(), &'static str> {
        if let Some(rank) = self.rank {
            if self.kept.is_some() {
                return Err("a segment cannot be both top-k and low-rank");
            }
            if !(1..=MAX_LOW_RANK).contains(&rank) {
                return Err("low rank must be in 1..=256");
            }
            let Some((rows, cols)) = matrix_dims(shape) else {
                return Err("a low-rank tensor needs at least two dimensions");
            };
            if rank as usize > rows.min(cols) {
                return Err("low rank exceeds the tensor's smaller dimension");
            }
        }
        if let ValueFormat::Int8 { block_size } | ValueFormat::Int4 { block_size } = self.values
            && !(1..=MAX_QUANT_BLOCK_SIZE).contains(&block_size)
        {
            return Err("quantization block size must be in 1..=2^20");
        }
        if let Some(kept) = self.kept {
            if kept > elements {
                return Err("top-k keeps more values than the tensor has");
            }
            if elements > u64::from(u32::MAX) {
                return Err("top-k tensor has more than 2^32 - 1 elements");
            }
        }
        Ok(())
    }

    /// Most bytes the segment can have before zstd (exactly its length for dense and
    /// low-rank segments); `None` on overflow.
    pub(crate) fn max_raw_len(&self, shape: &[usize], elements: u64) -> Option<u64> {
        if let Some((rows, cols, rank)) = self.low_rank(shape) {
            let p = (rows as u64).checked_mul(rank as u64)?;
            let q = (cols as u64).checked_mul(rank as u64)?;
            return value_section_len(self.values, p)?
                .checked_add(value_section_len(self.values, q)?);
        }
        match self.kept {
            None => value_section_len(self.values, elements),
            Some(kept) => {
                max_index_section_len(kept)?.checked_add(value_section_len(self.values, kept)?)
            }
        }
    }

    /// Most bytes the stored segment can have; `None` on overflow.
    pub(crate) fn max_segment_len(&self, shape: &[usize], elements: u64) -> Option<u64> {
        let raw = self.max_raw_len(shape, elements)?;
        if self.zstd {
            // zstd's compressBound, in u64: raw + raw/256 + (raw < 128 KiB ? margin : 0).
            let margin = if raw < (128 << 10) {
                ((128 << 10) - raw) >> 11
            } else {
                0
            };
            raw.checked_add(raw >> 8)?.checked_add(margin)
        } else {
            Some(raw)
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::codec::{CodecParams, TensorEncoding, ValueFormat};

    #[test]
    fn codec_strings_round_trip() {
        for text in [
            "f32",
            "f32+zstd:1",
            "f16+shuffle+zstd:3",
            "bf16",
            "int8/64+zstd:1",
            "int4/32",
            "top1%+int8/64",
            "top0.5%+int4/128+shuffle+zstd:-3",
            "top10%+f32",
            "top7%+f32",
            "top0.0000000001%+f32",
            "rank4+int8/64+zstd:1",
            "rank1+f32",
        ] {
            let params: CodecParams = text.parse().expect(text);
            assert_eq!(params.to_string(), text);
        }
        let params: CodecParams = "zstd+int8+top1%".parse().expect("any order");
        assert_eq!(
            params,
            CodecParams {
                zstd_level: Some(3),
                ..CodecParams::top_k_int8(0.01)
            }
        );
        for bad in [
            "",
            "int8+f16",
            "int8/0",
            "top0%+f32",
            "top200%+f32",
            "f32+zstd:99",
            "f32+lz4",
            "int8x",
            "rank0+int8",
            "rank257+int8",
            "rank4+top1%+int8",
            "rankx+f32",
        ] {
            assert!(bad.parse::<CodecParams>().is_err(), "{bad}");
        }
    }

    #[test]
    fn segment_bound_covers_zstd_bound() {
        for raw in [0usize, 1, 100, 128 << 10, 1 << 20, 12_345_678] {
            let encoding = TensorEncoding {
                values: ValueFormat::F32,
                kept: None,
                rank: None,
                byte_shuffle: false,
                zstd: true,
            };
            let elements = raw as u64 / 4;
            let bound = zstd::zstd_safe::compress_bound(elements as usize * 4) as u64;
            let shape = [elements as usize];
            assert!(
                encoding.max_segment_len(&shape, elements) >= Some(bound),
                "{raw}"
            );
        }
    }
}
