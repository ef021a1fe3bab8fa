//! Interrupting personalization loses nothing: a checkpoint holds the trainable tensors and the
//! AdamW moments, iteration i's random draws depend only on (seed, i), so "2 iterations,
//! checkpoint, restart, 2 more" is bit-identical to 4 uninterrupted iterations; and a run killed
//! mid-way leaves a checkpoint that `--resume` finishes.

mod common;

use candle_core::Tensor;
use pfstorer::imaging::ImageF32;
use pfstorer::personalize::identity::{Identity, IdentityInfo};
use pfstorer::personalize::trainer::{TrainConfig, TrainableParams, Trainer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn images() -> Vec<ImageF32> {
    common::wave_images(3, 64)
}

fn trainable(trainer: &Trainer) -> BTreeMap<String, Vec<f32>> {
    let (ica, gammas) = trainer.params.block_vars().unwrap();
    let mut out: BTreeMap<String, Vec<f32>> = ica
        .iter()
        .chain(&gammas)
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect();
    out.insert(
        "token".into(),
        trainer
            .params
            .token
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap(),
    );
    out
}

fn info() -> IdentityInfo {
    IdentityInfo {
        name: "resume".into(),
        base_fingerprint: "test".into(),
        ref_sources: vec![],
        training: serde_json::json!({}),
    }
}

#[test]
fn checkpoint_and_resume_is_bit_identical_to_an_uninterrupted_run() {
    let base = common::tiny_base();
    let images = images();
    let seed = 21;

    let params = TrainableParams::init(&base, seed).unwrap();
    let mut straight =
        Trainer::new(&base, params, &images, 64, TrainConfig::default(), seed).unwrap();
    for _ in 0..4 {
        straight.step().unwrap();
    }

    let params = TrainableParams::init(&base, seed).unwrap();
    let mut first = Trainer::new(&base, params, &images, 64, TrainConfig::default(), seed).unwrap();
    for _ in 0..2 {
        first.step().unwrap();
    }
    let dir = common::scratch("resume");
    let path = dir.join("run.checkpoint");
    Identity::checkpoint_from_trainer(&first, &info())
        .unwrap()
        .save(&path, true)
        .unwrap();
    drop(first);

    let saved = Identity::load_file(&path).unwrap();
    let (moments, steps) = saved.optimizer_state().expect("checkpoint has moments");
    assert_eq!(steps, 2);
    assert!(moments.keys().any(|k| k.starts_with("optim.ica.")));
    assert!(moments.contains_key("optim.token.embedding.m"));
    let params = TrainableParams::init(&base, seed).unwrap();
    let mut resumed =
        Trainer::new(&base, params, &images, 64, TrainConfig::default(), seed).unwrap();
    resumed.params.set_from(&saved.tensors).unwrap();
    resumed.load_optimizer_state(&moments, steps).unwrap();
    resumed.iteration = 2;
    for _ in 0..2 {
        resumed.step().unwrap();
    }

    let a = trainable(&straight);
    let b = trainable(&resumed);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, values) in &a {
        assert_eq!(values, &b[name], "`{name}` differs after resuming");
    }
    // And the run did move: the gates are no longer zero.
    let gamma_norm: f32 = a
        .iter()
        .filter(|(k, _)| k.ends_with(".gamma"))
        .flat_map(|(_, v)| v.iter().map(|x| x.abs()))
        .sum();
    assert!(gamma_norm > 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

fn write_refs(dir: &Path) -> Vec<PathBuf> {
    images()
        .iter()
        .enumerate()
        .map(|(k, img)| {
            let path = dir.join(format!("ref{k}.png"));
            let rgb = image::RgbImage::from_fn(64, 64, |x, y| {
                let i = (y as usize * 64 + x as usize) * 3;
                let px = |c: usize| (img.data[i + c].clamp(0.0, 1.0) * 255.0).round() as u8;
                image::Rgb([px(0), px(1), px(2)])
            });
            rgb.save(&path).unwrap();
            path
        })
        .collect()
}

fn personalize_args(refs: &[PathBuf], out: &Path, steps: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "personalize".into(),
        "--refs-aligned".into(),
        "--refs".into(),
    ];
    args.extend(refs.iter().map(|p| p.to_string_lossy().into_owned()));
    for s in [
        "--id", "bob", "--size", "64", "--quiet", "--steps", steps, "--out",
    ] {
        args.push(s.into());
    }
    args.push(out.to_string_lossy().into_owned());
    args.extend(extra.iter().map(|s| s.to_string()));
    for (flag, rel) in [
        ("--base", "stablesr/model.safetensors"),
        ("--config", "stablesr/config.yaml"),
        ("--cfw", "stablesr/cfw.safetensors"),
        ("--cfw-config", "stablesr/cfw.yaml"),
    ] {
        args.push(flag.into());
        args.push(common::fixture(rel).to_string_lossy().into_owned());
    }
    args
}

#[test]
fn killed_run_leaves_a_checkpoint_that_resume_finishes() {
    let root = common::scratch("sigint");
    let refs = write_refs(&root);
    let out = root.join("bob.identity.safetensors");
    let checkpoint = root.join("bob.identity.safetensors.checkpoint");
    let bin = env!("CARGO_BIN_EXE_pfstorer");

    let mut child = Command::new(bin)
        .args(personalize_args(
            &refs,
            &out,
            "1000",
            &["--checkpoint-every", "1"],
        ))
        .env("PFSTORER_HOME", root.join("home"))
        .spawn()
        .expect("start pfstorer");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !checkpoint.is_file() {
        assert!(
            Instant::now() < deadline,
            "no checkpoint at {}",
            checkpoint.display()
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("personalize exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let it get into the middle of further iterations (and checkpoint writes), then kill it.
    // SIGKILL, not SIGINT: pfstorer installs no handler, so Ctrl-C ends it the same abrupt way,
    // but a test started from a background shell inherits an ignored SIGINT.
    std::thread::sleep(Duration::from_millis(700));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "interrupted run must not report success");
    assert!(
        !out.exists(),
        "no identity is written by an interrupted run"
    );

    let saved = Identity::load_file(&checkpoint).expect("checkpoint readable after the kill");
    let done: usize = saved.metadata["iterations_done"].parse().unwrap();
    assert!(done >= 1);
    assert_eq!(saved.optimizer_state().map(|(_, s)| s), Some(done));
    let token: Tensor = saved.tensor("token.embedding").unwrap().clone();
    assert_eq!(token.dims()[0], 1);
    let steps = (done + 1).to_string();
    let resumed = Command::new(bin)
        .args(personalize_args(&refs, &out, &steps, &["--resume"]))
        .env("PFSTORER_HOME", root.join("home"))
        .output()
        .unwrap();
    assert!(
        resumed.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let finished = Identity::load_file(&out).unwrap();
    assert_eq!(finished.metadata["iterations_done"], steps);
    assert!(
        finished.optimizer_state().is_none(),
        "final identity carries no optimizer state"
    );
    assert!(!checkpoint.exists(), "checkpoint removed after success");
    let _ = std::fs::remove_dir_all(&root);
}
