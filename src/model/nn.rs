//! Small building blocks shared by the networks.
//!
//! candle's fused `softmax_last_dim` and fused `LayerNorm` kernels have no backward pass, so any
//! gradient through them is silently dropped. The functions here switch to composed (and
//! therefore differentiable) implementations while [`differentiable`] mode is on, which the
//! personalization trainer and the gradient tests enable.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
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
    let y = if differentiable() {
        candle_nn::ops::softmax(&x, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&x)?
    };
    y.to_dtype(dtype)
}

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

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        if !differentiable() && x.is_contiguous() && dtype == DType::F32 {
            return candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        let x = x.to_dtype(DType::F32)?;
        let n = x.dim(D::Minus1)? as f64;
        let mean = (x.sum_keepdim(D::Minus1)? / n)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = (centered.sqr()?.sum_keepdim(D::Minus1)? / n)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// `torch.nn.GroupNorm(groups, channels, eps, affine=True)` on NCHW (or NC...) tensors,
/// statistics in f32. Composed of plain ops, so it is differentiable.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
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

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
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
        normed
            .reshape(dims.as_slice())?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight.reshape(affine_shape.as_slice())?)?
            .broadcast_add(&self.bias.reshape(affine_shape.as_slice())?)
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
) -> Result<candle_nn::Conv2d> {
    let cfg = candle_nn::Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    candle_nn::conv2d(in_c, out_c, kernel, cfg, vb)
}

/// `torch.nn.Linear` with bias.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<candle_nn::Linear> {
    candle_nn::linear(in_dim, out_dim, vb)
}

/// `torch.nn.Linear` without bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<candle_nn::Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb)
}

/// Exact (erf) GELU, as `torch.nn.functional.gelu` by default.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// Sinusoidal timestep embedding of the openaimodel code: `[cos(t f_k), sin(t f_k)]`,
/// `f_k = exp(-ln(10000) k / (dim/2))`, computed in f32. `timesteps` holds one value per batch row.
pub fn timestep_embedding(timesteps: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let device = timesteps.device();
    // f32 arithmetic in the reference's order, so the phases at t ~ 1000 round the same way.
    let neg_log_period = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|k| (neg_log_period * k as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), device)?;
    let t = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?;
    let args = t.broadcast_mul(&freqs)?;
    let emb = Tensor::cat(&[args.cos()?, args.sin()?], 1)?;
    if dim % 2 == 1 {
        let pad = Tensor::zeros((emb.dim(0)?, 1), DType::F32, device)?;
        Tensor::cat(&[emb, pad], 1)
    } else {
        Ok(emb)
    }
}

/// `time_embed` of the openaimodel networks: sinusoidal embedding of the timesteps, then
/// `Linear(mc, 4mc)`, SiLU, `Linear(4mc, 4mc)` (keys `time_embed.0` and `time_embed.2`).
#[derive(Debug, Clone)]
pub struct TimeEmbedding {
    first: candle_nn::Linear,
    second: candle_nn::Linear,
    model_channels: usize,
}

impl TimeEmbedding {
    pub fn new(model_channels: usize, vb: VarBuilder) -> Result<Self> {
        let dim = 4 * model_channels;
        Ok(TimeEmbedding {
            first: linear(model_channels, dim, vb.pp("time_embed.0"))?,
            second: linear(dim, dim, vb.pp("time_embed.2"))?,
            model_channels,
        })
    }

    /// `[B]` original-scale timesteps -> `[B, 4mc]` in `dtype`.
    pub fn forward(&self, timesteps: &Tensor, dtype: DType) -> Result<Tensor> {
        let t = timestep_embedding(timesteps, self.model_channels)?.to_dtype(dtype)?;
        self.second.forward(&self.first.forward(&t)?.silu()?)
    }
}

/// Upper bound on the elements of one f32 score matrix (`[batch*heads, rows, n_k]`) that
/// [`attention`] materialises at a time: 2^26 floats = 256 MiB. Longer query sequences are
/// processed in row chunks, so a 64x64-latent tile (4096 tokens, 4096 keys) never holds the whole
/// score tensor, in inference or in training (the chunks are ordinary differentiable ops).
pub const ATTENTION_CHUNK_ELEMENTS: usize = 1 << 26;

/// Scaled dot-product attention on `[batch*heads, n, d]` tensors with an optional additive
/// mask broadcastable to `[batch*heads, n_q, n_k]`. Scores and softmax are in f32 (as the
/// reference's `_ATTN_PRECISION = "fp32"`); query rows are chunked to bound memory.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (heads, n_q, _) = q.dims3()?;
    let n_k = k.dim(1)?;
    let rows = (ATTENTION_CHUNK_ELEMENTS / (heads * n_k).max(1)).max(1);
    if rows >= n_q {
        return attention_rows(q, k, v, scale, mask);
    }
    let mut chunks = Vec::with_capacity(n_q.div_ceil(rows));
    for start in (0..n_q).step_by(rows) {
        let len = rows.min(n_q - start);
        let q_rows = q.narrow(1, start, len)?;
        let mask_rows = match mask {
            // A mask with a query axis is cut with the queries; a broadcast one is shared.
            Some(m) if m.rank() >= 2 && m.dim(m.rank() - 2)? == n_q => {
                Some(m.narrow(m.rank() - 2, start, len)?)
            }
            Some(m) => Some(m.clone()),
            None => None,
        };
        chunks.push(attention_rows(&q_rows, k, v, scale, mask_rows.as_ref())?);
    }
    Tensor::cat(&chunks, 1)
}

fn attention_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = q.dtype();
    // Half precision: the product runs in the native dtype (cuBLAS accumulates in f32) on
    // pre-scaled queries, so f16 scores stay far from overflow, and is widened for the softmax.
    let scores = if dtype == DType::F32 {
        (q.matmul(&k.t()?)? * scale)?
    } else {
        (q * scale)?.matmul(&k.t()?)?.to_dtype(DType::F32)?
    };
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(DType::F32)?)?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?;
    probs.to_dtype(dtype)?.matmul(v)
}
