//! The input gradient of a frozen convolution: its sizes, which implementation runs it, and on
//! CUDA builds with cuDNN, cuDNN's backward-data (`cudnnConvolutionBackwardData`).
//!
//! candle's own input gradient is a transposed convolution (a naive kernel on CUDA), and the
//! composed form in [`super::conv2d_input_gradient_composed`] is a forward convolution over a
//! zero-spread gradient: on a GPU with cuDNN, backward-data does the same work in one call without
//! the spread tensor. The sizes and the dispatch are plain functions so that the CPU tests pin them
//! down; the values on CUDA are checked by `tests/cuda_kernels.rs` in the GPU check.

use candle_core::DType;

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
    ) -> Result<Self, ConvGradError> {
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
    /// ([`super::conv2d_input_gradient_composed`]): every device and dtype.
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

#[cfg(feature = "cudnn")]
pub(super) use cudnn_op::backward_data;

#[cfg(feature = "cudnn")]
mod cudnn_op {
    use super::ConvGradGeometry;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cudnn::{sys, ConvBackwardData, Cudnn, CudnnDataType};
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId};
    use candle_core::{CpuStorage, CudaStorage, DType, Layout, Result, Shape, Tensor, WithDType};
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::Arc;

    // cuDNN handles are neither Send nor Sync: one per thread and device, as candle keeps its own.
    thread_local! {
        static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    }

    fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
        HANDLES.with(|handles| {
            if let Some(h) = handles.borrow().get(&dev.id()) {
                return Ok(h.clone());
            }
            let h = Cudnn::new(dev.cuda_stream()).map_err(candle_core::Error::wrap)?;
            handles.borrow_mut().insert(dev.id(), h.clone());
            Ok(h)
        })
    }

    /// `dx` of `conv2d(x, kernel)` for the output gradient `g`, through cuDNN. Both tensors are
    /// made contiguous first (the descriptors are packed NCHW).
    pub(in crate::model::nn) fn backward_data(
        g: &Tensor,
        kernel: &Tensor,
        geometry: ConvGradGeometry,
    ) -> Result<Tensor> {
        g.contiguous()?
            .apply_op2_no_bwd(&kernel.contiguous()?, &CudnnBackwardData(geometry))
    }

    struct CudnnBackwardData(ConvGradGeometry);

    impl candle_core::CustomOp2 for CudnnBackwardData {
        fn name(&self) -> &'static str {
            "cudnn-conv2d-backward-data"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            // The dispatch sends only CUDA tensors here; the CPU has the composed path.
            candle_core::bail!("cuDNN backward-data runs on CUDA tensors only")
        }

        fn cuda_fwd(
            &self,
            g: &CudaStorage,
            g_l: &Layout,
            k: &CudaStorage,
            k_l: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            if !g_l.is_contiguous() || !k_l.is_contiguous() {
                candle_core::bail!("cuDNN backward-data: operands must be contiguous");
            }
            let geo = &self.0;
            let storage = match (g.dtype(), k.dtype()) {
                (DType::F32, DType::F32) => launch::<f32, f32>(geo, g, g_l, k, k_l)?,
                // Half precision with f32 accumulation (cuDNN's PSEUDO_HALF / PSEUDO_BFLOAT16
                // configurations; bf16 has no other).
                (DType::F16, DType::F16) => launch::<half::f16, f32>(geo, g, g_l, k, k_l)?,
                (DType::BF16, DType::BF16) => launch::<half::bf16, f32>(geo, g, g_l, k, k_l)?,
                (a, b) => candle_core::bail!("cuDNN backward-data: unsupported dtypes {a:?}/{b:?}"),
            };
            Ok((storage, Shape::from(geo.input_dims().to_vec())))
        }
    }

    /// cuDNN takes `int` sizes.
    fn int(v: usize) -> Result<i32> {
        i32::try_from(v).map_err(|_| {
            candle_core::Error::Msg(format!("cuDNN backward-data: size {v} exceeds i32"))
        })
    }

    fn dims(d: [usize; 4]) -> Result<[i32; 4]> {
        Ok([int(d[0])?, int(d[1])?, int(d[2])?, int(d[3])?])
    }

    fn launch<T, C>(
        geo: &ConvGradGeometry,
        g: &CudaStorage,
        g_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
    ) -> Result<CudaStorage>
    where
        T: CudaDType + DeviceRepr + ValidAsZeroBits + CudnnDataType + WithDType,
        C: CudnnDataType,
    {
        let wrap = candle_core::Error::wrap;
        let dev = g.device().clone();
        let dy = g.as_cuda_slice::<T>()?.slice(g_l.start_offset()..);
        let w = k.as_cuda_slice::<T>()?.slice(k_l.start_offset()..);
        let cudnn = handle(&dev)?;
        let (p, s, d) = (int(geo.padding)?, int(geo.stride)?, int(geo.dilation)?);
        let conv = cudnn
            .create_conv2d::<C>(
                [p, p],
                [s, s],
                [d, d],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(wrap)?;
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let dx_desc = cudnn
            .create_4d_tensor::<T>(nchw, dims(geo.input_dims())?)
            .map_err(wrap)?;
        let w_desc = cudnn
            .create_4d_filter::<T>(nchw, dims([geo.c_out, geo.c_in, geo.k_h, geo.k_w])?)
            .map_err(wrap)?;
        let dy_desc = cudnn
            .create_4d_tensor::<T>(nchw, dims([geo.batch, geo.c_out, geo.out_h, geo.out_w])?)
            .map_err(wrap)?;
        let op = ConvBackwardData {
            conv: &conv,
            dx: &dx_desc,
            w: &w_desc,
            dy: &dy_desc,
        };
        let algo = op.pick_algorithm().map_err(wrap)?;
        let workspace_size = op.get_workspace_size(algo).map_err(wrap)?;
        let mut workspace = dev.alloc_zeros::<u8>(workspace_size)?;
        // Every element is written (beta = 0), so the output needs no zeroing.
        let mut dx = unsafe { dev.alloc::<T>(geo.input_dims().iter().product())? };
        unsafe {
            op.launch::<CudaSlice<u8>, _, _, _>(
                algo,
                Some(&mut workspace),
                (T::from_f64(1.0), T::from_f64(0.0)),
                &mut dx,
                &w,
                &dy,
            )
        }
        .map_err(wrap)?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nn::conv2d_input_gradient;
    use crate::model::nn::test_util::{max_diff, randn};

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
}
