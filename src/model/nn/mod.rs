//! Small building blocks shared by the networks.
//!
//! candle's fused `softmax_last_dim` and fused `LayerNorm` kernels have no backward pass, so any
//! gradient through them is silently dropped. The functions here switch to composed (and
//! therefore differentiable) implementations while [`differentiable`] mode is on, which the
//! personalization trainer and the gradient tests enable.

//!
//! One file per kind: [`layers`] (norms, linear, convolution, GELU), [`frozen`] (the
//! input-only gradients of frozen layers and constant operands), [`attention`] (chunked for
//! inference, recomputed for training), [`trainable`] (the backward of trained convolutions),
//! [`conv_backward`] (the frozen convolution's input gradient: sizes, dispatch, cuDNN's
//! backward-data), [`cpu_kernels`] (fused CPU kernels, each tested against
//! the composed candle ops), [`gelu`] (the feed-forward's GEGLU in one pass, forward and
//! backward), [`winograd`] (large 3x3 convolutions by F(2x2, 3x3)).

mod attention;
mod conv_backward;
mod cpu_kernels;
pub mod fast_exp;
mod frozen;
mod fused_attention;
pub mod gelu;
mod layers;
mod trainable;
mod winograd;

pub use attention::*;
pub use conv_backward::{
    conv_output_len, input_gradient_path, input_gradient_path_for, ConvGradError, ConvGradGeometry,
    InputGradientPath,
};
pub use frozen::*;
pub use gelu::{geglu, geglu_composed};
pub use layers::*;

use candle_core::{DType, Result, Tensor, D};
use std::cell::Cell;

thread_local! {
    // Per thread, so that parallel tests (and any inference thread) are not switched by a
    // training thread.
    static DIFFERENTIABLE: Cell<bool> = const { Cell::new(false) };
}

/// Switches the calling thread to differentiable kernels (training) or fused ones (inference).
pub fn set_differentiable(on: bool) {
    DIFFERENTIABLE.with(|d| d.set(on));
}

pub fn differentiable() -> bool {
    DIFFERENTIABLE.with(|d| d.get())
}

/// Softmax over the last dimension, computed in f32.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    // candle's fused kernel has no backward: the composed one only where a gradient flows.
    let y = if differentiable() && x.track_op() {
        candle_nn::ops::softmax(&x, D::Minus1)?
    } else {
        softmax_last_dim_no_grad(&x)?
    };
    y.to_dtype(dtype)
}

/// Softmax over the last dimension without a backward: the vectorized CPU kernel on contiguous
/// f32 CPU tensors, candle's fused one elsewhere.
pub fn softmax_last_dim_no_grad(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous() && x.rank() >= 1 {
        return x.apply_op1_no_bwd(&cpu_kernels::SoftmaxLastDimCpu);
    }
    candle_nn::ops::softmax_last_dim(x)
}

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{Device, Tensor};

    pub fn randn(seed: u64, shape: &[usize]) -> Tensor {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The largest magnitude in `t`.
    pub fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    /// A `[c_out, c_in, k_h, k_w]` kernel stored as its spatial flip with the channel axes
    /// swapped, `[c_in, c_out, k_h, k_w]`: what the convolutions' `flipped_transposed` reading
    /// turns back into the kernel.
    pub fn flipped_transposed(kernel: &Tensor) -> Tensor {
        kernel
            .transpose(0, 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .flip(&[2, 3])
            .unwrap()
            .contiguous()
            .unwrap()
    }

    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }
}
