//! `torch.nn.GroupNorm(groups, channels, eps, affine=True)` on NCHW (or NC...) tensors, alone
//! or followed by the SiLU every UNet and VAE block applies: per (sample, group) row,
//! `(x - mean) / sqrt(var + eps) * w[c] + b[c]`.
//!
//! Layout: the fused CPU pass takes a contiguous f32 CPU input of rank 2 or more with constant
//! (untracked) f32 affine parameters ([`applies`]); it computes the statistics in f64. Anything
//! else (other devices and dtypes, trained affine parameters) runs [`group_norm_composed`], with
//! statistics in f32. Where it pays: one pass instead of seven tensor-wide ones (eight with the
//! SiLU); in training one backward pass that recomputes the statistics from the saved input,
//! where the composed graph kept several activation-sized tensors per norm.

use super::cpu::{f32_slice, for_each_row};
use super::differentiable;
use super::frozen::{add_const, mul_const};
use candle_core::{DType, Result, Tensor};

/// A GroupNorm's parameters: `weight` and `bias` of one value per channel.
#[derive(Debug, Clone)]
pub struct GroupNormParams {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f64,
}

/// Whether the fused CPU pass takes `x` with `p`: a contiguous f32 CPU input, f32 affine
/// parameters that carry no gradient.
pub fn applies(x: &Tensor, p: &GroupNormParams) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && p.weight.dtype() == DType::F32
        && x.is_contiguous()
        && !p.weight.track_op()
        && !p.bias.track_op()
}

/// GroupNorm of `x` (then `silu` when asked): the fused CPU pass where it [`applies`], with a
/// backward for `x` in differentiable mode; [`group_norm_composed`] elsewhere.
pub fn group_norm(x: &Tensor, p: &GroupNormParams, silu: bool) -> Result<Tensor> {
    if !applies(x, p) {
        return group_norm_composed(x, p, silu);
    }
    let op = FusedGroupNormCpu {
        groups: p.groups,
        eps: p.eps,
        weight: p.weight.to_vec1()?,
        bias: p.bias.to_vec1()?,
        silu,
    };
    if differentiable() && x.track_op() {
        x.apply_op1(op)
    } else {
        x.apply_op1_no_bwd(&op)
    }
}

/// The norm (then `silu`) from plain candle ops: differentiable in everything, any device and
/// dtype, statistics in f32. Constant affine parameters get no gradient in differentiable mode
/// ([`super::frozen`]).
pub fn group_norm_composed(x: &Tensor, p: &GroupNormParams, silu: bool) -> Result<Tensor> {
    let dtype = x.dtype();
    let dims = x.dims().to_vec();
    if dims.len() < 2 {
        candle_core::bail!("group norm: an input of rank 2 or more expected, got {dims:?}");
    }
    let (b, c) = (dims[0], dims[1]);
    let x = x.to_dtype(DType::F32)?.reshape((b, p.groups, ()))?;
    let n = x.dim(2)? as f64;
    let mean = (x.sum_keepdim(2)? / n)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = (centered.sqr()?.sum_keepdim(2)? / n)?;
    let normed = centered.broadcast_div(&(var + p.eps)?.sqrt()?)?;
    let mut affine_shape = vec![1usize; dims.len()];
    affine_shape[1] = c;
    let normed = normed.reshape(dims.as_slice())?.to_dtype(dtype)?;
    let y = add_const(
        &mul_const(&normed, &p.weight.reshape(affine_shape.as_slice())?)?,
        &p.bias.reshape(affine_shape.as_slice())?,
    )?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}

/// Mean and `1 / sqrt(var + eps)` of one (sample, group) row, in f64.
fn row_stats(x_row: &[f32], eps: f64) -> (f64, f64) {
    let n = x_row.len() as f64;
    let mean = x_row.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x_row
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// GroupNorm on contiguous f32 CPU tensors with constant affine parameters: per (sample, group)
/// mean and variance in f64 accumulators, then `(x - mean) / sqrt(var + eps) * w[c] + b[c]`,
/// rows split over threads; with `silu` the SiLU that follows every norm of the UNet and VAE
/// blocks is applied in the same pass. Its backward gives the input gradient in one fused pass
/// as well ([`GroupNormInputGradCpu`]), recomputing the statistics (and the SiLU's input) from
/// the saved input, so training keeps one tensor per norm instead of three.
struct FusedGroupNormCpu {
    groups: usize,
    eps: f64,
    weight: Vec<f32>,
    bias: Vec<f32>,
    silu: bool,
}

/// d silu(v) / dv = s(v) * (1 + v * (1 - s(v))), with s the logistic function.
fn silu_slope(v: f32) -> f64 {
    let s = 1.0 / (1.0 + (-(v as f64)).exp());
    s * (1.0 + v as f64 * (1.0 - s))
}

impl candle_core::CustomOp1 for FusedGroupNormCpu {
    fn name(&self) -> &'static str {
        "group-norm-cpu"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let dims = layout.shape().dims();
        let c = dims[1];
        let spatial: usize = dims[2..].iter().product();
        let x = f32_slice(storage, layout, "fused group norm")?;
        let per_group = c / self.groups;
        let group_len = per_group * spatial;
        let mut out = vec![0f32; x.len()];
        for_each_row(&mut out, group_len, |row, out_row| {
            let x_row = &x[row * group_len..(row + 1) * group_len];
            let (mean, rstd) = row_stats(x_row, self.eps);
            let first_channel = (row % self.groups) * per_group;
            for (k, (o, xs)) in out_row
                .chunks_mut(spatial)
                .zip(x_row.chunks(spatial))
                .enumerate()
            {
                let ch = first_channel + k;
                let scale = (rstd * self.weight[ch] as f64) as f32;
                let shift = (self.bias[ch] as f64 - mean * rstd * self.weight[ch] as f64) as f32;
                for (o, &v) in o.iter_mut().zip(xs) {
                    *o = v * scale + shift;
                }
                if self.silu {
                    // silu(y) = y / (1 + exp(-y)), the exponentials vectorized over blocks
                    // of a stack buffer (no allocation per channel).
                    let mut e = [0f32; 256];
                    for block in o.chunks_mut(e.len()) {
                        let e = &mut e[..block.len()];
                        for (e, &y) in e.iter_mut().zip(block.iter()) {
                            *e = -y;
                        }
                        super::fast_exp::exp_in_place(e);
                        for (y, &e) in block.iter_mut().zip(e.iter()) {
                            *y /= 1.0 + e;
                        }
                    }
                }
            }
        });
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &candle_core::Tensor,
        _y: &candle_core::Tensor,
        grad_y: &candle_core::Tensor,
    ) -> Result<Option<candle_core::Tensor>> {
        let op = GroupNormInputGradCpu {
            groups: self.groups,
            eps: self.eps,
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            silu: self.silu,
        };
        Ok(Some(x.apply_op2_no_bwd(&grad_y.contiguous()?, &op)?))
    }
}

/// The input gradient of [`FusedGroupNormCpu`]: with `xh = (x - mean) * rstd` and
/// `d = dy * w[c]`, per (sample, group) row `dx = rstd * (d - mean(d) - xh * mean(d * xh))`;
/// with `silu`, `dy` is first multiplied by the SiLU's slope at `xh * w[c] + b[c]`.
struct GroupNormInputGradCpu {
    groups: usize,
    eps: f64,
    weight: Vec<f32>,
    bias: Vec<f32>,
    silu: bool,
}

impl candle_core::CustomOp2 for GroupNormInputGradCpu {
    fn name(&self) -> &'static str {
        "group-norm-input-grad-cpu"
    }

    fn cpu_fwd(
        &self,
        x_storage: &candle_core::CpuStorage,
        x_layout: &candle_core::Layout,
        dy_storage: &candle_core::CpuStorage,
        dy_layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let dims = x_layout.shape().dims();
        let c = dims[1];
        let spatial: usize = dims[2..].iter().product();
        let x = f32_slice(x_storage, x_layout, "group norm gradient")?;
        let dy = f32_slice(dy_storage, dy_layout, "group norm gradient")?;
        if dy.len() != x.len() {
            candle_core::bail!("group norm gradient: {} vs {} elements", dy.len(), x.len());
        }
        let per_group = c / self.groups;
        let group_len = per_group * spatial;
        let mut out = vec![0f32; x.len()];
        for_each_row(&mut out, group_len, |row, out_row| {
            let range = row * group_len..(row + 1) * group_len;
            let (x_row, dy_row) = (&x[range.clone()], &dy[range]);
            let (mean, rstd) = row_stats(x_row, self.eps);
            let first_channel = (row % self.groups) * per_group;
            let channel_of = |i: usize| first_channel + i / spatial;
            // d = (gradient at the norm's output) * w[c], kept in the output row meanwhile.
            let (mut sum_d, mut sum_d_xh) = (0f64, 0f64);
            for (i, (o, (&xv, &g))) in out_row.iter_mut().zip(x_row.iter().zip(dy_row)).enumerate()
            {
                let ch = channel_of(i);
                let xh = (xv as f64 - mean) * rstd;
                let mut g = g as f64;
                if self.silu {
                    let y = (xh * self.weight[ch] as f64 + self.bias[ch] as f64) as f32;
                    g *= silu_slope(y);
                }
                let d = g * self.weight[ch] as f64;
                *o = d as f32;
                sum_d += d;
                sum_d_xh += d * xh;
            }
            let n = group_len as f64;
            let (mean_d, mean_d_xh) = (sum_d / n, sum_d_xh / n);
            for (o, &xv) in out_row.iter_mut().zip(x_row) {
                let xh = (xv as f64 - mean) * rstd;
                *o = (rstd * (*o as f64 - mean_d - xh * mean_d_xh)) as f32;
            }
        });
        Ok((candle_core::CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_diff, randn};
    use crate::kernels::DifferentiableScope;

    const CASES: [(&[usize], usize); 3] =
        [(&[2, 64, 5, 7], 32), (&[1, 12, 9], 4), (&[3, 6, 4, 4], 6)];

    fn params(c: usize, groups: usize) -> GroupNormParams {
        GroupNormParams {
            weight: randn(1, &[c]),
            bias: randn(2, &[c]),
            groups,
            eps: 1e-5,
        }
    }

    #[test]
    fn fused_cpu_group_norm_matches_the_composed_one() {
        for silu in [false, true] {
            for (shape, groups) in CASES {
                let p = params(shape[1], groups);
                // An offset mean, as real activations have.
                let x = ((randn(3, shape) * 3.0).unwrap() + 5.0).unwrap();
                assert!(applies(&x, &p));
                let fused = group_norm(&x, &p, silu).unwrap();
                let composed = group_norm_composed(&x, &p, silu).unwrap();
                let err = max_diff(&fused, &composed);
                println!("{shape:?} silu {silu}: max abs error {err:e}");
                assert!(err < 2e-5, "{shape:?} silu {silu}: {err}");
            }
        }
    }

    /// In training the fused norm's input gradient against candle's backward of the composed
    /// ops; the affine parameters are constants and get no gradient.
    #[test]
    fn fused_cpu_group_norm_gradient_matches_the_composed_one() {
        for silu in [false, true] {
            for (shape, groups) in CASES {
                let p = params(shape[1], groups);
                let x = candle_core::Var::from_tensor(
                    &((randn(3, shape) * 3.0).unwrap() + 5.0).unwrap(),
                )
                .unwrap();
                let w_out = randn(4, shape);
                let loss = |y: &Tensor| (y * &w_out).unwrap().sum_all().unwrap();
                let composed = group_norm_composed(x.as_tensor(), &p, silu).unwrap();
                let want = loss(&composed).backward().unwrap();
                let fused = {
                    let _training = DifferentiableScope::enter(true);
                    group_norm(x.as_tensor(), &p, silu).unwrap()
                };
                assert!(max_diff(&fused, &composed) < 2e-5, "{shape:?}: forward");
                let got = loss(&fused).backward().unwrap();
                let err = max_diff(
                    got.get(x.as_tensor()).expect("input gradient"),
                    want.get(x.as_tensor()).unwrap(),
                );
                println!("{shape:?} silu {silu}: input gradient max abs error {err:e}");
                assert!(
                    err < 1e-4,
                    "{shape:?} silu {silu}: input gradient error {err}"
                );
                assert!(got.get(&p.weight).is_none() && got.get(&p.bias).is_none());
            }
        }
    }

    /// Trained affine parameters (or a non-contiguous input) take the composed norm, which
    /// gives the parameters their gradients.
    #[test]
    fn trained_parameters_take_the_composed_norm() {
        let weight = candle_core::Var::from_tensor(&randn(1, &[6])).unwrap();
        let p = GroupNormParams {
            weight: weight.as_tensor().clone(),
            bias: randn(2, &[6]),
            groups: 3,
            eps: 1e-5,
        };
        let x = randn(3, &[2, 6, 4, 5]);
        assert!(!applies(&x, &p));
        let _training = DifferentiableScope::enter(true);
        let y = group_norm(&x, &p, true).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(weight.as_tensor()).is_some());
        let view = randn(4, &[2, 4, 5, 6]).permute((0, 3, 1, 2)).unwrap();
        let constant = params(6, 3);
        assert!(!applies(&view, &constant));
        let err = max_diff(
            &group_norm(&view, &constant, false).unwrap(),
            &group_norm(&view.contiguous().unwrap(), &constant, false).unwrap(),
        );
        assert!(err < 2e-5, "{err}");
    }
}
