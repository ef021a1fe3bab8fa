//! `EncoderUNetModelWT`: StableSR's time-aware encoder of the LQ latent
//! (`structcond_stage_model.*`). It runs the encoder half of a UNet on the clean LQ latent at
//! the current (original-scale) timestep and returns one feature map per UNet resolution, each
//! passed through its own ResBlock (`fea_tran`) to the UNet's `semb_channels`. These feed the
//! SPADE layers of every UNet residual block.

use super::nn::{self, group_norm32, ConvSpec, GroupNorm};
use super::time_embedding::TimeEmbedding;
use super::unet::{ResBlock, StructCond};
use crate::config::LqEncoderConfig;
use crate::model::nn::Conv2d;
use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// `AttentionBlock` with the legacy QKV order (heads split before q/k/v) and the scale
/// `ch^-1/4` applied to both q and k.
#[derive(Debug, Clone)]
struct AttentionBlock {
    norm: GroupNorm,
    qkv_weight: Tensor,
    qkv_bias: Tensor,
    proj_weight: Tensor,
    proj_bias: Tensor,
    heads: usize,
}

impl AttentionBlock {
    fn new(channels: usize, cfg: &LqEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let heads = match cfg.num_head_channels {
            Some(head_channels) => channels / head_channels,
            None => cfg.num_heads,
        };
        if heads == 0 || !channels.is_multiple_of(heads) {
            candle_core::bail!("attention: {channels} channels not divisible into {heads} heads");
        }
        // conv1d weights [out, in, 1]: used as matrices.
        let qkv_weight = vb.get((3 * channels, channels, 1), "qkv.weight")?;
        let proj_weight = vb.get((channels, channels, 1), "proj_out.weight")?;
        Ok(AttentionBlock {
            norm: group_norm32(channels, vb.pp("norm"))?,
            qkv_weight,
            qkv_bias: vb.get(3 * channels, "qkv.bias")?,
            proj_weight,
            proj_bias: vb.get(channels, "proj_out.bias")?,
            heads,
        })
    }

    /// 1x1 conv over `[B, C, T]`.
    fn conv1x1(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let w = weight.squeeze(2)?;
        w.broadcast_matmul(x)?.broadcast_add(&bias.unsqueeze(1)?)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = h * w;
        let flat = x.reshape((b, c, t))?;
        let qkv = Self::conv1x1(&self.norm.forward(&flat)?, &self.qkv_weight, &self.qkv_bias)?;
        let ch = c / self.heads;
        let qkv = qkv.reshape((b * self.heads, 3 * ch, t))?;
        // The reference scales q and k by ch^-1/4 each; one ch^-1/2 on the scores is the same
        // product. Token-major `[b*heads, t, ch]` for the shared attention, which chunks the
        // query rows so the `t x t` scores (4096^2 per head at a 64x64 latent) are never whole.
        let tokens = |from: usize| qkv.narrow(1, from, ch)?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (tokens(0)?, tokens(ch)?, tokens(2 * ch)?);
        let a = crate::kernels::attention(&q, &k, &v, 1.0 / (ch as f64).sqrt(), None)?
            .transpose(1, 2)?
            .contiguous()?;
        let a = a.reshape((b, c, t))?;
        let out = Self::conv1x1(&a, &self.proj_weight, &self.proj_bias)?;
        (flat + out)?.reshape((b, c, h, w))
    }
}

// Built once per model; the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    Res(ResBlock),
    Attention(AttentionBlock),
    Down(Conv2d),
}

#[derive(Debug, Clone)]
pub struct LqEncoder {
    time_embed: TimeEmbedding,
    input_blocks: Vec<Vec<Layer>>,
    middle_block: Vec<Layer>,
    fea_tran: Vec<ResBlock>,
}

impl LqEncoder {
    pub fn new(cfg: &LqEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let mc = cfg.model_channels;
        let emb_dim = 4 * mc;
        let mut input_blocks = vec![vec![Layer::Conv(nn::conv2d(
            cfg.in_channels,
            mc,
            ConvSpec::same(3),
            vb.pp("input_blocks.0.0"),
        )?)]];
        // Widths of the features handed to `fea_tran`: the input of every downsampling step,
        // then the middle block's output.
        let mut feature_channels = Vec::new();
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
                    None,
                    vb.pp(format!("input_blocks.{i}.0")),
                )?)];
                ch = out;
                if cfg.attention_resolutions.contains(&ds) {
                    layers.push(Layer::Attention(AttentionBlock::new(
                        ch,
                        cfg,
                        vb.pp(format!("input_blocks.{i}.1")),
                    )?));
                }
                input_blocks.push(layers);
            }
            if level + 1 != cfg.channel_mult.len() {
                let i = input_blocks.len();
                input_blocks.push(vec![Layer::Down(nn::conv2d(
                    ch,
                    ch,
                    ConvSpec::downsample(1),
                    vb.pp(format!("input_blocks.{i}.0.op")),
                )?)]);
                feature_channels.push(ch);
                ds *= 2;
            }
        }
        let middle_block = vec![
            Layer::Res(ResBlock::new(
                ch,
                ch,
                emb_dim,
                None,
                vb.pp("middle_block.0"),
            )?),
            Layer::Attention(AttentionBlock::new(ch, cfg, vb.pp("middle_block.1"))?),
            Layer::Res(ResBlock::new(
                ch,
                ch,
                emb_dim,
                None,
                vb.pp("middle_block.2"),
            )?),
        ];
        feature_channels.push(ch);
        let fea_tran = feature_channels
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                ResBlock::new(
                    c,
                    cfg.out_channels,
                    emb_dim,
                    None,
                    vb.pp(format!("fea_tran.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LqEncoder {
            time_embed: TimeEmbedding::new(mc, vb.clone())?,
            input_blocks,
            middle_block,
            fea_tran,
        })
    }

    fn run_layers(layers: &[Layer], mut h: Tensor, emb: &Tensor) -> Result<Tensor> {
        for layer in layers {
            h = match layer {
                Layer::Conv(c) | Layer::Down(c) => c.forward(&h)?,
                Layer::Res(r) => r.forward(&h, emb, None)?,
                Layer::Attention(a) => a.forward(&h)?,
            };
        }
        Ok(h)
    }

    /// Features of the clean LQ latent `x` (`[B, 4, h, w]`, already scaled) at the
    /// original-scale `timesteps` (`[B]`), keyed by spatial width.
    pub fn forward(&self, x: &Tensor, timesteps: &Tensor) -> Result<StructCond> {
        let emb = self.time_embed.forward(timesteps, x.dtype())?;
        let mut features = Vec::new();
        let mut h = x.clone();
        for block in &self.input_blocks {
            let before = h.clone();
            h = Self::run_layers(block, h, &emb)?;
            if h.dim(D::Minus1)? != before.dim(D::Minus1)? {
                features.push(before);
            }
        }
        h = Self::run_layers(&self.middle_block, h, &emb)?;
        features.push(h);
        if features.len() != self.fea_tran.len() {
            candle_core::bail!(
                "time-aware encoder produced {} features for {} transforms (latent too small?)",
                features.len(),
                self.fea_tran.len()
            );
        }
        let mut out = StructCond::new();
        for (feature, tran) in features.iter().zip(&self.fea_tran) {
            // As the reference's dict: a later feature of the same width replaces an earlier one.
            out.insert(feature.dim(D::Minus1)?, tran.forward(feature, &emb, None)?);
        }
        Ok(out)
    }
}
