//! Personalization training (spec §4): `L = L_Diff + λ_gen·L_Gen + λ_pers·L_Pers` on the frozen
//! StableSR base, optimised by AdamW over the block weights, the γ gates and the learned token
//! only (three parameter groups with their own learning rates).

use super::dual_stream::{HostReference, PersonalizedUNet, ReferenceFeatures};
use super::token::{init_embedding, PromptTokens};
use super::{host_specs, HostSpec, LAMBDA_GEN, LAMBDA_PERS, LR_GAMMA, LR_ICA, LR_TOKEN, P_HQ};
use super::{INIT_WORD, WEIGHT_DECAY};
use crate::degrade::{degrade_image, Preset};
use crate::diffusion::noise::standard_normal;
use crate::error::{Error, Result};
use crate::imaging::resize::{resize_torch, TorchInterp};
use crate::imaging::tensor::image_to_tensor;
use crate::imaging::ImageF32;
use crate::kernels::DifferentiableScope;
use crate::model::base::BaseModel;
use crate::model::unet::{StructCond, UNetInputs};
use crate::model::vae::DiagonalGaussian;
use crate::optim::{AdamW, AdamWParams};
use crate::personalize::block::PersonalizationBlock;
use candle_core::{DType, Device, Tensor, TensorId, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};

/// Names of the three optimizer groups, as stored in checkpoints (`optim.<group>.<var>.m|v`).
pub const OPTIMIZER_GROUPS: [&str; 3] = ["ica", "gamma", "token"];

/// Square centre crop, then a bicubic resize to `size`², clamped to [0, 1].
pub fn centre_crop_resize(img: &ImageF32, size: usize) -> Result<ImageF32> {
    let side = img.width.min(img.height);
    let (x0, y0) = ((img.width - side) / 2, (img.height - side) / 2);
    let crop = img.crop_square(x0, y0, side);
    let mut out = if side == size {
        crop
    } else {
        resize_torch(&crop, size, size, TorchInterp::Bicubic)?
    };
    out.data.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
    Ok(out)
}

/// A reference image ready for training: its HQ at the model size, the HQ posterior and the
/// stored reference latent (posterior mean × scale factor).
pub struct PreparedReference {
    pub hq: ImageF32,
    pub posterior: DiagonalGaussian,
    /// `[1, 4, h, w]`.
    pub latent: Tensor,
}

/// The trainable parameters: block weights and γ in a `VarMap` under `pers.<host>.<key>`, and
/// the learned token.
pub struct TrainableParams {
    pub varmap: VarMap,
    pub token: Var,
    pub init_token: Tensor,
    pub hosts: Vec<HostSpec>,
}

/// Trainable variables with their stored names.
pub type NamedVars = Vec<(String, Var)>;

/// Key prefix of a host's block parameters.
pub fn block_prefix(host: &str) -> String {
    format!("pers.{host}")
}

impl TrainableParams {
    /// Fresh parameters for `base`: γ = 0, ICA with PyTorch's default init drawn from `seed`,
    /// token = the init word's row of the token table.
    pub fn init(base: &BaseModel, seed: u64) -> Result<Self> {
        let hosts = host_specs(&base.config.unet);
        let varmap = VarMap::new();
        let mut rng = StdRng::seed_from_u64(seed ^ 0x1CA_1CA);
        for host in &hosts {
            PersonalizationBlock::init_trainable(
                &varmap,
                &block_prefix(&host.path),
                host.dim,
                host.heads,
                host.d_head,
                &mut rng,
                &base.device,
            )?;
        }
        let init_token = init_embedding(&base.tokenizer, base.text_encoder()?, INIT_WORD)?;
        let token = Var::from_tensor(&init_token)?;
        Ok(TrainableParams {
            varmap,
            token,
            init_token,
            hosts,
        })
    }

    /// The blocks, sharing storage with the `Var`s (optimizer updates are seen).
    pub fn blocks(&self, device: &Device) -> Result<BTreeMap<String, PersonalizationBlock>> {
        let vb = candle_nn::VarBuilder::from_varmap(&self.varmap, DType::F32, device);
        self.hosts
            .iter()
            .map(|h| {
                let block = PersonalizationBlock::new(
                    h.dim,
                    h.heads,
                    h.d_head,
                    vb.pp(block_prefix(&h.path)),
                )?;
                Ok((h.path.clone(), block))
            })
            .collect()
    }

    /// `(ICA weights, γ vectors)`, each sorted by name.
    pub fn block_vars(&self) -> Result<(NamedVars, NamedVars)> {
        let vars = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::Config("VarMap lock poisoned".into()))?;
        let mut all: Vec<(String, Var)> =
            vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let (gammas, ica): (Vec<_>, Vec<_>) =
            all.into_iter().partition(|(k, _)| k.ends_with(".gamma"));
        Ok((ica, gammas))
    }

    /// Overwrites parameters from stored tensors (resume, identity load).
    pub fn set_from(&self, tensors: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        let (ica, gammas) = self.block_vars()?;
        for (name, var) in ica.iter().chain(gammas.iter()) {
            let t = tensors
                .get(name)
                .ok_or_else(|| Error::Input(format!("stored parameters lack `{name}`")))?;
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        let token = tensors
            .get("token.embedding")
            .ok_or_else(|| Error::Input("stored parameters lack `token.embedding`".into()))?;
        self.token
            .set(&token.to_dtype(DType::F32)?.to_device(self.token.device())?)?;
        Ok(())
    }
}

/// Optimizer settings of one run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub lr_token: f64,
    pub lr_ica: f64,
    pub lr_gamma: f64,
    pub weight_decay: f64,
    pub lambda_gen: f64,
    pub lambda_pers: f64,
    pub p_hq: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr_token: LR_TOKEN,
            lr_ica: LR_ICA,
            lr_gamma: LR_GAMMA,
            weight_decay: WEIGHT_DECAY,
            lambda_gen: LAMBDA_GEN,
            lambda_pers: LAMBDA_PERS,
            p_hq: P_HQ,
        }
    }
}

/// The random draws of one iteration; the loss is a deterministic function of them.
pub struct TrainingSample {
    pub target: usize,
    pub reference: usize,
    pub timestep: usize,
    /// `z_0` (`[1, 4, h, w]`, posterior sample × scale).
    pub z0: Tensor,
    pub z_lq: Tensor,
    pub noise: Tensor,
}

/// The loss and its parts (scalars).
pub struct LossParts {
    pub total: Tensor,
    pub diff: Tensor,
    pub gen: Tensor,
    pub pers: Tensor,
}

/// One iteration's scalar losses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub total: f32,
    pub diff: f32,
    pub gen: f32,
    pub pers: f32,
}

pub struct Trainer<'a> {
    pub base: &'a BaseModel,
    pub params: TrainableParams,
    pub blocks: BTreeMap<String, PersonalizationBlock>,
    pub references: Vec<PreparedReference>,
    pub prompt: PromptTokens,
    pub config: TrainConfig,
    /// Null-LQ latent (VAE mean of the all-zero image × scale).
    pub z_null: Tensor,
    sqrt_alphas_cumprod: Vec<f64>,
    sqrt_one_minus_alphas_cumprod: Vec<f64>,
    optimizers: Vec<AdamW>,
    seed: u64,
    pub rng: StdRng,
    pub iteration: usize,
    /// Differentiable kernels on this thread for as long as the trainer lives (the reference
    /// latents are encoded under it too); dropping the trainer restores the thread's mode.
    _mode: DifferentiableScope,
}

impl<'a> Trainer<'a> {
    /// Prepares references (`size`² HQ images), the null latent, the schedule and optimizers.
    /// Holds this thread on the differentiable kernels until the trainer is dropped.
    pub fn new(
        base: &'a BaseModel,
        params: TrainableParams,
        images: &[ImageF32],
        size: usize,
        config: TrainConfig,
        seed: u64,
    ) -> Result<Self> {
        base.require_networks()?;
        if base.dtype != DType::F32 {
            return Err(Error::Input(
                "personalization trains in f32; use --dtype f32".into(),
            ));
        }
        if images.is_empty() {
            return Err(Error::Input("no reference images".into()));
        }
        let mode = DifferentiableScope::enter(true);
        let scale = base.config.diffusion.scale_factor;
        let device = &base.device;
        let references = images
            .iter()
            .map(|img| {
                let hq = centre_crop_resize(img, size)?;
                let posterior = base.vae.encode(&image_to_tensor(&hq, device)?)?;
                let latent = (&posterior.mean * scale)?;
                Ok(PreparedReference {
                    hq,
                    posterior,
                    latent,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let zeros = Tensor::zeros((1, 3, size, size), DType::F32, device)?;
        let z_null = (base.vae.encode(&zeros)?.mean * scale)?;
        let schedule = crate::diffusion::schedule::Schedule::linear(&base.config.diffusion)?;
        let prompt = PromptTokens::default_positive(&base.tokenizer)?;
        let blocks = params.blocks(device)?;
        let (ica, gammas) = params.block_vars()?;
        let adamw = |lr: f64| AdamWParams {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: config.weight_decay,
        };
        let optimizers = vec![
            AdamW::new(ica, adamw(config.lr_ica))?,
            AdamW::new(gammas, adamw(config.lr_gamma))?,
            AdamW::new(
                vec![("embedding".to_string(), params.token.clone())],
                adamw(config.lr_token),
            )?,
        ];
        Ok(Trainer {
            base,
            params,
            blocks,
            references,
            prompt,
            config,
            z_null,
            sqrt_alphas_cumprod: schedule.sqrt_alphas_cumprod.clone(),
            sqrt_one_minus_alphas_cumprod: schedule.sqrt_one_minus_alphas_cumprod.clone(),
            optimizers,
            seed,
            rng: iteration_rng(seed, 0),
            iteration: 0,
            _mode: mode,
        })
    }

    /// Stored reference latents `[K, 4, h, w]`.
    pub fn reference_latents(&self) -> Result<Tensor> {
        let latents: Vec<&Tensor> = self.references.iter().map(|r| &r.latent).collect();
        Ok(Tensor::cat(&latents, 0)?)
    }

    /// Draws target/reference indices, timestep, noise, `z_0` and the degraded LQ latent.
    pub fn draw_sample(&mut self) -> Result<TrainingSample> {
        let k = self.references.len();
        let target = self.rng.gen_range(0..k);
        let reference = if k == 1 {
            target
        } else {
            let j = self.rng.gen_range(0..k - 1);
            if j >= target {
                j + 1
            } else {
                j
            }
        };
        let timestep = self.rng.gen_range(0..self.sqrt_alphas_cumprod.len());
        let device = &self.base.device;
        let scale = self.base.config.diffusion.scale_factor;
        let hq = &self.references[target];
        let latent_shape = hq.posterior.mean.dims().to_vec();
        let z0 = (hq
            .posterior
            .sample(&standard_normal(&mut self.rng, &latent_shape, device)?)?
            * scale)?;
        let lq_image = if self.rng.gen_bool(self.config.p_hq) {
            hq.hq.clone()
        } else {
            let seed: u64 = self.rng.gen();
            degrade_image(&hq.hq, Preset::Heavy, seed)?.0
        };
        let lq_posterior = self.base.vae.encode(&image_to_tensor(&lq_image, device)?)?;
        let z_lq =
            (lq_posterior.sample(&standard_normal(&mut self.rng, &latent_shape, device)?)?
                * scale)?;
        let noise = standard_normal(&mut self.rng, &latent_shape, device)?;
        Ok(TrainingSample {
            target,
            reference,
            timestep,
            z0,
            z_lq,
            noise,
        })
    }

    /// What both x-pass branches share: the noised latent, the v target, the timestep, the
    /// text context (with the learned token) and the reference pass's features.
    fn iteration_inputs(
        &self,
        pers_unet: &PersonalizedUNet,
        sample: &TrainingSample,
    ) -> Result<IterationInputs> {
        let t = sample.timestep;
        let (a, s) = (
            self.sqrt_alphas_cumprod[t],
            self.sqrt_one_minus_alphas_cumprod[t],
        );
        let z_t = ((&sample.z0 * a)? + (&sample.noise * s)?)?;
        let target = ((&sample.noise * a)? - (&sample.z0 * s)?)?;
        let context = self.prompt.context(
            self.base.text_encoder()?,
            Some(self.params.token.as_tensor()),
        )?;
        let t1 = Tensor::new(&[t as f32], &self.base.device)?;
        let refs = pers_unet.reference_features(
            &self.references[sample.reference].latent,
            &t1,
            &context,
            &self.prompt.positions(1, 0),
        )?;
        Ok(IterationInputs {
            z_t,
            target,
            t1,
            context,
            refs,
        })
    }

    /// The loss for `sample` with the current parameters.
    pub fn loss(&self, sample: &TrainingSample) -> Result<LossParts> {
        let base = self.base;
        let pers_unet = PersonalizedUNet::new(&base.unet, &self.blocks, 1.0);
        let IterationInputs {
            z_t,
            target,
            t1,
            context,
            refs,
        } = self.iteration_inputs(&pers_unet, sample)?;
        let t = sample.timestep as f32;
        let t2 = Tensor::new(&[t, t], &base.device)?;
        let lq_cond = base.lq_encoder.forward(&sample.z_lq, &t1)?;
        let null_cond = base.lq_encoder.forward(&self.z_null, &t1)?;
        let struct_cond = concat_struct_cond(&lq_cond, &null_cond)?;
        let x = Tensor::cat(&[&z_t, &z_t], 0)?;
        let context2 = Tensor::cat(&[&context, &context], 0)?;
        let inputs = UNetInputs {
            timesteps: &t2,
            context: &context2,
            struct_cond: Some(&struct_cond),
        };
        let v = pers_unet.forward(&x, &inputs, Some(&refs))?;
        let diff = (v.get(0)? - target.get(0)?)?.sqr()?.mean_all()?;
        let gen = (v.get(1)? - target.get(0)?)?.sqr()?.mean_all()?;
        let pers = refs.pers_loss()?;
        let total =
            ((&diff + (&gen * self.config.lambda_gen)?)? + (&pers * self.config.lambda_pers)?)?;
        Ok(LossParts {
            total,
            diff,
            gen,
            pers,
        })
    }

    /// One optimisation step on a freshly drawn sample. The draws of iteration `i` come from a
    /// generator seeded by `(seed, i)`, so a resumed run repeats an uninterrupted one exactly.
    pub fn step(&mut self) -> Result<StepReport> {
        self.rng = iteration_rng(self.seed, self.iteration);
        let sample = self.draw_sample()?;
        self.step_on(&sample)
    }

    /// One optimisation step on a given sample (overfitting checks).
    pub fn step_on(&mut self, sample: &TrainingSample) -> Result<StepReport> {
        let (report, grads) = self.loss_and_gradients(sample)?;
        for opt in &mut self.optimizers {
            opt.step_with(|var| grads.get(&var.id()).cloned())?;
        }
        self.iteration += 1;
        Ok(report)
    }

    /// The losses of [`Trainer::loss`] and the gradient of their total with respect to every
    /// trainable variable, computed one x-pass branch at a time so that only one branch's graph
    /// is alive at once (a personalization iteration's peak memory is its retained graphs).
    ///
    /// The total is `L_Diff(LQ branch) + λ_gen·L_Gen(null branch) + λ_pers·L_Pers(reference
    /// pass)`. The branches share the text context and the reference tokens; each branch runs
    /// on detached copies of them (leaves), its backward yields the gradient of its term for the
    /// block weights, γ and those leaves, and its graph is dropped. A last backward pushes the
    /// leaves' accumulated gradients and L_Pers through the reference pass and the text encoder:
    /// `Σ ⟨leaf_graph, ∂L/∂leaf⟩ + λ_pers·L_Pers` has exactly the wanted gradient there.
    pub fn loss_and_gradients(
        &self,
        sample: &TrainingSample,
    ) -> Result<(StepReport, HashMap<TensorId, Tensor>)> {
        let base = self.base;
        let pers_unet = PersonalizedUNet::new(&base.unet, &self.blocks, 1.0);
        let IterationInputs {
            z_t,
            target,
            t1,
            context,
            refs,
        } = self.iteration_inputs(&pers_unet, sample)?;

        let context_leaf = Var::from_tensor(&context.detach())?;
        let mut ref_leaves = BTreeMap::new();
        let mut leaf_refs = ReferenceFeatures::default();
        for (path, host) in &refs.hosts {
            let leaf = Var::from_tensor(&host.tokens.detach())?;
            leaf_refs.hosts.insert(
                path.clone(),
                HostReference {
                    tokens: leaf.as_tensor().clone(),
                    signals: host.signals.clone(),
                },
            );
            ref_leaves.insert(path.clone(), leaf);
        }
        let (ica, gammas) = self.params.block_vars()?;
        let block_vars: Vec<Var> = ica.into_iter().chain(gammas).map(|(_, v)| v).collect();

        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        let mut branch_losses = Vec::with_capacity(2);
        for (lq_latent, weight) in [(&sample.z_lq, 1.0), (&self.z_null, self.config.lambda_gen)] {
            let struct_cond = base.lq_encoder.forward(lq_latent, &t1)?;
            let inputs = UNetInputs {
                timesteps: &t1,
                context: context_leaf.as_tensor(),
                struct_cond: Some(&struct_cond),
            };
            let v = pers_unet.forward(&z_t, &inputs, Some(&leaf_refs))?;
            let loss = (v - &target)?.sqr()?.mean_all()?;
            let branch_grads = (&loss * weight)?.backward()?;
            for var in block_vars
                .iter()
                .chain(std::iter::once(&context_leaf))
                .chain(ref_leaves.values())
            {
                if let Some(g) = branch_grads.get(var.as_tensor()) {
                    accumulate(&mut grads, var.id(), g)?;
                }
            }
            branch_losses.push(loss.detach());
        }

        let pers = refs.pers_loss()?;
        let mut surrogate = (&pers * self.config.lambda_pers)?;
        let pulled = std::iter::once((&context, &context_leaf)).chain(
            ref_leaves
                .iter()
                .map(|(path, leaf)| (&refs.hosts[path].tokens, leaf)),
        );
        for (graph, leaf) in pulled {
            if let Some(g) = grads.remove(&leaf.id()) {
                surrogate = (&surrogate + (graph * g)?.sum_all()?)?;
            }
        }
        let through_reference = surrogate.backward()?;
        for var in block_vars.iter().chain(std::iter::once(&self.params.token)) {
            if let Some(g) = through_reference.get(var.as_tensor()) {
                accumulate(&mut grads, var.id(), g)?;
            }
        }

        let scalar = |t: &Tensor| -> Result<f32> { Ok(t.to_dtype(DType::F32)?.to_scalar()?) };
        let (diff, gen, pers) = (
            scalar(&branch_losses[0])?,
            scalar(&branch_losses[1])?,
            scalar(&pers)?,
        );
        let total = (diff as f64
            + self.config.lambda_gen * gen as f64
            + self.config.lambda_pers * pers as f64) as f32;
        Ok((
            StepReport {
                total,
                diff,
                gen,
                pers,
            },
            grads,
        ))
    }
}

/// See [`Trainer::iteration_inputs`].
struct IterationInputs {
    z_t: Tensor,
    target: Tensor,
    /// `[1]`: the timestep of one row.
    t1: Tensor,
    context: Tensor,
    refs: ReferenceFeatures,
}

/// Adds `g` to the gradient kept for `id`.
fn accumulate(grads: &mut HashMap<TensorId, Tensor>, id: TensorId, g: &Tensor) -> Result<()> {
    let sum = match grads.remove(&id) {
        Some(prev) => (prev + g)?,
        None => g.clone(),
    };
    grads.insert(id, sum);
    Ok(())
}

/// The generator of iteration `iteration`'s random draws.
fn iteration_rng(seed: u64, iteration: usize) -> StdRng {
    // Mixed, so neighbouring (seed, iteration) pairs give unrelated streams.
    let z = seed ^ (iteration as u64).wrapping_mul(crate::seeds::GOLDEN);
    StdRng::seed_from_u64(crate::seeds::mix64(z))
}

impl Trainer<'_> {
    /// The optimizer moments (`optim.<group>.<var>.m|v`, CPU f32) and the number of updates taken.
    pub fn optimizer_state(&self) -> Result<(HashMap<String, Tensor>, usize)> {
        let mut all = HashMap::new();
        let mut steps = 0;
        for (group, opt) in OPTIMIZER_GROUPS.iter().zip(&self.optimizers) {
            let (tensors, taken) = opt.state(&format!("optim.{group}"))?;
            all.extend(tensors);
            steps = taken;
        }
        Ok((all, steps))
    }

    /// Restores [`Trainer::optimizer_state`]'s output (resume from a checkpoint).
    pub fn load_optimizer_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        steps: usize,
    ) -> Result<()> {
        for (group, opt) in OPTIMIZER_GROUPS.iter().zip(&mut self.optimizers) {
            opt.load_state(&format!("optim.{group}"), tensors, steps)?;
        }
        Ok(())
    }
}

/// The time-aware encoder features of two batches stacked along the batch.
fn concat_struct_cond(a: &StructCond, b: &StructCond) -> Result<StructCond> {
    a.iter()
        .map(|(k, ta)| {
            let tb = b
                .get(k)
                .ok_or_else(|| Error::Config(format!("no encoder feature of width {k}")))?;
            Ok((*k, Tensor::cat(&[ta, tb], 0)?))
        })
        .collect()
}
