//! The transformer parts of the UNet: ldm's `CrossAttention`, the GEGLU `FeedForward`,
//! `BasicTransformerBlockV2` and `SpatialTransformerV2` (paths `input_blocks.N.1.*` etc.).

use crate::config::UNetConfig;
use crate::kernels::{self, attention};
use crate::model::nn::{self, Conv2d, ConvSpec, GroupNorm, LayerNorm, Linear};
use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// `CrossAttention` of ldm: q/k/v without bias, `to_out.0` with bias, scale `d_head^-0.5`.
#[derive(Debug, Clone)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl CrossAttention {
    pub fn new(
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        d_head: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * d_head;
        Ok(CrossAttention {
            to_q: nn::linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: nn::linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: nn::linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: nn::linear(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            scale: (d_head as f64).powf(-0.5),
        })
    }

    /// `[B, N, C]` -> `[B*heads, N, C/heads]`.
    fn split_heads(&self, t: &Tensor) -> Result<Tensor> {
        let (b, n, c) = t.dims3()?;
        t.reshape((b, n, self.heads, c / self.heads))?
            .transpose(1, 2)?
            .reshape((b * self.heads, n, c / self.heads))
    }

    fn merge_heads(&self, t: &Tensor) -> Result<Tensor> {
        let (bh, n, d) = t.dims3()?;
        let b = bh / self.heads;
        t.reshape((b, self.heads, n, d))?
            .transpose(1, 2)?
            .reshape((b, n, self.heads * d))
    }

    /// Self-attention when `context` is `None`. `mask` is an additive bias broadcastable to
    /// `[B*heads, N, M]`.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let out = attention(
            &q.contiguous()?,
            &k.contiguous()?,
            &v.contiguous()?,
            self.scale,
            mask,
        )?;
        self.to_out.forward(&self.merge_heads(&out)?)
    }

    /// Attention probabilities `softmax(q k^T * scale)` averaged over heads: `[B, N, M]`.
    /// Needed explicitly by personalization (the placeholder token's attention map).
    pub fn probabilities(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let scores = (q.contiguous()?.matmul(&k.contiguous()?.t()?)? * self.scale)?;
        let probs = kernels::softmax_last_dim(&scores)?;
        let m = probs.dim(D::Minus1)?;
        probs.reshape((b, self.heads, n, m))?.mean(1)
    }
}

/// GEGLU feed-forward: `Linear(d, 8d)` split into value and gate, `value * gelu(gate)`, `Linear(4d, d)`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = 4 * dim;
        Ok(FeedForward {
            proj: nn::linear(dim, 2 * inner, vb.pp("net.0.proj"))?,
            out: nn::linear(inner, dim, vb.pp("net.2"))?,
        })
    }
}

impl Module for FeedForward {
    /// At inference the tokens go through in row chunks whose `[rows, 2*inner]` projection stays
    /// within the attention's score-chunk bound: the GEGLU is per token, so chunking changes no
    /// value, and a 64x64 latent's CFG batch no longer holds three 4x-wide copies of its tokens
    /// (84 + 42 + 42 MB) at once.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let width = x.dim(D::Minus1)?;
        let rows = x.elem_count() / width.max(1);
        let projected = self.proj.weight().dim(0)?;
        let per_chunk = (kernels::attention_chunk_elements(x.device()) / projected.max(1)).max(1);
        if (kernels::differentiable() && x.track_op()) || rows <= per_chunk {
            return self.forward_rows(x);
        }
        let flat = x.reshape((rows, width))?;
        let mut chunks = Vec::with_capacity(rows.div_ceil(per_chunk));
        for start in (0..rows).step_by(per_chunk) {
            let len = per_chunk.min(rows - start);
            chunks.push(self.forward_rows(&flat.narrow(0, start, len)?)?);
        }
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = self.out.weight().dim(0)?;
        Tensor::cat(&chunks, 0)?.reshape(dims)
    }
}

impl FeedForward {
    fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&kernels::geglu(&self.proj.forward(x)?)?)
    }
}

/// `BasicTransformerBlockV2`: self-attention, cross-attention to the text, GEGLU, pre-LayerNorm.
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    pub attn1: CrossAttention,
    pub attn2: CrossAttention,
    pub ff: FeedForward,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub norm3: LayerNorm,
}

impl TransformerBlock {
    pub fn new(
        dim: usize,
        context_dim: usize,
        heads: usize,
        d_head: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(TransformerBlock {
            attn1: CrossAttention::new(dim, dim, heads, d_head, vb.pp("attn1"))?,
            attn2: CrossAttention::new(dim, context_dim, heads, d_head, vb.pp("attn2"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context), None)?
            + x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

#[derive(Debug, Clone)]
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

/// `SpatialTransformerV2`: GroupNorm (eps 1e-6), projection in, transformer blocks over the
/// `h*w` tokens, projection out, residual.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    pub blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

/// The tokens of a spatial transformer between its projections, with what is needed to finish it.
pub struct TransformerTokens {
    /// `[B, h*w, inner]`, row-major over (h, w).
    pub tokens: Tensor,
    residual: Tensor,
    height: usize,
    width: usize,
}

impl SpatialTransformer {
    pub fn new(
        channels: usize,
        heads: usize,
        d_head: usize,
        cfg: &UNetConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * d_head;
        let (proj_in, proj_out) = if cfg.use_linear_in_transformer {
            (
                Projection::Linear(nn::linear(channels, inner, vb.pp("proj_in"))?),
                Projection::Linear(nn::linear(inner, channels, vb.pp("proj_out"))?),
            )
        } else {
            (
                Projection::Conv(nn::conv2d(
                    channels,
                    inner,
                    ConvSpec::same(1),
                    vb.pp("proj_in"),
                )?),
                Projection::Conv(nn::conv2d(
                    inner,
                    channels,
                    ConvSpec::same(1),
                    vb.pp("proj_out"),
                )?),
            )
        };
        let blocks = (0..cfg.transformer_depth)
            .map(|d| {
                TransformerBlock::new(
                    inner,
                    cfg.context_dim,
                    heads,
                    d_head,
                    vb.pp(format!("transformer_blocks.{d}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SpatialTransformer {
            norm: GroupNorm::new(32, channels, 1e-6, vb.pp("norm"))?,
            proj_in,
            blocks,
            proj_out,
        })
    }

    /// Normalise and project `x` into tokens.
    pub fn tokens_in(&self, x: &Tensor) -> Result<TransformerTokens> {
        let (b, _c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let tokens = match &self.proj_in {
            Projection::Linear(l) => l.forward(&to_tokens(&normed)?)?,
            Projection::Conv(c) => to_tokens(&c.forward(&normed)?)?,
        };
        let _ = b;
        Ok(TransformerTokens {
            tokens,
            residual: x.clone(),
            height: h,
            width: w,
        })
    }

    /// Run the transformer blocks on the tokens.
    pub fn run_blocks(&self, tokens: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut t = tokens.clone();
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        Ok(t)
    }

    /// Project `tokens` back to an image and add the block's residual.
    pub fn tokens_out(&self, parts: &TransformerTokens, tokens: &Tensor) -> Result<Tensor> {
        let (h, w) = (parts.height, parts.width);
        let out = match &self.proj_out {
            Projection::Linear(l) => from_tokens(&l.forward(tokens)?, h, w)?,
            Projection::Conv(c) => c.forward(&from_tokens(tokens, h, w)?)?,
        };
        out + &parts.residual
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let parts = self.tokens_in(x)?;
        let tokens = self.run_blocks(&parts.tokens, context)?;
        self.tokens_out(&parts, &tokens)
    }
}

/// `b c h w -> b (h w) c`.
fn to_tokens(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()
}

/// `b (h w) c -> b c h w`.
fn from_tokens(t: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _n, c) = t.dims3()?;
    t.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))
}
