//! `pfstorer restore <inputs...>`: restore photos with the base model or an identity (`--id`).
//!
//! The flow reads top to bottom: [`plan`] decides everything that needs no model (flags,
//! inputs, outputs), [`run`] loads the networks once and hands each planned item to
//! [`image`], which restores and writes it.

mod image;
mod plan;

pub(crate) use image::human_duration;
pub use image::MIN_INPUT_SIDE;

use super::batch::{self, Outcome};
use super::model_args::ModelArgs;
use super::report::ReportWriter;
use crate::imaging::colorfix::ColorFix;
use crate::model::base::Residency;
use crate::personalize::identity::Identity;
use crate::restore::{
    Personalization, ResidencyPolicy, Restorer, StagedNetworks, WeightSource, BASE_SUBJECT,
    DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT,
};
use crate::weights::base_fingerprint_cached;
use anyhow::Context;
use candle_core::DType;
use clap::Args;
use image::{file_name, restore_one, step_bar, ImageJob};
use indicatif::MultiProgress;
use plan::RestoreJob;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Image files, directories (their images, not recursive) or glob patterns.
    #[arg(required_unless_present = "input_flag")]
    pub inputs: Vec<PathBuf>,
    /// More inputs, as GFPGAN/CodeFormer spell them (`-i photos/`); same as positional ones.
    #[arg(short = 'i', long = "input", value_name = "PATH")]
    pub input_flag: Vec<PathBuf>,
    /// Output file (one input; its extension picks the format) or directory (default: next to
    /// each input).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Output format of files named by pfstorer: png (the default), jpg, webp (lossless), bmp,
    /// tif, or auto (the input's own format where it can be written, else png).
    #[arg(long, value_name = "EXT")]
    pub ext: Option<String>,
    /// JPEG quality (1-100) of .jpg outputs.
    #[arg(long, default_value_t = crate::imaging::io::JPEG_QUALITY, value_name = "Q")]
    pub quality: u8,
    /// Upscaling factor (fractional allowed).
    #[arg(short, long, default_value_t = 4.0, conflicts_with_all = ["size", "long_side"])]
    pub scale: f64,
    /// Exact output size, WIDTHxHEIGHT.
    #[arg(long, value_name = "WxH")]
    pub size: Option<String>,
    /// Output long side in pixels (aspect kept).
    #[arg(long, value_name = "N")]
    pub long_side: Option<usize>,
    /// DDPM steps (the 1000-step schedule respaced).
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Classifier-free guidance scale (paper Eq. 9); 1 turns the negative prompt off.
    #[arg(long, default_value_t = 4.0)]
    pub cfg: f64,
    /// Random seed; the same seed gives the same output.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Positive prompt; `*` is the identity's token (or "person" without --id).
    #[arg(long, default_value = DEFAULT_PROMPT)]
    pub prompt: String,
    /// Negative prompt (the unconditional branch of CFG).
    #[arg(long, default_value = DEFAULT_NEGATIVE_PROMPT)]
    pub negative_prompt: String,
    /// Overlap of the 64-latent tiles, in latents.
    #[arg(long, default_value_t = 32)]
    pub tile_overlap: usize,
    /// The model's native size in pixels (StableSR's `--input_size`): short sides below it are
    /// processed at it, latent tiles are this size / 8 (the VAE's downsampling factor). Default: the config's image_size (512).
    #[arg(long, value_name = "PIXELS")]
    pub input_size: Option<usize>,
    /// Images whose padded side exceeds this many pixels are processed in overlapping square
    /// patches of this size (StableSR's `--vqgantile_size`), bounding memory.
    #[arg(long, default_value_t = 1280, value_name = "PIXELS")]
    pub patch_size: usize,
    /// Stride between those patches (StableSR's `--vqgantile_stride`).
    #[arg(long, default_value_t = 1000, value_name = "PIXELS")]
    pub patch_stride: usize,
    /// CFW fusion weight of the decoder (0 = pure diffusion output, 1 = most LQ detail kept).
    #[arg(long, default_value_t = 0.5)]
    pub dec_w: f64,
    /// Colour correction after decoding.
    #[arg(long, value_enum, default_value_t = ColorFix::Adain)]
    pub color_fix: ColorFix,
    /// Output name suffix before `.png` (a file-name fragment: no `/`).
    #[arg(long, default_value = "_restored")]
    pub suffix: String,
    /// Largest image processed at once, in megapixels after upscaling and padding; larger
    /// requests are refused per file before any compute (image buffers take about 96 bytes a
    /// pixel). Also the largest input decoded.
    #[arg(long, default_value_t = 64.0, value_name = "MP")]
    pub max_megapixels: f64,
    /// Latent tiles per UNet call (twice the rows with CFG); default: 1 on the CPU, on a GPU as
    /// many as half its free memory holds (at most 8). Memory grows with it, the result does not
    /// change.
    #[arg(long, value_name = "N")]
    pub tile_batch: Option<usize>,
    /// Whether the networks stay loaded for the whole batch. staged: each image loads the VAE
    /// encoder, then the UNet, then the CFW decoder, freeing each before the next (a 512x512
    /// f32 restore then peaks near the UNet's own 3.9 GB; reloading takes seconds per image);
    /// resident: all loaded once (about 2 GB more, no reloads); auto: staged on the CPU,
    /// resident on a GPU. The result does not change.
    #[arg(long, value_enum, default_value_t = ResidencyPolicy::Auto)]
    pub residency: ResidencyPolicy,
    /// Replace existing outputs.
    #[arg(long)]
    pub force: bool,
    /// Skip inputs whose output exists (resume a batch).
    #[arg(long)]
    pub skip_existing: bool,
    /// No progress bars and no per-file lines (errors and the summary still print).
    #[arg(short, long)]
    pub quiet: bool,
    /// Also print the sampling details (patches, latent tiles, UNet calls) of each image.
    #[arg(short, long)]
    pub verbose: bool,
    /// Identity (name or file) from `pfstorer personalize`.
    #[arg(long, value_name = "NAME|PATH")]
    pub id: Option<String>,
    /// Weight of the identity's image cross-attention (the paper's lambda_att); 0 keeps only the learned token.
    #[arg(long, default_value_t = 1.0)]
    pub id_strength: f64,
    /// Which of the identity's reference photos conditions the restoration (0-based, in the
    /// order `pfstorer ids show` lists them).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub id_ref: usize,
    #[command(flatten)]
    pub shard: super::shard::ShardFlag,
    #[command(flatten)]
    pub report: super::report::ReportFlag,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: RestoreArgs) -> anyhow::Result<()> {
    let RestoreJob {
        target,
        settings,
        base_config,
        policy,
        shard,
        items,
        mut summary,
    } = {
        // Every flag is checked before any file is touched; then the identity, so a wrong
        // name fails before any model is read.
        let job = RestoreJob::plan(&args)?;
        if !args.quiet {
            if let Some(note) = job.metadata_note() {
                eprintln!("{note}");
            }
        }
        job
    };
    let identity = match &args.id {
        Some(id) => Some(Identity::load(id)?),
        None => None,
    };
    let mut report = ReportWriter::open(&args.report, shard, args.steps, args.seed)?;
    report.refused(&summary)?;
    if items.is_empty() {
        return summary.finish();
    }

    let base_path = args.model.base_path(!args.quiet)?;
    let fingerprint = match &identity {
        Some(identity) => {
            let fingerprint = base_fingerprint_cached(&base_path)?;
            identity.check_base(&fingerprint)?;
            Some(fingerprint)
        }
        None => None,
    };
    let cfw_path = args.model.cfw_path(!args.quiet)?;
    // After the files are found: a missing checkpoint stays a one-line error.
    let (device, dtype) = args.model.device_dtype()?;
    report.set_device(&device, dtype);
    let run_label = format!(
        "{}, {}",
        crate::device::device_label(&device),
        crate::device::dtype_name(dtype)
    );
    // First the text encoder alone: every prompt context (and the identity's) is computed
    // before the sampling networks are read, so its ~1.4 GB of weights and the UNet's ~3.7 GB
    // are never in memory together (the freed memory then holds the UNet).
    let base_source = WeightSource::open(&base_path)?;
    let (text_model, base_unused) =
        base_source.load_base(base_config.clone(), dtype, &device, Residency::TextOnly)?;
    // With an identity `*` is its learned token; without one it becomes "person".
    let prompt = match identity {
        Some(_) => args.prompt.clone(),
        None => args.prompt.replace('*', BASE_SUBJECT),
    };
    let cond = Restorer::text_context(&text_model, &prompt)?;
    let uncond = Restorer::text_context(&text_model, &args.negative_prompt)?;
    let max_input_pixels = settings.max_pixels;
    let mut identity_line = "none (base model)".to_string();
    let mut personalization = None;
    if let (Some(identity), Some(fingerprint)) = (&identity, &fingerprint) {
        let mut prepared = Personalization::new(
            identity,
            &text_model,
            fingerprint,
            &prompt,
            &args.negative_prompt,
            args.id_strength,
        )?;
        if args.id_ref != 0 {
            prepared
                .use_reference(identity, &text_model, args.id_ref)
                .with_context(|| format!("--id-ref {}", args.id_ref))?;
        }
        identity_line = format!("{} (base {fingerprint})", prepared.name);
        if !args.quiet {
            let path = args
                .id
                .as_deref()
                .and_then(|id| crate::personalize::identity::resolve(id).ok())
                .map(|p| crate::fsutil::printable_path(&p))
                .unwrap_or_default();
            eprintln!(
                "identity: {} from {path} (made for these base weights: fingerprint {}… matches)",
                crate::fsutil::printable(&prepared.name),
                fingerprint.get(..12).unwrap_or(fingerprint)
            );
        }
        personalization = Some(prepared);
    }
    drop(text_model);
    let cfw_config = args.model.cfw_config()?;
    // Both owners live to the end of the batch; only one is filled.
    let (base, cfw);
    let mut restorer = if args.residency.is_staged(&device) {
        // The text-only load above checked every key of the diffusion checkpoint; the CFW file
        // is checked here, before any image is read, without reading its weights.
        let cfw_source = WeightSource::open(&cfw_path)?;
        for (path, unused) in [
            (&base_path, base_unused),
            (&cfw_path, cfw_source.check_cfw(cfw_config.clone())?),
        ] {
            if let Some(line) = unused {
                eprintln!("note: {}: {line}", path.display());
            }
        }
        let staged = StagedNetworks {
            base: base_source,
            base_config,
            cfw: cfw_source,
            cfw_config,
            dtype,
            // As resident below: the CFW decoder in f32.
            cfw_dtype: DType::F32,
            device: device.clone(),
        };
        Restorer::staged(staged, settings, cond, uncond)?
    } else {
        let (loaded, unused) =
            base_source.load_base(base_config, dtype, &device, Residency::WithoutText)?;
        if let Some(line) = unused {
            eprintln!("note: {}: {line}", base_path.display());
        }
        base = loaded;
        // The CFW decoder writes the final pixels: it stays in f32 when the UNet runs in half
        // precision (a few percent of the run time; avoids f16 overflow in its up-sampling
        // stack).
        let (loaded, unused) =
            WeightSource::open(&cfw_path)?.load_cfw(cfw_config, DType::F32, &device)?;
        if let Some(line) = unused {
            eprintln!("note: {}: {line}", cfw_path.display());
        }
        cfw = loaded;
        Restorer::new(&base, &cfw, settings, cond, uncond)?
    };
    if let Some(personalization) = personalization {
        restorer = restorer.with_personalization(personalization)?;
    }
    let mut metadata_common = vec![
        (
            "Software".to_string(),
            format!("pfstorer {}", env!("CARGO_PKG_VERSION")),
        ),
        ("pfstorer:base".to_string(), file_name(&base_path)),
        ("pfstorer:cfw".to_string(), file_name(&cfw_path)),
        ("pfstorer:seed".to_string(), args.seed.to_string()),
        ("pfstorer:steps".to_string(), args.steps.to_string()),
        ("pfstorer:cfg".to_string(), args.cfg.to_string()),
        ("pfstorer:dec_w".to_string(), args.dec_w.to_string()),
        ("pfstorer:color_fix".to_string(), args.color_fix.to_string()),
        ("pfstorer:prompt".to_string(), prompt.clone()),
        (
            "pfstorer:negative_prompt".to_string(),
            args.negative_prompt.clone(),
        ),
        ("pfstorer:identity".to_string(), identity_line),
    ];
    if identity.is_some() {
        metadata_common.push((
            "pfstorer:id_strength".to_string(),
            args.id_strength.to_string(),
        ));
        metadata_common.push(("pfstorer:id_ref".to_string(), args.id_ref.to_string()));
    }

    let job = ImageJob {
        target,
        metadata: &metadata_common,
        overwrite: policy.overwrite(),
        max_input_pixels,
        run_label: &run_label,
        quality: args.quality,
        verbose: args.verbose,
    };
    let bars = MultiProgress::new();
    let images = bars.add(batch::progress_bar(items.len(), args.quiet));
    images.set_message("images");
    for item in &items {
        let (input, output) = (&item.input, &item.output);
        let steps = bars.add(step_bar(args.quiet));
        steps.set_message(crate::fsutil::printable(&file_name(input)));
        let started = Instant::now();
        let outcome =
            match restore_one(&restorer, input, (output, item.format), &job, &steps, &bars) {
                Ok(()) => {
                    // Scripts read this line: printed whether or not stderr is a terminal.
                    if !args.quiet {
                        bars.suspend(|| {
                            eprintln!(
                                "{} -> {} ({:.1} s)",
                                crate::fsutil::printable_path(input),
                                crate::fsutil::printable_path(output),
                                started.elapsed().as_secs_f64()
                            )
                        });
                    }
                    Outcome::Done
                }
                Err(e) => Outcome::Failed(batch::reason(&e, input)),
            };
        steps.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        report.finished(input, Some(output), &outcome, seconds, None)?;
        summary.record(input, outcome);
        images.inc(1);
    }
    images.finish_and_clear();
    summary.finish()
}
