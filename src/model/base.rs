//! The StableSR-face base model assembled from its two released checkpoints: the diffusion
//! checkpoint (UNet, time-aware encoder, OpenCLIP text encoder, VAE) and the CFW autoencoder.

use super::lq_encoder::LqEncoder;
use super::text_encoder::TextEncoder;
use super::tokenizer::ClipTokenizer;
use super::unet::UNet;
use super::vae::{AutoencoderKL, CfwAutoencoder};
use crate::config::{BaseModelConfig, CfwConfig};
use crate::error::{Error, Result};
use crate::weights::{CheckedWeights, TensorStore};
use candle_core::{DType, Device};
use std::path::Path;
use std::sync::Arc;

/// Checkpoint prefixes of the diffusion model's four networks.
pub const UNET_PREFIX: &str = "model.diffusion_model";
pub const LQ_ENCODER_PREFIX: &str = "structcond_stage_model";
pub const TEXT_PREFIX: &str = "cond_stage_model.model";
pub const VAE_PREFIX: &str = "first_stage_model";

/// The diffusion schedule buffers stored at the checkpoint root. They are read (so their shapes
/// are checked) but not used: inference re-registers the schedule from the config, as
/// StableSR's scripts do, because the stored buffers went through a float32 re-spacing.
pub const SCHEDULE_BUFFERS: [&str; 12] = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
];

pub struct BaseModel {
    pub config: BaseModelConfig,
    pub unet: UNet,
    pub lq_encoder: LqEncoder,
    /// `None` once released: a restore needs it only for its prompts' contexts, and it holds
    /// about a quarter of the model's weights.
    text_encoder: Option<TextEncoder>,
    pub vae: AutoencoderKL,
    pub tokenizer: ClipTokenizer,
    pub device: Device,
    pub dtype: DType,
}

/// What loading found besides the model: one line about tensors in the file the model does not
/// use (EMA copies, loss or optimizer extras), or `None`.
pub type UnusedSummary = Option<String>;

impl BaseModel {
    /// Builds every network of `config` from `weights`, checking names and shapes.
    pub fn from_weights(
        config: BaseModelConfig,
        weights: &CheckedWeights,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, UnusedSummary)> {
        Self::from_var_builder(config, weights.var_builder(dtype, device), weights)
    }

    /// Builds every network from `vb`, whose tensors come from `weights` (directly, or through
    /// a wrapper such as base training's, which turns the trained tensors into variables).
    pub fn from_var_builder(
        config: BaseModelConfig,
        vb: candle_nn::VarBuilder<'static>,
        weights: &CheckedWeights,
    ) -> Result<(Self, UnusedSummary)> {
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let unet = UNet::new(&config.unet, vb.pp(UNET_PREFIX))?;
        let lq_encoder = LqEncoder::new(&config.lq_encoder, vb.pp(LQ_ENCODER_PREFIX))?;
        let text_encoder = TextEncoder::new(&config.text, vb.pp(TEXT_PREFIX))?;
        let vae = AutoencoderKL::new(&config.vae, vb.pp(VAE_PREFIX))?;
        for name in SCHEDULE_BUFFERS {
            vb.get_with_hints_dtype(
                config.diffusion.timesteps,
                name,
                Default::default(),
                DType::F32,
            )?;
        }
        let mut prefixes: Vec<String> = [UNET_PREFIX, LQ_ENCODER_PREFIX, TEXT_PREFIX, VAE_PREFIX]
            .iter()
            .map(|p| format!("{p}."))
            .collect();
        prefixes.extend(SCHEDULE_BUFFERS.iter().map(|s| s.to_string()));
        let prefixes: Vec<&str> = prefixes.iter().map(|s| s.as_str()).collect();
        let report = weights.finish(&prefixes)?;
        let mut unused = report.unused;
        unused.extend(weights.outside(&prefixes));
        let summary = crate::weights::LoadReport {
            used: report.used,
            unused,
        }
        .unused_summary();
        Ok((
            BaseModel {
                config,
                unet,
                lq_encoder,
                text_encoder: Some(text_encoder),
                vae,
                tokenizer: ClipTokenizer::from_bundled()?,
                device,
                dtype,
            },
            summary,
        ))
    }

    /// The frozen text encoder; an error once [`BaseModel::release_text_encoder`] dropped it.
    pub fn text_encoder(&self) -> Result<&TextEncoder> {
        self.text_encoder.as_ref().ok_or_else(|| {
            Error::Config("the text encoder was released after the prompts were encoded".into())
        })
    }

    /// Frees the text encoder's weights (every context needed was computed).
    pub fn release_text_encoder(&mut self) {
        self.text_encoder = None;
    }

    /// Loads the diffusion checkpoint at `path` (.ckpt or .safetensors).
    pub fn load(
        path: &Path,
        config: BaseModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, UnusedSummary)> {
        let store = Arc::new(TensorStore::open(path)?);
        let weights = CheckedWeights::from_store(store);
        Self::from_weights(config, &weights, dtype, device).map_err(|e| match e {
            Error::Candle(c) => Error::Weights(format!("{}: {}", path.display(), c)),
            other => other,
        })
    }
}

/// The CFW autoencoder with its default fusion weight.
pub struct CfwModel {
    pub config: CfwConfig,
    pub autoencoder: CfwAutoencoder,
    /// Precision of the autoencoder's weights; its inputs are cast to it.
    pub dtype: DType,
}

impl CfwModel {
    pub fn from_weights(
        config: CfwConfig,
        weights: &CheckedWeights,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, UnusedSummary)> {
        let vb = weights.var_builder(dtype, device);
        let autoencoder = CfwAutoencoder::new(&config.vae, vb)?;
        let prefixes = ["encoder.", "decoder.", "quant_conv.", "post_quant_conv."];
        let report = weights.finish(&prefixes)?;
        let mut unused = report.unused;
        unused.extend(weights.outside(&prefixes));
        let summary = crate::weights::LoadReport {
            used: report.used,
            unused,
        }
        .unused_summary();
        Ok((
            CfwModel {
                config,
                autoencoder,
                dtype,
            },
            summary,
        ))
    }

    pub fn load(
        path: &Path,
        config: CfwConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, UnusedSummary)> {
        let store = Arc::new(TensorStore::open(path)?);
        let weights = CheckedWeights::from_store(store);
        Self::from_weights(config, &weights, dtype, device).map_err(|e| match e {
            Error::Candle(c) => Error::Weights(format!("{}: {}", path.display(), c)),
            other => other,
        })
    }
}
