//! The 1000-step schedule and its respacings against `diffusion/schedule.safetensors`.

mod common;

use candle_core::{DType, Device, Tensor};
use pfstorer::config::BaseModelConfig;
use pfstorer::diffusion::schedule::Schedule;

const FILE: &str = "diffusion/schedule.safetensors";

fn arrays(s: &Schedule) -> Vec<(&'static str, &Vec<f64>)> {
    vec![
        ("betas", &s.betas),
        ("alphas_cumprod", &s.alphas_cumprod),
        ("alphas_cumprod_prev", &s.alphas_cumprod_prev),
        ("sqrt_alphas_cumprod", &s.sqrt_alphas_cumprod),
        (
            "sqrt_one_minus_alphas_cumprod",
            &s.sqrt_one_minus_alphas_cumprod,
        ),
        (
            "log_one_minus_alphas_cumprod",
            &s.log_one_minus_alphas_cumprod,
        ),
        ("sqrt_recip_alphas_cumprod", &s.sqrt_recip_alphas_cumprod),
        (
            "sqrt_recipm1_alphas_cumprod",
            &s.sqrt_recipm1_alphas_cumprod,
        ),
        ("posterior_variance", &s.posterior_variance),
        (
            "posterior_log_variance_clipped",
            &s.posterior_log_variance_clipped,
        ),
        ("posterior_mean_coef1", &s.posterior_mean_coef1),
        ("posterior_mean_coef2", &s.posterior_mean_coef2),
    ]
}

/// Compares every array of `s` (as the float32 buffers the reference registers) with
/// `{prefix}.{name}`; returns the largest error.
fn compare(prefix: &str, s: &Schedule, fx: &std::collections::HashMap<String, Tensor>) -> f64 {
    let mut worst = 0f64;
    for (name, values) in arrays(s) {
        let ours = Tensor::new(s.buffer(values), &Device::Cpu).unwrap();
        let key = format!("{prefix}.{name}");
        let err = common::assert_close(&key, &ours, common::get(fx, &key), 1e-6, 1e-5);
        worst = worst.max(err);
    }
    worst
}

fn full_schedule(fx: &std::collections::HashMap<String, Tensor>) -> Schedule {
    let mut cfg = BaseModelConfig::default().diffusion;
    cfg.timesteps = common::get(fx, "full.betas").dims1().unwrap();
    Schedule::linear(&cfg).unwrap()
}

#[test]
fn full_schedule_matches_reference() {
    let fx = common::load(FILE);
    let full = full_schedule(&fx);
    let betas64 = Tensor::new(full.betas.as_slice(), &Device::Cpu).unwrap();
    common::assert_close(
        "full.betas_f64",
        &betas64,
        common::get(&fx, "full.betas_f64"),
        1e-12,
        1e-10,
    );
    let worst = compare("full", &full, &fx);
    println!("full schedule: max abs error {worst:.3e}");
    assert_eq!(full.timestep_map, (0..full.len()).collect::<Vec<_>>());
}

#[test]
fn respaced_schedules_match_reference() {
    let fx = common::load(FILE);
    let full = full_schedule(&fx);
    let mut counts: Vec<usize> = fx
        .keys()
        .filter_map(|k| {
            k.strip_prefix('r')?
                .strip_suffix(".timestep_map")?
                .parse()
                .ok()
        })
        .collect();
    counts.sort_unstable();
    assert!(!counts.is_empty(), "{FILE} holds no respaced schedule");
    for n in counts {
        let respaced = Schedule::respaced(&full, n).unwrap();
        let map: Vec<i64> = common::get(&fx, &format!("r{n}.timestep_map"))
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1()
            .unwrap();
        let ours: Vec<i64> = respaced.timestep_map.iter().map(|&t| t as i64).collect();
        assert_eq!(ours, map, "r{n}.timestep_map");
        let worst = compare(&format!("r{n}"), &respaced, &fx);
        println!("respaced to {n} steps: max abs error {worst:.3e}");
    }
}
