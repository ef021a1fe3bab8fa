//! The UNet and the time-aware encoder as the samplers' v-denoiser: [`ModelDenoiser`] for the
//! base model, [`PersonalizedDenoiser`] with an identity prepared as a [`Personalization`]
//! (reference pass, then Eq. 3 at every host).

use crate::diffusion::sampler::{Branches, VDenoiser};
use crate::error::{Error, Result};
use crate::model::base::BaseModel;
use crate::model::unet::UNetInputs;
use crate::personalize::block::{PersonalizationBlock, TokenPositions};
use crate::personalize::dual_stream::{PersonalizedUNet, ReferenceFeatures};
use crate::personalize::host_specs;
use crate::personalize::identity::Identity;
use crate::personalize::token::PromptTokens;
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

/// The UNet and time-aware encoder as the samplers' denoiser, with the two text contexts.
pub struct ModelDenoiser<'a> {
    pub model: &'a BaseModel,
    /// `[1, 77, d]` positive (conditional) context.
    pub cond: Tensor,
    /// `[1, 77, d]` negative (unconditional) context.
    pub uncond: Tensor,
}

impl ModelDenoiser<'_> {
    /// The UNet inputs of one call; `run_unet` gets `(x, inputs, struct rows b, branches)`.
    fn predict_with(
        &self,
        x_t: &Tensor,
        lq_latent: &Tensor,
        t_orig: usize,
        branches: Branches,
        run_unet: &mut dyn FnMut(&Tensor, &UNetInputs, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let dtype = self.model.dtype;
        let device = &self.model.device;
        let b = lq_latent.dim(0)?;
        let t_lq = Tensor::full(t_orig as f32, b, device)?;
        let struct_cond = self
            .model
            .lq_encoder
            .forward(&lq_latent.to_dtype(dtype)?, &t_lq)?;
        let context = match branches {
            Branches::Cond => self.cond.repeat((b, 1, 1))?,
            Branches::UncondCond => Tensor::cat(
                &[self.uncond.repeat((b, 1, 1))?, self.cond.repeat((b, 1, 1))?],
                0,
            )?,
        };
        let t = Tensor::full(t_orig as f32, x_t.dim(0)?, device)?;
        let inputs = UNetInputs {
            timesteps: &t,
            context: &context,
            struct_cond: Some(&struct_cond),
        };
        let v = run_unet(&x_t.to_dtype(dtype)?, &inputs, b)?;
        Ok(v.to_dtype(DType::F32)?)
    }
}

impl VDenoiser for ModelDenoiser<'_> {
    fn predict_v(
        &mut self,
        x_t: &Tensor,
        lq_latent: &Tensor,
        t_orig: usize,
        branches: Branches,
    ) -> Result<Tensor> {
        let unet = &self.model.unet;
        self.predict_with(x_t, lq_latent, t_orig, branches, &mut |x, inputs, _| {
            Ok(unet.forward(x, inputs)?)
        })
    }
}

/// An identity prepared for restoration on one base model: its personalization blocks, the
/// reference latent of the image stream, the learned token and the prompts' token columns.
pub struct Personalization {
    pub blocks: BTreeMap<String, PersonalizationBlock>,
    /// `[1, 4, h, w]` reference latent in the model's dtype.
    pub reference: Tensor,
    /// The paper's lambda_att; 0 keeps only the learned token (no reference pass).
    pub lambda_att: f64,
    /// The positive prompt (with its placeholder `*`) and the negative prompt.
    pub positive: PromptTokens,
    pub negative: PromptTokens,
    /// The learned token `[1, width]` in the model's dtype.
    pub token: Tensor,
    /// The two prompts' contexts (`[1, 77, C]`), the positive one with the token at `*`.
    cond: Tensor,
    uncond: Tensor,
    pub name: String,
    pub base_fingerprint: String,
}

impl Personalization {
    /// Prepares `identity` for `base`, whose weights have `fingerprint` (see
    /// [`crate::weights::base_fingerprint`]); an identity trained on another base
    /// model is refused. `prompt` must hold the placeholder `*` once.
    pub fn new(
        identity: &Identity,
        base: &BaseModel,
        fingerprint: &str,
        prompt: &str,
        negative_prompt: &str,
        lambda_att: f64,
    ) -> Result<Self> {
        if !lambda_att.is_finite() {
            return Err(Error::Input(format!(
                "--id-strength {lambda_att}: must be a finite number"
            )));
        }
        identity.check_base(fingerprint)?;
        let blocks = identity.blocks(&host_specs(&base.config.unet), base.dtype, &base.device)?;
        let token_width = identity.tensor("token.embedding")?.dim(1)?;
        if token_width != base.config.text.width {
            return Err(Error::Input(format!(
                "identity {:?}: its token is {token_width} wide, this text encoder's tokens {}",
                identity.name(),
                base.config.text.width
            )));
        }
        let channels = identity.tensor("ref.latents")?.dim(1)?;
        if channels != base.config.diffusion.latent_channels {
            return Err(Error::Input(format!(
                "identity {:?}: its reference latents have {channels} channels, this model's {}",
                identity.name(),
                base.config.diffusion.latent_channels
            )));
        }
        // The first reference: the identity's primary photo.
        let reference = identity.reference_latent(0, base.dtype, &base.device)?;
        let positive = PromptTokens::positive(&base.tokenizer, prompt)?;
        let negative = PromptTokens::plain(&base.tokenizer, negative_prompt)?;
        let token = identity.token(&base.device)?.to_dtype(base.dtype)?;
        // Encoded once here, so the text encoder can be released before sampling.
        let cond = positive.context(base.text_encoder()?, Some(&token))?;
        let uncond = negative.context(base.text_encoder()?, None)?;
        Ok(Personalization {
            blocks,
            reference,
            lambda_att,
            positive,
            negative,
            token,
            cond,
            uncond,
            name: identity.name().to_string(),
            base_fingerprint: fingerprint.to_string(),
        })
    }

    /// Conditions on the identity's reference photo `index` instead of the first one.
    pub fn use_reference(
        &mut self,
        identity: &Identity,
        base: &BaseModel,
        index: usize,
    ) -> Result<()> {
        self.reference = identity.reference_latent(index, base.dtype, &base.device)?;
        Ok(())
    }

    /// The positive context with the learned token at `*` (`[1, 77, C]`).
    pub fn cond_context(&self) -> Tensor {
        self.cond.clone()
    }

    /// The negative context (`[1, 77, C]`).
    pub fn uncond_context(&self) -> Tensor {
        self.uncond.clone()
    }

    /// Placeholder/EOT columns of the rows of a UNet call: the negative rows use their own EOT
    /// and the positive prompt's placeholder column.
    fn positions(&self, b: usize, branches: Branches) -> TokenPositions {
        let placeholder = self.positive.placeholder.unwrap_or(0);
        let cond = self.positive.positions(b, placeholder);
        match branches {
            Branches::Cond => cond,
            Branches::UncondCond => {
                let mut rows = self.negative.positions(b, placeholder);
                rows.placeholder.extend(cond.placeholder);
                rows.eot.extend(cond.eot);
                rows
            }
        }
    }
}

/// [`ModelDenoiser`] with an identity: the reference pass, then the x pass with Eq. 3 at every
/// host. With `lambda_att == 0` it is the base UNet with the identity's contexts.
pub struct PersonalizedDenoiser<'a> {
    pub base: ModelDenoiser<'a>,
    pub personalization: &'a Personalization,
    /// Reference features of the last `(t, branches, rows)`: they do not depend on `x`, so the
    /// tiles of one step share them.
    cached: Option<((usize, Branches, usize), ReferenceFeatures)>,
    reference_passes: usize,
}

impl<'a> PersonalizedDenoiser<'a> {
    /// `model`'s denoiser with the identity's positive (token) and negative contexts.
    pub fn new(model: &'a BaseModel, personalization: &'a Personalization) -> Result<Self> {
        Ok(PersonalizedDenoiser {
            base: ModelDenoiser {
                model,
                cond: personalization.cond_context(),
                uncond: personalization.uncond_context(),
            },
            personalization,
            cached: None,
            reference_passes: 0,
        })
    }

    /// How many reference passes ran so far.
    pub fn reference_passes(&self) -> usize {
        self.reference_passes
    }
}

impl VDenoiser for PersonalizedDenoiser<'_> {
    fn predict_v(
        &mut self,
        x_t: &Tensor,
        lq_latent: &Tensor,
        t_orig: usize,
        branches: Branches,
    ) -> Result<Tensor> {
        let p = self.personalization;
        let unet = PersonalizedUNet::new(&self.base.model.unet, &p.blocks, p.lambda_att);
        if p.lambda_att == 0.0 {
            return self.base.predict_with(
                x_t,
                lq_latent,
                t_orig,
                branches,
                &mut |x, inputs, _| unet.forward(x, inputs, None),
            );
        }
        let cached = &mut self.cached;
        let passes = &mut self.reference_passes;
        self.base
            .predict_with(x_t, lq_latent, t_orig, branches, &mut |x, inputs, b| {
                let rows = x.dim(0)?;
                let key = (t_orig, branches, rows);
                if cached.as_ref().map(|(k, _)| *k) != Some(key) {
                    let reference = p.reference.repeat((rows, 1, 1, 1))?;
                    let refs = unet.reference_features(
                        &reference,
                        inputs.timesteps,
                        inputs.context,
                        &p.positions(b, branches),
                    )?;
                    *passes += 1;
                    *cached = Some((key, refs));
                }
                let refs = cached.as_ref().map(|(_, r)| r);
                unet.forward(x, inputs, refs)
            })
    }
}
