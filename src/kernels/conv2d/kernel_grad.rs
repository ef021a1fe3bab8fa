//! Convolutions whose kernel is trained (the base model's SFT layers and time-aware encoder):
//! `conv2d(x, kernel)` (no bias, no groups or dilation) with gradients for the kernel and, when
//! it is tracked, the input.
//!
//! candle's own conv2d backward derives the input gradient's output padding from the height
//! alone (a shape error at stride 2 when height and width differ in parity) and runs it as a
//! transposed convolution, a direct loop on the CPU. This op runs the forward detached on
//! [`super::conv2d`]'s fast path, gives the input the gradient frozen layers use
//! ([`super::input_grad`]) and the kernel its gradient as one forward convolution of the input
//! with the output gradient. Any device and dtype (the fast paths are the CPU's).

use super::conv2d;
use super::input_grad::conv2d_input_gradient;
use crate::kernels::frozen::HandOver;
use candle_core::{Result, Tensor};
use candle_nn::Conv2dConfig;

/// `conv2d(x, kernel)` (no bias) with gradients for `kernel` and, when it is tracked, `x`.
pub fn conv2d_trainable(x: &Tensor, kernel: &Tensor, cfg: &Conv2dConfig) -> Result<Tensor> {
    if cfg.groups != 1 || cfg.dilation != 1 {
        candle_core::bail!("trainable conv2d: groups and dilation other than 1 are not used");
    }
    let y = conv2d(&x.detach(), &kernel.detach(), cfg)?;
    let op = TrainableConv2d {
        output: HandOver::new(y),
        cfg: *cfg,
        input_tracked: x.track_op(),
    };
    x.apply_op2_arc(kernel, std::sync::Arc::new(Box::new(op)))
}

/// dL/dkernel of `conv2d(x, kernel, cfg)` for the output gradient `g`: for every tap, the sum
/// over batch and positions of `g[b, o, y, x] · x_pad[b, i, y·s + kh, x·s + kw]`, which is a
/// convolution of `x` (batch as channels) with `g` (dilated by the stride) as the kernel.
pub fn conv2d_kernel_gradient(
    x: &Tensor,
    g: &Tensor,
    kernel_dims: (usize, usize),
    cfg: &Conv2dConfig,
) -> Result<Tensor> {
    let (k_h, k_w) = kernel_dims;
    let x_t = x.transpose(0, 1)?.contiguous()?;
    let g_t = g.transpose(0, 1)?.contiguous()?;
    // Stride becomes the dilation of the gradient "kernel"; the result is [in, out, kh', kw'],
    // where kh' may exceed kh by the rows a stride left unused on the far side.
    let taps = x_t.conv2d(&g_t, cfg.padding, 1, cfg.stride, 1)?;
    taps.narrow(2, 0, k_h)?
        .narrow(3, 0, k_w)?
        .transpose(0, 1)?
        .contiguous()
}

struct TrainableConv2d {
    output: HandOver,
    cfg: Conv2dConfig,
    input_tracked: bool,
}

impl candle_core::CustomOp2 for TrainableConv2d {
    fn name(&self) -> &'static str {
        "trainable-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        self.output.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.output.cuda()
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, k_h, k_w) = kernel.dims4()?;
        let (_, _, in_h, in_w) = x.dims4()?;
        let grad_x = if self.input_tracked {
            Some(conv2d_input_gradient(
                grad_y, kernel, &self.cfg, in_h, in_w,
            )?)
        } else {
            None
        };
        let grad_kernel = conv2d_kernel_gradient(x, grad_y, (k_h, k_w), &self.cfg)?;
        Ok((grad_x, Some(grad_kernel)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_diff, randn};
    use candle_core::Var;

    /// Values and both gradients against candle's composed conv2d and its backward, for the
    /// strides and paddings of the networks, on even sizes (where candle's backward works) —
    /// and on mixed-parity sizes at stride 2 against the adjoint identities.
    #[test]
    fn trainable_conv_matches_candles_backward() {
        for (stride, padding, k, h, w) in [(1, 1, 3, 6, 8), (2, 1, 3, 8, 6), (1, 0, 1, 5, 7)] {
            let kernel = Var::from_tensor(&randn(3, &[5, 4, k, k])).unwrap();
            let x = Var::from_tensor(&randn(5, &[2, 4, h, w])).unwrap();
            let cfg = Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            };
            let plain = x
                .as_tensor()
                .conv2d(kernel.as_tensor(), padding, stride, 1, 1)
                .unwrap();
            let r = randn(6, plain.dims());
            let want = (&plain * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let ours = conv2d_trainable(x.as_tensor(), kernel.as_tensor(), &cfg).unwrap();
            let got = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let name = format!("stride {stride} k {k} {h}x{w}");
            assert!(max_diff(&ours, &plain) < 1e-5, "{name}: forward");
            for (what, t) in [("x", x.as_tensor()), ("kernel", kernel.as_tensor())] {
                let err = max_diff(got.get(t).unwrap(), want.get(t).unwrap());
                println!("{name}: d{what} max abs error {err:e}");
                assert!(err < 1e-4, "{name}: d{what} error {err}");
            }
        }
    }

    /// Odd height and even width at stride 2: <conv(x, k), g> is bilinear, so its derivative in
    /// `k` along a direction `d` is <conv(x, d), g> = <dk, d>, and in `x` likewise.
    #[test]
    fn trainable_conv_gradients_are_adjoint_for_mixed_parity() {
        let cfg = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let kernel = Var::from_tensor(&randn(3, &[4, 3, 3, 3])).unwrap();
        let x = Var::from_tensor(&randn(7, &[2, 3, 7, 10])).unwrap();
        let y = conv2d_trainable(x.as_tensor(), kernel.as_tensor(), &cfg).unwrap();
        let g = randn(8, y.dims());
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let dot = |a: &Tensor, b: &Tensor| -> f32 {
            (a * b)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let d = randn(9, &[4, 3, 3, 3]);
        let lhs = dot(&x.as_tensor().conv2d(&d, 1, 2, 1, 1).unwrap(), &g);
        let rhs = dot(grads.get(kernel.as_tensor()).unwrap(), &d);
        assert!(
            (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
        let dx = grads.get(x.as_tensor()).unwrap();
        assert_eq!(dx.dims(), x.dims());
        let e = randn(10, x.dims());
        let lhs = dot(&e.conv2d(kernel.as_tensor(), 1, 2, 1, 1).unwrap(), &g);
        let rhs = dot(dx, &e);
        assert!(
            (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }
}
