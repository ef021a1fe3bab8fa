//! Depthwise 2-D convolution with bias and optional LeakyReLU, fused, for the MobileNet backbone.
//!
//! `y[b, c] = leaky(bias[c] + sum_{ky,kx} k[c, 0, ky, kx] · x[b, c, oy·s + ky - p, ox·s + kx - p])`
//! (zero padding), i.e. `torch.nn.Conv2d(C, C, k, stride=s, padding=p, groups=C)` followed by
//! `LeakyReLU(slope)` when a slope is given. Layout: `x` [B, C, H, W], `kernel` [C, 1, kH, kW],
//! `bias` [C], f32. Output `[B, C, (H + 2p - kH)/s + 1, (W + 2p - kW)/s + 1]`.
//!
//! Why: candle 0.11 runs a grouped convolution as one convolution per group, which for the
//! 8..256-channel depthwise layers of MobileNet-0.25 dominated the detector's CPU time. The CPU
//! body walks each (batch, channel) plane directly, planes split over candle's thread count; other
//! devices (and gradients) take the composed candle ops ([`depthwise_conv2d_composed`]).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Geometry and activation of one depthwise layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DepthwiseConfig {
    pub stride: usize,
    pub padding: usize,
    /// LeakyReLU negative slope applied after the bias; `None` for no activation.
    pub leaky_slope: Option<f32>,
}

/// The fused depthwise convolution: the CPU kernel for contiguous-able f32 CPU tensors, the
/// composed candle ops elsewhere.
pub fn depthwise_conv2d(
    x: &Tensor,
    kernel: &Tensor,
    bias: &Tensor,
    cfg: &DepthwiseConfig,
) -> Result<Tensor> {
    let fast = x.device().is_cpu()
        && [x, kernel, bias].iter().all(|t| t.dtype() == DType::F32)
        && ![x, kernel, bias].iter().any(|t| t.track_op());
    if !fast {
        return depthwise_conv2d_composed(x, kernel, bias, cfg);
    }
    let (_, c, _, _) = x.dims4()?;
    let (kc, one, _, _) = kernel.dims4()?;
    if kc != c || one != 1 || bias.dims1()? != c {
        candle_core::bail!(
            "depthwise conv: input has {c} channels, kernel {:?}, bias {:?}",
            kernel.dims(),
            bias.dims()
        );
    }
    x.contiguous()?.apply_op3_no_bwd(
        &kernel.contiguous()?,
        &bias.contiguous()?,
        &DepthwiseCpu(*cfg),
    )
}

/// The same computation with candle's grouped convolution: the reference of the tests and the
/// path of non-CPU devices.
pub fn depthwise_conv2d_composed(
    x: &Tensor,
    kernel: &Tensor,
    bias: &Tensor,
    cfg: &DepthwiseConfig,
) -> Result<Tensor> {
    let groups = x.dim(1)?;
    let y = x.conv2d(kernel, cfg.padding, cfg.stride, 1, groups)?;
    let y = y.broadcast_add(&bias.reshape((1, groups, 1, 1))?)?;
    match cfg.leaky_slope {
        Some(slope) => leaky_relu(&y, slope),
        None => Ok(y),
    }
}

/// `max(x, slope·x)`, which is LeakyReLU for `0 <= slope <= 1`.
pub fn leaky_relu(x: &Tensor, slope: f32) -> Result<Tensor> {
    x.maximum(&x.affine(slope as f64, 0.0)?)
}

/// Output length of a `k`-tap, stride `s`, padding `p` convolution over `n` inputs (0 when the
/// padded input is shorter than the kernel).
fn out_len(n: usize, k: usize, s: usize, p: usize) -> usize {
    (n + 2 * p).checked_sub(k).map_or(0, |d| d / s + 1)
}

struct DepthwiseCpu(DepthwiseConfig);

impl CustomOp3 for DepthwiseCpu {
    fn name(&self) -> &'static str {
        "retinaface-depthwise-conv2d"
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
        let slice = |s: &CpuStorage, l: &Layout, what: &str| -> Result<Vec<f32>> {
            match (s, l.contiguous_offsets()) {
                (CpuStorage::F32(v), Some((a, b))) => Ok(v[a..b].to_vec()),
                _ => candle_core::bail!("depthwise conv: contiguous f32 {what} expected"),
            }
        };
        let (x, k, bias) = match (xs, xl.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => {
                (&v[a..b], slice(ks, kl, "kernel")?, slice(bs, bl, "bias")?)
            }
            _ => candle_core::bail!("depthwise conv: contiguous f32 input expected"),
        };
        let (batch, c, h, w) = xl.shape().dims4()?;
        let (_, _, kh, kw) = kl.shape().dims4()?;
        let DepthwiseConfig {
            stride,
            padding,
            leaky_slope,
        } = self.0;
        let (oh, ow) = (
            out_len(h, kh, stride, padding),
            out_len(w, kw, stride, padding),
        );
        let mut out = vec![0f32; batch * c * oh * ow];
        let planes = batch * c;
        if oh * ow == 0 || planes == 0 {
            return Ok((CpuStorage::F32(out), Shape::from((batch, c, oh, ow))));
        }
        let plane = |idx: usize, out_plane: &mut [f32]| {
            let ch = idx % c;
            let input = &x[idx * h * w..(idx + 1) * h * w];
            let taps = &k[ch * kh * kw..(ch + 1) * kh * kw];
            out_plane.fill(bias[ch]);
            for (oy, out_row) in out_plane.chunks_exact_mut(ow).enumerate() {
                for ky in 0..kh {
                    let iy = (oy * stride + ky) as isize - padding as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let in_row = &input[iy as usize * w..(iy as usize + 1) * w];
                    for kx in 0..kw {
                        let tap = taps[ky * kw + kx];
                        // columns whose input `ox·s + kx - p` lies inside [0, w)
                        let lo = padding.saturating_sub(kx).div_ceil(stride);
                        let hi = ((w + padding).saturating_sub(kx)).div_ceil(stride).min(ow);
                        if lo >= hi {
                            continue;
                        }
                        let first = lo * stride + kx - padding;
                        if stride == 1 {
                            let src = &in_row[first..first + (hi - lo)];
                            for (o, &v) in out_row[lo..hi].iter_mut().zip(src) {
                                *o += tap * v;
                            }
                        } else {
                            for (n, o) in out_row[lo..hi].iter_mut().enumerate() {
                                *o += tap * in_row[first + n * stride];
                            }
                        }
                    }
                }
            }
            if let Some(slope) = leaky_slope {
                for v in out_plane.iter_mut() {
                    *v = v.max(*v * slope);
                }
            }
        };
        let plane_len = oh * ow;
        let threads = candle_core::utils::get_num_threads().clamp(1, planes);
        let per_thread = planes.div_ceil(threads);
        let plane = &plane;
        std::thread::scope(|scope| {
            for (t, chunk) in out.chunks_mut(per_thread * plane_len).enumerate() {
                scope.spawn(move || {
                    for (n, out_plane) in chunk.chunks_exact_mut(plane_len).enumerate() {
                        plane(t * per_thread + n, out_plane);
                    }
                });
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((batch, c, oh, ow))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_diff, randn};

    #[test]
    fn matches_candle_grouped_conv() {
        // odd sizes, both strides, with and without activation, batch 2, non-contiguous input
        for (seed, (h, w)) in [(7usize, 9usize), (1, 1), (2, 5), (16, 11)]
            .into_iter()
            .enumerate()
        {
            for stride in [1, 2] {
                for slope in [None, Some(0.1)] {
                    let c = 5;
                    let x = randn(seed as u64, &[2, c, w, h]).transpose(2, 3).unwrap();
                    let k = randn(100 + seed as u64, &[c, 1, 3, 3]);
                    let b = randn(200 + seed as u64, &[c]);
                    let cfg = DepthwiseConfig {
                        stride,
                        padding: 1,
                        leaky_slope: slope,
                    };
                    let fused = depthwise_conv2d(&x, &k, &b, &cfg).unwrap();
                    let composed = depthwise_conv2d_composed(&x, &k, &b, &cfg).unwrap();
                    let d = max_diff(&fused, &composed);
                    assert!(d < 1e-5, "{h}x{w} stride {stride} {slope:?}: max diff {d}");
                }
            }
        }
    }

    #[test]
    fn output_geometry() {
        assert_eq!(out_len(7, 3, 2, 1), 4);
        assert_eq!(out_len(1, 3, 2, 1), 1);
        assert_eq!(out_len(1, 3, 1, 0), 0);
        assert_eq!(out_len(8, 3, 2, 1), 4);
    }
}
