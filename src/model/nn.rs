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
        if !differentiable()
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && x.is_contiguous()
        {
            // Inference on the CPU: one fused pass instead of seven tensor-wide ones.
            let op = FusedGroupNormCpu {
                groups: self.groups,
                eps: self.eps,
                weight: self.weight.to_vec1()?,
                bias: self.bias.to_vec1()?,
            };
            return x.apply_op1_no_bwd(&op);
        }
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

/// GroupNorm forward on contiguous f32 CPU tensors: per (sample, group) mean and variance in
/// f64 accumulators, then `(x - mean) / sqrt(var + eps) * w[c] + b[c]`, rows split over threads.
struct FusedGroupNormCpu {
    groups: usize,
    eps: f64,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl candle_core::CustomOp1 for FusedGroupNormCpu {
    fn name(&self) -> &'static str {
        "group-norm-cpu"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let dims = layout.shape().dims();
        let (b, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let x = match storage {
            candle_core::CpuStorage::F32(v) => {
                &v[layout.start_offset()..layout.start_offset() + layout.shape().elem_count()]
            }
            _ => candle_core::bail!("fused group norm: f32 input expected"),
        };
        let per_group = c / self.groups;
        let group_len = per_group * spatial;
        let mut out = vec![0f32; x.len()];
        let rows = b * self.groups;
        let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
        let rows_per_thread = rows.div_ceil(threads);
        std::thread::scope(|scope| {
            for (t, out_chunk) in out.chunks_mut(rows_per_thread * group_len).enumerate() {
                let x = &x[t * rows_per_thread * group_len..];
                scope.spawn(move || {
                    for (r, out_row) in out_chunk.chunks_mut(group_len).enumerate() {
                        let row = t * rows_per_thread + r;
                        let x_row = &x[r * group_len..(r + 1) * group_len];
                        let n = group_len as f64;
                        let mean = x_row.iter().map(|&v| v as f64).sum::<f64>() / n;
                        let var = x_row
                            .iter()
                            .map(|&v| (v as f64 - mean).powi(2))
                            .sum::<f64>()
                            / n;
                        let rstd = 1.0 / (var + self.eps).sqrt();
                        let first_channel = (row % self.groups) * per_group;
                        for (k, (o, xs)) in out_row
                            .chunks_mut(spatial)
                            .zip(x_row.chunks(spatial))
                            .enumerate()
                        {
                            let ch = first_channel + k;
                            let scale = (rstd * self.weight[ch] as f64) as f32;
                            let shift = (self.bias[ch] as f64
                                - mean * rstd * self.weight[ch] as f64)
                                as f32;
                            for (o, &v) in o.iter_mut().zip(xs) {
                                *o = v * scale + shift;
                            }
                        }
                    }
                });
            }
        });
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
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

/// A frozen (or trainable) `torch.nn.Conv2d`; see the note above on its backward.
#[derive(Debug, Clone)]
pub struct Conv2d(candle_nn::Conv2d);

impl Conv2d {
    fn frozen(&self) -> bool {
        !self.0.weight().track_op()
            && !self.0.bias().is_some_and(|b| b.track_op())
            && self.0.config().groups == 1
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if differentiable() && x.track_op() && self.frozen() {
            let y = self.0.forward(&x.detach())?;
            let kernel = self.0.weight().clone();
            let cfg = *self.0.config();
            let (in_h, in_w) = (x.dim(2)?, x.dim(3)?);
            return with_input_gradient(x, y, move |g| {
                // The input gradient of a convolution is the transposed convolution of the output
                // gradient with the same kernel; output padding restores the rows and columns a
                // stride dropped. One padding serves both axes, so take the larger and cut back.
                let (_, _, k_h, k_w) = kernel.dims4()?;
                let covered = |n: usize, k: usize| {
                    (n - 1) * cfg.stride + cfg.dilation * (k - 1) + 1 - 2 * cfg.padding
                };
                let pad_h = in_h - covered(g.dim(2)?, k_h);
                let pad_w = in_w - covered(g.dim(3)?, k_w);
                g.conv_transpose2d(
                    &kernel,
                    cfg.padding,
                    pad_h.max(pad_w),
                    cfg.stride,
                    cfg.dilation,
                )?
                .narrow(2, 0, in_h)?
                .narrow(3, 0, in_w)
            });
        }
        self.0.forward(x)
    }
}

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
fn with_input_gradient(
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
struct HandOver(std::sync::Mutex<Option<Tensor>>);

impl HandOver {
    fn new(t: Tensor) -> Self {
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

    fn cpu(&self) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        match self.take()? {
            (candle_core::Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("custom op: precomputed output is not on the CPU"),
        }
    }

    fn cuda(&self) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
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
    first: Linear,
    second: Linear,
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
    if differentiable() && (q.track_op() || k.track_op() || v.track_op()) {
        return recomputed_attention(q, k, v, scale, mask, ATTENTION_CHUNK_ELEMENTS);
    }
    chunked_attention(q, k, v, scale, mask, ATTENTION_CHUNK_ELEMENTS)
}

fn chunked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    max_elements: usize,
) -> Result<Tensor> {
    let (heads, n_q, _) = q.dims3()?;
    let rows = chunk_rows(heads, k.dim(1)?, max_elements);
    if rows >= n_q {
        return attention_rows(q, k, v, scale, mask);
    }
    let mut chunks = Vec::with_capacity(n_q.div_ceil(rows));
    for start in (0..n_q).step_by(rows) {
        let len = rows.min(n_q - start);
        let q_rows = q.narrow(1, start, len)?;
        let mask_rows = mask_rows(mask, n_q, start, len)?;
        chunks.push(attention_rows(&q_rows, k, v, scale, mask_rows.as_ref())?);
    }
    Tensor::cat(&chunks, 1)
}

/// Query rows per chunk so that one `[heads, rows, n_k]` f32 matrix stays within the bound.
fn chunk_rows(heads: usize, n_k: usize, max_elements: usize) -> usize {
    (max_elements / (heads * n_k).max(1)).max(1)
}

/// The rows `start..start+len` of an additive mask: one with a query axis is cut with the
/// queries; a broadcast one is shared.
fn mask_rows(
    mask: Option<&Tensor>,
    n_q: usize,
    start: usize,
    len: usize,
) -> Result<Option<Tensor>> {
    Ok(match mask {
        Some(m) if m.rank() >= 2 && m.dim(m.rank() - 2)? == n_q && n_q > 1 => {
            Some(m.narrow(m.rank() - 2, start, len)?)
        }
        Some(m) => Some(m.clone()),
        None => None,
    })
}

/// Attention for training: the forward runs without a graph (as at inference), and the backward
/// recomputes the probabilities chunk by chunk from q, k and v. The graph keeps only q, k, v and
/// the output instead of every `[heads, n_q, n_k]` intermediate of the composed softmax (five
/// 671 MB matrices per 64x64-latent self-attention at batch 2), which is what lets a full-size
/// 512-px personalization step fit in memory. Gradients flow to q, k and v; the mask is constant.
fn recomputed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    max_elements: usize,
) -> Result<Tensor> {
    let out = chunked_attention(
        &q.detach(),
        &k.detach(),
        &v.detach(),
        scale,
        mask,
        max_elements,
    )?;
    let op = RecomputedAttention {
        out: HandOver::new(out),
        scale,
        mask: mask.map(|m| m.detach()),
        max_elements,
    };
    q.apply_op3_arc(k, v, std::sync::Arc::new(Box::new(op)))
}

struct RecomputedAttention {
    out: HandOver,
    scale: f64,
    mask: Option<Tensor>,
    max_elements: usize,
}

impl candle_core::CustomOp3 for RecomputedAttention {
    fn name(&self) -> &'static str {
        "recomputed-attention"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        self.out.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.out.cuda()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // In f32 whatever the activations' dtype; per query chunk c:
        // P = softmax(s Q_c K^T + M), dV += P^T G_c, dP = G_c V^T,
        // dS = P * (dP - rowsum(dP * P)), dQ_c = s dS K, dK += s dS^T Q_c.
        let dtype = q.dtype();
        let f32 = |t: &Tensor| t.detach().to_dtype(DType::F32);
        let (q, k, v, g) = (f32(q)?, f32(k)?, f32(v)?, f32(grad_out)?);
        let (heads, n_q, _) = q.dims3()?;
        let n_k = k.dim(1)?;
        let rows = chunk_rows(heads, n_k, self.max_elements);
        let mut dq_chunks = Vec::with_capacity(n_q.div_ceil(rows));
        let mut dk = k.zeros_like()?;
        let mut dv = v.zeros_like()?;
        for start in (0..n_q).step_by(rows) {
            let len = rows.min(n_q - start);
            let q_c = q.narrow(1, start, len)?;
            let g_c = g.narrow(1, start, len)?;
            let scores = (q_c.matmul(&k.t()?)? * self.scale)?;
            let scores = match mask_rows(self.mask.as_ref(), n_q, start, len)? {
                Some(m) => scores.broadcast_add(&m.to_dtype(DType::F32)?)?,
                None => scores,
            };
            let p = candle_nn::ops::softmax_last_dim(&scores)?;
            dv = (dv + p.t()?.matmul(&g_c)?)?;
            let dp = g_c.matmul(&v.t()?)?;
            let row_dot = (&dp * &p)?.sum_keepdim(D::Minus1)?;
            let ds = (p * dp.broadcast_sub(&row_dot)?)?;
            dq_chunks.push((ds.matmul(&k)? * self.scale)?);
            dk = (dk + (ds.t()?.matmul(&q_c)? * self.scale)?)?;
        }
        let dq = Tensor::cat(&dq_chunks, 1)?;
        Ok((
            Some(dq.to_dtype(dtype)?),
            Some(dk.to_dtype(dtype)?),
            Some(dv.to_dtype(dtype)?),
        ))
    }
}

fn attention_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = q.dtype();
    // The scale goes on the queries ([n_q, d]) rather than the scores ([n_q, n_k]): one pass over
    // the small tensor instead of the largest one, and f16 scores stay far from overflow. Half
    // precision multiplies in the native dtype (cuBLAS accumulates in f32) and widens for the
    // softmax.
    let scores = (q * scale)?.matmul(&k.t()?)?.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(DType::F32)?)?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?;
    probs.to_dtype(dtype)?.matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(seed: u64, shape: &[usize]) -> Tensor {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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

    /// The recomputing attention (chunked into 1-, 2- and whole-row pieces) against the composed
    /// differentiable one: same output, same gradients for q, k and v, with and without a mask.
    #[test]
    fn recomputed_attention_matches_composed_gradients() {
        let (bh, n_q, n_k, d) = (3, 5, 7, 4);
        let scale = 0.5;
        let causal_like = randn(9, &[n_q, n_k]).clamp(-1f32, 0f32).unwrap();
        let weight = randn(4, &[bh, n_q, d]);
        for mask in [None, Some(&causal_like)] {
            for max_elements in [bh * n_k, 2 * bh * n_k, 1 << 20] {
                let vars: Vec<Var> = [1, 2, 3]
                    .iter()
                    .zip([[bh, n_q, d], [bh, n_k, d], [bh, n_k, d]])
                    .map(|(seed, shape)| Var::from_tensor(&randn(*seed, &shape)).unwrap())
                    .collect();
                let (q, k, v) = (
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                );

                let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
                let scores = match mask {
                    Some(m) => scores.broadcast_add(m).unwrap(),
                    None => scores,
                };
                let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
                let composed = probs.matmul(v).unwrap();
                let loss = (&composed * &weight).unwrap().sum_all().unwrap();
                let want = loss.backward().unwrap();

                let out = recomputed_attention(q, k, v, scale, mask, max_elements).unwrap();
                assert!(max_diff(&out, &composed) < 1e-6);
                let loss = (&out * &weight).unwrap().sum_all().unwrap();
                let got = loss.backward().unwrap();
                for var in &vars {
                    let (g, w) = (
                        got.get(var.as_tensor()).expect("gradient"),
                        want.get(var.as_tensor()).unwrap(),
                    );
                    let err = max_diff(g, w);
                    assert!(
                        err < 1e-5,
                        "max_elements {max_elements}: gradient error {err}"
                    );
                }
            }
        }
    }

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
        assert_eq!(max_diff(&frozen, &plain), 0.0, "{name}: same forward");
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

    #[test]
    fn fused_cpu_group_norm_matches_the_composed_one() {
        for (shape, groups) in [
            (vec![2, 64, 5, 7], 32),
            (vec![1, 12, 9], 4),
            (vec![3, 6, 4, 4], 6),
        ] {
            let c = shape[1];
            let norm = GroupNorm {
                weight: randn(1, &[c]),
                bias: randn(2, &[c]),
                groups,
                eps: 1e-5,
            };
            // An offset mean, as real activations have.
            let x = ((randn(3, &shape) * 3.0).unwrap() + 5.0).unwrap();
            set_differentiable(true);
            let composed = norm.forward(&x).unwrap();
            set_differentiable(false);
            let fused = norm.forward(&x).unwrap();
            let err = max_diff(&fused, &composed);
            assert!(err < 2e-5, "{shape:?}: {err}");
        }
    }

    #[test]
    fn chunked_attention_matches_one_block() {
        let (q, k, v) = (
            randn(1, &[2, 9, 4]),
            randn(2, &[2, 6, 4]),
            randn(3, &[2, 6, 4]),
        );
        let mask = randn(5, &[9, 6]).clamp(-2f32, 0f32).unwrap();
        let whole = attention_rows(&q, &k, &v, 0.3, Some(&mask)).unwrap();
        let chunked = chunked_attention(&q, &k, &v, 0.3, Some(&mask), 2 * 6 * 2).unwrap();
        assert!(max_diff(&whole, &chunked) < 1e-6);
    }
}
