//! Frozen layers and constant operands in training: candle's backward would compute (and keep)
//! a gradient for every operand, frozen weights included. These run the forward without a graph
//! and give only the input its gradient.

use super::differentiable;
use candle_core::{Result, Tensor};

/// `x * c` (broadcasting) where `c` is a constant: in differentiable mode only `x` gets a gradient.
pub fn mul_const(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    if differentiable() && x.track_op() && !c.track_op() {
        let y = x.detach().broadcast_mul(c)?;
        let (c, shape) = (c.clone(), x.shape().clone());
        return with_input_gradient(x, y, move |g| sum_to_shape(&g.broadcast_mul(&c)?, &shape));
    }
    x.broadcast_mul(c)
}

/// `x + c` (broadcasting) where `c` is a constant: in differentiable mode only `x` gets a gradient.
pub fn add_const(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    if differentiable() && x.track_op() && !c.track_op() {
        let y = x.detach().broadcast_add(c)?;
        let shape = x.shape().clone();
        return with_input_gradient(x, y, move |g| sum_to_shape(g, &shape));
    }
    x.broadcast_add(c)
}

/// Sums a broadcast gradient back to the operand's shape.
pub(super) fn sum_to_shape(g: &Tensor, shape: &candle_core::Shape) -> Result<Tensor> {
    if g.shape() == shape {
        return Ok(g.clone());
    }
    let dims = shape.dims();
    let lead = g.rank() - dims.len();
    let mut out = g.clone();
    for _ in 0..lead {
        out = out.sum(0)?;
    }
    for (axis, &d) in dims.iter().enumerate() {
        if d == 1 && out.dim(axis)? != 1 {
            out = out.sum_keepdim(axis)?;
        }
    }
    Ok(out)
}

pub(super) type InputGradient = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// `y` (computed from `x` without a graph) as a tensor whose backward gives `x` the gradient
/// `input_grad(dL/dy)`. The device forward hands over `y`'s storage, which this op then drops.
pub(super) fn with_input_gradient(
    x: &Tensor,
    y: Tensor,
    input_grad: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let op = InputGradientOp {
        output: HandOver::new(y),
        input_grad: Box::new(input_grad),
    };
    x.apply_op1_arc(std::sync::Arc::new(Box::new(op)))
}

pub(super) struct InputGradientOp {
    output: HandOver,
    input_grad: InputGradient,
}

/// A forward result computed outside a custom op (without a graph), handed to candle once as the
/// op's output storage and then dropped, so it is not held twice.
pub(super) struct HandOver(std::sync::Mutex<Option<Tensor>>);

impl HandOver {
    pub(super) fn new(t: Tensor) -> Self {
        HandOver(std::sync::Mutex::new(Some(t)))
    }

    fn take(&self) -> Result<(candle_core::Storage, candle_core::Shape)> {
        let t = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("custom op: lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("custom op forward run twice".into()))?;
        clone_storage(&t)
    }

    pub(super) fn cpu(&self) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        match self.take()? {
            (candle_core::Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("custom op: precomputed output is not on the CPU"),
        }
    }

    pub(super) fn cuda(&self) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        match self.take()? {
            (candle_core::Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("custom op: precomputed output is not on the CUDA device"),
        }
    }
}

/// A copy of `t`'s storage with its shape. The outputs handed in here are fresh results of a
/// layer (their own contiguous buffer); anything else is copied into one first.
pub(super) fn clone_storage(t: &Tensor) -> Result<(candle_core::Storage, candle_core::Shape)> {
    use candle_core::backend::BackendStorage;
    use candle_core::Storage;
    let (storage, layout) = t.storage_and_layout();
    if !layout.is_contiguous() || layout.start_offset() != 0 {
        drop(storage);
        return clone_storage(&t.copy()?);
    }
    let copy = match &*storage {
        Storage::Cpu(s) => Storage::Cpu(s.try_clone(layout)?),
        Storage::Cuda(s) => Storage::Cuda(s.try_clone(layout)?),
        Storage::Metal(s) => Storage::Metal(s.try_clone(layout)?),
    };
    Ok((copy, layout.shape().clone()))
}

impl candle_core::CustomOp1 for InputGradientOp {
    fn name(&self) -> &'static str {
        "frozen-layer"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        self.output.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.output.cuda()
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.input_grad)(grad_y)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nn::test_util::{max_diff, randn};
    use crate::model::nn::{set_differentiable, Conv2d, Linear};
    use candle_core::Module;
    use candle_core::Var;

    /// Output and input gradient of a frozen layer in differentiable mode against candle's
    /// ordinary backward; and no gradient is produced for the frozen weight.
    fn check_frozen(name: &str, x_shape: &[usize], weight: &Tensor, layer: &dyn Module) {
        let x = Var::from_tensor(&randn(7, x_shape)).unwrap();
        set_differentiable(false);
        let plain = layer.forward(x.as_tensor()).unwrap();
        let w_out = randn(8, plain.dims());
        let want = (&plain * &w_out)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        set_differentiable(true);
        let frozen = layer.forward(x.as_tensor()).unwrap();
        let got = (&frozen * &w_out)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        set_differentiable(false);
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
            let conv = Conv2d(candle_nn::Conv2d::new(
                kernel.clone(),
                Some(randn(4, &[4])),
                cfg,
            ));
            check_frozen(
                &format!("conv k{k} s{stride} p{padding} h{h}"),
                &[2, 3, h, h + 2],
                &kernel,
                &conv,
            );
        }
    }

    /// The forward-convolution form of the input gradient against candle's transposed
    /// convolution (the plain form), over strides, paddings, kernel shapes and odd sizes.
    #[test]
    fn conv_input_gradient_as_a_forward_convolution_matches_the_transposed_one() {
        use crate::model::nn::conv2d_input_gradient;
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
            let want = super::super::layers::conv2d_input_gradient_transposed_for_test(
                &g, &kernel, &cfg, h, w,
            );
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
        let conv = Conv2d(candle_nn::Conv2d::new(kernel, None, cfg));
        let x = Var::from_tensor(&randn(7, &[2, 3, 7, 10])).unwrap();
        set_differentiable(true);
        let y = conv.forward(x.as_tensor()).unwrap();
        let g = randn(8, y.dims());
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        set_differentiable(false);
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

    #[test]
    fn constant_operands_get_no_gradient() {
        let c = randn(5, &[1, 3, 1, 1]);
        for op in ["mul", "add"] {
            let x = Var::from_tensor(&randn(6, &[2, 3, 4, 4])).unwrap();
            let apply = |x: &Tensor| match op {
                "mul" => mul_const(x, &c).unwrap(),
                _ => add_const(x, &c).unwrap(),
            };
            let w_out = randn(9, &[2, 3, 4, 4]);
            set_differentiable(false);
            let plain = apply(x.as_tensor());
            let want = (&plain * &w_out)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            set_differentiable(true);
            let ours = apply(x.as_tensor());
            let got = (&ours * &w_out)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            set_differentiable(false);
            assert_eq!(max_diff(&ours, &plain), 0.0);
            let err = max_diff(
                got.get(x.as_tensor()).unwrap(),
                want.get(x.as_tensor()).unwrap(),
            );
            assert!(err < 1e-6, "{op}: {err}");
            assert!(got.get(&c).is_none());
        }
    }
}
