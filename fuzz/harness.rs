//! The fuzz harnesses, one function per target: the fuzz targets (`fuzz_targets/*.rs`) call them
//! with libFuzzer's inputs, and `tests/fuzz_regressions.rs` replays the seeds and every input
//! that ever crashed (`fuzz/regressions/<target>/`) through the same code.
//!
//! Each function must return (never panic, abort or exhaust memory) for any input.

#![allow(dead_code)]

use pfstorer::config::{BaseModelConfig, CfwConfig};
use pfstorer::imaging::io::decode_image_within;
use pfstorer::personalize::identity::Identity;
use pfstorer::restore::{
    image_to_tensor, pad_reflect_to_multiple, resize_bicubic_nchw, RestoreSettings, TargetSize,
};
use pfstorer::weights::{CheckedWeights, TensorStore};
use std::path::PathBuf;
use std::sync::Arc;

/// The readers under test take paths: each input is written to one scratch file per process
/// and thread, removed when the guard drops.
struct ScratchFile(PathBuf);

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl std::ops::Deref for ScratchFile {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

fn scratch_file(data: &[u8], ext: &str) -> ScratchFile {
    let path = std::env::temp_dir().join(format!(
        "pfstorer-fuzz-{}-{:?}.{ext}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&path, data).expect("scratch file");
    ScratchFile(path)
}

/// Pixels of the image harness: small enough that one execution stays fast; the limit logic is
/// what is under test.
pub const MAX_PIXELS: usize = 1 << 20;

/// Image decoding and the restore pre-processing of one image: decode with a pixel limit, plan
/// the sizes, convert to a tensor, upscale (bicubic, as the reference) and reflect-pad. The
/// first byte picks the target size, the rest is the file.
pub fn image_decode(data: &[u8]) {
    // The first byte picks the target size, the rest is the file.
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let Ok(loaded) = decode_image_within(bytes, MAX_PIXELS) else {
        return;
    };
    assert_eq!(
        loaded.rgb.data.len(),
        loaded.width() * loaded.height() * 3,
        "decoded buffer matches its size"
    );
    let target = match pick % 3 {
        0 => TargetSize::Scale(1.0 + (pick / 3) as f64 / 16.0),
        1 => TargetSize::LongSide(1 + pick as usize * 4),
        _ => TargetSize::Size(1 + pick as usize, 1 + (pick as usize * 7) % 300),
    };
    let settings = RestoreSettings {
        max_pixels: MAX_PIXELS,
        ..RestoreSettings::default()
    };
    let Ok(plan) = settings.plan(64, loaded.width(), loaded.height(), target) else {
        return;
    };
    assert!(plan.padded_w * plan.padded_h <= MAX_PIXELS);
    let device = candle_core::Device::Cpu;
    let lq = image_to_tensor(&loaded.rgb, &device).expect("RGB to tensor");
    let lq = resize_bicubic_nchw(&lq, plan.proc_h, plan.proc_w).expect("resize");
    if let Ok(padded) = pad_reflect_to_multiple(&lq, 32) {
        let (_, _, h, w) = padded.dims4().unwrap();
        assert_eq!((h, w), (plan.padded_h, plan.padded_w));
    }
}

/// The checkpoint reader (torch zip + pickle, or safetensors) and every stored tensor loaded
/// through the checked weight loader, as a model build does.
pub fn checkpoint(data: &[u8]) {
    let path = scratch_file(data, "ckpt");
    let Ok(store) = TensorStore::open(&path) else {
        return;
    };
    let shapes: Vec<(String, Vec<usize>)> = store
        .shapes()
        .iter()
        .map(|(k, (s, _))| (k.clone(), s.clone()))
        .collect();
    let weights = CheckedWeights::from_store(Arc::new(store));
    let vb = weights.var_builder(candle_core::DType::F32, &candle_core::Device::Cpu);
    for (name, shape) in shapes.iter().take(64) {
        let _ = vb.get(shape.as_slice(), name);
    }
    let _ = weights.finish(&[""]);
}

/// Identity files (safetensors with pfstorer metadata), through the validating loader.
pub fn identity(data: &[u8]) {
    let path = scratch_file(data, "identity.safetensors");
    if let Ok(identity) = Identity::load_file(&path) {
        let _ = identity.hosts();
        let _ = identity.reference_count();
        let _ = identity.optimizer_state();
        let _ = identity.check_base("0");
    }
}

/// The model YAML parsers (diffusion and CFW configs), including the `<arch>.json` lookup.
pub fn yaml_config(data: &[u8]) {
    let path = scratch_file(data, "yaml");
    let _ = BaseModelConfig::from_yaml_file(&path);
    let _ = CfwConfig::from_yaml_file(&path);
}
