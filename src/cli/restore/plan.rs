//! The plan of a restore, made before any model is read: every flag checked (a usage error,
//! exit status 2, before any input is read or any folder created), the inputs expanded, each
//! output named with its format, and the outputs and sizes that cannot work refused per file.
//! The batch runner only iterates what this builds.

use super::RestoreArgs;
use crate::cli::batch::{self, ExistingPolicy, InputItem, Outcome, Summary};
use crate::cli::shard::Shard;
use crate::cli::usage;
use crate::config::BaseModelConfig;
use crate::imaging::io::{MetadataStorage, OutputFormat};
use crate::restore::{check_native_size, RestoreSettings, TargetSize};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

/// One input to restore and where its result goes.
#[derive(Debug, Clone)]
pub struct RestoreItem {
    pub input: PathBuf,
    pub output: PathBuf,
    pub format: OutputFormat,
}

/// What `restore` will do, decided before any model is read.
pub struct RestoreJob {
    pub target: TargetSize,
    pub settings: RestoreSettings,
    pub base_config: BaseModelConfig,
    pub policy: ExistingPolicy,
    /// This process's share of the inputs (`--shard`), if split.
    pub shard: Option<Shard>,
    /// The inputs that go ahead.
    pub items: Vec<RestoreItem>,
    /// Inputs refused already (unreadable arguments, unusable outputs, sizes over the limit).
    pub summary: Summary,
}

impl RestoreJob {
    /// Checks the flags, expands the inputs, names the outputs and refuses what cannot work.
    pub fn plan(args: &RestoreArgs) -> anyhow::Result<Self> {
        let (target, settings, ext) = check_flags(args).map_err(usage)?;
        let shard = args.shard.resolve().map_err(usage)?;
        args.report.check().map_err(usage)?;
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
        // Named over the whole list, so a file's output name does not depend on the shard.
        let outputs = output_paths(&files, args.output.as_deref(), &args.suffix, ext)?;
        let policy = ExistingPolicy::from_flags(args.force, args.skip_existing);
        // Outputs that cannot be written and images too large for the limit fail now, not
        // after hours of sampling.
        let mut items = Vec::new();
        let mut checks = batch::OutputChecks::new(&files, policy);
        for (input, (output, format)) in files.iter().zip(outputs) {
            if shard.is_some_and(|s| !s.owns(input)) {
                continue;
            }
            if let Some(outcome) = checks.check(&output) {
                summary.record_with_output(input, &output, outcome);
                continue;
            }
            if let Some((w, h)) = probe_dimensions(input) {
                if let Err(e) = settings.plan(base_config.diffusion.image_size, w, h, target) {
                    summary.record_with_output(input, &output, Outcome::Failed(e.to_string()));
                    continue;
                }
            }
            items.push(RestoreItem {
                input: input.clone(),
                output,
                format,
            });
        }
        Ok(RestoreJob {
            target,
            settings,
            base_config,
            policy,
            shard,
            items,
            summary,
        })
    }

    /// A note naming the output formats that cannot carry the settings, if any.
    pub fn metadata_note(&self) -> Option<String> {
        let no_text: std::collections::BTreeSet<&str> = self
            .items
            .iter()
            .filter(|i| i.format.metadata_storage() == MetadataStorage::NotStored)
            .map(|i| extension_of(i.format))
            .collect();
        (!no_text.is_empty()).then(|| {
            format!(
                "note: the settings (seed, steps, prompts, identity) are not stored in {} outputs; png and jpg carry them",
                no_text.into_iter().collect::<Vec<_>>().join(", ")
            )
        })
    }
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
pub(super) enum ExtChoice {
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
pub(super) fn check_flags(
    args: &RestoreArgs,
) -> anyhow::Result<(TargetSize, RestoreSettings, ExtChoice)> {
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
    args.detection.check()?;
    if let Some(n) = args.face_size {
        if !(64..=4096).contains(&n) {
            bail!("--face-size {n}: must be between 64 and 4096 pixels");
        }
    }
    if args.face.contains(&0) {
        bail!("--face 0: faces are numbered from 1 (`pfstorer faces` lists them)");
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
