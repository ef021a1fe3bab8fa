//! StableSR's ancestral DDPM sampler with v-parameterization and classifier-free guidance.
//!
//! The chain starts from the noised LQ latent `x_T = q_sample(init_latent, T-1)` of the FULL
//! schedule and walks the respaced indices `N-1 .. 0`. At each index `i` the networks receive the
//! original timestep `timestep_map[i]`, while every schedule lookup uses the respaced arrays at
//! `i`. `x0 = sqrt(acp[i]) x - sqrt(1 - acp[i]) v` is not clamped (`LatentDiffusion` sets
//! `clip_denoised = False`), and a noise tensor is drawn at every step, also the last one where
//! it is multiplied by zero, so seeded and recorded runs consume draws like the reference does.
//!
//! The networks stay outside: the sampler calls a [`VDenoiser`], which the pipeline implements
//! with the UNet and the time-aware encoder, and the tests implement by replaying recordings.

use crate::config::DiffusionConfig;
use crate::diffusion::noise::NoiseSource;
use crate::diffusion::schedule::Schedule;
use crate::error::{Error, Result};
use candle_core::Tensor;

/// What the batch handed to a [`VDenoiser`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Branches {
    /// `x_t` has the batch size of `lq_latent`; every sample uses the conditional context.
    Cond,
    /// `x_t` is `[x; x]` (twice the batch of `lq_latent`): the first half takes the
    /// unconditional (negative) context, the second half the conditional one.
    UncondCond,
}

impl Branches {
    /// The reference doubles the batch unless guidance is absent or exactly 1. Callers without a
    /// negative/unconditional context must pass `None`.
    pub fn for_guidance(scale: Option<f64>) -> Self {
        match scale {
            Some(s) if s != 1.0 => Branches::UncondCond,
            _ => Branches::Cond,
        }
    }
}

/// The denoising network as the samplers see it: the UNet's v prediction for `x_t` at original
/// timestep `t_orig`, conditioned on the LQ latent `lq_latent` (the whole init latent for the plain
/// sampler, its tile for the canvas sampler), from which the implementation computes the
/// time-aware encoder features. Returns a tensor of `x_t`'s shape.
pub trait VDenoiser {
    fn predict_v(
        &mut self,
        x_t: &Tensor,
        lq_latent: &Tensor,
        t_orig: usize,
        branches: Branches,
    ) -> Result<Tensor>;
}

impl<F> VDenoiser for F
where
    F: FnMut(&Tensor, &Tensor, usize, Branches) -> Result<Tensor>,
{
    fn predict_v(
        &mut self,
        x_t: &Tensor,
        lq_latent: &Tensor,
        t_orig: usize,
        branches: Branches,
    ) -> Result<Tensor> {
        self(x_t, lq_latent, t_orig, branches)
    }
}

/// Options shared by the plain and the canvas sampler.
#[derive(Debug, Clone, Default)]
pub struct SampleOptions {
    /// Classifier-free guidance scale `s` in `v = v_u + s (v_c - v_u)`; `None` or `Some(1.0)`
    /// runs the conditional branch only.
    pub guidance_scale: Option<f64>,
    /// Keep the per-step intermediates in [`SampleOutput::steps`].
    pub record_steps: bool,
}

/// Progress report after each step.
#[derive(Debug, Clone, Copy)]
pub struct StepProgress {
    /// Steps done so far (1-based).
    pub done: usize,
    pub total: usize,
    /// Respaced index of the step just done.
    pub index: usize,
    pub t_orig: usize,
}

/// The intermediates of one step.
#[derive(Debug, Clone)]
pub struct StepRecord {
    pub index: usize,
    pub t_orig: usize,
    /// Guided (and, for the canvas, blended) v.
    pub v: Tensor,
    pub x0: Tensor,
    pub post_mean: Tensor,
    pub post_logvar: f32,
    pub x_out: Tensor,
}

#[derive(Debug, Clone)]
pub struct SampleOutput {
    /// The final latent (`samples`).
    pub latent: Tensor,
    /// Per-step intermediates, in sampling order, when requested.
    pub steps: Vec<StepRecord>,
}

/// The DDPM sampler over a full schedule and its respacing.
#[derive(Debug, Clone)]
pub struct DdpmSampler {
    full: Schedule,
    respaced: Schedule,
}

/// `v_u + s (v_c - v_u)` for a `[v_u; v_c]` batch, or the batch itself for [`Branches::Cond`].
pub fn guide(v: &Tensor, branches: Branches, scale: Option<f64>) -> Result<Tensor> {
    match branches {
        Branches::Cond => Ok(v.clone()),
        Branches::UncondCond => {
            let halves = v.chunk(2, 0)?;
            let (v_u, v_c) = (&halves[0], &halves[1]);
            let s = scale.unwrap_or(1.0);
            Ok(((v_c - v_u)?.affine(s, 0.0)? + v_u)?)
        }
    }
}

/// Runs the denoiser on `x` (doubling it for guidance) and checks the shape it returns.
pub(crate) fn denoise(
    denoiser: &mut dyn VDenoiser,
    x: &Tensor,
    lq_latent: &Tensor,
    t_orig: usize,
    scale: Option<f64>,
) -> Result<Tensor> {
    let branches = Branches::for_guidance(scale);
    let x_in = match branches {
        Branches::Cond => x.clone(),
        Branches::UncondCond => Tensor::cat(&[x, x], 0)?,
    };
    let v = denoiser.predict_v(&x_in, lq_latent, t_orig, branches)?;
    if v.dims() != x_in.dims() {
        return Err(Error::Input(format!(
            "denoiser returned shape {:?} for an input of shape {:?} (t = {t_orig})",
            v.dims(),
            x_in.dims()
        )));
    }
    guide(&v, branches, scale)
}

impl DdpmSampler {
    /// The full schedule of `cfg` respaced to `steps` sampling steps.
    pub fn new(cfg: &DiffusionConfig, steps: usize) -> Result<Self> {
        let full = Schedule::linear(cfg)?;
        let respaced = Schedule::respaced(&full, steps)?;
        Ok(DdpmSampler { full, respaced })
    }

    pub fn from_schedules(full: Schedule, respaced: Schedule) -> Self {
        DdpmSampler { full, respaced }
    }

    pub fn full(&self) -> &Schedule {
        &self.full
    }

    pub fn respaced(&self) -> &Schedule {
        &self.respaced
    }

    pub fn steps(&self) -> usize {
        self.respaced.len()
    }

    /// `x_T = sqrt(acp[T-1]) init + sqrt(1 - acp[T-1]) noise` with the full schedule.
    pub fn q_sample_start(&self, init_latent: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let last = self.full.len() - 1;
        let a = self.full.sqrt_alphas_cumprod[last] as f32;
        let b = self.full.sqrt_one_minus_alphas_cumprod[last] as f32;
        Ok((init_latent.affine(a as f64, 0.0)? + noise.affine(b as f64, 0.0)?)?)
    }

    /// Draws the start noise and returns `x_T`.
    pub fn start_latent(
        &self,
        init_latent: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let eps = noise.next(init_latent.dims(), init_latent.device())?;
        self.q_sample_start(init_latent, &eps)
    }

    /// The posterior step at respaced index `i` for a (guided) v prediction: x0, posterior mean,
    /// and `x_out = mean + [i > 0] exp(logvar / 2) noise` with a fresh draw (drawn even at i = 0).
    pub fn posterior_step(
        &self,
        i: usize,
        t_orig: usize,
        x: &Tensor,
        v: Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepRecord> {
        let c = self.respaced.step(i)?;
        let x0 = (x.affine(c.sqrt_alphas_cumprod as f64, 0.0)?
            - v.affine(c.sqrt_one_minus_alphas_cumprod as f64, 0.0)?)?;
        let post_mean = (x0.affine(c.posterior_mean_coef1 as f64, 0.0)?
            + x.affine(c.posterior_mean_coef2 as f64, 0.0)?)?;
        let eps = noise.next(x.dims(), x.device())?;
        let x_out = if i == 0 {
            post_mean.clone()
        } else {
            let sigma = (0.5f32 * c.posterior_log_variance_clipped).exp();
            (&post_mean + eps.affine(sigma as f64, 0.0)?)?
        };
        Ok(StepRecord {
            index: i,
            t_orig,
            v,
            x0,
            post_mean,
            post_logvar: c.posterior_log_variance_clipped,
            x_out,
        })
    }

    /// Full run: draws `x_T` from `init_latent`, then samples (see [`Self::sample_from`]).
    pub fn sample(
        &self,
        denoiser: &mut dyn VDenoiser,
        init_latent: &Tensor,
        noise: &mut dyn NoiseSource,
        opts: &SampleOptions,
        on_step: &mut dyn FnMut(&StepProgress),
    ) -> Result<SampleOutput> {
        let x_t = self.start_latent(init_latent, noise)?;
        self.sample_from(x_t, denoiser, init_latent, noise, opts, on_step)
    }

    /// Runs the respaced chain from `x_t`; the denoiser sees `init_latent` as the LQ condition.
    pub fn sample_from(
        &self,
        x_t: Tensor,
        denoiser: &mut dyn VDenoiser,
        init_latent: &Tensor,
        noise: &mut dyn NoiseSource,
        opts: &SampleOptions,
        on_step: &mut dyn FnMut(&StepProgress),
    ) -> Result<SampleOutput> {
        self.run_chain(x_t, opts, on_step, noise, &mut |x, t_orig| {
            denoise(denoiser, x, init_latent, t_orig, opts.guidance_scale)
        })
    }

    /// The loop shared by both samplers; `predict` returns the guided v for the whole latent.
    pub(crate) fn run_chain(
        &self,
        mut x: Tensor,
        opts: &SampleOptions,
        on_step: &mut dyn FnMut(&StepProgress),
        noise: &mut dyn NoiseSource,
        predict: &mut dyn FnMut(&Tensor, usize) -> Result<Tensor>,
    ) -> Result<SampleOutput> {
        let total = self.steps();
        let mut steps = Vec::new();
        for (done, i) in (0..total).rev().enumerate() {
            let t_orig = self.respaced.original_timestep(i)?;
            let v = predict(&x, t_orig)?;
            let record = self.posterior_step(i, t_orig, &x, v, noise)?;
            x = record.x_out.clone();
            if opts.record_steps {
                steps.push(record);
            }
            on_step(&StepProgress {
                done: done + 1,
                total,
                index: i,
                t_orig,
            });
        }
        Ok(SampleOutput { latent: x, steps })
    }
}
