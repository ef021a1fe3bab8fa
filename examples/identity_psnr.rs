//! Does an identity help on the tiny fixture model? For each seed: make four synthetic
//! "photos of one person" (a shared pattern, varied per photo), personalize on them, heavily
//! degrade one of them, restore it with and without the identity, and compare PSNR to the clean
//! photo. With random tiny weights this measures the machinery (does training pull the output
//! towards the references?), not face quality.
//!
//! `cargo run --release --example identity_psnr -- [iterations] [steps] [seeds] [lr_ica]`
//! (defaults 100 training iterations, 20 sampling steps, 5 seeds, the spec's ICA learning rate;
//! fixtures from `$PFSTORER_FIXTURES` or tests/fixtures).

use pfstorer::config::{BaseModelConfig, CfwConfig};
use pfstorer::degrade::{degrade_image, Preset};
use pfstorer::imaging::ImageF32;
use pfstorer::metrics::psnr_ssim::psnr;
use pfstorer::model::base::{BaseModel, CfwModel};
use pfstorer::personalize::identity::{Identity, IdentityInfo};
use pfstorer::personalize::trainer::{TrainConfig, TrainableParams, Trainer};
use pfstorer::restore::{
    Personalization, RestoreSettings, Restorer, TargetSize, BASE_SUBJECT, DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_PROMPT,
};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

const SIZE: usize = 64;

/// Four photos sharing one "identity" (colours, stripe frequency, blob position), each with its
/// own shift and lighting.
fn identity_photos(seed: u64) -> Vec<ImageF32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let base_rgb: [f32; 3] = [
        rng.gen_range(0.3..0.8),
        rng.gen_range(0.2..0.7),
        rng.gen_range(0.2..0.6),
    ];
    let freq: f32 = rng.gen_range(4.0..12.0);
    let (cx, cy): (f32, f32) = (rng.gen_range(0.35..0.65), rng.gen_range(0.35..0.65));
    (0..4)
        .map(|_| {
            let shift: f32 = rng.gen_range(-0.05..0.05);
            let light: f32 = rng.gen_range(0.85..1.15);
            let data = (0..SIZE * SIZE)
                .flat_map(|i| {
                    let x = (i % SIZE) as f32 / SIZE as f32 + shift;
                    let y = (i / SIZE) as f32 / SIZE as f32;
                    let blob = (-((x - cx).powi(2) + (y - cy).powi(2)) * 12.0).exp();
                    let stripe = 0.1 * (freq * (x + 0.5 * y)).sin();
                    (0..3)
                        .map(|c| {
                            ((base_rgb[c] * (0.6 + 0.5 * blob) + stripe) * light).clamp(0.0, 1.0)
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            ImageF32::new(SIZE, SIZE, 3, data)
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<f64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let iterations = args.first().copied().unwrap_or(100.0) as usize;
    let steps = args.get(1).copied().unwrap_or(20.0) as usize;
    let seeds = args.get(2).copied().unwrap_or(5.0) as u64;
    let config = TrainConfig {
        lr_ica: args
            .get(3)
            .copied()
            .unwrap_or(TrainConfig::default().lr_ica),
        ..TrainConfig::default()
    };
    let root = std::env::var_os("PFSTORER_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
    let device = candle_core::Device::Cpu;
    let dtype = candle_core::DType::F32;
    let cfg = BaseModelConfig::from_yaml_file(&root.join("stablesr/config.yaml"))?;
    let (base, _) = BaseModel::load(
        &root.join("stablesr/model.safetensors"),
        cfg,
        dtype,
        &device,
    )?;
    let cfw_cfg = CfwConfig::from_yaml_file(&root.join("stablesr/cfw.yaml"))?;
    let (cfw, _) = CfwModel::load(
        &root.join("stablesr/cfw.safetensors"),
        cfw_cfg,
        dtype,
        &device,
    )?;
    let settings = RestoreSettings {
        steps,
        native_size: Some(SIZE),
        tile_overlap: Some(4),
        ..RestoreSettings::default()
    };

    println!(
        "seed  degraded_dB  base_dB  identity_dB  gain_dB  (iterations {iterations}, steps {steps}, ICA lr {})",
        config.lr_ica
    );
    let mut gains = Vec::new();
    for seed in 0..seeds {
        let photos = identity_photos(seed);
        let params = TrainableParams::init(&base, seed)?;
        let mut trainer = Trainer::new(&base, params, &photos, SIZE, config, seed)?;
        for _ in 0..iterations {
            trainer.step()?;
        }
        let info = IdentityInfo {
            name: format!("synthetic{seed}"),
            base_fingerprint: "tiny".into(),
            ref_sources: vec![],
            training: serde_json::json!({}),
        };
        let identity = Identity::from_trainer(&trainer, &info)?;
        // Dropping the trainer returns this thread to the inference kernels.
        drop(trainer);

        let clean = &photos[0];
        let (degraded, _) = degrade_image(clean, Preset::Heavy, 1000 + seed)?;
        let plain_prompt = DEFAULT_PROMPT.replace('*', BASE_SUBJECT);
        let cond = Restorer::text_context(&base, &plain_prompt)?;
        let uncond = Restorer::text_context(&base, DEFAULT_NEGATIVE_PROMPT)?;
        let plain = Restorer::new(&base, &cfw, settings.clone(), cond.clone(), uncond.clone())?;
        let without = plain.restore(&degraded, TargetSize::Scale(1.0), &mut |_, _| {})?;
        let personalization = Personalization::new(
            &identity,
            &base,
            "tiny",
            DEFAULT_PROMPT,
            DEFAULT_NEGATIVE_PROMPT,
            1.0,
        )?;
        let personal = Restorer::new(&base, &cfw, settings.clone(), cond, uncond)?
            .with_personalization(personalization)?;
        let with = personal.restore(&degraded, TargetSize::Scale(1.0), &mut |_, _| {})?;
        let (d, b, i) = (
            psnr(&degraded, clean, 0, false)?,
            psnr(&without, clean, 0, false)?,
            psnr(&with, clean, 0, false)?,
        );
        gains.push(i - b);
        println!("{seed:>4}  {d:>11.2}  {b:>7.2}  {i:>11.2}  {:>7.2}", i - b);
    }
    let mean = gains.iter().sum::<f64>() / gains.len().max(1) as f64;
    let wins = gains.iter().filter(|g| **g > 0.0).count();
    println!(
        "mean gain {mean:.2} dB; identity closer in {wins}/{} seeds",
        gains.len()
    );
    Ok(())
}
