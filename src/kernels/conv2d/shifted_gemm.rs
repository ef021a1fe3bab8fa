//! Undilated, ungrouped convolution of contiguous f32 CPU tensors (no bias) as `k_h * k_w`
//! matrix products over shifted views of the zero-padded input, with no im2col buffer: the
//! convolutions [`super::winograd`] does not take (strides, small levels, oblong kernels), and
//! the input gradient's convolution (`flipped_transposed`). Its caller,
//! [`super::conv2d`], checks the layout; the op refuses any other.

use super::kernel_dims;
use crate::kernels::cpu::f32_slice;
use candle_core::Result;

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
    use crate::kernels::test_util::{flipped_transposed, max_abs, max_diff, randn};

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
