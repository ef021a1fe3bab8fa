//! The personalized UNet as two passes of the frozen UNet.
//!
//! 1. **Reference pass** ([`PersonalizedUNet::reference_features`]): the reference latent runs
//!    through the UNet with `struct_cond = None` (no SPADE: the frozen SD-2.1 path), at the x
//!    rows' timestep and with the branch's text context. At every host it records the tokens
//!    after the base block (`R`), the placeholder attention map, the otsu mask and L_Pers. The
//!    ICA never touches this stream, so its features equal the base model's.
//! 2. **x pass** ([`PersonalizedUNet::forward`]): the normal StableSR forward whose seam applies
//!    Eq. 3, `F̂ = F + λ_att·γ⊙(ICA(F, R, M) − F)`, at each host.
//!
//! ## How a sampler (restore) calls it, per denoiser call
//! For a UNet call on `x` (`[B, 4, h, w]`, any size) with `timesteps` (`[B]`), `context`
//! (`[B, 77, C]`) and `struct_cond`:
//! * if `lambda_att == 0`: `unet.forward(x, inputs)` with the positive context built by
//!   [`crate::personalize::identity::Identity::positive_context`] (token only, no ref stream);
//! * else: `refs = p.reference_features(&identity.reference_latent(ref_index)?, timesteps_ref,
//!   context, &positions)` where `timesteps_ref`/`context`/`positions` have the same rows as
//!   the UNet call (one per CFG branch: rows of the negative branch use the negative context and
//!   its own EOT column with placeholder column `k_ph` of the positive prompt, see
//!   [`crate::personalize::token::PromptTokens::positions`]); the reference latent is broadcast
//!   over the rows. Then `p.forward(x, &inputs, Some(&refs))`. With tiles, compute `refs` once
//!   per step and reuse them for every tile (they do not depend on `x`). Equivalently, build a
//!   [`GatedSeam`] and call `unet.forward_with_seam(x, inputs, Some(&mut seam))`.

use crate::error::{Error, Result};
use crate::model::unet::{SpatialTransformer, TransformerSeam, UNet, UNetInputs};
use crate::personalize::block::{
    placeholder_signals, run_blocks_with_text_probs, PersonalizationBlock, PlaceholderSignals,
    TokenPositions,
};
use candle_core::Tensor;
use std::collections::BTreeMap;

/// What the reference pass yields at one host.
#[derive(Debug, Clone)]
pub struct HostReference {
    /// `R`: reference tokens after the host's base block, `[B_ref, N_ref, d]`.
    pub tokens: Tensor,
    pub signals: PlaceholderSignals,
}

/// The reference stream's features at every host, keyed by host path.
#[derive(Debug, Clone, Default)]
pub struct ReferenceFeatures {
    pub hosts: BTreeMap<String, HostReference>,
}

impl ReferenceFeatures {
    /// L_Pers: the sum over hosts of each host's attention loss (a scalar).
    pub fn pers_loss(&self) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for host in self.hosts.values() {
            total = Some(match total {
                None => host.signals.loss.clone(),
                Some(t) => (t + &host.signals.loss)?,
            });
        }
        total.ok_or_else(|| Error::Config("no personalization hosts".into()))
    }
}

/// Seam of the reference pass: records `R`, the mask and L_Pers at every host.
struct ReferenceRecorder<'a> {
    hosts: &'a BTreeMap<String, PersonalizationBlock>,
    positions: &'a TokenPositions,
    features: ReferenceFeatures,
}

impl TransformerSeam for ReferenceRecorder<'_> {
    fn after_blocks(&mut self, _path: &str, tokens: Tensor) -> candle_core::Result<Tensor> {
        Ok(tokens)
    }

    fn run_blocks(
        &mut self,
        path: &str,
        host: &SpatialTransformer,
        tokens: &Tensor,
        context: &Tensor,
    ) -> candle_core::Result<Tensor> {
        if !self.hosts.contains_key(path) {
            return host.run_blocks(tokens, context);
        }
        let (ref_tokens, probs) =
            run_blocks_with_text_probs(host, tokens, context).map_err(to_candle)?;
        let signals = placeholder_signals(&probs, self.positions).map_err(to_candle)?;
        self.features.hosts.insert(
            path.to_string(),
            HostReference {
                tokens: ref_tokens.clone(),
                signals,
            },
        );
        Ok(ref_tokens)
    }

    fn finished(&self) -> bool {
        self.features.hosts.len() == self.hosts.len()
    }
}

fn to_candle(e: Error) -> candle_core::Error {
    match e {
        Error::Candle(c) => c,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

/// Seam of the x pass: Eq. 3 at every host with the recorded reference features.
pub struct GatedSeam<'a> {
    blocks: &'a BTreeMap<String, PersonalizationBlock>,
    refs: &'a ReferenceFeatures,
    lambda_att: f64,
}

impl<'a> GatedSeam<'a> {
    pub fn new(
        blocks: &'a BTreeMap<String, PersonalizationBlock>,
        refs: &'a ReferenceFeatures,
        lambda_att: f64,
    ) -> Self {
        GatedSeam {
            blocks,
            refs,
            lambda_att,
        }
    }
}

impl TransformerSeam for GatedSeam<'_> {
    fn after_blocks(&mut self, path: &str, tokens: Tensor) -> candle_core::Result<Tensor> {
        let Some(block) = self.blocks.get(path) else {
            return Ok(tokens);
        };
        let reference = self.refs.hosts.get(path).ok_or_else(|| {
            candle_core::Error::Msg(format!("no reference features recorded for host {path}"))
        })?;
        block
            .forward(
                &tokens,
                &reference.tokens,
                Some(&reference.signals.mask),
                self.lambda_att,
            )
            .map_err(to_candle)
    }
}

/// The frozen UNet with personalization blocks at its hosts.
pub struct PersonalizedUNet<'a> {
    pub unet: &'a UNet,
    /// Blocks keyed by host path (`output_blocks.4.1`, …).
    pub blocks: &'a BTreeMap<String, PersonalizationBlock>,
    pub lambda_att: f64,
}

impl<'a> PersonalizedUNet<'a> {
    pub fn new(
        unet: &'a UNet,
        blocks: &'a BTreeMap<String, PersonalizationBlock>,
        lambda_att: f64,
    ) -> Self {
        PersonalizedUNet {
            unet,
            blocks,
            lambda_att,
        }
    }

    /// The reference pass: `ref_latent` (`[B_ref, 4, h_ref, w_ref]`) through the SPADE-free UNet
    /// at `timesteps` (`[B_ref]`) with `context` (`[B_ref, 77, C]`); `positions` gives the
    /// placeholder/EOT columns per row.
    pub fn reference_features(
        &self,
        ref_latent: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        positions: &TokenPositions,
    ) -> Result<ReferenceFeatures> {
        let mut recorder = ReferenceRecorder {
            hosts: self.blocks,
            positions,
            features: ReferenceFeatures::default(),
        };
        let inputs = UNetInputs {
            timesteps,
            context,
            struct_cond: None,
        };
        // The output of the reference pass is not needed, only what the seam recorded: the
        // pass stops after the last host.
        self.unet.run_for_seam(ref_latent, &inputs, &mut recorder)?;
        for path in self.blocks.keys() {
            if !recorder.features.hosts.contains_key(path) {
                return Err(Error::Config(format!(
                    "personalization host {path} is not a spatial transformer of this UNet"
                )));
            }
        }
        Ok(recorder.features)
    }

    /// The x pass. `refs = None` or `lambda_att == 0` gives the base UNet's output.
    pub fn forward(
        &self,
        x: &Tensor,
        inputs: &UNetInputs,
        refs: Option<&ReferenceFeatures>,
    ) -> Result<Tensor> {
        match refs {
            Some(refs) if self.lambda_att != 0.0 => {
                let mut seam = GatedSeam::new(self.blocks, refs, self.lambda_att);
                Ok(self.unet.forward_with_seam(x, inputs, Some(&mut seam))?)
            }
            _ => Ok(self.unet.forward(x, inputs)?),
        }
    }
}
