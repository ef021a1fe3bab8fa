//! [`Restorer`]: one image end to end, as StableSR's tile script runs it.

use super::denoisers::{ModelDenoiser, Personalization, PersonalizedDenoiser};
use super::settings::{
    auto_tile_batch, bytes_per_unet_row, check_native_size, RestorePlan, RestoreSettings,
    SamplingWork, TargetSize,
};
use crate::diffusion::canvas::{CanvasSampler, Tiling};
use crate::diffusion::noise::{NoiseSource, SeededNoise};
use crate::diffusion::sampler::{Branches, DdpmSampler, SampleOptions, StepProgress, VDenoiser};
use crate::error::{Error, Result};
use crate::imaging::patches::{patches, PatchBlender};
use crate::imaging::tensor::{
    image_to_tensor, pad_reflect_to_multiple, resize_bicubic_nchw, tensor_to_image,
};
use crate::imaging::ImageF32;
use crate::model::base::{BaseModel, CfwModel};
use candle_core::{DType, Tensor};
use std::cell::Cell;

/// Everything loaded once per batch.
pub struct Restorer<'a> {
    pub base: &'a BaseModel,
    pub cfw: &'a CfwModel,
    pub settings: RestoreSettings,
    sampler: DdpmSampler,
    /// Latent tiling, with the tiles per UNet call resolved for the device.
    tiling: Tiling,
    cond: Tensor,
    uncond: Tensor,
    personalization: Option<Personalization>,
    /// UNet calls made so far (what [`SamplingWork::unet_calls`] predicts).
    unet_calls: Cell<usize>,
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
        base.require_networks()?;
        if settings.steps == 0 || settings.steps > base.config.diffusion.timesteps {
            return Err(Error::Input(format!(
                "--steps {}: must be between 1 and {}",
                settings.steps, base.config.diffusion.timesteps
            )));
        }
        let native = settings
            .native_size
            .unwrap_or(base.config.diffusion.image_size);
        check_native_size(native)?;
        let tile = native / base.config.vae.downsample_factor();
        if tile == 0 || !native.is_multiple_of(base.config.vae.downsample_factor()) {
            return Err(Error::Input(format!(
                "--input-size {native}: must be a positive multiple of {}",
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
        let tiles_per_batch = settings.tile_batch.unwrap_or_else(|| {
            let rows = match Branches::for_guidance(Some(settings.guidance)) {
                Branches::Cond => 1,
                Branches::UncondCond => 2,
            };
            // The weights are loaded by now, so free memory is what sampling can use.
            auto_tile_batch(
                crate::device::free_memory(&base.device),
                bytes_per_unet_row(base.config.unet.model_channels, tile),
                rows,
            )
        });
        let tiling = Tiling {
            tile_size: tile,
            tile_overlap: settings.tile_overlap,
            tiles_per_batch,
        };
        Ok(Restorer {
            base,
            cfw,
            settings,
            sampler,
            tiling,
            cond,
            uncond,
            personalization: None,
            unet_calls: Cell::new(0),
        })
    }

    /// Restores with `personalization`: its contexts replace `cond` / `uncond`.
    pub fn with_personalization(mut self, personalization: Personalization) -> Result<Self> {
        self.cond = personalization.cond_context();
        self.uncond = personalization.uncond_context();
        self.personalization = Some(personalization);
        Ok(self)
    }

    /// The text context of a prompt through the frozen text encoder.
    pub fn text_context(base: &BaseModel, prompt: &str) -> Result<Tensor> {
        let ids = base.tokenizer.encode(prompt)?;
        let ids = Tensor::new(ids.as_slice(), &base.device)?.unsqueeze(0)?;
        Ok(base.text_encoder()?.forward(&ids)?)
    }

    /// The latent tiling: tile size, overlap and tiles per UNet call.
    pub fn tiling(&self) -> Tiling {
        self.tiling
    }

    /// UNet calls made so far by this restorer.
    pub fn unet_calls(&self) -> usize {
        self.unet_calls.get()
    }

    /// The size plan and sampling work of restoring a `width x height` image to `target`,
    /// before any compute.
    pub fn work(
        &self,
        width: usize,
        height: usize,
        target: TargetSize,
    ) -> Result<(RestorePlan, SamplingWork)> {
        let plan =
            self.settings
                .plan(self.base.config.diffusion.image_size, width, height, target)?;
        let work = self.settings.work(
            &plan,
            self.base.config.vae.downsample_factor(),
            &self.tiling,
        )?;
        Ok((plan, work))
    }

    /// Restores an RGB image in [0, 1] to `target`. `on_step(done, total)` reports progress over
    /// all patches: after every step, and with the steps done so far when a patch's sampling
    /// starts (so `done == 0` marks the start of the first step).
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
        let calls = &self.unet_calls;
        let mut counted = |x: &Tensor, lq: &Tensor, t: usize, branches: Branches| {
            calls.set(calls.get() + 1);
            denoiser.predict_v(x, lq, t, branches)
        };
        let (_, _, lh, lw) = init_latent.dims4()?;
        on_step(0);
        let mut progress = |p: &StepProgress| on_step(p.done);
        // The same decision the work plan counts with (`Tiling::fits_one_tile`).
        let latent = if self.tiling.fits_one_tile(lh, lw) {
            self.sampler
                .sample(&mut counted, &init_latent, noise, &opts, &mut progress)?
                .latent
        } else {
            CanvasSampler::new(&self.sampler, self.tiling)?
                .sample(&mut counted, &init_latent, noise, &opts, &mut progress)?
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
