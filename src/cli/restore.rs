//! `pfstorer restore <inputs...>`: restore photos with the base model or an identity (`--id`).

use super::batch::{self, ExistingPolicy, InputItem, Outcome, Summary};
use super::model_args::ModelArgs;
use super::usage;
use crate::imaging::colorfix::ColorFix;
use crate::imaging::io::{
    load_image_within, save_output, LoadedImage, MetadataStorage, OutputFormat, OutputImage,
};
use crate::imaging::ImageF32;
use crate::model::base::Residency;
use crate::personalize::identity::Identity;
use crate::weights::base_fingerprint_cached;
use crate::restore::{
    check_native_size, Personalization, ResidencyPolicy, RestoreSettings, Restorer, StagedNetworks,
    TargetSize, WeightSource, BASE_SUBJECT, DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT,
};
use anyhow::{bail, Context};
use candle_core::DType;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Inputs smaller than this on a side are refused: there is no face to restore in them.
pub const MIN_INPUT_SIDE: usize = 8;

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
    pub model: ModelArgs,
}

fn parse_size(s: &str) -> anyhow::Result<(usize, usize)> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("--size {s}: expected WIDTHxHEIGHT, e.g. 2048x1536"))?;
    let parse = |v: &str| v.trim().parse::<usize>().ok().filter(|&n| n > 0);
    match (parse(w), parse(h)) {
        (Some(w), Some(h)) => Ok((w, h)),
        _ => bail!("--size {s}: expected WIDTHxHEIGHT with positive integers"),
    }
}

/// Largest `--scale` accepted: beyond it no photo gives a useful restoration, and the output
/// size limit (`--max-megapixels`) would refuse nearly every input anyway.
pub const MAX_SCALE: f64 = 64.0;

impl RestoreArgs {
    fn target(&self) -> anyhow::Result<TargetSize> {
        Ok(if let Some(s) = &self.size {
            let (w, h) = parse_size(s)?;
            TargetSize::Size(w, h)
        } else if let Some(n) = self.long_side {
            if n == 0 {
                bail!("--long-side 0: must be a positive number of pixels");
            }
            TargetSize::LongSide(n)
        } else {
            let s = self.scale;
            if !(s.is_finite() && s > 0.0 && s <= MAX_SCALE) {
                bail!("--scale {s}: must be a number above 0 and at most {MAX_SCALE}");
            }
            TargetSize::Scale(s)
        })
    }

    /// Every input argument, positional and `-i`, in the order given.
    fn all_inputs(&self) -> Vec<PathBuf> {
        self.inputs
            .iter()
            .chain(&self.input_flag)
            .cloned()
            .collect()
    }
}

/// How output files get their format: from `-o FILE`'s extension, else `--ext`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExtChoice {
    Fixed(OutputFormat),
    /// The input's own format where it can be written, else PNG.
    Auto,
}

impl ExtChoice {
    fn parse(ext: &str) -> anyhow::Result<Self> {
        if ext.eq_ignore_ascii_case("auto") {
            return Ok(ExtChoice::Auto);
        }
        OutputFormat::from_extension(ext.trim_start_matches('.'))
            .map(ExtChoice::Fixed)
            .with_context(|| {
                format!("--ext {ext}: use png, jpg, webp, bmp, tif or auto (the input's format)")
            })
    }

    fn for_input(self, input: &Path) -> OutputFormat {
        match self {
            ExtChoice::Fixed(f) => f,
            ExtChoice::Auto => OutputFormat::from_path(input).unwrap_or(OutputFormat::Png),
        }
    }
}

/// The file-name extension written for `format`.
fn extension_of(format: OutputFormat) -> &'static str {
    match format {
        OutputFormat::Png => "png",
        OutputFormat::Jpeg => "jpg",
        OutputFormat::Webp => "webp",
        OutputFormat::Bmp => "bmp",
        OutputFormat::Tiff => "tif",
    }
}

/// The output path and format of every input: `-o FILE` for a single input (its extension
/// gives the format), else `DIR/<stem><suffix>.<ext>` (DIR = `-o` or the input's own
/// directory; the extension from `--ext`).
fn output_paths(
    inputs: &[PathBuf],
    output: Option<&Path>,
    suffix: &str,
    ext: ExtChoice,
) -> anyhow::Result<Vec<(PathBuf, OutputFormat)>> {
    let with_format = |paths: Vec<PathBuf>, sources: &[PathBuf]| -> Vec<(PathBuf, OutputFormat)> {
        paths
            .into_iter()
            .zip(sources)
            .map(|(p, input)| {
                let format = ext.for_input(input);
                (p.with_extension(extension_of(format)), format)
            })
            .collect()
    };
    if let Some(out) = output {
        let is_file = out.extension().is_some() && !out.is_dir();
        if is_file {
            if inputs.len() != 1 {
                return Err(usage(anyhow::anyhow!(
                    "-o {}: a file name takes exactly one input; give a directory for {} inputs",
                    out.display(),
                    inputs.len()
                )));
            }
            return Ok(vec![(out.to_path_buf(), output_file_format(out)?)]);
        }
        return Ok(with_format(
            batch::output_paths(inputs, out, suffix, "png"),
            inputs,
        ));
    }
    // Next to each input, grouped by directory so names stay collision-free.
    Ok(inputs
        .iter()
        .map(|p| {
            let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
            let siblings: Vec<PathBuf> = inputs
                .iter()
                .filter(|q| q.parent() == p.parent())
                .cloned()
                .collect();
            let idx = siblings.iter().position(|q| q == p).unwrap_or(0);
            let name = batch::output_paths(&siblings, &dir, suffix, "png")[idx].clone();
            with_format(vec![name], std::slice::from_ref(p))[0].clone()
        })
        .collect())
}

/// The format of an output file named with `-o`, from its extension.
fn output_file_format(out: &Path) -> anyhow::Result<OutputFormat> {
    OutputFormat::from_path(out).ok_or_else(|| {
        usage(anyhow::anyhow!(
            "-o {}: unknown image extension; use .png, .jpg, .webp, .bmp or .tif",
            out.display()
        ))
    })
}

/// `--max-megapixels` as a pixel count.
fn max_pixels(mp: f64) -> anyhow::Result<usize> {
    if !(mp.is_finite() && mp > 0.0 && mp <= 1e6) {
        bail!("--max-megapixels {mp}: must be a positive number of megapixels");
    }
    Ok((mp * 1e6) as usize)
}

/// Every flag that does not depend on an input, checked before any input is read or any
/// folder created; a failure is a usage error (exit status 2).
fn check_flags(args: &RestoreArgs) -> anyhow::Result<(TargetSize, RestoreSettings, ExtChoice)> {
    let target = args.target()?;
    batch::check_suffix("--suffix", &args.suffix)?;
    if !(args.id_strength.is_finite() && (0.0..=10.0).contains(&args.id_strength)) {
        bail!(
            "--id-strength {}: must be between 0 and 10 (1 is the trained strength)",
            args.id_strength
        );
    }
    if !(1..=100).contains(&args.quality) {
        bail!("--quality {}: must be between 1 and 100", args.quality);
    }
    let ext = ExtChoice::parse(args.ext.as_deref().unwrap_or("png"))?;
    if let (Some(out), Some(given)) = (&args.output, &args.ext) {
        if out.extension().is_some() && !out.is_dir() {
            let format = output_file_format(out)?;
            if matches!(ext, ExtChoice::Fixed(f) if f != format) {
                bail!(
                    "-o {} and --ext {given}: the file name's extension already picks the format",
                    out.display()
                );
            }
        }
    }
    let settings = RestoreSettings {
        steps: args.steps,
        guidance: args.cfg,
        seed: args.seed,
        dec_w: args.dec_w,
        color_fix: args.color_fix,
        tile_overlap: args.tile_overlap,
        native_size: args.input_size,
        patch_size: args.patch_size,
        patch_stride: args.patch_stride,
        max_pixels: max_pixels(args.max_megapixels)?,
        tile_batch: args.tile_batch,
    };
    settings.validate()?;
    Ok((target, settings, ext))
}

pub fn run(args: RestoreArgs) -> anyhow::Result<()> {
    // Every flag is checked before any file is touched.
    let (target, settings, ext) = check_flags(&args).map_err(usage)?;
    // Load the identity first: a wrong name fails before any model is read.
    let identity = match &args.id {
        Some(id) => Some(Identity::load(id)?),
        None => None,
    };
    let base_config = args.model.base_config()?;
    let native = args.input_size.unwrap_or(base_config.diffusion.image_size);
    check_native_size(native).map_err(usage)?;
    let mut summary = Summary::default();
    let mut files = Vec::new();
    for item in batch::expand_inputs(&args.all_inputs()) {
        match item {
            InputItem::File(p) => files.push(p),
            InputItem::Invalid { arg, reason } => summary.record(&arg, Outcome::Failed(reason)),
        }
    }
    let outputs = output_paths(&files, args.output.as_deref(), &args.suffix, ext)?;
    let policy = ExistingPolicy::from_flags(args.force, args.skip_existing);

    // Decide what to do before loading the model: outputs that cannot be written and images
    // too large for the limit fail now, not after hours of sampling.
    let mut todo = Vec::new();
    let mut checks = batch::OutputChecks::new(&files, policy);
    for (input, (output, format)) in files.iter().zip(&outputs) {
        if let Some(outcome) = checks.check(output) {
            summary.record(input, outcome);
            continue;
        }
        if let Some((w, h)) = probe_dimensions(input) {
            if let Err(e) = settings.plan(base_config.diffusion.image_size, w, h, target) {
                summary.record(input, Outcome::Failed(e.to_string()));
                continue;
            }
        }
        todo.push((input.clone(), output.clone(), *format));
    }
    if todo.is_empty() {
        return summary.finish();
    }
    if !args.quiet {
        let no_text: Vec<&str> = todo
            .iter()
            .filter(|(_, _, f)| f.metadata_storage() == MetadataStorage::NotStored)
            .map(|(_, _, f)| extension_of(*f))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if !no_text.is_empty() {
            eprintln!(
                "note: the settings (seed, steps, prompts, identity) are not stored in {} outputs; png and jpg carry them",
                no_text.join(", ")
            );
        }
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

    let job = BatchJob {
        target,
        metadata: &metadata_common,
        overwrite: policy.overwrite(),
        max_input_pixels,
        run_label: &run_label,
        quality: args.quality,
        verbose: args.verbose,
    };
    let bars = MultiProgress::new();
    let images = bars.add(batch::progress_bar(todo.len(), args.quiet));
    images.set_message("images");
    for (input, output, format) in &todo {
        let steps = bars.add(step_bar(args.quiet));
        steps.set_message(crate::fsutil::printable(&file_name(input)));
        let started = Instant::now();
        let outcome = match restore_one(&restorer, input, (output, *format), &job, &steps, &bars) {
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
        summary.record(input, outcome);
        images.inc(1);
    }
    images.finish_and_clear();
    summary.finish()
}

fn step_bar(quiet: bool) -> ProgressBar {
    let bar = batch::progress_bar(0, quiet);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} {bar:30} step {pos}/{len} [{elapsed_precise}<{eta_precise}]",
    ) {
        bar.set_style(style);
    }
    bar
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// What every image of a batch shares besides the restorer.
struct BatchJob<'a> {
    target: TargetSize,
    metadata: &'a [(String, String)],
    overwrite: bool,
    max_input_pixels: usize,
    /// `device, dtype` for the work line.
    run_label: &'a str,
    quality: u8,
    /// Print the sampling details under the plan line.
    verbose: bool,
}

/// Projected sampling times above this get a line on how to cut them.
const LONG_RUN_S: f64 = 3600.0;

/// A duration for people: seconds, minutes, hours or days.
pub(crate) fn human_duration(seconds: f64) -> String {
    if seconds < 90.0 {
        format!("{seconds:.1} s")
    } else if seconds < 5400.0 {
        format!("{:.0} min", seconds / 60.0)
    } else if seconds < 2.0 * 86400.0 {
        format!("{:.1} h", seconds / 3600.0)
    } else {
        format!("{:.1} days", seconds / 86400.0)
    }
}

/// `200 steps`, or `200 steps x 4 patches` when the image is processed in patches.
fn steps_and_patches(steps: usize, patches: usize) -> String {
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let steps = plural(steps, "step", "steps");
    if patches > 1 {
        format!("{steps} x {patches} patches")
    } else {
        steps
    }
}

/// The line after the first sampling step: its time and the image's projected sampling time,
/// counted as users count it (steps x patches), plus how to cut it above [`LONG_RUN_S`].
fn projection_lines(first_step_s: f64, steps: usize, patches: usize) -> Vec<String> {
    let projected = first_step_s * (steps * patches) as f64;
    let counted = steps_and_patches(steps, patches);
    let mut lines = vec![format!(
        "first step {}: sampling will take about {} ({counted})",
        human_duration(first_step_s),
        human_duration(projected)
    )];
    if projected > LONG_RUN_S {
        lines.push(
            "to cut it: fewer --steps (e.g. --steps 50), a smaller --scale (fewer patches and latent tiles), or a GPU build (scripts/build-cuda.sh)".into(),
        );
    }
    lines
}

fn restore_one(
    restorer: &Restorer,
    input: &Path,
    (output, format): (&Path, OutputFormat),
    job: &BatchJob,
    steps: &ProgressBar,
    bars: &MultiProgress,
) -> crate::Result<()> {
    let BatchJob {
        target,
        metadata,
        overwrite,
        max_input_pixels,
        run_label,
        quality,
        verbose,
    } = *job;
    let loaded: LoadedImage = load_image_within(input, MIN_INPUT_SIDE, max_input_pixels)?;
    // Say the cost before spending it (stderr, also with --quiet: it is no progress bar).
    let say = |line: String| bars.suspend(|| eprintln!("{line}"));
    let (plan, work) = restorer.work(loaded.rgb.width, loaded.rgb.height, target)?;
    say(format!(
        "{}: {}x{} output, {}; {run_label}",
        crate::fsutil::printable(&file_name(input)),
        plan.out_w,
        plan.out_h,
        steps_and_patches(work.steps, work.patches),
    ));
    if verbose {
        say(format!("  work: {work}"));
    }
    let mut sampling_started: Option<Instant> = None;
    let mut projected = false;
    let mut on_step = |done: usize, total: usize| {
        steps.set_length(total as u64);
        steps.set_position(done as u64);
        if done == 0 && sampling_started.is_none() {
            sampling_started = Some(Instant::now());
        } else if done == 1 && !projected {
            projected = true;
            if let Some(start) = sampling_started {
                let seconds = start.elapsed().as_secs_f64();
                for line in projection_lines(seconds, work.steps, work.patches) {
                    say(line);
                }
            }
        }
    };
    let restored = restorer.restore(&loaded.rgb, target, &mut on_step)?;
    let (w, h) = (restored.width, restored.height);
    let alpha = match &loaded.alpha {
        Some(a) => Some(clamp01(crate::imaging::resize::resize_torch(
            a,
            w,
            h,
            crate::imaging::resize::TorchInterp::Bicubic,
        )?)),
        None => None,
    };
    let rgb = if loaded.gray {
        to_gray(&restored)
    } else {
        restored
    };
    let mut meta = metadata.to_vec();
    meta.push(("pfstorer:input".to_string(), file_name(input)));
    let image = OutputImage {
        rgb: &rgb,
        alpha: alpha.as_ref(),
        sixteen_bit: loaded.bit_depth > 8,
        text: &meta,
        quality,
    };
    save_output(output, format, &image, overwrite).map(drop)
}

fn clamp01(mut img: ImageF32) -> ImageF32 {
    img.data.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
    img
}

/// Gray sources stay gray: the BT.601 luma, saved as a one-channel (gray) PNG.
fn to_gray(img: &ImageF32) -> ImageF32 {
    let data = img
        .data
        .chunks_exact(3)
        .map(|px| 0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2])
        .collect();
    ImageF32::new(img.width, img.height, 1, data)
}

/// Width and height from the image header (cheap; `None` when unreadable, which the full
/// decode then reports).
fn probe_dimensions(path: &Path) -> Option<(usize, usize)> {
    // Opening a FIFO would block: only regular files are probed.
    if !path.is_file() {
        return None;
    }
    let (w, h) = image::ImageReader::open(path)
        .ok()?
        .with_guessed_format()
        .ok()?
        .into_dimensions()
        .ok()?;
    Some((w as usize, h as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human_duration(11.34), "11.3 s");
        assert_eq!(human_duration(600.0), "10 min");
        assert_eq!(human_duration(9000.0), "2.5 h");
        assert_eq!(human_duration(3.0 * 86400.0), "3.0 days");
    }

    #[test]
    fn projection_and_the_hint_above_an_hour() {
        let short = projection_lines(2.0, 100, 1);
        assert_eq!(
            short,
            vec!["first step 2.0 s: sampling will take about 3 min (100 steps)".to_string()]
        );
        // Exactly one hour is not above it.
        assert_eq!(projection_lines(36.0, 100, 1).len(), 1);
        let long = projection_lines(12.0, 200, 4);
        assert_eq!(long.len(), 2);
        assert_eq!(
            long[0],
            "first step 12.0 s: sampling will take about 2.7 h (200 steps x 4 patches)"
        );
        for flag in ["--steps", "--scale", "GPU build"] {
            assert!(long[1].contains(flag), "{flag} in {}", long[1]);
        }
    }
}
