//! Backend selection. One code path: every function is generic over `burn::Backend`; these
//! aliases name the concrete backends the binaries instantiate.
//!
//! CPU: burn-flex with rayon, SIMD and AVX-512 kernels picked at run time.
//! CUDA: behind the `cuda` feature.
//!
//! Owns: the backend aliases and the CPU's floating-point mode. Must not hold model code.

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

/// Makes the CPU treat subnormal floats as zero, on this thread and on every thread of the
/// rayon pool that burn-flex and its matrix products run on (x86-64: MXCSR's FTZ and DAZ
/// bits; aarch64: FPCR's FZ bit). PyTorch offers the same as `torch.set_flush_denormal`.
///
/// Why: a randomly initialized LM head (the HF init draws it with std 1) puts most softmax
/// probabilities below f32's normal range, so the gradient of the logits is full of
/// subnormals, and x86 cores take a microcode assist on every multiply that touches one. That
/// slowed a flan-t5-small training step down many times over (`meshtune bench train`; the
/// figures are in docs/BENCHMARKS.md), all of it in the LM head's two backward products. Values below 1.2e-38 become 0, far under every
/// tolerance the HF parity tests check.
///
/// Cheap: called on every forward pass ([`crate::t5::T5::encode`]); the pool is visited once.
pub fn flush_denormals() {
    flush_denormals_on_this_thread();
    static POOL: std::sync::Once = std::sync::Once::new();
    POOL.call_once(|| {
        rayon::broadcast(|_| flush_denormals_on_this_thread());
    });
}

fn flush_denormals_on_this_thread() {
    #[cfg(target_arch = "x86_64")]
    {
        const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);
        let mut csr: u32 = 0;
        // SAFETY: stmxcsr/ldmxcsr read and write this thread's SSE control register; only the
        // flush-to-zero and denormals-are-zero bits change.
        unsafe {
            core::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
            csr |= FTZ_DAZ;
            core::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly));
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        const FZ: u64 = 1 << 24;
        // SAFETY: reads and writes this thread's FPCR; only the flush-to-zero bit changes.
        unsafe {
            let mut fpcr: u64;
            core::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack));
            fpcr |= FZ;
            core::arch::asm!("msr fpcr, {}", in(reg) fpcr, options(nomem, nostack));
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    #[test]
    fn subnormals_flush_to_zero_after_the_call_on_this_thread_and_the_pool() {
        // Each product from fresh black-boxed operands: the compiler assumes a fixed floating
        // point environment and would otherwise reuse the first product.
        fn product() -> f32 {
            std::hint::black_box(1.0e-38f32) * std::hint::black_box(0.5f32)
        }
        std::thread::spawn(|| {
            assert!(product() > 0.0, "a fresh thread keeps subnormals");
            super::flush_denormals();
            assert_eq!(product(), 0.0);
            let pool: Vec<f32> = rayon::broadcast(|_| product());
            assert!(pool.iter().all(|&v| v == 0.0), "{pool:?}");
        })
        .join()
        .expect("test thread");
    }
}
