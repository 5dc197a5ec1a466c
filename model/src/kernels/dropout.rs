//! Training-mode dropout: the mask drawn, applied and kept in one pass; the backward is one
//! multiplication by the kept mask.
//!
//! Owns: this kernel's forward and backward passes and its autodiff op. Must not choose the
//! backend (`dispatch` does) or hold loops another kernel shares (`simd` has them).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn_flex::{Flex, FlexTensor};
use rand::{RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;
use rayon::prelude::*;

use super::dispatch::{self, Cpu};
use super::{CHUNK, map_pair, new_flex, shape_of};

/// Separates the seeds of the chunks' streams (the golden-ratio increment of SplitMix64).
const CHUNK_SEED_STEP: u64 = 0x9E37_79B9_7F4A_7C15;

/// `x * mask / (1 - prob)` with a Bernoulli(1 - prob) mask; returns the output and the scaled
/// mask (0 or `1 / (1 - prob)`), which is also the backward's factor. The mask comes from a
/// SplitMix64 stream per chunk, seeded from `seed` and the chunk's index, so it does not depend
/// on how rayon splits the work: an element is kept when the high 32 bits of its draw reach
/// `prob * 2^32`.
fn forward(x: &FlexTensor, prob: f64, seed: u64) -> (FlexTensor, FlexTensor) {
    let x = x.to_contiguous();
    let src: &[f32] = x.storage();
    let mut out = vec![0.0f32; src.len()];
    let mut mask = vec![0.0f32; src.len()];
    let threshold = (prob.clamp(0.0, 1.0) * 4_294_967_296.0) as u64;
    let scale = (1.0 / (1.0 - prob)) as f32;
    out.par_chunks_mut(CHUNK)
        .zip(mask.par_chunks_mut(CHUNK))
        .zip(src.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(chunk, ((out, mask), src))| {
            let mut draws =
                SplitMix64::seed_from_u64(seed ^ (chunk as u64).wrapping_mul(CHUNK_SEED_STEP));
            for ((o, m), &v) in out.iter_mut().zip(mask.iter_mut()).zip(src) {
                let keep = (draws.next_u64() >> 32) >= threshold;
                *m = if keep { scale } else { 0.0 };
                *o = v * *m;
            }
        });
    let shape = shape_of(&x);
    (new_flex(out, shape.clone()), new_flex(mask, shape))
}

fn multiply(a: &FlexTensor, b: &FlexTensor) -> FlexTensor {
    map_pair(a, b, |x, y, out| {
        out.iter_mut()
            .zip(x.iter().zip(y))
            .for_each(|(o, (x, y))| *o = x * y)
    })
}

#[derive(Debug)]
struct DropoutOp;

impl Backward<Flex, 1> for DropoutOp {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let mask = ops.state;
        let [node] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node {
            grads.register::<Flex>(node.id, multiply(&grad, &mask));
        }
    }
}

/// A seed for one dropout mask, drawn from burn-flex's generator so that `Backend::seed`
/// makes training runs reproducible as before.
fn draw_seed() -> u64 {
    use burn::tensor::Distribution;
    let draw = Tensor::<Flex, 1>::random([2], Distribution::Uniform(0.0, 1.0), &Default::default());
    let values = draw.into_data().to_vec::<f32>().unwrap_or_default();
    values
        .iter()
        .fold(0u64, |seed, v| (seed << 32) ^ u64::from(v.to_bits()))
}

/// Training-mode dropout (`prob` in (0, 1)) in one pass, with a one-pass backward. `None` for
/// inference backends (dropout is the identity there) and every backend but the CPU one.
pub(crate) fn dropout<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    prob: f64,
) -> Option<Tensor<B, D>> {
    if !(prob > 0.0 && prob < 1.0) {
        return None;
    }
    match dispatch::cpu::<B>()? {
        Cpu::Inference(_) => None,
        Cpu::Training(ad) => {
            let x = ad.f32(x)?;
            let (out, mask) = forward(&x.primitive, prob, draw_seed());
            Some(ad.record(DropoutOp, [x], |_| mask, out))
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use burn_flex::{Flex, FlexTensor};

    use super::super::testing::Ad;

    #[test]
    fn dropout_keeps_about_one_minus_p_scales_the_kept_and_routes_gradients_through_the_mask() {
        let device = Default::default();
        let x = Tensor::<Ad, 2>::ones([64, 1000], &device).require_grad();
        let y = super::dropout(&x, 0.1).expect("autodiff flex takes the fused path");
        let values = y.to_data().to_vec::<f32>().expect("f32");
        let kept = values.iter().filter(|&&v| v != 0.0).count() as f64 / values.len() as f64;
        assert!((kept - 0.9).abs() < 0.01, "kept fraction {kept}");
        let scale = 1.0f32 / 0.9;
        assert!(values.iter().all(|&v| v == 0.0 || (v - scale).abs() < 1e-6));
        let grads = (y.clone() * 3.0).sum().backward();
        let grad = x
            .grad(&grads)
            .expect("x grad")
            .into_data()
            .to_vec::<f32>()
            .expect("f32");
        for (g, v) in grad.iter().zip(&values) {
            assert!((g - 3.0 * v).abs() < 1e-5, "grad {g} for output {v}");
        }
        // Another call draws another mask; inference backends never take this path.
        let again = super::dropout(&x, 0.1)
            .expect("fused")
            .to_data()
            .to_vec::<f32>();
        assert_ne!(again.expect("f32"), values);
        assert!(super::dropout(&Tensor::<Flex, 2>::ones([2, 2], &device), 0.1).is_none());
    }

    /// The mask is the hand-written SplitMix64 stream this kernel used before it drew from
    /// `rand_xoshiro` (seeded per chunk, kept where the high half of a draw reaches the
    /// threshold): the same seed gives the same mask, bit for bit.
    #[test]
    fn the_mask_is_the_splitmix64_stream_per_chunk() {
        fn reference_keep(seed: u64, chunk: u64, index: u64, threshold: u64) -> bool {
            let mut state = seed ^ chunk.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut z = 0;
            for _ in 0..=index {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
            }
            (z >> 32) >= threshold
        }
        let len = super::CHUNK + 300;
        let x = super::new_flex(vec![1.0; len], burn::tensor::Shape::new([len]));
        let (prob, seed) = (0.25, 0xDEAD_BEEF_u64);
        let threshold = (prob * 4_294_967_296.0) as u64;
        let (_, mask): (FlexTensor, FlexTensor) = super::forward(&x, prob, seed);
        let mask: &[f32] = mask.storage();
        for i in (0..len)
            .step_by(97)
            .chain([super::CHUNK - 1, super::CHUNK, len - 1])
        {
            let (chunk, index) = ((i / super::CHUNK) as u64, (i % super::CHUNK) as u64);
            let keep = reference_keep(seed, chunk, index, threshold);
            assert_eq!(mask[i] != 0.0, keep, "element {i}");
        }
    }
}
