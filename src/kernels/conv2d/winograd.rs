//! 3x3, stride-1 convolutions of contiguous f32 CPU tensors by Winograd's minimal filtering
//! F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): each
//! 2x2 output tile is `A^T [(G g G^T) ⊙ (B^T d B)] A` for its 4x4 input patch `d`, so the
//! channel mixing becomes 16 matrix products with a quarter of the pixels each, 4 products per
//! output pixel and input channel instead of 9. The transform matrices hold only 0, ±1 and ±1/2,
//! so the rounding stays that of a direct convolution's sums (tested against candle's conv2d).
//! It pays where the images are large: the VAE, the CFW decoder, the UNet's outer levels.

use candle_core::Result;

/// Winograd components per tile (4x4).
const XI: usize = 16;

/// Whether F(2x2, 3x3) beats the shifted-gemm convolution for this shape (measured on the
/// decoder's and UNet's shapes, `examples/conv_timing`): enough tiles that the per-call kernel
/// transform (16 `c_out x c_in` matrices) is small beside the products (at the UNet's 32x32
/// level the two are even, at 16x16 Winograd loses 2x), and products deep and wide enough to be
/// matrix-sized; a 3- or 4-channel input (the image) gains too, as the shifted products then
/// have depth 3.
pub(crate) fn pays(batch: usize, c_in: usize, c_out: usize, out_h: usize, out_w: usize) -> bool {
    let tiles = batch * out_h.div_ceil(2) * out_w.div_ceil(2);
    tiles >= 512 && c_out >= 32 && (c_in <= 4 || c_in * c_out >= 8192)
}

/// `conv2d(x, g, padding, stride 1)` with a 3x3 kernel; with `flipped_transposed` the kernel is
/// read as its spatial flip with the channel axes swapped (the input gradient's convolution, as
/// in [`super::shifted_gemm::ShiftedGemmConv2d`]).
pub(crate) struct Winograd3x3Conv2d {
    pub(crate) padding: usize,
    pub(crate) flipped_transposed: bool,
}

/// `U[ξ][o][c] = (G g_oc G^T)[ξ]` for the output channels `outputs` (numbered from their first),
/// G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]].
fn transform_kernel(
    kernel: &[f32],
    (c_out, c_in): (usize, usize),
    outputs: std::ops::Range<usize>,
    flipped: bool,
) -> Vec<f32> {
    let count = outputs.len();
    let mut u = vec![0f32; XI * count * c_in];
    for (k, o) in outputs.enumerate() {
        for c in 0..c_in {
            let g = |a: usize, b: usize| -> f32 {
                if flipped {
                    kernel[((c * c_out + o) * 3 + 2 - a) * 3 + 2 - b]
                } else {
                    kernel[((o * c_in + c) * 3 + a) * 3 + b]
                }
            };
            // G g: 4 rows of 3.
            let gg: [[f32; 3]; 4] = {
                let col = |b: usize| {
                    let (g0, g1, g2) = (g(0, b), g(1, b), g(2, b));
                    [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2]
                };
                let cols = [col(0), col(1), col(2)];
                std::array::from_fn(|i| [cols[0][i], cols[1][i], cols[2][i]])
            };
            for (i, row) in gg.iter().enumerate() {
                let [r0, r1, r2] = *row;
                let vals = [r0, 0.5 * (r0 + r1 + r2), 0.5 * (r0 - r1 + r2), r2];
                for (j, v) in vals.into_iter().enumerate() {
                    u[((i * 4 + j) * count + k) * c_in + c] = v;
                }
            }
        }
    }
    u
}

/// `B^T d` on four rows (or `e B` on four columns): B^T = [[1, 0, -1, 0], [0, 1, 1, 0],
/// [0, -1, 1, 0], [0, 1, 0, -1]].
#[inline(always)]
fn bt4(d0: f32, d1: f32, d2: f32, d3: f32) -> [f32; 4] {
    [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
}

/// `A^T m` on four rows (or `e A` on four columns): A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
#[inline(always)]
fn at4(m0: f32, m1: f32, m2: f32, m3: f32) -> [f32; 2] {
    [m0 + m1 + m2, m1 - m2 - m3]
}

impl candle_core::CustomOp2 for Winograd3x3Conv2d {
    fn name(&self) -> &'static str {
        "winograd-3x3-conv2d"
    }

    fn cpu_fwd(
        &self,
        x_storage: &candle_core::CpuStorage,
        x_layout: &candle_core::Layout,
        k_storage: &candle_core::CpuStorage,
        k_layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = crate::kernels::cpu::f32_slice(x_storage, x_layout, "winograd conv2d input")?;
        let kernel = crate::kernels::cpu::f32_slice(k_storage, k_layout, "winograd conv2d kernel")?;
        let (b, c_in, h, w) = x_layout.shape().dims4()?;
        let (c_out, k_c_in, k_h, k_w) = super::kernel_dims(k_layout, self.flipped_transposed)?;
        let p = self.padding;
        if k_c_in != c_in || (k_h, k_w) != (3, 3) || h + 2 * p < 3 || w + 2 * p < 3 {
            candle_core::bail!(
                "winograd conv2d: input {:?}, kernel {:?}, padding {p}",
                x_layout.shape(),
                k_layout.shape()
            );
        }
        let (out_h, out_w) = (h + 2 * p - 2, w + 2 * p - 2);
        let (tiles_h, tiles_w) = (out_h.div_ceil(2), out_w.div_ceil(2));
        let threads = candle_core::utils::get_num_threads().max(1);
        // Output channels in blocks whose transformed kernel (16 `block x c_in` matrices, 16/9
        // of the kernel's size) stays bounded; each block re-transforms the input, which costs
        // little beside its products.
        let blocks = (XI * c_in * c_out).div_ceil(KERNEL_BLOCK_ELEMENTS).max(1);
        let block = c_out.div_ceil(blocks);
        // Bands of tile rows whose transformed input and products stay cache-sized, at least
        // one per thread. Each thread takes whole bands (transform, 16 products, inverse
        // transform) so nothing waits inside a convolution.
        let cache_rows = (BAND_ELEMENTS / (XI * c_in.max(block) * tiles_w).max(1)).max(1);
        let band_tile_rows = cache_rows
            .min((b * tiles_h).div_ceil(threads).max(1))
            .clamp(1, tiles_h);
        let bands_per_image = tiles_h.div_ceil(band_tile_rows);
        let bands = b * bands_per_image;
        let workers = threads.min(bands);
        let band_tiles_max = band_tile_rows * tiles_w;
        // Per worker: the transformed input V[c][ξ][tile] and products M[o][ξ][tile] of a band
        // (allocated here, once, rather than in each worker's own arena).
        let (v_len, m_len) = (c_in * XI * band_tiles_max, block * XI * band_tiles_max);
        let mut scratch = vec![0f32; workers * (v_len + m_len)];
        let mut out = vec![0f32; b * c_out * out_h * out_w];
        let out_ptr = SharedOut(out.as_mut_ptr());
        for o_first in (0..c_out).step_by(block) {
            let o_count = block.min(c_out - o_first);
            let u = transform_kernel(
                kernel,
                (c_out, c_in),
                o_first..o_first + o_count,
                self.flipped_transposed,
            );
            let next_band = std::sync::atomic::AtomicUsize::new(0);
            let work = |worker_scratch: &mut [f32]| {
                let (v, m) = worker_scratch.split_at_mut(v_len);
                let mut rows_scratch = vec![0f32; transform_scratch_len(tiles_w)];
                loop {
                    let band = next_band.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if band >= bands {
                        break;
                    }
                    let (n, band_start) = (
                        band / bands_per_image,
                        (band % bands_per_image) * band_tile_rows,
                    );
                    let band_rows = band_tile_rows.min(tiles_h - band_start);
                    let tiles = band_rows * tiles_w;
                    let image = &x[n * c_in * h * w..(n + 1) * c_in * h * w];
                    for (c, v_c) in v.chunks_mut(XI * tiles).take(c_in).enumerate() {
                        input_transform(
                            &image[c * h * w..(c + 1) * h * w],
                            (h, w, p),
                            (band_start, band_rows, tiles_w),
                            v_c,
                            &mut rows_scratch,
                        );
                    }
                    for xi in 0..XI {
                        // SAFETY: dst is `o_count` rows (stride XI * tiles) of `tiles`
                        // elements from xi * tiles in `m` (block * XI * band_tiles_max long,
                        // tiles <= band_tiles_max); lhs is U[xi], `o_count x c_in` row-major
                        // inside `u`; rhs is `c_in` rows (stride XI * tiles) of `tiles` from
                        // xi * tiles inside `v`.
                        unsafe {
                            gemm::gemm(
                                o_count,
                                tiles,
                                c_in,
                                m.as_mut_ptr().add(xi * tiles),
                                1,
                                (XI * tiles) as isize,
                                false,
                                u.as_ptr().add(xi * o_count * c_in),
                                1,
                                c_in as isize,
                                v.as_ptr().add(xi * tiles),
                                1,
                                (XI * tiles) as isize,
                                0f32,
                                1f32,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                    }
                    let (y0, y1) = (2 * band_start, (2 * (band_start + band_rows)).min(out_h));
                    for (k, m_o) in m.chunks(XI * tiles).take(o_count).enumerate() {
                        let o = o_first + k;
                        // SAFETY: rows y0..y1 of output plane (n, o); bands are disjoint in
                        // (n, rows), so no two threads write the same elements, and `out`
                        // outlives the scope.
                        let rows = unsafe {
                            std::slice::from_raw_parts_mut(
                                out_ptr.at(((n * c_out + o) * out_h + y0) * out_w),
                                (y1 - y0) * out_w,
                            )
                        };
                        output_transform(
                            m_o,
                            (y1 - y0, out_w),
                            (band_rows, tiles_w),
                            rows,
                            &mut rows_scratch,
                        );
                    }
                }
            };
            let work = &work;
            std::thread::scope(|scope| {
                let mut parts = scratch.chunks_mut(v_len + m_len);
                let own = parts.next().expect("at least one worker");
                for part in parts {
                    scope.spawn(move || work(part));
                }
                work(own);
            });
        }
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from((b, c_out, out_h, out_w)),
        ))
    }
}

/// Elements of a worker's row scratch for the transforms of `tiles_w` tiles per row.
fn transform_scratch_len(tiles_w: usize) -> usize {
    18 * (tiles_w + 1)
}

/// `V[ξ][tile] = (B^T d B)[ξ]` for the band's tiles of one channel (`plane`, h x w, padding p);
/// `scratch` holds [`transform_scratch_len`] elements.
#[inline(always)]
fn input_transform_body(
    plane: &[f32],
    (h, w, p): (usize, usize, usize),
    (band_start, band_rows, tiles_w): (usize, usize, usize),
    v: &mut [f32],
    scratch: &mut [f32],
) {
    let tiles = band_rows * tiles_w;
    // Padded input rows (zero outside the image) split into even and odd columns, so the
    // stride-2 tiles become contiguous runs: E[k] = row[2k], O[k] = row[2k + 1], k <= tiles_w.
    let half = tiles_w + 1;
    let (padded, rest) = scratch.split_at_mut(2 * half);
    let (rows, rest) = rest.split_at_mut(8 * half);
    // B^T d down the columns, also split: T[i] for the four rows of B^T.
    let t = &mut rest[..8 * half];
    let copied = w.min(2 * half - p);
    // The padding columns; the image columns are overwritten row by row.
    padded[..p].fill(0.0);
    padded[p + copied..].fill(0.0);
    for tr in 0..band_rows {
        let top = 2 * (band_start + tr);
        for a in 0..4 {
            let (even, odd) = rows[a * 2 * half..(a + 1) * 2 * half].split_at_mut(half);
            let yp = top + a;
            if yp < p || yp >= p + h {
                even.fill(0.0);
                odd.fill(0.0);
                continue;
            }
            // Only the image columns change from row to row; the padding stays zero.
            padded[p..p + copied].copy_from_slice(&plane[(yp - p) * w..][..copied]);
            for (k, pair) in padded.chunks_exact(2).enumerate() {
                even[k] = pair[0];
                odd[k] = pair[1];
            }
        }
        {
            let r = |a: usize| &rows[a * 2 * half..(a + 1) * 2 * half];
            let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
            let (t01, t23) = t.split_at_mut(4 * half);
            let (t0, t1) = t01.split_at_mut(2 * half);
            let (t2, t3) = t23.split_at_mut(2 * half);
            for k in 0..2 * half {
                let [a, b, c, d] = bt4(r0[k], r1[k], r2[k], r3[k]);
                t0[k] = a;
                t1[k] = b;
                t2[k] = c;
                t3[k] = d;
            }
        }
        let first = tr * tiles_w;
        for i in 0..4 {
            let (even, odd) = t[i * 2 * half..(i + 1) * 2 * half].split_at(half);
            // e B over the tile's four columns: even[k], odd[k], even[k + 1], odd[k + 1].
            let block = &mut v[i * 4 * tiles..];
            let (v0, rest) = block.split_at_mut(tiles);
            let (v1, rest) = rest.split_at_mut(tiles);
            let (v2, v3) = rest.split_at_mut(tiles);
            for k in 0..tiles_w {
                let [a, b, c, d] = bt4(even[k], odd[k], even[k + 1], odd[k + 1]);
                v0[first + k] = a;
                v1[first + k] = b;
                v2[first + k] = c;
                v3[first + k] = d;
            }
        }
    }
}

/// The band's output rows of one channel (`rows`, out_h x out_w of them) from its products
/// `M[ξ][tile]`: `A^T m A`, clipped at odd output sizes; `scratch` as for the input transform.
#[inline(always)]
fn output_transform_body(
    m: &[f32],
    (out_h, out_w): (usize, usize),
    (band_rows, tiles_w): (usize, usize),
    rows: &mut [f32],
    scratch: &mut [f32],
) {
    let tiles = band_rows * tiles_w;
    // Per tile row: A^T m down the columns (contiguous over the tiles), then A along the rows.
    let s = &mut scratch[..8 * tiles_w];
    for tr in 0..band_rows {
        let at = |i: usize, j: usize| &m[(i * 4 + j) * tiles + tr * tiles_w..][..tiles_w];
        for j in 0..4 {
            let (m0, m1, m2, m3) = (at(0, j), at(1, j), at(2, j), at(3, j));
            let (top, bottom) = s.split_at_mut(4 * tiles_w);
            let (top, bottom) = (
                &mut top[j * tiles_w..][..tiles_w],
                &mut bottom[j * tiles_w..][..tiles_w],
            );
            for k in 0..tiles_w {
                let [a, b] = at4(m0[k], m1[k], m2[k], m3[k]);
                top[k] = a;
                bottom[k] = b;
            }
        }
        for dy in 0..2 {
            let y = 2 * tr + dy;
            if y >= out_h {
                break;
            }
            let e = |j: usize| &s[(dy * 4 + j) * tiles_w..][..tiles_w];
            let (e0, e1, e2, e3) = (e(0), e(1), e(2), e(3));
            let row = &mut rows[y * out_w..(y + 1) * out_w];
            let mut pairs = row.chunks_exact_mut(2);
            for (k, pair) in (&mut pairs).enumerate() {
                let [a, b] = at4(e0[k], e1[k], e2[k], e3[k]);
                pair[0] = a;
                pair[1] = b;
            }
            if let [last] = pairs.into_remainder() {
                let k = tiles_w - 1;
                *last = at4(e0[k], e1[k], e2[k], e3[k])[0];
            }
        }
    }
}

/// The transforms compiled for AVX2 where the CPU has it (the default target stops at SSE2,
/// 4 lanes); the same code either way.
macro_rules! dispatch_avx2 {
    ($name:ident, $avx2:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2($($arg: $ty),*) {
            $body($($arg),*)
        }

        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked just above).
                return unsafe { $avx2($($arg),*) };
            }
            $body($($arg),*)
        }
    };
}

dispatch_avx2!(
    input_transform,
    input_transform_avx2,
    input_transform_body,
    (
        plane: &[f32],
        image_geometry: (usize, usize, usize),
        band: (usize, usize, usize),
        v: &mut [f32],
        scratch: &mut [f32]
    )
);

dispatch_avx2!(
    output_transform,
    output_transform_avx2,
    output_transform_body,
    (
        m: &[f32],
        out_size: (usize, usize),
        band: (usize, usize),
        rows: &mut [f32],
        scratch: &mut [f32]
    )
);

/// A raw output pointer the band workers share; each writes only its own band's rows.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: see the writes in `cpu_fwd`: bands are disjoint.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer `offset` elements in (a method, so closures capture the whole wrapper).
    ///
    /// # Safety
    /// `offset` is within the output.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// Elements of the transformed input or products a band aims at (cache-sized).
const BAND_ELEMENTS: usize = 1 << 21;

/// At most this many elements of transformed kernel at a time (32 MiB).
const KERNEL_BLOCK_ELEMENTS: usize = 1 << 23;

#[cfg(test)]
mod tests {
    use crate::kernels::test_util::{flipped_transposed, max_abs, max_diff, randn};

    /// The op against candle's conv2d on seeded random data, from the kernel and from its
    /// flipped, channel-swapped copy; prints the max abs error.
    fn check(seed: u64, x_shape: [usize; 4], c_out: usize, padding: usize) {
        let x = randn(seed, &x_shape);
        let kernel = randn(seed + 1, &[c_out, x_shape[1], 3, 3]);
        let want = x.conv2d(&kernel, padding, 1, 1, 1).unwrap();
        // f32 sums of c_in * 9 products in another order, relative to the output's scale.
        let tol = 4e-6 * max_abs(&want);
        for (flipped, stored) in [(false, kernel.clone()), (true, flipped_transposed(&kernel))] {
            let op = super::Winograd3x3Conv2d {
                padding,
                flipped_transposed: flipped,
            };
            let got = x.apply_op2_no_bwd(&stored, &op).unwrap();
            assert_eq!(got.dims(), want.dims(), "{x_shape:?}");
            let err = max_diff(&got, &want);
            eprintln!(
                "winograd {x_shape:?} -> {c_out}, padding {padding}, flipped {flipped}: \
                 max abs error {err:.2e} (tolerance {tol:.2e})"
            );
            assert!(
                err < tol,
                "{x_shape:?} pad {padding} flipped {flipped}: {err}"
            );
        }
    }

    /// Odd and even sizes, padding 0 to 2, batches, one input channel, the smallest input.
    #[test]
    fn winograd_conv2d_matches_candle_conv2d() {
        for (x_shape, c_out, padding) in [
            ([2, 5, 7, 9], 6, 1),
            ([1, 3, 8, 8], 4, 0),
            ([1, 1, 5, 6], 3, 2),
            ([1, 16, 33, 31], 8, 1),
            ([1, 2, 3, 3], 2, 0),
            ([2, 64, 90, 41], 40, 1),
            ([1, 300, 37, 35], 7, 1),
        ] {
            check(5, x_shape, c_out, padding);
        }
    }

    /// The output-channel blocks: a kernel whose transform exceeds one block is done in
    /// several (the last one short).
    #[test]
    fn winograd_output_channel_blocks_cover_every_channel() {
        let c_in = 512;
        let c_out = super::KERNEL_BLOCK_ELEMENTS / (super::XI * c_in) + 7;
        check(9, [1, c_in, 7, 6], c_out, 1);
    }

    /// The bands: with enough channels the rows split into several (the last one short).
    #[test]
    fn winograd_bands_cover_every_row() {
        check(7, [1, 512, 40, 18], 4, 1);
    }
}
