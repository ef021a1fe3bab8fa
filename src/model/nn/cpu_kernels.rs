//! Fused CPU kernels that replace several passes of composed candle ops at inference; each is
//! tested against the composed ops it replaces.

use candle_core::Result;

/// The f32 elements of a contiguous CPU tensor.
fn f32_slice<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    what: &str,
) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("{what}: contiguous f32 input expected"),
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

/// Runs `work(row, out_row)` over the (sample, group) rows of `out`, split over the threads.
fn for_each_row(out: &mut [f32], group_len: usize, work: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / group_len.max(1);
    let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
    let rows_per_thread = rows.div_ceil(threads).max(1);
    let work = &work;
    std::thread::scope(|scope| {
        for (t, out_chunk) in out.chunks_mut(rows_per_thread * group_len).enumerate() {
            scope.spawn(move || {
                for (r, out_row) in out_chunk.chunks_mut(group_len).enumerate() {
                    work(t * rows_per_thread + r, out_row);
                }
            });
        }
    });
}

/// GroupNorm on contiguous f32 CPU tensors with constant affine parameters: per (sample, group)
/// mean and variance in f64 accumulators, then `(x - mean) / sqrt(var + eps) * w[c] + b[c]`,
/// rows split over threads. Its backward gives the input gradient in one fused pass as well
/// ([`GroupNormInputGradCpu`]), recomputing the statistics from the saved input.
pub(crate) struct FusedGroupNormCpu {
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) weight: Vec<f32>,
    pub(crate) bias: Vec<f32>,
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
        };
        Ok(Some(x.apply_op2_no_bwd(&grad_y.contiguous()?, &op)?))
    }
}

/// The input gradient of [`FusedGroupNormCpu`]: with `xh = (x - mean) * rstd` and
/// `d = dy * w[c]`, per (sample, group) row `dx = rstd * (d - mean(d) - xh * mean(d * xh))`.
pub(crate) struct GroupNormInputGradCpu {
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) weight: Vec<f32>,
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
            let (mut sum_d, mut sum_d_xh) = (0f64, 0f64);
            for (i, (&xv, &g)) in x_row.iter().zip(dy_row).enumerate() {
                let d = g as f64 * self.weight[channel_of(i)] as f64;
                sum_d += d;
                sum_d_xh += d * (xv as f64 - mean) * rstd;
            }
            let n = group_len as f64;
            let (mean_d, mean_d_xh) = (sum_d / n, sum_d_xh / n);
            for (i, (o, (&xv, &g))) in out_row.iter_mut().zip(x_row.iter().zip(dy_row)).enumerate()
            {
                let d = g as f64 * self.weight[channel_of(i)] as f64;
                let xh = (xv as f64 - mean) * rstd;
                *o = (rstd * (d - mean_d - xh * mean_d_xh)) as f32;
            }
        });
        Ok((candle_core::CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use crate::model::nn::test_util::{max_diff, randn};
    use crate::model::nn::{set_differentiable, GroupNorm};
    use candle_core::Module;

    #[test]
    fn fused_cpu_group_norm_matches_the_composed_one() {
        for (shape, groups) in [
            (vec![2, 64, 5, 7], 32),
            (vec![1, 12, 9], 4),
            (vec![3, 6, 4, 4], 6),
        ] {
            let c = shape[1];
            let norm = GroupNorm {
                weight: randn(1, &[c]),
                bias: randn(2, &[c]),
                groups,
                eps: 1e-5,
            };
            // An offset mean, as real activations have.
            let x = ((randn(3, &shape) * 3.0).unwrap() + 5.0).unwrap();
            let composed = norm.forward_composed(&x).unwrap();
            let fused = norm.forward(&x).unwrap();
            let err = max_diff(&fused, &composed);
            assert!(err < 2e-5, "{shape:?}: {err}");
        }
    }

    /// In training the fused norm's input gradient against candle's backward of the composed
    /// ops; the affine parameters are constants and get no gradient.
    #[test]
    fn fused_cpu_group_norm_gradient_matches_the_composed_one() {
        for (shape, groups) in [
            (vec![2, 64, 5, 7], 32),
            (vec![1, 12, 9], 4),
            (vec![3, 6, 4, 4], 6),
        ] {
            let c = shape[1];
            let norm = GroupNorm {
                weight: randn(1, &[c]),
                bias: randn(2, &[c]),
                groups,
                eps: 1e-5,
            };
            let x =
                candle_core::Var::from_tensor(&((randn(3, &shape) * 3.0).unwrap() + 5.0).unwrap())
                    .unwrap();
            let w_out = randn(4, &shape);
            let loss = |y: candle_core::Tensor| (y * &w_out).unwrap().sum_all().unwrap();
            let want = loss(norm.forward_composed(x.as_tensor()).unwrap())
                .backward()
                .unwrap();
            set_differentiable(true);
            let fused = norm.forward(x.as_tensor()).unwrap();
            set_differentiable(false);
            let composed = norm.forward_composed(x.as_tensor()).unwrap();
            assert!(max_diff(&fused, &composed) < 2e-5, "{shape:?}: forward");
            let got = loss(fused).backward().unwrap();
            let (got_dx, want_dx) = (
                got.get(x.as_tensor()).unwrap(),
                want.get(x.as_tensor()).unwrap(),
            );
            let err = max_diff(got_dx, want_dx);
            assert!(err < 1e-4, "{shape:?}: input gradient error {err}");
            assert!(got.get(&norm.weight).is_none() && got.get(&norm.bias).is_none());
        }
    }
}
