//! Typed configuration of the StableSR-face base model.
//!
//! Values come from StableSR's own YAML files (`v2-finetune_face_T_512.yaml` for the diffusion
//! model, `autoencoder_kl_64x64x4_resi_face.yaml` for the CFW autoencoder) or from the built-in
//! defaults, which equal those two files of the released face model. No other module hard-codes a
//! dimension.

use crate::error::{Error, Result};
use serde_yaml::Value;
use std::path::Path;

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

impl BaseModelConfig {
    /// True for the tiny towers the reference fixtures register at run time, whose exact size
    /// is read from the checkpoint.
    pub fn text_arch_is_fixture(&self) -> bool {
        self.text_arch.starts_with(FIXTURE_TEXT_ARCH_PREFIX)
    }
}

const FIXTURE_TEXT_ARCH_PREFIX: &str = "stablesr-fixture-text";

/// Everything in `face_vqgan_cfw_00011.ckpt` (`AutoencoderKLResi`).
#[derive(Debug, Clone, PartialEq)]
pub struct CfwConfig {
    pub vae: VaeConfig,
    /// Default fusion weight stored in the YAML (`fusion_w`); the CLI's `--dec-w` overrides it.
    pub fusion_w: f64,
}

impl TextConfig {
    /// Known OpenCLIP text towers by architecture name.
    pub fn from_arch(arch: &str) -> Option<Self> {
        let (width, heads, layers, embed_dim) = match arch {
            "ViT-H-14" => (1024, 16, 24, 1024),
            "ViT-bigG-14" => (1280, 20, 32, 1280),
            "ViT-L-14" => (768, 12, 12, 768),
            "ViT-B-32" | "ViT-B-16" => (512, 8, 12, 512),
            _ => return None,
        };
        Some(TextConfig {
            width,
            heads,
            layers,
            vocab_size: 49408,
            context_length: 77,
            embed_dim,
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
            text: TextConfig::from_arch("ViT-H-14").expect("known arch"),
            text_arch: "ViT-H-14".to_string(),
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

// ---------------------------------------------------------------------------------------------
// YAML reading

const DIFFUSION_TARGETS: &[&str] = &[
    "ldm.models.diffusion.ddpm.LatentDiffusionSRTextWTFFHQ",
    "ldm.models.diffusion.ddpm.LatentDiffusionSRTextWT",
];
const UNET_TARGET: &str = "ldm.modules.diffusionmodules.openaimodel.UNetModelDualcondV2";
const LQ_ENCODER_TARGET: &str = "ldm.modules.diffusionmodules.openaimodel.EncoderUNetModelWT";
const VAE_TARGET: &str = "ldm.models.autoencoder.AutoencoderKL";
const CFW_TARGET: &str = "ldm.models.autoencoder.AutoencoderKLResi";
const TEXT_TARGET: &str = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder";

/// A YAML mapping with the path it came from, for error messages.
struct Node<'a> {
    value: &'a Value,
    path: String,
}

impl<'a> Node<'a> {
    fn child(&self, key: &str) -> Result<Node<'a>> {
        let value = self
            .value
            .get(key)
            .ok_or_else(|| Error::Config(format!("missing field `{}.{key}`", self.path)))?;
        Ok(Node {
            value,
            path: format!("{}.{key}", self.path),
        })
    }

    fn opt(&self, key: &str) -> Option<Node<'a>> {
        self.child(key).ok().filter(|n| !n.value.is_null())
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let n = self.child(key)?;
        n.value
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| Error::Config(format!("`{}` must be a non-negative integer", n.path)))
    }

    fn i64(&self, key: &str) -> Result<i64> {
        let n = self.child(key)?;
        n.value
            .as_i64()
            .ok_or_else(|| Error::Config(format!("`{}` must be an integer", n.path)))
    }

    fn f64(&self, key: &str) -> Result<f64> {
        let n = self.child(key)?;
        n.value
            .as_f64()
            .ok_or_else(|| Error::Config(format!("`{}` must be a number", n.path)))
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.opt(key) {
            None => Ok(default),
            Some(n) => n
                .value
                .as_bool()
                .ok_or_else(|| Error::Config(format!("`{}` must be true or false", n.path))),
        }
    }

    fn str(&self, key: &str) -> Result<&'a str> {
        let n = self.child(key)?;
        n.value
            .as_str()
            .ok_or_else(|| Error::Config(format!("`{}` must be a string", n.path)))
    }

    fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        let n = self.child(key)?;
        let seq = n
            .value
            .as_sequence()
            .ok_or_else(|| Error::Config(format!("`{}` must be a list", n.path)))?;
        seq.iter()
            .map(|v| {
                v.as_u64().map(|v| v as usize).ok_or_else(|| {
                    Error::Config(format!("`{}` must hold non-negative integers", n.path))
                })
            })
            .collect()
    }

    /// Checks `target:` and returns the `params` node.
    fn params_of(&self, expected: &[&str]) -> Result<Node<'a>> {
        let target = self.str("target")?;
        if !expected.contains(&target) {
            return Err(Error::Config(format!(
                "`{}.target` is `{target}`, expected {}",
                self.path,
                expected.join(" or ")
            )));
        }
        self.child("params")
    }
}

fn read_yaml(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_yaml::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: not valid YAML: {e}", path.display())))
}

fn with_file<T>(path: &Path, r: Result<T>) -> Result<T> {
    r.map_err(|e| match e {
        Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
        other => other,
    })
}

fn vae_from(ddconfig: &Node, embed_dim: usize) -> Result<VaeConfig> {
    Ok(VaeConfig {
        embed_dim,
        z_channels: ddconfig.usize("z_channels")?,
        in_channels: ddconfig.usize("in_channels")?,
        out_ch: ddconfig.usize("out_ch")?,
        ch: ddconfig.usize("ch")?,
        ch_mult: ddconfig.usize_list("ch_mult")?,
        num_res_blocks: ddconfig.usize("num_res_blocks")?,
        attn_resolutions: ddconfig.usize_list("attn_resolutions")?,
        resolution: ddconfig.usize("resolution")?,
        double_z: ddconfig.bool_or("double_z", true)?,
    })
}

impl BaseModelConfig {
    /// Reads a StableSR diffusion YAML (`v2-finetune_face_T_512.yaml` layout).
    pub fn from_yaml_file(path: &Path) -> Result<Self> {
        let doc = read_yaml(path)?;
        with_file(path, Self::from_yaml(&doc))
    }

    pub fn from_yaml(doc: &Value) -> Result<Self> {
        let root = Node {
            value: doc,
            path: "".into(),
        };
        let model = root.child("model")?;
        let p = model.params_of(DIFFUSION_TARGETS)?;
        let parameterization = p.opt("parameterization").map(|n| n.value.as_str());
        let parameterization_v = match parameterization {
            None => false,
            Some(Some("v")) => true,
            Some(Some("eps")) => false,
            _ => {
                return Err(Error::Config(
                    "`model.params.parameterization` must be \"v\" or \"eps\"".into(),
                ))
            }
        };
        let diffusion = DiffusionConfig {
            parameterization_v,
            linear_start: p.f64("linear_start")?,
            linear_end: p.f64("linear_end")?,
            timesteps: p.usize("timesteps")?,
            scale_factor: p.f64("scale_factor")?,
            image_size: p.usize("image_size")?,
            latent_channels: p.usize("channels")?,
        };

        let u = p.child("unet_config")?.params_of(&[UNET_TARGET])?;
        let num_head_channels = u.i64("num_head_channels")?;
        if num_head_channels <= 0 {
            return Err(Error::Config(
                "`unet_config.params.num_head_channels` must be positive (SD-2 layout)".into(),
            ));
        }
        let unet = UNetConfig {
            in_channels: u.usize("in_channels")?,
            out_channels: u.usize("out_channels")?,
            model_channels: u.usize("model_channels")?,
            attention_resolutions: u.usize_list("attention_resolutions")?,
            num_res_blocks: u.usize("num_res_blocks")?,
            channel_mult: u.usize_list("channel_mult")?,
            num_head_channels: num_head_channels as usize,
            transformer_depth: u
                .opt("transformer_depth")
                .map_or(Ok(1), |_| u.usize("transformer_depth"))?,
            context_dim: u.usize("context_dim")?,
            use_linear_in_transformer: u.bool_or("use_linear_in_transformer", false)?,
            semb_channels: u.usize("semb_channels")?,
        };

        let e = p
            .child("structcond_stage_config")?
            .params_of(&[LQ_ENCODER_TARGET])?;
        let head_channels = e
            .opt("num_head_channels")
            .map_or(Ok(-1), |_| e.i64("num_head_channels"))?;
        let lq_encoder = LqEncoderConfig {
            in_channels: e.usize("in_channels")?,
            model_channels: e.usize("model_channels")?,
            out_channels: e.usize("out_channels")?,
            num_res_blocks: e.usize("num_res_blocks")?,
            attention_resolutions: e.usize_list("attention_resolutions")?,
            channel_mult: e.usize_list("channel_mult")?,
            num_heads: e.opt("num_heads").map_or(Ok(1), |_| e.usize("num_heads"))?,
            num_head_channels: (head_channels > 0).then_some(head_channels as usize),
        };

        let v = p.child("first_stage_config")?.params_of(&[VAE_TARGET])?;
        let vae = vae_from(&v.child("ddconfig")?, v.usize("embed_dim")?)?;

        let t = p.child("cond_stage_config")?.params_of(&[TEXT_TARGET])?;
        let text = text_from(&t)?;
        let text_arch = t
            .opt("arch")
            .map(|_| t.str("arch"))
            .transpose()?
            .unwrap_or("ViT-H-14")
            .to_string();

        Ok(BaseModelConfig {
            unet,
            lq_encoder,
            vae,
            text,
            text_arch,
            diffusion,
        })
    }
}

/// The text tower: `arch` (default "ViT-H-14", as `FrozenOpenCLIPEmbedder`) names a known OpenCLIP
/// architecture; explicit `width`/`heads`/`layers`/`embed_dim` keys override it, which is how a
/// tiny test tower is described.
fn text_from(t: &Node) -> Result<TextConfig> {
    let arch = t
        .opt("arch")
        .map(|_| t.str("arch"))
        .transpose()?
        .unwrap_or("ViT-H-14");
    let mut cfg = match TextConfig::from_arch(arch) {
        Some(cfg) => cfg,
        None => tiny_text_arch(arch).ok_or_else(|| {
            Error::Config(format!(
                "`cond_stage_config.params.arch` `{arch}` is not a known OpenCLIP text tower (give width, heads, layers)"
            ))
        })?,
    };
    if t.opt("width").is_some() {
        cfg.width = t.usize("width")?;
        cfg.embed_dim = cfg.width;
    }
    if t.opt("heads").is_some() {
        cfg.heads = t.usize("heads")?;
    }
    if t.opt("layers").is_some() {
        cfg.layers = t.usize("layers")?;
    }
    if t.opt("embed_dim").is_some() {
        cfg.embed_dim = t.usize("embed_dim")?;
    }
    cfg.skip_last_layers = match t.opt("layer").map(|_| t.str("layer")).transpose()? {
        None | Some("last") => 0,
        Some("penultimate") => 1,
        Some(other) => {
            return Err(Error::Config(format!(
                "`cond_stage_config.params.layer` `{other}` must be \"last\" or \"penultimate\""
            )))
        }
    };
    if cfg.heads == 0 || cfg.width % cfg.heads != 0 {
        return Err(Error::Config(format!(
            "text width {} is not divisible by {} heads",
            cfg.width, cfg.heads
        )));
    }
    Ok(cfg)
}

/// The reference fixtures register tiny towers at run time under names
/// `stablesr-fixture-text-<variant>`; their sizes are stated in the fixtures' README
/// (width 32, 2 heads of 16 channels, 3 layers). Other variants keep 16-channel heads; width and
/// depth are then taken from the checkpoint (see `TextConfig::fit_to_checkpoint`).
fn tiny_text_arch(arch: &str) -> Option<TextConfig> {
    arch.starts_with("stablesr-fixture-text")
        .then_some(TextConfig {
            width: 32,
            heads: 2,
            layers: 3,
            vocab_size: 49408,
            context_length: 77,
            embed_dim: 32,
            skip_last_layers: 1,
        })
}

impl TextConfig {
    /// For a tiny fixture tower whose exact size the YAML does not give: adopt the width and depth
    /// found in the checkpoint, keeping 16-channel heads.
    pub fn fit_to_checkpoint(&mut self, width: usize, layers: usize, embed_dim: usize) {
        self.width = width;
        self.layers = layers;
        self.embed_dim = embed_dim;
        self.heads = (width / 16).max(1);
    }
}

impl CfwConfig {
    /// Reads a StableSR CFW autoencoder YAML (`autoencoder_kl_64x64x4_resi_face.yaml` layout).
    pub fn from_yaml_file(path: &Path) -> Result<Self> {
        let doc = read_yaml(path)?;
        with_file(path, Self::from_yaml(&doc))
    }

    pub fn from_yaml(doc: &Value) -> Result<Self> {
        let root = Node {
            value: doc,
            path: "".into(),
        };
        let p = root.child("model")?.params_of(&[CFW_TARGET])?;
        let vae = vae_from(&p.child("ddconfig")?, p.usize("embed_dim")?)?;
        let fusion_w = p.opt("fusion_w").map_or(Ok(1.0), |_| p.f64("fusion_w"))?;
        Ok(CfwConfig { vae, fusion_w })
    }
}
