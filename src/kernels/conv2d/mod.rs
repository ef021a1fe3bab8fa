//! 2-D convolution (NCHW input, `[c_out, c_in, k_h, k_w]` kernel, no bias): the forward, the
//! input gradient and the trained kernel's gradient.
//!
//! The forward ([`conv2d`]) takes its fused CPU path where it [`applies`]: f32 CPU tensors,
//! no dilation or groups, a kernel larger than 1x1 and no gradient to track (a trained
//! kernel's forward runs detached, see [`kernel_grad`]). There, large 3x3 stride-1
//! convolutions run by Winograd's F(2x2, 3x3) ([`winograd`], where its measured
//! [`winograd::pays`] says so) and the others as shifted matrix products ([`shifted_gemm`]);
//! candle 0.11's CPU path instead transposes the input to NHWC single-threaded and builds an
//! im2col tile per 512 pixels (over half of a 512x512 VAE decode's time). Anything else runs
//! candle's `conv2d`. Strided inputs are made contiguous first.
//!
//! - [`input_grad`]: `dL/dx` as a forward convolution of the flipped kernel (every device and
//!   dtype), or cuDNN's backward-data on CUDA builds with the `cudnn` feature (`cudnn.rs`).
//! - [`kernel_grad`]: `dL/dkernel`, and the convolution whose kernel is trained.

pub mod input_grad;
pub mod kernel_grad;
pub mod shifted_gemm;
pub mod winograd;

#[cfg(feature = "cudnn")]
mod cudnn;

pub use input_grad::{
    conv2d_input_gradient, conv2d_input_gradient_composed, conv_output_len, input_gradient_path,
    input_gradient_path_for, ConvGradError, ConvGradGeometry, InputGradientPath,
};
pub use kernel_grad::{conv2d_kernel_gradient, conv2d_trainable};

use candle_core::{DType, Result, Tensor};
use candle_nn::Conv2dConfig;
use shifted_gemm::ShiftedGemmConv2d;
use winograd::Winograd3x3Conv2d;

/// Whether the fused CPU forward takes `x` and `kernel` with `cfg`: f32 CPU tensors, no
/// dilation or groups, a kernel of more than one tap, no gradient to track.
pub fn applies(x: &Tensor, kernel: &Tensor, cfg: &Conv2dConfig) -> Result<bool> {
    let (_, _, k_h, k_w) = kernel.dims4()?;
    Ok(x.device().is_cpu()
        && x.dtype() == DType::F32
        && kernel.dtype() == DType::F32
        && cfg.dilation == 1
        && cfg.groups == 1
        && k_h * k_w > 1
        && !x.track_op()
        && !kernel.track_op())
}

/// `x.conv2d(kernel, ...)` with `cfg`'s padding, stride, dilation and groups: the fused CPU
/// convolution where it [`applies`], candle's elsewhere.
pub fn conv2d(x: &Tensor, kernel: &Tensor, cfg: &Conv2dConfig) -> Result<Tensor> {
    if !applies(x, kernel, cfg)? {
        return x.conv2d(kernel, cfg.padding, cfg.stride, cfg.dilation, cfg.groups);
    }
    cpu_conv2d(x, kernel, cfg.padding, cfg.stride, false)
}

/// The CPU f32 convolution without dilation or groups: large 3x3 stride-1 ones by Winograd's
/// F(2x2, 3x3), the others as shifted matrix products. `flipped_transposed` reads the kernel as
/// its spatial flip with the channel axes swapped.
fn cpu_conv2d(
    x: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    flipped_transposed: bool,
) -> Result<Tensor> {
    let (batch, c_in, h, w) = x.dims4()?;
    let (k_0, k_1, k_h, k_w) = kernel.dims4()?;
    let c_out = if flipped_transposed { k_1 } else { k_0 };
    let (x, kernel) = (x.contiguous()?, kernel.contiguous()?);
    let out = |len: usize, k: usize| (len + 2 * padding).saturating_sub(k) + 1;
    if (k_h, k_w, stride) == (3, 3, 1)
        && winograd::pays(batch, c_in, c_out, out(h, k_h), out(w, k_w))
    {
        let op = Winograd3x3Conv2d {
            padding,
            flipped_transposed,
        };
        return x.apply_op2_no_bwd(&kernel, &op);
    }
    let op = ShiftedGemmConv2d {
        padding,
        stride,
        flipped_transposed,
    };
    x.apply_op2_no_bwd(&kernel, &op)
}

/// A convolution kernel's `(c_out, c_in, k_h, k_w)`; with `flipped_transposed` the stored
/// kernel is `[c_in, c_out, k_h, k_w]` (read as its spatial flip with the channel axes swapped).
fn kernel_dims(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_abs, max_diff, randn};

    /// The entry against candle's conv2d on both of its paths: fused (Winograd-sized and
    /// shifted-GEMM-sized shapes, a strided input view) and candle's (1x1, dilation).
    #[test]
    fn conv2d_entry_matches_candle_on_every_path() {
        for (x_shape, k_shape, padding, stride, dilation) in [
            ([1, 32, 48, 48], [32, 32, 3, 3], 1, 1, 1),
            ([2, 5, 9, 7], [6, 5, 3, 3], 1, 2, 1),
            ([1, 4, 6, 6], [3, 4, 1, 1], 0, 1, 1),
            ([1, 4, 9, 9], [3, 4, 3, 3], 2, 1, 2),
        ] {
            let cfg = Conv2dConfig {
                padding,
                stride,
                dilation,
                ..Default::default()
            };
            let x = randn(1, &x_shape);
            let kernel = randn(2, &k_shape);
            let fused = applies(&x, &kernel, &cfg).unwrap();
            assert_eq!(
                fused,
                k_shape[2] > 1 && dilation == 1,
                "{x_shape:?} {k_shape:?}"
            );
            let want = x.conv2d(&kernel, padding, stride, dilation, 1).unwrap();
            let got = conv2d(&x, &kernel, &cfg).unwrap();
            let err = max_diff(&got, &want);
            println!("{x_shape:?} {k_shape:?} fused {fused}: max abs error {err:e}");
            assert!(
                err < 2e-6 * max_abs(&want),
                "{x_shape:?} {k_shape:?}: {err}"
            );
        }
        // A non-contiguous input view on the fused path.
        let x = randn(3, &[1, 9, 10, 4]).permute((0, 3, 1, 2)).unwrap();
        let kernel = randn(4, &[5, 4, 3, 3]);
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let want = x.contiguous().unwrap().conv2d(&kernel, 1, 1, 1, 1).unwrap();
        let err = max_diff(&conv2d(&x, &kernel, &cfg).unwrap(), &want);
        assert!(err < 2e-6 * max_abs(&want), "strided input: {err}");
    }
}
