//! `pfstorer train-base` on the tiny fixture model: the output checkpoint (complete, frozen
//! tensors bit-identical, usable by restore and personalize), resume, bad data, and the
//! library's overfit and data-parallel equivalence.

mod common;

use candle_core::{Device, Tensor};
use common::training::{self, GradientBounds, TensorStep};
use pfstorer::base_training::data::{FaceDataset, SampleRecipe, Sharding};
use pfstorer::base_training::parallel::{Communicator, SingleProcess, ThreadGroup};
use pfstorer::base_training::step::{adamw, BaseTrainer};
use pfstorer::base_training::trainable::{is_trainable, TrainableWeights};
use pfstorer::base_training::{Run, RunPlan};
use pfstorer::weights::{CheckedWeights, TensorStore};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

const SIZE: usize = common::FAST_INPUT_SIZE;

fn write_faces(dir: &Path, count: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    (0..count)
        .map(|k| {
            // Varied sizes: larger, smaller than the training size, not square.
            let (w, h) = (
                SIZE as u32 + 24 * k as u32 % 40,
                SIZE as u32 + 8 * (k as u32 % 3),
            );
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                let v = ((x * 5 + y * 3 + 50 * k as u32) % 256) as u8;
                image::Rgb([v, (y * 4 % 256) as u8, ((x + y) * 2 % 256) as u8])
            });
            let path = dir.join(format!("face{k:02}.png"));
            img.save(&path).unwrap();
            path
        })
        .collect()
}

fn pfstorer(home: &Path, args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pfstorer"))
        .args(args)
        .env("PFSTORER_HOME", home)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run pfstorer")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The fixture model, small steps; `extra` adds flags or overrides these defaults.
fn train_base_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let init = common::fixture("stablesr/model.safetensors");
    let config = common::fixture("stablesr/config.yaml");
    let size = SIZE.to_string();
    let defaults: [(&str, &str); 7] = [
        ("--init", init.to_str().unwrap()),
        ("--config", config.to_str().unwrap()),
        ("--size", &size),
        ("--batch-size", "1"),
        ("--grad-accum", "1"),
        ("--lr", "1e-3"),
        ("--checkpoint-every", "0"),
    ];
    let mut args: Vec<String> = vec![
        "train-base".into(),
        "--data".into(),
        data.to_string_lossy().into_owned(),
        "--out".into(),
        out.to_string_lossy().into_owned(),
        "--quiet".into(),
    ];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn raw(store: &TensorStore, name: &str) -> Vec<u8> {
    let dtype = store.dtype(name).unwrap();
    let t = store.load(name, dtype, &Device::Cpu).unwrap();
    safetensors::View::data(&t).into_owned()
}

#[test]
fn trained_checkpoint_is_complete_and_loads_in_restore_and_personalize() {
    let root = common::scratch("train-base");
    let home = root.join("home");
    let data = root.join("faces");
    write_faces(&data, 3);
    let out = root.join("base.safetensors");
    let run = pfstorer(&home, &train_base_args(&data, &out, &["--epochs", "1"]));
    assert!(run.status.success(), "train-base failed: {}", stderr(&run));
    assert!(out.is_file());
    assert!(!root.join("base.safetensors.checkpoint").exists());

    let init = TensorStore::open(&common::fixture("stablesr/model.safetensors")).unwrap();
    let trained = TensorStore::open(&out).unwrap();
    let init_names: Vec<&String> = init.shapes().keys().collect();
    let out_names: Vec<&String> = trained.shapes().keys().collect();
    assert_eq!(
        init_names, out_names,
        "every key of the init checkpoint, same names"
    );
    let (mut changed, mut trainable) = (0, 0);
    for name in init.shapes().keys() {
        assert_eq!(init.shape(name), trained.shape(name), "{name}");
        if is_trainable(name) {
            trainable += 1;
            changed += usize::from(raw(&init, name) != raw(&trained, name));
        } else {
            assert_eq!(init.dtype(name), trained.dtype(name), "{name}");
            assert!(
                raw(&init, name) == raw(&trained, name),
                "frozen `{name}` changed"
            );
        }
    }
    // Three steps at lr 1e-3 move (nearly) every trained tensor; zero-gradient ones stay.
    assert!(
        changed * 10 >= trainable * 9,
        "{changed} of {trainable} trained tensors changed"
    );
    let bytes = std::fs::read(&out).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    let record: serde_json::Value = serde_json::from_str(&meta["pfstorer_base_training"]).unwrap();
    assert_eq!(record["images"], 3);
    assert_eq!(record["steps"], 3);
    assert_eq!(record["epochs"], 1);

    // `restore --base` and `personalize --base` take it unchanged.
    let lq = root.join("lq.png");
    image::RgbImage::from_fn(SIZE as u32, SIZE as u32, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 3) as u8, 128])
    })
    .save(&lq)
    .unwrap();
    let mut args: Vec<String> = vec!["restore".into(), lq.to_string_lossy().into_owned()];
    args.extend([
        "--output".into(),
        root.join("restored").to_string_lossy().into_owned(),
    ]);
    args.extend(common::fast_sampling_flags());
    args.extend(model_flags_with_base(&out));
    args.push("--quiet".into());
    let restored = pfstorer(&home, &args);
    assert!(
        restored.status.success(),
        "restore --base failed: {}",
        stderr(&restored)
    );
    let produced = std::fs::read_dir(root.join("restored")).unwrap().count();
    assert_eq!(produced, 1, "one restored image");

    let refs = write_faces(&root.join("refs"), 3);
    let mut args: Vec<String> = vec![
        "personalize".into(),
        "--refs-aligned".into(),
        "--refs".into(),
    ];
    args.extend(refs.iter().map(|p| p.to_string_lossy().into_owned()));
    args.extend(
        [
            "--id",
            "bob",
            "--steps",
            "1",
            "--size",
            &SIZE.to_string(),
            "--quiet",
        ]
        .map(String::from),
    );
    args.extend(model_flags_with_base(&out));
    let personalized = pfstorer(&home, &args);
    assert!(
        personalized.status.success(),
        "personalize --base failed: {}",
        stderr(&personalized)
    );
    assert!(home.join("identities/bob.identity.safetensors").is_file());
}

fn model_flags_with_base(base: &Path) -> Vec<String> {
    let mut flags = common::model_flags();
    let at = flags.iter().position(|f| f == "--base").unwrap();
    flags[at + 1] = base.to_string_lossy().into_owned();
    flags
}

#[test]
fn stopped_and_resumed_run_equals_an_uninterrupted_one() {
    let root = common::scratch("train-base-resume");
    let home = root.join("home");
    let data = root.join("faces");
    write_faces(&data, 2);
    let straight = root.join("straight.safetensors");
    let run = pfstorer(
        &home,
        &train_base_args(&data, &straight, &["--epochs", "2"]),
    );
    assert!(run.status.success(), "{}", stderr(&run));

    let resumed = root.join("resumed.safetensors");
    let checkpoint = root.join("resumed.safetensors.checkpoint");
    let first = pfstorer(
        &home,
        &train_base_args(&data, &resumed, &["--epochs", "2", "--stop-after", "3"]),
    );
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(checkpoint.is_file() && !resumed.exists());
    // Other settings are refused, naming what differs.
    let other = pfstorer(
        &home,
        &train_base_args(
            &data,
            &resumed,
            &["--epochs", "2", "--seed", "9", "--resume"],
        ),
    );
    assert!(!other.status.success());
    assert!(stderr(&other).contains("seed"), "{}", stderr(&other));
    // A fresh start over an existing checkpoint needs --force.
    let fresh = pfstorer(&home, &train_base_args(&data, &resumed, &["--epochs", "2"]));
    assert!(!fresh.status.success());
    assert!(stderr(&fresh).contains("--resume"), "{}", stderr(&fresh));

    let second = pfstorer(
        &home,
        &train_base_args(&data, &resumed, &["--epochs", "2", "--resume"]),
    );
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(!checkpoint.exists());
    let a = TensorStore::open(&straight).unwrap();
    let b = TensorStore::open(&resumed).unwrap();
    for name in a.shapes().keys().filter(|n| is_trainable(n)) {
        assert!(
            raw(&a, name) == raw(&b, name),
            "`{name}` differs after resume"
        );
    }
}

#[test]
fn bad_data_and_outputs_are_clear_errors_and_odd_files_are_skipped() {
    let root = common::scratch("train-base-bad");
    let home = root.join("home");
    let data = root.join("faces");
    write_faces(&data, 2);
    std::fs::write(data.join("notes.txt"), "not an image").unwrap();
    std::fs::write(data.join("broken.png"), b"\x89PNG\r\n\x1a\nbroken").unwrap();
    image::RgbImage::new(8, 8)
        .save(data.join("tiny.png"))
        .unwrap();
    let out = root.join("base.safetensors");
    let run = pfstorer(
        &home,
        &train_base_args(&data, &out, &["--epochs", "1", "--batch-size", "2"]),
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let err = stderr(&run);
    assert!(err.contains("3 files skipped"), "{err}");
    for name in ["notes.txt", "broken.png", "tiny.png"] {
        assert!(err.contains(name), "{name} not listed: {err}");
    }

    // The output exists: refused before any training, the file untouched.
    let before = std::fs::read(&out).unwrap();
    let again = pfstorer(&home, &train_base_args(&data, &out, &["--epochs", "1"]));
    assert!(!again.status.success());
    assert!(stderr(&again).contains("exists"), "{}", stderr(&again));
    assert_eq!(std::fs::read(&out).unwrap(), before);

    // An empty data set, too few images for one step, and an init checkpoint that is not a
    // diffusion model: one line each, nothing written.
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let data = root.join("clean");
    write_faces(&data, 2);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            train_base_args(&empty, &root.join("a.safetensors"), &[]),
            "no usable images",
        ),
        (
            train_base_args(&data, &root.join("b.safetensors"), &["--batch-size", "3"]),
            "fewer than one step",
        ),
        (
            {
                let mut a = train_base_args(&data, &root.join("c.safetensors"), &[]);
                let at = a.iter().position(|s| s == "--init").unwrap();
                a[at + 1] = common::fixture("stablesr/cfw.safetensors")
                    .to_string_lossy()
                    .into_owned();
                a
            },
            "missing",
        ),
        (
            train_base_args(&data, &root.join("d.safetensors"), &["--dtype", "f16"]),
            "--dtype",
        ),
        (
            train_base_args(&root.join("nowhere"), &root.join("e.safetensors"), &[]),
            "not a folder",
        ),
    ];
    for (args, expected) in cases {
        let o = pfstorer(&home, &args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{expected}: succeeded");
        assert!(err.contains(expected), "expected {expected:?} in {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    for name in ["a", "b", "c", "d", "e"] {
        assert!(!root.join(format!("{name}.safetensors")).exists());
    }
}

fn tiny_trainer(lr: f64) -> BaseTrainer {
    let store = TensorStore::open(&common::fixture("stablesr/model.safetensors")).unwrap();
    let weights = TrainableWeights::new(CheckedWeights::from_store(Arc::new(store)));
    BaseTrainer::new(common::tiny_config(), &weights, &Device::Cpu, adamw(lr))
        .unwrap()
        .0
}

fn plan(batch_size: usize, world_size: usize) -> RunPlan {
    RunPlan {
        epochs: 1,
        sharding: Sharding {
            batch_size,
            grad_accum: 1,
            world_size,
        },
        recipe: SampleRecipe {
            size: SIZE,
            p_hq: 0.03,
        },
        seed: 5,
    }
}

#[test]
fn repeated_batch_is_fitted() {
    let root = common::scratch("train-base-overfit");
    write_faces(&root, 2);
    let data = FaceDataset::scan(&[root.to_path_buf()]).unwrap();
    let mut trainer = tiny_trainer(1e-3);
    let mut run = Run::new(&mut trainer, &data, plan(2, 1), &SingleProcess).unwrap();
    let batch = run.micro_batch(0, &[0, 1]).unwrap();
    let first = run
        .trainer
        .loss(&batch)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let mut last = first;
    for _ in 0..25 {
        last = run
            .trainer
            .step(std::slice::from_ref(&batch), &SingleProcess)
            .unwrap();
    }
    let after = run
        .trainer
        .loss(&batch)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!("overfit: loss {first:.4} -> {after:.4} (last step {last:.4})");
    assert!(after < 0.5 * first, "loss {first} -> {after}");
}

/// N ranks with batch b take the steps of 1 rank with batch N·b, having seen the same samples:
/// at each step, from one shared parameter set (the single rank's before that step), the
/// averaged gradients and the update agree under `common::training`'s bounds. Comparing each
/// side's own second step instead would compare rounding noise that Adam's first update
/// (≈ lr·sign(g)) amplified to lr.
#[test]
fn data_parallel_ranks_equal_one_rank_with_their_combined_batch() {
    let root = common::scratch("train-base-dp");
    write_faces(&root, 4);
    let data = Arc::new(FaceDataset::scan(&[root.to_path_buf()]).unwrap());
    let world = 2;
    let steps = 2;

    let lr = 1e-3;
    let mut single = tiny_trainer(lr);
    let names: Vec<String> = single.vars().iter().map(|(n, _)| n.clone()).collect();
    let snapshot = |t: &BaseTrainer| -> Vec<Tensor> {
        t.vars()
            .iter()
            .map(|(_, v)| v.as_tensor().copy().unwrap())
            .collect()
    };
    // states[s]: the single rank's tensors before step s (the last: after all steps).
    let mut states = vec![snapshot(&single)];
    let mut single_latents = Vec::new();
    let mut single_grads = Vec::new();
    {
        let mut run = Run::new(&mut single, &data, plan(world, 1), &SingleProcess).unwrap();
        for s in 0..steps {
            let positions = run.plan.sharding.positions(s, 0, 0);
            let batch = run.micro_batch(0, &positions).unwrap();
            let (_, grads) = run
                .trainer
                .averaged_gradients(std::slice::from_ref(&batch), &SingleProcess)
                .unwrap();
            run.trainer.apply(&grads).unwrap();
            states.push(snapshot(run.trainer));
            single_latents.push(batch.z_gt);
            single_grads.push(grads);
        }
    }
    let shared: Arc<Vec<HashMap<String, Tensor>>> = Arc::new(
        states
            .iter()
            .map(|s| names.iter().cloned().zip(s.iter().cloned()).collect())
            .collect(),
    );

    let handles: Vec<_> = ThreadGroup::new(world)
        .into_iter()
        .map(|comm| {
            let (data, shared) = (data.clone(), shared.clone());
            std::thread::spawn(move || {
                let mut trainer = tiny_trainer(lr);
                let rank = comm.rank();
                let (mut seen, mut grads_seen, mut after) = (Vec::new(), Vec::new(), Vec::new());
                let mut run = Run::new(&mut trainer, &data, plan(1, world), &comm).unwrap();
                for s in 0..steps {
                    run.trainer.set_trained(&shared[s]).unwrap();
                    let positions = run.plan.sharding.positions(s, 0, rank);
                    let batch = run.micro_batch(0, &positions).unwrap();
                    let (_, grads) = run
                        .trainer
                        .averaged_gradients(std::slice::from_ref(&batch), &comm)
                        .unwrap();
                    run.trainer.apply(&grads).unwrap();
                    seen.push(batch.z_gt);
                    grads_seen.push(grads);
                    after.push(
                        run.trainer
                            .vars()
                            .iter()
                            .map(|(_, v)| v.as_tensor().copy().unwrap())
                            .collect::<Vec<_>>(),
                    );
                }
                (rank, seen, grads_seen, after)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let params = adamw(lr);
    for (rank, seen, grads_seen, after) in &results {
        let mut bounds = Vec::new();
        for s in 0..steps {
            // The same samples: this rank's slice of the single rank's batch.
            let expected = single_latents[s].narrow(0, *rank, 1).unwrap();
            let err = common::max_abs_diff(&seen[s], &expected);
            assert!(
                err < 1e-5,
                "rank {rank} step {s}: other samples (latent error {err})"
            );
            // The same gradients (averaged over the ranks) and the same update.
            bounds.push(training::assert_gradients_close(
                &format!("rank {rank} step {s} gradients"),
                &names,
                &grads_seen[s],
                &single_grads[s],
            ));
            let tensors: Vec<TensorStep> = names
                .iter()
                .enumerate()
                .map(|(i, name)| TensorStep {
                    name,
                    before: &states[s][i],
                    ours: &after[s][i],
                    theirs: &states[s + 1][i],
                })
                .collect();
            let history: Vec<&GradientBounds> = bounds.iter().collect();
            training::assert_updates_close(
                &format!("rank {rank} step {s} update"),
                &tensors,
                &history,
                &params,
            );
        }
    }
}
