//! Replays the recorded CFG DDPM run of `diffusion/sampler.safetensors` without a network: the
//! denoiser returns the recorded UNet outputs and checks the inputs the sampler feeds it.

mod common;

use candle_core::{DType, Tensor};
use pfstorer::config::BaseModelConfig;
use pfstorer::diffusion::noise::RecordedNoise;
use pfstorer::diffusion::sampler::{Branches, DdpmSampler, SampleOptions};
use std::collections::HashMap;

const FILE: &str = "diffusion/sampler.safetensors";

/// The `__metadata__` of a safetensors fixture.
fn metadata(rel: &str) -> HashMap<String, String> {
    let bytes = std::fs::read(common::fixture(rel)).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

fn meta_f64(meta: &HashMap<String, String>, key: &str) -> f64 {
    meta.get(key)
        .unwrap_or_else(|| panic!("{FILE}: metadata `{key}` missing"))
        .parse()
        .unwrap()
}

fn scalar_i64(fx: &HashMap<String, Tensor>, key: &str) -> usize {
    common::get(fx, key)
        .to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()[0] as usize
}

/// The `noise.NNN` draws in order.
fn noise_draws(fx: &HashMap<String, Tensor>) -> Vec<Tensor> {
    let mut keys: Vec<&String> = fx.keys().filter(|k| k.starts_with("noise.")).collect();
    keys.sort();
    keys.into_iter().map(|k| fx[k].clone()).collect()
}

#[test]
fn sampler_replays_reference_run() {
    let fx = common::load(FILE);
    let meta = metadata(FILE);
    let guidance = meta_f64(&meta, "guidance");
    let steps = meta_f64(&meta, "steps") as usize;

    let mut cfg = BaseModelConfig::default().diffusion;
    cfg.timesteps = 1000;
    let sampler = DdpmSampler::new(&cfg, steps).unwrap();

    // Schedule as the run used it.
    let map: Vec<i64> = common::get(&fx, "timestep_map").to_vec1().unwrap();
    let ours: Vec<i64> = sampler
        .respaced()
        .timestep_map
        .iter()
        .map(|&t| t as i64)
        .collect();
    assert_eq!(ours, map, "timestep_map");
    let r = sampler.respaced();
    for (name, values) in [
        ("sqrt_alphas_cumprod", &r.sqrt_alphas_cumprod),
        (
            "sqrt_one_minus_alphas_cumprod",
            &r.sqrt_one_minus_alphas_cumprod,
        ),
        ("posterior_mean_coef1", &r.posterior_mean_coef1),
        ("posterior_mean_coef2", &r.posterior_mean_coef2),
        (
            "posterior_log_variance_clipped",
            &r.posterior_log_variance_clipped,
        ),
    ] {
        let key = format!("respaced.{name}");
        let t = Tensor::new(r.buffer(values), &candle_core::Device::Cpu).unwrap();
        common::assert_close(&key, &t, common::get(&fx, &key), 1e-6, 1e-5);
    }

    // Draw #0 made the LQ latent (VAE sampling); the sampler consumes the rest.
    let draws = noise_draws(&fx);
    assert_eq!(draws.len(), meta_f64(&meta, "n_noise_draws") as usize);
    let mut noise = RecordedNoise::new(draws[1..].to_vec());
    let init_latent = common::get(&fx, "init_latent").clone();

    let x_t = sampler.start_latent(&init_latent, &mut noise).unwrap();
    common::assert_module_close("x_T", &x_t, common::get(&fx, "x_T"));

    let mut calls = 0usize;
    let mut denoiser =
        |x: &Tensor, lq: &Tensor, t_orig: usize, branches: Branches| -> pfstorer::Result<Tensor> {
            let k = calls;
            calls += 1;
            let expected_branches = Branches::for_guidance(Some(guidance));
            assert_eq!(branches, expected_branches, "step{k}: branches");
            assert_eq!(
                t_orig,
                scalar_i64(&fx, &format!("step{k}.t_orig")),
                "step{k}.t_orig"
            );
            common::assert_close(&format!("step{k}.lq_latent"), lq, &init_latent, 0.0, 0.0);
            common::assert_module_close(
                &format!("step{k}.unet_in_x"),
                x,
                common::get(&fx, &format!("step{k}.unet_in_x")),
            );
            Ok(common::get(&fx, &format!("step{k}.unet_out")).clone())
        };
    let opts = SampleOptions {
        guidance_scale: Some(guidance),
        record_steps: true,
    };
    let mut progress = Vec::new();
    let out = sampler
        .sample_from(
            x_t,
            &mut denoiser,
            &init_latent,
            &mut noise,
            &opts,
            &mut |p| progress.push((p.done, p.total, p.index)),
        )
        .unwrap();

    assert_eq!(calls, steps);
    assert_eq!(noise.remaining(), 0, "every recorded draw must be consumed");
    assert_eq!(progress.last(), Some(&(steps, steps, 0)));
    assert_eq!(out.steps.len(), steps);
    let mut worst = 0f64;
    for (k, rec) in out.steps.iter().enumerate() {
        assert_eq!(rec.index, scalar_i64(&fx, &format!("step{k}.t_index")));
        let logvar = Tensor::new(&[rec.post_logvar], &candle_core::Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 1))
            .unwrap();
        for (name, t) in [
            ("v_cfg", &rec.v),
            ("x0", &rec.x0),
            ("post_mean", &rec.post_mean),
            ("post_logvar", &logvar),
            ("x_out", &rec.x_out),
        ] {
            let key = format!("step{k}.{name}");
            worst = worst.max(common::assert_module_close(&key, t, common::get(&fx, &key)));
        }
    }
    println!("per-step max abs error {worst:.3e}");
    common::assert_close(
        "samples",
        &out.latent,
        common::get(&fx, "samples"),
        1e-3,
        1e-2,
    );
}

#[test]
fn unguided_run_calls_denoiser_on_single_batch() {
    let fx = common::load(FILE);
    let init_latent = common::get(&fx, "init_latent").clone();
    let cfg = BaseModelConfig::default().diffusion;
    let sampler = DdpmSampler::new(&cfg, 3).unwrap();
    let mut noise = pfstorer::diffusion::noise::SeededNoise::new(42);
    let mut denoiser =
        |x: &Tensor, lq: &Tensor, _t: usize, branches: Branches| -> pfstorer::Result<Tensor> {
            assert_eq!(branches, Branches::Cond);
            assert_eq!(x.dims(), lq.dims());
            Ok(x.zeros_like()?)
        };
    let opts = SampleOptions::default();
    let out = sampler
        .sample(&mut denoiser, &init_latent, &mut noise, &opts, &mut |_| {})
        .unwrap();
    assert_eq!(out.latent.dims(), init_latent.dims());
    assert!(out.steps.is_empty());

    // A denoiser returning the wrong shape is reported, not silently broadcast.
    let mut bad = |x: &Tensor, _lq: &Tensor, _t: usize, _b: Branches| -> pfstorer::Result<Tensor> {
        Ok(x.narrow(3, 0, 1)?)
    };
    let err = sampler.sample(&mut bad, &init_latent, &mut noise, &opts, &mut |_| {});
    assert!(err.is_err());
}
