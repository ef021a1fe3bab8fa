//! The openaimodel residual block (`ResBlock`, and `ResBlockDual` with SPADE modulation by
//! the time-aware encoder's features), as the UNet and the time-aware encoder build it.

use super::StructCond;
use crate::kernels;
use crate::model::nn::{self, group_norm32, Conv2d, ConvSpec, GroupNorm, Linear};
use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

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
            shared: nn::conv2d(
                semb_channels,
                SPADE_HIDDEN,
                ConvSpec::same(3),
                vb.pp("mlp_shared.0"),
            )?,
            gamma: nn::conv2d(
                SPADE_HIDDEN,
                channels,
                ConvSpec::same(3),
                vb.pp("mlp_gamma"),
            )?,
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
        kernels::add_const(&kernels::mul_const(&grouped, &gamma)?, &beta)?
            .reshape((batch, c, hh, ww))
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
                Some(nn::conv2d(
                    in_c,
                    out_c,
                    ConvSpec::same(1),
                    vb.pp("skip_connection"),
                )?)
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
