//! Base training against the reference (`stablesr/train_step.safetensors`): two StableSR
//! fine-tuning steps on the tiny model — the trainable set, the loss, the gradient of every
//! trained tensor, and the tensors after one and two AdamW steps.

mod common;

use candle_core::{DType, Device, Tensor};
use pfstorer::base_training::parallel::SingleProcess;
use pfstorer::base_training::step::{BaseTrainer, LatentBatch};
use pfstorer::base_training::trainable::TrainableWeights;
use pfstorer::optim::{AdamW, AdamWParams};
use pfstorer::weights::{CheckedWeights, TensorStore};
use std::collections::HashMap;
use std::sync::Arc;

fn metadata_count(key: &str) -> usize {
    let path = common::fixture("stablesr/train_step.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap_or_default();
    meta.get(key)
        .unwrap_or_else(|| panic!("{}: no metadata `{key}`", path.display()))
        .parse()
        .unwrap()
}

fn batch(f: &HashMap<String, Tensor>, step: usize) -> LatentBatch {
    let key = |k: &str| format!("train.step{step}.in.{k}");
    let t: Vec<i64> = common::get(f, &key("t")).to_vec1().unwrap();
    LatentBatch {
        z_gt: common::get(f, &key("z_gt")).clone(),
        z_lq: common::get(f, &key("z_lq")).clone(),
        timesteps: t.iter().map(|&t| t as usize).collect(),
        noise: common::get(f, &key("noise")).clone(),
    }
}

#[test]
fn two_training_steps_match_the_reference() {
    let f = common::load("stablesr/train_step.safetensors");
    let store = TensorStore::open(&common::fixture("stablesr/model.safetensors")).unwrap();
    let weights = TrainableWeights::new(CheckedWeights::from_store(Arc::new(store)));
    // The fixture's optimizer: torch.optim.AdamW(lr=1e-4) with torch's defaults.
    let adamw = AdamWParams {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let (mut trainer, _) =
        BaseTrainer::new(common::tiny_config(), &weights, &Device::Cpu, adamw).unwrap();

    // The trainable set is exactly the reference's, by name and count.
    let ours: Vec<&str> = trainer.vars().iter().map(|(n, _)| n.as_str()).collect();
    let mut theirs: Vec<&str> = f
        .keys()
        .filter_map(|k| k.strip_prefix("train.step1.grad."))
        .collect();
    theirs.sort();
    assert_eq!(ours, theirs, "trainable tensors");
    assert_eq!(ours.len(), metadata_count("n_trainable_tensors"));
    let params: usize = trainer.vars().iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(params, metadata_count("n_trainable"));
    let spade: usize = trainer
        .vars()
        .iter()
        .filter(|(n, _)| n.contains("spade"))
        .map(|(_, v)| v.elem_count())
        .sum();
    assert_eq!(spade, metadata_count("n_trainable_spade"));

    // The empty prompt's context, computed by the trainer itself.
    let context = common::get(&f, "train.in.context");
    common::assert_module_close(
        "train.in.context[0]",
        trainer.context(),
        &context.narrow(0, 0, 1).unwrap(),
    );

    // AdamW itself, on the reference's own step-1 gradients: exact up to f32 rounding.
    let init = TensorStore::open(&common::fixture("stablesr/model.safetensors")).unwrap();
    let mut worst = 0f64;
    for (name, _) in trainer.vars() {
        let var =
            candle_core::Var::from_tensor(&init.load(name, DType::F32, &Device::Cpu).unwrap())
                .unwrap();
        let mut opt = AdamW::new(vec![(name.clone(), var.clone())], adamw).unwrap();
        let g = common::get(&f, &format!("train.step1.grad.{name}")).clone();
        opt.step_with(|_| Some(g.clone())).unwrap();
        let key = format!("train.step1.after.{name}");
        worst = worst.max(common::assert_close(
            &key,
            var.as_tensor(),
            common::get(&f, &key),
            1e-6,
            1e-4,
        ));
    }
    println!("AdamW on the reference gradients: worst max abs error {worst:.3e}");

    let mut small_gradient: HashMap<String, Vec<bool>> = HashMap::new();
    for step in [1, 2] {
        let b = batch(&f, step);
        let (loss, grads) = trainer.gradients(std::slice::from_ref(&b)).unwrap();
        let want = common::get(&f, &format!("train.step{step}.out.loss"));
        common::assert_module_close(
            &format!("train.step{step}.out.loss"),
            &Tensor::new(&[loss], &Device::Cpu).unwrap(),
            want,
        );
        for ((name, _), g) in trainer.vars().iter().zip(&grads) {
            let g: Vec<f32> = if step == 1 {
                let key = format!("train.step1.grad.{name}");
                let reference = common::get(&f, &key);
                common::assert_close(&key, g, reference, 1e-4, 1e-3);
                reference.flatten_all().unwrap().to_vec1().unwrap()
            } else {
                g.flatten_all().unwrap().to_vec1().unwrap()
            };
            let flags = small_gradient
                .entry(name.clone())
                .or_insert_with(|| vec![false; g.len()]);
            for (flag, v) in flags.iter_mut().zip(&g) {
                *flag |= v.abs() < ILL_CONDITIONED;
            }
        }
        // Through the same path a run takes: average over (one) rank, then the update.
        let averaged = trainer
            .step(std::slice::from_ref(&b), &SingleProcess)
            .unwrap();
        assert_eq!(averaged, loss);
        let (mut worst, mut loose, mut total) = (0f64, 0usize, 0usize);
        for (name, var) in trainer.vars() {
            let key = format!("train.step{step}.after.{name}");
            let ours: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let theirs: Vec<f32> = common::get(&f, &key)
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for ((a, b), small) in ours.iter().zip(&theirs).zip(&small_gradient[name]) {
                let err = (a - b).abs() as f64;
                let tol = 1e-6 + 1e-4 * b.abs() as f64;
                total += 1;
                if *small {
                    // Adam's first steps move by about lr·g/(|g| + eps): where a gradient so far
                    // was within rounding of zero, that step's size was not determined by it
                    // (and the difference stays in the tensor).
                    loose += 1;
                    assert!(
                        err <= tol + 2.0 * step as f64 * adamw.lr,
                        "{key}: {a} vs {b}"
                    );
                } else {
                    assert!(
                        err <= tol,
                        "{key}: {a} vs reference {b} (error {err:.3e}, tolerance {tol:.3e})"
                    );
                    worst = worst.max(err);
                }
            }
        }
        println!(
            "after step {step}: worst max abs error {worst:.3e} over {} elements; {loose} elements with a |gradient| < {ILL_CONDITIONED:e} at some step held to 2·lr·steps",
            total - loose
        );
        assert!(
            loose * 100 <= total,
            "{loose} of {total} elements have near-zero gradients"
        );
    }
    assert_eq!(trainer.steps_taken(), 2);
}

/// Gradients below this (10·eps of AdamW) are within f32 rounding of zero for a loss whose
/// gradients reach 1e-2: their sign and size after Adam's normalisation are noise.
const ILL_CONDITIONED: f32 = 1e-7;
