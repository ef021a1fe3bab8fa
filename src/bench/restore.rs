//! `pfstorer bench restore`: one whole restore of a synthetic image, by stage.

use crate::cli::model_args::{peak_rss_bytes, ArchArgs, RunArgs};
use crate::device::{device_label, dtype_name};
use crate::model::base::Residency;
use crate::restore::{
    ResidencyPolicy, RestoreSettings, Restorer, Stage, StagedNetworks, TargetSize, WeightSource,
    BASE_SUBJECT, DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT,
};
use candle_core::DType;
use clap::Args;
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

use super::*;

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

pub fn run(b: RestoreBench) -> anyhow::Result<()> {
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
    sync(&device)?;
    let mut load_s = t_load.elapsed().as_secs_f64();
    let prompt = DEFAULT_PROMPT.replace('*', BASE_SUBJECT);
    let t_text = Instant::now();
    let cond = Restorer::text_context(&text_model, &prompt)?;
    let uncond = Restorer::text_context(&text_model, DEFAULT_NEGATIVE_PROMPT)?;
    sync(&device)?;
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
    sync(&device)?;
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
    sync(&device)?;
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
