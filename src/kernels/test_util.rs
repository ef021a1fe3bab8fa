//! What the unit tests under `src/` share: seeded inputs and the error measures. Every measure
//! here is infinite when an operand holds a NaN or an infinity (candle's `max` skips NaN, so a
//! check built on it passes a NaN), so no bound accepts one.

use candle_core::{DType, Device, Tensor};

/// A tensor of `shape` with standard normal entries from `seed`, on the CPU.
pub fn randn(seed: u64, shape: &[usize]) -> Tensor {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The elements of `t` as f32, in row-major order.
fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The largest magnitude in `values`; infinite if any value is NaN or infinite.
fn max_magnitude(values: impl IntoIterator<Item = f32>) -> f32 {
    values
        .into_iter()
        .try_fold(0f32, |m, v| v.is_finite().then(|| m.max(v.abs())))
        .unwrap_or(f32::INFINITY)
}

/// The largest magnitude in `t`; infinite if `t` holds a NaN or an infinity.
pub fn max_abs(t: &Tensor) -> f32 {
    max_magnitude(values(t))
}

/// The largest `|a - b|` over two tensors of one shape; infinite if either holds a NaN or an
/// infinity anywhere.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "max_diff: shapes differ");
    max_diff_slices(&values(a), &values(b))
}

/// [`max_diff`] over two slices of one length.
pub fn max_diff_slices(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "max_diff: lengths differ");
    if a.iter().chain(b).any(|v| !v.is_finite()) {
        return f32::INFINITY;
    }
    max_magnitude(a.iter().zip(b).map(|(x, y)| x - y))
}

/// A `[c_out, c_in, k_h, k_w]` kernel stored as its spatial flip with the channel axes
/// swapped, `[c_in, c_out, k_h, k_w]`: what the convolutions' `flipped_transposed` reading
/// turns back into the kernel.
pub fn flipped_transposed(kernel: &Tensor) -> Tensor {
    kernel
        .transpose(0, 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .flip(&[2, 3])
        .unwrap()
        .contiguous()
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NaN or an infinity anywhere, in either operand, makes the error infinite, so that no
    /// `err < tol` check passes it; equal NaNs too, and infinities of one sign.
    #[test]
    fn the_error_measures_see_nan_and_infinity() {
        let clean = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu).unwrap();
        assert_eq!(max_diff(&clean, &clean), 0.0);
        let shifted = (&clean + 0.5).unwrap();
        assert_eq!(max_diff(&clean, &shifted), 0.5);
        assert_eq!(max_abs(&clean), 4.0);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            // At the start, in the middle and at the end (candle's `max` drops a NaN wherever
            // its reduction order puts it).
            for at in 0..4 {
                let mut v = vec![1f32, 2.0, 3.0, 4.0];
                v[at] = bad;
                let t = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
                assert_eq!(max_diff(&t, &clean), f32::INFINITY, "{bad} at {at}");
                assert_eq!(max_diff(&clean, &t), f32::INFINITY, "{bad} at {at}");
                assert_eq!(max_diff(&t, &t), f32::INFINITY, "{bad} at {at}, both");
                assert_eq!(max_abs(&t), f32::INFINITY, "{bad} at {at}");
            }
        }
        // What the measure replaces: candle's max of |a - b| passes a NaN.
        let with_nan = Tensor::new(&[1f32, f32::NAN, 3.0, 4.0], &Device::Cpu).unwrap();
        let candle_max: f32 = (&with_nan - &clean)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        println!("candle's max of |a - b| with a NaN: {candle_max}");
        // Half precision goes through f32 and is seen the same way.
        let half = with_nan.to_dtype(DType::F16).unwrap();
        assert_eq!(max_abs(&half), f32::INFINITY);
    }
}
