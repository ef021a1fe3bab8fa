//! The OpenCLIP text tower as StableSR's `FrozenOpenCLIPEmbedder` runs it: token embedding plus
//! positional embedding, pre-norm transformer blocks under a causal mask, the last
//! `skip_last_layers` blocks skipped ("penultimate" skips one), then `ln_final`. The output is the
//! per-token context `[B, 77, width]` of the UNet's cross-attention.
//!
//! `VarBuilder` paths are those under `cond_stage_model.model.` in the StableSR checkpoint.
//! `text_projection`, `logit_scale` and the skipped blocks are loaded (so every key of the
//! checkpoint is accounted for) but take no part in the computation.

use crate::config::TextConfig;
use crate::kernels;
use crate::model::nn::Linear;
use crate::model::nn::{self, LayerNorm};
use candle_core::{bail, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

/// Checkpoint prefix of the text tower (without the trailing dot).
pub const TEXT_PREFIX: &str = "cond_stage_model.model";

const LAYER_NORM_EPS: f64 = 1e-5;
const MLP_RATIO: usize = 4;

/// `nn.MultiheadAttention` with the packed `in_proj_weight` (rows q | k | v).
#[derive(Debug, Clone)]
struct SelfAttention {
    in_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl SelfAttention {
    fn new(width: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((3 * width, width), "in_proj_weight")?;
        let bias = vb.get(3 * width, "in_proj_bias")?;
        Ok(SelfAttention {
            in_proj: Linear::new(weight, Some(bias)),
            out_proj: nn::linear(width, width, vb.pp("out_proj"))?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (batch, len, width) = x.dims3()?;
        let head_dim = width / self.heads;
        let qkv = self.in_proj.forward(x)?;
        let split_heads = |i: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, i * width, width)?
                .reshape((batch, len, self.heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((batch * self.heads, len, head_dim))
        };
        let (q, k, v) = (split_heads(0)?, split_heads(1)?, split_heads(2)?);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let out = kernels::attention(&q, &k, &v, scale, Some(mask))?
            .reshape((batch, self.heads, len, head_dim))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch, len, width))?;
        self.out_proj.forward(&out)
    }
}

/// open_clip `ResidualAttentionBlock`: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))` with an
/// exact-GELU MLP of width `4 * width`.
#[derive(Debug, Clone)]
struct ResidualBlock {
    ln_1: LayerNorm,
    attn: SelfAttention,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
}

impl ResidualBlock {
    fn new(width: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        let hidden = MLP_RATIO * width;
        Ok(ResidualBlock {
            ln_1: LayerNorm::new(width, LAYER_NORM_EPS, vb.pp("ln_1"))?,
            attn: SelfAttention::new(width, heads, vb.pp("attn"))?,
            ln_2: LayerNorm::new(width, LAYER_NORM_EPS, vb.pp("ln_2"))?,
            c_fc: nn::linear(width, hidden, vb.pp("mlp").pp("c_fc"))?,
            c_proj: nn::linear(hidden, width, vb.pp("mlp").pp("c_proj"))?,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, mask)?)?;
        let h = kernels::gelu(&self.c_fc.forward(&self.ln_2.forward(&x)?)?)?;
        &x + self.c_proj.forward(&h)?
    }
}

/// The text tower of `FrozenOpenCLIPEmbedder`.
#[derive(Debug, Clone)]
pub struct TextEncoder {
    token_embedding: Tensor,
    positional_embedding: Tensor,
    blocks: Vec<ResidualBlock>,
    ln_final: LayerNorm,
    /// Blocks actually run: `layers - skip_last_layers`.
    active_layers: usize,
    width: usize,
}

impl TextEncoder {
    /// Builds the tower from `vb` rooted at [`TEXT_PREFIX`].
    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.heads == 0 || !cfg.width.is_multiple_of(cfg.heads) {
            bail!(
                "text width {} is not divisible by {} heads",
                cfg.width,
                cfg.heads
            );
        }
        if cfg.skip_last_layers > cfg.layers {
            bail!(
                "cannot skip {} of {} text transformer blocks",
                cfg.skip_last_layers,
                cfg.layers
            );
        }
        let width = cfg.width;
        let token_embedding = vb.get((cfg.vocab_size, width), "token_embedding.weight")?;
        let positional_embedding = vb.get((cfg.context_length, width), "positional_embedding")?;
        let blocks_vb = vb.pp("transformer").pp("resblocks");
        let blocks = (0..cfg.layers)
            .map(|i| ResidualBlock::new(width, cfg.heads, blocks_vb.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let ln_final = LayerNorm::new(width, LAYER_NORM_EPS, vb.pp("ln_final"))?;
        // Part of the checkpoint but not of the "penultimate"/"last" token features.
        vb.get((width, cfg.embed_dim), "text_projection")?;
        vb.get((), "logit_scale")?;
        Ok(TextEncoder {
            token_embedding,
            positional_embedding,
            blocks,
            ln_final,
            active_layers: cfg.layers - cfg.skip_last_layers,
            width,
        })
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn dtype(&self) -> DType {
        self.token_embedding.dtype()
    }

    pub fn device(&self) -> &Device {
        self.token_embedding.device()
    }

    /// Rows of the (frozen) token embedding table: ids `[B, L]` (u32) -> `[B, L, width]`.
    pub fn token_embeddings(&self, ids: &Tensor) -> Result<Tensor> {
        let (batch, len) = ids.dims2()?;
        let flat = ids.to_dtype(DType::U32)?.flatten_all()?;
        self.token_embedding
            .index_select(&flat, 0)?
            .reshape((batch, len, self.width))
    }

    /// The context from token embeddings `[B, L, width]` (L <= context length): adds the
    /// positional embedding, runs the active blocks and `ln_final`. Differentiable with respect
    /// to `emb` when a [`kernels::DifferentiableScope`] is entered with `true`.
    pub fn forward_embeddings(&self, emb: &Tensor) -> Result<Tensor> {
        let mask = self.causal_mask(emb.dim(1)?, emb.device())?;
        let mut x = self.add_positions(emb)?;
        for block in &self.blocks[..self.active_layers] {
            x = block.forward(&x, &mask)?;
        }
        self.ln_final.forward(&x)
    }

    /// The context `[B, L, width]` for token ids `[B, L]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_embeddings(&self.token_embeddings(ids)?)
    }

    /// Inspection aid: the input of block 0 (embeddings plus positions) followed by the output of
    /// every block, skipped ones included, without `ln_final`.
    pub fn hidden_states(&self, emb: &Tensor) -> Result<Vec<Tensor>> {
        let mask = self.causal_mask(emb.dim(1)?, emb.device())?;
        let mut states = vec![self.add_positions(emb)?];
        for block in &self.blocks {
            let next = block.forward(&states[states.len() - 1], &mask)?;
            states.push(next);
        }
        Ok(states)
    }

    fn add_positions(&self, emb: &Tensor) -> Result<Tensor> {
        let (_, len, width) = emb.dims3()?;
        let context = self.positional_embedding.dim(0)?;
        if len > context || width != self.width {
            bail!(
                "text embeddings of shape {:?} do not fit a tower of width {} and context {context}",
                emb.dims(),
                self.width
            );
        }
        let positions = self.positional_embedding.narrow(0, 0, len)?;
        emb.broadcast_add(&positions.to_dtype(emb.dtype())?)
    }

    /// Additive `[L, L]` mask, `-inf` above the diagonal, in f32 like the attention scores.
    fn causal_mask(&self, len: usize, device: &Device) -> Result<Tensor> {
        let values: Vec<f32> = (0..len)
            .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(values, (len, len), device)
    }
}

/// Replaces token embedding rows at `(batch, position)` pairs by `row` (`width` values, e.g. a
/// learned token). Built from differentiable ops, so gradients reach `row` (and `emb` elsewhere).
pub fn replace_rows(emb: &Tensor, positions: &[(usize, usize)], row: &Tensor) -> Result<Tensor> {
    let (batch, len, width) = emb.dims3()?;
    if row.elem_count() != width {
        bail!(
            "replacement row has {} values, the embeddings have width {width}",
            row.elem_count()
        );
    }
    let mut selected = vec![0u8; batch * len];
    for &(b, p) in positions {
        if b >= batch || p >= len {
            bail!(
                "row ({b}, {p}) is outside embeddings of shape {:?}",
                emb.dims()
            );
        }
        selected[b * len + p] = 1;
    }
    let mask = Tensor::from_vec(selected, (batch, len, 1), emb.device())?
        .broadcast_as((batch, len, width))?;
    let row = row
        .to_dtype(emb.dtype())?
        .reshape((1, 1, width))?
        .broadcast_as((batch, len, width))?;
    mask.where_cond(&row, emb)
}
