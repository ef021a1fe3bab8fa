//! The layers the networks are made of: norms, linear and convolution, with their parameters
//! and `VarBuilder` paths (`weight`, `bias`, as torch names them). The computation is the
//! kernels' ([`crate::kernels`]); a layer decides only what its parameters imply.
//!
//! Frozen layers in training: in differentiable mode a layer whose parameters are constants
//! runs its forward without a graph and attaches a backward that gives only the input its
//! gradient ([`crate::kernels::frozen`]: candle's backward would compute and keep a
//! weight-sized gradient for every frozen layer). A convolution whose kernel is trained (a
//! `Var`) takes [`crate::kernels::conv2d::conv2d_trainable`]; inference takes the plain path.

use crate::kernels::conv2d::{conv2d_input_gradient, conv2d_trainable};
use crate::kernels::{differentiable, with_input_gradient, GroupNormParams};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `torch.nn.LayerNorm` over the last dimension, statistics in f32
/// ([`crate::kernels::layer_norm`]).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    pub fn from_tensors(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        LayerNorm { weight, bias, eps }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// `torch.nn.GroupNorm(groups, channels, eps, affine=True)` on NCHW (or NC...) tensors
/// ([`crate::kernels::group_norm`]).
#[derive(Debug, Clone)]
pub struct GroupNorm(GroupNormParams);

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("GroupNorm: {channels} channels not divisible by {groups} groups");
        }
        Ok(GroupNorm(GroupNormParams {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        }))
    }

    /// `silu(norm(x))`, the pair every UNet and VAE block applies (one fused pass on the CPU).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::group_norm(x, &self.0, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::group_norm(x, &self.0, false)
    }
}

/// GroupNorm32 of the openaimodel blocks: 32 groups, eps 1e-5.
pub fn group_norm32(channels: usize, vb: VarBuilder) -> Result<GroupNorm> {
    GroupNorm::new(32, channels, 1e-5, vb)
}

/// A square convolution's kernel size, stride and padding, named so that they cannot be
/// swapped at a call site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvSpec {
    /// A `kernel` x `kernel` convolution at stride 1 with padding `kernel / 2`: an odd kernel
    /// keeps the input's size (3x3 with padding 1; 1x1 with none).
    pub const fn same(kernel: usize) -> Self {
        ConvSpec {
            kernel,
            stride: 1,
            padding: kernel / 2,
        }
    }

    /// The 3x3 stride-2 downsampling convolution with `padding`.
    pub const fn downsample(padding: usize) -> Self {
        ConvSpec {
            kernel: 3,
            stride: 2,
            padding,
        }
    }
}

/// `torch.nn.Conv2d(in_c, out_c, spec.kernel, spec.stride, spec.padding)` with bias; weights
/// `weight` / `bias` as in torch.
pub fn conv2d(in_c: usize, out_c: usize, spec: ConvSpec, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = candle_nn::Conv2dConfig {
        padding: spec.padding,
        stride: spec.stride,
        ..Default::default()
    };
    Ok(Conv2d(candle_nn::conv2d(
        in_c,
        out_c,
        spec.kernel,
        cfg,
        vb,
    )?))
}

/// `torch.nn.Linear` with bias.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear(candle_nn::linear(in_dim, out_dim, vb)?))
}

/// `torch.nn.Linear` without bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear(candle_nn::linear_no_bias(in_dim, out_dim, vb)?))
}

/// A frozen (or trainable) `torch.nn.Linear`; see the module notes on its backward.
#[derive(Debug, Clone)]
pub struct Linear(candle_nn::Linear);

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear(candle_nn::Linear::new(weight, bias))
    }

    pub fn weight(&self) -> &Tensor {
        self.0.weight()
    }

    fn frozen(&self) -> bool {
        !self.0.weight().track_op() && !self.0.bias().is_some_and(|b| b.track_op())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if differentiable() && x.track_op() && self.frozen() {
            let y = self.0.forward(&x.detach())?;
            let w = self.0.weight().clone();
            return with_input_gradient(x, y, move |g| g.broadcast_matmul(&w));
        }
        self.0.forward(x)
    }
}

/// A frozen (or trainable) `torch.nn.Conv2d`; see the module notes on its backward.
#[derive(Debug, Clone)]
pub struct Conv2d(candle_nn::Conv2d);

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: candle_nn::Conv2dConfig) -> Self {
        Conv2d(candle_nn::Conv2d::new(weight, bias, cfg))
    }

    fn frozen(&self) -> bool {
        !self.0.weight().track_op()
            && !self.0.bias().is_some_and(|b| b.track_op())
            && self.0.config().groups == 1
    }

    /// `y + bias` with the bias over the channel axis.
    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match self.0.bias() {
            None => Ok(y),
            Some(bias) => y.broadcast_add(&bias.reshape((1, bias.dims1()?, 1, 1))?),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let cfg = *self.0.config();
        if differentiable() && self.0.weight().track_op() && cfg.groups == 1 {
            return self.add_bias(conv2d_trainable(x, self.0.weight(), &cfg)?);
        }
        if differentiable() && x.track_op() && self.frozen() {
            let y = self.add_bias(crate::kernels::conv2d::conv2d(
                &x.detach(),
                self.0.weight(),
                &cfg,
            )?)?;
            let kernel = self.0.weight().clone();
            let (in_h, in_w) = (x.dim(2)?, x.dim(3)?);
            return with_input_gradient(x, y, move |g| {
                conv2d_input_gradient(g, &kernel, &cfg, in_h, in_w)
            });
        }
        self.add_bias(crate::kernels::conv2d::conv2d(x, self.0.weight(), &cfg)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_diff, randn};
    use crate::kernels::DifferentiableScope;
    use candle_core::Var;

    /// Output and input gradient of a frozen layer in differentiable mode against candle's
    /// ordinary backward; and no gradient is produced for the frozen weight.
    fn check_frozen(name: &str, x_shape: &[usize], weight: &Tensor, layer: &dyn Module) {
        let x = Var::from_tensor(&randn(7, x_shape)).unwrap();
        let plain = layer.forward(x.as_tensor()).unwrap();
        let w_out = randn(8, plain.dims());
        let want = (&plain * &w_out)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let frozen = {
            let _training = DifferentiableScope::enter(true);
            layer.forward(x.as_tensor()).unwrap()
        };
        let got = (&frozen * &w_out)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // The frozen path may run the shifted-gemm convolution (other summation order).
        let forward_err = max_diff(&frozen, &plain);
        assert!(
            forward_err < 1e-5,
            "{name}: forward differs by {forward_err}"
        );
        let err = max_diff(
            got.get(x.as_tensor()).unwrap(),
            want.get(x.as_tensor()).unwrap(),
        );
        assert!(err < 1e-5, "{name}: input gradient error {err}");
        // candle's path keeps (at least) a weight-sized gradient; the frozen path none.
        let stored = |g: &candle_core::backprop::GradStore| -> usize {
            g.get_ids()
                .map(|id| g.get_id(*id).unwrap().elem_count())
                .sum()
        };
        assert!(
            stored(&got) + weight.elem_count() <= stored(&want),
            "{name}: gradient store {} vs candle's {}",
            stored(&got),
            stored(&want)
        );
        assert!(
            got.get(weight).is_none(),
            "{name}: no gradient for the frozen weight"
        );
    }

    #[test]
    fn frozen_layers_give_candles_input_gradients_and_no_weight_gradients() {
        let w = randn(1, &[6, 5]);
        let linear = Linear::new(w.clone(), Some(randn(2, &[6])));
        check_frozen("linear 3-D", &[2, 3, 5], &w, &linear);
        check_frozen("linear 2-D", &[4, 5], &w, &Linear::new(w.clone(), None));
        for (stride, padding, k, h) in [(1, 1, 3, 8), (2, 1, 3, 8), (2, 1, 3, 7), (1, 0, 1, 5)] {
            let kernel = randn(3, &[4, 3, k, k]);
            let cfg = candle_nn::Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            };
            let conv = Conv2d::new(kernel.clone(), Some(randn(4, &[4])), cfg);
            check_frozen(
                &format!("conv k{k} s{stride} p{padding} h{h}"),
                &[2, 3, h, h + 2],
                &kernel,
                &conv,
            );
        }
    }

    /// Odd height, even width at stride 2 (where candle's own conv backward fails on the shape):
    /// the input gradient is the adjoint of the convolution, <conv(x), g> = <x, dx(g)>.
    #[test]
    fn frozen_conv_gradient_is_the_adjoint_for_mixed_parity() {
        let kernel = randn(3, &[4, 3, 3, 3]);
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let conv = Conv2d::new(kernel, None, cfg);
        let x = Var::from_tensor(&randn(7, &[2, 3, 7, 10])).unwrap();
        let y = {
            let _training = DifferentiableScope::enter(true);
            conv.forward(x.as_tensor()).unwrap()
        };
        let g = randn(8, y.dims());
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(x.as_tensor()).unwrap();
        assert_eq!(dx.dims(), &[2, 3, 7, 10]);
        let lhs: f32 = (&y * &g).unwrap().sum_all().unwrap().to_scalar().unwrap();
        let rhs: f32 = (x.as_tensor() * dx)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(
            (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }

    /// A convolution whose kernel and bias are variables takes the trainable path in
    /// differentiable mode: candle's gradients for the input, the kernel and the bias.
    #[test]
    fn trained_conv_layers_give_candles_gradients() {
        let kernel = Var::from_tensor(&randn(3, &[5, 4, 3, 3])).unwrap();
        let bias = Var::from_tensor(&randn(4, &[5])).unwrap();
        let x = Var::from_tensor(&randn(5, &[2, 4, 6, 8])).unwrap();
        let conv = Conv2d::new(
            kernel.as_tensor().clone(),
            Some(bias.as_tensor().clone()),
            candle_nn::Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
        );
        let plain = conv.forward(x.as_tensor()).unwrap();
        let r = randn(6, plain.dims());
        let want = (&plain * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ours = {
            let _training = DifferentiableScope::enter(true);
            conv.forward(x.as_tensor()).unwrap()
        };
        let got = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(&ours, &plain) < 1e-5);
        for t in [x.as_tensor(), kernel.as_tensor(), bias.as_tensor()] {
            let err = max_diff(got.get(t).unwrap(), want.get(t).unwrap());
            assert!(err < 1e-4, "{err}");
        }
    }

    #[test]
    fn conv_specs_name_the_networks_convolutions() {
        assert_eq!(
            ConvSpec::same(3),
            ConvSpec {
                kernel: 3,
                stride: 1,
                padding: 1
            }
        );
        assert_eq!(ConvSpec::same(1).padding, 0);
        assert_eq!(ConvSpec::downsample(0).stride, 2);
    }
}
