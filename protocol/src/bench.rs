//! `meshtune bench codec`: size, speed and error of each codec on a FLAN-T5-base-sized
//! synthetic delta, measured on one core in one run (ratios against raw f32 from the same
//! run).
//!
//! Owns: the synthetic delta, the list of codecs compared, the measurement and the table.
//! Must not touch: printing or argument parsing (the node's CLI does that).
//!
//! Values are heavy-tailed like real fine-tuning deltas: Student-t with 4 degrees of
//! freedom (finite variance, infinite kurtosis), scaled per tensor by a log-uniform factor
//! in `[1e-4 / e, 1e-4 * e]`, cut into tensors with the FLAN-T5-base layout. Throughput is
//! raw f32 bytes over wall time of one encode (or decode) of the whole delta, hashing and
//! chunking excluded, fastest of `repeats` runs, both per second of wall time and per
//! second this thread was actually on a CPU (the machine may be shared). For error feedback every timed run is a
//! later round (the first, untimed, fills the residuals) and the error is measured against
//! what the codec was asked to send in the last round (delta plus carried residual).

use std::time::Instant;

use rand_xoshiro::SplitMix64;
use rand_xoshiro::rand_core::{RngCore, SeedableRng};

use crate::codec::{
    CodecParams, DecodeError, EncodeError, ErrorFeedback, Sparsity, ValueFormat, decode_entries,
    encode_delta,
};
use crate::t5_layout::{T5Dims, flan_t5_layout};
use crate::tensor::{Tensor, TensorSet};

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct CodecBenchConfig {
    /// Number of f32 values in the delta (default: FLAN-T5-base, 247 577 856).
    pub params: usize,
    /// Seed of the synthetic values.
    pub seed: u64,
    /// zstd level of the codecs that use zstd.
    pub zstd_level: i32,
    /// Quantization block size of int8/int4.
    pub block_size: u32,
    /// Codecs to compare; [`default_bench_codecs`] when empty.
    pub codecs: Vec<BenchCodec>,
    /// Encode and decode this many times and keep the fastest (the machine may be shared).
    pub repeats: usize,
}

impl Default for CodecBenchConfig {
    fn default() -> Self {
        Self {
            params: 247_577_856,
            seed: 0x6d65_7368_7475_6e65,
            zstd_level: 1,
            block_size: 64,
            codecs: Vec::new(),
            repeats: 3,
        }
    }
}

/// One codec in the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchCodec {
    /// Row label.
    pub label: String,
    /// The codec.
    pub params: CodecParams,
    /// Run with [`ErrorFeedback`] (a first untimed round fills the residuals).
    pub error_feedback: bool,
}

/// One row of the result.
#[derive(Debug, Clone, PartialEq)]
pub struct CodecBenchRow {
    /// Row label.
    pub codec: String,
    /// Raw f32 bytes of the delta.
    pub raw_bytes: u64,
    /// Bytes of the encoded blob.
    pub encoded_bytes: u64,
    /// `raw_bytes / encoded_bytes`.
    pub ratio: f64,
    /// Raw f32 GB (1e9 bytes) encoded per second of wall time, one thread.
    pub encode_gb_per_s: f64,
    /// Raw f32 GB decoded per second of wall time, one thread.
    pub decode_gb_per_s: f64,
    /// Raw f32 GB encoded per second the thread was on a CPU (Linux
    /// `/proc/thread-self/schedstat`): what one core does when the machine is shared.
    /// `None` where the kernel does not report it.
    pub encode_cpu_gb_per_s: Option<f64>,
    /// Raw f32 GB decoded per second on a CPU, as above.
    pub decode_cpu_gb_per_s: Option<f64>,
    /// `||sent - decoded||_2 / ||sent||_2`.
    pub relative_l2_error: f64,
    /// `max |sent - decoded|`.
    pub max_abs_error: f64,
}

/// A codec failed on the synthetic delta (a bug: the input is valid).
#[derive(Debug, thiserror::Error)]
pub enum CodecBenchError {
    /// Encoding failed.
    #[error("{codec}: encode: {source}")]
    Encode {
        /// Row label.
        codec: String,
        /// Cause.
        source: EncodeError,
    },
    /// Decoding failed.
    #[error("{codec}: decode: {source}")]
    Decode {
        /// Row label.
        codec: String,
        /// Cause.
        source: DecodeError,
    },
}

/// The codecs the issue asks to compare.
#[must_use]
pub fn default_bench_codecs(zstd_level: i32, block_size: u32) -> Vec<BenchCodec> {
    let codec =
        |label: &str, values, sparsity, byte_shuffle, zstd: bool, error_feedback| BenchCodec {
            label: label.to_owned(),
            params: CodecParams {
                values,
                sparsity,
                byte_shuffle,
                zstd_level: zstd.then_some(zstd_level),
            },
            error_feedback,
        };
    let int8 = ValueFormat::Int8 { block_size };
    let int4 = ValueFormat::Int4 { block_size };
    let top = |fraction| Sparsity::TopK {
        keep_fraction: fraction,
    };
    let dense = Sparsity::Dense;
    vec![
        codec("f32 (raw)", ValueFormat::F32, dense, false, false, false),
        codec("f32 + zstd", ValueFormat::F32, dense, false, true, false),
        codec(
            "f32 + shuffle + zstd",
            ValueFormat::F32,
            dense,
            true,
            true,
            false,
        ),
        codec("bf16", ValueFormat::Bf16, dense, false, false, false),
        codec(
            "f16 + shuffle + zstd",
            ValueFormat::F16,
            dense,
            true,
            true,
            false,
        ),
        codec("int8", int8, dense, false, false, false),
        codec("int8 + zstd", int8, dense, false, true, false),
        codec("int4", int4, dense, false, false, false),
        codec("int4 + zstd", int4, dense, false, true, false),
        codec("top-1% + int8 + EF", int8, top(0.01), false, true, true),
        codec("top-10% + int8", int8, top(0.1), false, true, false),
        codec(
            "rank-4 + int8 + EF",
            int8,
            Sparsity::LowRank { rank: 4 },
            false,
            true,
            true,
        ),
    ]
}

/// Runs every codec of `config` on one synthetic delta.
pub fn run_codec_bench(config: &CodecBenchConfig) -> Result<Vec<CodecBenchRow>, CodecBenchError> {
    let delta = synthetic_delta(config.params, config.seed);
    let layout = delta.layout();
    let raw_bytes = delta.total_elements() * 4;
    let codecs = if config.codecs.is_empty() {
        default_bench_codecs(config.zstd_level, config.block_size)
    } else {
        config.codecs.clone()
    };
    let mut rows = Vec::with_capacity(codecs.len());
    for codec in codecs {
        let encode_error = |source| CodecBenchError::Encode {
            codec: codec.label.clone(),
            source,
        };
        let mut feedback = codec.error_feedback.then(ErrorFeedback::new);
        if let Some(feedback) = feedback.as_mut() {
            encode_delta(&delta, &codec.params, Some(feedback)).map_err(encode_error)?;
        }
        let mut encode_time = Timing::default();
        let mut encoded = None;
        for _ in 0..config.repeats.max(1) {
            // Each repeat of an error-feedback codec is one more round, like a real sender.
            let stopwatch = Stopwatch::start();
            let round =
                encode_delta(&delta, &codec.params, feedback.as_mut()).map_err(encode_error)?;
            encode_time.keep_fastest(stopwatch.stop());
            encoded = Some(round);
        }
        let Some(encoded) = encoded else { continue };

        let mut decode_time = Timing::default();
        let mut decoded = None;
        for _ in 0..config.repeats.max(1) {
            drop(decoded.take());
            let stopwatch = Stopwatch::start();
            let tensors =
                decode_entries(&encoded.tensors, &encoded.blob, &layout).map_err(|source| {
                    CodecBenchError::Decode {
                        codec: codec.label.clone(),
                        source,
                    }
                })?;
            decode_time.keep_fastest(stopwatch.stop());
            decoded = Some(tensors);
        }
        let Some(decoded) = decoded else { continue };

        let (relative_l2_error, max_abs_error) = match &feedback {
            Some(feedback) => error_against_feedback(&decoded, feedback),
            None => reconstruction_error(&delta, &decoded),
        };
        let encoded_bytes = encoded.blob.len() as u64;
        rows.push(CodecBenchRow {
            codec: codec.label,
            raw_bytes,
            encoded_bytes,
            ratio: raw_bytes as f64 / encoded_bytes.max(1) as f64,
            encode_gb_per_s: raw_bytes as f64 / encode_time.wall / 1e9,
            decode_gb_per_s: raw_bytes as f64 / decode_time.wall / 1e9,
            encode_cpu_gb_per_s: encode_time
                .on_cpu
                .map(|seconds| raw_bytes as f64 / seconds / 1e9),
            decode_cpu_gb_per_s: decode_time
                .on_cpu
                .map(|seconds| raw_bytes as f64 / seconds / 1e9),
            relative_l2_error,
            max_abs_error,
        });
    }
    Ok(rows)
}

/// Wall and on-CPU seconds of the fastest run.
struct Timing {
    wall: f64,
    on_cpu: Option<f64>,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            wall: f64::INFINITY,
            on_cpu: None,
        }
    }
}

impl Timing {
    fn keep_fastest(&mut self, run: Timing) {
        self.wall = self.wall.min(run.wall);
        self.on_cpu = match (self.on_cpu, run.on_cpu) {
            (Some(best), Some(seconds)) => Some(best.min(seconds)),
            (best, seconds) => best.or(seconds),
        };
    }
}

struct Stopwatch {
    started: Instant,
    on_cpu_at_start: Option<u64>,
}

impl Stopwatch {
    fn start() -> Self {
        Self {
            on_cpu_at_start: thread_on_cpu_nanos(),
            started: Instant::now(),
        }
    }

    fn stop(self) -> Timing {
        let wall = self.started.elapsed().as_secs_f64();
        let on_cpu = self
            .on_cpu_at_start
            .zip(thread_on_cpu_nanos())
            .map(|(start, end)| end.saturating_sub(start) as f64 / 1e9)
            .filter(|&seconds| seconds > 0.0);
        Timing { wall, on_cpu }
    }
}

/// Nanoseconds this thread has spent on a CPU (first field of Linux's schedstat).
fn thread_on_cpu_nanos() -> Option<u64> {
    let schedstat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    schedstat.split_whitespace().next()?.parse().ok()
}

fn reconstruction_error(sent: &TensorSet, decoded: &TensorSet) -> (f64, f64) {
    let mut error_squared = 0f64;
    let mut norm_squared = 0f64;
    let mut max_abs = 0f64;
    for (sent, decoded) in sent.tensors().iter().zip(decoded.tensors()) {
        for (&value, &decoded) in sent.values.iter().zip(&decoded.values) {
            let error = f64::from(value) - f64::from(decoded);
            error_squared += error * error;
            norm_squared += f64::from(value) * f64::from(value);
            max_abs = max_abs.max(error.abs());
        }
    }
    (
        (error_squared / norm_squared.max(f64::MIN_POSITIVE)).sqrt(),
        max_abs,
    )
}

/// With error feedback the codec was asked to send `decoded + residual`, and missed by
/// exactly the residual.
fn error_against_feedback(decoded: &TensorSet, feedback: &ErrorFeedback) -> (f64, f64) {
    let mut error_squared = 0f64;
    let mut norm_squared = 0f64;
    let mut max_abs = 0f64;
    for tensor in decoded.tensors() {
        let Some(residual) = feedback.residual(&tensor.name) else {
            continue;
        };
        for (&decoded, &residual) in tensor.values.iter().zip(residual) {
            let residual = f64::from(residual);
            let sent = f64::from(decoded) + residual;
            error_squared += residual * residual;
            norm_squared += sent * sent;
            max_abs = max_abs.max(residual.abs());
        }
    }
    (
        (error_squared / norm_squared.max(f64::MIN_POSITIVE)).sqrt(),
        max_abs,
    )
}

/// A heavy-tailed synthetic delta of `params` values in FLAN-T5-base tensors (the layout
/// is cut short, or repeated with a `#n` suffix on the names, to reach `params`).
#[must_use]
pub fn synthetic_delta(params: usize, seed: u64) -> TensorSet {
    let layout = flan_t5_layout(&T5Dims::FLAN_T5_BASE);
    let mut random = DeltaValues::new(seed);
    let mut tensors = Vec::new();
    let mut remaining = params;
    'passes: for pass in 0.. {
        for spec in layout.specs() {
            if remaining == 0 {
                break 'passes;
            }
            let full = spec.element_count().unwrap_or(0);
            let (shape, count) = if full <= remaining {
                (spec.shape.clone(), full)
            } else {
                (vec![remaining], remaining)
            };
            remaining -= count;
            let name = if pass == 0 {
                spec.name.clone()
            } else {
                format!("{}#{pass}", spec.name)
            };
            let scale = 1e-4 * (random.uniform_symmetric()).exp();
            let values = (0..count).map(|_| scale * random.student_t4()).collect();
            tensors.push(Tensor {
                name,
                shape,
                values,
            });
        }
    }
    tensors.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    TensorSet::from_sorted_unchecked(tensors)
}

/// The synthetic delta's random values, from a seeded SplitMix64 stream (the same stream for
/// the same seed in every version of `rand_xoshiro`).
struct DeltaValues(SplitMix64);

impl DeltaValues {
    fn new(seed: u64) -> Self {
        Self(SplitMix64::seed_from_u64(seed))
    }

    /// Uniform in `[-1, 1)`.
    fn uniform_symmetric(&mut self) -> f32 {
        (self.0.next_u64() >> 40) as f32 * (1.0 / (1u64 << 23) as f32) - 1.0
    }

    /// Student-t with 4 degrees of freedom, by Bailey's polar method.
    fn student_t4(&mut self) -> f32 {
        loop {
            let bits = self.0.next_u64();
            let u = (bits >> 40) as f32 * (1.0 / (1u64 << 23) as f32) - 1.0;
            let v = ((bits >> 8) & 0xff_ffff) as f32 * (1.0 / (1u64 << 23) as f32) - 1.0;
            let w = u * u + v * v;
            if w > 0.0 && w < 1.0 {
                // t = u * sqrt(nu * (w^(-2/nu) - 1) / w) with nu = 4.
                return u * (4.0 * (1.0 / w.sqrt() - 1.0) / w).sqrt();
            }
        }
    }
}

/// The rows as an aligned text table. Throughput is per second on a CPU where the kernel
/// reports it (robust to a shared machine), wall-clock otherwise; the wall-clock figure
/// follows in parentheses.
#[must_use]
pub fn render_table(rows: &[CodecBenchRow]) -> String {
    let mut table = format!(
        "{:<22} {:>12} {:>8} {:>16} {:>16} {:>11} {:>11}\n",
        "codec",
        "bytes",
        "ratio",
        "enc GB/s (wall)",
        "dec GB/s (wall)",
        "rel L2 err",
        "max abs err"
    );
    let speed = |on_cpu: Option<f64>, wall: f64| match on_cpu {
        Some(on_cpu) => format!("{on_cpu:.2} ({wall:.2})"),
        None => format!("({wall:.2})"),
    };
    for row in rows {
        table.push_str(&format!(
            "{:<22} {:>12} {:>7.1}x {:>16} {:>16} {:>11.2e} {:>11.2e}\n",
            row.codec,
            row.encoded_bytes,
            row.ratio,
            speed(row.encode_cpu_gb_per_s, row.encode_gb_per_s),
            speed(row.decode_cpu_gb_per_s, row.decode_gb_per_s),
            row.relative_l2_error,
            row.max_abs_error,
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_bench_runs_and_meets_the_ratio_goals() {
        let config = CodecBenchConfig {
            params: 300_000,
            ..CodecBenchConfig::default()
        };
        let rows = run_codec_bench(&config).expect("bench runs");
        assert_eq!(rows.len(), default_bench_codecs(1, 64).len());
        let row = |label: &str| rows.iter().find(|row| row.codec == label).expect(label);
        assert_eq!(row("f32 (raw)").ratio, 1.0);
        assert_eq!(row("f32 (raw)").max_abs_error, 0.0);
        assert_eq!(row("f32 + shuffle + zstd").max_abs_error, 0.0);
        assert!(
            row("int8 + zstd").ratio >= 4.0,
            "{}",
            row("int8 + zstd").ratio
        );
        assert!(
            row("top-1% + int8 + EF").ratio >= 50.0,
            "{}",
            row("top-1% + int8 + EF").ratio
        );
        assert!(row("int8").relative_l2_error < 0.05);
        let table = render_table(&rows);
        assert_eq!(table.lines().count(), rows.len() + 1);
    }

    #[test]
    fn synthetic_delta_has_the_requested_size_and_heavy_tails() {
        let delta = synthetic_delta(1_000_000, 7);
        assert_eq!(delta.total_elements(), 1_000_000);
        let values: Vec<f32> = delta
            .tensors()
            .iter()
            .flat_map(|tensor| tensor.values.iter().copied())
            .collect();
        let mean_square =
            values.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / values.len() as f64;
        let fourth =
            values.iter().map(|&v| f64::from(v).powi(4)).sum::<f64>() / values.len() as f64;
        // Kurtosis of a Gaussian is 3; Student-t(4) has none, samples land far above.
        assert!(fourth / (mean_square * mean_square) > 6.0);
        assert_eq!(synthetic_delta(1_000_000, 7), delta);
    }
}
