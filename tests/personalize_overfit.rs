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
    let images = common::wave_images(3, 64);
    // Spec defaults (ICA lr 1e-5, gamma and token 5e-3): the loss on the draw must fall (a few
    // percent in 50 iterations on the committed set, 1% on another: how much depends on the
    // tiny config, so only the direction is asserted here).
    let (first, last) = overfit(&base, &images, TrainConfig::default(), 50, None);
    assert!(last < first, "defaults: loss {first} -> {last}");
    // The same machinery with the ICA learning rate raised to 1e-3 (the spec's 1e-5 is tuned for
    // the full-size blocks' 500 iterations) must fit one draw: halve its loss within 200
    // iterations (measured on the committed set: -67% at 50 iterations, -95% at 100). A broken
    // gradient path (dropped softmax/LayerNorm backward, frozen gate) cannot do this on any
    // config.
    let fast = TrainConfig {
        lr_ica: 1e-3,
        ..TrainConfig::default()
    };
    let (first, last) = overfit(&base, &images, fast, 200, Some(0.5));
    assert!(last < 0.5 * first, "ICA lr 1e-3: loss {first} -> {last}");
}

/// Loss on one fixed mid-range draw before and after up to `iterations` steps on it; with
/// `stop_below = Some(r)`, it stops early once the loss is below `r` times the first.
fn overfit(
    base: &BaseModel,
    images: &[ImageF32],
    config: TrainConfig,
    iterations: usize,
    stop_below: Option<f32>,
) -> (f32, f32) {
    let params = TrainableParams::init(base, 1).unwrap();
    let mut trainer = Trainer::new(base, params, images, 64, config, 4).unwrap();
    let sample = loop {
        // A mid-range timestep, where the prediction depends on the features most.
        let s = trainer.draw_sample().unwrap();
        if (200..800).contains(&s.timestep) {
            break s;
        }
    };
    let first: f32 = trainer.loss(&sample).unwrap().total.to_scalar().unwrap();
    let start = std::time::Instant::now();
    let mut last = first;
    let mut done = 0;
    while done < iterations {
        trainer.step_on(&sample).unwrap();
        done += 1;
        if let Some(ratio) = stop_below {
            // Checking costs a forward pass: every 10 iterations.
            if done % 10 == 0 {
                last = trainer.loss(&sample).unwrap().total.to_scalar().unwrap();
                if last < ratio * first {
                    break;
                }
            }
        }
    }
    if stop_below.is_none() || done % 10 != 0 {
        last = trainer.loss(&sample).unwrap().total.to_scalar().unwrap();
    }
    println!(
        "{config:?}: loss {first:.5} -> {last:.5} ({:+.1}%) after {done} iterations ({:.3} s/iteration)",
        100.0 * (last / first - 1.0),
        start.elapsed().as_secs_f64() / done as f64
    );
    (first, last)
}
