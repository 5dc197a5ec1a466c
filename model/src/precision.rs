//! Mixed precision: which dtype the matrix products run in, how it is chosen from the device,
//! and dynamic loss scaling for fp16.
//!
//! Owns: [`Precision`] (f32, bf16, fp16 compute with f32 master weights and optimizer state),
//! the device rule ([`choose_precision`]) and [`LossScaler`] (torch `GradScaler` semantics).
//! Must not know about backends' device APIs: callers describe the device in [`DeviceInfo`].
//!
//! The scheme is autocast's: parameters, optimizer moments, layer norms, softmax and the loss
//! stay f32; each matrix product casts its inputs to the compute dtype and its output back to
//! f32, so gradients reach the f32 master weights through the casts. bf16 has f32's exponent
//! range and needs no scaling; fp16 (devices without bf16: Volta, Turing, Jetson Xavier) tops
//! out at 65504 and flushes small gradients to zero, so the loss is multiplied by a scale
//! before backward, gradients are divided by it before the update, and a step whose scaled
//! gradients overflowed is skipped and the scale halved.

use std::fmt;
use std::str::FromStr;

use burn::tensor::FloatDType;

/// The dtype of the matrix products (everything else is f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    /// The cast target of matrix products; `None` for f32 (no casts at all).
    #[must_use]
    pub fn compute_dtype(self) -> Option<FloatDType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(FloatDType::BF16),
            Precision::F16 => Some(FloatDType::F16),
        }
    }

    /// fp16 needs dynamic loss scaling; bf16 and f32 do not.
    #[must_use]
    pub fn needs_loss_scaling(self) -> bool {
        self == Precision::F16
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "fp16",
        })
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" | "fp16" => Ok(Precision::F16),
            other => Err(format!(
                "unknown precision `{other}`: use auto, f32, bf16 or fp16"
            )),
        }
    }
}

/// `auto` (from the device) or a fixed precision; written `"auto"`, `"bf16"`, … in config files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum PrecisionChoice {
    #[default]
    Auto,
    Fixed(Precision),
}

impl FromStr for PrecisionChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "auto" {
            Ok(PrecisionChoice::Auto)
        } else {
            s.parse().map(PrecisionChoice::Fixed)
        }
    }
}

impl TryFrom<String> for PrecisionChoice {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PrecisionChoice> for String {
    fn from(choice: PrecisionChoice) -> Self {
        choice.to_string()
    }
}

impl fmt::Display for PrecisionChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrecisionChoice::Auto => f.write_str("auto"),
            PrecisionChoice::Fixed(p) => p.fmt(f),
        }
    }
}

/// What the precision rule needs to know about the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceInfo {
    Cpu,
    /// A CUDA GPU; `compute_capability` as (major, minor) when it could be read.
    Cuda {
        name: String,
        compute_capability: Option<(u32, u32)>,
    },
}

/// The precision `auto` picks, and why (for the log).
///
/// - CPU: f32 (CPU half-precision kernels are emulated and slower here).
/// - CUDA compute capability >= 8.0 (Ampere, Ada, Hopper; Jetson Orin is 8.7): bf16.
/// - 5.3 <= capability < 8.0 (Jetson TX1/TX2/Xavier, Pascal, Volta, Turing): no bf16 tensor
///   cores, so fp16 with dynamic loss scaling.
/// - Older, or capability unknown: f32.
#[must_use]
pub fn choose_precision(device: &DeviceInfo) -> (Precision, String) {
    match device {
        DeviceInfo::Cpu => (Precision::F32, "CPU: f32".into()),
        DeviceInfo::Cuda {
            name,
            compute_capability: Some((major, minor)),
        } => {
            let cc = (*major, *minor);
            if cc >= (8, 0) {
                (
                    Precision::Bf16,
                    format!("{name} (compute capability {major}.{minor}) has bf16: bf16"),
                )
            } else if cc >= (5, 3) {
                (
                    Precision::F16,
                    format!(
                        "{name} (compute capability {major}.{minor}) has no bf16: fp16 with dynamic loss scaling"
                    ),
                )
            } else {
                (
                    Precision::F32,
                    format!("{name} (compute capability {major}.{minor}) has no fast fp16: f32"),
                )
            }
        }
        DeviceInfo::Cuda {
            name,
            compute_capability: None,
        } => (
            Precision::F32,
            format!(
                "{name}: compute capability unknown, f32 (set --precision bf16 or fp16 to override)"
            ),
        ),
    }
}

/// Resolves `choice` against the device: the precision and the reason to log.
#[must_use]
pub fn resolve_precision(choice: PrecisionChoice, device: &DeviceInfo) -> (Precision, String) {
    match choice {
        PrecisionChoice::Auto => choose_precision(device),
        PrecisionChoice::Fixed(p) => (p, format!("{p} (set by the user)")),
    }
}

/// Dynamic loss scaling with `torch.amp.GradScaler`'s defaults: start at 2^16; a step whose
/// scaled gradients are not finite is skipped and the scale halved; after 2000 good steps in
/// a row the scale doubles.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u64,
    /// Good steps since the last growth or backoff.
    pub good_steps: u64,
    /// Steps skipped for overflow, over the run.
    pub skipped: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::new(65_536.0)
    }
}

impl LossScaler {
    #[must_use]
    pub fn new(initial_scale: f64) -> Self {
        Self {
            scale: initial_scale,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            good_steps: 0,
            skipped: 0,
        }
    }

    /// After a backward pass: `finite` says whether every scaled gradient was finite. Returns
    /// whether to apply the step.
    pub fn update(&mut self, finite: bool) -> bool {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale *= self.growth_factor;
                self.good_steps = 0;
            }
        } else {
            // Like torch, no lower bound: a scale far below 1 keeps skipping only if the
            // gradients are not finite even unscaled, which the caller reports.
            self.scale *= self.backoff_factor;
            self.good_steps = 0;
            self.skipped += 1;
        }
        finite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cuda(cc: Option<(u32, u32)>) -> DeviceInfo {
        DeviceInfo::Cuda {
            name: "gpu".into(),
            compute_capability: cc,
        }
    }

    #[test]
    fn the_device_picks_the_precision() {
        let pick = |d: &DeviceInfo| choose_precision(d).0;
        assert_eq!(pick(&DeviceInfo::Cpu), Precision::F32);
        // Jetson AGX Orin, A100, H100: bf16.
        for cc in [(8, 7), (8, 0), (9, 0)] {
            assert_eq!(pick(&cuda(Some(cc))), Precision::Bf16, "{cc:?}");
        }
        // Jetson Xavier, V100, T4, Jetson TX2, Jetson Nano/TX1: fp16.
        for cc in [(7, 2), (7, 0), (7, 5), (6, 2), (5, 3)] {
            assert_eq!(pick(&cuda(Some(cc))), Precision::F16, "{cc:?}");
        }
        assert_eq!(pick(&cuda(Some((5, 2)))), Precision::F32);
        assert_eq!(pick(&cuda(None)), Precision::F32);
        assert!(
            choose_precision(&cuda(Some((7, 2))))
                .1
                .contains("loss scaling")
        );
        // The user overrides.
        let fixed = resolve_precision(PrecisionChoice::Fixed(Precision::F16), &DeviceInfo::Cpu);
        assert_eq!(fixed.0, Precision::F16);
    }

    #[test]
    fn precision_names_parse_and_unknown_ones_are_refused() {
        assert_eq!("auto".parse(), Ok(PrecisionChoice::Auto));
        assert_eq!("fp16".parse(), Ok(PrecisionChoice::Fixed(Precision::F16)));
        assert_eq!("bf16".parse(), Ok(Precision::Bf16));
        assert_eq!("f32".parse(), Ok(Precision::F32));
        let err = "fp8"
            .parse::<PrecisionChoice>()
            .expect_err("fp8 is not supported");
        assert!(err.contains("fp8"), "{err}");
        for p in [Precision::F32, Precision::Bf16, Precision::F16] {
            assert_eq!(p.to_string().parse(), Ok(p));
        }
    }

    #[test]
    fn the_loss_scale_backs_off_on_overflow_and_grows_after_good_steps() {
        let mut scaler = LossScaler::new(1024.0);
        scaler.growth_interval = 3;
        assert!(!scaler.update(false));
        assert_eq!((scaler.scale, scaler.skipped), (512.0, 1));
        assert!(scaler.update(true));
        assert!(scaler.update(true));
        assert_eq!(scaler.scale, 512.0);
        assert!(scaler.update(true));
        assert_eq!(scaler.scale, 1024.0, "grows after 3 good steps");
        assert!(scaler.update(true));
        assert!(!scaler.update(false));
        assert_eq!(scaler.scale, 512.0);
        assert_eq!(scaler.good_steps, 0, "an overflow restarts the count");
    }
}
