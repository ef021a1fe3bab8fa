//! Reading StableSR's YAML files into the typed configuration: serde structs that mirror the
//! files (`target` + `params` at every level); keys the reference uses only for training
//! (losses, learning rates, checkpointing) are ignored.

use super::*;
use crate::error::Error;

// Keys the reference uses only for training (losses, learning rates, checkpointing) are ignored.

const DIFFUSION_TARGETS: &[&str] = &[
    "ldm.models.diffusion.ddpm.LatentDiffusionSRTextWTFFHQ",
    "ldm.models.diffusion.ddpm.LatentDiffusionSRTextWT",
];
const UNET_TARGET: &str = "ldm.modules.diffusionmodules.openaimodel.UNetModelDualcondV2";
const LQ_ENCODER_TARGET: &str = "ldm.modules.diffusionmodules.openaimodel.EncoderUNetModelWT";
const VAE_TARGET: &str = "ldm.models.autoencoder.AutoencoderKL";
const CFW_TARGET: &str = "ldm.models.autoencoder.AutoencoderKLResi";
const TEXT_TARGET: &str = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder";

/// `{target: <class>, params: {...}}`, StableSR's (and Lightning's) instantiation format.
#[derive(Debug, serde::Deserialize)]
struct Target<P> {
    target: String,
    params: P,
}

impl<P> Target<P> {
    /// The params, after checking that `target` names one of `expected`.
    fn params_of(self, path: &str, expected: &[&str]) -> Result<P> {
        if expected.contains(&self.target.as_str()) {
            Ok(self.params)
        } else {
            Err(Error::Config(format!(
                "`{path}.target` is `{}`, expected {}",
                self.target,
                expected.join(" or ")
            )))
        }
    }
}

/// Only the top-level target, read first so that a file of the wrong kind is named as such.
#[derive(Debug, serde::Deserialize)]
struct Head {
    model: TargetName,
}

#[derive(Debug, serde::Deserialize)]
struct TargetName {
    target: String,
}

#[derive(Debug, serde::Deserialize)]
struct Doc<P> {
    model: Target<P>,
}

#[derive(Debug, serde::Deserialize)]
struct DiffusionParams {
    #[serde(default)]
    parameterization: Option<String>,
    linear_start: f64,
    linear_end: f64,
    timesteps: usize,
    scale_factor: f64,
    image_size: usize,
    channels: usize,
    unet_config: Target<UNetParams>,
    structcond_stage_config: Target<LqEncoderParams>,
    first_stage_config: Target<VaeParams>,
    cond_stage_config: Target<TextParams>,
}

fn one() -> usize {
    1
}

fn minus_one() -> i64 {
    -1
}

fn yes() -> bool {
    true
}

#[derive(Debug, serde::Deserialize)]
struct UNetParams {
    in_channels: usize,
    out_channels: usize,
    model_channels: usize,
    attention_resolutions: Vec<usize>,
    num_res_blocks: usize,
    channel_mult: Vec<usize>,
    num_head_channels: i64,
    #[serde(default = "one")]
    transformer_depth: usize,
    context_dim: usize,
    #[serde(default)]
    use_linear_in_transformer: bool,
    semb_channels: usize,
}

#[derive(Debug, serde::Deserialize)]
struct LqEncoderParams {
    in_channels: usize,
    model_channels: usize,
    out_channels: usize,
    num_res_blocks: usize,
    attention_resolutions: Vec<usize>,
    channel_mult: Vec<usize>,
    #[serde(default = "one")]
    num_heads: usize,
    #[serde(default = "minus_one")]
    num_head_channels: i64,
}

#[derive(Debug, serde::Deserialize)]
struct VaeParams {
    embed_dim: usize,
    ddconfig: DdConfig,
    /// CFW only: the default fusion weight.
    #[serde(default)]
    fusion_w: Option<f64>,
}

#[derive(Debug, serde::Deserialize)]
struct DdConfig {
    #[serde(default = "yes")]
    double_z: bool,
    z_channels: usize,
    resolution: usize,
    in_channels: usize,
    out_ch: usize,
    ch: usize,
    ch_mult: Vec<usize>,
    num_res_blocks: usize,
    attn_resolutions: Vec<usize>,
}

/// `FrozenOpenCLIPEmbedder(arch="ViT-H-14", layer="last")`.
#[derive(Debug, serde::Deserialize)]
struct TextParams {
    #[serde(default)]
    arch: Option<String>,
    #[serde(default)]
    layer: Option<String>,
}

impl VaeParams {
    fn config(&self) -> VaeConfig {
        let d = &self.ddconfig;
        VaeConfig {
            embed_dim: self.embed_dim,
            z_channels: d.z_channels,
            in_channels: d.in_channels,
            out_ch: d.out_ch,
            ch: d.ch,
            ch_mult: d.ch_mult.clone(),
            num_res_blocks: d.num_res_blocks,
            attn_resolutions: d.attn_resolutions.clone(),
            resolution: d.resolution,
            double_z: d.double_z,
        }
    }
}

/// Largest model YAML read (StableSR's are under 10 KiB).
const MAX_YAML_BYTES: u64 = 1 << 20;
/// Deepest nesting accepted (StableSR's files nest 5 levels).
const MAX_YAML_DEPTH: usize = 32;

fn read_yaml_text(path: &Path) -> Result<String> {
    let size = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if size > MAX_YAML_BYTES {
        return Err(Error::Config(format!(
            "{}: {size} bytes, larger than a model config can be ({MAX_YAML_BYTES})",
            path.display()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Deserializes with bounded depth (deep nesting is refused, not parsed slowly) and one-line
/// errors.
fn parse_yaml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    let options = serde_saphyr::Options {
        budget: Some(serde_saphyr::Budget {
            max_depth: MAX_YAML_DEPTH,
            ..serde_saphyr::Budget::default()
        }),
        with_snippet: false,
        ..serde_saphyr::Options::default()
    };
    serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        let msg = e.to_string();
        let msg: Vec<&str> = msg
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let msg = msg.join(" ");
        let hint = if msg.contains("depth") {
            format!("nested deeper than {MAX_YAML_DEPTH} levels; not a model config ({msg})")
        } else {
            msg
        };
        Error::Config(format!(
            "{}: not valid YAML for this config: {hint}",
            path.display()
        ))
    })
}

/// The top-level `model.target`, checked before the rest of the file is read into a schema.
fn check_head(path: &Path, text: &str, expected: &[&str]) -> Result<()> {
    let head: Head = parse_yaml(path, text)?;
    Target {
        target: head.model.target,
        params: (),
    }
    .params_of("model", expected)
    .map_err(|e| in_file(path, e))
}

fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
        other => other,
    }
}

/// A scalar that must be finite and within `range`.
fn check_range(what: &str, v: f64, range: std::ops::RangeInclusive<f64>) -> Result<()> {
    if v.is_finite() && range.contains(&v) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "`{what}` is {v}; it must be a finite number in [{}, {}]",
            range.start(),
            range.end()
        )))
    }
}

impl DiffusionConfig {
    /// Refuses schedules and scales no sampler can use (NaN, zero, reversed, absurd sizes).
    fn validate(&self) -> Result<()> {
        check_range("model.params.scale_factor", self.scale_factor, 1e-6..=1e3)?;
        check_range("model.params.linear_start", self.linear_start, 1e-9..=0.999)?;
        check_range("model.params.linear_end", self.linear_end, 1e-9..=0.999)?;
        if self.linear_start >= self.linear_end {
            return Err(Error::Config(format!(
                "`model.params.linear_start` {} must be below `linear_end` {}",
                self.linear_start, self.linear_end
            )));
        }
        if !(1..=100_000).contains(&self.timesteps) {
            return Err(Error::Config(format!(
                "`model.params.timesteps` {} must be between 1 and 100000",
                self.timesteps
            )));
        }
        if !(1..=MAX_IMAGE_SIZE).contains(&self.image_size) {
            return Err(Error::Config(format!(
                "`model.params.image_size` {} must be between 1 and {MAX_IMAGE_SIZE}",
                self.image_size
            )));
        }
        Ok(())
    }
}

/// Largest `image_size` a config may state (the released model's is 512).
pub const MAX_IMAGE_SIZE: usize = 2048;

impl BaseModelConfig {
    /// Reads a StableSR diffusion YAML (`v2-finetune_face_T_512.yaml` layout); an open_clip
    /// `<arch>.json` of a text tower that is not built in is looked up beside it.
    pub fn from_yaml_file(path: &Path) -> Result<Self> {
        let text = read_yaml_text(path)?;
        check_head(path, &text, DIFFUSION_TARGETS)?;
        let doc: Doc<DiffusionParams> = parse_yaml(path, &text)?;
        Self::from_params(doc.model.params, path.parent()).map_err(|e| in_file(path, e))
    }

    fn from_params(p: DiffusionParams, yaml_dir: Option<&Path>) -> Result<Self> {
        let parameterization_v = match p.parameterization.as_deref() {
            None | Some("eps") => false,
            Some("v") => true,
            Some(_) => {
                return Err(Error::Config(
                    "`model.params.parameterization` must be \"v\" or \"eps\"".into(),
                ))
            }
        };
        let diffusion = DiffusionConfig {
            parameterization_v,
            linear_start: p.linear_start,
            linear_end: p.linear_end,
            timesteps: p.timesteps,
            scale_factor: p.scale_factor,
            image_size: p.image_size,
            latent_channels: p.channels,
        };
        diffusion.validate()?;

        let u = p
            .unet_config
            .params_of("model.params.unet_config", &[UNET_TARGET])?;
        if u.num_head_channels <= 0 {
            return Err(Error::Config(
                "`unet_config.params.num_head_channels` must be positive (SD-2 layout)".into(),
            ));
        }
        let unet = UNetConfig {
            in_channels: u.in_channels,
            out_channels: u.out_channels,
            model_channels: u.model_channels,
            attention_resolutions: u.attention_resolutions,
            num_res_blocks: u.num_res_blocks,
            channel_mult: u.channel_mult,
            num_head_channels: u.num_head_channels as usize,
            transformer_depth: u.transformer_depth,
            context_dim: u.context_dim,
            use_linear_in_transformer: u.use_linear_in_transformer,
            semb_channels: u.semb_channels,
        };
        let e = p
            .structcond_stage_config
            .params_of("model.params.structcond_stage_config", &[LQ_ENCODER_TARGET])?;
        let lq_encoder = LqEncoderConfig {
            in_channels: e.in_channels,
            model_channels: e.model_channels,
            out_channels: e.out_channels,
            num_res_blocks: e.num_res_blocks,
            attention_resolutions: e.attention_resolutions,
            channel_mult: e.channel_mult,
            num_heads: e.num_heads,
            num_head_channels: (e.num_head_channels > 0).then_some(e.num_head_channels as usize),
        };
        let vae = p
            .first_stage_config
            .params_of("model.params.first_stage_config", &[VAE_TARGET])?
            .config();
        let t = p
            .cond_stage_config
            .params_of("model.params.cond_stage_config", &[TEXT_TARGET])?;
        let text_arch = t
            .arch
            .clone()
            .unwrap_or_else(|| RELEASED_TEXT_ARCH.to_string());
        let text = text_from(&t, &text_arch, yaml_dir)?;
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

/// The text tower of `FrozenOpenCLIPEmbedder(arch, layer)`: `arch` (default `ViT-H-14`) is
/// resolved as open_clip does, a built-in architecture or else the model-config JSON
/// `<arch>.json` beside the YAML (how the reference's tiny test towers are registered).
fn text_from(t: &TextParams, arch: &str, yaml_dir: Option<&Path>) -> Result<TextConfig> {
    let mut cfg = match TextConfig::from_arch(arch) {
        Some(cfg) => cfg,
        None => text_from_arch_json(arch, yaml_dir)?,
    };
    cfg.skip_last_layers = match t.layer.as_deref() {
        None | Some("last") => 0,
        Some("penultimate") => 1,
        Some(other) => {
            return Err(Error::Config(format!(
                "`cond_stage_config.params.layer` `{other}` must be \"last\" or \"penultimate\""
            )))
        }
    };
    if cfg.heads == 0 || cfg.width == 0 || cfg.width % cfg.heads != 0 {
        return Err(Error::Config(format!(
            "text width {} is not divisible by {} heads",
            cfg.width, cfg.heads
        )));
    }
    if cfg.layers < cfg.skip_last_layers || cfg.context_length == 0 || cfg.vocab_size == 0 {
        return Err(Error::Config(format!(
            "text tower `{arch}`: {} layers, context {}, vocabulary {} cannot run",
            cfg.layers, cfg.context_length, cfg.vocab_size
        )));
    }
    Ok(cfg)
}

fn text_from_arch_json(arch: &str, yaml_dir: Option<&Path>) -> Result<TextConfig> {
    // A file name, never a path: the YAML must not point outside its own folder.
    let plain = !arch.is_empty()
        && !arch.starts_with('.')
        && !arch.contains(['/', '\\', '\0'])
        && Path::new(arch).file_name() == Some(std::ffi::OsStr::new(arch));
    let Some(dir) = yaml_dir.filter(|_| plain) else {
        return Err(Error::Config(format!(
            "`cond_stage_config.params.arch` `{arch}` is not a built-in OpenCLIP architecture ({RELEASED_TEXT_ARCH}) and no `{arch}.json` model config can be looked up for it"
        )));
    };
    let path = dir.join(format!("{arch}.json"));
    let size = std::fs::metadata(&path)
        .map_err(|e| {
            Error::Config(format!(
                "`cond_stage_config.params.arch` `{arch}` is not built in and its open_clip model config {} cannot be read: {e}",
                path.display()
            ))
        })?
        .len();
    if size > MAX_ARCH_JSON_BYTES {
        return Err(Error::Config(format!(
            "{}: {size} bytes, larger than an open_clip model config can be ({MAX_ARCH_JSON_BYTES})",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    TextConfig::from_open_clip_json(&text).map_err(|e| {
        Error::Config(format!(
            "{}: not an open_clip model config: {e}",
            path.display()
        ))
    })
}

impl CfwConfig {
    /// Reads a StableSR CFW autoencoder YAML (`autoencoder_kl_64x64x4_resi_face.yaml` layout).
    pub fn from_yaml_file(path: &Path) -> Result<Self> {
        let text = read_yaml_text(path)?;
        check_head(path, &text, &[CFW_TARGET])?;
        let doc: Doc<VaeParams> = parse_yaml(path, &text)?;
        let p = doc.model.params;
        let fusion_w = p.fusion_w.unwrap_or(1.0);
        check_range("model.params.fusion_w", fusion_w, 0.0..=1.0).map_err(|e| in_file(path, e))?;
        Ok(CfwConfig {
            vae: p.config(),
            fusion_w,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(arch: Option<&str>, dir: Option<&Path>) -> Result<TextConfig> {
        let params = TextParams {
            arch: arch.map(str::to_string),
            layer: Some("penultimate".into()),
        };
        let name = arch.unwrap_or(RELEASED_TEXT_ARCH);
        text_from(&params, name, dir)
    }

    #[test]
    fn text_arch_resolves_like_open_clip() {
        let released = resolve(None, None).unwrap();
        assert_eq!(
            (released.width, released.heads, released.layers),
            (1024, 16, 24)
        );
        assert_eq!(released.skip_last_layers, 1);

        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        std::fs::write(
            dir.join("tiny-b.json"),
            r#"{"embed_dim": 24, "vision_cfg": {"width": 32}, "text_cfg": {"width": 32, "heads": 4, "layers": 3}}"#,
        )
        .unwrap();
        let tiny = resolve(Some("tiny-b"), Some(dir)).unwrap();
        assert_eq!(
            (tiny.width, tiny.heads, tiny.layers, tiny.embed_dim),
            (32, 4, 3, 24)
        );
        // open_clip's CLIPTextCfg defaults for absent fields.
        assert_eq!((tiny.context_length, tiny.vocab_size), (77, 49408));

        let msg = resolve(Some("absent"), Some(dir)).unwrap_err().to_string();
        assert!(msg.contains("absent.json"), "{msg}");
        for hostile in ["../tiny-b", "/etc/passwd", ".hidden", ""] {
            let msg = resolve(Some(hostile), Some(dir)).unwrap_err().to_string();
            assert!(msg.contains("not a built-in"), "{hostile}: {msg}");
        }
        std::fs::write(
            dir.join("odd.json"),
            r#"{"embed_dim": 8, "text_cfg": {"width": 30, "heads": 4}}"#,
        )
        .unwrap();
        let msg = resolve(Some("odd"), Some(dir)).unwrap_err().to_string();
        assert!(msg.contains("not divisible"), "{msg}");
        std::fs::write(dir.join("junk.json"), "[1, 2]").unwrap();
        let msg = resolve(Some("junk"), Some(dir)).unwrap_err().to_string();
        assert!(
            msg.contains("junk.json") && msg.contains("open_clip"),
            "{msg}"
        );
    }
}
