//! Softmax over the last axis, `exp(x - max) / sum(exp(x - max))` per row, and its backward
//! `p * (dp - rowsum(dp * p))`.
//!
//! Layout: the fused CPU kernels take contiguous f32 CPU tensors of rank 1 or more
//! ([`applies`]); elsewhere candle's fused softmax (no backward) or the composed ops. Where it
//! pays: candle's CPU kernel calls the scalar `expf` per element; this one uses the vectorised
//! exp of [`super::fast_exp`] and splits rows over the threads. The backward takes one pass per
//! row where the composed ops take four and three score-sized temporaries (attention's backward
//! recomputes its probabilities and calls it once per chunk).

use super::cpu::{f32_slice, for_each_row_sized};
use super::differentiable;
use candle_core::{DType, Result, Tensor, D};

/// Whether the fused CPU kernels take `x`: a contiguous f32 CPU tensor of rank 1 or more.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous() && x.rank() >= 1
}

/// Softmax over the last dimension, computed in f32 and returned in `x`'s dtype. Where a
/// gradient flows in differentiable mode, the composed candle ops (candle's fused kernel has no
/// backward); elsewhere [`softmax_last_dim_no_grad`].
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let y = if differentiable() && x.track_op() {
        candle_nn::ops::softmax(&x, D::Minus1)?
    } else {
        softmax_last_dim_no_grad(&x)?
    };
    y.to_dtype(dtype)
}

/// Softmax over the last dimension without a backward: the vectorised CPU kernel where it
/// [`applies`], candle's fused one elsewhere (which refuses strided inputs: those are made
/// contiguous first).
pub fn softmax_last_dim_no_grad(x: &Tensor) -> Result<Tensor> {
    if applies(x) {
        return x.apply_op1_no_bwd(&SoftmaxLastDimCpu);
    }
    candle_nn::ops::softmax_last_dim(&x.contiguous()?)
}

/// The softmax's backward `p * (dp - rowsum(dp * p))`: the fused CPU pass where it [`applies`]
/// to both operands, [`softmax_backward_composed`] elsewhere.
pub(crate) fn softmax_backward(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
    if applies(p) && applies(dp) {
        return p.apply_op2_no_bwd(dp, &SoftmaxBackwardCpu);
    }
    softmax_backward_composed(p, dp)
}

/// The same backward from candle ops, on every device and dtype.
pub(crate) fn softmax_backward_composed(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
    let row_dot = (dp * p)?.sum_keepdim(D::Minus1)?;
    p * dp.broadcast_sub(&row_dot)?
}

/// Softmax over the last dimension of a contiguous f32 CPU tensor, rows split over the threads.
struct SoftmaxLastDimCpu;

impl candle_core::CustomOp1 for SoftmaxLastDimCpu {
    fn name(&self) -> &'static str {
        "softmax-last-dim-cpu"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = f32_slice(storage, layout, "softmax")?;
        let len = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        let row = |r: usize, out_row: &mut [f32]| {
            super::fast_exp::softmax_row(&x[r * len..(r + 1) * len], out_row)
        };
        for_each_row_sized(&mut out, len, row);
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// The softmax's backward along the last dimension in one pass per row over contiguous f32 CPU
/// tensors, the row sums in f64.
struct SoftmaxBackwardCpu;

impl candle_core::CustomOp2 for SoftmaxBackwardCpu {
    fn name(&self) -> &'static str {
        "softmax-backward-cpu"
    }

    fn cpu_fwd(
        &self,
        p_storage: &candle_core::CpuStorage,
        p_layout: &candle_core::Layout,
        dp_storage: &candle_core::CpuStorage,
        dp_layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        if p_layout.shape() != dp_layout.shape() {
            candle_core::bail!(
                "softmax backward: probabilities {:?} and gradient {:?} differ in shape",
                p_layout.shape(),
                dp_layout.shape()
            );
        }
        let p = f32_slice(p_storage, p_layout, "softmax backward")?;
        let dp = f32_slice(dp_storage, dp_layout, "softmax backward")?;
        let len = p_layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; p.len()];
        let row = |r: usize, out_row: &mut [f32]| {
            let (p_row, dp_row) = (&p[r * len..(r + 1) * len], &dp[r * len..(r + 1) * len]);
            let dot = p_row
                .iter()
                .zip(dp_row)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>() as f32;
            for ((o, &pv), &g) in out_row.iter_mut().zip(p_row).zip(dp_row) {
                *o = pv * (g - dot);
            }
        };
        for_each_row_sized(&mut out, len, row);
        Ok((candle_core::CpuStorage::F32(out), p_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_diff, randn};
    use crate::kernels::DifferentiableScope;

    /// The vectorised softmax (serial and threaded) against candle's kernel.
    #[test]
    fn vectorized_softmax_matches_candle() {
        for shape in [[2usize, 3, 77], [3, 333, 129], [1, 40, 4096]] {
            let scores = (randn(23, &shape) * 8.0).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            let got = softmax_last_dim_no_grad(&scores).unwrap();
            let err = max_diff(&got, &want);
            println!("{shape:?}: max abs error {err:e}");
            assert!(err < 1e-6, "{shape:?}: {err}");
        }
        // A non-contiguous view takes candle's kernel (which needs a contiguous copy): the
        // same values.
        let scores = (randn(24, &[5, 9]) * 8.0).unwrap().t().unwrap();
        assert!(!applies(&scores));
        let err = max_diff(
            &softmax_last_dim_no_grad(&scores).unwrap(),
            &candle_nn::ops::softmax(&scores, D::Minus1).unwrap(),
        );
        assert!(err < 1e-6, "transposed view: {err}");
    }

    /// In differentiable mode a tracked input gets the composed (differentiable) softmax.
    #[test]
    fn differentiable_softmax_has_candles_gradient() {
        let x = candle_core::Var::from_tensor(&(randn(25, &[3, 11]) * 4.0).unwrap()).unwrap();
        let w = randn(26, &[3, 11]);
        let _training = DifferentiableScope::enter(true);
        let y = softmax_last_dim(x.as_tensor()).unwrap();
        let want_y = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        let got = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let want = (&want_y * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let err = max_diff(
            got.get(x.as_tensor()).expect("a gradient"),
            want.get(x.as_tensor()).unwrap(),
        );
        assert!(err < 1e-6, "{err}");
    }

    /// The fused softmax backward against the composed ops, on the serial and the threaded
    /// paths (sizes on both sides of the serial bound, rows not a multiple of the lanes).
    #[test]
    fn fused_softmax_backward_matches_composed() {
        for shape in [[2usize, 3, 77], [3, 333, 129]] {
            let scores = (randn(21, &shape) * 4.0).unwrap();
            let p = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            let dp = randn(22, &shape);
            let fused = softmax_backward(&p, &dp).unwrap();
            let composed = softmax_backward_composed(&p, &dp).unwrap();
            let err = max_diff(&fused, &composed);
            println!("{shape:?}: max abs error {err:e}");
            // The composed row sum rounds in f32 in its own order; the fused one sums in f64.
            assert!(err < 4e-6, "{shape:?}: {err}");
        }
    }
}
