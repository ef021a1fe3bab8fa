//! Typed configuration of the StableSR-face base model.
//!
//! Values come from StableSR's own YAML files (`v2-finetune_face_T_512.yaml` for the diffusion
//! model, `autoencoder_kl_64x64x4_resi_face.yaml` for the CFW autoencoder) or from the built-in
//! defaults, which equal those two files of the released face model. No other module hard-codes a
//! dimension.

use crate::error::Result;
use std::path::Path;

mod yaml;

pub use yaml::MAX_IMAGE_SIZE;

/// `UNetModelDualcondV2` (`unet_config.params`).
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub model_channels: usize,
    /// Downsampling factors (1, 2, 4, ...) at which spatial transformers are placed.
    pub attention_resolutions: Vec<usize>,
    pub num_res_blocks: usize,
    pub channel_mult: Vec<usize>,
    /// Channels per attention head; heads = channels / num_head_channels.
    pub num_head_channels: usize,
    pub transformer_depth: usize,
    pub context_dim: usize,
    pub use_linear_in_transformer: bool,
    /// Channels of the time-aware encoder features consumed by SPADE.
    pub semb_channels: usize,
}

/// `EncoderUNetModelWT` (`structcond_stage_config.params`).
#[derive(Debug, Clone, PartialEq)]
pub struct LqEncoderConfig {
    pub in_channels: usize,
    pub model_channels: usize,
    pub out_channels: usize,
    pub num_res_blocks: usize,
    pub attention_resolutions: Vec<usize>,
    pub channel_mult: Vec<usize>,
    pub num_heads: usize,
    /// -1 in the YAML: heads fixed by `num_heads`.
    pub num_head_channels: Option<usize>,
}

/// `ddconfig` of `AutoencoderKL` / `AutoencoderKLResi`.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub embed_dim: usize,
    pub z_channels: usize,
    pub in_channels: usize,
    pub out_ch: usize,
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_resolutions: Vec<usize>,
    pub resolution: usize,
    pub double_z: bool,
}

/// The OpenCLIP text tower used by `FrozenOpenCLIPEmbedder`.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    /// Projection width of `text_projection` (loaded, unused by "penultimate").
    pub embed_dim: usize,
    /// Number of transformer blocks skipped at the end: 1 for "penultimate", 0 for "last".
    pub skip_last_layers: usize,
}

/// `LatentDiffusionSRTextWTFFHQ` parameters that the sampler needs.
#[derive(Debug, Clone, PartialEq)]
pub struct DiffusionConfig {
    pub parameterization_v: bool,
    pub linear_start: f64,
    pub linear_end: f64,
    pub timesteps: usize,
    pub scale_factor: f64,
    /// Native image size in pixels (`image_size` of the LatentDiffusion params).
    pub image_size: usize,
    pub latent_channels: usize,
}

/// Everything in `face_stablesr_000050.ckpt`.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseModelConfig {
    pub unet: UNetConfig,
    pub lq_encoder: LqEncoderConfig,
    pub vae: VaeConfig,
    pub text: TextConfig,
    /// OpenCLIP architecture name of the text tower (`cond_stage_config.params.arch`).
    pub text_arch: String,
    pub diffusion: DiffusionConfig,
}

/// Everything in `face_vqgan_cfw_00011.ckpt` (`AutoencoderKLResi`).
#[derive(Debug, Clone, PartialEq)]
pub struct CfwConfig {
    pub vae: VaeConfig,
    /// Default fusion weight stored in the YAML (`fusion_w`); the CLI's `--dec-w` overrides it.
    pub fusion_w: f64,
}

/// The OpenCLIP architecture of the released StableSR-face text tower.
pub const RELEASED_TEXT_ARCH: &str = "ViT-H-14";

/// Largest open_clip model-config JSON read (the real ones are under 1 KiB).
const MAX_ARCH_JSON_BYTES: u64 = 1 << 20;

impl TextConfig {
    /// The built-in OpenCLIP text tower by architecture name: `ViT-H-14` (open_clip's
    /// `model_configs/ViT-H-14.json`, text part), the only one StableSR uses.
    pub fn from_arch(arch: &str) -> Option<Self> {
        (arch == RELEASED_TEXT_ARCH).then_some(TextConfig {
            width: 1024,
            heads: 16,
            layers: 24,
            vocab_size: 49408,
            context_length: 77,
            embed_dim: 1024,
            skip_last_layers: 1,
        })
    }

    /// The text tower of an open_clip model-config JSON (`embed_dim`, `text_cfg` with `width`,
    /// `heads`, `layers`, ...), with open_clip's `CLIPTextCfg` defaults for absent fields. This is
    /// how open_clip resolves an architecture it does not ship: a `<arch>.json` registered at run
    /// time. The head count cannot be read off a checkpoint's shapes, so it must come from here.
    pub fn from_open_clip_json(text: &str) -> std::result::Result<Self, String> {
        #[derive(serde::Deserialize)]
        struct ModelCfg {
            embed_dim: usize,
            text_cfg: TextCfg,
        }
        #[derive(serde::Deserialize)]
        struct TextCfg {
            #[serde(default = "default_context_length")]
            context_length: usize,
            #[serde(default = "default_vocab_size")]
            vocab_size: usize,
            #[serde(default = "default_width")]
            width: usize,
            #[serde(default = "default_heads")]
            heads: usize,
            #[serde(default = "default_layers")]
            layers: usize,
        }
        fn default_context_length() -> usize {
            77
        }
        fn default_vocab_size() -> usize {
            49408
        }
        fn default_width() -> usize {
            512
        }
        fn default_heads() -> usize {
            8
        }
        fn default_layers() -> usize {
            12
        }
        let cfg: ModelCfg = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let t = cfg.text_cfg;
        Ok(TextConfig {
            width: t.width,
            heads: t.heads,
            layers: t.layers,
            vocab_size: t.vocab_size,
            context_length: t.context_length,
            embed_dim: cfg.embed_dim,
            skip_last_layers: 1,
        })
    }
}

impl Default for BaseModelConfig {
    /// The released StableSR-face model (`configs/stableSRNew/v2-finetune_face_T_512.yaml`).
    fn default() -> Self {
        BaseModelConfig {
            unet: UNetConfig {
                in_channels: 4,
                out_channels: 4,
                model_channels: 320,
                attention_resolutions: vec![4, 2, 1],
                num_res_blocks: 2,
                channel_mult: vec![1, 2, 4, 4],
                num_head_channels: 64,
                transformer_depth: 1,
                context_dim: 1024,
                use_linear_in_transformer: true,
                semb_channels: 256,
            },
            lq_encoder: LqEncoderConfig {
                in_channels: 4,
                model_channels: 256,
                out_channels: 256,
                num_res_blocks: 2,
                attention_resolutions: vec![4, 2, 1],
                channel_mult: vec![1, 1, 2, 2],
                num_heads: 4,
                num_head_channels: None,
            },
            vae: VaeConfig::released(),
            text: TextConfig::from_arch(RELEASED_TEXT_ARCH).expect("built-in arch"),
            text_arch: RELEASED_TEXT_ARCH.to_string(),
            diffusion: DiffusionConfig {
                parameterization_v: true,
                linear_start: 0.00085,
                linear_end: 0.012,
                timesteps: 1000,
                scale_factor: 0.18215,
                image_size: 512,
                latent_channels: 4,
            },
        }
    }
}

impl VaeConfig {
    /// The SD-2 VAE of the released model (`ddconfig` of both release YAMLs).
    pub fn released() -> Self {
        VaeConfig {
            embed_dim: 4,
            z_channels: 4,
            in_channels: 3,
            out_ch: 3,
            ch: 128,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_resolutions: vec![],
            resolution: 512,
            double_z: true,
        }
    }

    /// Spatial downsampling factor between pixels and latents.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.ch_mult.len() - 1)
    }
}

impl Default for CfwConfig {
    /// The released CFW autoencoder (`configs/autoencoder/autoencoder_kl_64x64x4_resi_face.yaml`).
    fn default() -> Self {
        CfwConfig {
            vae: VaeConfig::released(),
            fusion_w: 1.0,
        }
    }
}
