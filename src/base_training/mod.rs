//! Base training (PFStorer Sec. 3.3, the "Base Model"): StableSR fine-tuned on a face data set
//! with StableSR's face recipe, the starting point of every personalized model.
//!
//! [`trainable`] decides what is trained (the time-aware encoder and the UNet's SFT layers) and
//! turns those tensors into variables; [`step`] is the loss and the AdamW update; [`data`] the
//! face folders, epoch order, sharding and per-sample draws; [`parallel`] the data-parallel
//! communicators and launch conventions; [`checkpoint`] the files written. [`Run`] ties them
//! together: which samples a step takes and how they become latents.

pub mod checkpoint;
pub mod data;
pub mod parallel;
pub mod step;
pub mod trainable;

use crate::diffusion::noise::standard_normal;
use crate::error::{Error, Result};
use crate::imaging::tensor::image_to_tensor;
use crate::kernels::DifferentiableScope;
use data::{epoch_order, prepare_sample, sample_rng, FaceDataset, SampleRecipe, Sharding};
use parallel::Communicator;
use rand::Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use step::{BaseTrainer, LatentBatch};

/// StableSR's base learning rate (`model.base_learning_rate` of its face config).
pub const BASE_LR: f64 = 5e-5;
/// Probability that the HQ image is also the LQ input (the paper's p_HQ; StableSR's face
/// class uses 0.005).
pub const P_HQ: f64 = 0.03;
/// Epochs of the paper's base model.
pub const EPOCHS: usize = 12;
/// Batch size and gradient accumulation of StableSR's face config.
pub const BATCH_SIZE: usize = 6;
pub const GRAD_ACCUM: usize = 2;

/// The learning rate with Lightning's `scale_lr` rule (StableSR's `--scale_lr`, off by
/// default): base × batch × accumulation × ranks.
pub fn scaled_lr(base: f64, sharding: &Sharding) -> f64 {
    base * sharding.global_batch() as f64
}

/// The settings that decide which samples a run sees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunPlan {
    pub epochs: usize,
    pub sharding: Sharding,
    pub recipe: SampleRecipe,
    pub seed: u64,
}

/// One rank's training run over a data set.
pub struct Run<'a> {
    pub trainer: &'a mut BaseTrainer,
    pub data: &'a FaceDataset,
    pub plan: RunPlan,
    pub comm: &'a dyn Communicator,
    /// Files whose body failed to decode during training (their header was fine), with why.
    pub failed: BTreeMap<PathBuf, String>,
    order: Option<(usize, Vec<usize>)>,
}

impl<'a> Run<'a> {
    pub fn new(
        trainer: &'a mut BaseTrainer,
        data: &'a FaceDataset,
        plan: RunPlan,
        comm: &'a dyn Communicator,
    ) -> Result<Self> {
        if plan.sharding.world_size != comm.world_size() {
            return Err(Error::Config(format!(
                "plan for {} ranks on a communicator of {}",
                plan.sharding.world_size,
                comm.world_size()
            )));
        }
        if plan.sharding.steps_per_epoch(data.len()) == 0 {
            return Err(Error::Input(format!(
                "{} usable images are fewer than one step's {} (batch size x gradient accumulation x ranks)",
                data.len(),
                plan.sharding.global_batch()
            )));
        }
        Ok(Run {
            trainer,
            data,
            plan,
            comm,
            failed: BTreeMap::new(),
            order: None,
        })
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.plan.sharding.steps_per_epoch(self.data.len())
    }

    pub fn total_steps(&self) -> usize {
        self.plan.epochs * self.steps_per_epoch()
    }

    fn order(&mut self, epoch: usize) -> &[usize] {
        if self.order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            self.order = Some((epoch, epoch_order(self.data.len(), self.plan.seed, epoch)));
        }
        &self.order.as_ref().expect("set above").1
    }

    /// The latents of the samples at `positions` of `epoch`'s order.
    pub fn micro_batch(&mut self, epoch: usize, positions: &[usize]) -> Result<LatentBatch> {
        let n = self.data.len();
        let order = self.order(epoch).to_vec();
        let (files, recipe, seed) = (&self.data.files, self.plan.recipe, self.plan.seed);
        // Decoding, augmentation and degradation of each sample on its own thread (each has
        // its own generator, so the result does not depend on the split); the GPU, when there
        // is one, waits less.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = positions.len().div_ceil(threads.max(1)).max(1);
        type Prepared = (data::PreparedSample, Vec<(PathBuf, String)>);
        let results: Vec<Result<Prepared>> = std::thread::scope(|scope| {
            let handles: Vec<_> = positions
                .chunks(chunk)
                .map(|part| {
                    let order = &order;
                    scope.spawn(move || {
                        part.iter()
                            .map(|&position| {
                                prepare_at(
                                    files,
                                    order[position % n],
                                    position,
                                    epoch,
                                    seed,
                                    &recipe,
                                )
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join().unwrap_or_else(|_| {
                        vec![Err(Error::Config("a data thread panicked".into()))]
                    })
                })
                .collect()
        });
        let mut prepared = Vec::with_capacity(positions.len());
        for result in results {
            let (sample, failures) = result?;
            self.failed.extend(failures);
            prepared.push(sample);
        }
        // The frozen VAE runs without a graph, on the fused inference kernels.
        let _inference = DifferentiableScope::enter(false);
        self.encode(prepared)
    }

    fn encode(&self, prepared: Vec<data::PreparedSample>) -> Result<LatentBatch> {
        let base = &self.trainer.base;
        let device = &base.device;
        let scale = base.config.diffusion.scale_factor;
        let stack = |images: Vec<&crate::imaging::ImageF32>| -> Result<candle_core::Tensor> {
            let parts = images
                .into_iter()
                .map(|img| image_to_tensor(img, device))
                .collect::<Result<Vec<_>>>()?;
            Ok(candle_core::Tensor::cat(&parts, 0)?)
        };
        let hq = base
            .vae
            .encode(&stack(prepared.iter().map(|p| &p.hq).collect())?)?;
        let lq = base
            .vae
            .encode(&stack(prepared.iter().map(|p| &p.lq).collect())?)?;
        let mut latent_dims = hq.mean.dims().to_vec();
        latent_dims[0] = 1;
        let timesteps = self.trainer.timesteps();
        let mut gt_noise = Vec::new();
        let mut lq_noise = Vec::new();
        let mut q_noise = Vec::new();
        let mut ts = Vec::new();
        for sample in prepared {
            let mut rng = sample.rng;
            gt_noise.push(standard_normal(&mut rng, &latent_dims, device)?);
            lq_noise.push(standard_normal(&mut rng, &latent_dims, device)?);
            ts.push(rng.gen_range(0..timesteps));
            q_noise.push(standard_normal(&mut rng, &latent_dims, device)?);
        }
        let cat = |parts: &[candle_core::Tensor]| candle_core::Tensor::cat(parts, 0);
        Ok(LatentBatch {
            z_gt: (hq.sample(&cat(&gt_noise)?)? * scale)?.detach(),
            z_lq: (lq.sample(&cat(&lq_noise)?)? * scale)?.detach(),
            timesteps: ts,
            noise: cat(&q_noise)?,
        })
    }

    /// Global step `step` (0-based over the whole run): this rank's micro-batches, averaged
    /// gradients, one update. Returns the loss averaged over the ranks.
    pub fn step(&mut self, step: usize) -> Result<f32> {
        let spe = self.steps_per_epoch();
        let (epoch, in_epoch) = (step / spe, step % spe);
        let sharding = self.plan.sharding;
        let batches = (0..sharding.grad_accum)
            .map(|micro| {
                let positions = sharding.positions(in_epoch, micro, self.comm.rank());
                self.micro_batch(epoch, &positions)
            })
            .collect::<Result<Vec<_>>>()?;
        self.trainer.step(&batches, self.comm)
    }
}

/// Sample `position` of an epoch from file `index`. A file whose body does not decode is
/// replaced by the next one in the sorted list (the same on every rank and every resumed run);
/// the failures are returned for the report.
fn prepare_at(
    files: &[PathBuf],
    mut index: usize,
    position: usize,
    epoch: usize,
    seed: u64,
    recipe: &SampleRecipe,
) -> Result<(data::PreparedSample, Vec<(PathBuf, String)>)> {
    let mut failures = Vec::new();
    let image = loop {
        let path = &files[index];
        match data::load_rgb(path) {
            Ok(img) => break img,
            Err(e) => {
                failures.push((path.clone(), e.to_string()));
                index = (index + 1) % files.len();
                if failures.len() >= files.len() {
                    return Err(Error::Input("no training image could be decoded".into()));
                }
            }
        }
    };
    let rng = sample_rng(seed, epoch, position);
    Ok((prepare_sample(&image, recipe, rng)?, failures))
}
