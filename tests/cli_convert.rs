//! `pfstorer convert`: a Lightning .ckpt becomes a safetensors file with the same names and
//! values; half precision on request; no silent overwrite; clear errors.

mod common;

use candle_core::{DType, Device};
use std::process::Command;

fn convert(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pfstorer"))
        .arg("convert")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn ckpt_converts_to_identical_safetensors() {
    let dir = common::scratch("convert");
    let ckpt = common::fixture("stablesr/model.ckpt");
    let out = dir.join("model.safetensors");
    let o = convert(&[ckpt.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let ours = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let reference =
        candle_core::safetensors::load(common::fixture("stablesr/model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(ours.len(), reference.len());
    for (name, t) in &reference {
        let mine = ours.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(mine.dims(), t.dims(), "{name}");
        let diff = common::max_abs_diff(mine, t);
        assert_eq!(diff, 0.0, "{name} differs");
    }

    // Existing output: refused, untouched.
    let before = std::fs::read(&out).unwrap();
    let o = convert(&[
        ckpt.to_str().unwrap(),
        out.to_str().unwrap(),
        "--dtype",
        "f16",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(std::fs::read(&out).unwrap(), before);

    // --force with f16.
    let o = convert(&[
        ckpt.to_str().unwrap(),
        out.to_str().unwrap(),
        "--dtype",
        "f16",
        "--force",
    ]);
    assert!(o.status.success());
    let half = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert!(half
        .values()
        .all(|t| t.dtype() == DType::F16 || !t.dtype().is_float()));

    // Not a checkpoint: one line naming the file.
    let bad = dir.join("bad.ckpt");
    std::fs::write(&bad, "hello").unwrap();
    let o = convert(&[
        bad.to_str().unwrap(),
        dir.join("x.safetensors").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("bad.ckpt") && err.trim().lines().count() == 1,
        "{err}"
    );
    assert!(!dir.join("x.safetensors").exists());
}

#[test]
fn cuda_device_without_cuda_support_is_a_clear_error() {
    if candle_core::utils::cuda_is_available() {
        return; // a CUDA build: the flag is valid there
    }
    let o = Command::new(env!("CARGO_BIN_EXE_pfstorer"))
        .args(["bench", "unet", "--config"])
        .arg(common::fixture("stablesr/config.yaml"))
        .args(["--latent", "8", "--runs", "1", "--device", "cuda"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--device cuda") && err.contains("without CUDA support"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn bf16_on_the_cpu_is_a_clear_error() {
    let o = Command::new(env!("CARGO_BIN_EXE_pfstorer"))
        .args(["bench", "unet", "--config"])
        .arg(common::fixture("stablesr/config.yaml"))
        .args(["--latent", "8", "--runs", "1", "--dtype", "bf16"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--dtype bf16") && err.contains("--device cuda"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn f16_runs_on_the_cpu() {
    // The tiny UNet benchmark in f16 produces a timing line, like f32 (its accuracy is checked
    // by parity_unet's half-precision test).
    let o = Command::new(env!("CARGO_BIN_EXE_pfstorer"))
        .args(["bench", "unet", "--config"])
        .arg(common::fixture("stablesr/config.yaml"))
        .args(["--latent", "8", "--runs", "1", "--dtype", "f16"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(json["dtype"], "f16");
    assert!(json["median_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn zero_timed_runs_is_a_clear_error() {
    // The medians need a timed run; `--runs 0` used to panic after the warm-up.
    for what in ["unet", "codec"] {
        let o = Command::new(env!("CARGO_BIN_EXE_pfstorer"))
            .args(["bench", what, "--runs", "0"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{what}: {err}");
        assert!(
            err.contains("--runs") && err.contains("at least 1") && !err.contains("panicked"),
            "{what}: {err}"
        );
    }
}
