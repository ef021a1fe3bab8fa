//! The KL autoencoder of Stable Diffusion as used by StableSR (`AutoencoderKL`) and its CFW
//! variant (`AutoencoderKLResi`), whose decoder fuses encoder features of the LQ image back in
//! through `Fuse_sft_block_RRDB` layers.
//!
//! Parameter paths equal the reference's `state_dict` keys: `encoder.*`, `decoder.*`,
//! `quant_conv.*`, `post_quant_conv.*` below the builder's prefix (`first_stage_model` for the
//! diffusion checkpoint, the root for the CFW checkpoint). Nothing depends on the image size, so
//! any size divisible by [`VaeConfig::downsample_factor`] works.

use crate::config::VaeConfig;
use crate::kernels;
use crate::model::nn::Conv2d;
use crate::model::nn::{self, ConvSpec, GroupNorm};
use candle_core::{bail, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// GroupNorm of the VAE and CFW blocks (`Normalize`): 32 groups, eps 1e-6.
const NORM_GROUPS: usize = 32;
const NORM_EPS: f64 = 1e-6;
/// `Decoder_Mix` defaults: RRDBs per fusion layer and their growth channels.
const FUSE_RRDB_BLOCKS: usize = 2;
const FUSE_GROW_CHANNELS: usize = 32;
/// ESRGAN's residual scaling inside dense blocks and RRDBs.
const RRDB_RESIDUAL_SCALE: f64 = 0.2;
const LEAKY_SLOPE: f64 = 0.2;

fn normalize(channels: usize, vb: VarBuilder) -> Result<GroupNorm> {
    GroupNorm::new(NORM_GROUPS, channels, NORM_EPS, vb)
}

fn conv3x3(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Conv2d> {
    nn::conv2d(in_c, out_c, ConvSpec::same(3), vb)
}

fn conv1x1(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Conv2d> {
    nn::conv2d(in_c, out_c, ConvSpec::same(1), vb)
}

fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    // max(x, a*x) equals LeakyReLU for 0 < a < 1.
    x.maximum(&(x * LEAKY_SLOPE)?)
}

/// The diagonal Gaussian posterior `quant_conv(encoder(x))` describes.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as in the reference.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits `[mean | logvar]` moments along the channel dimension.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let channels = moments.dim(1)?;
        if channels % 2 != 0 {
            bail!("posterior moments need an even channel count, got {channels}");
        }
        let half = channels / 2;
        Ok(DiagonalGaussian {
            mean: moments.narrow(1, 0, half)?,
            logvar: moments.narrow(1, half, half)?.clamp(-30f32, 20f32)?,
        })
    }

    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// `mean + std * noise`, with `noise` drawn from N(0, 1) by the caller (so that it can be
    /// replayed).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        self.mean.add(&self.std()?.mul(noise)?)
    }
}

/// `ResnetBlock` without time embedding (the VAE's `temb_channels` is 0); with a 1x1 shortcut
/// when the channel count changes. The fusion layers' `ResBlock` is the same computation with its
/// shortcut named `conv_out`.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(in_c: usize, out_c: usize, shortcut_name: &str, vb: VarBuilder) -> Result<Self> {
        let shortcut = if in_c != out_c {
            Some(conv1x1(in_c, out_c, vb.pp(shortcut_name))?)
        } else {
            None
        };
        Ok(ResnetBlock {
            norm1: normalize(in_c, vb.pp("norm1"))?,
            conv1: conv3x3(in_c, out_c, vb.pp("conv1"))?,
            norm2: normalize(out_c, vb.pp("norm2"))?,
            conv2: conv3x3(out_c, out_c, vb.pp("conv2"))?,
            shortcut,
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        match &self.shortcut {
            Some(conv) => conv.forward(x)? + h,
            None => x + h,
        }
    }
}

/// Single-head self-attention over all pixels (`AttnBlock`), 1x1 convolutions for q, k, v, out.
#[derive(Debug, Clone)]
struct AttnBlock {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj_out: Conv2d,
}

impl AttnBlock {
    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(AttnBlock {
            norm: normalize(channels, vb.pp("norm"))?,
            q: conv1x1(channels, channels, vb.pp("q"))?,
            k: conv1x1(channels, channels, vb.pp("k"))?,
            v: conv1x1(channels, channels, vb.pp("v"))?,
            proj_out: conv1x1(channels, channels, vb.pp("proj_out"))?,
        })
    }
}

impl Module for AttnBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        // [b, c, h, w] -> [b, h*w, c] token sequences.
        let tokens = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()
        };
        let q = tokens(self.q.forward(&normed)?)?;
        let k = tokens(self.k.forward(&normed)?)?;
        let v = tokens(self.v.forward(&normed)?)?;
        let attended = kernels::attention(&q, &k, &v, (c as f64).powf(-0.5), None)?;
        let attended = attended.transpose(1, 2)?.reshape((b, c, h, w))?;
        x + self.proj_out.forward(&attended)?
    }
}

/// Stride-2 3x3 convolution after zero padding one row/column at the bottom/right only.
#[derive(Debug, Clone)]
struct Downsample {
    conv: Conv2d,
}

impl Module for Downsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let padded = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
        self.conv.forward(&padded)
    }
}

/// Nearest-neighbour 2x upsampling followed by a 3x3 convolution.
#[derive(Debug, Clone)]
struct Upsample {
    conv: Conv2d,
}

impl Module for Upsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }
}

/// The ResnetBlocks (each optionally followed by attention) of one resolution level.
#[derive(Debug, Clone)]
struct Level {
    blocks: Vec<ResnetBlock>,
    attns: Vec<AttnBlock>,
}

impl Level {
    /// `with_attn`: the level's nominal resolution (derived from the config's `resolution`, not
    /// from the input) is listed in `attn_resolutions`.
    fn new(
        in_c: usize,
        out_c: usize,
        n_blocks: usize,
        with_attn: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut blocks = Vec::with_capacity(n_blocks);
        let mut attns = Vec::new();
        let mut block_in = in_c;
        for i in 0..n_blocks {
            blocks.push(ResnetBlock::new(
                block_in,
                out_c,
                "nin_shortcut",
                vb.pp("block").pp(i),
            )?);
            block_in = out_c;
            if with_attn {
                attns.push(AttnBlock::new(out_c, vb.pp("attn").pp(i))?);
            }
        }
        Ok(Level { blocks, attns })
    }
}

impl Module for Level {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h)?;
            if let Some(attn) = self.attns.get(i) {
                h = attn.forward(&h)?;
            }
        }
        Ok(h)
    }
}

/// `mid.block_1`, `mid.attn_1`, `mid.block_2`.
#[derive(Debug, Clone)]
struct Middle {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl Middle {
    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Middle {
            block_1: ResnetBlock::new(channels, channels, "nin_shortcut", vb.pp("block_1"))?,
            attn_1: AttnBlock::new(channels, vb.pp("attn_1"))?,
            block_2: ResnetBlock::new(channels, channels, "nin_shortcut", vb.pp("block_2"))?,
        })
    }
}

impl Module for Middle {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.block_1.forward(x)?;
        let h = self.attn_1.forward(&h)?;
        self.block_2.forward(&h)
    }
}

fn check_config(cfg: &VaeConfig) -> Result<()> {
    if cfg.ch_mult.is_empty() {
        bail!("VAE config: ch_mult is empty");
    }
    if !cfg.double_z {
        bail!("VAE config: AutoencoderKL needs double_z (mean and logvar)");
    }
    Ok(())
}

/// Levels whose output the CFW encoder returns (`Encoder.forward(return_fea=True)`): levels 1
/// and 2 by index, whatever the depth (the reference tests `i_level == 1 or i_level == 2`), so a
/// 3-level VAE still returns two features and a 2-level one returns one.
const FEATURE_LEVELS: [usize; 2] = [1, 2];

fn feature_levels(cfg: &VaeConfig) -> Vec<usize> {
    FEATURE_LEVELS
        .into_iter()
        .filter(|&l| l < cfg.ch_mult.len())
        .collect()
}

/// Levels at which `Decoder_Mix` fuses: all but the first and the last (levels 1 and 2 of the
/// released 4-level VAE). Level `l` fuses encoder feature `l - 1`.
fn fused_levels(cfg: &VaeConfig) -> std::ops::Range<usize> {
    1..cfg.ch_mult.len().saturating_sub(1).max(1)
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    levels: Vec<Level>,
    downsamples: Vec<Downsample>,
    mid: Middle,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    feature_levels: Vec<usize>,
}

impl Encoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let n_levels = cfg.ch_mult.len();
        let conv_in = conv3x3(cfg.in_channels, cfg.ch, vb.pp("conv_in"))?;
        let mut levels = Vec::with_capacity(n_levels);
        let mut downsamples = Vec::with_capacity(n_levels - 1);
        let mut block_in = cfg.ch;
        let mut curr_res = cfg.resolution;
        for (i, mult) in cfg.ch_mult.iter().enumerate() {
            let block_out = cfg.ch * mult;
            let vb_level = vb.pp("down").pp(i);
            let with_attn = cfg.attn_resolutions.contains(&curr_res);
            levels.push(Level::new(
                block_in,
                block_out,
                cfg.num_res_blocks,
                with_attn,
                vb_level.clone(),
            )?);
            block_in = block_out;
            if i + 1 != n_levels {
                let conv = nn::conv2d(
                    block_in,
                    block_in,
                    ConvSpec::downsample(0),
                    vb_level.pp("downsample").pp("conv"),
                )?;
                downsamples.push(Downsample { conv });
                curr_res /= 2;
            }
        }
        let out_c = if cfg.double_z {
            2 * cfg.z_channels
        } else {
            cfg.z_channels
        };
        Ok(Encoder {
            conv_in,
            levels,
            downsamples,
            mid: Middle::new(block_in, vb.pp("mid"))?,
            norm_out: normalize(block_in, vb.pp("norm_out"))?,
            conv_out: conv3x3(block_in, out_c, vb.pp("conv_out"))?,
            feature_levels: feature_levels(cfg),
        })
    }

    /// The encoder output and, when `keep_features`, the output of each fused level before its
    /// downsampling.
    fn forward(&self, x: &Tensor, keep_features: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = self.conv_in.forward(x)?;
        let mut features = Vec::new();
        for (i, level) in self.levels.iter().enumerate() {
            h = level.forward(&h)?;
            if keep_features && self.feature_levels.contains(&i) {
                features.push(h.clone());
            }
            if let Some(down) = self.downsamples.get(i) {
                h = down.forward(&h)?;
            }
        }
        let h = self.mid.forward(&h)?;
        let h = self.conv_out.forward(&self.norm_out.forward_silu(&h)?)?;
        Ok((h, features))
    }
}

/// ESRGAN's `ResidualDenseBlock`: five densely connected 3x3 convolutions.
#[derive(Debug, Clone)]
struct ResidualDenseBlock {
    convs: Vec<Conv2d>,
}

impl ResidualDenseBlock {
    fn new(features: usize, grow: usize, vb: VarBuilder) -> Result<Self> {
        let mut convs = Vec::with_capacity(5);
        for i in 0..5 {
            let out_c = if i == 4 { features } else { grow };
            convs.push(conv3x3(
                features + i * grow,
                out_c,
                vb.pp(format!("conv{}", i + 1)),
            )?);
        }
        Ok(ResidualDenseBlock { convs })
    }
}

impl Module for ResidualDenseBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut stack = vec![x.clone()];
        let last = self.convs.len() - 1;
        for conv in &self.convs[..last] {
            let y = leaky_relu(&conv.forward(&Tensor::cat(&stack, 1)?)?)?;
            stack.push(y);
        }
        let y = self.convs[last].forward(&Tensor::cat(&stack, 1)?)?;
        (y * RRDB_RESIDUAL_SCALE)? + x
    }
}

/// Residual-in-residual dense block (three dense blocks, scaled residual).
#[derive(Debug, Clone)]
struct Rrdb {
    rdbs: Vec<ResidualDenseBlock>,
}

impl Rrdb {
    fn new(features: usize, grow: usize, vb: VarBuilder) -> Result<Self> {
        let rdbs = (1..=3)
            .map(|i| ResidualDenseBlock::new(features, grow, vb.pp(format!("rdb{i}"))))
            .collect::<Result<_>>()?;
        Ok(Rrdb { rdbs })
    }
}

impl Module for Rrdb {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for rdb in &self.rdbs {
            h = rdb.forward(&h)?;
        }
        (h * RRDB_RESIDUAL_SCALE)? + x
    }
}

/// `Fuse_sft_block_RRDB`: `dec + w * F(cat[enc, dec])`.
#[derive(Debug, Clone)]
struct FusionLayer {
    encode_enc_1: ResnetBlock,
    encode_enc_2: Vec<Rrdb>,
    encode_enc_3: ResnetBlock,
}

impl FusionLayer {
    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let encode_enc_2 = (0..FUSE_RRDB_BLOCKS)
            .map(|i| Rrdb::new(channels, FUSE_GROW_CHANNELS, vb.pp("encode_enc_2").pp(i)))
            .collect::<Result<_>>()?;
        Ok(FusionLayer {
            encode_enc_1: ResnetBlock::new(
                2 * channels,
                channels,
                "conv_out",
                vb.pp("encode_enc_1"),
            )?,
            encode_enc_2,
            encode_enc_3: ResnetBlock::new(channels, channels, "conv_out", vb.pp("encode_enc_3"))?,
        })
    }

    fn forward(&self, enc: &Tensor, dec: &Tensor, weight: f64) -> Result<Tensor> {
        let mut h = self.encode_enc_1.forward(&Tensor::cat(&[enc, dec], 1)?)?;
        for rrdb in &self.encode_enc_2 {
            h = rrdb.forward(&h)?;
        }
        let h = self.encode_enc_3.forward(&h)?;
        dec + (h * weight)?
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid: Middle,
    /// Indexed by level (0 = full resolution), run from the last to the first.
    levels: Vec<Level>,
    /// `upsamples[i]` follows level `i + 1`.
    upsamples: Vec<Upsample>,
    /// `fusions[i]` belongs to level `i + fused_levels.start`; empty for the plain decoder.
    fusions: Vec<FusionLayer>,
    fused_levels: std::ops::Range<usize>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &VaeConfig, with_fusion: bool, vb: VarBuilder) -> Result<Self> {
        let n_levels = cfg.ch_mult.len();
        let mut block_in = cfg.ch * cfg.ch_mult[n_levels - 1];
        let mut curr_res = cfg.resolution >> (n_levels - 1);
        let conv_in = conv3x3(cfg.z_channels, block_in, vb.pp("conv_in"))?;
        let mid = Middle::new(block_in, vb.pp("mid"))?;

        let mut levels = Vec::with_capacity(n_levels);
        let mut upsamples = Vec::with_capacity(n_levels - 1);
        for i in (0..n_levels).rev() {
            let block_out = cfg.ch * cfg.ch_mult[i];
            let vb_level = vb.pp("up").pp(i);
            let with_attn = cfg.attn_resolutions.contains(&curr_res);
            levels.push(Level::new(
                block_in,
                block_out,
                cfg.num_res_blocks + 1,
                with_attn,
                vb_level.clone(),
            )?);
            block_in = block_out;
            if i != 0 {
                let conv = conv3x3(block_in, block_in, vb_level.pp("upsample").pp("conv"))?;
                upsamples.push(Upsample { conv });
                curr_res *= 2;
            }
        }
        levels.reverse();
        upsamples.reverse();

        let fused_levels = if with_fusion { fused_levels(cfg) } else { 0..0 };
        let fusions = fused_levels
            .clone()
            .map(|i| FusionLayer::new(cfg.ch * cfg.ch_mult[i], vb.pp(format!("fusion_layer_{i}"))))
            .collect::<Result<_>>()?;

        Ok(Decoder {
            conv_in,
            mid,
            levels,
            upsamples,
            fusions,
            fused_levels,
            norm_out: normalize(block_in, vb.pp("norm_out"))?,
            conv_out: conv3x3(block_in, cfg.out_ch, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor, fusion: Option<(&[Tensor], f64)>) -> Result<Tensor> {
        if let Some((features, _)) = fusion {
            // The reference indexes `enc_fea[l - 1]` for every fused level l; extra features
            // (a 3-level VAE returns two, fuses one) are unused. Deeper than 4 levels the
            // reference's own decoder fails the same way: it fuses more levels than it returns.
            if features.len() < self.fusions.len() {
                bail!(
                    "CFW decoder fuses {} levels but got {} encoder features (the reference encoder returns levels 1 and 2 only)",
                    self.fusions.len(),
                    features.len()
                );
            }
        }
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for i in (0..self.levels.len()).rev() {
            h = self.levels[i].forward(&h)?;
            if let Some((features, weight)) = fusion {
                // A zero weight adds exactly zero: skip the fusion layer's work.
                if self.fused_levels.contains(&i) && weight != 0.0 {
                    let k = i - self.fused_levels.start;
                    h = self.fusions[k].forward(&features[k], &h, weight)?;
                }
            }
            if i > 0 {
                h = self.upsamples[i - 1].forward(&h)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// `ldm.models.autoencoder.AutoencoderKL` (the diffusion checkpoint's `first_stage_model`).
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    /// `None` when built by [`AutoencoderKL::without_decoder`].
    decoder: Option<Decoder>,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
}

impl AutoencoderKL {
    /// `vb` points at the autoencoder's own prefix (e.g. `first_stage_model`).
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        check_config(cfg)?;
        Ok(AutoencoderKL {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Some(Decoder::new(cfg, false, vb.pp("decoder"))?),
            quant_conv: conv1x1(2 * cfg.z_channels, 2 * cfg.embed_dim, vb.pp("quant_conv"))?,
            post_quant_conv: conv1x1(cfg.embed_dim, cfg.z_channels, vb.pp("post_quant_conv"))?,
        })
    }

    /// The autoencoder without its decoder, whose tensors are requested from `check_vb` (same
    /// prefix as `vb`; a check-only builder verifies them against the file) and then dropped:
    /// restoring writes pixels through the CFW decoder, and training works in latent space.
    pub fn without_decoder(cfg: &VaeConfig, vb: VarBuilder, check_vb: VarBuilder) -> Result<Self> {
        check_config(cfg)?;
        Decoder::new(cfg, false, check_vb.pp("decoder"))?;
        Ok(AutoencoderKL {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: None,
            quant_conv: conv1x1(2 * cfg.z_channels, 2 * cfg.embed_dim, vb.pp("quant_conv"))?,
            post_quant_conv: conv1x1(cfg.embed_dim, cfg.z_channels, vb.pp("post_quant_conv"))?,
        })
    }

    /// Image in [-1, 1], NCHW, to the posterior over the (unscaled) latent.
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let (h, _) = self.encoder.forward(x, false)?;
        DiagonalGaussian::from_moments(&self.quant_conv.forward(&h)?)
    }

    /// Unscaled latent `z` (divide a diffusion latent by the scale factor first) to an image.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let decoder = self.decoder.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("this autoencoder was loaded without its decoder".into())
        })?;
        decoder.forward(&self.post_quant_conv.forward(z)?, None)
    }
}

/// `ldm.models.autoencoder.AutoencoderKLResi`: the controllable feature wrapping (CFW)
/// autoencoder, whose decoder mixes in encoder features of the LQ image.
#[derive(Debug, Clone)]
pub struct CfwAutoencoder {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
}

impl CfwAutoencoder {
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        check_config(cfg)?;
        Ok(CfwAutoencoder {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, true, vb.pp("decoder"))?,
            quant_conv: conv1x1(2 * cfg.z_channels, 2 * cfg.embed_dim, vb.pp("quant_conv"))?,
            post_quant_conv: conv1x1(cfg.embed_dim, cfg.z_channels, vb.pp("post_quant_conv"))?,
        })
    }

    /// The posterior and the encoder features the decoder fuses (one per fused level, in level
    /// order; the reference's `return_fea`).
    pub fn encode_with_features(&self, x: &Tensor) -> Result<(DiagonalGaussian, Vec<Tensor>)> {
        let (h, features) = self.encoder.forward(x, true)?;
        let posterior = DiagonalGaussian::from_moments(&self.quant_conv.forward(&h)?)?;
        Ok((posterior, features))
    }

    /// Unscaled latent `z` to an image, fusing `enc_features` with weight `fusion_w`
    /// (`dec_w`; 0 gives the plain decoder's output).
    pub fn decode_fused(
        &self,
        z: &Tensor,
        enc_features: &[Tensor],
        fusion_w: f64,
    ) -> Result<Tensor> {
        let h = self.post_quant_conv.forward(z)?;
        self.decoder.forward(&h, Some((enc_features, fusion_w)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{CheckedWeights, Source};
    use candle_core::{DType, Device};

    fn tiny(levels: usize) -> VaeConfig {
        VaeConfig {
            ch: 32,
            ch_mult: vec![1; levels],
            num_res_blocks: 1,
            resolution: 32,
            ..VaeConfig::released()
        }
    }

    /// The reference returns the outputs of levels 1 and 2 whatever the depth, and fuses levels
    /// 1..L-2 with feature `l - 1`; deeper than 4 levels its own decoder runs out of features.
    #[test]
    fn cfw_features_and_fusions_follow_the_reference_at_every_depth() {
        for (levels, features, fusions) in [(1, 0, 0), (2, 1, 0), (3, 2, 1), (4, 2, 2), (5, 2, 3)] {
            let cfg = tiny(levels);
            let weights = CheckedWeights::new(Source::Random(7));
            let cfw =
                CfwAutoencoder::new(&cfg, weights.var_builder(DType::F32, &Device::Cpu)).unwrap();
            assert_eq!(
                cfw.decoder.fusions.len(),
                fusions,
                "{levels} levels: fusion layers"
            );
            let side = 1 << (levels - 1);
            let x = Tensor::zeros((1, 3, 2 * side, 2 * side), DType::F32, &Device::Cpu).unwrap();
            let (posterior, feats) = cfw.encode_with_features(&x).unwrap();
            assert_eq!(feats.len(), features, "{levels} levels: encoder features");
            for (k, f) in feats.iter().enumerate() {
                // Level k + 1's output, before its downsampling.
                assert_eq!(
                    f.dims()[2],
                    (2 * side) >> (k + 1),
                    "{levels} levels: feature {k}"
                );
            }
            let decoded = cfw.decode_fused(&posterior.mean, &feats, 0.5);
            if levels <= 4 {
                assert_eq!(decoded.unwrap().dims(), x.dims(), "{levels} levels");
            } else {
                let msg = decoded.unwrap_err().to_string();
                assert!(msg.contains("encoder features"), "{msg}");
            }
        }
    }
}
