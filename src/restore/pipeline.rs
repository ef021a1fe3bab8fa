//! [`Restorer`]: one image end to end, as StableSR's tile script runs it.

use super::denoisers::{ModelDenoiser, Personalization, PersonalizedDenoiser};
use super::networks::{Held, Networks, StagedNetworks};
use super::settings::{
    auto_tile_batch, bytes_per_unet_row, check_native_size, default_tile_overlap, RestorePlan,
    RestoreSettings, SamplingWork, TargetSize,
};
use crate::config::BaseModelConfig;
use crate::diffusion::canvas::{CanvasSampler, Tiling};
use crate::diffusion::noise::{BatchedNoise, NoiseSource, SeededNoise};
use crate::diffusion::sampler::{Branches, DdpmSampler, SampleOptions, StepProgress, VDenoiser};
use crate::error::{Error, Result};
use crate::imaging::patches::{patches, Patch, PatchBlender};
use crate::imaging::tensor::{
    image_to_tensor, pad_reflect_to_multiple, resize_bicubic_nchw, tensor_to_image,
};
use crate::imaging::ImageF32;
use crate::model::base::{BaseModel, CfwModel, Network};
use candle_core::{DType, Device, Tensor};
use std::cell::{Cell, RefCell};
use std::time::Instant;

/// Which text and image conditioning a crop is sampled with.
#[derive(Clone, Copy)]
pub enum Conditioning<'p> {
    /// The restorer's own: its identity when it has one, else the base model.
    Configured,
    /// The base model's prompt, whatever identity the restorer has.
    Base,
    /// This identity.
    Identity(&'p Personalization),
}

/// One face crop for [`Restorer::restore_crops`].
pub struct FaceCrop<'p> {
    /// The aligned crop, RGB in [0, 1]; restored at its own size.
    pub image: &'p ImageF32,
    pub conditioning: Conditioning<'p>,
    /// The crop's random sequence starts from this seed.
    pub seed: u64,
}

/// A restored `[1, 3, H, W]` tensor in [-1, 1] at the processing size to an image in [0, 1] at
/// the output size. Non-finite values are checked before the clamp, which would turn NaN into a
/// black picture reported as done: a poisoned weight, identity or flag ends here with an error.
fn finish_image(sr: &Tensor, proc: (usize, usize), out: (usize, usize)) -> Result<ImageF32> {
    let values: Vec<f32> = sr.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::Input(
            "the restoration produced non-finite values (NaN or infinity); the weights, the identity or a setting is corrupt, nothing was written".into(),
        ));
    }
    drop(values);
    let sr = ((sr + 1.0)? / 2.0)?.clamp(0f32, 1f32)?;
    let sr = if proc != out {
        resize_bicubic_nchw(&sr, out.1, out.0)?.clamp(0f32, 1f32)?
    } else {
        sr
    };
    tensor_to_image(&sr)
}

/// Everything set up once per batch.
pub struct Restorer<'a> {
    networks: Networks<'a>,
    /// The diffusion model's configuration and device.
    config: BaseModelConfig,
    device: Device,
    pub settings: RestoreSettings,
    sampler: DdpmSampler,
    /// Latent tiling, with the tiles per UNet call resolved for the device.
    tiling: Tiling,
    cond: Tensor,
    uncond: Tensor,
    personalization: Option<Personalization>,
    /// UNet calls made so far (what [`SamplingWork::unet_calls`] predicts).
    unet_calls: Cell<usize>,
    seconds: Cell<StageSeconds>,
    /// Called as each stage starts, before its networks are loaded (benchmarks).
    stage_hook: RefCell<Option<StageHook>>,
}

/// The stages of restoring an image, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// LQ image to latent (VAE encoder).
    Encode,
    /// The DDPM loop (UNet and time-aware encoder).
    Sample,
    /// CFW decode and colour fix.
    Decode,
}

/// A callback at the start of each stage (see [`Restorer::on_stage`]).
pub type StageHook = Box<dyn FnMut(Stage)>;

/// Wall seconds a restorer has spent so far in each stage, over all images and pieces.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageSeconds {
    /// Loading networks at the start of a stage (staged restorers only).
    pub load: f64,
    /// VAE encoding of the LQ.
    pub encode: f64,
    /// Sampling.
    pub sample: f64,
    /// CFW encoding and decoding, colour fix.
    pub decode: f64,
}

impl<'a> Restorer<'a> {
    /// A restorer over networks loaded once for the batch. `cond` / `uncond` are the
    /// `[1, 77, d]` text contexts (see [`Restorer::text_context`]).
    pub fn new(
        base: &'a BaseModel,
        cfw: &'a CfwModel,
        settings: RestoreSettings,
        cond: Tensor,
        uncond: Tensor,
    ) -> Result<Self> {
        base.require_networks()?;
        // The weights are loaded by now, so free memory is what sampling can use.
        let free = crate::device::free_memory(&base.device);
        Self::build(
            Networks::Resident { base, cfw },
            base.config.clone(),
            base.device.clone(),
            free,
            settings,
            (cond, uncond),
        )
    }

    /// A restorer that loads each stage's networks when it starts and frees them after it
    /// (see [`Networks::Staged`]).
    pub fn staged(
        staged: StagedNetworks,
        settings: RestoreSettings,
        cond: Tensor,
        uncond: Tensor,
    ) -> Result<Self> {
        // Sampling will have its networks loaded beside whatever runs now.
        let free = crate::device::free_memory(&staged.device)
            .map(|f| f.saturating_sub(staged.sampling_weight_bytes() as u64));
        let config = staged.base_config.clone();
        let device = staged.device.clone();
        Self::build(
            Networks::Staged(staged),
            config,
            device,
            free,
            settings,
            (cond, uncond),
        )
    }

    fn build(
        networks: Networks<'a>,
        config: BaseModelConfig,
        device: Device,
        free_memory: Option<u64>,
        settings: RestoreSettings,
        (cond, uncond): (Tensor, Tensor),
    ) -> Result<Self> {
        settings.validate()?;
        if settings.steps == 0 || settings.steps > config.diffusion.timesteps {
            return Err(Error::Input(format!(
                "--steps {}: must be between 1 and {}",
                settings.steps, config.diffusion.timesteps
            )));
        }
        let native = settings.native_size.unwrap_or(config.diffusion.image_size);
        check_native_size(native)?;
        let tile = native / config.vae.downsample_factor();
        if tile == 0 || !native.is_multiple_of(config.vae.downsample_factor()) {
            return Err(Error::Input(format!(
                "--input-size {native}: must be a positive multiple of {}",
                config.vae.downsample_factor()
            )));
        }
        let tile_overlap = settings
            .tile_overlap
            .unwrap_or_else(|| default_tile_overlap(tile));
        if tile_overlap >= tile {
            return Err(Error::Input(format!(
                "--tile-overlap {tile_overlap}: must be smaller than the latent tile ({tile})"
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
        let sampler = DdpmSampler::new(&config.diffusion, settings.steps)?;
        let tiles_per_batch = settings.tile_batch.unwrap_or_else(|| {
            let rows = match Branches::for_guidance(Some(settings.guidance)) {
                Branches::Cond => 1,
                Branches::UncondCond => 2,
            };
            auto_tile_batch(
                free_memory,
                bytes_per_unet_row(config.unet.model_channels, tile),
                rows,
            )
        });
        let tiling = Tiling {
            tile_size: tile,
            tile_overlap,
            tiles_per_batch,
        };
        Ok(Restorer {
            networks,
            config,
            device,
            settings,
            sampler,
            tiling,
            cond,
            uncond,
            personalization: None,
            unet_calls: Cell::new(0),
            seconds: Cell::new(StageSeconds::default()),
            stage_hook: RefCell::new(None),
        })
    }

    /// Whether each stage loads its own networks (see [`Restorer::staged`]).
    pub fn is_staged(&self) -> bool {
        matches!(self.networks, Networks::Staged(_))
    }

    /// Restores with `personalization` by default (its own contexts; the base contexts stay
    /// for crops restored with [`Conditioning::Base`]).
    pub fn with_personalization(mut self, personalization: Personalization) -> Result<Self> {
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

    /// Seconds spent so far in each stage.
    pub fn stage_seconds(&self) -> StageSeconds {
        self.seconds.get()
    }

    /// Calls `hook` as each stage starts, before its networks load and after the previous
    /// stage's memory was returned (e.g. to take each stage's peak memory).
    pub fn on_stage(&self, hook: StageHook) {
        *self.stage_hook.borrow_mut() = Some(hook);
    }

    /// A stage's networks, the time taken counted as loading when they were loaded for it.
    fn loaded<'s, T>(
        &'s self,
        stage: Stage,
        get: impl FnOnce(&'s Networks<'a>) -> Result<Held<'s, T>>,
    ) -> Result<Held<'s, T>> {
        let t = Instant::now();
        if self.is_staged() {
            // The previous stage's networks and activations are dropped by now.
            crate::allocator::release_freed_memory();
        }
        if let Some(hook) = self.stage_hook.borrow_mut().as_mut() {
            hook(stage);
        }
        let held = get(&self.networks)?;
        if matches!(held, Held::Loaded(_)) {
            self.count(t, |s| &mut s.load);
        }
        Ok(held)
    }

    /// Adds the time since `since` to one stage's count.
    fn count(&self, since: Instant, stage: fn(&mut StageSeconds) -> &mut f64) {
        let mut s = self.seconds.get();
        *stage(&mut s) += since.elapsed().as_secs_f64();
        self.seconds.set(s);
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
        let plan = self
            .settings
            .plan(self.config.diffusion.image_size, width, height, target)?;
        let work = self
            .settings
            .work(&plan, self.config.vae.downsample_factor(), &self.tiling)?;
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
        self.restore_as(rgb, target, Conditioning::Configured, on_step)
    }

    /// [`Restorer::restore`] with the given conditioning (a whole face crop matched to one of
    /// several identities).
    pub fn restore_as(
        &self,
        rgb: &ImageF32,
        target: TargetSize,
        who: Conditioning,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<ImageF32> {
        // Process at the output size, or larger so the short side reaches the model's native
        // size (as the reference), and resize back at the end.
        let plan = self.settings.plan(
            self.config.diffusion.image_size,
            rgb.width,
            rgb.height,
            target,
        )?;
        let (out_w, out_h, proc_w, proc_h) = (plan.out_w, plan.out_h, plan.proc_w, plan.proc_h);
        let device = &self.device;
        let lq = image_to_tensor(rgb, device)?;
        let lq = resize_bicubic_nchw(&lq, proc_h, proc_w)?.clamp(-1f32, 1f32)?;
        let seed = self.settings.seed;
        let mut seeded = || -> Box<dyn NoiseSource> { Box::new(SeededNoise::new(seed)) };
        let (_, _, h, w) = lq.dims4()?;
        let padded = pad_reflect_to_multiple(&lq, 32)?;
        let sr = self.restore_padded(&padded, &mut seeded, who, on_step)?;
        let sr = sr.narrow(2, 0, h)?.narrow(3, 0, w)?;
        finish_image(&sr, (proc_w, proc_h), (out_w, out_h))
    }

    /// Restores face crops (RGB, each at its own output size = its input size), each with its
    /// own conditioning and seed. Crops that fit one pixel patch go through the networks stage
    /// by stage together (every crop encoded, then every crop sampled, then every crop
    /// decoded), so staged networks load once per photo, not once per face, and crops of one
    /// identity are sampled in one UNet batch as far as the tiles per call allow (see
    /// `sampling_groups`); larger crops (`--face-size` above the patch size) take the tiled path
    /// one by one. `on_step(done, total)` counts steps over all crops.
    pub fn restore_crops(
        &self,
        crops: &[FaceCrop],
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<ImageF32>> {
        let native = self.config.diffusion.image_size;
        let steps = self.settings.steps;
        let total = crops.len() * steps;
        let mut prepared = Vec::with_capacity(crops.len());
        for crop in crops {
            let (w, h) = (crop.image.width, crop.image.height);
            let plan = self.settings.plan(native, w, h, TargetSize::Scale(1.0))?;
            let lq = image_to_tensor(crop.image, &self.device)?;
            let lq = resize_bicubic_nchw(&lq, plan.proc_h, plan.proc_w)?.clamp(-1f32, 1f32)?;
            let padded = pad_reflect_to_multiple(&lq, 32)?;
            prepared.push((plan, padded));
        }
        let s = &self.settings;
        let all_whole = prepared.iter().all(|(_, lq)| {
            let (_, _, h, w) = lq.dims4().unwrap_or((0, 0, usize::MAX, usize::MAX));
            h <= s.patch_size && w <= s.patch_size
        });
        let mut restored = Vec::with_capacity(crops.len());
        if all_whole {
            let mut started = Vec::with_capacity(crops.len());
            {
                let encoder = self.loaded(Stage::Encode, |n| n.vae_encoder())?;
                let t = Instant::now();
                for (crop, (_, lq)) in crops.iter().zip(&prepared) {
                    let mut noise: Box<dyn NoiseSource> = Box::new(SeededNoise::new(crop.seed));
                    started.push((Self::encode_piece(&encoder, lq, noise.as_mut())?, noise));
                }
                self.count(t, |s| &mut s.encode);
            }
            let mut latents: Vec<Option<Tensor>> = vec![None; crops.len()];
            {
                let sampling = self.loaded(Stage::Sample, |n| n.sampling())?;
                let t = Instant::now();
                let groups = self.sampling_groups(crops, &started)?;
                let mut started: Vec<Option<(Tensor, Box<dyn NoiseSource>)>> =
                    started.into_iter().map(Some).collect();
                let mut finished = 0;
                for group in groups {
                    let (inits, sources): (Vec<Tensor>, Vec<Box<dyn NoiseSource>>) =
                        group.iter().filter_map(|&i| started[i].take()).unzip();
                    let n = group.len();
                    let mut noise = BatchedNoise::new(sources);
                    let latent = self.sample_piece(
                        &sampling,
                        &Tensor::cat(&inits, 0)?,
                        &mut noise,
                        crops[group[0]].conditioning,
                        &mut |d| on_step(finished * steps + n * d, total),
                    )?;
                    for (row, &i) in group.iter().enumerate() {
                        latents[i] = Some(latent.narrow(0, row, 1)?);
                    }
                    finished += n;
                }
                self.count(t, |s| &mut s.sample);
            }
            // Every crop is in exactly one group (see `sampling_groups`).
            let latents = latents
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .expect("every crop sampled");
            let cfw = self.loaded(Stage::Decode, |n| n.cfw())?;
            let t = Instant::now();
            for (latent, (plan, lq)) in latents.iter().zip(&prepared) {
                let (_, _, h, w) = lq.dims4()?;
                let sr = self.decode_piece(&cfw, latent, lq)?;
                let sr = sr
                    .narrow(2, 0, h.min(plan.proc_h))?
                    .narrow(3, 0, w.min(plan.proc_w))?;
                restored.push(finish_image(
                    &sr,
                    (plan.proc_w, plan.proc_h),
                    (plan.out_w, plan.out_h),
                )?);
            }
            self.count(t, |s| &mut s.decode);
        } else {
            for (k, (crop, (plan, lq))) in crops.iter().zip(&prepared).enumerate() {
                let seed = crop.seed;
                let mut seeded = || -> Box<dyn NoiseSource> { Box::new(SeededNoise::new(seed)) };
                let sr = self.restore_padded(lq, &mut seeded, crop.conditioning, &mut |d, n| {
                    on_step(k * n + d, crops.len() * n)
                })?;
                let sr = sr.narrow(2, 0, plan.proc_h)?.narrow(3, 0, plan.proc_w)?;
                restored.push(finish_image(
                    &sr,
                    (plan.proc_w, plan.proc_h),
                    (plan.out_w, plan.out_h),
                )?);
            }
        }
        Ok(restored)
    }

    /// The identity a crop is sampled with (`None`: the base model).
    fn identity_of<'s>(&'s self, who: Conditioning<'s>) -> Option<&'s Personalization> {
        match who {
            Conditioning::Configured => self.personalization.as_ref(),
            Conditioning::Base => None,
            Conditioning::Identity(p) => Some(p),
        }
    }

    /// Which crops go through the UNet together, as indices into `crops`: crops with the same
    /// identity and latent size that fit one latent tile, up to the tiles per UNet call that
    /// the device's free memory allows (one on the CPU, where a batch saves no time but costs
    /// memory); every other crop alone. Groups are in the order of their first crop.
    fn sampling_groups<N>(
        &self,
        crops: &[FaceCrop],
        started: &[(Tensor, N)],
    ) -> Result<Vec<Vec<usize>>> {
        let per_call = self.tiling.tiles_per_batch.max(1);
        // (identity address, latent shape) of crops that may share a call; `None`: alone.
        type BatchKey = Option<(usize, Vec<usize>)>;
        let mut groups: Vec<(BatchKey, Vec<usize>)> = Vec::new();
        for (i, (crop, (init, _))) in crops.iter().zip(started).enumerate() {
            let (_, _, lh, lw) = init.dims4()?;
            // An identity is told apart by its address: two crops share a batch only when
            // they use the very same prepared identity.
            let who = self
                .identity_of(crop.conditioning)
                .map_or(0, |p| p as *const Personalization as usize);
            let key = self
                .tiling
                .fits_one_tile(lh, lw)
                .then(|| (who, init.dims().to_vec()));
            match groups
                .iter_mut()
                .find(|(k, members)| key.is_some() && *k == key && members.len() < per_call)
            {
                Some((_, members)) => members.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        Ok(groups.into_iter().map(|(_, members)| members).collect())
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
        let sr = self.restore_padded(&padded, new_noise, Conditioning::Configured, on_step)?;
        Ok(sr.narrow(2, 0, h)?.narrow(3, 0, w)?)
    }

    /// Restores a padded `[1, 3, H, W]` LQ in [-1, 1]; returns the result in [-1, 1]. Stage by
    /// stage over all of its pieces (one, or the pixel patches of a large image): encode every
    /// piece, sample every piece, decode every piece. Each piece keeps its own random sequence
    /// across the stages, so the order is the reference's piece by piece in all but time.
    fn restore_padded(
        &self,
        lq: &Tensor,
        new_noise: &mut dyn FnMut() -> Box<dyn NoiseSource>,
        who: Conditioning,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let (b, c, h, w) = lq.dims4()?;
        let s = &self.settings;
        let whole = h <= s.patch_size && w <= s.patch_size;
        let pieces = if whole {
            vec![Patch { x: 0, y: 0, w, h }]
        } else {
            patches(h, w, s.patch_size, s.patch_stride)
        };
        let piece_of = |p: &Patch| -> Result<Tensor> {
            Ok(if whole {
                lq.clone()
            } else {
                lq.narrow(2, p.y, p.h)?.narrow(3, p.x, p.w)?
            })
        };

        let mut started = Vec::with_capacity(pieces.len());
        {
            let encoder = self.loaded(Stage::Encode, |n| n.vae_encoder())?;
            let t = Instant::now();
            for p in &pieces {
                let mut noise = new_noise();
                let init_latent = Self::encode_piece(&encoder, &piece_of(p)?, noise.as_mut())?;
                started.push((init_latent, noise));
            }
            self.count(t, |s| &mut s.encode);
        }

        let total = pieces.len() * s.steps;
        let mut latents = Vec::with_capacity(pieces.len());
        {
            let sampling = self.loaded(Stage::Sample, |n| n.sampling())?;
            let t = Instant::now();
            for (k, (init_latent, mut noise)) in started.into_iter().enumerate() {
                latents.push(self.sample_piece(
                    &sampling,
                    &init_latent,
                    noise.as_mut(),
                    who,
                    &mut |d| on_step(k * s.steps + d, total),
                )?);
            }
            self.count(t, |s| &mut s.sample);
        }

        let cfw = self.loaded(Stage::Decode, |n| n.cfw())?;
        let t = Instant::now();
        let decoded = if whole {
            self.decode_piece(&cfw, &latents[0], lq)?
        } else {
            let mut blender = PatchBlender::new(b, c, h, w, lq.device())?;
            for (p, latent) in pieces.iter().zip(&latents) {
                let out = self.decode_piece(&cfw, latent, &piece_of(p)?)?;
                blender.add(*p, &out)?;
            }
            blender.finish()?
        };
        self.count(t, |s| &mut s.decode);
        Ok(decoded)
    }

    /// A piece's starting latent: the VAE posterior of the LQ, sampled with the piece's first
    /// noise draw and scaled (f32).
    fn encode_piece(base: &BaseModel, lq: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        base.require(Network::VaeEncoder)?;
        let dtype = base.dtype;
        let posterior = base.vae.encode(&lq.to_dtype(dtype)?)?;
        let eps = noise.next(posterior.mean.dims(), &base.device)?;
        Ok((posterior
            .sample(&eps.to_dtype(dtype)?)?
            .to_dtype(DType::F32)?
            * base.config.diffusion.scale_factor)?)
    }

    /// Samples a piece's latent over latent tiles, or a batch of crops that each fit one tile
    /// (`init_latent` of several rows, `noise` a [`BatchedNoise`]); `on_step(done)` after every
    /// step.
    fn sample_piece(
        &self,
        base: &BaseModel,
        init_latent: &Tensor,
        noise: &mut dyn NoiseSource,
        who: Conditioning,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Tensor> {
        base.require(Network::Sampling)?;
        let mut base_denoiser;
        let mut personalized;
        let identity = self.identity_of(who);
        let denoiser: &mut dyn VDenoiser = match identity {
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
        Ok(if self.tiling.fits_one_tile(lh, lw) {
            self.sampler
                .sample(&mut counted, init_latent, noise, &opts, &mut progress)?
                .latent
        } else {
            CanvasSampler::new(&self.sampler, self.tiling)?
                .sample(&mut counted, init_latent, noise, &opts, &mut progress)?
                .latent
        })
    }

    /// A piece's pixels: the CFW decode of its sampled latent fused with the encoder features
    /// of its LQ, colour-fixed against the LQ (f32, [-1, 1]).
    fn decode_piece(&self, cfw: &CfwModel, latent: &Tensor, lq: &Tensor) -> Result<Tensor> {
        let cfw_dtype = cfw.dtype;
        let (_, enc_features) = cfw
            .autoencoder
            .encode_with_features(&lq.to_dtype(cfw_dtype)?)?;
        let z = (latent / self.config.diffusion.scale_factor)?.to_dtype(cfw_dtype)?;
        let decoded = cfw
            .autoencoder
            .decode_fused(&z, &enc_features, self.settings.dec_w)?
            .to_dtype(DType::F32)?;
        self.settings.color_fix.apply(&decoded, lq)
    }
}
