//! `pfstorer train-base`: fine-tune StableSR on a face folder into the paper's Base Model.

use super::batch::progress_bar;
use super::model_args::{device_request, dtype_request};
use crate::base_training::checkpoint::{
    load_state, save_state, write_base_checkpoint, TrainingState, TRAINING_KEY,
};
use crate::base_training::data::{FaceDataset, SampleRecipe, Sharding};
use crate::base_training::parallel::{Communicator, LaunchEnv, SingleProcess};
use crate::base_training::step::{adamw, BaseTrainer};
use crate::base_training::trainable::TrainableWeights;
use crate::base_training::{
    scaled_lr, Run, RunPlan, BASE_LR, BATCH_SIZE, EPOCHS, GRAD_ACCUM, P_HQ,
};
use crate::config::BaseModelConfig;
use crate::device::{DeviceRequest, DtypeRequest, Workload};
use crate::error::Error;
use crate::fsutil::{printable_path, WriteMode};
use crate::weights::base_fingerprint_cached;
use crate::weights::{hub, CheckedWeights, TensorStore};
use candle_core::DType;
use clap::Args;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Args)]
pub struct TrainBaseArgs {
    /// Folders of HQ face images (searched recursively; FFHQ at 512 or 1024 px).
    #[arg(long, required = true, num_args = 1.., value_name = "DIR")]
    pub data: Vec<PathBuf>,
    /// The trained base checkpoint to write (safetensors, every key of the init checkpoint).
    #[arg(short, long = "output", alias = "out", value_name = "FILE")]
    pub out: PathBuf,
    /// Checkpoint to start from; default: stablesr_000117.ckpt from the hub (Iceclear/StableSR),
    /// the generic StableSR model StableSR's face training starts from.
    #[arg(long, value_name = "FILE")]
    pub init: Option<PathBuf>,
    /// StableSR YAML describing the architecture; default: the released face model's.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Passes over the data set (the paper trains 12).
    #[arg(long, default_value_t = EPOCHS)]
    pub epochs: usize,
    /// Images per micro-batch on each device (StableSR's face config: 6).
    #[arg(long, default_value_t = BATCH_SIZE)]
    pub batch_size: usize,
    /// Micro-batches accumulated per update (StableSR's face config: 2).
    #[arg(long, default_value_t = GRAD_ACCUM)]
    pub grad_accum: usize,
    /// Learning rate of AdamW (StableSR's base rate).
    #[arg(long, default_value_t = BASE_LR)]
    pub lr: f64,
    /// Multiply the learning rate by batch size x accumulation x devices (StableSR's
    /// `--scale_lr`; off there by default as here).
    #[arg(long)]
    pub scale_lr: bool,
    /// Training resolution (square crops or resizes).
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Probability that the HQ image itself is the LQ input.
    #[arg(long, default_value_t = P_HQ)]
    pub p_hq: f64,
    /// Seed of the data order, augmentations, degradations and noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save a training checkpoint (`<out>.checkpoint`, with AdamW's moments) every N steps
    /// (0 = never).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub checkpoint_every: usize,
    /// Stop after N steps of this invocation, saving the training checkpoint for a later
    /// --resume (for job slots shorter than the run).
    #[arg(long, value_name = "N")]
    pub stop_after: Option<usize>,
    /// Continue from `<out>.checkpoint` of an interrupted run with the same settings.
    #[arg(long)]
    pub resume: bool,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
    /// Where the networks run; auto: CUDA device 0 when this build has CUDA and it opens, else
    /// the CPU. In a data-parallel launch each rank takes cuda:LOCAL_RANK.
    #[arg(long, default_value = "auto", value_name = "auto|cpu|cuda|cuda:N", value_parser = device_request)]
    pub device: DeviceRequest,
    /// Precision: training runs in f32 (auto means f32; AdamW's small updates vanish in half
    /// precision).
    #[arg(long, default_value = "auto", value_name = "auto|f32", value_parser = dtype_request)]
    pub dtype: DtypeRequest,
}

/// Most epochs one run may ask for.
const MAX_EPOCHS: usize = 10_000;
/// Largest batch size or accumulation accepted (memory is the real bound; this catches typos).
const MAX_BATCH: usize = 4096;

fn check_args(args: &TrainBaseArgs) -> anyhow::Result<()> {
    let bad = |msg: String| -> anyhow::Result<()> { Err(Error::Input(msg).into()) };
    if args.epochs == 0 || args.epochs > MAX_EPOCHS {
        return bad(format!(
            "--epochs {}: must be between 1 and {MAX_EPOCHS}",
            args.epochs
        ));
    }
    for (flag, v) in [
        ("--batch-size", args.batch_size),
        ("--grad-accum", args.grad_accum),
    ] {
        if v == 0 || v > MAX_BATCH {
            return bad(format!("{flag} {v}: must be between 1 and {MAX_BATCH}"));
        }
    }
    if !(args.lr.is_finite() && args.lr > 0.0 && args.lr < 1.0) {
        return bad(format!(
            "--lr {}: must be a positive number below 1",
            args.lr
        ));
    }
    if !(0.0..=1.0).contains(&args.p_hq) {
        return bad(format!("--p-hq {}: must be between 0 and 1", args.p_hq));
    }
    let max = crate::config::MAX_IMAGE_SIZE;
    if args.size < 64 || !args.size.is_multiple_of(64) || args.size > max {
        return bad(format!(
            "--size {}: use a multiple of 64 between 64 and {max} (the paper trains at 512)",
            args.size
        ));
    }
    if args.stop_after == Some(0) {
        return bad("--stop-after 0: give at least 1 step".into());
    }
    if let DtypeRequest::Exact(dtype) = args.dtype {
        if dtype != DType::F32 {
            return bad(format!(
                "--dtype {}: base training runs in f32 (AdamW updates of ~1e-5 vanish in half precision)",
                crate::device::dtype_name(dtype)
            ));
        }
    }
    Ok(())
}

/// The device of this rank (in a multi-rank launch CUDA device LOCAL_RANK) and the line
/// saying which it is.
fn rank_device(
    args: &TrainBaseArgs,
    env: &LaunchEnv,
) -> anyhow::Result<(candle_core::Device, String)> {
    let request = if env.world_size > 1 {
        if args.device == DeviceRequest::Cpu {
            return Err(Error::Input(format!(
                "a {}-rank launch ({}) trains on GPUs: drop --device cpu",
                env.world_size, env.launcher
            ))
            .into());
        }
        DeviceRequest::Cuda(env.local_rank)
    } else {
        args.device
    };
    let (device, _, line) = crate::device::resolve(request, args.dtype, Workload::Training)?;
    Ok((device, line))
}

fn communicator(
    env: &LaunchEnv,
    device: &candle_core::Device,
) -> anyhow::Result<Box<dyn Communicator>> {
    if env.world_size == 1 {
        return Ok(Box::new(SingleProcess));
    }
    #[cfg(feature = "nccl")]
    {
        Ok(Box::new(
            crate::base_training::parallel::nccl::NcclGroup::connect(env, device)?,
        ))
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = device;
        Err(Error::Input(format!(
            "a {}-rank launch ({}) needs the NCCL build of pfstorer (scripts/build-cuda.sh --nccl)",
            env.world_size, env.launcher
        ))
        .into())
    }
}

pub fn run(args: TrainBaseArgs) -> anyhow::Result<()> {
    check_args(&args)?;
    let env = LaunchEnv::from_process()?;
    let leader = env.rank == 0;
    let checkpoint = crate::fsutil::checkpoint_path(&args.out);
    // Where the results go is checked before any compute (rank 0 writes them).
    if leader {
        if let Some(init) = &args.init {
            crate::fsutil::check_not_an_input(&args.out, [init.as_path()])?;
        }
        if args.resume {
            if !checkpoint.is_file() {
                return Err(Error::Input(format!(
                    "--resume: no checkpoint at {}",
                    printable_path(&checkpoint)
                ))
                .into());
            }
            crate::fsutil::check_output_location(&args.out, args.force)?;
        } else {
            crate::fsutil::check_output_location(&args.out, args.force)?;
            if checkpoint.exists() && !args.force {
                return Err(Error::Input(format!(
                    "{} exists (an interrupted run?): continue it with --resume, or pass --force to start over",
                    printable_path(&checkpoint)
                ))
                .into());
            }
        }
    }
    let data = FaceDataset::scan(&args.data)?;
    if let Some(line) = data.skipped_summary() {
        if leader {
            eprintln!("note: {line}");
        }
    }
    for file in &data.files {
        if crate::fsutil::same_file(&args.out, file) {
            return Err(crate::fsutil::is_an_input_error(&args.out, file).into());
        }
    }

    let config = match &args.config {
        Some(path) => BaseModelConfig::from_yaml_file(path)?,
        None => BaseModelConfig::default(),
    };
    let sharding = Sharding {
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        world_size: env.world_size,
    };
    if sharding.steps_per_epoch(data.len()) == 0 {
        return Err(Error::Input(format!(
            "{} usable images are fewer than one step's {} (--batch-size x --grad-accum x ranks)",
            data.len(),
            sharding.global_batch()
        ))
        .into());
    }
    let (device, device_line) = rank_device(&args, &env)?;
    let init_path = match &args.init {
        Some(p) => p.clone(),
        None => hub::fetch_release_file(hub::GENERIC_DIFFUSION_FILE, "--init", !args.quiet)?,
    };
    let store = Arc::new(TensorStore::open(&init_path)?);
    let weights = TrainableWeights::new(CheckedWeights::from_store(store.clone()));
    let lr = if args.scale_lr {
        scaled_lr(args.lr, &sharding)
    } else {
        args.lr
    };
    let (mut trainer, unused) =
        BaseTrainer::new(config, &weights, &device, adamw(lr)).map_err(|e| match e {
            Error::Candle(c) => Error::Weights(format!("{}: {c}", init_path.display())),
            other => other,
        })?;
    let fingerprint = base_fingerprint_cached(&init_path)?;
    if let (Some(line), true) = (unused, leader && !args.quiet) {
        eprintln!("note: {}: {line}", printable_path(&init_path));
    }
    let comm = communicator(&env, &device)?;
    let plan = RunPlan {
        epochs: args.epochs,
        sharding,
        recipe: SampleRecipe {
            size: args.size,
            p_hq: args.p_hq,
        },
        seed: args.seed,
    };
    // What makes two runs the same run (resume), and the output's record.
    let training = serde_json::json!({
        "init_fingerprint": fingerprint,
        "data": args.data.iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
        "images": data.len(),
        "images_digest": files_digest(&data),
        "seed": args.seed,
        "size": args.size,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "world_size": env.world_size,
        "lr": lr,
        "p_hq": args.p_hq,
        "optimizer": "AdamW(0.9, 0.999, eps 1e-8, weight decay 0.01)",
        "target": "v",
        "trained": "structcond_stage_model.*, model.diffusion_model.*spade*",
    });
    let mut run = Run::new(&mut trainer, &data, plan, comm.as_ref())?;
    let total = run.total_steps();
    let mut start = 0;
    if args.resume {
        let state = load_state(&checkpoint)?;
        start = check_resumable(
            &state.training,
            &training,
            state.steps_done,
            total,
            &checkpoint,
        )?;
        run.trainer.set_trained(&state.trained)?;
        run.trainer
            .load_optimizer_state(&state.moments, state.steps_done)?;
    }
    if leader && !args.quiet {
        eprintln!(
            "train-base: {} images, {} steps ({} epochs x {} steps of {} images), {} rank(s) ({}); {}",
            data.len(),
            total,
            args.epochs,
            run.steps_per_epoch(),
            sharding.global_batch(),
            env.world_size,
            env.launcher,
            device_line,
        );
    }
    let bar = progress_bar(total, args.quiet || !leader);
    bar.set_position(start as u64);
    let clock = Instant::now();
    let mut smoothed: Option<f32> = None;
    for step in start..total {
        let loss = run.step(step)?;
        if !loss.is_finite() {
            return Err(Error::Input(format!(
                "step {}: the loss is {loss}; lower --lr (the last checkpoint is kept)",
                step + 1
            ))
            .into());
        }
        let s = smoothed.map_or(loss, |s| 0.98 * s + 0.02 * loss);
        smoothed = Some(s);
        let done = step + 1;
        let images_per_s =
            ((done - start) * sharding.global_batch()) as f64 / clock.elapsed().as_secs_f64();
        bar.set_position(done as u64);
        bar.set_message(format!(
            "epoch {}/{} loss {s:.4} {images_per_s:.2} img/s",
            step / run.steps_per_epoch() + 1,
            args.epochs
        ));
        let stopping = args.stop_after.is_some_and(|n| done - start >= n) && done < total;
        let periodic = args.checkpoint_every > 0 && done % args.checkpoint_every == 0;
        if leader && (periodic || stopping) && done < total {
            let (moments, steps) = run.trainer.optimizer_state()?;
            save_state(
                &checkpoint,
                &TrainingState {
                    trained: run.trainer.trained_tensors()?,
                    moments,
                    steps_done: steps,
                    training: training.clone(),
                },
            )?;
        }
        if stopping {
            bar.finish_and_clear();
            if leader && !args.quiet {
                eprintln!(
                    "stopped after step {done} of {total}; checkpoint {} (continue with --resume)",
                    printable_path(&checkpoint)
                );
            }
            return Ok(());
        }
    }
    bar.finish_and_clear();
    if !run.failed.is_empty() && leader {
        let names: Vec<String> = run
            .failed
            .keys()
            .take(5)
            .map(|p| printable_path(p))
            .collect();
        eprintln!(
            "note: {} images failed to decode during training and were replaced by their neighbours: {}",
            run.failed.len(),
            names.join(", ")
        );
    }
    if !leader {
        return Ok(());
    }
    let mut record = training;
    record["epochs"] = serde_json::json!(args.epochs);
    record["steps"] = serde_json::json!(total);
    let metadata = HashMap::from([
        (TRAINING_KEY.to_string(), record.to_string()),
        (
            "pfstorer_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ]);
    let trained = run.trainer.trained_tensors()?;
    write_base_checkpoint(
        &args.out,
        &store,
        &trained,
        metadata,
        WriteMode::from_force(args.force),
    )?;
    if checkpoint.is_file() {
        let _ = std::fs::remove_file(&checkpoint);
    }
    if !args.quiet {
        eprintln!(
            "base model written to {} (use it with --base)",
            printable_path(&args.out)
        );
    }
    Ok(())
}

/// SHA-256 of the sorted file list (names and sizes): a resumed run must see the same data.
fn files_digest(data: &FaceDataset) -> String {
    let mut text = String::new();
    for f in &data.files {
        let size = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
        text.push_str(&format!("{}\t{size}\n", f.display()));
    }
    crate::weights::digest::sha256_hex(text.as_bytes())
}

/// The step a checkpoint resumes at, if it is this run's: same settings except the number of
/// epochs (a run may be extended), and fewer steps done than planned.
fn check_resumable(
    saved: &serde_json::Value,
    now: &serde_json::Value,
    done: usize,
    total: usize,
    path: &std::path::Path,
) -> anyhow::Result<usize> {
    let keys = now
        .as_object()
        .map(|o| o.keys().cloned().collect::<Vec<_>>())
        .unwrap_or_default();
    for key in keys {
        if saved[&key] != now[&key] {
            return Err(Error::Input(format!(
                "--resume: {} belongs to another run ({key} {} there, {} here); rerun without --resume (and with --force), or with that run's settings",
                printable_path(path),
                saved[&key],
                now[&key]
            ))
            .into());
        }
    }
    if done >= total {
        return Err(Error::Input(format!(
            "--resume: {} has {done} of {total} steps done already; ask for more with --epochs",
            printable_path(path)
        ))
        .into());
    }
    Ok(done)
}
