//! Fused CPU kernels that replace several passes of composed candle ops at inference; each is
//! tested against the composed ops it replaces.

use candle_core::Result;

/// GroupNorm forward on contiguous f32 CPU tensors: per (sample, group) mean and variance in
/// f64 accumulators, then `(x - mean) / sqrt(var + eps) * w[c] + b[c]`, rows split over threads.
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
        let (b, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let x = match storage {
            candle_core::CpuStorage::F32(v) => {
                &v[layout.start_offset()..layout.start_offset() + layout.shape().elem_count()]
            }
            _ => candle_core::bail!("fused group norm: f32 input expected"),
        };
        let per_group = c / self.groups;
        let group_len = per_group * spatial;
        let mut out = vec![0f32; x.len()];
        let rows = b * self.groups;
        let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
        let rows_per_thread = rows.div_ceil(threads);
        std::thread::scope(|scope| {
            for (t, out_chunk) in out.chunks_mut(rows_per_thread * group_len).enumerate() {
                let x = &x[t * rows_per_thread * group_len..];
                scope.spawn(move || {
                    for (r, out_row) in out_chunk.chunks_mut(group_len).enumerate() {
                        let row = t * rows_per_thread + r;
                        let x_row = &x[r * group_len..(r + 1) * group_len];
                        let n = group_len as f64;
                        let mean = x_row.iter().map(|&v| v as f64).sum::<f64>() / n;
                        let var = x_row
                            .iter()
                            .map(|&v| (v as f64 - mean).powi(2))
                            .sum::<f64>()
                            / n;
                        let rstd = 1.0 / (var + self.eps).sqrt();
                        let first_channel = (row % self.groups) * per_group;
                        for (k, (o, xs)) in out_row
                            .chunks_mut(spatial)
                            .zip(x_row.chunks(spatial))
                            .enumerate()
                        {
                            let ch = first_channel + k;
                            let scale = (rstd * self.weight[ch] as f64) as f32;
                            let shift = (self.bias[ch] as f64
                                - mean * rstd * self.weight[ch] as f64)
                                as f32;
                            for (o, &v) in o.iter_mut().zip(xs) {
                                *o = v * scale + shift;
                            }
                        }
                    }
                });
            }
        });
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
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
            set_differentiable(true);
            let composed = norm.forward(&x).unwrap();
            set_differentiable(false);
            let fused = norm.forward(&x).unwrap();
            let err = max_diff(&fused, &composed);
            assert!(err < 2e-5, "{shape:?}: {err}");
        }
    }
}
