//! `pfstorer bench weights`: seeded random full-size checkpoints with the original key names.

use crate::config::{BaseModelConfig, CfwConfig};
use crate::diffusion::schedule::Schedule;
use crate::model::base::{BaseModel, CfwModel};
use crate::weights::checked::random_tensor;
use crate::weights::CheckedWeights;
use candle_core::{DType, Device, Shape};
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Args)]
pub struct WeightsBench {
    /// Folder for stablesr_face_random.safetensors and cfw_random.safetensors.
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
}

pub fn run(b: WeightsBench) -> anyhow::Result<()> {
    let started = Instant::now();
    let base_file = b.out_dir.join("stablesr_face_random.safetensors");
    let cfw_file = b.out_dir.join("cfw_random.safetensors");
    for f in [&base_file, &cfw_file] {
        crate::fsutil::check_overwrite(f, b.force)?;
    }
    // Build each model once against a shapes-only source to learn every key it requests, then
    // write the seeded value of each; the schedule buffers get their true values, since the
    // reference samples with the buffers it loads.
    let probe = CheckedWeights::shapes_only();
    BaseModel::from_weights(BaseModelConfig::default(), &probe, DType::F32, &Device::Cpu)?;
    let schedule = Schedule::linear(&BaseModelConfig::default().diffusion)?;
    let schedule_values: Vec<(&str, &Vec<f64>)> = vec![
        ("betas", &schedule.betas),
        ("alphas_cumprod", &schedule.alphas_cumprod),
        ("alphas_cumprod_prev", &schedule.alphas_cumprod_prev),
        ("sqrt_alphas_cumprod", &schedule.sqrt_alphas_cumprod),
        (
            "sqrt_one_minus_alphas_cumprod",
            &schedule.sqrt_one_minus_alphas_cumprod,
        ),
        (
            "log_one_minus_alphas_cumprod",
            &schedule.log_one_minus_alphas_cumprod,
        ),
        (
            "sqrt_recip_alphas_cumprod",
            &schedule.sqrt_recip_alphas_cumprod,
        ),
        (
            "sqrt_recipm1_alphas_cumprod",
            &schedule.sqrt_recipm1_alphas_cumprod,
        ),
        ("posterior_variance", &schedule.posterior_variance),
        (
            "posterior_log_variance_clipped",
            &schedule.posterior_log_variance_clipped,
        ),
        ("posterior_mean_coef1", &schedule.posterior_mean_coef1),
        ("posterior_mean_coef2", &schedule.posterior_mean_coef2),
    ];
    let base_count = write_random(&base_file, &probe.requested(), b.seed, &schedule_values)?;

    let probe = CheckedWeights::shapes_only();
    CfwModel::from_weights(CfwConfig::default(), &probe, DType::F32, &Device::Cpu)?;
    let cfw_count = write_random(&cfw_file, &probe.requested(), b.seed, &[])?;
    println!(
        "{}",
        serde_json::json!({
            "what": "pfstorer: random full-size checkpoints",
            "base": base_file.display().to_string(),
            "base_tensors": base_count,
            "cfw": cfw_file.display().to_string(),
            "cfw_tensors": cfw_count,
            "seed": b.seed,
            "seconds": started.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}

/// Writes every requested tensor (seeded values, or `fixed` ones by name) as f32 safetensors.
fn write_random(
    path: &Path,
    requested: &std::collections::BTreeMap<String, Vec<usize>>,
    seed: u64,
    fixed: &[(&str, &Vec<f64>)],
) -> anyhow::Result<usize> {
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(requested.len());
    for (name, shape) in requested {
        let values: Vec<f32> = match fixed.iter().find(|(n, _)| n == name) {
            Some((_, v)) => v.iter().map(|&x| x as f32).collect(),
            None => random_tensor(&Shape::from(shape.as_slice()), name, seed)?
                .flatten_all()?
                .to_vec1()?,
        };
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        buffers.push((name.clone(), shape.clone(), bytes));
    }
    let views = buffers
        .iter()
        .map(|(name, shape, bytes)| {
            Ok((
                name.clone(),
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytes,
                )?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    crate::fsutil::write_atomic(path, crate::fsutil::WriteMode::Replace, |tmp| {
        safetensors::tensor::serialize_to_file(views, None, tmp)
            .map_err(|e| crate::error::Error::Input(format!("{}: {e}", tmp.display())))
    })?;
    Ok(buffers.len())
}
