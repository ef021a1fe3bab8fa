//! The released weights on the Hugging Face hub, fetched into hf-hub's standard cache
//! (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`) with a progress bar.

use crate::error::{Error, Result};
use std::path::PathBuf;

/// Hub repository of StableSR's released checkpoints.
pub const STABLESR_REPO: &str = "Iceclear/StableSR";
/// The face diffusion model (UNet, time-aware encoder, text encoder, VAE).
pub const FACE_DIFFUSION_FILE: &str = "face_stablesr_000050.ckpt";
/// The generic StableSR model (SD-2.1 base fine-tuned on general images, eps-prediction): what
/// StableSR's face config initialises from, so base training's default init.
pub const GENERIC_DIFFUSION_FILE: &str = "stablesr_000117.ckpt";
/// The CFW autoencoder fine-tuned on faces.
pub const FACE_CFW_FILE: &str = "face_vqgan_cfw_00011.ckpt";

/// Returns the local path of `file` from the StableSR hub repository, downloading it into the
/// hf-hub cache if needed. `local_flag` names the CLI flag that takes a local file instead, for
/// the error message when neither the cache nor the network has it.
pub fn fetch_release_file(file: &str, local_flag: &str, progress: bool) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    if let Some(path) = cache.model(STABLESR_REPO.to_string()).get(file) {
        return Ok(path);
    }
    let offline_hint = |why: String| {
        Error::Weights(format!(
            "{file} is not in the Hugging Face cache ({}) and could not be downloaded from {STABLESR_REPO} ({why}); pass a local copy with {local_flag} FILE",
            cache.path().display()
        ))
    };
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1") {
        return Err(offline_hint("HF_HUB_OFFLINE=1".into()));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(progress)
        .build()
        .map_err(|e| offline_hint(e.to_string()))?;
    api.model(STABLESR_REPO.to_string())
        .get(file)
        .map_err(|e| offline_hint(first_line(&e.to_string()).to_string()))
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}
