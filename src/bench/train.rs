//! `pfstorer bench train` and `bench train-base`: personalization iterations and base-model
//! training steps on synthetic faces.

use crate::cli::model_args::{device_request, peak_rss_bytes};
use crate::device::{device_label, DeviceRequest, DtypeRequest, Workload};
use crate::imaging::ImageF32;
use crate::model::base::Residency;
use crate::personalize::trainer::{TrainConfig, TrainableParams, Trainer};
use crate::weights::{CheckedWeights, Source, TensorStore};
use candle_core::DType;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::*;

/// The model and device of the training benchmarks.
#[derive(Debug, Args)]
pub struct TrainBenchModel {
    /// Diffusion checkpoint; default: seeded random weights of the released architecture.
    #[arg(long)]
    pub base: Option<PathBuf>,
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where training runs (always in f32); auto: CUDA device 0 when usable, else the CPU.
    #[arg(long, default_value = "auto", value_name = "auto|cpu|cuda|cuda:N", value_parser = device_request)]
    pub device: DeviceRequest,
}

#[derive(Debug, Args)]
pub struct TrainBench {
    /// Training resolution in pixels.
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Timed iterations (after one untimed warm-up iteration; at least 1).
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    pub iters: usize,
    #[command(flatten)]
    pub model: TrainBenchModel,
}

#[derive(Debug, Args)]
pub struct TrainBaseBench {
    /// Training resolution in pixels.
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Images per step.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Timed steps (after one untimed warm-up step; at least 1).
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    pub iters: usize,
    #[command(flatten)]
    pub model: TrainBenchModel,
}

pub fn run_personalize(b: TrainBench) -> anyhow::Result<()> {
    // Training keeps everything in f32 (the trainer refuses half precision).
    let (device, _, line) =
        crate::device::resolve(b.model.device, DtypeRequest::Auto, Workload::Training)?;
    eprintln!("{line}");
    let t_load = Instant::now();
    let base = load_base(
        &b.model.base,
        base_config(&b.model.config)?,
        DType::F32,
        &device,
        Residency::Full,
    )?;
    let load_s = t_load.elapsed().as_secs_f64();
    let images: Vec<ImageF32> = (0..5).map(|k| synthetic_face(b.size, k)).collect();
    let t_prep = Instant::now();
    let params = TrainableParams::init(&base, 0)?;
    let mut trainer = Trainer::new(&base, params, &images, b.size, TrainConfig::default(), 0)?;
    let prepare_s = t_prep.elapsed().as_secs_f64();
    let mut iter_s = Vec::with_capacity(b.iters);
    let mut losses = Vec::with_capacity(b.iters + 1);
    for i in 0..=b.iters {
        sync(&device)?;
        let start = Instant::now();
        let report = trainer.step()?;
        // Reading the loss back does not wait for AdamW's update kernels on CUDA.
        sync(&device)?;
        losses.push(report.total);
        if i > 0 {
            iter_s.push(start.elapsed().as_secs_f64());
        }
    }
    let median = median(&iter_s);
    println!(
        "{}",
        serde_json::json!({
            "what": "pfstorer: personalization training iteration (batch 1, reference pass + x pass + backward + AdamW)",
            "size": b.size,
            "device": device_label(&device),
            "dtype": "f32",
            "weights": b.model.base.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "random".into()),
            "load_s": load_s,
            "prepare_s": prepare_s,
            "iter_s": iter_s,
            "median_s": median,
            "projected_500_s": median.map(|m| m * 500.0),
            "losses": losses,
            "peak_rss_gb": peak_rss_bytes().map(|b| b as f64 / 1e9),
        })
    );
    Ok(())
}

pub fn run_base(b: TrainBaseBench) -> anyhow::Result<()> {
    use crate::base_training::data::{FaceDataset, SampleRecipe, Sharding};
    use crate::base_training::parallel::SingleProcess;
    use crate::base_training::step::{adamw, BaseTrainer};
    use crate::base_training::trainable::TrainableWeights;
    use crate::base_training::{Run, RunPlan, BASE_LR, P_HQ};
    if b.batch_size == 0 || b.batch_size > 64 || b.iters > 1000 {
        return Err(crate::Error::Input(
            "--batch-size must be 1 to 64 and --iters at most 1000".into(),
        )
        .into());
    }
    let (device, _, line) =
        crate::device::resolve(b.model.device, DtypeRequest::Auto, Workload::Training)?;
    eprintln!("{line}");
    let t_load = Instant::now();
    let checked = match &b.model.base {
        Some(p) => CheckedWeights::from_store(Arc::new(TensorStore::open(p)?)),
        None => CheckedWeights::new(Source::Random(0)),
    };
    let weights = TrainableWeights::new(checked);
    let (mut trainer, _) = BaseTrainer::new(
        base_config(&b.model.config)?,
        &weights,
        &device,
        adamw(BASE_LR),
    )?;
    let load_s = t_load.elapsed().as_secs_f64();
    let trained: usize = trainer.vars().iter().map(|(_, v)| v.elem_count()).sum();
    // The data pipeline reads files: synthetic faces in a scratch folder.
    let dir = tempfile::tempdir()?;
    for k in 0..b.batch_size {
        let path = dir.path().join(format!("face{k}.png"));
        crate::imaging::io::save_png(
            &path,
            &synthetic_face(b.size, k as u64),
            None,
            false,
            &[],
            true,
        )?;
    }
    let data = FaceDataset::scan(&[dir.path().to_path_buf()])?;
    let plan = RunPlan {
        epochs: b.iters + 1,
        sharding: Sharding {
            batch_size: b.batch_size,
            grad_accum: 1,
            world_size: 1,
        },
        recipe: SampleRecipe {
            size: b.size,
            p_hq: P_HQ,
        },
        seed: 0,
    };
    let mut run = Run::new(&mut trainer, &data, plan, &SingleProcess)?;
    let positions: Vec<usize> = (0..b.batch_size).collect();
    let (mut data_s, mut step_s, mut losses) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..=b.iters {
        sync(&device)?;
        let start = Instant::now();
        let batch = run.micro_batch(i, &positions)?;
        sync(&device)?;
        let prepared = start.elapsed().as_secs_f64();
        let loss = run
            .trainer
            .step(std::slice::from_ref(&batch), &SingleProcess)?;
        sync(&device)?;
        losses.push(loss);
        if i > 0 {
            data_s.push(prepared);
            step_s.push(start.elapsed().as_secs_f64());
        }
    }
    let step_median = median(&step_s);
    println!(
        "{}",
        serde_json::json!({
            "what": "pfstorer: base-model training step (load + augment + degrade + 2 VAE encodes, encoder + UNet forward, backward, AdamW)",
            "size": b.size,
            "batch_size": b.batch_size,
            "device": crate::device::device_label(&device),
            "dtype": "f32",
            "weights": b.model.base.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "random".into()),
            "trained_parameters": trained,
            "load_s": load_s,
            "step_s": step_s,
            "data_s": data_s,
            "median_step_s": step_median,
            "images_per_s": step_median.map(|m| b.batch_size as f64 / m),
            "losses": losses,
            "peak_rss_gb": peak_rss_bytes().map(|b| b as f64 / 1e9),
        })
    );
    Ok(())
}
