//! Tiny-config overfit check: repeated training steps on one fixed draw lower its loss clearly.

mod common;

use candle_core::{DType, Device};
use pfstorer::config::BaseModelConfig;
use pfstorer::imaging::ImageF32;
use pfstorer::model::base::BaseModel;
use pfstorer::personalize::trainer::{TrainConfig, TrainableParams, Trainer};

#[test]
fn loss_on_a_fixed_draw_falls_within_50_iterations() {
    let cfg = BaseModelConfig::from_yaml_file(&common::fixture("stablesr/config.yaml")).unwrap();
    let (base, _) = BaseModel::load(
        &common::fixture("stablesr/model.safetensors"),
        cfg,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let images: Vec<ImageF32> = (0..3)
        .map(|k| {
            let data = (0..64 * 64)
                .flat_map(|i| {
                    let (x, y) = ((i % 64) as f32 / 64.0, (i / 64) as f32 / 64.0);
                    [
                        0.5 + 0.4 * (7.0 * x + k as f32).sin(),
                        0.5 + 0.4 * (4.0 * y).cos(),
                        0.2 + 0.6 * x * y,
                    ]
                })
                .collect();
            ImageF32::new(64, 64, 3, data)
        })
        .collect();
    let params = TrainableParams::init(&base, 1).unwrap();
    let mut trainer = Trainer::new(&base, params, &images, 64, TrainConfig::default(), 4).unwrap();
    let sample = loop {
        // A mid-range timestep, where the prediction depends on the features most.
        let s = trainer.draw_sample().unwrap();
        if (200..800).contains(&s.timestep) {
            break s;
        }
    };
    let first: f32 = trainer.loss(&sample).unwrap().total.to_scalar().unwrap();
    let start = std::time::Instant::now();
    let iterations = 50;
    for _ in 0..iterations {
        trainer.step_on(&sample).unwrap();
    }
    let last: f32 = trainer.loss(&sample).unwrap().total.to_scalar().unwrap();
    println!(
        "loss {first:.5} -> {last:.5} after {iterations} iterations ({:.3} s/iteration)",
        start.elapsed().as_secs_f64() / iterations as f64
    );
    // Default learning rates (ICA 1e-5, gamma and token 5e-3): a few percent in 50 steps.
    assert!(last < 0.97 * first, "loss {first} -> {last}");
}
