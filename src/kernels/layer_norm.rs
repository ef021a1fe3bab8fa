//! `torch.nn.LayerNorm` over the last axis: per row `(x - mean) / sqrt(var + eps) * w + b`.
//!
//! Three paths, chosen by [`layer_norm`]: at inference (not in differentiable mode) on a
//! contiguous f32 input, candle's fused kernel (no backward, any device); in differentiable
//! mode on contiguous f32 CPU tensors with a rank-1 weight of the last axis' length
//! ([`fused_applies`]), the fused CPU pass below, which has a backward for the input and for
//! trained weights; elsewhere [`layer_norm_composed`]. Where the fused pass pays: one pass
//! forward and one back, where the composed norm's graph kept four activation-sized tensors
//! and took five passes back. It also runs without a gradient to carry, so that a tracked and
//! an untracked input (or trained and loaded weights) give the same bits.

use super::cpu::{f32_slice, for_each_row};
use super::differentiable;
use super::frozen::{add_const, mul_const};
use candle_core::{DType, Result, Tensor, D};

/// Whether the fused CPU pass takes `(x, weight, bias)` in differentiable mode: contiguous f32
/// CPU tensors, a non-empty input and a rank-1 weight as long as the input's last axis.
pub fn fused_applies(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<bool> {
    Ok([x, weight, bias]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
        && x.elem_count() > 0
        && weight.rank() == 1
        && x.dim(D::Minus1)? == weight.elem_count())
}

/// LayerNorm of `x` over its last axis with `weight`, `bias` and `eps`; see the header for the
/// three paths.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if !differentiable() {
        if x.is_contiguous() && x.dtype() == DType::F32 {
            return candle_nn::ops::layer_norm(x, weight, bias, eps as f32);
        }
    } else if fused_applies(x, weight, bias)? {
        let op = FusedLayerNormCpu { eps };
        let tracked = x.track_op() || weight.track_op() || bias.track_op();
        return if tracked {
            x.apply_op3_arc(weight, bias, std::sync::Arc::new(Box::new(op)))
        } else {
            x.apply_op3_no_bwd(weight, bias, &op)
        };
    }
    layer_norm_composed(x, weight, bias, eps)
}

/// The norm from plain candle ops, statistics in f32, on every device and dtype; constant
/// weights get no gradient in differentiable mode ([`super::frozen`]).
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let n = x.dim(D::Minus1)? as f64;
    let mean = (x.sum_keepdim(D::Minus1)? / n)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = (centered.sqr()?.sum_keepdim(D::Minus1)? / n)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    add_const(&mul_const(&normed.to_dtype(dtype)?, weight)?, bias)
}

/// Mean and `1 / sqrt(var + eps)` of a short row (a token's channels): sums in f32 lanes that
/// vectorize, the variance from the centred values (no cancellation of `E[x²] - mean²`).
fn token_stats(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = lane_sum(x.iter().copied()) / n;
    let var = lane_sum(x.iter().map(|&v| (v - mean) * (v - mean))) / n;
    (mean, (1.0 / (var as f64 + eps).sqrt()) as f32)
}

/// Sum in 8 interleaved partial sums (vectorizable, and more accurate than one running sum).
fn lane_sum(values: impl Iterator<Item = f32>) -> f32 {
    let mut lanes = [0f32; 8];
    for (i, v) in values.enumerate() {
        lanes[i % 8] += v;
    }
    lanes.iter().sum()
}

/// `torch.nn.LayerNorm` over the last axis of contiguous f32 CPU tensors `(x, weight, bias)`,
/// for training: the backward keeps only the inputs and gives the input gradient in one pass
/// ([`LayerNormInputGradCpu`]) and, for trained weights, `dw = sum(dy * xh)`, `db = sum(dy)`.
struct FusedLayerNormCpu {
    eps: f64,
}

impl candle_core::CustomOp3 for FusedLayerNormCpu {
    fn name(&self) -> &'static str {
        "layer-norm-cpu"
    }

    fn cpu_fwd(
        &self,
        x_storage: &candle_core::CpuStorage,
        x_layout: &candle_core::Layout,
        w_storage: &candle_core::CpuStorage,
        w_layout: &candle_core::Layout,
        b_storage: &candle_core::CpuStorage,
        b_layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = f32_slice(x_storage, x_layout, "fused layer norm")?;
        let weight = f32_slice(w_storage, w_layout, "fused layer norm weight")?;
        let bias = f32_slice(b_storage, b_layout, "fused layer norm bias")?;
        let c = weight.len();
        if x_layout.shape().dims().last() != Some(&c) || bias.len() != c || c == 0 {
            candle_core::bail!(
                "fused layer norm: input {:?}, weight {:?}, bias {:?}",
                x_layout.shape(),
                w_layout.shape(),
                b_layout.shape()
            );
        }
        let mut out = vec![0f32; x.len()];
        for_each_row(&mut out, c, |row, out_row| {
            let x_row = &x[row * c..(row + 1) * c];
            let (mean, rstd) = token_stats(x_row, self.eps);
            for (((o, &v), &w), &b) in out_row.iter_mut().zip(x_row).zip(weight).zip(bias) {
                *o = (v - mean) * rstd * w + b;
            }
        });
        Ok((candle_core::CpuStorage::F32(out), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &candle_core::Tensor,
        weight: &candle_core::Tensor,
        bias: &candle_core::Tensor,
        _y: &candle_core::Tensor,
        grad_y: &candle_core::Tensor,
    ) -> Result<(
        Option<candle_core::Tensor>,
        Option<candle_core::Tensor>,
        Option<candle_core::Tensor>,
    )> {
        let grad_y = grad_y.contiguous()?;
        let dx = if x.track_op() {
            let op = LayerNormInputGradCpu { eps: self.eps };
            Some(x.apply_op3_no_bwd(weight, &grad_y, &op)?)
        } else {
            None
        };
        let c = weight.elem_count();
        let dy_rows = grad_y.reshape(((), c))?;
        let dw = if weight.track_op() {
            // xh: the norm with unit weight and zero bias.
            let (ones, zeros) = (weight.ones_like()?, bias.zeros_like()?);
            let xh = x.apply_op3_no_bwd(&ones, &zeros, self)?.reshape(((), c))?;
            Some((&dy_rows * xh)?.sum(0)?)
        } else {
            None
        };
        let db = if bias.track_op() {
            Some(dy_rows.sum(0)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// The input gradient of [`FusedLayerNormCpu`] from `(x, weight, dy)`: per row, with
/// `xh = (x - mean) * rstd` and `d = dy * w`, `dx = rstd * (d - mean(d) - xh * mean(d * xh))`.
struct LayerNormInputGradCpu {
    eps: f64,
}

impl candle_core::CustomOp3 for LayerNormInputGradCpu {
    fn name(&self) -> &'static str {
        "layer-norm-input-grad-cpu"
    }

    fn cpu_fwd(
        &self,
        x_storage: &candle_core::CpuStorage,
        x_layout: &candle_core::Layout,
        w_storage: &candle_core::CpuStorage,
        w_layout: &candle_core::Layout,
        dy_storage: &candle_core::CpuStorage,
        dy_layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = f32_slice(x_storage, x_layout, "layer norm gradient")?;
        let weight = f32_slice(w_storage, w_layout, "layer norm gradient weight")?;
        let dy = f32_slice(dy_storage, dy_layout, "layer norm gradient")?;
        let c = weight.len();
        if dy.len() != x.len() || x_layout.shape().dims().last() != Some(&c) || c == 0 {
            candle_core::bail!(
                "layer norm gradient: {:?} and {:?} for {c} channels",
                x_layout.shape(),
                dy_layout.shape()
            );
        }
        let mut out = vec![0f32; x.len()];
        for_each_row(&mut out, c, |row, out_row| {
            let range = row * c..(row + 1) * c;
            let (x_row, dy_row) = (&x[range.clone()], &dy[range]);
            let (mean, rstd) = token_stats(x_row, self.eps);
            // xh kept in the output row meanwhile.
            for (o, &v) in out_row.iter_mut().zip(x_row) {
                *o = (v - mean) * rstd;
            }
            let d = |i: usize| dy_row[i] * weight[i];
            let n = c as f32;
            let mean_d = lane_sum((0..c).map(d)) / n;
            let mean_d_xh = lane_sum((0..c).map(|i| d(i) * out_row[i])) / n;
            for (i, o) in out_row.iter_mut().enumerate() {
                *o = rstd * (d(i) - mean_d - *o * mean_d_xh);
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
    use candle_core::Var;

    /// `torch.nn.LayerNorm` written out in candle ops (differentiable in everything).
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let centered = x.broadcast_sub(&mean).unwrap();
        let var = centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let normed = centered
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap();
        normed.broadcast_mul(w).unwrap().broadcast_add(b).unwrap()
    }

    /// In training on the CPU with frozen weights, the fused norm: values and input gradient
    /// against candle's backward of the composed ops; no gradient for the weights. With trained
    /// weights the fused norm also gives their gradients.
    #[test]
    fn training_layer_norm_matches_the_composed_one() {
        for shape in [[2usize, 37, 40], [1, 5, 320], [3, 1, 7]] {
            let c = shape[2];
            let (w, b) = (randn(11, &[c]), randn(12, &[c]));
            let x = Var::from_tensor(&((randn(13, &shape) * 3.0).unwrap() + 2.0).unwrap()).unwrap();
            let w_out = randn(14, &shape);
            let loss = |y: &Tensor| (y * &w_out).unwrap().sum_all().unwrap();
            let want_y = reference(x.as_tensor(), &w, &b, 1e-5);
            let want = loss(&want_y).backward().unwrap();

            assert!(fused_applies(x.as_tensor(), &w, &b).unwrap());
            let y = {
                let _training = DifferentiableScope::enter(true);
                layer_norm(x.as_tensor(), &w, &b, 1e-5).unwrap()
            };
            assert!(y.track_op(), "the result has a backward");
            let y_err = max_diff(&y, &want_y);
            let got = loss(&y).backward().unwrap();
            let dx_err = max_diff(
                got.get(x.as_tensor()).expect("input gradient"),
                want.get(x.as_tensor()).unwrap(),
            );
            println!("{shape:?}: max abs error {y_err:e}, input gradient {dx_err:e}");
            assert!(
                y_err < 2e-5 && dx_err < 1e-4,
                "{shape:?}: {y_err:e} {dx_err:e}"
            );
            assert!(got.get(&w).is_none() && got.get(&b).is_none());

            // Trained weights (the personalization blocks' norms): input, weight and bias
            // gradients against the composed norm's, and the same bits as constant weights.
            let (w_var, b_var) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
            let want_y = reference(x.as_tensor(), w_var.as_tensor(), b_var.as_tensor(), 1e-5);
            let want = loss(&want_y).backward().unwrap();
            let (y_trained, y_constant) = {
                let _training = DifferentiableScope::enter(true);
                (
                    layer_norm(x.as_tensor(), w_var.as_tensor(), b_var.as_tensor(), 1e-5).unwrap(),
                    layer_norm(&x.as_tensor().detach(), &w, &b, 1e-5).unwrap(),
                )
            };
            assert_eq!(max_diff(&y_trained, &y_constant), 0.0);
            let got = loss(&y_trained).backward().unwrap();
            for (name, t) in [
                ("x", x.as_tensor()),
                ("weight", w_var.as_tensor()),
                ("bias", b_var.as_tensor()),
            ] {
                let err = max_diff(got.get(t).expect("gradient"), want.get(t).unwrap());
                println!("{shape:?}, trained weights: d{name} max abs error {err:e}");
                assert!(err < 1e-4, "{shape:?}: d{name} {err:e}");
            }
        }
    }

    /// At inference (candle's kernel) and on the composed path (a non-contiguous input in
    /// differentiable mode), the values of the reference.
    #[test]
    fn inference_and_composed_layer_norms_match_the_reference() {
        let (w, b) = (randn(21, &[9]), randn(22, &[9]));
        let x = ((randn(23, &[4, 9]) * 2.0).unwrap() + 1.0).unwrap();
        let want = reference(&x, &w, &b, 1e-5);
        let err = max_diff(&layer_norm(&x, &w, &b, 1e-5).unwrap(), &want);
        assert!(err < 2e-5, "inference: {err}");
        let view = x.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(!fused_applies(&view, &w, &b).unwrap());
        let _training = DifferentiableScope::enter(true);
        let err = max_diff(&layer_norm(&view, &w, &b, 1e-5).unwrap(), &want);
        assert!(err < 2e-5, "composed: {err}");
    }
}
