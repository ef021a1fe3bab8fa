//! CPU convolutions of the detector with bias and LeakyReLU fused: 1x1 (pointwise) convolutions
//! as one matrix product per image, small-input-channel convolutions (the 3-channel stem) by
//! banded im2col, and an in-place bias + activation epilogue for the other convolutions.
//!
//! Each computes `leaky(bias[o] + conv(x, kernel)[o])` (`torch.nn.Conv2d` then
//! `LeakyReLU(slope)` when a slope is given). Layout: `x` [B, C_in, H, W], `kernel`
//! [C_out, C_in, kH, kW], `bias` [C_out], f32, zero padding. Non-CPU devices, other dtypes and
//! gradient-tracking tensors take the composed candle ops ([`conv2d_composed`]).
//!
//! Why: at 1600x900, candle 0.11's 1x1 convolution (im2col, matmul, transpose back) and the
//! separate bias/activation passes over stride-2..4 feature maps cost more than the rest of the
//! network, and the shifted-gemm path runs the 3-channel stem as nine products with k = 3
//! (`examples/faces_detect_timing.rs` measures the whole detector).

use candle_core::{CpuStorage, CustomOp3, DType, InplaceOp2, Layout, Result, Shape, Tensor};

/// Per-output-channel activation `max(v, slope·v)` after the bias: slope 1 is none, 0 is ReLU,
/// 0.1 is LeakyReLU 0.1 (exact for slopes in [0, 1]). An empty slice means no activation.
pub fn activate_composed(y: &Tensor, slopes: &[f32]) -> Result<Tensor> {
    if slopes.is_empty() {
        return Ok(y.clone());
    }
    let s = Tensor::from_slice(slopes, (1, slopes.len(), 1, 1), y.device())?.to_dtype(y.dtype())?;
    y.maximum(&y.broadcast_mul(&s)?)
}

/// The composed reference: candle's convolution, bias, activation.
pub fn conv2d_composed(
    x: &Tensor,
    kernel: &Tensor,
    bias: &Tensor,
    (stride, padding): (usize, usize),
    slopes: &[f32],
) -> Result<Tensor> {
    let y = x.conv2d(kernel, padding, stride, 1, 1)?;
    let y = y.broadcast_add(&bias.reshape((1, bias.dims1()?, 1, 1))?)?;
    activate_composed(&y, slopes)
}

fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op())
}

/// A 1x1 stride-1 convolution with bias and per-channel activation slopes (see
/// [`activate_composed`]).
pub fn pointwise_conv2d(
    x: &Tensor,
    kernel: &Tensor,
    bias: &Tensor,
    slopes: &[f32],
) -> Result<Tensor> {
    if !cpu_f32(&[x, kernel, bias]) {
        return conv2d_composed(x, kernel, bias, (1, 0), slopes);
    }
    let op = Im2colConv {
        stride: 1,
        padding: 0,
        slopes: slopes.to_vec(),
    };
    x.contiguous()?
        .apply_op3_no_bwd(&kernel.contiguous()?, &bias.contiguous()?, &op)
}

/// A convolution computed by im2col over bands of output rows and one matrix product per band:
/// for few input channels (the stem), where the shifted-gemm path's per-tap products are thin.
pub fn im2col_conv2d(
    x: &Tensor,
    kernel: &Tensor,
    bias: &Tensor,
    (stride, padding): (usize, usize),
    slopes: &[f32],
) -> Result<Tensor> {
    if !cpu_f32(&[x, kernel, bias]) {
        return conv2d_composed(x, kernel, bias, (stride, padding), slopes);
    }
    let op = Im2colConv {
        stride,
        padding,
        slopes: slopes.to_vec(),
    };
    x.contiguous()?
        .apply_op3_no_bwd(&kernel.contiguous()?, &bias.contiguous()?, &op)
}

/// `y + bias` (per channel of [B, C, H, W]) then the per-channel activation, in place on a CPU
/// f32 contiguous `y` that nothing else shares (a convolution's fresh output); composed elsewhere.
pub(super) fn add_bias_act(y: Tensor, bias: &Tensor, slopes: &[f32]) -> Result<Tensor> {
    if !cpu_f32(&[&y, bias]) || !y.is_contiguous() {
        let y = y.broadcast_add(&bias.reshape((1, bias.dims1()?, 1, 1))?)?;
        return activate_composed(&y, slopes);
    }
    y.inplace_op2(&bias.contiguous()?, &BiasAct(slopes.to_vec()))?;
    Ok(y)
}

/// Output length of a `k`-tap convolution (0 when the padded input is shorter than `k`).
fn out_len(n: usize, k: usize, s: usize, p: usize) -> usize {
    (n + 2 * p).checked_sub(k).map_or(0, |d| d / s + 1)
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("retinaface conv: contiguous f32 {what} expected"),
    }
}

/// Adds `bias[o]` to every element of plane `o` (planes cycle through the channels) and applies
/// `max(v, slopes[o]·v)` (no activation when `slopes` is empty).
fn bias_act_planes(out: &mut [f32], bias: &[f32], plane: usize, slopes: &[f32]) {
    if plane == 0 {
        return;
    }
    for (o, values) in out.chunks_exact_mut(plane).enumerate() {
        let c = o % bias.len();
        let b = bias[c];
        match slopes.get(c) {
            Some(&s) => values.iter_mut().for_each(|v| {
                let t = *v + b;
                *v = t.max(t * s);
            }),
            None => values.iter_mut().for_each(|v| *v += b),
        }
    }
}

struct Im2colConv {
    stride: usize,
    padding: usize,
    slopes: Vec<f32>,
}

impl CustomOp3 for Im2colConv {
    fn name(&self) -> &'static str {
        "retinaface-im2col-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "input")?;
        let kernel = contiguous_f32(ks, kl, "kernel")?;
        let bias = contiguous_f32(bs, bl, "bias")?;
        let (batch, c_in, h, w) = xl.shape().dims4()?;
        let (c_out, k_c_in, kh, kw) = kl.shape().dims4()?;
        let (s, p) = (self.stride, self.padding);
        let slopes_ok = self.slopes.is_empty() || self.slopes.len() == c_out;
        if k_c_in != c_in || bias.len() != c_out || s == 0 || !slopes_ok {
            candle_core::bail!(
                "retinaface conv: input {:?}, kernel {:?}, {} biases, {} slopes",
                xl.shape(),
                kl.shape(),
                bias.len(),
                self.slopes.len()
            );
        }
        let (oh, ow) = (out_len(h, kh, s, p), out_len(w, kw, s, p));
        let shape = Shape::from((batch, c_out, oh, ow));
        let mut out = vec![0f32; batch * c_out * oh * ow];
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), shape));
        }
        let depth = c_in * kh * kw;
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        let direct = kh == 1 && kw == 1 && s == 1 && p == 0;
        // A band's column matrix stays within about 4 MB (reused across bands).
        let band_rows = if direct {
            oh
        } else {
            ((1usize << 20) / (depth * ow).max(1)).clamp(1, oh)
        };
        let mut cols = if direct {
            Vec::new()
        } else {
            vec![0f32; depth * band_rows * ow]
        };
        for n in 0..batch {
            let image = &x[n * c_in * h * w..(n + 1) * c_in * h * w];
            let out_image = &mut out[n * c_out * oh * ow..(n + 1) * c_out * oh * ow];
            for band_start in (0..oh).step_by(band_rows) {
                let rows = band_rows.min(oh - band_start);
                let n_cols = rows * ow;
                let (rhs, rhs_rs): (&[f32], usize) = if direct {
                    (image, h * w)
                } else {
                    // row (c, ky, kx) of the band's column matrix, column (oy, ox)
                    for (r, row) in cols.chunks_exact_mut(band_rows * ow).enumerate() {
                        let (c, ky, kx) = (r / (kh * kw), (r / kw) % kh, r % kw);
                        let plane = &image[c * h * w..(c + 1) * h * w];
                        for (oy, dst) in row[..n_cols].chunks_exact_mut(ow).enumerate() {
                            let iy = ((band_start + oy) * s + ky) as isize - p as isize;
                            if iy < 0 || iy >= h as isize {
                                dst.fill(0.0);
                                continue;
                            }
                            let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                            // columns whose input `ox·s + kx - p` lies inside [0, w)
                            let lo = p.saturating_sub(kx).div_ceil(s).min(ow);
                            let hi = (w + p).saturating_sub(kx).div_ceil(s).clamp(lo, ow);
                            dst[..lo].fill(0.0);
                            dst[hi..].fill(0.0);
                            let first = lo * s + kx - p;
                            if s == 1 {
                                dst[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                            } else {
                                for (d, v) in
                                    dst[lo..hi].iter_mut().zip(src[first..].iter().step_by(s))
                                {
                                    *d = *v;
                                }
                            }
                        }
                    }
                    (&cols, band_rows * ow)
                };
                // SAFETY: dst is `c_out` rows (stride oh·ow) of `n_cols` contiguous elements
                // starting at the band's first output row, inside `out_image`; lhs is the
                // kernel as a `c_out x depth` row-major matrix; rhs is `depth` rows (stride
                // rhs_rs >= n_cols) of `n_cols` elements inside `rhs`.
                unsafe {
                    gemm::gemm(
                        c_out,
                        n_cols,
                        depth,
                        out_image.as_mut_ptr().add(band_start * ow),
                        1,
                        (oh * ow) as isize,
                        false,
                        kernel.as_ptr(),
                        1,
                        depth as isize,
                        rhs.as_ptr(),
                        1,
                        rhs_rs as isize,
                        0f32,
                        1f32,
                        false,
                        false,
                        false,
                        parallelism,
                    );
                }
            }
            bias_act_planes(out_image, bias, oh * ow, &self.slopes);
        }
        Ok((CpuStorage::F32(out), shape))
    }
}

struct BiasAct(Vec<f32>);

impl InplaceOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "retinaface-bias-leaky"
    }

    fn cpu_fwd(
        &self,
        ys: &mut CpuStorage,
        yl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<()> {
        let bias = contiguous_f32(bs, bl, "bias")?;
        let (_, c, h, w) = yl.shape().dims4()?;
        let (start, end) = match yl.contiguous_offsets() {
            Some(r) => r,
            None => candle_core::bail!("bias + leaky: contiguous output expected"),
        };
        if bias.len() != c || !(self.0.is_empty() || self.0.len() == c) {
            candle_core::bail!(
                "bias + act: {} biases, {} slopes for {c} channels",
                bias.len(),
                self.0.len()
            );
        }
        match ys {
            CpuStorage::F32(v) => bias_act_planes(&mut v[start..end], bias, h * w, &self.0),
            _ => candle_core::bail!("bias + leaky: f32 output expected"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_abs, max_diff, randn};

    /// f32 rounding bound for sums reordered: relative to the output's largest magnitude.
    fn close(a: &Tensor, b: &Tensor) -> bool {
        max_diff(a, b) <= 4e-6 * (1.0 + max_abs(b))
    }

    #[test]
    fn fused_convs_match_candle() {
        for (seed, (c_in, c_out, h, w)) in
            [(3, 8, 9, 13), (8, 16, 1, 1), (5, 4, 2, 7), (16, 6, 12, 11)]
                .into_iter()
                .enumerate()
        {
            let seed = seed as u64 * 10;
            let x = randn(seed, &[2, c_in, w, h]).transpose(2, 3).unwrap();
            let b = randn(seed + 2, &[c_out]);
            let mixed: Vec<f32> = (0..c_out).map(|o| [1.0, 0.0, 0.1][o % 3]).collect();
            for slopes in [vec![], vec![0.1; c_out], mixed] {
                let slope = slopes.as_slice();
                let k1 = randn(seed + 1, &[c_out, c_in, 1, 1]);
                let fused = pointwise_conv2d(&x, &k1, &b, slope).unwrap();
                let composed = conv2d_composed(&x, &k1, &b, (1, 0), slope).unwrap();
                assert!(
                    close(&fused, &composed),
                    "pointwise {c_in}->{c_out} {h}x{w}"
                );
                let k3 = randn(seed + 3, &[c_out, c_in, 3, 3]);
                for stride in [1, 2] {
                    let fused = im2col_conv2d(&x, &k3, &b, (stride, 1), slope).unwrap();
                    let composed = conv2d_composed(&x, &k3, &b, (stride, 1), slope).unwrap();
                    let d = max_diff(&fused, &composed);
                    assert!(
                        close(&fused, &composed),
                        "im2col {c_in}->{c_out} {h}x{w} s{stride}: {d}"
                    );
                }
                let plain = x.conv2d(&k3, 1, 1, 1, 1).unwrap();
                let fused = add_bias_act(plain.contiguous().unwrap(), &b, slope).unwrap();
                let composed = conv2d_composed(&x, &k3, &b, (1, 1), slope).unwrap();
                assert!(close(&fused, &composed), "bias+act {c_in}->{c_out}");
            }
        }
    }

    #[test]
    fn activation_slopes() {
        let y = Tensor::new(
            &[[[[-2f32]], [[-2.0]], [[-2.0]], [[3.0]]]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let out = activate_composed(&y, &[1.0, 0.0, 0.1, 0.1]).unwrap();
        let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![-2.0, 0.0, -0.2, 3.0]);
    }
}
