//! `UNetModelDualcondV2`: the SD-2.1 UNet of StableSR with SFT/SPADE modulation of every residual
//! block by the time-aware LQ encoder's features (`model.diffusion_model.*`).
//!
//! Layout (as the reference builds it): `input_blocks` (conv, then per level `num_res_blocks`
//! x [ResBlockDual, SpatialTransformerV2 where the level's downsampling factor is in
//! `attention_resolutions`], then a stride-2 conv), `middle_block` (ResBlockDual,
//! SpatialTransformerV2, ResBlockDual), `output_blocks` (per level reversed, `num_res_blocks + 1`
//! x [ResBlockDual on the skip concat, transformer, nearest-2x + conv at the level's end]) and
//! `out` (GroupNorm, SiLU, conv). The output is the v prediction.

mod resblock;
mod transformer;

pub(crate) use resblock::ResBlock;
pub use transformer::{
    CrossAttention, FeedForward, SpatialTransformer, TransformerBlock, TransformerTokens,
};

use super::nn::{self, group_norm32, ConvSpec, GroupNorm};
use super::time_embedding::TimeEmbedding;
use crate::config::UNetConfig;
use crate::model::nn::Conv2d;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use std::collections::BTreeMap;

/// Time-aware encoder features keyed by their spatial width, as the reference's dict
/// (`struct_cond[str(h.shape[-1])]`).
pub type StructCond = BTreeMap<usize, Tensor>;

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
