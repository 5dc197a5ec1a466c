//! Backend selection. One code path: every function is generic over `burn::Backend`; these
//! aliases name the concrete backends the binaries instantiate.
//!
//! CPU: burn-flex with rayon, SIMD and AVX-512 kernels picked at run time (fastest offline
//! CPU backend measured on burn 0.21, see shared/FACTS.md and docs/BENCHMARKS.md).
//! CUDA: behind the `cuda` feature.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;

/// Inference on CPU.
pub type Cpu = burn_flex::Flex;
/// Training on CPU.
pub type CpuTrain = Autodiff<Cpu>;
/// Training on CPU with activation checkpointing: activations of memory-bound operations
/// (element-wise ones: activations, norms, adds) are recomputed in the backward pass instead
/// of kept, trading some compute for memory (`--activation-checkpointing`).
pub type CpuTrainCheckpointed = Autodiff<Cpu, BalancedCheckpointing>;

/// Inference on an NVIDIA GPU.
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda<f32, i32>;
/// Training on an NVIDIA GPU.
#[cfg(feature = "cuda")]
pub type CudaTrain = Autodiff<Cuda>;
/// Training on an NVIDIA GPU with activation checkpointing (see [`CpuTrainCheckpointed`]).
#[cfg(feature = "cuda")]
pub type CudaTrainCheckpointed = Autodiff<Cuda, BalancedCheckpointing>;
