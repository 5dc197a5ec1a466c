//! The sum of the squares of a tensor's elements, for the global gradient norm.
//!
//! Owns: the one reduction. Must not choose the backend (`dispatch` does) or combine norms
//! across parameters ([`crate::optim`] does).

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use rayon::prelude::*;

use super::{CHUNK, dispatch, simd};

/// The sum of the squares of `t`'s elements (for the global gradient norm), in one
/// multi-threaded pass without the squared copy of `t.clone() * t`; each task sums in f32 lanes
/// and the tasks' sums are added in f64. `None` unless `B` is burn-flex and `t` holds f32.
pub(crate) fn sum_of_squares<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<f64> {
    let flex = dispatch::inference_f32(t)?.to_contiguous();
    let data: &[f32] = flex.storage();
    Some(
        data.par_chunks(CHUNK)
            .map(|chunk| {
                let mut sum = [0.0f32];
                simd::sum_squares(chunk, &mut sum);
                f64::from(sum[0])
            })
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Tensor, TensorData};
    use burn_flex::Flex;

    use super::super::testing::Ad;

    /// The sum over several tasks' chunks and a tail that is not a multiple of the SIMD width,
    /// against the sum in f64; other backends are left to the generic path.
    #[test]
    fn sum_of_squares_matches_the_f64_sum_and_leaves_training_backends_alone() {
        let values: Vec<f32> = (0..40_003)
            .map(|i| ((i % 17) as f32 - 8.0) * 0.25)
            .collect();
        let want: f64 = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let t =
            Tensor::<Flex, 1>::from_data(TensorData::new(values, [40_003]), &Default::default());
        let got = super::sum_of_squares(&t).expect("flex takes the kernel");
        assert!((got - want).abs() <= want * 1e-6, "{got} vs {want}");
        let ad = Tensor::<Ad, 1>::ones([4], &Default::default());
        assert!(super::sum_of_squares(&ad).is_none());
    }
}
