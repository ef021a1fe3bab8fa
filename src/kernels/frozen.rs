//! Frozen layers and constant operands in training: candle's backward of `matmul`, `conv2d` and
//! binary ops computes a gradient for *both* operands and keeps each in the gradient store until
//! the end, also for tensors that need none (frozen weights, constant modulations). For
//! personalization, where the whole frozen base sits between the loss and the token, that was a
//! weight-sized gradient per layer call (the full 512-px step did not fit in 24 GB) and a second
//! expensive product per layer.
//!
//! [`with_input_gradient`] attaches to a result computed without a graph a backward that gives
//! only the input its gradient; [`mul_const`] and [`add_const`] use it in differentiable mode
//! (elsewhere they are candle's broadcast ops). Any device and dtype.

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
fn sum_to_shape(g: &Tensor, shape: &candle_core::Shape) -> Result<Tensor> {
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

type InputGradient = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// `y` (computed from `x` without a graph) as a tensor whose backward gives `x` the gradient
/// `input_grad(dL/dy)`. The device forward hands over `y`'s storage, which this op then drops.
pub fn with_input_gradient(
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

struct InputGradientOp {
    output: HandOver,
    input_grad: InputGradient,
}

/// A forward result computed outside a custom op (without a graph), handed to candle once as the
/// op's output storage and then dropped, so it is not held twice.
pub(crate) struct HandOver(std::sync::Mutex<Option<Tensor>>);

impl HandOver {
    pub(crate) fn new(t: Tensor) -> Self {
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

    pub(crate) fn cpu(&self) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        match self.take()? {
            (candle_core::Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("custom op: precomputed output is not on the CPU"),
        }
    }

    pub(crate) fn cuda(&self) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        match self.take()? {
            (candle_core::Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("custom op: precomputed output is not on the CUDA device"),
        }
    }
}

/// A copy of `t`'s storage with its shape. The outputs handed in here are fresh results of a
/// layer (their own contiguous buffer); anything else is copied into one first.
fn clone_storage(t: &Tensor) -> Result<(candle_core::Storage, candle_core::Shape)> {
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
    use crate::kernels::test_util::{max_diff, randn};
    use crate::kernels::DifferentiableScope;
    use candle_core::Var;

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
            let plain = apply(x.as_tensor());
            let want = (&plain * &w_out)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let training = DifferentiableScope::enter(true);
            let ours = apply(x.as_tensor());
            let got = (&ours * &w_out)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            drop(training);
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
