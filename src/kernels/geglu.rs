//! GEGLU (`value * gelu(gate)` over the two halves of a projection, the UNet feed-forward's
//! activation) in one pass, forward and backward, with a vectorizable exact-GELU.
//!
//! candle's composed GEGLU makes three passes over the 4x-wide tokens (the erf-GELU through
//! glibc's scalar `erff`, the product, and at training the narrow views' backward, which
//! zero-fills and adds a full-width buffer per half). Here the forward reads the projection
//! once and writes the result once; the backward writes both halves' gradients in one pass.
//!
//! `erf` is a degree-18 Chebyshev expansion of erf on [0, 4] (fitted here, evaluated in f64 by
//! Clenshaw's recurrence; error below 5e-9, under a twentieth of an f32 ulp of 1), odd-extended,
//! and exactly ±1 from |z| = 4 on, where erf rounds to ±1 in f32 anyway.
//!
//! Layout: the fused pass takes f32 CPU tensors with an even last axis ([`applies`]; a strided
//! input is made contiguous first) and carries its own backward in every mode; elsewhere
//! [`geglu_composed`]. [`gelu`] (the text encoder's) is candle's exact GELU.

use super::cpu::f32_slice;
use super::fast_exp::exp_lane;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// Chebyshev coefficients of erf(z) on z in [0, 4], in t = z / 2 - 1.
const ERF_CHEBYSHEV: [f64; 19] = [
    0.772_182_975_761_267_8,
    0.396_341_476_367_761_96,
    -0.256_170_426_794_943_06,
    0.113_702_663_554_675_66,
    -0.024_340_027_671_519_826,
    -0.007_727_253_651_955_831,
    0.008_681_788_707_319_628,
    -0.002_832_392_779_893_685,
    -0.000_209_793_927_262_580_96,
    0.000_537_153_720_389_168_4,
    -0.000_171_014_876_382_035_7,
    -1.622_768_666_323_065_6e-5,
    2.810_177_463_317_565_2e-5,
    -6.482_128_814_512_262_5e-6,
    -1.515_573_038_838_655_1e-6,
    1.140_805_873_104_072_6e-6,
    -1.241_266_234_658_885_2e-7,
    -8.770_060_616_589_807e-8,
    3.200_576_583_219_682_4e-8,
];

/// erf(z) for finite z; NaN for NaN.
#[inline(always)]
fn erf_lane(z: f64) -> f64 {
    let a = z.abs();
    let t = a.min(4.0) * 0.5 - 1.0;
    let (mut b1, mut b2) = (0.0f64, 0.0f64);
    for &c in ERF_CHEBYSHEV[1..].iter().rev() {
        let b0 = 2.0 * t * b1 - b2 + c;
        b2 = b1;
        b1 = b0;
    }
    let e = t * b1 - b2 + ERF_CHEBYSHEV[0];
    let e = if a >= 4.0 { 1.0 } else { e };
    // NaN compares false above and keeps its NaN through `a` below.
    let e = if a.is_nan() { a } else { e };
    if z < 0.0 {
        -e
    } else {
        e
    }
}

/// Φ(x) = (1 + erf(x / √2)) / 2, the standard normal CDF.
#[inline(always)]
fn normal_cdf(x: f32) -> f64 {
    0.5 * (1.0 + erf_lane(x as f64 * std::f64::consts::FRAC_1_SQRT_2))
}

const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `value * gelu(gate)`, `gelu(x) = x Φ(x)`.
#[inline(always)]
fn geglu_lane(value: f32, gate: f32) -> f32 {
    (value as f64 * gate as f64 * normal_cdf(gate)) as f32
}

/// The gradients of `value * gelu(gate)` for an output gradient `g`: `(g gelu(gate),
/// g value gelu'(gate))`, `gelu'(x) = Φ(x) + x φ(x)`.
#[inline(always)]
fn geglu_backward_lane(value: f32, gate: f32, g: f32) -> (f32, f32) {
    let cdf = normal_cdf(gate);
    let pdf = exp_lane(-0.5 * gate * gate) * INV_SQRT_2PI;
    let d_value = (g as f64 * gate as f64 * cdf) as f32;
    let d_gate = g * value * (cdf as f32 + gate * pdf);
    (d_value, d_gate)
}

/// One row: `out[i] = value[i] * gelu(gate[i])` for `row = [value | gate]`.
#[inline(always)]
fn geglu_rows_generic(rows: &[f32], out: &mut [f32], width: usize) {
    for (row, out) in rows
        .chunks_exact(2 * width)
        .zip(out.chunks_exact_mut(width))
    {
        let (value, gate) = row.split_at(width);
        for ((o, &v), &g) in out.iter_mut().zip(value).zip(gate) {
            *o = geglu_lane(v, g);
        }
    }
}

#[inline(always)]
fn geglu_backward_rows_generic(rows: &[f32], grad: &[f32], out: &mut [f32], width: usize) {
    for ((row, g), out) in rows
        .chunks_exact(2 * width)
        .zip(grad.chunks_exact(width))
        .zip(out.chunks_exact_mut(2 * width))
    {
        let (value, gate) = row.split_at(width);
        let (d_value, d_gate) = out.split_at_mut(width);
        for i in 0..width {
            let (dv, dg) = geglu_backward_lane(value[i], gate[i], g[i]);
            d_value[i] = dv;
            d_gate[i] = dg;
        }
    }
}

#[cfg(all(target_arch = "x86_64", feature = "avx512"))]
#[target_feature(enable = "avx512f")]
fn geglu_rows_avx512(rows: &[f32], out: &mut [f32], width: usize) {
    geglu_rows_generic(rows, out, width)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn geglu_rows_avx2(rows: &[f32], out: &mut [f32], width: usize) {
    geglu_rows_generic(rows, out, width)
}

#[cfg(all(target_arch = "x86_64", feature = "avx512"))]
#[target_feature(enable = "avx512f")]
fn geglu_backward_rows_avx512(rows: &[f32], grad: &[f32], out: &mut [f32], width: usize) {
    geglu_backward_rows_generic(rows, grad, out, width)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn geglu_backward_rows_avx2(rows: &[f32], grad: &[f32], out: &mut [f32], width: usize) {
    geglu_backward_rows_generic(rows, grad, out, width)
}

/// Which instruction set the row loops run with (see `fast_exp::exp_in_place`).
#[derive(Clone, Copy)]
enum Isa {
    #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Generic,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        #[cfg(feature = "avx512")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2;
        }
    }
    Isa::Generic
}

fn geglu_rows(rows: &[f32], out: &mut [f32], width: usize) {
    match isa() {
        // SAFETY: the CPU has the instructions each function was compiled for.
        #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
        Isa::Avx512 => unsafe { geglu_rows_avx512(rows, out, width) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { geglu_rows_avx2(rows, out, width) },
        Isa::Generic => geglu_rows_generic(rows, out, width),
    }
}

fn geglu_backward_rows(rows: &[f32], grad: &[f32], out: &mut [f32], width: usize) {
    match isa() {
        // SAFETY: as above.
        #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
        Isa::Avx512 => unsafe { geglu_backward_rows_avx512(rows, grad, out, width) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { geglu_backward_rows_avx2(rows, grad, out, width) },
        Isa::Generic => geglu_backward_rows_generic(rows, grad, out, width),
    }
}

/// Rows per parallel task: whole rows, about 64 Ki output elements each.
fn rows_per_task(width: usize) -> usize {
    ((1usize << 16) / width.max(1)).max(1)
}

/// `[.., 2n] -> [.., n]`: `value * gelu(gate)` with `[value | gate]` the last axis' halves.
struct GegluCpu;

impl CustomOp1 for GegluCpu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = f32_slice(storage, layout, "geglu")?;
        let dims = layout.shape().dims();
        let width = dims[dims.len() - 1] / 2;
        let mut out = vec![0f32; h.len() / 2];
        let rows = rows_per_task(width);
        std::thread::scope(|scope| {
            let tasks: Vec<_> = h
                .chunks(2 * width * rows)
                .zip(out.chunks_mut(width * rows))
                .collect();
            parallel_for(scope, tasks, |(src, dst)| geglu_rows(src, dst, width));
        });
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = width;
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }

    fn bwd(&self, h: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(h.contiguous()?.apply_op2_no_bwd(
            &grad.contiguous()?,
            &GegluBackwardCpu,
        )?))
    }
}

/// `(h [.., 2n], grad [.., n]) -> grad_h [.., 2n]` of [`GegluCpu`].
struct GegluBackwardCpu;

impl CustomOp2 for GegluBackwardCpu {
    fn name(&self) -> &'static str {
        "geglu-backward"
    }

    fn cpu_fwd(
        &self,
        h_storage: &CpuStorage,
        h_layout: &Layout,
        g_storage: &CpuStorage,
        g_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = f32_slice(h_storage, h_layout, "geglu backward input")?;
        let g = f32_slice(g_storage, g_layout, "geglu backward gradient")?;
        let dims = h_layout.shape().dims();
        let width = dims[dims.len() - 1] / 2;
        if g.len() * 2 != h.len() {
            candle_core::bail!(
                "geglu backward: gradient {:?} for input {:?}",
                g_layout.shape(),
                h_layout.shape()
            );
        }
        let mut out = vec![0f32; h.len()];
        let rows = rows_per_task(width);
        std::thread::scope(|scope| {
            let tasks: Vec<_> = h
                .chunks(2 * width * rows)
                .zip(g.chunks(width * rows))
                .zip(out.chunks_mut(2 * width * rows))
                .collect();
            parallel_for(scope, tasks, |((src, grad), dst)| {
                geglu_backward_rows(src, grad, dst, width)
            });
        });
        Ok((CpuStorage::F32(out), h_layout.shape().clone()))
    }
}

/// Runs `work` over `tasks` on candle's CPU thread count (the calling thread takes a share).
fn parallel_for<'scope, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    tasks: Vec<T>,
    work: impl Fn(T) + Sync + Send + Copy + 'scope,
) {
    let threads = candle_core::utils::get_num_threads().clamp(1, tasks.len().max(1));
    let mut shares: Vec<Vec<T>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, task) in tasks.into_iter().enumerate() {
        shares[i % threads].push(task);
    }
    let mine = shares.remove(0);
    for share in shares {
        scope.spawn(move || share.into_iter().for_each(work));
    }
    mine.into_iter().for_each(work);
}

/// `value * gelu(gate)` over the two halves `[value | gate]` of `h`'s last axis (exact, erf
/// GELU as `torch.nn.functional.gelu`). Fused on contiguous f32 CPU tensors, with its own
/// backward; composed from candle ops elsewhere.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if applies(h)? {
        return h.contiguous()?.apply_op1(GegluCpu);
    }
    geglu_composed(h)
}

/// Whether the fused pass takes `h`: an f32 CPU tensor whose last axis has an even length.
pub fn applies(h: &Tensor) -> Result<bool> {
    let width = h.dim(D::Minus1)?;
    Ok(h.device().is_cpu() && h.dtype() == DType::F32 && width.is_multiple_of(2))
}

/// Exact (erf) GELU, as `torch.nn.functional.gelu` by default.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// [`geglu`] from candle's ops.
pub fn geglu_composed(h: &Tensor) -> Result<Tensor> {
    let inner = h.dim(D::Minus1)? / 2;
    let value = h.narrow(D::Minus1, 0, inner)?;
    let gate = h.narrow(D::Minus1, inner, inner)?;
    value * gate.gelu_erf()?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_diff, randn};
    use candle_core::Var;

    /// erf against libm's f64 erf over the whole range that matters and beyond, and its
    /// special values.
    #[test]
    fn erf_matches_libm() {
        // Inside the fitted range the expansion's error; from |z| = 4 on the result is ±1,
        // off by erfc(|z|) <= erfc(4) = 1.54e-8 (an eighth of an f32 ulp of 1).
        let (mut fitted, mut beyond) = (0f64, 0f64);
        for i in -600_000..=600_000 {
            let z = i as f64 * 1e-5;
            let err = (erf_lane(z) - libm::erf(z)).abs();
            // `f64::max` would skip a NaN.
            assert!(err.is_finite(), "erf({z}) = {}", erf_lane(z));
            if z.abs() < 4.0 {
                fitted = fitted.max(err);
            } else {
                beyond = beyond.max(err);
            }
        }
        assert!(fitted < 6e-9, "worst in [-4, 4]: {fitted}");
        assert!(
            beyond <= libm::erfc(4.0) * 1.000_001,
            "worst beyond: {beyond}"
        );
        assert!(erf_lane(0.0).abs() < 6e-9);
        assert_eq!(erf_lane(9.0), 1.0);
        assert_eq!(erf_lane(-9.0), -1.0);
        assert_eq!(erf_lane(f64::INFINITY), 1.0);
        assert_eq!(erf_lane(f64::NEG_INFINITY), -1.0);
        assert!(erf_lane(f64::NAN).is_nan());
    }

    /// The fused GEGLU against candle's composed ops: values on random and wide-ranged inputs,
    /// odd widths and a single row, and NaN/inf passing through as candle's do.
    #[test]
    fn fused_geglu_matches_composed() {
        // Against the f64 truth the fused result is within an f32 rounding (it forms the
        // product in f64 and rounds once) plus erf's absolute error (6e-9 fitted, 1.6e-8 where
        // it is ±1) times |value * gate| / 2, which is what limits it where `1 + erf` is small
        // (negative gates). The composed ops round erf near ±1 to f32 before
        // adding 1, so for negative gates `1 + erf` carries an absolute error of up to an ulp of
        // 1: they may differ by that much times |value * gate| / 2 on top.
        let values = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        for shape in [[2usize, 7, 10], [1, 1, 2], [3, 33, 130]] {
            let h = (randn(11, &shape) * 3.0).unwrap();
            let (fused, composed) = (
                values(&geglu(&h).unwrap()),
                values(&geglu_composed(&h).unwrap()),
            );
            let width = shape[2] / 2;
            let input = values(&h);
            for (row, (f, c)) in input
                .chunks(2 * width)
                .zip(fused.chunks(width).zip(composed.chunks(width)))
            {
                for i in 0..width {
                    let (v, g) = (row[i] as f64, row[width + i] as f64);
                    let truth = v * g * 0.5 * (1.0 + libm::erf(g / std::f64::consts::SQRT_2));
                    let to_truth = (f[i] as f64 - truth).abs();
                    assert!(
                        to_truth <= 1e-7 * truth.abs() + 8e-9 * (v * g).abs() + 1e-30,
                        "{shape:?}: {} vs {truth}",
                        f[i]
                    );
                    let bound = 2.5e-7 * truth.abs().max(1e-6) + 0.6e-7 * (v * g).abs();
                    assert!(
                        ((f[i] - c[i]) as f64).abs() <= bound,
                        "{shape:?}: fused {} composed {} truth {truth}",
                        f[i],
                        c[i]
                    );
                }
            }
        }
        let special = Tensor::new(
            &[[
                1.0f32,
                2.0,
                -3.0,
                0.0,
                1.0,
                0.5,
                f32::INFINITY,
                40.0,
                -40.0,
                f32::NAN,
            ]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let fused: Vec<f32> = geglu(&special)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let composed: Vec<f32> = geglu_composed(&special)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in fused.iter().zip(&composed) {
            assert!(
                a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{fused:?} vs {composed:?}"
            );
        }
    }

    /// The fused backward against candle's backward of the composed ops (gradient for the
    /// projection through both halves), also through a non-contiguous input.
    #[test]
    fn fused_geglu_gradient_matches_composed() {
        for shape in [[2usize, 5, 12], [1, 9, 2]] {
            let h = Var::from_tensor(&(randn(3, &shape) * 2.5).unwrap()).unwrap();
            let weight = randn(4, &[shape[0], shape[1], shape[2] / 2]);
            let loss = |y: Tensor| (y * &weight).unwrap().sum_all().unwrap();
            let fused = loss(geglu(h.as_tensor()).unwrap()).backward().unwrap();
            let composed = loss(geglu_composed(h.as_tensor()).unwrap())
                .backward()
                .unwrap();
            let err = max_diff(fused.get(&h).unwrap(), composed.get(&h).unwrap());
            assert!(err < 2e-6, "{shape:?}: {err}");
        }
        let h = Var::from_tensor(&randn(5, &[6, 4])).unwrap();
        let view = h.as_tensor().t().unwrap();
        let fused = geglu(&view).unwrap().sum_all().unwrap().backward().unwrap();
        let composed = geglu_composed(&view)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let err = max_diff(fused.get(&h).unwrap(), composed.get(&h).unwrap());
        assert!(err < 2e-6, "transposed view: {err}");
    }
}
