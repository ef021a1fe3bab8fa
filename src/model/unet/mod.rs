//! `UNetModelDualcondV2`: the SD-2.1 UNet of StableSR with SFT/SPADE modulation of every residual
//! block by the time-aware LQ encoder's features (`model.diffusion_model.*`).
//!
//! Layout (as the reference builds it): `input_blocks` (conv, then per level `num_res_blocks`
//! x [ResBlockDual, SpatialTransformerV2 where the level's downsampling factor is in
//! `attention_resolutions`], then a stride-2 conv), `middle_block` (ResBlockDual,
//! SpatialTransformerV2, ResBlockDual), `output_blocks` (per level reversed, `num_res_blocks + 1`
//! x [ResBlockDual on the skip concat, transformer, nearest-2x + conv at the level's end]) and
//! `out` (GroupNorm, SiLU, conv). The output is the v prediction.

use super::nn::{self, group_norm32, ConvSpec, GroupNorm, LayerNorm};
use super::time_embedding::TimeEmbedding;
use crate::config::UNetConfig;
use crate::kernels::{self, attention};
use crate::model::nn::{Conv2d, Linear};
use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use std::collections::BTreeMap;

/// Time-aware encoder features keyed by their spatial width, as the reference's dict
/// (`struct_cond[str(h.shape[-1])]`).
pub type StructCond = BTreeMap<usize, Tensor>;

/// SPADE as StableSR uses it: `GroupNorm32(h) * (1 + gamma(s)) + beta(s)` with
/// `gamma/beta = Conv3x3(ReLU(Conv3x3(s)))`.
#[derive(Debug, Clone)]
struct Spade {
    norm: GroupNorm,
    shared: Conv2d,
    gamma: Conv2d,
    beta: Conv2d,
}

/// Width of SPADE's hidden layer; fixed in the reference code.
const SPADE_HIDDEN: usize = 128;

impl Spade {
    fn new(channels: usize, semb_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Spade {
            norm: group_norm32(channels, vb.pp("param_free_norm"))?,
            shared: nn::conv2d(semb_channels, SPADE_HIDDEN, ConvSpec::same(3), vb.pp("mlp_shared.0"))?,
            gamma: nn::conv2d(SPADE_HIDDEN, channels, ConvSpec::same(3), vb.pp("mlp_gamma"))?,
            beta: nn::conv2d(SPADE_HIDDEN, channels, ConvSpec::same(3), vb.pp("mlp_beta"))?,
        })
    }

    /// `segmap` has the encoder's batch, which divides `h`'s (the CFG batch repeats the LQ
    /// rows once per branch): the modulation is computed once per LQ row and broadcast over the
    /// branches, not recomputed for each.
    fn forward(&self, h: &Tensor, segmap: &Tensor) -> Result<Tensor> {
        let normalized = self.norm.forward(h)?;
        let actv = self.shared.forward(segmap)?.relu()?;
        let gamma = self.gamma.forward(&actv)?;
        let beta = self.beta.forward(&actv)?;
        let (batch, c, hh, ww) = normalized.dims4()?;
        let rows = segmap.dim(0)?;
        if rows == 0 || !batch.is_multiple_of(rows) {
            candle_core::bail!("feature batch {rows} does not divide model batch {batch}");
        }
        // [branches, rows, C, H, W] against [1, rows, C, H, W].
        let grouped = normalized.reshape((batch / rows, rows, c, hh, ww))?;
        let gamma = (gamma + 1.0)?.unsqueeze(0)?;
        let beta = beta.unsqueeze(0)?;
        // gamma and beta come from the (constant) encoder features: only h needs a gradient.
        kernels::add_const(&kernels::mul_const(&grouped, &gamma)?, &beta)?.reshape((batch, c, hh, ww))
    }
}

/// The openaimodel residual block. With `semb_channels` it is `ResBlockDual` (SPADE after the
/// output layers), without it the plain `ResBlock` of the time-aware encoder.
#[derive(Debug, Clone)]
pub(crate) struct ResBlock {
    in_norm: GroupNorm,
    in_conv: Conv2d,
    emb: Linear,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    skip: Option<Conv2d>,
    spade: Option<Spade>,
}

impl ResBlock {
    pub(crate) fn new(
        in_c: usize,
        out_c: usize,
        emb_dim: usize,
        semb_channels: Option<usize>,
        vb: VarBuilder,
    ) -> Result<Self> {
        // The encoder's ResBlock normalises per channel when the width is not a multiple of
        // 32; ResBlockDual always uses 32 groups.
        let out_groups = if semb_channels.is_none() && !out_c.is_multiple_of(32) {
            out_c
        } else {
            32
        };
        Ok(ResBlock {
            in_norm: group_norm32(in_c, vb.pp("in_layers.0"))?,
            in_conv: nn::conv2d(in_c, out_c, ConvSpec::same(3), vb.pp("in_layers.2"))?,
            emb: nn::linear(emb_dim, out_c, vb.pp("emb_layers.1"))?,
            out_norm: GroupNorm::new(out_groups, out_c, 1e-5, vb.pp("out_layers.0"))?,
            out_conv: nn::conv2d(out_c, out_c, ConvSpec::same(3), vb.pp("out_layers.3"))?,
            skip: if in_c == out_c {
                None
            } else {
                Some(nn::conv2d(in_c, out_c, ConvSpec::same(1), vb.pp("skip_connection"))?)
            },
            spade: semb_channels
                .map(|s| Spade::new(out_c, s, vb.pp("spade")))
                .transpose()?,
        })
    }

    /// `struct_cond = None` skips the SPADE step (the reference stream of personalization).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        emb: &Tensor,
        struct_cond: Option<&StructCond>,
    ) -> Result<Tensor> {
        let h = self.in_conv.forward(&self.in_norm.forward_silu(x)?)?;
        let emb_out = self.emb.forward(&emb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
        let h = kernels::add_const(&h, &emb_out)?;
        let mut h = self.out_conv.forward(&self.out_norm.forward_silu(&h)?)?;
        if let (Some(spade), Some(cond)) = (&self.spade, struct_cond) {
            let width = h.dim(D::Minus1)?;
            let segmap = cond.get(&width).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "no time-aware encoder feature of width {width} (have {:?})",
                    cond.keys().collect::<Vec<_>>()
                ))
            })?;
            h = spade.forward(&h, segmap)?;
        }
        match &self.skip {
            Some(skip) => skip.forward(x)? + h,
            None => x + h,
        }
    }
}

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
                Projection::Conv(nn::conv2d(channels, inner, ConvSpec::same(1), vb.pp("proj_in"))?),
                Projection::Conv(nn::conv2d(inner, channels, ConvSpec::same(1), vb.pp("proj_out"))?),
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

/// Where a personalization block attaches: called with the tokens of a spatial transformer
/// after its transformer blocks and before its output projection. The identity implementation
/// (no personalization) returns the tokens unchanged.
pub trait TransformerSeam {
    /// `path` is the host's checkpoint path inside the UNet, e.g. `output_blocks.4.1`.
    fn after_blocks(&mut self, path: &str, tokens: Tensor) -> Result<Tensor>;

    /// Runs the host's transformer blocks on its `tokens`. Overridden by seams that need more
    /// than the result (the personalization reference pass records attention maps); the default
    /// is the plain base computation.
    fn run_blocks(
        &mut self,
        path: &str,
        host: &SpatialTransformer,
        tokens: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        let _ = path;
        host.run_blocks(tokens, context)
    }

    /// Whether the seam has seen everything it needs; [`UNet::run_for_seam`] stops at the first
    /// block boundary where this holds.
    fn finished(&self) -> bool {
        false
    }
}

// Built once per model; the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    Res(ResBlock),
    Transformer(String, SpatialTransformer),
    Down(Conv2d),
    Up(Conv2d),
}

/// Everything one forward call needs besides `x`.
pub struct UNetInputs<'a> {
    /// Original-scale timesteps, one per batch row.
    pub timesteps: &'a Tensor,
    /// Text context `[B, 77, context_dim]`.
    pub context: &'a Tensor,
    /// Time-aware encoder features; `None` runs the plain SD-2.1 path without SPADE.
    pub struct_cond: Option<&'a StructCond>,
}

#[derive(Debug, Clone)]
pub struct UNet {
    time_embed: TimeEmbedding,
    input_blocks: Vec<Vec<Layer>>,
    middle_block: Vec<Layer>,
    output_blocks: Vec<Vec<Layer>>,
    out_norm: GroupNorm,
    out_conv: Conv2d,
}

impl UNet {
    pub fn new(cfg: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        let mc = cfg.model_channels;
        let emb_dim = 4 * mc;
        let semb = Some(cfg.semb_channels);
        let transformer = |ch: usize, path: String, vb: VarBuilder| -> Result<Layer> {
            let heads = ch / cfg.num_head_channels;
            let st = SpatialTransformer::new(ch, heads, cfg.num_head_channels, cfg, vb.pp(&path))?;
            Ok(Layer::Transformer(path, st))
        };

        let mut input_blocks = vec![vec![Layer::Conv(nn::conv2d(
            cfg.in_channels,
            mc,
            ConvSpec::same(3),
            vb.pp("input_blocks.0.0"),
        )?)]];
        let mut skip_channels = vec![mc];
        let mut ch = mc;
        let mut ds = 1;
        for (level, &mult) in cfg.channel_mult.iter().enumerate() {
            for _ in 0..cfg.num_res_blocks {
                let i = input_blocks.len();
                let out = mult * mc;
                let mut layers = vec![Layer::Res(ResBlock::new(
                    ch,
                    out,
                    emb_dim,
                    semb,
                    vb.pp(format!("input_blocks.{i}.0")),
                )?)];
                ch = out;
                if cfg.attention_resolutions.contains(&ds) {
                    layers.push(transformer(ch, format!("input_blocks.{i}.1"), vb.clone())?);
                }
                input_blocks.push(layers);
                skip_channels.push(ch);
            }
            if level + 1 != cfg.channel_mult.len() {
                let i = input_blocks.len();
                input_blocks.push(vec![Layer::Down(nn::conv2d(
                    ch,
                    ch,
                    ConvSpec::downsample(1),
                    vb.pp(format!("input_blocks.{i}.0.op")),
                )?)]);
                skip_channels.push(ch);
                ds *= 2;
            }
        }

        let middle_block = vec![
            Layer::Res(ResBlock::new(
                ch,
                ch,
                emb_dim,
                semb,
                vb.pp("middle_block.0"),
            )?),
            transformer(ch, "middle_block.1".to_string(), vb.clone())?,
            Layer::Res(ResBlock::new(
                ch,
                ch,
                emb_dim,
                semb,
                vb.pp("middle_block.2"),
            )?),
        ];

        let mut output_blocks = Vec::new();
        for (level, &mult) in cfg.channel_mult.iter().enumerate().rev() {
            for i in 0..=cfg.num_res_blocks {
                let n = output_blocks.len();
                let skip = skip_channels.pop().expect("one skip per input block");
                let out = mc * mult;
                let mut layers = vec![Layer::Res(ResBlock::new(
                    ch + skip,
                    out,
                    emb_dim,
                    semb,
                    vb.pp(format!("output_blocks.{n}.0")),
                )?)];
                ch = out;
                if cfg.attention_resolutions.contains(&ds) {
                    layers.push(transformer(ch, format!("output_blocks.{n}.1"), vb.clone())?);
                }
                if level > 0 && i == cfg.num_res_blocks {
                    let k = layers.len();
                    layers.push(Layer::Up(nn::conv2d(
                        ch,
                        ch,
                        ConvSpec::same(3),
                        vb.pp(format!("output_blocks.{n}.{k}.conv")),
                    )?));
                    ds /= 2;
                }
                output_blocks.push(layers);
            }
        }

        Ok(UNet {
            time_embed: TimeEmbedding::new(mc, vb.clone())?,
            input_blocks,
            middle_block,
            output_blocks,
            out_norm: group_norm32(ch, vb.pp("out.0"))?,
            out_conv: nn::conv2d(mc, cfg.out_channels, ConvSpec::same(3), vb.pp("out.2"))?,
        })
    }

    /// The timestep embedding `time_embed(timestep_embedding(t))`.
    pub fn time_embedding(&self, timesteps: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
        self.time_embed.forward(timesteps, dtype)
    }

    fn run_layers(
        layers: &[Layer],
        mut h: Tensor,
        emb: &Tensor,
        inputs: &UNetInputs,
        seam: &mut Option<&mut dyn TransformerSeam>,
    ) -> Result<Tensor> {
        for layer in layers {
            h = match layer {
                Layer::Conv(c) | Layer::Down(c) => c.forward(&h)?,
                Layer::Res(r) => r.forward(&h, emb, inputs.struct_cond)?,
                Layer::Transformer(path, st) => {
                    let parts = st.tokens_in(&h)?;
                    let tokens = match seam.as_deref_mut() {
                        Some(seam) => {
                            let tokens =
                                seam.run_blocks(path, st, &parts.tokens, inputs.context)?;
                            seam.after_blocks(path, tokens)?
                        }
                        None => st.run_blocks(&parts.tokens, inputs.context)?,
                    };
                    st.tokens_out(&parts, &tokens)?
                }
                Layer::Up(c) => {
                    let (_, _, hh, ww) = h.dims4()?;
                    c.forward(&h.upsample_nearest2d(hh * 2, ww * 2)?)?
                }
            };
        }
        Ok(h)
    }

    /// The v prediction for `x` (`[B, C, h, w]`).
    pub fn forward(&self, x: &Tensor, inputs: &UNetInputs) -> Result<Tensor> {
        self.forward_with_seam(x, inputs, None)
    }

    /// As [`UNet::forward`], passing the tokens of every spatial transformer through `seam`.
    pub fn forward_with_seam(
        &self,
        x: &Tensor,
        inputs: &UNetInputs,
        seam: Option<&mut dyn TransformerSeam>,
    ) -> Result<Tensor> {
        let out = self.pass(x, inputs, seam, false)?;
        out.ok_or_else(|| candle_core::Error::Msg("the UNet pass stopped early".into()))
    }

    /// Runs `x` through the UNet only as far as `seam` needs (until
    /// [`TransformerSeam::finished`]), for passes whose output is not used (the personalization
    /// reference pass: nothing after its last host is computed).
    pub fn run_for_seam(
        &self,
        x: &Tensor,
        inputs: &UNetInputs,
        seam: &mut dyn TransformerSeam,
    ) -> Result<()> {
        self.pass(x, inputs, Some(seam), true).map(|_| ())
    }

    /// The UNet pass; `None` when `stop_when_finished` and the seam finished before the end.
    fn pass(
        &self,
        x: &Tensor,
        inputs: &UNetInputs,
        mut seam: Option<&mut dyn TransformerSeam>,
        stop_when_finished: bool,
    ) -> Result<Option<Tensor>> {
        let finished = |seam: &Option<&mut dyn TransformerSeam>| {
            stop_when_finished && seam.as_ref().is_some_and(|s| s.finished())
        };
        let emb = self.time_embedding(inputs.timesteps, x.dtype())?;
        let mut skips = Vec::with_capacity(self.input_blocks.len());
        let mut h = x.clone();
        for block in &self.input_blocks {
            h = Self::run_layers(block, h, &emb, inputs, &mut seam)?;
            skips.push(h.clone());
            if finished(&seam) {
                return Ok(None);
            }
        }
        h = Self::run_layers(&self.middle_block, h, &emb, inputs, &mut seam)?;
        for block in &self.output_blocks {
            if finished(&seam) {
                return Ok(None);
            }
            let skip = skips.pop().expect("one skip per output block");
            h = Tensor::cat(&[&h, &skip], 1)?;
            h = Self::run_layers(block, h, &emb, inputs, &mut seam)?;
        }
        if finished(&seam) {
            return Ok(None);
        }
        Ok(Some(
            self.out_conv.forward(&self.out_norm.forward_silu(&h)?)?,
        ))
    }
}
