//! Does storing an identity in f16 change the restore it gives, at the released model's size?
//!
//! Random full-size weights (the released architecture, `WeightSource::Random`), an identity at
//! 512 px with its gates drawn N(0, `gamma_std`) so that it visibly moves the restore (trained
//! gates start at 0), optionally `iterations` real training steps first. The identity is
//! restored from memory (its f32 tensors, what the file held before identities were stored in
//! f16) and from the f16 file `Identity::save` writes; the example prints the personalized UNet
//! output difference of one call (against the modules' f16 bound, 1e-2 x max(|v|, 1)), the
//! image difference, how far the identity moves the image from the base model's, and the two
//! file sizes.
//!
//! `cargo run --release --example identity_half_precision -- [steps] [iterations] [gamma_std]`
//! (defaults 2 sampling steps, 0 training iterations, 1.0). Peak 8.1 GB and 5 min 14 s on a
//! 2-core CPU with 0 iterations (2026-12-07); each iteration adds about a minute and lifts the peak to about 12 GB.

use candle_core::{DType, Device, Tensor};
use pfstorer::config::{BaseModelConfig, CfwConfig};
use pfstorer::imaging::ImageF32;
use pfstorer::model::base::Residency;
use pfstorer::model::unet::UNetInputs;
use pfstorer::personalize::dual_stream::PersonalizedUNet;
use pfstorer::personalize::host_specs;
use pfstorer::personalize::identity::{Identity, IdentityInfo};
use pfstorer::personalize::trainer::{TrainConfig, TrainableParams, Trainer};
use pfstorer::restore::{
    Personalization, RestoreSettings, Restorer, TargetSize, WeightSource, BASE_SUBJECT,
    DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT,
};
use rand::SeedableRng;
use std::time::Instant;

const FINGERPRINT: &str = "random-weights-seed-0";

fn randn(seed: u64, shape: &[usize]) -> anyhow::Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Ok(pfstorer::diffusion::noise::standard_normal(
        &mut rng,
        shape,
        &Device::Cpu,
    )?)
}

/// A smooth face-like synthetic photo in [0, 1] (the model's weights are random anyway).
fn photo(side: usize, seed: u64) -> anyhow::Result<ImageF32> {
    let noise: Vec<f32> = randn(seed, &[side * side * 3])?.to_vec1()?;
    let data = (0..side * side * 3)
        .map(|i| {
            let p = i / 3;
            let (x, y) = (
                (p % side) as f32 / side as f32,
                (p / side) as f32 / side as f32,
            );
            let blob = (-((x - 0.5).powi(2) + (y - 0.45).powi(2)) * 8.0).exp();
            (0.25 + 0.5 * blob + 0.05 * noise[i]).clamp(0.0, 1.0)
        })
        .collect();
    Ok(ImageF32::new(side, side, 3, data))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<f64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let steps = args.first().copied().unwrap_or(2.0) as usize;
    let iterations = args.get(1).copied().unwrap_or(0.0) as usize;
    let gamma_std = args.get(2).copied().unwrap_or(1.0);
    let device = Device::Cpu;
    let config = BaseModelConfig::default();
    let side = config.diffusion.image_size;
    let weights = WeightSource::Random(0);
    let t0 = Instant::now();
    let (base, _) = weights.load_base(config.clone(), DType::F32, &device, Residency::Full)?;
    let (cfw, _) = weights.load_cfw(CfwConfig::default(), DType::F32, &device)?;
    eprintln!(
        "random released-size weights in {:.0} s",
        t0.elapsed().as_secs_f64()
    );

    // The identity.
    let params = TrainableParams::init(&base, 5)?;
    let (_, gammas) = params.block_vars()?;
    for (i, (_, g)) in gammas.iter().enumerate() {
        g.set(&(randn(100 + i as u64, g.dims())? * gamma_std)?)?;
    }
    let refs = vec![photo(side, 1)?];
    let mut trainer = Trainer::new(&base, params, &refs, side, TrainConfig::default(), 3)?;
    for i in 0..iterations {
        let t = Instant::now();
        let r = trainer.step()?;
        eprintln!(
            "iteration {}: loss {:.4} ({:.0} s)",
            i + 1,
            r.total,
            t.elapsed().as_secs_f64()
        );
    }
    let info = IdentityInfo {
        name: "half-precision".into(),
        base_fingerprint: FINGERPRINT.into(),
        ref_sources: vec![],
        training: serde_json::json!({}),
    };
    let in_memory = Identity::from_trainer(&trainer, &info)?;
    drop(trainer);
    let dir = std::env::temp_dir().join(format!("pfstorer-half-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("half.identity.safetensors");
    in_memory.save(&path, false)?;
    let from_file = Identity::load_file(&path)?;
    let file_bytes = std::fs::metadata(&path)?.len();
    let f32_bytes: usize = in_memory.tensors.values().map(|t| t.elem_count() * 4).sum();
    println!(
        "identity file: {:.1} MB in f16 ({file_bytes} bytes), {:.1} MB as f32 ({f32_bytes} bytes)",
        file_bytes as f64 / 1e6,
        f32_bytes as f64 / 1e6
    );

    // One personalized UNet call with each: the modules' f16 parity bound.
    let hosts = host_specs(&base.config.unet);
    let latent = side / config.vae.downsample_factor();
    let x = randn(21, &[1, 4, latent, latent])?;
    let t = Tensor::new(&[400f32], &device)?;
    let struct_cond = base
        .lq_encoder
        .forward(&randn(22, &[1, 4, latent, latent])?, &t)?;
    let unet_output = |identity: &Identity| -> anyhow::Result<Tensor> {
        let blocks = identity.blocks(&hosts, DType::F32, &device)?;
        let (context, prompt) = identity.positive_context(&base)?;
        let z_ref = identity.reference_latent(0, DType::F32, &device)?;
        let unet = PersonalizedUNet::new(&base.unet, &blocks, 1.0);
        let refs = unet.reference_features(&z_ref, &t, &context, &prompt.positions(1, 0))?;
        let inputs = UNetInputs {
            timesteps: &t,
            context: &context,
            struct_cond: Some(&struct_cond),
        };
        Ok(unet.forward(&x, &inputs, Some(&refs))?)
    };
    let (v32, v16) = (unet_output(&in_memory)?, unet_output(&from_file)?);
    let v32_values: Vec<f32> = v32.flatten_all()?.to_vec1()?;
    let v_err = max_abs_diff(&v32_values, &v16.flatten_all()?.to_vec1()?);
    let v_max = v32_values.iter().fold(0f32, |m, v| m.max(v.abs()));
    println!(
        "personalized UNet output (t = 400, 64x64 latent): f16 vs f32 identity max abs diff {v_err:.3e}, outputs up to {v_max:.3}, bound {:.3e}",
        1e-2 * v_max.max(1.0)
    );

    // Whole restores of a 512 crop.
    let settings = RestoreSettings {
        steps,
        ..RestoreSettings::default()
    };
    let cond = Restorer::text_context(&base, &DEFAULT_PROMPT.replace('*', BASE_SUBJECT))?;
    let uncond = Restorer::text_context(&base, DEFAULT_NEGATIVE_PROMPT)?;
    let lq = photo(side, 2)?;
    let restore = |identity: Option<&Identity>| -> anyhow::Result<Vec<f32>> {
        let t = Instant::now();
        let mut restorer =
            Restorer::new(&base, &cfw, settings.clone(), cond.clone(), uncond.clone())?;
        if let Some(identity) = identity {
            let p = Personalization::new(
                identity,
                &base,
                FINGERPRINT,
                DEFAULT_PROMPT,
                DEFAULT_NEGATIVE_PROMPT,
                1.0,
            )?;
            restorer = restorer.with_personalization(p)?;
        }
        let out = restorer.restore(&lq, TargetSize::Scale(1.0), &mut |_, _| {})?;
        eprintln!(
            "restore ({steps} steps) in {:.0} s",
            t.elapsed().as_secs_f64()
        );
        Ok(out.data)
    };
    let with32 = restore(Some(&in_memory))?;
    let with16 = restore(Some(&from_file))?;
    let plain = restore(None)?;
    let levels = |d: f32| d * 255.0;
    let image_err = max_abs_diff(&with32, &with16);
    let mean_err = with32
        .iter()
        .zip(&with16)
        .map(|(a, b)| (a - b).abs() as f64)
        .sum::<f64>()
        / with32.len() as f64;
    let moved = max_abs_diff(&with32, &plain);
    println!(
        "512x512 restore, {steps} steps: f16 vs f32 identity max abs diff {image_err:.3e} ({:.2} grey levels), mean {mean_err:.3e}; the identity moves the image by up to {moved:.3e} ({:.1} levels) from the base model's",
        levels(image_err),
        levels(moved)
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
