//! Shared helpers of the fixture-driven tests.
//!
//! The fixture root is `$PFSTORER_FIXTURES` when set, else the committed copy in
//! `tests/fixtures/`. A missing file fails the test with the path it looked for.
#![allow(dead_code)]

pub mod child;
pub mod faces;
pub mod hostile;
pub mod training;

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixture_root() -> PathBuf {
    match std::env::var_os("PFSTORER_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

/// Device of the parity tests: `$PFSTORER_TEST_DEVICE` (cpu, cuda, cuda:N; default cpu). The
/// GPU check (scripts/gpu-check.sh) runs the same test executables on CUDA.
pub fn test_device() -> Device {
    match std::env::var("PFSTORER_TEST_DEVICE") {
        Ok(spec) => pfstorer::device::parse_device(&spec)
            .unwrap_or_else(|e| panic!("PFSTORER_TEST_DEVICE: {e}")),
        Err(_) => Device::Cpu,
    }
}

/// Precision of the parity tests: `$PFSTORER_TEST_DTYPE` (f32, f16, bf16; default f32).
pub fn test_dtype() -> DType {
    match std::env::var("PFSTORER_TEST_DTYPE") {
        Ok(spec) => {
            let dtype = pfstorer::device::parse_dtype(&spec)
                .unwrap_or_else(|e| panic!("PFSTORER_TEST_DTYPE: {e}"));
            pfstorer::device::check_dtype_on(&test_device(), dtype)
                .unwrap_or_else(|e| panic!("PFSTORER_TEST_DTYPE: {e}"));
            dtype
        }
        Err(_) => DType::F32,
    }
}

/// A fixture tensor moved to the test device; floating tensors in the test precision.
pub fn input(map: &HashMap<String, Tensor>, key: &str) -> Tensor {
    let t = get(map, key);
    let t = if t.dtype().is_float() {
        t.to_dtype(test_dtype()).unwrap()
    } else {
        t.clone()
    };
    t.to_device(&test_device()).unwrap()
}

/// Tolerance `(atol, rtol)` of one module's output at the test precision, against references
/// computed in f32. f32: the fixtures README's 1e-4 + 1e-3·|ref|. Half precision is judged
/// relative to the output's largest magnitude `s` (at least 1): f16 1e-2·s — measured on the CPU,
/// the worst module (CFW posterior mean) reaches 3.7e-3·s, so the bound has a 2.7x margin; bf16
/// 8e-2·s — bf16 rounds 8x coarser than f16 (2^-8 vs 2^-11), so the same 2.7x margin over the
/// f16 measurement scaled by 8. candle's CPU matmul has no bf16 kernel, so bf16 runs on CUDA only
/// (scripts/gpu-check.sh); it is a wiring/overflow check, the f32 run is the precise one.
pub fn module_tolerance(expected: &Tensor) -> (f64, f64) {
    let scale = max_abs(expected).max(1.0) as f64;
    match test_dtype() {
        DType::BF16 => (8e-2 * scale, 0.0),
        DType::F16 => (1e-2 * scale, 0.0),
        _ => (1e-4, 1e-3),
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

/// The elements of `t` as f64 (any device, any float dtype), failing the test on the first NaN or
/// infinity: candle's reductions (`max`, `min`) skip NaN, so every comparison of the tests goes
/// through here and a non-finite value can never slip past a bound.
pub fn finite_values(name: &str, t: &Tensor) -> Vec<f64> {
    let values: Vec<f64> = t
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        panic!(
            "{name}: element {i} of shape {:?} is {} (not finite)",
            t.dims(),
            values[i]
        );
    }
    values
}

/// Asserts `|a - b| <= atol + rtol * |b|` elementwise and returns the max abs error,
/// which is printed so `cargo test -- --nocapture` shows the parity margin. Any NaN or infinity
/// in either tensor fails.
pub fn assert_close(name: &str, actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) -> f64 {
    assert_eq!(
        actual.dims(),
        expected.dims(),
        "{name}: shape {:?} vs reference {:?}",
        actual.dims(),
        expected.dims()
    );
    let a = finite_values(name, actual);
    let b = finite_values(&format!("{name} (reference)"), expected);
    let mut max_abs = 0f64;
    let mut worst = None;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let err = (x - y).abs();
        if err > atol + rtol * y.abs() {
            worst.get_or_insert((i, *x, *y));
        }
        max_abs = max_abs.max(err);
    }
    println!(
        "{name}: max abs error {max_abs:.3e} over {} elements (tolerance {atol:.1e} + {rtol:.1e}*|ref|)",
        a.len()
    );
    if let Some((i, x, y)) = worst {
        panic!("{name}: element {i} = {x} vs reference {y} (max abs error {max_abs:.3e}, tolerance {atol} + {rtol}*|ref|)");
    }
    max_abs
}

/// Single-module tolerance of the fixtures' README (f32), or [`module_tolerance`]'s half-precision
/// bound when the tests run in f16/bf16.
pub fn assert_module_close(name: &str, actual: &Tensor, expected: &Tensor) -> f64 {
    let (atol, rtol) = module_tolerance(expected);
    assert_close(name, actual, expected, atol, rtol)
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

/// Max |a - b| over all elements (shapes must agree); a NaN or infinity in either fails.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let x = finite_values("max_abs_diff: first tensor", a);
    let y = finite_values("max_abs_diff: second tensor", b);
    x.iter()
        .zip(&y)
        .map(|(x, y)| (x - y).abs())
        .fold(0f64, f64::max) as f32
}

/// Max |x| over all elements, any device and float dtype; a NaN or infinity fails.
pub fn max_abs(x: &Tensor) -> f32 {
    finite_values("max_abs", x)
        .iter()
        .fold(0f64, |m, v| m.max(v.abs())) as f32
}

/// `count` smooth synthetic `side`² RGB images (sine/cosine bands, one phase per image): the
/// personalization tests' stand-in for reference photos.
pub fn wave_images(count: usize, side: usize) -> Vec<pfstorer::imaging::ImageF32> {
    (0..count)
        .map(|k| {
            let data = (0..side * side)
                .flat_map(|i| {
                    let (x, y) = (
                        (i % side) as f32 / side as f32,
                        (i / side) as f32 / side as f32,
                    );
                    [
                        0.5 + 0.4 * (7.0 * x + k as f32).sin(),
                        0.5 + 0.4 * (4.0 * y).cos(),
                        0.2 + 0.6 * x * y,
                    ]
                })
                .collect();
            pfstorer::imaging::ImageF32::new(side, side, 3, data)
        })
        .collect()
}

/// Gradient tolerance `(atol, rtol)` at the test precision, scaled to the tensor: no fixed
/// absolute floor, which would leave every element below it unchecked. A gradient element is a
/// sum over many paths whose terms reach the size of the tensor's largest entries, so its f32
/// rounding error scales with `max|ref|`, not only with the element itself: the reference
/// itself, rerun at another thread count, moves the release-size token-embedding gradient
/// (max |g| = 417) by 5.4e-4 = 1.3e-6·max|g|, and the fixture's training gradients by at most
/// 3.5e-6·max|g|. f32: 1e-5·max|ref| + 1e-4·|ref| (about 3x the larger of those); half
/// precision: [`module_tolerance`].
pub fn gradient_tolerance(expected: &Tensor) -> (f64, f64) {
    match test_dtype() {
        DType::F32 => (1e-5 * max_abs(expected) as f64, 1e-4),
        _ => module_tolerance(expected),
    }
}

/// [`assert_close`] with [`gradient_tolerance`].
pub fn assert_gradient_close(name: &str, actual: &Tensor, expected: &Tensor) -> f64 {
    let (atol, rtol) = gradient_tolerance(expected);
    assert_close(name, actual, expected, atol, rtol)
}

/// The fixture model's configuration (`stablesr/config.yaml`).
pub fn tiny_config() -> pfstorer::config::BaseModelConfig {
    pfstorer::config::BaseModelConfig::from_yaml_file(&fixture("stablesr/config.yaml")).unwrap()
}

/// Native size of the fast CLI runs: small, and a multiple of any VAE's downsampling factor.
pub const FAST_INPUT_SIZE: usize = 64;

/// Latent tile of the fixture model at `--input-size FAST_INPUT_SIZE`.
pub fn fast_latent_tile() -> usize {
    FAST_INPUT_SIZE / tiny_config().vae.downsample_factor()
}

/// Fast sampling flags for CLI runs of the fixture model: 2 steps, `--input-size 64` and a tile
/// overlap of half the latent tile (derived from the fixture VAE's downsampling factor).
pub fn fast_sampling_flags() -> Vec<String> {
    let overlap = fast_latent_tile() / 2;
    [
        "--steps".to_string(),
        "2".to_string(),
        "--input-size".to_string(),
        FAST_INPUT_SIZE.to_string(),
        "--tile-overlap".to_string(),
        overlap.to_string(),
    ]
    .to_vec()
}

/// `--base/--config/--cfw/--cfw-config` of the fixture model, for CLI runs.
pub fn model_flags() -> Vec<String> {
    [
        ("--base", "stablesr/model.safetensors"),
        ("--config", "stablesr/config.yaml"),
        ("--cfw", "stablesr/cfw.safetensors"),
        ("--cfw-config", "stablesr/cfw.yaml"),
    ]
    .iter()
    .flat_map(|(flag, rel)| {
        [
            flag.to_string(),
            fixture(rel).to_string_lossy().into_owned(),
        ]
    })
    .collect()
}

/// A fresh, empty directory for one test, removed when dropped (also when the test fails),
/// so a suite run leaves nothing behind in the temp folder. Derefs to its path.
pub struct Scratch(tempfile::TempDir);

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl AsRef<std::path::Path> for Scratch {
    fn as_ref(&self) -> &std::path::Path {
        self.0.path()
    }
}

pub fn scratch(name: &str) -> Scratch {
    let dir = tempfile::Builder::new()
        .prefix(&format!("pfstorer-{name}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("creating a scratch directory: {e}"));
    Scratch(dir)
}
