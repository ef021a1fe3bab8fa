//! The restoration pipeline of `pfstorer restore`, reading straight through:
//! image -> bicubic upscale -> pad -> (pixel patches when large) -> VAE encode -> DDPM over
//! latent tiles with classifier-free guidance -> CFW decode -> colour fix -> crop -> resize.
//!
//! It follows StableSR's tile script (`sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py`): the
//! LQ latent comes from the diffusion checkpoint's VAE, the fusion features from the CFW
//! encoder, sampling starts from the LQ latent noised to t = 999, images above 1280 px are
//! processed in 1280-px patches with stride 1000 blended with Gaussian weights, and each patch
//! restarts the random sequence from the seed.

use crate::diffusion::canvas::{CanvasSampler, Tiling};
use crate::diffusion::noise::{NoiseSource, SeededNoise};
use crate::diffusion::sampler::{Branches, DdpmSampler, SampleOptions, StepProgress, VDenoiser};
use crate::error::{Error, Result};
use crate::imaging::colorfix::ColorFix;
use crate::imaging::patches::{patches, PatchBlender};
use crate::imaging::ImageF32;
use crate::model::adapter::{PersonalizationBlock, TokenPositions};
use crate::model::base::{BaseModel, CfwModel};
use crate::model::unet::UNetInputs;
use crate::personalize::dual_stream::{PersonalizedUNet, ReferenceFeatures};
use crate::personalize::host_specs;
use crate::personalize::identity::Identity;
use crate::personalize::token::PromptTokens;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;

/// The paper's prompts. `*` stands for the identity's learned token; the base model without an
/// identity gets the positive prompt with `*` replaced by [`BASE_SUBJECT`].
pub const DEFAULT_PROMPT: &str =
    "a Photo of *, masterpiece, best quality, realistic, very clear, professional";
pub const DEFAULT_NEGATIVE_PROMPT: &str =
    "3d, cartoon, anime, sketches, worst quality, low quality";
/// What `*` becomes without an identity ("person", the learned token's initialisation word).
pub const BASE_SUBJECT: &str = "person";

/// How large the output should be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TargetSize {
    /// Multiply both sides (fractional allowed).
    Scale(f64),
    /// Exact width and height.
    Size(usize, usize),
    /// Longest side in pixels, aspect kept.
    LongSide(usize),
}

impl TargetSize {
    /// Output `(width, height)` for an input of `width x height` (sizes truncate like the
    /// reference's `int()`).
    pub fn output_size(&self, width: usize, height: usize) -> Result<(usize, usize)> {
        let (w, h) = match *self {
            TargetSize::Scale(s) => {
                if !(s.is_finite() && s > 0.0) {
                    return Err(Error::Input(format!(
                        "--scale {s}: must be a positive number"
                    )));
                }
                ((width as f64 * s) as usize, (height as f64 * s) as usize)
            }
            TargetSize::Size(w, h) => (w, h),
            TargetSize::LongSide(n) => {
                let s = n as f64 / width.max(height) as f64;
                (
                    (width as f64 * s).round() as usize,
                    (height as f64 * s).round() as usize,
                )
            }
        };
        if w == 0 || h == 0 {
            return Err(Error::Input(format!("output size {w}x{h} is empty")));
        }
        Ok((w, h))
    }
}

/// Sampling and post-processing settings, with the defaults of `pfstorer restore`.
#[derive(Debug, Clone)]
pub struct RestoreSettings {
    pub steps: usize,
    /// Classifier-free guidance scale (paper Eq. 9); 1 disables the negative branch.
    pub guidance: f64,
    pub seed: u64,
    /// CFW fusion weight of the decoder.
    pub dec_w: f64,
    pub color_fix: ColorFix,
    /// Overlap of latent tiles, in latents.
    pub tile_overlap: usize,
    /// Pixel patch size and stride above which an image is processed in patches.
    pub patch_size: usize,
    pub patch_stride: usize,
    /// The model's native image size in pixels (short sides below it are processed at it, and
    /// latent tiles are this size over the VAE's downsampling factor); `None` takes
    /// `image_size` of the diffusion config.
    pub native_size: Option<usize>,
    /// Largest image, in pixels, processed at once (after upscaling and padding); larger
    /// requests are refused before any compute. Bounds the image buffers (about
    /// [`BYTES_PER_PROCESSED_PIXEL`] each pixel); the networks' memory is bounded by the patch
    /// size.
    pub max_pixels: usize,
}

/// Default of [`RestoreSettings::max_pixels`]: 64 megapixels (e.g. 8192x8192, a 4x upscale
/// of a 2048x2048 photo).
pub const DEFAULT_MAX_PIXELS: usize = 64_000_000;

/// Image buffers held per processed pixel: the upscaled and padded input, the patch blender's
/// sum and weights, the result and its crops (f32 RGB, 12 bytes each).
pub const BYTES_PER_PROCESSED_PIXEL: usize = 96;

/// Largest native size (`--input-size`, `image_size`) accepted: the released model's is 512,
/// and one latent tile of this size is what every UNet call holds.
pub const MAX_NATIVE_SIZE: usize = 2048;

/// The sizes one image goes through, known before any compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestorePlan {
    pub out_w: usize,
    pub out_h: usize,
    /// The size it is processed at (short side at least the native size).
    pub proc_w: usize,
    pub proc_h: usize,
    /// `proc` padded to a multiple of 32.
    pub padded_w: usize,
    pub padded_h: usize,
    /// Pixel patches (1 when the padded image fits one patch).
    pub patches: usize,
}

impl RestoreSettings {
    /// The sizes of restoring a `width x height` image to `target` with the model's native
    /// size `native`, or why it cannot be done within [`RestoreSettings::max_pixels`].
    pub fn plan(
        &self,
        native: usize,
        width: usize,
        height: usize,
        target: TargetSize,
    ) -> Result<RestorePlan> {
        let native = self.native_size.unwrap_or(native);
        if native == 0 || native > MAX_NATIVE_SIZE {
            return Err(Error::Input(format!(
                "--input-size {native}: must be between 1 and {MAX_NATIVE_SIZE} pixels (the released model's is 512)"
            )));
        }
        let (out_w, out_h) = target.output_size(width, height)?;
        let up = (native as f64 / out_w.min(out_h) as f64).max(1.0);
        let (proc_w, proc_h) = ((out_w as f64 * up) as usize, (out_h as f64 * up) as usize);
        let (padded_w, padded_h) = (proc_w.div_ceil(32) * 32, proc_h.div_ceil(32) * 32);
        let pixels = (padded_w as u128) * (padded_h as u128);
        if pixels > self.max_pixels as u128 {
            return Err(Error::Input(format!(
                "restoring to {out_w}x{out_h} means processing {padded_w}x{padded_h} pixels ({:.0} MP, about {:.1} GB of image buffers), more than the limit of {:.0} MP; lower --scale/--size/--long-side or raise --max-megapixels",
                pixels as f64 / 1e6,
                pixels as f64 * BYTES_PER_PROCESSED_PIXEL as f64 / 1e9,
                self.max_pixels as f64 / 1e6
            )));
        }
        let patches = if padded_w <= self.patch_size && padded_h <= self.patch_size {
            1
        } else {
            patches(padded_h, padded_w, self.patch_size, self.patch_stride).len()
        };
        Ok(RestorePlan {
            out_w,
            out_h,
            proc_w,
            proc_h,
            padded_w,
            padded_h,
            patches,
        })
    }

    /// Refuses values no restoration can use: non-finite or out-of-range scalars.
    pub fn validate(&self) -> Result<()> {
        if !(self.guidance.is_finite() && (0.0..=100.0).contains(&self.guidance)) {
            return Err(Error::Input(format!(
                "--cfg {}: must be a number between 0 and 100 (1 turns guidance off)",
                self.guidance
            )));
        }
        if !(self.dec_w.is_finite() && (0.0..=1.0).contains(&self.dec_w)) {
            return Err(Error::Input(format!(
                "--dec-w {}: must be between 0 and 1",
                self.dec_w
            )));
        }
        if self.max_pixels == 0 {
            return Err(Error::Input("--max-megapixels: must be positive".into()));
        }
        Ok(())
    }
}

impl Default for RestoreSettings {
    fn default() -> Self {
        RestoreSettings {
            steps: 200,
            guidance: 4.0,
            seed: 42,
            dec_w: 0.5,
            color_fix: ColorFix::Adain,
            tile_overlap: 32,
            patch_size: 1280,
            patch_stride: 1000,
            native_size: None,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

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
    pub name: String,
    pub base_fingerprint: String,
}

impl Personalization {
    /// Prepares `identity` for `base`, whose weights have `fingerprint` (see
    /// [`crate::personalize::identity::base_fingerprint`]); an identity trained on another base
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
        Ok(Personalization {
            blocks,
            reference,
            lambda_att,
            positive: PromptTokens::positive(&base.tokenizer, prompt)?,
            negative: PromptTokens::plain(&base.tokenizer, negative_prompt)?,
            token: identity.token(&base.device)?.to_dtype(base.dtype)?,
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
    pub fn cond_context(&self, base: &BaseModel) -> Result<Tensor> {
        self.positive.context(&base.text_encoder, Some(&self.token))
    }

    /// The negative context (`[1, 77, C]`).
    pub fn uncond_context(&self, base: &BaseModel) -> Result<Tensor> {
        self.negative.context(&base.text_encoder, None)
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
                cond: personalization.cond_context(model)?,
                uncond: personalization.uncond_context(model)?,
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

/// Everything loaded once per batch.
pub struct Restorer<'a> {
    pub base: &'a BaseModel,
    pub cfw: &'a CfwModel,
    pub settings: RestoreSettings,
    sampler: DdpmSampler,
    cond: Tensor,
    uncond: Tensor,
    personalization: Option<Personalization>,
}

impl<'a> Restorer<'a> {
    /// `cond` / `uncond` are the `[1, 77, d]` text contexts (see [`Restorer::text_context`]).
    pub fn new(
        base: &'a BaseModel,
        cfw: &'a CfwModel,
        settings: RestoreSettings,
        cond: Tensor,
        uncond: Tensor,
    ) -> Result<Self> {
        settings.validate()?;
        if settings.steps == 0 || settings.steps > base.config.diffusion.timesteps {
            return Err(Error::Input(format!(
                "--steps {}: must be between 1 and {}",
                settings.steps, base.config.diffusion.timesteps
            )));
        }
        let native = settings
            .native_size
            .unwrap_or(base.config.diffusion.image_size);
        let tile = native / base.config.vae.downsample_factor();
        if tile == 0
            || native > MAX_NATIVE_SIZE
            || !native.is_multiple_of(base.config.vae.downsample_factor())
        {
            return Err(Error::Input(format!(
                "--input-size {native}: must be a positive multiple of {} up to {MAX_NATIVE_SIZE}",
                base.config.vae.downsample_factor()
            )));
        }
        if settings.tile_overlap >= tile {
            return Err(Error::Input(format!(
                "--tile-overlap {}: must be smaller than the latent tile ({tile})",
                settings.tile_overlap
            )));
        }
        if settings.patch_stride == 0
            || settings.patch_stride > settings.patch_size
            || !settings.patch_size.is_multiple_of(32)
        {
            return Err(Error::Input(format!(
                "--patch-size {} / --patch-stride {}: the size must be a multiple of 32 and the stride between 1 and the size",
                settings.patch_size, settings.patch_stride
            )));
        }
        let sampler = DdpmSampler::new(&base.config.diffusion, settings.steps)?;
        Ok(Restorer {
            base,
            cfw,
            settings,
            sampler,
            cond,
            uncond,
            personalization: None,
        })
    }

    /// Restores with `personalization`: its contexts replace `cond` / `uncond`.
    pub fn with_personalization(mut self, personalization: Personalization) -> Result<Self> {
        self.cond = personalization.cond_context(self.base)?;
        self.uncond = personalization.uncond_context(self.base)?;
        self.personalization = Some(personalization);
        Ok(self)
    }

    /// The text context of a prompt through the frozen text encoder.
    pub fn text_context(base: &BaseModel, prompt: &str) -> Result<Tensor> {
        let ids = base.tokenizer.encode(prompt)?;
        let ids = Tensor::new(ids.as_slice(), &base.device)?.unsqueeze(0)?;
        base.text_encoder.forward(&ids)
    }

    /// Latent tile size: the model's native image size in latents (64 for 512 px).
    fn latent_tile(&self) -> usize {
        self.native_size() / self.base.config.vae.downsample_factor()
    }

    fn native_size(&self) -> usize {
        self.settings
            .native_size
            .unwrap_or(self.base.config.diffusion.image_size)
    }

    /// Restores an RGB image in [0, 1] to `target`. `on_step(done, total)` reports progress over
    /// all patches.
    pub fn restore(
        &self,
        rgb: &ImageF32,
        target: TargetSize,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<ImageF32> {
        // Process at the output size, or larger so the short side reaches the model's native
        // size (as the reference), and resize back at the end.
        let plan = self.settings.plan(
            self.base.config.diffusion.image_size,
            rgb.width,
            rgb.height,
            target,
        )?;
        let (out_w, out_h, proc_w, proc_h) = (plan.out_w, plan.out_h, plan.proc_w, plan.proc_h);
        let device = &self.base.device;
        let lq = image_to_tensor(rgb, device)?;
        let lq = resize_bicubic_nchw(&lq, proc_h, proc_w)?.clamp(-1f32, 1f32)?;
        let seed = self.settings.seed;
        let mut seeded = || -> Box<dyn NoiseSource> { Box::new(SeededNoise::new(seed)) };
        let sr = self.restore_upscaled(&lq, &mut seeded, on_step)?;
        // Checked before the clamp, which would turn NaN into a black picture reported as
        // done: a poisoned weight, identity or flag ends here with an error instead.
        let values: Vec<f32> = sr.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(Error::Input(
                "the restoration produced non-finite values (NaN or infinity); the weights, the identity or a setting is corrupt, nothing was written".into(),
            ));
        }
        drop(values);
        let sr = ((sr + 1.0)? / 2.0)?.clamp(0f32, 1f32)?;
        let sr = if (proc_w, proc_h) != (out_w, out_h) {
            resize_bicubic_nchw(&sr, out_h, out_w)?.clamp(0f32, 1f32)?
        } else {
            sr
        };
        tensor_to_image(&sr)
    }

    /// The tile script from its upscaled LQ `[1, 3, H, W]` in [-1, 1]: reflect-pads the bottom
    /// and right to a multiple of 32, restores (in pixel patches when large), crops back to
    /// `H x W`; the result is in [-1, 1]. `new_noise` starts each patch's random sequence (the
    /// reference re-seeds before every patch).
    pub fn restore_upscaled(
        &self,
        lq: &Tensor,
        new_noise: &mut dyn FnMut() -> Box<dyn NoiseSource>,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let (_, _, h, w) = lq.dims4()?;
        let padded = pad_reflect_to_multiple(lq, 32)?;
        let sr = self.restore_padded(&padded, new_noise, on_step)?;
        Ok(sr.narrow(2, 0, h)?.narrow(3, 0, w)?)
    }

    /// Restores a padded `[1, 3, H, W]` LQ in [-1, 1]; returns the result in [-1, 1].
    fn restore_padded(
        &self,
        lq: &Tensor,
        new_noise: &mut dyn FnMut() -> Box<dyn NoiseSource>,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let (b, c, h, w) = lq.dims4()?;
        let s = &self.settings;
        if h <= s.patch_size && w <= s.patch_size {
            let mut noise = new_noise();
            return self.restore_piece(lq, noise.as_mut(), &mut |d| on_step(d, s.steps));
        }
        let pieces = patches(h, w, s.patch_size, s.patch_stride);
        let total = pieces.len() * s.steps;
        let mut blender = PatchBlender::new(b, c, h, w, lq.device())?;
        for (k, p) in pieces.iter().enumerate() {
            let piece = lq.narrow(2, p.y, p.h)?.narrow(3, p.x, p.w)?;
            let mut noise = new_noise();
            let out = self.restore_piece(&piece, noise.as_mut(), &mut |d| {
                on_step(k * s.steps + d, total)
            })?;
            blender.add(*p, &out)?;
        }
        Ok(blender.finish()?)
    }

    /// One piece: encode, sample over latent tiles, decode with CFW, colour fix.
    fn restore_piece(
        &self,
        lq: &Tensor,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Tensor> {
        let base = self.base;
        let dtype = base.dtype;
        let scale = base.config.diffusion.scale_factor;
        let lq_model = lq.to_dtype(dtype)?;
        let posterior = base.vae.encode(&lq_model)?;
        let eps = noise.next(posterior.mean.dims(), &base.device)?;
        let init_latent = (posterior
            .sample(&eps.to_dtype(dtype)?)?
            .to_dtype(DType::F32)?
            * scale)?;

        let mut base_denoiser;
        let mut personalized;
        let denoiser: &mut dyn VDenoiser = match &self.personalization {
            None => {
                base_denoiser = ModelDenoiser {
                    model: base,
                    cond: self.cond.clone(),
                    uncond: self.uncond.clone(),
                };
                &mut base_denoiser
            }
            Some(p) => {
                personalized = PersonalizedDenoiser::new(base, p)?;
                &mut personalized
            }
        };
        let opts = SampleOptions {
            guidance_scale: Some(self.settings.guidance),
            record_steps: false,
        };
        let tile = self.latent_tile();
        let tiling = Tiling {
            tile_size: tile,
            tile_overlap: self.settings.tile_overlap,
            tiles_per_batch: 1,
        };
        let mut progress = |p: &StepProgress| on_step(p.done);
        let (_, _, lh, lw) = init_latent.dims4()?;
        let latent = if lh <= tile && lw <= tile {
            self.sampler
                .sample(denoiser, &init_latent, noise, &opts, &mut progress)?
                .latent
        } else {
            CanvasSampler::new(&self.sampler, tiling)?
                .sample(denoiser, &init_latent, noise, &opts, &mut progress)?
                .latent
        };
        let cfw_dtype = self.cfw.dtype;
        let (_, enc_features) = self
            .cfw
            .autoencoder
            .encode_with_features(&lq.to_dtype(cfw_dtype)?)?;
        let z = (latent / scale)?.to_dtype(cfw_dtype)?;
        let decoded = self
            .cfw
            .autoencoder
            .decode_fused(&z, &enc_features, self.settings.dec_w)?
            .to_dtype(DType::F32)?;
        self.settings.color_fix.apply(&decoded, lq)
    }
}

/// PyTorch `F.interpolate(mode="bicubic", align_corners=False)` of an NCHW tensor (on the CPU).
pub fn resize_bicubic_nchw(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let data: Vec<f32> = x
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    let out = crate::imaging::resize::resize_bicubic_torch(&data, b * c, h, w, out_h, out_w)?;
    Ok(Tensor::from_vec(out, (b, c, out_h, out_w), &Device::Cpu)?.to_device(x.device())?)
}

/// HWC RGB [0, 1] image -> `[1, 3, H, W]` tensor in [-1, 1].
pub fn image_to_tensor(img: &ImageF32, device: &Device) -> Result<Tensor> {
    if img.channels != 3 {
        return Err(Error::Input(format!(
            "expected an RGB image, got {} channels",
            img.channels
        )));
    }
    let t = Tensor::from_vec(img.data.clone(), (img.height, img.width, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?;
    Ok(((t * 2.0)? - 1.0)?.to_device(device)?)
}

/// `[1, C, H, W]` in [0, 1] -> HWC image.
pub fn tensor_to_image(t: &Tensor) -> Result<ImageF32> {
    let (_, c, h, w) = t.dims4()?;
    let data: Vec<f32> = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .squeeze(0)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1()?;
    Ok(ImageF32::new(w, h, c, data))
}

/// Reflect-pads the bottom and right to a multiple of `m` (no padding when already aligned).
pub fn pad_reflect_to_multiple(x: &Tensor, m: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let pad_h = (m - h % m) % m;
    let pad_w = (m - w % m) % m;
    let x = reflect_pad_end(x, 2, pad_h)?;
    reflect_pad_end(&x, 3, pad_w)
}

/// Appends `pad` reflected rows/columns (edge not repeated, as torch's `reflect`).
fn reflect_pad_end(x: &Tensor, dim: usize, pad: usize) -> Result<Tensor> {
    if pad == 0 {
        return Ok(x.clone());
    }
    let n = x.dim(dim)?;
    if pad >= n {
        return Err(Error::Input(format!(
            "image side {n} too small to reflect-pad by {pad}"
        )));
    }
    let idx: Vec<u32> = (0..pad).map(|i| (n - 2 - i) as u32).collect();
    let idx = Tensor::new(idx.as_slice(), x.device())?;
    Ok(Tensor::cat(&[x.clone(), x.index_select(&idx, dim)?], dim)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_sizes() {
        assert_eq!(
            TargetSize::Scale(4.0).output_size(32, 24).unwrap(),
            (128, 96)
        );
        // Fractional scales truncate like the reference's int().
        assert_eq!(
            TargetSize::Scale(2.5).output_size(33, 21).unwrap(),
            (82, 52)
        );
        assert_eq!(
            TargetSize::Size(2048, 1536).output_size(10, 10).unwrap(),
            (2048, 1536)
        );
        assert_eq!(
            TargetSize::LongSide(1000).output_size(400, 300).unwrap(),
            (1000, 750)
        );
        assert_eq!(
            TargetSize::LongSide(1000).output_size(300, 400).unwrap(),
            (750, 1000)
        );
        assert!(TargetSize::Scale(0.0).output_size(32, 24).is_err());
        assert!(TargetSize::Scale(f64::NAN).output_size(32, 24).is_err());
        assert!(
            TargetSize::Scale(0.01).output_size(32, 24).is_err(),
            "empty output"
        );
    }

    #[test]
    fn reflect_padding_matches_torch_reflect() {
        let x = Tensor::arange(0f32, 5., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 5))
            .unwrap();
        let x = Tensor::cat(&[&x, &x, &x], 2).unwrap();
        let padded = pad_reflect_to_multiple(&x, 4).unwrap();
        assert_eq!(padded.dims(), &[1, 1, 4, 8]);
        // torch refuses a reflect pad as large as the side; so does pfstorer, with an error.
        let two_rows = x.narrow(2, 0, 2).unwrap();
        assert!(pad_reflect_to_multiple(&two_rows, 4).is_err());
        let row: Vec<f32> = padded
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        // torch.nn.functional.pad(..., (0, 3), mode="reflect") of [0,1,2,3,4]
        assert_eq!(row, vec![0., 1., 2., 3., 4., 3., 2., 1.]);
    }
}
