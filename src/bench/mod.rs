//! `pfstorer bench`: timings of the networks, for the performance notes (never a test).
//!
//! `pfstorer bench unet` times what the reference kit's `bench_unet_cpu.py` times: one
//! time-aware encoder pass on a batch-1 LQ latent plus one UNet forward on the CFG batch of 2,
//! at a square latent, with seeded random weights (or a weights file, e.g. the one the reference
//! script saves with `--save-weights`, so both sides run on the same numbers).
//! `bench weights` writes seeded random full-size checkpoints (original key names) once, so
//! pfstorer and the PyTorch reference (scripts/gpu_reference.py) time identical weights;
//! `bench restore` times a whole restore and `bench train` personalization iterations.
//! Every subcommand prints one JSON line.

pub mod codec;
pub mod faces;
pub mod restore;
pub mod train;
pub mod unet;
pub mod weights;

use crate::config::BaseModelConfig;
use crate::imaging::ImageF32;
use crate::model::base::{BaseModel, Residency};
use crate::weights::{CheckedWeights, Source};
use candle_core::{DType, Device};
use std::path::PathBuf;

/// A count of timed runs: the medians need one.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("expected a whole number of at least 1, got `{s}`")),
    }
}

/// The median of `times`: the middle value, or the mean of the two middle values of an even
/// count; `None` when there are none.
pub fn median(times: &[f64]) -> Option<f64> {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some(0.5 * (sorted[n / 2 - 1] + sorted[n / 2])),
    }
}

/// Waits until `device` has finished the work queued so far, so that the clock read next
/// covers it (CUDA kernels run asynchronously; a no-op on the CPU).
pub fn sync(device: &Device) -> anyhow::Result<()> {
    device.synchronize()?;
    Ok(())
}

pub(crate) fn base_config(path: &Option<PathBuf>) -> anyhow::Result<BaseModelConfig> {
    Ok(match path {
        Some(p) => BaseModelConfig::from_yaml_file(p)?,
        None => BaseModelConfig::default(),
    })
}

/// The diffusion model from `path`, or seeded random weights of `cfg`'s architecture.
pub(crate) fn load_base(
    path: &Option<PathBuf>,
    cfg: BaseModelConfig,
    dtype: DType,
    device: &Device,
    residency: Residency,
) -> anyhow::Result<BaseModel> {
    Ok(match path {
        Some(p) => BaseModel::load_with(p, cfg, dtype, device, residency)?.0,
        None => {
            let weights = CheckedWeights::new(Source::Random(0));
            BaseModel::from_weights_with(cfg, &weights, dtype, device, residency)?.0
        }
    })
}

/// Resets this process's peak RSS (`VmHWM`) to its current RSS; false where the kernel does not
/// allow it (then peaks cannot be told apart by stage).
pub(crate) fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A smooth face-sized test pattern (deterministic), RGB in [0, 1].
pub fn synthetic_face(size: usize, seed: u64) -> ImageF32 {
    let phase = seed as f32 * 0.37;
    let data = (0..size * size)
        .flat_map(|i| {
            let (x, y) = (
                (i % size) as f32 / size as f32,
                (i / size) as f32 / size as f32,
            );
            let r = ((x - 0.5).powi(2) + (y - 0.45).powi(2)).sqrt();
            let skin = (1.0 - 2.5 * r).clamp(0.0, 1.0);
            [
                (0.25 + 0.6 * skin + 0.05 * (9.0 * x + phase).sin()).clamp(0.0, 1.0),
                (0.2 + 0.45 * skin + 0.05 * (7.0 * y).cos()).clamp(0.0, 1.0),
                (0.2 + 0.35 * skin + 0.05 * (5.0 * (x + y) + phase).sin()).clamp(0.0, 1.0),
            ]
        })
        .collect();
    ImageF32::new(size, size, 3, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        // Even counts: the mean of the two middle values, not the slower one.
        assert_eq!(median(&[4.0, 1.0, 2.0, 10.0]), Some(3.0));
        assert_eq!(median(&[2.0, 1.0]), Some(1.5));
    }
}
