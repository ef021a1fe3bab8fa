//! The layers of the networks: norms (f32 statistics), linear and convolution (frozen in
//! training, see [`super::frozen`]) and GELU.

#[cfg(feature = "cudnn")]
use super::conv_backward::InputGradientPath;
use super::conv_backward::{input_gradient_path_for, ConvGradGeometry};
use super::cpu_kernels::{FusedGroupNormCpu, FusedLayerNormCpu, ShiftedGemmConv2d};
use super::differentiable;
use super::frozen::{add_const, mul_const, with_input_gradient};
use super::winograd::{self, Winograd3x3Conv2d};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// `torch.nn.LayerNorm` over the last dimension, statistics in f32.
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

impl LayerNorm {
    /// Differentiable mode on the CPU: one pass forward and one back (the composed norm's graph
    /// kept four activation-sized tensors and took five passes back). Also without a gradient
    /// to carry, so that a tracked and an untracked input (or trained and loaded weights) give
    /// the same bits.
    fn fused_for_training(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let fusable = differentiable()
            && [x, &self.weight, &self.bias]
                .iter()
                .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
            && x.elem_count() > 0
            && self.weight.rank() == 1
            && x.dim(D::Minus1)? == self.weight.elem_count();
        if !fusable {
            return Ok(None);
        }
        let op = FusedLayerNormCpu { eps: self.eps };
        let tracked = x.track_op() || self.weight.track_op() || self.bias.track_op();
        Ok(Some(if tracked {
            x.apply_op3_arc(&self.weight, &self.bias, std::sync::Arc::new(Box::new(op)))?
        } else {
            x.apply_op3_no_bwd(&self.weight, &self.bias, &op)?
        }))
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        if !differentiable() && x.is_contiguous() && dtype == DType::F32 {
            return candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        if let Some(y) = self.fused_for_training(x)? {
            return Ok(y);
        }
        let x = x.to_dtype(DType::F32)?;
        let n = x.dim(D::Minus1)? as f64;
        let mean = (x.sum_keepdim(D::Minus1)? / n)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = (centered.sqr()?.sum_keepdim(D::Minus1)? / n)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        add_const(
            &mul_const(&normed.to_dtype(dtype)?, &self.weight)?,
            &self.bias,
        )
    }
}

/// `torch.nn.GroupNorm(groups, channels, eps, affine=True)` on NCHW (or NC...) tensors,
/// statistics in f32. Composed of plain ops, so it is differentiable.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) groups: usize,
    pub(crate) eps: f64,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if !channels.is_multiple_of(groups) {
            candle_core::bail!("GroupNorm: {channels} channels not divisible by {groups} groups");
        }
        Ok(GroupNorm {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }
}

impl GroupNorm {
    /// The norm from plain candle ops (differentiable in everything, any device and dtype).
    pub(crate) fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let x = x.to_dtype(DType::F32)?.reshape((b, self.groups, ()))?;
        let n = x.dim(2)? as f64;
        let mean = (x.sum_keepdim(2)? / n)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = (centered.sqr()?.sum_keepdim(2)? / n)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut affine_shape = vec![1usize; dims.len()];
        affine_shape[1] = c;
        let normed = normed.reshape(dims.as_slice())?.to_dtype(dtype)?;
        add_const(
            &mul_const(&normed, &self.weight.reshape(affine_shape.as_slice())?)?,
            &self.bias.reshape(affine_shape.as_slice())?,
        )
    }
}

impl GroupNorm {
    /// `silu(norm(x))`, the pair every UNet and VAE block applies.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        match self.fused(x, true)? {
            Some(y) => Ok(y),
            None => self.forward_composed(x)?.silu(),
        }
    }

    /// The fused CPU pass, where it applies: one pass instead of seven tensor-wide ones (eight
    /// with the SiLU), and in training one fused backward pass instead of the composed ops'
    /// graph, which kept several activation-sized tensors per norm.
    fn fused(&self, x: &Tensor, silu: bool) -> Result<Option<Tensor>> {
        let fusable = x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && x.is_contiguous()
            && !self.weight.track_op()
            && !self.bias.track_op();
        if !fusable {
            return Ok(None);
        }
        let op = FusedGroupNormCpu {
            groups: self.groups,
            eps: self.eps,
            weight: self.weight.to_vec1()?,
            bias: self.bias.to_vec1()?,
            silu,
        };
        Ok(Some(if differentiable() && x.track_op() {
            x.apply_op1(op)?
        } else {
            x.apply_op1_no_bwd(&op)?
        }))
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.fused(x, false)? {
            Some(y) => Ok(y),
            None => self.forward_composed(x),
        }
    }
}

/// GroupNorm32 of the openaimodel blocks: 32 groups, eps 1e-5.
pub fn group_norm32(channels: usize, vb: VarBuilder) -> Result<GroupNorm> {
    GroupNorm::new(32, channels, 1e-5, vb)
}

/// 2-D convolution with `padding` and `stride`, weights `weight` / `bias` as in torch.
pub fn conv2d(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = candle_nn::Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Ok(Conv2d(candle_nn::conv2d(in_c, out_c, kernel, cfg, vb)?))
}

/// `torch.nn.Linear` with bias.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear(candle_nn::linear(in_dim, out_dim, vb)?))
}

/// `torch.nn.Linear` without bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear(candle_nn::linear_no_bias(in_dim, out_dim, vb)?))
}

// Frozen layers in training.
//
// candle's backward of `matmul`, `conv2d` and binary ops computes a gradient for *both* operands
// and keeps every one of them in the gradient store until the end, also for tensors that need
// none (frozen weights, constant modulations). For personalization, where the whole frozen base
// sits between the loss and the token, that is a weight-sized gradient per layer call (the full
// 512-px step did not fit in 24 GB) and a second expensive product per layer. So, in
// differentiable mode, a layer whose parameters are constants runs its forward without a graph
// and attaches a backward that returns only the input's gradient. Trainable layers (weights that
// are `Var`s) and inference take candle's ordinary path.

/// A frozen (or trainable) `torch.nn.Linear`; see the note above on its backward.
#[derive(Debug, Clone)]
pub struct Linear(pub(crate) candle_nn::Linear);

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

/// A frozen (or trainable) `torch.nn.Conv2d`; see the note above on its backward.
#[derive(Debug, Clone)]
pub struct Conv2d(pub(crate) candle_nn::Conv2d);

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: candle_nn::Conv2dConfig) -> Self {
        Conv2d(candle_nn::Conv2d::new(weight, bias, cfg))
    }

    fn frozen(&self) -> bool {
        !self.0.weight().track_op()
            && !self.0.bias().is_some_and(|b| b.track_op())
            && self.0.config().groups == 1
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if differentiable() && self.0.weight().track_op() && self.0.config().groups == 1 {
            let y = super::trainable::conv2d_trainable(x, self.0.weight(), self.0.config())?;
            return match self.0.bias() {
                None => Ok(y),
                Some(bias) => y.broadcast_add(&bias.reshape((1, bias.dims1()?, 1, 1))?),
            };
        }
        if differentiable() && x.track_op() && self.frozen() {
            let y = self.forward_plain(&x.detach())?;
            let kernel = self.0.weight().clone();
            let cfg = *self.0.config();
            let (in_h, in_w) = (x.dim(2)?, x.dim(3)?);
            return with_input_gradient(x, y, move |g| {
                conv2d_input_gradient(g, &kernel, &cfg, in_h, in_w)
            });
        }
        self.forward_plain(x)
    }
}

impl Conv2d {
    /// `torch.nn.Conv2d`'s forward, on the fast CPU convolution where it applies.
    fn forward_plain(&self, x: &Tensor) -> Result<Tensor> {
        let y = conv2d_forward(x, self.0.weight(), self.0.config())?;
        match self.0.bias() {
            None => Ok(y),
            Some(bias) => y.broadcast_add(&bias.reshape((1, bias.dims1()?, 1, 1))?),
        }
    }
}

/// `x.conv2d(kernel, ...)`; on the CPU in f32, without dilation or groups and with no gradient
/// to track, [`cpu_conv2d`] instead of candle's im2col path.
pub(crate) fn conv2d_forward(
    x: &Tensor,
    kernel: &Tensor,
    cfg: &candle_nn::Conv2dConfig,
) -> Result<Tensor> {
    let (_, _, k_h, k_w) = kernel.dims4()?;
    let fast = x.device().is_cpu()
        && x.dtype() == DType::F32
        && kernel.dtype() == DType::F32
        && cfg.dilation == 1
        && cfg.groups == 1
        && k_h * k_w > 1
        && !x.track_op()
        && !kernel.track_op();
    if !fast {
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
        return cpu_conv2d(x, kernel, padding, 1, true);
    }
    let swapped = kernel.transpose(0, 1)?.contiguous()?;
    let flipped = if k_h * k_w > 1 {
        flip_spatial(&swapped)?
    } else {
        swapped
    };
    conv2d_forward(x, &flipped, &unit_stride(padding))
}

/// The input gradient of `conv2d(x, kernel, cfg)` for the output gradient `g`, `x` being
/// `in_h` x `in_w`: cuDNN's backward-data on CUDA builds with cuDNN (see
/// [`super::conv_backward`]), else [`conv2d_input_gradient_composed`].
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
            super::conv_backward::backward_data(g, kernel, geometry)
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

#[cfg(test)]
pub(crate) fn conv2d_input_gradient_transposed_for_test(
    g: &Tensor,
    kernel: &Tensor,
    cfg: &candle_nn::Conv2dConfig,
    in_h: usize,
    in_w: usize,
) -> Tensor {
    conv2d_input_gradient_transposed(g, kernel, cfg, in_h, in_w).unwrap()
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

/// Exact (erf) GELU, as `torch.nn.functional.gelu` by default.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nn::set_differentiable;
    use crate::model::nn::test_util::{max_diff, randn};
    use candle_core::Var;

    /// `torch.nn.LayerNorm` written out in candle ops (differentiable in everything).
    fn layer_norm_composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let centered = x.broadcast_sub(&mean).unwrap();
        let var = centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let normed = centered
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap();
        normed.broadcast_mul(w).unwrap().broadcast_add(b).unwrap()
    }

    /// In training on the CPU with frozen weights, the fused norm: values and input gradient
    /// against candle's backward of the composed ops; no gradient for the weights. With trained
    /// weights the fused norm also gives their gradients.
    #[test]
    fn training_layer_norm_matches_the_composed_one() {
        for shape in [[2usize, 37, 40], [1, 5, 320], [3, 1, 7]] {
            let c = shape[2];
            let (w, b) = (randn(11, &[c]), randn(12, &[c]));
            let x = Var::from_tensor(&((randn(13, &shape) * 3.0).unwrap() + 2.0).unwrap()).unwrap();
            let w_out = randn(14, &shape);
            let loss = |y: &Tensor| (y * &w_out).unwrap().sum_all().unwrap();
            let want_y = layer_norm_composed(x.as_tensor(), &w, &b, 1e-5);
            let want = loss(&want_y).backward().unwrap();

            let norm = LayerNorm::from_tensors(w.clone(), b.clone(), 1e-5);
            set_differentiable(true);
            let y = norm.forward(x.as_tensor()).unwrap();
            set_differentiable(false);
            assert!(y.track_op(), "the result has a backward");
            let y_err = max_diff(&y, &want_y);
            let got = loss(&y).backward().unwrap();
            let dx_err = max_diff(
                got.get(x.as_tensor()).expect("input gradient"),
                want.get(x.as_tensor()).unwrap(),
            );
            println!("{shape:?}: max abs error {y_err:e}, input gradient {dx_err:e}");
            assert!(
                y_err < 2e-5 && dx_err < 1e-4,
                "{shape:?}: {y_err:e} {dx_err:e}"
            );
            assert!(got.get(&w).is_none() && got.get(&b).is_none());

            // Trained weights (the personalization blocks' norms): input, weight and bias
            // gradients against the composed norm's, and the same bits as constant weights.
            let (w_var, b_var) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
            let want_y =
                layer_norm_composed(x.as_tensor(), w_var.as_tensor(), b_var.as_tensor(), 1e-5);
            let want = loss(&want_y).backward().unwrap();
            let trained =
                LayerNorm::from_tensors(w_var.as_tensor().clone(), b_var.as_tensor().clone(), 1e-5);
            set_differentiable(true);
            let y_trained = trained.forward(x.as_tensor()).unwrap();
            let y_constant = norm.forward(&x.as_tensor().detach()).unwrap();
            set_differentiable(false);
            assert_eq!(max_diff(&y_trained, &y_constant), 0.0);
            let got = loss(&y_trained).backward().unwrap();
            for (name, t) in [
                ("x", x.as_tensor()),
                ("weight", w_var.as_tensor()),
                ("bias", b_var.as_tensor()),
            ] {
                let err = max_diff(got.get(t).expect("gradient"), want.get(t).unwrap());
                println!("{shape:?}, trained weights: d{name} max abs error {err:e}");
                assert!(err < 1e-4, "{shape:?}: d{name} {err:e}");
            }
        }
    }
}
