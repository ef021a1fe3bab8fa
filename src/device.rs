//! Device and dtype selection from the CLI's `--device` / `--dtype` strings.

use crate::error::{Error, Result};
use candle_core::{DType, Device};

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = if spec == "cuda" {
        0
    } else if let Some(n) = spec.strip_prefix("cuda:") {
        n.parse::<usize>()
            .map_err(|_| Error::Input(format!("--device {spec}: expected cpu, cuda or cuda:N")))?
    } else {
        return Err(Error::Input(format!(
            "--device {spec}: expected cpu, cuda or cuda:N"
        )));
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Input(format!(
            "--device {spec}: this pfstorer was built without CUDA support (rebuild with `--features cuda`)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        Error::Input(format!(
            "--device {spec}: no usable CUDA device ({})",
            e.to_string().lines().next().unwrap_or("unknown error")
        ))
    })
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(Error::Input(format!(
            "--dtype {other}: expected f32, f16 or bf16"
        ))),
    }
}

/// Refuses precisions the device cannot run: candle's CPU backend has no bf16 matrix product
/// (every linear layer and convolution), so bf16 is CUDA-only; f16 works on both.
pub fn check_dtype_on(device: &Device, dtype: DType) -> Result<()> {
    if device.is_cpu() && dtype == DType::BF16 {
        return Err(Error::Input(
            "--dtype bf16 needs --device cuda (the CPU backend has no bf16 matrix product); use f32 or f16 on the CPU".into(),
        ));
    }
    Ok(())
}
