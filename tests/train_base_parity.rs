//! Base training against the reference (`stablesr/train_step.safetensors`): two StableSR
//! fine-tuning steps on the tiny model — the trainable set, the loss, the gradient of every
//! trained tensor and the AdamW update of every element, at each step.
//!
//! Step 2 starts from the reference's parameters after step 1 (`train.step1.after.*`), where the
//! fixture's step-2 gradients were taken: Adam's first update is about lr·sign(g), so comparing
//! each side's own step-2 would compare rounding noise amplified to lr. Bounds and their
//! measurements: `common::training`.

mod common;

use candle_core::Var;
use candle_core::{Device, Tensor};
use common::training::{self, GradientBounds, TensorStep};
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

    let names: Vec<String> = trainer.vars().iter().map(|(n, _)| n.clone()).collect();
    let reference = |prefix: &str| -> Vec<Tensor> {
        names
            .iter()
            .map(|n| common::get(&f, &format!("{prefix}.{n}")).clone())
            .collect()
    };
    let init: Vec<Tensor> = trainer
        .vars()
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect();
    let states = [
        init,
        reference("train.step1.after"),
        reference("train.step2.after"),
    ];

    // AdamW itself, on the reference's own gradients: each update from the reference's own
    // parameters reproduces the reference's update to f32 rounding.
    let exact = |name: &str| -> GradientBounds {
        let reference = reference(name)
            .iter()
            .map(|t| common::finite_values(name, t))
            .collect::<Vec<_>>();
        let tolerance = reference.iter().map(|r| vec![0.0; r.len()]).collect();
        GradientBounds {
            reference,
            tolerance,
        }
    };
    let exact_grads = [exact("train.step1.grad"), exact("train.step2.grad")];
    let mut alone: Vec<(AdamW, Var)> = names
        .iter()
        .zip(&states[0])
        .map(|(name, t)| {
            let var = Var::from_tensor(t).unwrap();
            let opt = AdamW::new(vec![(name.clone(), var.clone())], adamw).unwrap();
            (opt, var)
        })
        .collect();
    for step in [1, 2] {
        let grads = reference(&format!("train.step{step}.grad"));
        let mut after = Vec::new();
        for (((opt, var), g), before) in alone.iter_mut().zip(&grads).zip(&states[step - 1]) {
            var.set(before).unwrap();
            opt.step_with(|_| Some(g.clone())).unwrap();
            after.push(var.as_tensor().copy().unwrap());
        }
        let steps: Vec<TensorStep> = names
            .iter()
            .enumerate()
            .map(|(i, name)| TensorStep {
                name,
                before: &states[step - 1][i],
                ours: &after[i],
                theirs: &states[step][i],
            })
            .collect();
        let seen: Vec<&GradientBounds> = exact_grads[..step].iter().collect();
        training::assert_updates_close(
            &format!("AdamW step {step} on the reference gradients"),
            &steps,
            &seen,
            &adamw,
        );
    }

    // The trainer: each step's gradients from the reference's parameters before that step (so
    // both sides differentiate the same function), then its update from there.
    let mut bounds = Vec::new();
    for step in [1, 2] {
        let b = batch(&f, step);
        if step > 1 {
            let previous: HashMap<String, Tensor> = names
                .iter()
                .cloned()
                .zip(states[step - 1].clone())
                .collect();
            trainer.set_trained(&previous).unwrap();
        }
        // Through the same path a run takes: averaged over (one) rank, then the update.
        let (loss, grads) = trainer
            .averaged_gradients(std::slice::from_ref(&b), &SingleProcess)
            .unwrap();
        let want = common::get(&f, &format!("train.step{step}.out.loss"));
        common::assert_module_close(
            &format!("train.step{step}.out.loss"),
            &Tensor::new(&[loss], &Device::Cpu).unwrap(),
            want,
        );
        bounds.push(training::assert_gradients_close(
            &format!("train.step{step}.grad"),
            &names,
            &grads,
            &reference(&format!("train.step{step}.grad")),
        ));
        trainer.apply(&grads).unwrap();
        let after: Vec<Tensor> = trainer
            .vars()
            .iter()
            .map(|(_, v)| v.as_tensor().copy().unwrap())
            .collect();
        let steps: Vec<TensorStep> = names
            .iter()
            .enumerate()
            .map(|(i, name)| TensorStep {
                name,
                before: &states[step - 1][i],
                ours: &after[i],
                theirs: &states[step][i],
            })
            .collect();
        let seen: Vec<&GradientBounds> = bounds.iter().collect();
        training::assert_updates_close(
            &format!("train.step{step}.after − before"),
            &steps,
            &seen,
            &adamw,
        );
    }
    assert_eq!(trainer.steps_taken(), 2);
}
