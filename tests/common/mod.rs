//! Shared helpers of the fixture-driven tests.
//!
//! The fixture root is `$PFSTORER_FIXTURES` when set, else the committed copy in
//! `tests/fixtures/`. A missing file fails the test with the path it looked for.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixture_root() -> PathBuf {
    match std::env::var_os("PFSTORER_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

/// Path of a fixture file; panics (fails the test) naming the path when it is absent.
pub fn fixture(rel: &str) -> PathBuf {
    let path = fixture_root().join(rel);
    assert!(
        path.is_file(),
        "fixture missing: {} (set PFSTORER_FIXTURES or restore tests/fixtures)",
        path.display()
    );
    path
}

/// All tensors of a safetensors fixture, on the CPU.
pub fn load(rel: &str) -> HashMap<String, Tensor> {
    let path = fixture(rel);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

pub fn get<'a>(map: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    map.get(key)
        .unwrap_or_else(|| panic!("fixture tensor `{key}` missing"))
}

/// Asserts `|a - b| <= atol + rtol * |b|` elementwise and returns the max abs error,
/// which is printed so `cargo test -- --nocapture` shows the parity margin.
pub fn assert_close(name: &str, actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) -> f64 {
    assert_eq!(
        actual.dims(),
        expected.dims(),
        "{name}: shape {:?} vs reference {:?}",
        actual.dims(),
        expected.dims()
    );
    let a: Vec<f64> = actual
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f64> = expected
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut max_abs = 0f64;
    let mut worst = None;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let err = (x - y).abs();
        if err.is_nan() || err > atol + rtol * y.abs() {
            worst.get_or_insert((i, *x, *y));
        }
        if err > max_abs || err.is_nan() {
            max_abs = err;
        }
    }
    println!(
        "{name}: max abs error {max_abs:.3e} over {} elements",
        a.len()
    );
    if let Some((i, x, y)) = worst {
        panic!("{name}: element {i} = {x} vs reference {y} (max abs error {max_abs:.3e}, tolerance {atol} + {rtol}*|ref|)");
    }
    max_abs
}

/// Single-module tolerance of the fixtures' README.
pub fn assert_module_close(name: &str, actual: &Tensor, expected: &Tensor) -> f64 {
    assert_close(name, actual, expected, 1e-4, 1e-3)
}

/// Key -> shape of a full-size checkpoint manifest (`manifests/*.json`, entries under `keys`).
pub fn manifest(rel: &str) -> std::collections::BTreeMap<String, Vec<usize>> {
    let path = fixture(rel);
    let text = std::fs::read_to_string(&path).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
    json["keys"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no `keys` list", path.display()))
        .iter()
        .map(|e| {
            let shape = e["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (e["key"].as_str().unwrap().to_string(), shape)
        })
        .collect()
}

/// The tiny fixture model (`stablesr/model.safetensors` through `stablesr/config.yaml`), f32 CPU.
pub fn tiny_base() -> pfstorer::model::base::BaseModel {
    let cfg = pfstorer::config::BaseModelConfig::from_yaml_file(&fixture("stablesr/config.yaml"))
        .unwrap();
    pfstorer::model::base::BaseModel::load(
        &fixture("stablesr/model.safetensors"),
        cfg,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
    .0
}

/// Standard-normal f32 tensor from a seeded, portable generator.
pub fn seeded_randn(seed: u64, shape: &[usize]) -> Tensor {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Max |a - b| over all elements (shapes must agree).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}
