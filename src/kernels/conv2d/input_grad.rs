//! The input gradient of a convolution, `dL/dx` for the output gradient `g`: its sizes, which
//! implementation runs it, and the implementations.
//!
//! candle's own input gradient is a transposed convolution (a direct loop on the CPU, a naive
//! kernel on CUDA). [`conv2d_input_gradient_composed`] writes it as a forward convolution of the
//! flipped kernel over the zero-spread gradient instead, so it runs on [`super::conv2d`]'s fast
//! paths (any device and dtype; dilation, and padding of a kernel's size or more, fall back to
//! candle's transposed convolution). On CUDA builds with the `cudnn` feature, cuDNN's
//! backward-data (`cudnn.rs`) does the same work in one call without the spread tensor, for
//! f32, f16 and bf16 ([`input_gradient_path`]). The sizes and the dispatch are plain functions
//! so that the CPU tests pin them down; the values on CUDA are checked by
//! `tests/cuda_kernels.rs` in the GPU check.

use candle_core::{DType, Result, Tensor};

/// Why a convolution's input gradient cannot be computed from the given sizes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvGradError {
    #[error("conv input gradient: the {what} must be 4-D, got {dims:?}")]
    Rank {
        what: &'static str,
        dims: Vec<usize>,
    },
    #[error("conv input gradient: the gradient has {got} channels, the kernel has {want} outputs")]
    Channels { got: usize, want: usize },
    #[error(
        "conv input gradient: an input {axis} of {input} gives {want:?} outputs, the gradient has {got}"
    )]
    Size {
        axis: &'static str,
        input: usize,
        want: Option<usize>,
        got: usize,
    },
    #[error("conv input gradient: {0}")]
    Unsupported(&'static str),
}

impl From<ConvGradError> for candle_core::Error {
    fn from(e: ConvGradError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// Sizes of `dx` for `y = conv2d(x, kernel)` (NCHW, kernel `[c_out, c_in, k_h, k_w]`): what
/// cuDNN's backward-data descriptors hold, and the output padding a transposed convolution needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGradGeometry {
    pub batch: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_h: usize,
    pub out_w: usize,
    pub k_h: usize,
    pub k_w: usize,
    pub padding: usize,
    pub stride: usize,
    pub dilation: usize,
}

/// Forward output length of a convolution along one axis; `None` when the kernel does not fit.
pub fn conv_output_len(
    input: usize,
    kernel: usize,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Option<usize> {
    let span = dilation * (kernel.max(1) - 1) + 1;
    let padded = input + 2 * padding;
    (stride > 0 && padded >= span).then(|| (padded - span) / stride + 1)
}

impl ConvGradGeometry {
    /// Checks the gradient `g_dims` against the kernel and the input size `in_h` x `in_w`: the
    /// forward convolution of such an input must give exactly the gradient's size.
    pub fn new(
        g_dims: &[usize],
        kernel_dims: &[usize],
        cfg: &candle_nn::Conv2dConfig,
        in_h: usize,
        in_w: usize,
    ) -> std::result::Result<Self, ConvGradError> {
        let (&[batch, g_c, out_h, out_w], &[c_out, c_in, k_h, k_w]) = (g_dims, kernel_dims) else {
            let (what, dims) = if g_dims.len() != 4 {
                ("gradient", g_dims)
            } else {
                ("kernel", kernel_dims)
            };
            return Err(ConvGradError::Rank {
                what,
                dims: dims.to_vec(),
            });
        };
        if cfg.groups != 1 {
            return Err(ConvGradError::Unsupported("grouped convolutions"));
        }
        if g_c != c_out {
            return Err(ConvGradError::Channels {
                got: g_c,
                want: c_out,
            });
        }
        let (p, s, d) = (cfg.padding, cfg.stride, cfg.dilation);
        for (axis, input, k, got) in [("height", in_h, k_h, out_h), ("width", in_w, k_w, out_w)] {
            let want = conv_output_len(input, k, p, s, d);
            if want != Some(got) {
                return Err(ConvGradError::Size {
                    axis,
                    input,
                    want,
                    got,
                });
            }
        }
        Ok(ConvGradGeometry {
            batch,
            c_in,
            c_out,
            in_h,
            in_w,
            out_h,
            out_w,
            k_h,
            k_w,
            padding: p,
            stride: s,
            dilation: d,
        })
    }

    /// The input gradient's shape, `[batch, c_in, in_h, in_w]`.
    pub fn input_dims(&self) -> [usize; 4] {
        [self.batch, self.c_in, self.in_h, self.in_w]
    }

    /// Rows and columns of the input past the last window (at the far side): what a stride > 1
    /// drops, so what a transposed convolution must add back as output padding (always below
    /// the stride). Zero for stride 1; 1 for stride 2, kernel 3, padding 1 on an odd size.
    pub fn output_padding(&self) -> (usize, usize) {
        let dropped = |input: usize, out: usize, k: usize| {
            input + 2 * self.padding - self.dilation * (k - 1) - 1 - (out - 1) * self.stride
        };
        (
            dropped(self.in_h, self.out_h, self.k_h),
            dropped(self.in_w, self.out_w, self.k_w),
        )
    }
}

/// Which implementation computes a frozen convolution's input gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputGradientPath {
    /// cuDNN's backward-data, in one call (CUDA builds with the `cudnn` feature).
    CudnnBackwardData,
    /// The forward convolution of the flipped kernel over the spread gradient
    /// ([`conv2d_input_gradient_composed`]): every device and dtype.
    Composed,
}

/// The dispatch rule: cuDNN where the tensors are on CUDA, the binary has cuDNN, and cuDNN has a
/// configuration for the dtype (f32; f16 and bf16 with f32 accumulation); else the composed path.
pub fn input_gradient_path(
    on_cuda: bool,
    cudnn_built: bool,
    grad_dtype: DType,
    kernel_dtype: DType,
    cfg: &candle_nn::Conv2dConfig,
) -> InputGradientPath {
    let dtype_ok =
        grad_dtype == kernel_dtype && matches!(grad_dtype, DType::F32 | DType::F16 | DType::BF16);
    if on_cuda && cudnn_built && dtype_ok && cfg.groups == 1 {
        InputGradientPath::CudnnBackwardData
    } else {
        InputGradientPath::Composed
    }
}

/// [`input_gradient_path`] for these tensors in this build.
pub fn input_gradient_path_for(
    g: &candle_core::Tensor,
    kernel: &candle_core::Tensor,
    cfg: &candle_nn::Conv2dConfig,
) -> InputGradientPath {
    input_gradient_path(
        g.device().is_cuda(),
        cfg!(feature = "cudnn"),
        g.dtype(),
        kernel.dtype(),
        cfg,
    )
}

/// `x` convolved (stride 1, `padding`) with `kernel` flipped in space and with its channel axes
/// swapped: on the shifted-gemm path straight from the stored kernel, elsewhere from a flipped
/// copy.
fn conv2d_with_flipped_kernel(x: &Tensor, kernel: &Tensor, padding: usize) -> Result<Tensor> {
    let (_, _, k_h, k_w) = kernel.dims4()?;
    let fast = x.device().is_cpu()
        && x.dtype() == DType::F32
        && kernel.dtype() == DType::F32
        && k_h * k_w > 1
        && !x.track_op()
        && !kernel.track_op();
    if fast {
        return super::cpu_conv2d(x, kernel, padding, 1, true);
    }
    let swapped = kernel.transpose(0, 1)?.contiguous()?;
    let flipped = if k_h * k_w > 1 {
        flip_spatial(&swapped)?
    } else {
        swapped
    };
    super::conv2d(x, &flipped, &unit_stride(padding))
}

/// The input gradient of `conv2d(x, kernel, cfg)` for the output gradient `g`, `x` being
/// `in_h` x `in_w`: cuDNN's backward-data on CUDA builds with cuDNN (see
/// `cudnn.rs`), else [`conv2d_input_gradient_composed`].
pub fn conv2d_input_gradient(
    g: &Tensor,
    kernel: &Tensor,
    cfg: &candle_nn::Conv2dConfig,
    in_h: usize,
    in_w: usize,
) -> Result<Tensor> {
    match input_gradient_path_for(g, kernel, cfg) {
        #[cfg(feature = "cudnn")]
        InputGradientPath::CudnnBackwardData => {
            let geometry = ConvGradGeometry::new(g.dims(), kernel.dims(), cfg, in_h, in_w)?;
            super::cudnn::backward_data(g, kernel, geometry)
        }
        _ => conv2d_input_gradient_composed(g, kernel, cfg, in_h, in_w),
    }
}

/// The same input gradient from candle ops, on every device and dtype.
///
/// That gradient is the transposed convolution of `g`, which candle runs as a direct loop on the
/// CPU and a naive kernel on CUDA. Written instead as a forward convolution (the fast im2col +
/// gemm / cuDNN path): insert `stride - 1` zeros between the gradient's rows and columns, pad by
/// `k - 1 - padding` (plus the rows and columns the stride dropped on the far side), and
/// convolve with the kernel flipped in space and with its channel axes swapped.
pub fn conv2d_input_gradient_composed(
    g: &Tensor,
    kernel: &Tensor,
    cfg: &candle_nn::Conv2dConfig,
    in_h: usize,
    in_w: usize,
) -> Result<Tensor> {
    let (_, _, k_h, k_w) = kernel.dims4()?;
    let (_, _, out_h, out_w) = g.dims4()?;
    let (s, p) = (cfg.stride, cfg.padding);
    if cfg.dilation != 1 || cfg.groups != 1 || p + 1 > k_h || p + 1 > k_w {
        return conv2d_input_gradient_transposed(g, kernel, cfg, in_h, in_w);
    }
    let (spread_h, spread_w) = ((out_h - 1) * s + 1, (out_w - 1) * s + 1);
    if s == 1 && k_h == k_w {
        // Stride 1 and a square kernel: the padding is symmetric and the convolution does it.
        return conv2d_with_flipped_kernel(g, kernel, k_h - 1 - p);
    }
    let spread = spread_with_zeros(&spread_with_zeros(g, 2, s)?, 3, s)?;
    let spread = spread
        .pad_with_zeros(2, k_h - 1 - p, in_h + p - spread_h)?
        .pad_with_zeros(3, k_w - 1 - p, in_w + p - spread_w)?;
    conv2d_with_flipped_kernel(&spread, kernel, 0)
}

fn unit_stride(padding: usize) -> candle_nn::Conv2dConfig {
    candle_nn::Conv2dConfig {
        padding,
        ..Default::default()
    }
}

/// The same gradient through candle's transposed convolution; for the cases the forward form
/// does not cover (dilation, padding of a kernel's size or more).
fn conv2d_input_gradient_transposed(
    g: &Tensor,
    kernel: &Tensor,
    cfg: &candle_nn::Conv2dConfig,
    in_h: usize,
    in_w: usize,
) -> Result<Tensor> {
    // Output padding restores the rows and columns a stride dropped. One padding serves both
    // axes, so take the larger and cut back. (candle's transposed convolution has no groups;
    // the geometry refuses them.)
    let (pad_h, pad_w) =
        ConvGradGeometry::new(g.dims(), kernel.dims(), cfg, in_h, in_w)?.output_padding();
    g.conv_transpose2d(
        kernel,
        cfg.padding,
        pad_h.max(pad_w),
        cfg.stride,
        cfg.dilation,
    )?
    .narrow(2, 0, in_h)?
    .narrow(3, 0, in_w)
}

/// `x` reversed along its last two axes, as a fresh contiguous tensor: candle's CPU conv2d gives
/// wrong results for kernels that are non-contiguous views (candle #3736), so never pass one.
fn flip_spatial(x: &Tensor) -> Result<Tensor> {
    let reversed = |n: usize| Tensor::from_vec((0..n as u32).rev().collect(), n, x.device());
    let (h, w) = (x.dim(2)?, x.dim(3)?);
    x.index_select(&reversed(h)?, 2)?
        .index_select(&reversed(w)?, 3)?
        .contiguous()
}

/// `x` with `stride - 1` zeros between consecutive entries along `axis`.
fn spread_with_zeros(x: &Tensor, axis: usize, stride: usize) -> Result<Tensor> {
    if stride == 1 {
        return Ok(x.clone());
    }
    let n = x.dim(axis)?;
    let zeros = x.zeros_like()?;
    let mut parts = vec![x.clone()];
    parts.extend(std::iter::repeat_n(zeros, stride - 1));
    let mut dims = x.dims().to_vec();
    dims[axis] = n * stride;
    Tensor::stack(&parts, axis + 1)?
        .reshape(dims)?
        .narrow(axis, 0, (n - 1) * stride + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_diff, randn};

    fn cfg(padding: usize, stride: usize) -> candle_nn::Conv2dConfig {
        candle_nn::Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        }
    }

    /// For strides 1 and 2, odd and even sizes, kernels 1 and 3 (the UNet's and VAE's
    /// convolutions): the geometry's input shape is what the composed input gradient produces,
    /// and a transposed convolution with its output padding lands exactly on the input size.
    #[test]
    fn geometry_reproduces_the_input_shape_and_the_output_padding() {
        for stride in [1, 2] {
            for k in [1, 3] {
                for (h, w) in [(8, 8), (7, 7), (7, 10), (10, 9)] {
                    let padding = k / 2;
                    let cfg = cfg(padding, stride);
                    let x = randn(1, &[2, 3, h, w]);
                    let kernel = randn(2, &[4, 3, k, k]);
                    let y = x.conv2d(&kernel, padding, stride, 1, 1).unwrap();
                    let geo = ConvGradGeometry::new(y.dims(), kernel.dims(), &cfg, h, w).unwrap();
                    let dx = conv2d_input_gradient(&y, &kernel, &cfg, h, w).unwrap();
                    let case = format!("k{k} s{stride} {h}x{w}");
                    assert_eq!(geo.input_dims().as_slice(), dx.dims(), "{case}");
                    assert_eq!(geo.input_dims().as_slice(), x.dims(), "{case}");
                    let (pad_h, pad_w) = geo.output_padding();
                    assert!(pad_h < stride && pad_w < stride, "{case}");
                    if stride == 1 {
                        assert_eq!((pad_h, pad_w), (0, 0), "{case}");
                    }
                    // candle's conv_transpose2d takes one output padding for both axes.
                    if pad_h == pad_w {
                        let t = y
                            .conv_transpose2d(&kernel, padding, pad_h, stride, 1)
                            .unwrap();
                        assert_eq!(t.dims(), x.dims(), "{case}");
                        assert!(max_diff(&t, &dx) < 1e-4, "{case}");
                    }
                }
            }
        }
        // The pinned case: stride 2, kernel 3, padding 1 drops one row of an odd input.
        let geo = ConvGradGeometry::new(&[1, 4, 4, 5], &[4, 3, 3, 3], &cfg(1, 2), 7, 10).unwrap();
        assert_eq!(geo.output_padding(), (0, 1));
        assert_eq!((geo.out_h, geo.out_w), (4, 5));
    }

    #[test]
    fn geometry_refuses_inconsistent_sizes() {
        let c = cfg(1, 2);
        assert!(matches!(
            ConvGradGeometry::new(&[1, 4, 4, 4], &[4, 3, 3, 3], &c, 9, 8),
            Err(ConvGradError::Size {
                axis: "height",
                want: Some(5),
                got: 4,
                ..
            })
        ));
        assert!(matches!(
            ConvGradGeometry::new(&[1, 5, 4, 4], &[4, 3, 3, 3], &c, 8, 8),
            Err(ConvGradError::Channels { got: 5, want: 4 })
        ));
        assert!(matches!(
            ConvGradGeometry::new(&[4, 4, 4], &[4, 3, 3, 3], &c, 8, 8),
            Err(ConvGradError::Rank {
                what: "gradient",
                ..
            })
        ));
        let grouped = candle_nn::Conv2dConfig { groups: 2, ..c };
        assert!(matches!(
            ConvGradGeometry::new(&[1, 4, 4, 4], &[4, 3, 3, 3], &grouped, 8, 8),
            Err(ConvGradError::Unsupported(_))
        ));
        assert_eq!(conv_output_len(2, 5, 0, 1, 1), None);
        assert_eq!(conv_output_len(7, 3, 1, 2, 1), Some(4));
        assert_eq!(conv_output_len(64, 3, 1, 1, 2), Some(62));
    }

    #[test]
    fn dispatch_takes_cudnn_only_on_cuda_with_cudnn_built_and_a_supported_dtype() {
        use InputGradientPath::*;
        let c = cfg(1, 1);
        for dt in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(
                input_gradient_path(true, true, dt, dt, &c),
                CudnnBackwardData
            );
            assert_eq!(input_gradient_path(false, true, dt, dt, &c), Composed);
            assert_eq!(input_gradient_path(true, false, dt, dt, &c), Composed);
        }
        assert_eq!(
            input_gradient_path(true, true, DType::F64, DType::F64, &c),
            Composed
        );
        assert_eq!(
            input_gradient_path(true, true, DType::BF16, DType::F32, &c),
            Composed
        );
        let grouped = candle_nn::Conv2dConfig { groups: 2, ..c };
        assert_eq!(
            input_gradient_path(true, true, DType::F32, DType::F32, &grouped),
            Composed
        );
        // CPU tensors always take the composed path, whatever the build.
        let g = randn(1, &[1, 4, 4, 4]);
        let k = randn(2, &[4, 3, 3, 3]);
        assert_eq!(input_gradient_path_for(&g, &k, &c), Composed);
    }

    /// The forward-convolution form of the input gradient against candle's transposed
    /// convolution (the plain form), over strides, paddings, kernel shapes and odd sizes.
    #[test]
    fn conv_input_gradient_as_a_forward_convolution_matches_the_transposed_one() {
        for (stride, padding, (k_h, k_w), (h, w)) in [
            (1, 1, (3, 3), (8, 10)),
            (1, 0, (3, 3), (7, 5)),
            (1, 0, (1, 1), (5, 6)),
            (2, 1, (3, 3), (8, 8)),
            (2, 1, (3, 3), (7, 9)),
            (2, 0, (1, 1), (6, 7)),
            (3, 1, (3, 3), (11, 10)),
            (1, 1, (3, 5), (6, 9)),
            (2, 2, (5, 3), (9, 8)),
        ] {
            let kernel = randn(3, &[4, 3, k_h, k_w]);
            let cfg = candle_nn::Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            };
            let x = randn(7, &[2, 3, h, w]);
            let y = x.conv2d(&kernel, padding, stride, 1, 1).unwrap();
            let g = randn(8, y.dims());
            let got = conv2d_input_gradient(&g, &kernel, &cfg, h, w).unwrap();
            let want = conv2d_input_gradient_transposed(&g, &kernel, &cfg, h, w).unwrap();
            assert_eq!(got.dims(), x.dims());
            let err = max_diff(&got, &want);
            assert!(
                err < 1e-4,
                "k{k_h}x{k_w} s{stride} p{padding} {h}x{w}: {err}"
            );
            // And the adjoint identity <conv(x), g> = <x, dx(g)> with no reference at all.
            let lhs: f32 = (&y * &g).unwrap().sum_all().unwrap().to_scalar().unwrap();
            let rhs: f32 = (&x * &got).unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(
                (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
                "{lhs} vs {rhs}"
            );
        }
    }

    /// candle's CPU conv2d computed wrong results for non-contiguous kernel views (candle #3736,
    /// fixed upstream in July 2026). The release in use must get transposed and sliced kernel
    /// views right; the input gradient above makes its kernel contiguous regardless.
    #[test]
    fn candle_conv2d_with_kernel_views_matches_contiguous_kernels() {
        let base = randn(3, &[6, 4, 3, 3]);
        let views = [
            (
                "transposed",
                base.transpose(0, 1).unwrap().narrow(1, 0, 3).unwrap(),
            ),
            (
                "sliced",
                base.narrow(0, 1, 4).unwrap().narrow(1, 0, 3).unwrap(),
            ),
        ];
        let x = randn(7, &[2, 3, 6, 7]);
        for (name, kernel) in views {
            assert!(!kernel.is_contiguous(), "{name}");
            let view = x.conv2d(&kernel, 1, 1, 1, 1).unwrap();
            let copy = x.conv2d(&kernel.contiguous().unwrap(), 1, 1, 1, 1).unwrap();
            let err = max_diff(&view, &copy);
            assert!(err < 1e-5, "{name} kernel view: max error {err}");
        }
    }
}
