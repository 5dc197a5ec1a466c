//! Backend selection. One code path: every function is generic over `burn::Backend`; these
//! aliases name the concrete backends the binaries instantiate.
//!
//! CPU: burn-flex with rayon, SIMD and AVX-512 kernels picked at run time (fastest offline
//! CPU backend measured on burn 0.21, see shared/FACTS.md and docs/BENCHMARKS.md).
//! CUDA: behind the `cuda` feature.

use burn::backend::Autodiff;

/// Inference on CPU.
pub type Cpu = burn_flex::Flex;
/// Training on CPU.
pub type CpuTrain = Autodiff<Cpu>;

/// Inference on an NVIDIA GPU.
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda<f32, i32>;
/// Training on an NVIDIA GPU.
#[cfg(feature = "cuda")]
pub type CudaTrain = Autodiff<Cuda>;
