//! `pfstorer bench`: timings of the networks, for the performance notes (never a test).
//!
//! `pfstorer bench unet` times what the reference kit's `bench_unet_cpu.py` times: one
//! time-aware encoder pass on a batch-1 LQ latent plus one UNet forward on the CFG batch of 2,
//! at a square latent, with seeded random weights (or a weights file, e.g. the one the reference
//! script saves with `--save-weights`, so both sides run on the same numbers).
//! `bench weights` writes seeded random full-size checkpoints (original key names) once, so
//! pfstorer and the PyTorch reference (scripts/gpu_reference.py) time identical weights;
//! `bench restore` times a whole restore and `bench train` personalization iterations.
//! Every subcommand prints one JSON line.

use super::model_args::{device_request, peak_rss_bytes, ArchArgs, RunArgs};
use crate::config::{BaseModelConfig, CfwConfig};
use crate::device::{device_label, dtype_name, DeviceRequest, DtypeRequest, Workload};
use crate::diffusion::schedule::Schedule;
use crate::imaging::ImageF32;
use crate::model::base::{BaseModel, CfwModel, Residency, VAE_PREFIX};
use crate::model::lq_encoder::LqEncoder;
use crate::model::unet::{UNet, UNetInputs};
use crate::model::vae::AutoencoderKL;
use crate::personalize::trainer::{TrainConfig, TrainableParams, Trainer};
use crate::restore::{
    ResidencyPolicy, RestoreSettings, Restorer, Stage, StagedNetworks, TargetSize, WeightSource,
    BASE_SUBJECT, DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT,
};
use crate::weights::checked::random_tensor;
use crate::weights::{CheckedWeights, Source, TensorStore};
use candle_core::{DType, Device, Shape, Tensor};
use clap::{Args, Subcommand};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Time-aware encoder + UNet forward with the CFG batch of 2.
    Unet(UnetBench),
    /// Write seeded random full-size checkpoints (diffusion model and CFW autoencoder).
    Weights(WeightsBench),
    /// One whole restore of a square synthetic image (encode, sampling loop, CFW decode).
    Restore(RestoreBench),
    /// VAE encode of an image, CFW encoder features and CFW fused decode, each over several runs.
    Codec(CodecBench),
    /// Personalization training iterations on synthetic references.
    Train(TrainBench),
    /// Base-model training steps (train-base) on synthetic faces.
    TrainBase(TrainBaseBench),
}

#[derive(Debug, Args)]
pub struct WeightsBench {
    /// Folder for stablesr_face_random.safetensors and cfw_random.safetensors.
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct RestoreBench {
    /// Image side in pixels (input and output; square).
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Sampling steps.
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Classifier-free guidance scale (any value but 1 runs the CFG batch of 2).
    #[arg(long, default_value_t = 4.0)]
    pub cfg: f64,
    /// Latent tiles per UNet call (as `restore --tile-batch`); default from the device.
    #[arg(long, value_name = "N")]
    pub tile_batch: Option<usize>,
    /// As `restore --residency`: staged loads each stage's networks for it (auto: on the CPU).
    #[arg(long, value_enum, default_value_t = ResidencyPolicy::Auto)]
    pub residency: ResidencyPolicy,
    /// Also report each stage's peak RSS (`stage_peak_rss_gb`). Resets the kernel's high-water
    /// mark as each stage starts, so an outside `/usr/bin/time` then sees only the last stage's.
    #[arg(long)]
    pub stage_peaks: bool,
    /// Diffusion checkpoint; default: seeded random weights of the released architecture.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// CFW checkpoint; default: seeded random weights.
    #[arg(long)]
    pub cfw: Option<PathBuf>,
    #[command(flatten)]
    pub arch: ArchArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Args)]
pub struct CodecBench {
    /// Image side in pixels (square).
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Timed runs of each stage after one warm-up run (at least 1).
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    pub runs: usize,
    /// CFW fusion weight (`--dec-w`).
    #[arg(long, default_value_t = 0.5)]
    pub dec_w: f64,
    /// Diffusion checkpoint (only its VAE encoder is read); default: seeded random weights.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// CFW checkpoint; default: seeded random weights.
    #[arg(long)]
    pub cfw: Option<PathBuf>,
    #[command(flatten)]
    pub arch: ArchArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

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
    /// Timed iterations (after one untimed warm-up iteration).
    #[arg(long, default_value_t = 2)]
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
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 2)]
    pub iters: usize,
    #[command(flatten)]
    pub model: TrainBenchModel,
}

#[derive(Debug, Args)]
pub struct UnetBench {
    /// Latent size (square); 64 is a 512x512 image.
    #[arg(long, default_value_t = 64)]
    pub latent: usize,
    /// Timed runs after one warm-up run (at least 1).
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    pub runs: usize,
    /// StableSR YAML of the architecture; default: the released face model.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Weights with the checkpoint's key names; default: seeded random weights.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    #[command(flatten)]
    pub run: RunArgs,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        BenchWhat::Unet(b) => bench_unet(b),
        BenchWhat::Weights(b) => bench_weights(b),
        BenchWhat::Restore(b) => bench_restore(b),
        BenchWhat::Codec(b) => bench_codec(b),
        BenchWhat::Train(b) => bench_train(b),
        BenchWhat::TrainBase(b) => bench_train_base(b),
    }
}

/// A count of timed runs: the medians need one.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("expected a whole number of at least 1, got `{s}`")),
    }
}

fn bench_unet(b: UnetBench) -> anyhow::Result<()> {
    let (device, dtype) = b.run.device_dtype()?;
    let cfg = match &b.config {
        Some(path) => BaseModelConfig::from_yaml_file(path)?,
        None => BaseModelConfig::default(),
    };
    let weights = match &b.weights {
        Some(path) => CheckedWeights::from_store(Arc::new(TensorStore::open(path)?)),
        None => CheckedWeights::new(Source::Random(0)),
    };
    let t_load = Instant::now();
    let vb = weights.var_builder(dtype, &device);
    let unet = UNet::new(&cfg.unet, vb.pp("model.diffusion_model"))?;
    let encoder = LqEncoder::new(&cfg.lq_encoder, vb.pp("structcond_stage_model"))?;
    weights.finish(&["model.diffusion_model.", "structcond_stage_model."])?;
    let load_s = t_load.elapsed().as_secs_f64();

    let l = b.latent;
    let c = cfg.unet.in_channels;
    let randn = |shape: &[usize]| {
        Tensor::randn(0f32, 1f32, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype)?.to_device(&device))
    };
    let x = randn(&[2, c, l, l])?;
    let lq = randn(&[1, c, l, l])?;
    let context = randn(&[2, 77, cfg.unet.context_dim])?;
    let t = Tensor::new(&[500f32, 500.], &device)?;
    let t1 = Tensor::new(&[500f32], &device)?;

    let mut times = Vec::new();
    for run in 0..=b.runs {
        let start = Instant::now();
        let feats = encoder.forward(&lq, &t1)?;
        let inputs = UNetInputs {
            timesteps: &t,
            context: &context,
            struct_cond: Some(&feats),
        };
        let out = unet.forward(&x, &inputs)?;
        // Force completion on asynchronous devices.
        out.sum_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
        if run > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "what": "pfstorer: encoder + UNet forward, CFG batch 2",
            "latent": l,
            "config": b.config.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "released face model".into()),
            "device": device_label(&device),
            "dtype": dtype_name(dtype),
            "load_s": load_s,
            "median_s": median,
            "runs_s": times,
            "peak_rss_gb": peak_rss_bytes().map(|b| b as f64 / 1e9),
        })
    );
    Ok(())
}

fn base_config(path: &Option<PathBuf>) -> anyhow::Result<BaseModelConfig> {
    Ok(match path {
        Some(p) => BaseModelConfig::from_yaml_file(p)?,
        None => BaseModelConfig::default(),
    })
}

/// The diffusion model from `path`, or seeded random weights of `cfg`'s architecture.
fn load_base(
    path: &Option<PathBuf>,
    cfg: BaseModelConfig,
    dtype: DType,
    device: &Device,
    residency: Residency,
) -> anyhow::Result<BaseModel> {
    Ok(match path {
        Some(p) => BaseModel::load_with(p, cfg, dtype, device, residency)?.0,
        None => {
            let weights = CheckedWeights::new(Source::Random(0));
            BaseModel::from_weights_with(cfg, &weights, dtype, device, residency)?.0
        }
    })
}

fn bench_weights(b: WeightsBench) -> anyhow::Result<()> {
    let started = Instant::now();
    let base_file = b.out_dir.join("stablesr_face_random.safetensors");
    let cfw_file = b.out_dir.join("cfw_random.safetensors");
    for f in [&base_file, &cfw_file] {
        crate::fsutil::check_overwrite(f, b.force)?;
    }
    // Build each model once against a shapes-only source to learn every key it requests, then
    // write the seeded value of each; the schedule buffers get their true values, since the
    // reference samples with the buffers it loads.
    let probe = CheckedWeights::shapes_only();
    BaseModel::from_weights(BaseModelConfig::default(), &probe, DType::F32, &Device::Cpu)?;
    let schedule = Schedule::linear(&BaseModelConfig::default().diffusion)?;
    let schedule_values: Vec<(&str, &Vec<f64>)> = vec![
        ("betas", &schedule.betas),
        ("alphas_cumprod", &schedule.alphas_cumprod),
        ("alphas_cumprod_prev", &schedule.alphas_cumprod_prev),
        ("sqrt_alphas_cumprod", &schedule.sqrt_alphas_cumprod),
        (
            "sqrt_one_minus_alphas_cumprod",
            &schedule.sqrt_one_minus_alphas_cumprod,
        ),
        (
            "log_one_minus_alphas_cumprod",
            &schedule.log_one_minus_alphas_cumprod,
        ),
        (
            "sqrt_recip_alphas_cumprod",
            &schedule.sqrt_recip_alphas_cumprod,
        ),
        (
            "sqrt_recipm1_alphas_cumprod",
            &schedule.sqrt_recipm1_alphas_cumprod,
        ),
        ("posterior_variance", &schedule.posterior_variance),
        (
            "posterior_log_variance_clipped",
            &schedule.posterior_log_variance_clipped,
        ),
        ("posterior_mean_coef1", &schedule.posterior_mean_coef1),
        ("posterior_mean_coef2", &schedule.posterior_mean_coef2),
    ];
    let base_count = write_random(&base_file, &probe.requested(), b.seed, &schedule_values)?;

    let probe = CheckedWeights::shapes_only();
    CfwModel::from_weights(CfwConfig::default(), &probe, DType::F32, &Device::Cpu)?;
    let cfw_count = write_random(&cfw_file, &probe.requested(), b.seed, &[])?;
    println!(
        "{}",
        serde_json::json!({
            "what": "pfstorer: random full-size checkpoints",
            "base": base_file.display().to_string(),
            "base_tensors": base_count,
            "cfw": cfw_file.display().to_string(),
            "cfw_tensors": cfw_count,
            "seed": b.seed,
            "seconds": started.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}

/// Writes every requested tensor (seeded values, or `fixed` ones by name) as f32 safetensors.
fn write_random(
    path: &Path,
    requested: &std::collections::BTreeMap<String, Vec<usize>>,
    seed: u64,
    fixed: &[(&str, &Vec<f64>)],
) -> anyhow::Result<usize> {
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(requested.len());
    for (name, shape) in requested {
        let values: Vec<f32> = match fixed.iter().find(|(n, _)| n == name) {
            Some((_, v)) => v.iter().map(|&x| x as f32).collect(),
            None => random_tensor(&Shape::from(shape.as_slice()), name, seed)?
                .flatten_all()?
                .to_vec1()?,
        };
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        buffers.push((name.clone(), shape.clone(), bytes));
    }
    let views = buffers
        .iter()
        .map(|(name, shape, bytes)| {
            Ok((
                name.clone(),
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytes,
                )?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    crate::fsutil::write_atomic(path, crate::fsutil::WriteMode::Replace, |tmp| {
        safetensors::tensor::serialize_to_file(views, None, tmp)
            .map_err(|e| crate::error::Error::Input(format!("{}: {e}", tmp.display())))
    })?;
    Ok(buffers.len())
}

fn bench_restore(b: RestoreBench) -> anyhow::Result<()> {
    let (device, dtype) = b.run.device_dtype()?;
    let source = |path: &Option<PathBuf>| -> anyhow::Result<WeightSource> {
        Ok(match path {
            Some(p) => WeightSource::open(p)?,
            None => WeightSource::Random(0),
        })
    };
    let (base_source, cfw_source) = (source(&b.base)?, source(&b.cfw)?);
    // As `pfstorer restore`: the prompts' contexts from the text encoder alone, then the
    // sampling networks without it (loaded once, or stage by stage).
    let t_load = Instant::now();
    let base_cfg = b.arch.base_config()?;
    let (text_model, _) =
        base_source.load_base(base_cfg.clone(), dtype, &device, Residency::TextOnly)?;
    let mut load_s = t_load.elapsed().as_secs_f64();
    let prompt = DEFAULT_PROMPT.replace('*', BASE_SUBJECT);
    let t_text = Instant::now();
    let cond = Restorer::text_context(&text_model, &prompt)?;
    let uncond = Restorer::text_context(&text_model, DEFAULT_NEGATIVE_PROMPT)?;
    let text_s = t_text.elapsed().as_secs_f64();
    drop(text_model);

    let settings = RestoreSettings {
        steps: b.steps,
        guidance: b.cfg,
        tile_batch: b.tile_batch,
        ..RestoreSettings::default()
    };
    let cfw_cfg = b.arch.cfw_config()?;
    let staged = b.residency.is_staged(&device);
    let t_load = Instant::now();
    let (base, cfw);
    let restorer = if staged {
        let networks = StagedNetworks {
            base: base_source,
            base_config: base_cfg,
            cfw: cfw_source,
            cfw_config: cfw_cfg,
            dtype,
            // As `pfstorer restore`: the CFW autoencoder in f32.
            cfw_dtype: DType::F32,
            device: device.clone(),
        };
        Restorer::staged(networks, settings, cond, uncond)?
    } else {
        base = base_source
            .load_base(base_cfg, dtype, &device, Residency::WithoutText)?
            .0;
        cfw = cfw_source.load_cfw(cfw_cfg, DType::F32, &device)?.0;
        Restorer::new(&base, &cfw, settings, cond, uncond)?
    };
    load_s += t_load.elapsed().as_secs_f64();
    let image = synthetic_face(b.size, 7);
    // Each stage's peak RSS: the high-water mark is read and reset as the next stage starts.
    let before_restore = peak_rss_bytes();
    let stage_peaks: Rc<RefCell<Vec<StagePeak>>> = Rc::default();
    let peaks = stage_peaks.clone();
    let resettable = b.stage_peaks && reset_peak_rss();
    if b.stage_peaks {
        restorer.on_stage(Box::new(move |stage| {
            let mut peaks = peaks.borrow_mut();
            if let Some(last) = peaks.last_mut() {
                last.1 = peak_rss_bytes().filter(|_| resettable);
            }
            reset_peak_rss();
            peaks.push((stage, None));
        }));
    }
    let t_total = Instant::now();
    let (_, work) = restorer.work(image.width, image.height, TargetSize::Scale(1.0))?;
    eprintln!("work: {work}");
    let out = restorer.restore(&image, TargetSize::Scale(1.0), &mut |_, _| {})?;
    if let Some(last) = stage_peaks.borrow_mut().last_mut() {
        last.1 = peak_rss_bytes().filter(|_| resettable);
    }
    let stage_peaks = stage_peaks.borrow();
    let gb = |b: Option<u64>| b.map(|b| b as f64 / 1e9);
    let stage_peak_rss_gb: serde_json::Map<String, serde_json::Value> = stage_peaks
        .iter()
        .map(|(stage, peak)| (format!("{stage:?}").to_lowercase(), gb(*peak).into()))
        .collect();
    let peak_rss = if resettable {
        stage_peaks
            .iter()
            .filter_map(|(_, p)| *p)
            .chain(before_restore)
            .max()
    } else {
        peak_rss_bytes()
    };
    // The prompts' encoding counts as in the reference's timing; a staged restore's loads
    // are part of its work and counted too (`stage_load_s`).
    let total_s = t_total.elapsed().as_secs_f64() + text_s;
    let stages = restorer.stage_seconds();
    println!(
        "{}",
        serde_json::json!({
            "what": "pfstorer: restore (VAE encode, DDPM loop with CFG, CFW decode, colour fix)",
            "size": b.size,
            "output": [out.width, out.height],
            "steps": b.steps,
            "device": device_label(&device),
            "dtype": dtype_name(dtype),
            "residency": if staged { "staged" } else { "resident" },
            "weights": b.base.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "random".into()),
            "load_s": load_s,
            "total_s": total_s,
            "text_s": text_s,
            "stage_load_s": stages.load,
            "vae_encode_s": stages.encode,
            "sample_s": stages.sample,
            "cfw_decode_s": stages.decode,
            "per_step_s": stages.sample / b.steps as f64,
            "tiles_per_batch": restorer.tiling().tiles_per_batch,
            "unet_calls": restorer.unet_calls(),
            "peak_rss_gb": gb(peak_rss),
            "stage_peak_rss_gb": stage_peak_rss_gb,
        })
    );
    Ok(())
}

/// A restore stage and the peak RSS while it ran (bytes; `None` where peaks cannot be reset).
type StagePeak = (Stage, Option<u64>);

/// Resets this process's peak RSS (`VmHWM`) to its current RSS; false where the kernel does not
/// allow it (then peaks cannot be told apart by stage).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn bench_codec(b: CodecBench) -> anyhow::Result<()> {
    let (device, dtype) = b.run.device_dtype()?;
    let base_cfg = b.arch.base_config()?;
    let weights = match &b.base {
        Some(path) => CheckedWeights::from_store(Arc::new(TensorStore::open(path)?)),
        None => CheckedWeights::new(Source::Random(0)),
    };
    let t_load = Instant::now();
    let vae = AutoencoderKL::without_decoder(
        &base_cfg.vae,
        weights.var_builder(dtype, &device).pp(VAE_PREFIX),
        weights
            .check_only()
            .var_builder(dtype, &device)
            .pp(VAE_PREFIX),
    )?;
    weights.finish(&[&format!("{VAE_PREFIX}.")])?;
    let cfw_cfg = b.arch.cfw_config()?;
    // As `pfstorer restore`: the CFW autoencoder in f32.
    let cfw = match &b.cfw {
        Some(p) => CfwModel::load(p, cfw_cfg, DType::F32, &device)?.0,
        None => {
            let weights = CheckedWeights::new(Source::Random(0));
            CfwModel::from_weights(cfw_cfg, &weights, DType::F32, &device)?.0
        }
    };
    let load_s = t_load.elapsed().as_secs_f64();
    let image = synthetic_face(b.size, 7);
    let lq = crate::imaging::tensor::image_to_tensor(&image, &device)?;
    let (mut encode, mut features_s, mut decode) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..=b.runs {
        let stages = time_codec_stages(&vae, dtype, &cfw, &lq, b.dec_w)?;
        if run > 0 {
            encode.push(stages.vae_encode_s);
            features_s.push(stages.cfw_encode_s);
            decode.push(stages.cfw_decode_s);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    println!(
        "{}",
        serde_json::json!({
            "what": "pfstorer: VAE encode, CFW encoder features, CFW fused decode",
            "size": b.size,
            "dec_w": b.dec_w,
            "device": device_label(&device),
            "dtype": dtype_name(dtype),
            "load_s": load_s,
            "vae_encode_s": median(&mut encode),
            "cfw_encode_s": median(&mut features_s),
            "cfw_decode_s": median(&mut decode),
            "runs_s": {"vae_encode": encode, "cfw_encode": features_s, "cfw_decode": decode},
            "peak_rss_gb": peak_rss_bytes().map(|b| b as f64 / 1e9),
        })
    );
    Ok(())
}

/// Seconds of the codec stages of one restore, each timed once on its own.
struct CodecStages {
    vae_encode_s: f64,
    cfw_encode_s: f64,
    cfw_decode_s: f64,
}

/// Times what the reference script times separately: the diffusion VAE's encode of the image,
/// and the CFW autoencoder's encoder features and fused decode of that latent.
fn time_codec_stages(
    vae: &AutoencoderKL,
    dtype: DType,
    cfw: &CfwModel,
    lq: &Tensor,
    dec_w: f64,
) -> anyhow::Result<CodecStages> {
    let t = Instant::now();
    let latent = vae.encode(&lq.to_dtype(dtype)?)?.mean;
    latent.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    let vae_encode_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (_, features) = cfw
        .autoencoder
        .encode_with_features(&lq.to_dtype(cfw.dtype)?)?;
    features[0]
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    let cfw_encode_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let decoded = cfw
        .autoencoder
        .decode_fused(&latent.to_dtype(cfw.dtype)?, &features, dec_w)?;
    decoded
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    let cfw_decode_s = t.elapsed().as_secs_f64();
    Ok(CodecStages {
        vae_encode_s,
        cfw_encode_s,
        cfw_decode_s,
    })
}

/// A smooth face-sized test pattern (deterministic), RGB in [0, 1].
fn synthetic_face(size: usize, seed: u64) -> ImageF32 {
    let phase = seed as f32 * 0.37;
    let data = (0..size * size)
        .flat_map(|i| {
            let (x, y) = (
                (i % size) as f32 / size as f32,
                (i / size) as f32 / size as f32,
            );
            let r = ((x - 0.5).powi(2) + (y - 0.45).powi(2)).sqrt();
            let skin = (1.0 - 2.5 * r).clamp(0.0, 1.0);
            [
                (0.25 + 0.6 * skin + 0.05 * (9.0 * x + phase).sin()).clamp(0.0, 1.0),
                (0.2 + 0.45 * skin + 0.05 * (7.0 * y).cos()).clamp(0.0, 1.0),
                (0.2 + 0.35 * skin + 0.05 * (5.0 * (x + y) + phase).sin()).clamp(0.0, 1.0),
            ]
        })
        .collect();
    ImageF32::new(size, size, 3, data)
}

fn bench_train(b: TrainBench) -> anyhow::Result<()> {
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
        let start = Instant::now();
        let report = trainer.step()?; // reads the loss back, so the step has completed
        losses.push(report.total);
        if i > 0 {
            iter_s.push(start.elapsed().as_secs_f64());
        }
    }
    let mut sorted = iter_s.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = sorted.get(sorted.len() / 2).copied();
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

fn bench_train_base(b: TrainBaseBench) -> anyhow::Result<()> {
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
        let start = Instant::now();
        let batch = run.micro_batch(i, &positions)?;
        let prepared = start.elapsed().as_secs_f64();
        let loss = run
            .trainer
            .step(std::slice::from_ref(&batch), &SingleProcess)?;
        losses.push(loss);
        if i > 0 {
            data_s.push(prepared);
            step_s.push(start.elapsed().as_secs_f64());
        }
    }
    let median = |v: &[f64]| -> Option<f64> {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        s.get(s.len() / 2).copied()
    };
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
