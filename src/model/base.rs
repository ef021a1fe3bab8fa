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

/// Which networks of the diffusion checkpoint a [`BaseModel`] holds. Whatever it does not hold is
/// still checked against the file (every name, shape and dtype) but never read, and is a
/// zero-cost placeholder that [`BaseModel::require`] refuses to run. The VAE decoder is never
/// held: restoring writes pixels through the CFW decoder, training works on latents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// UNet, time-aware encoder, VAE encoder and text encoder (training, personalization).
    Full,
    /// Everything but the text encoder: sampling, once the prompts' contexts are computed.
    WithoutText,
    /// The text encoder alone, to compute prompt contexts before the rest is loaded (so its
    /// ~1.4 GB and the UNet's ~3.7 GB are never in memory together).
    TextOnly,
    /// The VAE encoder alone: the first stage of a staged restore (LQ image -> latent).
    VaeEncoderOnly,
    /// The UNet and the time-aware encoder alone: the sampling stage of a staged restore, with
    /// nothing else of the checkpoint beside their ~3.9 GB.
    SamplingOnly,
}

/// The networks of the diffusion checkpoint that run (the VAE decoder never does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    Text,
    VaeEncoder,
    /// The UNet and the time-aware encoder, which always run together.
    Sampling,
}

impl Residency {
    /// Whether a model loaded with this residency holds `network`'s weights.
    pub fn holds(self, network: Network) -> bool {
        use Network::*;
        match self {
            Residency::Full => true,
            Residency::WithoutText => network != Text,
            Residency::TextOnly => network == Text,
            Residency::VaeEncoderOnly => network == VaeEncoder,
            Residency::SamplingOnly => network == Sampling,
        }
    }
}

pub struct BaseModel {
    pub config: BaseModelConfig,
    /// What this model holds (see [`Residency`]).
    pub residency: Residency,
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
        Self::from_weights_with(config, weights, dtype, device, Residency::Full)
    }

    /// [`BaseModel::from_weights`] holding only the networks `residency` names.
    pub fn from_weights_with(
        config: BaseModelConfig,
        weights: &CheckedWeights,
        dtype: DType,
        device: &Device,
        residency: Residency,
    ) -> Result<(Self, UnusedSummary)> {
        Self::from_var_builder_with(
            config,
            weights.var_builder(dtype, device),
            weights,
            residency,
        )
    }

    /// Builds every network from `vb`, whose tensors come from `weights` (directly, or through
    /// a wrapper such as base training's, which turns the trained tensors into variables).
    pub fn from_var_builder(
        config: BaseModelConfig,
        vb: candle_nn::VarBuilder<'static>,
        weights: &CheckedWeights,
    ) -> Result<(Self, UnusedSummary)> {
        Self::from_var_builder_with(config, vb, weights, Residency::Full)
    }

    fn from_var_builder_with(
        config: BaseModelConfig,
        vb: candle_nn::VarBuilder<'static>,
        weights: &CheckedWeights,
        residency: Residency,
    ) -> Result<(Self, UnusedSummary)> {
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let check_vb = weights.check_only().var_builder(dtype, &device);
        let vb_for = |network| {
            if residency.holds(network) {
                vb.clone()
            } else {
                check_vb.clone()
            }
        };
        let (text_vb, sampling_vb, vae_vb) = (
            vb_for(Network::Text),
            vb_for(Network::Sampling),
            vb_for(Network::VaeEncoder),
        );
        let unet = UNet::new(&config.unet, sampling_vb.pp(UNET_PREFIX))?;
        let lq_encoder = LqEncoder::new(&config.lq_encoder, sampling_vb.pp(LQ_ENCODER_PREFIX))?;
        let text_encoder = TextEncoder::new(&config.text, text_vb.pp(TEXT_PREFIX))?;
        let vae = AutoencoderKL::without_decoder(
            &config.vae,
            vae_vb.pp(VAE_PREFIX),
            check_vb.pp(VAE_PREFIX),
        )?;
        for name in SCHEDULE_BUFFERS {
            check_vb.get_with_hints_dtype(
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
        let text_encoder = residency.holds(Network::Text).then_some(text_encoder);
        Ok((
            BaseModel {
                config,
                residency,
                unet,
                lq_encoder,
                text_encoder,
                vae,
                tokenizer: ClipTokenizer::from_bundled()?,
                device,
                dtype,
            },
            summary,
        ))
    }

    /// An error unless the UNet, time-aware encoder and VAE encoder hold their weights.
    pub fn require_networks(&self) -> Result<()> {
        self.require(Network::Sampling)?;
        self.require(Network::VaeEncoder)
    }

    /// An error unless `network` holds its weights (not a placeholder of another residency).
    pub fn require(&self, network: Network) -> Result<()> {
        if self.residency.holds(network) {
            return Ok(());
        }
        Err(Error::Config(format!(
            "internal: the {network:?} network of a model loaded as {:?} was asked to run",
            self.residency
        )))
    }

    /// The frozen text encoder; an error when loaded without it or once
    /// [`BaseModel::release_text_encoder`] dropped it.
    pub fn text_encoder(&self) -> Result<&TextEncoder> {
        self.text_encoder.as_ref().ok_or_else(|| {
            Error::Config(
                "internal: the text encoder is not in memory (loaded without it, or released after the prompts were encoded)".into(),
            )
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
        Self::load_with(path, config, dtype, device, Residency::Full)
    }

    /// [`BaseModel::load`] holding only the networks `residency` names.
    pub fn load_with(
        path: &Path,
        config: BaseModelConfig,
        dtype: DType,
        device: &Device,
        residency: Residency,
    ) -> Result<(Self, UnusedSummary)> {
        let store = Arc::new(TensorStore::open(path)?);
        let weights = CheckedWeights::from_store(store);
        Self::from_weights_with(config, &weights, dtype, device, residency).map_err(|e| match e {
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
        Self::build(config, weights, weights.var_builder(dtype, device), dtype)
    }

    /// Checks `weights` against `config` (every name, shape and dtype) without reading a weight.
    pub fn check(config: CfwConfig, weights: &CheckedWeights) -> Result<UnusedSummary> {
        let vb = weights.check_only().var_builder(DType::F32, &Device::Cpu);
        Ok(Self::build(config, weights, vb, DType::F32)?.1)
    }

    fn build(
        config: CfwConfig,
        weights: &CheckedWeights,
        vb: candle_nn::VarBuilder<'static>,
        dtype: DType,
    ) -> Result<(Self, UnusedSummary)> {
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
