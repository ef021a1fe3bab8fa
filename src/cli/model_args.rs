//! The model flags every command shares, and their resolution to configs and files.

use crate::config::{BaseModelConfig, CfwConfig};
use crate::device::{DeviceRequest, DtypeRequest, Workload};
use crate::weights::hub;
use candle_core::{DType, Device};
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Diffusion checkpoint (.ckpt or .safetensors); default: face_stablesr_000050.ckpt from the
    /// Hugging Face hub (Iceclear/StableSR), cached by hf-hub.
    #[arg(long, value_name = "FILE")]
    pub base: Option<PathBuf>,
    /// CFW autoencoder checkpoint; default: face_vqgan_cfw_00011.ckpt from the hub.
    #[arg(long, value_name = "FILE")]
    pub cfw: Option<PathBuf>,
    #[command(flatten)]
    pub arch: ArchArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

/// The architecture flags: StableSR's own YAML files instead of the released defaults.
#[derive(Debug, Clone, Args)]
pub struct ArchArgs {
    /// StableSR YAML describing the diffusion model; default: the released face model's
    /// architecture.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// StableSR YAML describing the CFW autoencoder; default: the released one's architecture.
    #[arg(long, value_name = "FILE")]
    pub cfw_config: Option<PathBuf>,
}

/// Where and in which precision the networks run.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Where the networks run; auto: CUDA device 0 when this build has CUDA and it opens, else
    /// the CPU.
    #[arg(long, default_value = "auto", value_name = "auto|cpu|cuda|cuda:N", value_parser = device_request)]
    pub device: DeviceRequest,
    /// Weight and activation precision; auto: bf16 on GPUs of compute capability 8.0 and up,
    /// f16 on older GPUs, f32 on the CPU (bf16 needs CUDA).
    #[arg(long, default_value = "auto", value_name = "auto|f32|f16|bf16", value_parser = dtype_request)]
    pub dtype: DtypeRequest,
}

impl ArchArgs {
    pub fn base_config(&self) -> anyhow::Result<BaseModelConfig> {
        Ok(match &self.config {
            Some(path) => BaseModelConfig::from_yaml_file(path)?,
            None => BaseModelConfig::default(),
        })
    }

    pub fn cfw_config(&self) -> anyhow::Result<CfwConfig> {
        Ok(match &self.cfw_config {
            Some(path) => CfwConfig::from_yaml_file(path)?,
            None => CfwConfig::default(),
        })
    }
}

impl RunArgs {
    /// The device and precision for inference, saying on stderr (one line) which were chosen.
    pub fn device_dtype(&self) -> anyhow::Result<(Device, DType)> {
        self.device_dtype_for(Workload::Inference)
    }

    /// As [`RunArgs::device_dtype`] for `workload` (training resolves `auto` to f32).
    pub fn device_dtype_for(&self, workload: Workload) -> anyhow::Result<(Device, DType)> {
        let (device, dtype, line) = crate::device::resolve(self.device, self.dtype, workload)?;
        eprintln!("{line}");
        Ok((device, dtype))
    }
}

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    #[value(alias = "float32")]
    F32,
    #[value(alias = "float16", alias = "half")]
    F16,
    #[value(alias = "bfloat16")]
    Bf16,
}

impl From<Precision> for DType {
    fn from(p: Precision) -> DType {
        match p {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        })
    }
}

/// `--device` syntax (whether the device exists is checked when it is opened).
pub fn device_request(s: &str) -> Result<DeviceRequest, String> {
    crate::device::parse_device_request(s)
        .map_err(|_| format!("expected auto, cpu, cuda or cuda:N, got {s:?}"))
}

/// `--dtype` syntax of the model commands.
pub fn dtype_request(s: &str) -> Result<DtypeRequest, String> {
    crate::device::parse_dtype_request(s)
        .map_err(|_| format!("expected auto, f32, f16 or bf16, got {s:?}"))
}

impl ModelArgs {
    pub fn base_config(&self) -> anyhow::Result<BaseModelConfig> {
        self.arch.base_config()
    }

    pub fn cfw_config(&self) -> anyhow::Result<CfwConfig> {
        self.arch.cfw_config()
    }

    /// The diffusion checkpoint: `--base` or the hub file.
    pub fn base_path(&self, progress: bool) -> anyhow::Result<PathBuf> {
        match &self.base {
            Some(p) => Ok(p.clone()),
            None => Ok(hub::fetch_release_file(
                hub::FACE_DIFFUSION_FILE,
                "--base",
                progress,
            )?),
        }
    }

    /// The CFW checkpoint: `--cfw` or the hub file.
    pub fn cfw_path(&self, progress: bool) -> anyhow::Result<PathBuf> {
        match &self.cfw {
            Some(p) => Ok(p.clone()),
            None => Ok(hub::fetch_release_file(
                hub::FACE_CFW_FILE,
                "--cfw",
                progress,
            )?),
        }
    }

    pub fn device_dtype(&self) -> anyhow::Result<(Device, DType)> {
        self.run.device_dtype()
    }

    pub fn device_dtype_for(&self, workload: Workload) -> anyhow::Result<(Device, DType)> {
        self.run.device_dtype_for(workload)
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
