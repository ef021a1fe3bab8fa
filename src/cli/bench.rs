//! `pfstorer bench`: timings of the networks, for the performance notes (never a test).
//!
//! `pfstorer bench unet` times what the reference kit's `bench_unet_cpu.py` times: one
//! time-aware encoder pass on a batch-1 LQ latent plus one UNet forward on the CFG batch of 2,
//! at a square latent, with seeded random weights (or a weights file, e.g. the one the reference
//! script saves with `--save-weights`, so both sides run on the same numbers).

use super::model_args::{parse_device_dtype, peak_rss_bytes};
use crate::config::BaseModelConfig;
use crate::model::lq_encoder::LqEncoder;
use crate::model::unet::{UNet, UNetInputs};
use crate::weights::{CheckedWeights, Source, TensorStore};
use candle_core::{Device, Tensor};
use clap::{Args, Subcommand};
use std::path::PathBuf;
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
}

#[derive(Debug, Args)]
pub struct UnetBench {
    /// Latent size (square); 64 is a 512x512 image.
    #[arg(long, default_value_t = 64)]
    pub latent: usize,
    /// Timed runs after one warm-up run.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// StableSR YAML of the architecture; default: the released face model.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Weights with the checkpoint's key names; default: seeded random weights.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        BenchWhat::Unet(b) => bench_unet(b),
    }
}

fn bench_unet(b: UnetBench) -> anyhow::Result<()> {
    let (device, dtype) = parse_device_dtype(&b.device, &b.dtype)?;
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
            "device": b.device,
            "dtype": b.dtype,
            "load_s": load_s,
            "median_s": median,
            "runs_s": times,
            "peak_rss_gb": peak_rss_bytes().map(|b| b as f64 / 1e9),
        })
    );
    Ok(())
}
