//! A vectorizable `exp` for f32 slices, and the softmax over rows built on it.
//!
//! glibc's `expf` is a scalar call per element; the softmax of a 64x64-latent self-attention
//! takes 168 million of them per CFG step. This one is branch-free (Cody-Waite reduction,
//! degree-7 Taylor polynomial on |r| <= ln2/2, exponent scaling in two halves so the whole range
//! from underflow to overflow stays exact in its classification), so the compiler turns the
//! loop into AVX-512 or AVX2 code, chosen at run time. Relative error: a few ulp (tested
//! against `f32::exp`).

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split so that n * LN2_HI is exact for the |n| <= 159 that occur.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
// Below this exp underflows to 0 in f32, above the upper bound it overflows to infinity.
const LOWEST: f32 = -110.0;
const HIGHEST: f32 = 89.0;
// 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
const ROUNDER: f32 = 12_582_912.0;

/// exp(x) of one element (inlined into vectorized loops; see the module notes).
#[inline(always)]
pub(super) fn exp_lane(x: f32) -> f32 {
    // NaN passes through the clamp (and the result is NaN).
    let x = x.clamp(LOWEST, HIGHEST);
    let shifted = x * LOG2E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // 2^n as 2^a * 2^b with both halves normal floats (n is in [-159, 129]).
    // The integer n sits in the low mantissa bits of `shifted` (a float cast would saturate,
    // which does not vectorize). For NaN it is garbage, but p is NaN already.
    let n = shifted.to_bits() as i32 - ROUNDER.to_bits() as i32;
    let a = n >> 1;
    let b = n - a;
    let pow2 = |k: i32| f32::from_bits((((k + 127) & 0xff) as u32) << 23);
    p * pow2(a) * pow2(b)
}

#[inline(always)]
fn exp_slice_generic(x: &mut [f32], shift: f32) {
    for v in x.iter_mut() {
        *v = exp_lane(*v - shift);
    }
}

#[cfg(all(target_arch = "x86_64", feature = "avx512"))]
#[target_feature(enable = "avx512f")]
fn exp_slice_avx512(x: &mut [f32], shift: f32) {
    exp_slice_generic(x, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_slice_avx2(x: &mut [f32], shift: f32) {
    exp_slice_generic(x, shift)
}

/// `x[i] = exp(x[i])` for every element.
pub fn exp_in_place(x: &mut [f32]) {
    exp_shifted_in_place(x, 0.0)
}

/// `x[i] = exp(x[i] - shift)` for every element, in one pass.
pub fn exp_shifted_in_place(x: &mut [f32], shift: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        // The `avx512` cargo feature (default) also gates gemm's AVX-512 kernels; a build
        // without it runs the AVX2 code paths everywhere (what an AVX2-only CPU runs).
        #[cfg(feature = "avx512")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the instructions the function was compiled for.
            return unsafe { exp_slice_avx512(x, shift) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { exp_slice_avx2(x, shift) };
        }
    }
    exp_slice_generic(x, shift)
}

const LANES: usize = 16;

/// The largest element of a row; NaN if the row holds one (a plain maximum would skip it).
fn row_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut nan = [false; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for ((m, n), &v) in lanes.iter_mut().zip(nan.iter_mut()).zip(chunk) {
            *m = if v > *m { v } else { *m };
            *n |= v.is_nan();
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if nan.iter().any(|&n| n) || tail.iter().any(|v| v.is_nan()) {
        f32::NAN
    } else {
        max
    }
}

/// Sum of a row in 16 lanes (vectorizable).
fn row_sum(x: &[f32]) -> f32 {
    let mut sums = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (s, &v) in sums.iter_mut().zip(chunk) {
            *s += v;
        }
    }
    sums.iter().chain(tail).sum()
}

/// `exp(x - max) / sum` of a row whose copy is already in `out`.
fn softmax_of_copy(out: &mut [f32]) -> (f32, f32) {
    let max = row_max(out);
    exp_shifted_in_place(out, max);
    let sum = row_sum(out);
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
    (max, sum)
}

/// Softmax of one row in place; returns the row's log-sum-exp in two parts, `(max,
/// ln(sum(exp(x - max))))`, from which [`recompute_softmax_in_place`] gives the probabilities
/// again (attention's backward). The parts stay apart because their sum can round to `max`:
/// in a row masked with `-f32::MAX` throughout (ViCo's masked keys), `ln(n)` is lost against
/// 3.4e38, and `exp(x - lse)` would give 1 for every key instead of `1/n`.
pub fn softmax_in_place(row: &mut [f32]) -> (f32, f32) {
    let (max, sum) = softmax_of_copy(row);
    (max, sum.ln())
}

/// `x[i] = exp((x[i] - max) - ln_sum)`: the probabilities of a row of scores from the parts of
/// its log-sum-exp that [`softmax_in_place`] returned.
pub fn recompute_softmax_in_place(row: &mut [f32], (max, ln_sum): (f32, f32)) {
    for v in row.iter_mut() {
        *v -= max;
    }
    exp_shifted_in_place(row, ln_sum);
}

/// Softmax of one row into `out`: `exp(x - max) / sum`. A NaN anywhere, or a row of -inf,
/// gives a NaN row (as candle's kernel).
pub fn softmax_row(x: &[f32], out: &mut [f32]) {
    out.copy_from_slice(x);
    softmax_of_copy(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_matches_libm_over_the_whole_range() {
        // Every 997th float between -110 and 95, plus the edges.
        let mut xs: Vec<f32> = Vec::new();
        let (lo, hi) = ((-110f32).to_bits(), 95f32.to_bits());
        // Negative floats have larger bit patterns than positive ones: walk both halves.
        xs.extend((0..hi).step_by(997).map(f32::from_bits));
        xs.extend(((1u32 << 31)..lo).step_by(997).map(f32::from_bits));
        xs.extend([
            0.0, -0.0, 88.72, 88.73, -87.33, -103.9, -104.5, 1e-30, -1e-30,
        ]);
        let mut ys = xs.clone();
        exp_in_place(&mut ys);
        let mut worst = 0;
        for (&x, &y) in xs.iter().zip(&ys) {
            let expected = x.exp();
            if expected.is_infinite() {
                assert_eq!(y, expected, "exp({x:e}): {y:e} instead of {expected:e}");
                continue;
            }
            if expected < f32::MIN_POSITIVE {
                // Subnormal (or flushed) results: within a few of the smallest subnormal steps.
                let step = f32::from_bits(1);
                assert!(
                    (y - expected).abs() <= 4.0 * step,
                    "exp({x:e}) = {y:e}, libm {expected:e}"
                );
                continue;
            }
            let u = ulps(y, expected);
            assert!(u <= 4, "exp({x:e}) = {y:e}, libm {expected:e}: {u} ulp");
            worst = worst.max(u);
        }
        println!("{} points, worst {worst} ulp", xs.len());
        let mut special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
        exp_in_place(&mut special);
        assert!(special[0].is_nan());
        assert_eq!(special[1], f32::INFINITY);
        assert_eq!(special[2], 0.0);
    }

    /// The in-place softmax equals the copying one, and its log-sum-exp gives the
    /// probabilities back (what attention's backward recomputes); also for a row masked with
    /// `-f32::MAX` throughout, where `max + ln(sum)` rounds to `max`.
    #[test]
    fn softmax_in_place_returns_the_log_sum_exp() {
        use crate::kernels::test_util::{max_diff_slices, randn};
        let masked: Vec<f32> = (0..6).map(|i| -f32::MAX + i as f32).collect();
        let mut cases: Vec<Vec<f32>> = [(77usize, 3f64), (4096, 30.0), (5, 1.0), (1, 1.0)]
            .iter()
            .map(|&(len, scale)| {
                let x = randn(len as u64 + 7, &[len]);
                (x * scale).unwrap().to_vec1().unwrap()
            })
            .collect();
        cases.push(masked);
        for x in cases {
            let len = x.len();
            let mut copied = vec![0f32; len];
            softmax_row(&x, &mut copied);
            let mut row = x.clone();
            let (max_part, ln_sum) = softmax_in_place(&mut row);
            assert_eq!(row, copied);
            let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let want = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            assert_eq!(max_part as f64, max);
            let lse_err = (ln_sum as f64 - want).abs();
            let mut again = x.clone();
            recompute_softmax_in_place(&mut again, (max_part, ln_sum));
            let p_err = max_diff_slices(&again, &row);
            println!("len {len}: log-sum-exp error {lse_err:e}, exp(x - lse) error {p_err:e}");
            assert!(lse_err <= 1e-5 * want.abs().max(1.0), "{lse_err:e}");
            assert!(p_err <= 1e-6, "{p_err:e}");
        }
    }

    #[test]
    fn softmax_rows_match_candle() {
        use candle_core::{Device, Tensor};
        // Row lengths with and without a remainder after the 16-wide lanes; large logits.
        for (rows, len, scale) in [
            (7usize, 77usize, 3f32),
            (5, 4096, 30.0),
            (3, 16, 1.0),
            (2, 1, 1.0),
        ] {
            let x = crate::kernels::test_util::randn(len as u64, &[rows, len]);
            let x = (x * scale as f64).unwrap();
            let expected = candle_nn::ops::softmax_last_dim(&x).unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let mut out = vec![0f32; xs.len()];
            for (xr, or) in xs.chunks(len).zip(out.chunks_mut(len)) {
                softmax_row(xr, or);
            }
            let got = Tensor::from_vec(out, (rows, len), &Device::Cpu).unwrap();
            let err = crate::kernels::test_util::max_diff(&got, &expected);
            println!("{rows}x{len} (logits x{scale}): max abs error {err:e}");
            assert!(err <= 1e-6, "{rows}x{len}: {err:e}");
        }
        // -inf entries (masked keys) get exactly 0; NaN and all -inf rows are NaN.
        let mut out = [0f32; 4];
        softmax_row(&[1.0, f32::NEG_INFINITY, 2.0, f32::NEG_INFINITY], &mut out);
        assert_eq!((out[1], out[3]), (0.0, 0.0));
        assert!((out[0] + out[2] - 1.0).abs() < 1e-6);
        softmax_row(&[1.0, f32::NAN, 2.0, 0.0], &mut out);
        assert!(out.iter().all(|v| v.is_nan()));
        softmax_row(&[f32::NEG_INFINITY; 4], &mut out);
        assert!(out.iter().all(|v| v.is_nan()));
    }
}
