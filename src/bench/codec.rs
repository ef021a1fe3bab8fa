//! `pfstorer bench codec`: VAE encode, CFW encoder features and CFW fused decode.

use crate::cli::model_args::{peak_rss_bytes, ArchArgs, RunArgs};
use crate::device::{device_label, dtype_name};
use crate::model::base::{CfwModel, VAE_PREFIX};
use crate::model::vae::AutoencoderKL;
use crate::weights::{CheckedWeights, Source, TensorStore};
use candle_core::{DType, Tensor};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::*;

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

pub fn run(b: CodecBench) -> anyhow::Result<()> {
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
    let (mut encode, mut features_s, mut decode): (Vec<f64>, Vec<f64>, Vec<f64>) =
        (Vec::new(), Vec::new(), Vec::new());
    for run in 0..=b.runs {
        let stages = time_codec_stages(&vae, dtype, &cfw, &lq, b.dec_w)?;
        if run > 0 {
            encode.push(stages.vae_encode_s);
            features_s.push(stages.cfw_encode_s);
            decode.push(stages.cfw_decode_s);
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "what": "pfstorer: VAE encode, CFW encoder features, CFW fused decode",
            "size": b.size,
            "dec_w": b.dec_w,
            "device": device_label(&device),
            "dtype": dtype_name(dtype),
            "load_s": load_s,
            "vae_encode_s": median(&encode),
            "cfw_encode_s": median(&features_s),
            "cfw_decode_s": median(&decode),
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
