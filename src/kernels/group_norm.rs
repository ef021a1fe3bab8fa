//! Fused CPU kernels that replace several passes of composed candle ops at inference; each is
//! tested against the composed ops it replaces.

use candle_core::Result;

/// The f32 elements of a contiguous CPU tensor.
pub(super) fn f32_slice<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    what: &str,
) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("{what}: contiguous f32 input expected"),
    }
}

/// A convolution kernel's `(c_out, c_in, k_h, k_w)`; with `flipped_transposed` the stored
/// kernel is `[c_in, c_out, k_h, k_w]` (read as its spatial flip with the channel axes swapped).
pub(super) fn kernel_dims(
    layout: &candle_core::Layout,
    flipped_transposed: bool,
) -> Result<(usize, usize, usize, usize)> {
    let (k_0, k_1, k_h, k_w) = layout.shape().dims4()?;
    Ok(if flipped_transposed {
        (k_1, k_0, k_h, k_w)
    } else {
        (k_0, k_1, k_h, k_w)
    })
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

/// [`for_each_row`], or on this thread alone for tensors where spawning costs more.
fn for_each_row_sized(out: &mut [f32], row_len: usize, work: impl Fn(usize, &mut [f32]) + Sync) {
    if out.len() < SOFTMAX_SERIAL_ELEMENTS {
        for (r, out_row) in out.chunks_mut(row_len).enumerate() {
            work(r, out_row);
        }
    } else {
        for_each_row(out, row_len, work);
    }
}

/// Softmax over the last dimension of a contiguous f32 CPU tensor, rows split over the threads,
/// with the vectorized exp of [`super::fast_exp`] (candle's kernel calls the scalar `expf` per
/// element). No backward: training's differentiable softmax is composed.
pub(crate) struct SoftmaxLastDimCpu;

/// Below this many elements one thread does the whole softmax (spawning costs more).
const SOFTMAX_SERIAL_ELEMENTS: usize = 1 << 15;

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

/// The softmax's backward along the last dimension, `p * (dp - rowsum(dp * p))`, in one pass
/// per row over contiguous f32 CPU tensors (the composed ops take four passes and three
/// score-sized temporaries). Used where attention's backward recomputes its probabilities.
pub(crate) struct SoftmaxBackwardCpu;

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

/// GroupNorm on contiguous f32 CPU tensors with constant affine parameters: per (sample, group)
/// mean and variance in f64 accumulators, then `(x - mean) / sqrt(var + eps) * w[c] + b[c]`,
/// rows split over threads; with `silu` the SiLU that follows every norm of the UNet and VAE
/// blocks is applied in the same pass. Its backward gives the input gradient in one fused pass
/// as well ([`GroupNormInputGradCpu`]), recomputing the statistics (and the SiLU's input) from
/// the saved input, so training keeps one tensor per norm instead of three.
pub(crate) struct FusedGroupNormCpu {
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) weight: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    pub(crate) silu: bool,
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
pub(crate) struct GroupNormInputGradCpu {
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) weight: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    pub(crate) silu: bool,
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
pub(crate) struct FusedLayerNormCpu {
    pub(crate) eps: f64,
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
pub(crate) struct LayerNormInputGradCpu {
    pub(crate) eps: f64,
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

/// Undilated, ungrouped convolution of contiguous f32 CPU tensors (no bias) as a sum of
/// `k_h * k_w` matrix products over shifted views of the zero-padded input, with no im2col
/// buffer. At stride 1: computed over the padded width, output pixel `(y, x)` of kernel tap
/// `(dy, dx)` reads padded pixel `(y + dy, x + dx)`, which for every tap is the same
/// `[c_in, out_h * padded_w]` matrix shifted by `dy * padded_w + dx`; the `k_w - 1` extra columns
/// per row are dropped. At stride s the padded input is first split into s² phase planes
/// (`phase(a, b)[i, j] = padded[s·i + a, s·j + b]`): tap `(dy, dx)` then reads phase
/// `(dy mod s, dx mod s)` at `(y + dy / s, x + dx / s)`, again one shifted view per tap.
/// candle 0.11's CPU path instead transposes the input to NHWC single-threaded and builds an
/// im2col tile per 512 pixels (over half of a 512x512 VAE decode's time).
///
/// With `flipped_transposed`, the kernel given is read as its spatial flip with the two channel
/// axes swapped (`k'[o, i, dy, dx] = k[i, o, k_h-1-dy, k_w-1-dx]`): the convolution that gives a
/// convolution's input gradient. Each tap's matrix is then another strided view of the same
/// kernel, so a frozen layer's backward never copies its kernel (for a 1280-channel 3x3 kernel
/// that copy, through `index_select`, cost more than the gradient's matrix products).
pub(crate) struct ShiftedGemmConv2d {
    pub(crate) padding: usize,
    pub(crate) stride: usize,
    pub(crate) flipped_transposed: bool,
}

impl candle_core::CustomOp2 for ShiftedGemmConv2d {
    fn name(&self) -> &'static str {
        "shifted-gemm-conv2d"
    }

    fn cpu_fwd(
        &self,
        x_storage: &candle_core::CpuStorage,
        x_layout: &candle_core::Layout,
        k_storage: &candle_core::CpuStorage,
        k_layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = f32_slice(x_storage, x_layout, "shifted-gemm conv2d input")?;
        let kernel = f32_slice(k_storage, k_layout, "shifted-gemm conv2d kernel")?;
        let (b, c_in, h, w) = x_layout.shape().dims4()?;
        let (c_out, k_c_in, k_h, k_w) = kernel_dims(k_layout, self.flipped_transposed)?;
        let (p, s) = (self.padding, self.stride);
        let (hp, wp) = (h + 2 * p, w + 2 * p);
        if k_c_in != c_in || k_h > hp || k_w > wp || s == 0 {
            candle_core::bail!(
                "shifted-gemm conv2d: input {:?}, kernel {:?}, padding {p}, stride {s}",
                x_layout.shape(),
                k_layout.shape()
            );
        }
        let (out_h, out_w) = ((hp - k_h) / s + 1, (wp - k_w) / s + 1);
        let wq = wp.div_ceil(s);
        let phases = s * s;
        // Tap t's `c_out x c_in` matrix is a strided view of the kernel (row stride
        // c_in * taps, column stride taps, offset t; flipped and transposed: row stride taps,
        // column stride c_out * taps, offset taps - 1 - t): gemm packs it, so no re-layout.
        let taps = k_h * k_w;
        let tap_matrix = |t: usize| -> (usize, isize, isize) {
            if self.flipped_transposed {
                (taps - 1 - t, (c_out * taps) as isize, taps as isize)
            } else {
                (t, taps as isize, (c_in * taps) as isize)
            }
        };
        let mut out = vec![0f32; b * c_out * out_h * out_w];
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // The output is computed in bands of rows, each band's accumulator and padded input
        // cache-sized and reused: whole-image buffers cost a page fault per 4 KiB on every
        // call, and at 512x512 they are over 100 MB each.
        let band_rows = ((1usize << 20) / (c_out.max(c_in) * wq).max(1)).clamp(1, out_h);
        // Phase-plane rows a band reads: its own, the taps' reach, one spare (the last tap's
        // view runs up to (k_w - 1) / s elements past the last row).
        let band_plane = (band_rows + (k_h - 1) / s + 1) * wq;
        let mut padded = vec![0f32; phases * c_in * band_plane];
        let mut acc = vec![0f32; c_out * band_rows * wq];
        for n in 0..b {
            let image = &x[n * c_in * h * w..(n + 1) * c_in * h * w];
            let out_image = &mut out[n * c_out * out_h * out_w..(n + 1) * c_out * out_h * out_w];
            for band_start in (0..out_h).step_by(band_rows) {
                let rows = band_rows.min(out_h - band_start);
                let cols = rows * wq;
                let plane_rows = rows + (k_h - 1) / s + 1;
                let plane = plane_rows * wq;
                // Phase (a, b) of channel c starts at ((a * s + b) * c_in + c) * plane; its
                // row r is padded row (band_start + r) * s + a, element j padded column
                // j * s + b. Every element is written (the buffer is reused).
                for (c, src) in image.chunks(h * w).enumerate() {
                    for phase in 0..phases {
                        let (pa, pb) = (phase / s, phase % s);
                        let dst = &mut padded[(phase * c_in + c) * plane..][..plane];
                        for (r, dst_row) in dst.chunks_mut(wq).enumerate() {
                            let yp = (band_start + r) * s + pa;
                            if yp < p || yp >= p + h {
                                dst_row.fill(0.0);
                                continue;
                            }
                            let row = &src[(yp - p) * w..(yp - p + 1) * w];
                            if s == 1 {
                                dst_row[..p].fill(0.0);
                                dst_row[p..p + w].copy_from_slice(row);
                                dst_row[p + w..].fill(0.0);
                                continue;
                            }
                            for (j, d) in dst_row.iter_mut().enumerate() {
                                let xp = j * s + pb;
                                *d = if xp >= p && xp < p + w {
                                    row[xp - p]
                                } else {
                                    0.0
                                };
                            }
                        }
                    }
                }
                for t in 0..taps {
                    let (dy, dx) = (t / k_w, t % k_w);
                    let phase = (dy % s) * s + dx % s;
                    let shift = phase * c_in * plane + (dy / s) * wq + dx / s;
                    // SAFETY: dst is `c_out` rows of `cols` (row stride `cols`) within `acc`
                    // (c_out * band_rows * wq elements, cols <= band_rows * wq); lhs is tap
                    // t's `c_out x c_in` view of the kernel (every offset it reads is below
                    // c_out * c_in * taps in both layouts); rhs is `c_in` rows (stride
                    // `plane`) of `cols` elements from `shift` inside one phase, whose last
                    // element is at (dy / s + rows) * wq + dx / s - 1 < plane_rows * wq, as
                    // dy / s <= (k_h - 1) / s and dx / s < wq.
                    let (lhs_offset, lhs_cs, lhs_rs) = tap_matrix(t);
                    unsafe {
                        gemm::gemm(
                            c_out,
                            cols,
                            c_in,
                            acc.as_mut_ptr(),
                            1,
                            cols as isize,
                            t > 0,
                            kernel.as_ptr().add(lhs_offset),
                            lhs_cs,
                            lhs_rs,
                            padded.as_ptr().add(shift),
                            1,
                            plane as isize,
                            1f32,
                            1f32,
                            false,
                            false,
                            false,
                            parallelism,
                        );
                    }
                }
                // Drop each row's k_w - 1 (over s) extra columns.
                for (o, src) in acc[..c_out * cols].chunks(cols).enumerate() {
                    let dst = &mut out_image[(o * out_h + band_start) * out_w..][..rows * out_w];
                    for (d, s) in dst.chunks_mut(out_w).zip(src.chunks(wq)) {
                        d.copy_from_slice(&s[..out_w]);
                    }
                }
            }
        }
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from((b, c_out, out_h, out_w)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use crate::model::nn::test_util::{flipped_transposed, max_abs, max_diff, randn};
    use crate::model::nn::{set_differentiable, GroupNorm};
    use candle_core::{Module, Tensor};

    const CASES: [(&[usize], usize); 3] =
        [(&[2, 64, 5, 7], 32), (&[1, 12, 9], 4), (&[3, 6, 4, 4], 6)];

    fn norm(c: usize, groups: usize) -> GroupNorm {
        GroupNorm {
            weight: randn(1, &[c]),
            bias: randn(2, &[c]),
            groups,
            eps: 1e-5,
        }
    }

    /// The fused forward (`silu`: GroupNorm then SiLU) and the composed candle ops.
    fn both(norm: &GroupNorm, x: &Tensor, silu: bool) -> (Tensor, Tensor) {
        if silu {
            (
                norm.forward_silu(x).unwrap(),
                norm.forward_composed(x).unwrap().silu().unwrap(),
            )
        } else {
            (norm.forward(x).unwrap(), norm.forward_composed(x).unwrap())
        }
    }

    #[test]
    fn fused_cpu_group_norm_matches_the_composed_one() {
        for silu in [false, true] {
            for (shape, groups) in CASES {
                let norm = norm(shape[1], groups);
                // An offset mean, as real activations have.
                let x = ((randn(3, shape) * 3.0).unwrap() + 5.0).unwrap();
                let (fused, composed) = both(&norm, &x, silu);
                let err = max_diff(&fused, &composed);
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
                let norm = norm(shape[1], groups);
                let x = candle_core::Var::from_tensor(
                    &((randn(3, shape) * 3.0).unwrap() + 5.0).unwrap(),
                )
                .unwrap();
                let w_out = randn(4, shape);
                let loss = |y: Tensor| (y * &w_out).unwrap().sum_all().unwrap();
                let (_, composed) = both(&norm, x.as_tensor(), silu);
                let want = loss(composed.clone()).backward().unwrap();
                set_differentiable(true);
                let (fused, _) = both(&norm, x.as_tensor(), silu);
                set_differentiable(false);
                assert!(max_diff(&fused, &composed) < 2e-5, "{shape:?}: forward");
                let got = loss(fused).backward().unwrap();
                let (got_dx, want_dx) = (
                    got.get(x.as_tensor()).unwrap(),
                    want.get(x.as_tensor()).unwrap(),
                );
                let err = max_diff(got_dx, want_dx);
                assert!(
                    err < 1e-4,
                    "{shape:?} silu {silu}: input gradient error {err}"
                );
                assert!(got.get(&norm.weight).is_none() && got.get(&norm.bias).is_none());
            }
        }
    }

    /// The shifted-gemm convolution against candle's conv2d: square and oblong kernels, odd
    /// sizes, padding 0 to 2, strides 1 to 3, batches, one input channel.
    #[test]
    fn shifted_gemm_conv2d_matches_candle_conv2d() {
        for (x_shape, k_shape, padding, stride) in [
            ([2, 5, 7, 9], [6, 5, 3, 3], 1, 1),
            ([1, 3, 8, 8], [4, 3, 3, 3], 0, 1),
            ([1, 1, 5, 6], [3, 1, 3, 3], 2, 1),
            ([3, 4, 6, 5], [2, 4, 1, 3], 1, 1),
            ([1, 16, 33, 31], [8, 16, 3, 3], 1, 1),
            ([1, 2, 4, 4], [2, 2, 4, 4], 0, 1),
            // The VAE's downsampling (asymmetric padding done before, padding 0) and the
            // time-aware encoder's (padding 1), at even, odd and mixed sizes.
            ([2, 5, 8, 8], [6, 5, 3, 3], 0, 2),
            ([1, 4, 9, 7], [3, 4, 3, 3], 1, 2),
            ([1, 3, 7, 10], [5, 3, 3, 3], 1, 2),
            ([1, 16, 33, 32], [8, 16, 3, 3], 0, 2),
            ([2, 3, 11, 9], [2, 3, 3, 2], 1, 3),
            // Enough channels that the rows split into several bands (the last one short),
            // at strides 1 and 2, with batches.
            ([2, 256, 70, 69], [8, 256, 3, 3], 1, 1),
            ([1, 256, 131, 130], [4, 256, 3, 3], 1, 2),
            ([1, 300, 61, 67], [3, 300, 2, 3], 0, 1),
        ] {
            let x = randn(5, &x_shape);
            let kernel = randn(6, &k_shape);
            let want = x.conv2d(&kernel, padding, stride, 1, 1).unwrap();
            // f32 rounding of sums of c_in * taps products, relative to the output's scale
            // (about 1e-4 for the small cases).
            let tol = 2e-6 * max_abs(&want);
            let op = |flipped_transposed| super::ShiftedGemmConv2d {
                padding,
                stride,
                flipped_transposed,
            };
            let got = x.apply_op2_no_bwd(&kernel, &op(false)).unwrap();
            assert_eq!(got.dims(), want.dims(), "{x_shape:?} {k_shape:?}");
            let err = max_diff(&got, &want);
            assert!(
                err < tol,
                "{x_shape:?} {k_shape:?} pad {padding} stride {stride}: {err} (tolerance {tol})"
            );
            // The same convolution from the kernel stored flipped and channel-swapped: the
            // op reads it back through its strided views.
            let stored = flipped_transposed(&kernel);
            let got = x.apply_op2_no_bwd(&stored, &op(true)).unwrap();
            let err = max_diff(&got, &want);
            assert!(
                err < tol,
                "flipped: {x_shape:?} {k_shape:?} pad {padding} stride {stride}: {err}"
            );
        }
    }
}
