//! `pfstorer bench unet`: the time-aware encoder and UNet forward with the CFG batch of 2.

use crate::cli::model_args::{peak_rss_bytes, RunArgs};
use crate::config::BaseModelConfig;
use crate::device::{device_label, dtype_name};
use crate::model::lq_encoder::LqEncoder;
use crate::model::unet::{UNet, UNetInputs};
use crate::weights::{CheckedWeights, Source, TensorStore};
use candle_core::{Device, Tensor};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::*;

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

pub fn run(b: UnetBench) -> anyhow::Result<()> {
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
        sync(&device)?;
        let start = Instant::now();
        let feats = encoder.forward(&lq, &t1)?;
        let inputs = UNetInputs {
            timesteps: &t,
            context: &context,
            struct_cond: Some(&feats),
        };
        let out = unet.forward(&x, &inputs)?;
        drop(out);
        // The clock is read once the device has finished (CUDA runs asynchronously).
        sync(&device)?;
        if run > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    let median = median(&times);
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
