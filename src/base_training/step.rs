//! One training step of the base model: StableSR's `p_losses` with v-prediction, gradients of
//! the trainable tensors only, accumulated over micro-batches, averaged across data-parallel
//! ranks, then one AdamW update.

use super::parallel::Communicator;
use super::trainable::TrainableWeights;
use crate::config::BaseModelConfig;
use crate::diffusion::schedule::Schedule;
use crate::error::{Error, Result};
use crate::kernels::DifferentiableScope;
use crate::model::base::BaseModel;
use crate::model::unet::UNetInputs;
use crate::optim::{AdamW, AdamWParams};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;

/// The latents of one micro-batch and the draws that make its loss deterministic.
pub struct LatentBatch {
    /// HQ latents `[B, 4, h, w]` (posterior sample × scale factor).
    pub z_gt: Tensor,
    /// LQ latents, same shape: the time-aware encoder's input.
    pub z_lq: Tensor,
    /// Timesteps of the full schedule, one per sample (`time_replace` = steps: `t_ori = t`).
    pub timesteps: Vec<usize>,
    /// The noise of `q_sample`, same shape as `z_gt`.
    pub noise: Tensor,
}

/// AdamW as StableSR trains (torch defaults besides the learning rate).
pub fn adamw(lr: f64) -> AdamWParams {
    AdamWParams {
        lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    }
}

pub struct BaseTrainer {
    pub base: BaseModel,
    /// The trained tensors by checkpoint name, sorted.
    vars: Vec<(String, Var)>,
    optimizer: AdamW,
    /// Text encoder output for the empty prompt, `[1, 77, d]` (StableSR trains with `''`).
    context: Tensor,
    sqrt_alphas_cumprod: Vec<f64>,
    sqrt_one_minus_alphas_cumprod: Vec<f64>,
}

impl BaseTrainer {
    /// Builds the model from `weights` with the trainable tensors as variables, encodes the
    /// empty prompt (on the inference kernels) and releases the text encoder (frozen, and not
    /// needed again). [`BaseTrainer::loss`] runs on the differentiable kernels.
    pub fn new(
        config: BaseModelConfig,
        weights: &TrainableWeights,
        device: &Device,
        optimizer: AdamWParams,
    ) -> Result<(Self, crate::model::base::UnusedSummary)> {
        let _inference = DifferentiableScope::enter(false);
        let vb = weights.var_builder(DType::F32, device);
        let (mut base, unused) = BaseModel::from_var_builder(config, vb, weights.checked())?;
        let vars = weights.vars();
        if vars.is_empty() {
            return Err(Error::Config(
                "the model has no trainable tensors (time-aware encoder, SFT layers)".into(),
            ));
        }
        let ids = base.tokenizer.encode("")?;
        let ids = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
        let context = base.text_encoder()?.forward(&ids)?.detach();
        base.release_text_encoder();
        let schedule = Schedule::linear(&base.config.diffusion)?;
        Ok((
            BaseTrainer {
                base,
                optimizer: AdamW::new(vars.clone(), optimizer)?,
                vars,
                context,
                sqrt_alphas_cumprod: schedule.sqrt_alphas_cumprod.clone(),
                sqrt_one_minus_alphas_cumprod: schedule.sqrt_one_minus_alphas_cumprod.clone(),
            },
            unused,
        ))
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    pub fn context(&self) -> &Tensor {
        &self.context
    }

    /// Timesteps of the schedule (the range `t` is drawn from).
    pub fn timesteps(&self) -> usize {
        self.sqrt_alphas_cumprod.len()
    }

    /// `mean_b mean((v_pred − v_target)²)` for `batch` with the current tensors, on the
    /// differentiable kernels (whatever the calling thread's mode).
    pub fn loss(&self, batch: &LatentBatch) -> Result<Tensor> {
        let _training = DifferentiableScope::enter(true);
        let device = &self.base.device;
        let b = batch.z_gt.dim(0)?;
        if batch.timesteps.len() != b || batch.z_lq.dims() != batch.z_gt.dims() {
            return Err(Error::Config(format!(
                "training batch: {} timesteps and LQ latents {:?} for HQ latents {:?}",
                batch.timesteps.len(),
                batch.z_lq.dims(),
                batch.z_gt.dims()
            )));
        }
        let per_sample = |table: &[f64]| -> Result<Tensor> {
            let values = batch
                .timesteps
                .iter()
                .map(|&t| {
                    table
                        .get(t)
                        .map(|v| *v as f32)
                        .ok_or_else(|| Error::Config(format!("timestep {t} outside the schedule")))
                })
                .collect::<Result<Vec<f32>>>()?;
            Ok(Tensor::from_vec(values, (b, 1, 1, 1), device)?)
        };
        let a = per_sample(&self.sqrt_alphas_cumprod)?;
        let s = per_sample(&self.sqrt_one_minus_alphas_cumprod)?;
        let x_noisy = (batch.z_gt.broadcast_mul(&a)? + batch.noise.broadcast_mul(&s)?)?;
        let target = (batch.noise.broadcast_mul(&a)? - batch.z_gt.broadcast_mul(&s)?)?;
        let t: Vec<f32> = batch.timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(t, b, device)?;
        let struct_cond = self.base.lq_encoder.forward(&batch.z_lq, &t)?;
        let (_, tokens, width) = self.context.dims3()?;
        let context = self
            .context
            .broadcast_as((b, tokens, width))?
            .contiguous()?;
        let inputs = UNetInputs {
            timesteps: &t,
            context: &context,
            struct_cond: Some(&struct_cond),
        };
        let v = self.base.unet.forward(&x_noisy, &inputs)?;
        Ok((v - target)?.sqr()?.mean_all()?)
    }

    /// The mean loss over `micro_batches` and the gradient of that mean for every trained
    /// tensor (in [`BaseTrainer::vars`] order; zeros where a tensor got none).
    pub fn gradients(&self, micro_batches: &[LatentBatch]) -> Result<(f32, Vec<Tensor>)> {
        if micro_batches.is_empty() {
            return Err(Error::Config("a training step needs a batch".into()));
        }
        let k = micro_batches.len() as f64;
        let mut sums: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let mut loss_sum = 0f64;
        for batch in micro_batches {
            let loss = (self.loss(batch)? / k)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let grads = loss.backward()?;
            for ((_, var), sum) in self.vars.iter().zip(sums.iter_mut()) {
                if let Some(g) = grads.get(var.as_tensor()) {
                    *sum = Some(match sum.take() {
                        None => g.clone(),
                        Some(acc) => (acc + g)?,
                    });
                }
            }
        }
        let grads = sums
            .into_iter()
            .zip(&self.vars)
            .map(|(g, (_, var))| match g {
                Some(g) => Ok(g),
                None => Ok(var.as_tensor().zeros_like()?),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((loss_sum as f32, grads))
    }

    /// One AdamW update from `grads` (in [`BaseTrainer::vars`] order).
    pub fn apply(&mut self, grads: &[Tensor]) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::Config(format!(
                "{} gradients for {} trained tensors",
                grads.len(),
                self.vars.len()
            )));
        }
        let by_id: HashMap<_, _> = self
            .vars
            .iter()
            .zip(grads)
            .map(|((_, var), g)| (var.as_tensor().id(), g.clone()))
            .collect();
        self.optimizer
            .step_with(|var| by_id.get(&var.as_tensor().id()).cloned())
    }

    /// A whole step: this rank's micro-batches, gradients averaged over the ranks of `comm`,
    /// one update. Returns the loss averaged over the ranks.
    pub fn step(&mut self, micro_batches: &[LatentBatch], comm: &dyn Communicator) -> Result<f32> {
        let (loss, grads) = self.averaged_gradients(micro_batches, comm)?;
        self.apply(&grads)?;
        Ok(loss)
    }

    /// [`BaseTrainer::gradients`] of this rank's micro-batches, then loss and gradients
    /// averaged over the ranks of `comm` (one reduction).
    pub fn averaged_gradients(
        &self,
        micro_batches: &[LatentBatch],
        comm: &dyn Communicator,
    ) -> Result<(f32, Vec<Tensor>)> {
        let (loss, mut grads) = self.gradients(micro_batches)?;
        grads.push(Tensor::new(&[loss], &self.base.device)?);
        comm.all_reduce_mean(&mut grads)?;
        let loss = grads.pop().expect("pushed above").to_vec1::<f32>()?[0];
        Ok((loss, grads))
    }

    /// Updates taken (the bias-correction step count).
    pub fn steps_taken(&self) -> usize {
        self.optimizer.steps_taken()
    }

    /// The optimizer moments (`optim.<name>.m|v`, CPU f32) and the step count.
    pub fn optimizer_state(&self) -> Result<(HashMap<String, Tensor>, usize)> {
        self.optimizer.state("optim")
    }

    pub fn load_optimizer_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        steps: usize,
    ) -> Result<()> {
        self.optimizer.load_state("optim", tensors, steps)
    }

    /// Sets the trained tensors from stored values (resume); each must be present and shaped.
    pub fn set_trained(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in &self.vars {
            let t = tensors
                .get(name)
                .ok_or_else(|| Error::Input(format!("checkpoint lacks trained tensor `{name}`")))?;
            if t.dims() != var.dims() {
                return Err(Error::Input(format!(
                    "checkpoint tensor `{name}` has shape {:?}, the model {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// The trained tensors by name on the CPU.
    pub fn trained_tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.vars
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_device(&Device::Cpu)?)))
            .collect()
    }
}
