//! The fingerprint of a base model: a SHA-256 over its weights' values, so an identity can say
//! which base it was trained on (and `restore --id` can refuse another), whatever the container
//! format. Hashing a full-size checkpoint reads ~5 GB, so results are cached by path, size and
//! modification time.

use super::digest::{to_hex, Digest, Sha256};
use super::TensorStore;
use crate::error::{Error, Result};
use crate::model::base::{LQ_ENCODER_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX};
use candle_core::{DType, Device};
use std::collections::BTreeMap;
use std::path::Path;

/// SHA-256 over the sorted (name, stored dtype, shape, little-endian f32 values) of every UNet,
/// time-aware encoder, text-encoder and VAE tensor of a diffusion checkpoint. Values are hashed
/// as f32 (exact for f16/bf16 checkpoints too), so the fingerprint names the weights, not the
/// container format.
pub fn base_fingerprint(store: &TensorStore) -> Result<String> {
    let prefixes =
        [UNET_PREFIX, LQ_ENCODER_PREFIX, TEXT_PREFIX, VAE_PREFIX].map(|p| format!("{p}."));
    let mut hasher = Sha256::new();
    let mut count = 0usize;
    for (name, (shape, dtype)) in store.shapes() {
        if !prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            continue;
        }
        let tensor = store.load(name, DType::F32, &Device::Cpu)?;
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(dtype.as_str().as_bytes());
        hasher.update([0]);
        for d in shape {
            hasher.update((*d as u64).to_le_bytes());
        }
        let values: Vec<f32> = tensor.flatten_all()?.to_vec1()?;
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        hasher.update(&bytes);
        count += 1;
    }
    if count == 0 {
        return Err(Error::Weights(format!(
            "{}: no base-model tensors to fingerprint",
            store.path().display()
        )));
    }
    Ok(to_hex(&hasher.finalize()))
}

/// [`base_fingerprint`] of the checkpoint at `path`, remembered across runs: hashing a
/// full-size checkpoint reads ~5 GB of values, so the result is cached in
/// `<data dir>/fingerprints.json` keyed by the canonical path, size and modification time
/// (a changed file is hashed again). The cache is best-effort: unreadable or unwritable is a miss.
pub fn base_fingerprint_cached(path: &Path) -> Result<String> {
    let key = fingerprint_cache_key(path);
    let cache_file = crate::fsutil::data_home()
        .ok()
        .map(|home| home.join("fingerprints.json"));
    let mut cache: BTreeMap<String, String> = cache_file
        .as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    if let Some(hit) = key.as_ref().and_then(|k| cache.get(k)) {
        return Ok(hit.clone());
    }
    let fingerprint = base_fingerprint(&TensorStore::open(path)?)?;
    if let (Some(key), Some(file)) = (key, cache_file) {
        cache.insert(key, fingerprint.clone());
        if let Ok(text) = serde_json::to_string_pretty(&cache) {
            let _ = crate::fsutil::write_atomic(&file, crate::fsutil::WriteMode::Replace, |tmp| {
                std::fs::write(tmp, &text).map_err(|e| Error::io(tmp, e))
            });
        }
    }
    Ok(fingerprint)
}

fn fingerprint_cache_key(path: &Path) -> Option<String> {
    let canonical = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&canonical).ok()?;
    let mtime = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some(format!(
        "{}|{}|{}.{:09}",
        canonical.display(),
        meta.len(),
        mtime.as_secs(),
        mtime.subsec_nanos()
    ))
}
