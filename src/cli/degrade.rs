//! `pfstorer degrade`: synthetic light/heavy degradations of a batch of images.
//!
//! Each input gets its own seed, [`per_image_seed`]`(--seed, file name)`, so an image is
//! degraded the same way whatever else is in the batch. Outputs are 8-bit PNGs named
//! `<stem>_<preset>.png` (see `batch` for collisions) carrying the preset, seed and drawn
//! parameters as PNG text; an alpha channel of the input is kept.

use super::batch::{
    expand_inputs, output_paths, per_image_seed, progress_bar, reason, ExistingPolicy, InputItem,
    Outcome, OutputChecks, Summary,
};
use crate::degrade::{degrade_image, Preset};
use crate::imaging::io::{load_image, save_png};
use anyhow::{Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct DegradeArgs {
    /// Image files, directories (their image files, not recursive) or patterns like `faces/*.jpg`.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Degradation preset.
    #[arg(long, value_enum)]
    pub preset: Preset,
    /// Base seed; each image's seed is derived from it and the image's file name.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (created when missing), or for a single input the output file
    /// (`-o photo_lq.png`; always PNG: a JPEG would degrade the result again).
    #[arg(
        short = 'o',
        long = "output",
        alias = "out-dir",
        value_name = "DIR|FILE.png"
    )]
    pub out_dir: PathBuf,
    /// Replace existing outputs.
    #[arg(long)]
    pub force: bool,
    /// Leave existing outputs alone and count them as skipped (not failed).
    #[arg(long, conflicts_with = "force")]
    pub skip_existing: bool,
    /// Print one JSON line per written image (input, output, seed, drawn parameters) to stdout.
    #[arg(long)]
    pub print_params: bool,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run(args: DegradeArgs) -> Result<()> {
    let preset = args.preset;
    let to_file = names_an_image_file(&args.out_dir);
    if to_file {
        let ext = args
            .out_dir
            .extension()
            .unwrap_or_default()
            .to_string_lossy();
        if !ext.eq_ignore_ascii_case("png") {
            anyhow::bail!(
                "-o {}: degrade writes PNG (a {ext} file would be compressed again); name a .png file or a directory",
                args.out_dir.display()
            );
        }
    }
    let policy = ExistingPolicy::from_flags(args.force, args.skip_existing);

    let mut summary = Summary::default();
    let mut files = Vec::new();
    for item in expand_inputs(&args.inputs) {
        match item {
            InputItem::File(path) => files.push(path),
            InputItem::Invalid { arg, reason } => summary.record(&arg, Outcome::Failed(reason)),
        }
    }
    let outputs = if to_file {
        let given = files.len() + summary.failed.len();
        if given != 1 {
            anyhow::bail!(
                "-o {} names one file, but {given} inputs were given; give a directory",
                args.out_dir.display()
            );
        }
        vec![args.out_dir.clone()]
    } else {
        output_paths(&files, &args.out_dir, &format!("_{}", args.preset), "png")
    };
    let folder = match args.out_dir.parent() {
        Some(parent) if to_file => parent.to_path_buf(),
        _ => args.out_dir.clone(),
    };
    if !folder.as_os_str().is_empty() {
        std::fs::create_dir_all(&folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
    }

    let mut checks = OutputChecks::new(&files, policy);
    let bar = progress_bar(files.len(), args.quiet);
    for (input, output) in files.iter().zip(&outputs) {
        bar.set_message(input.display().to_string());
        let seed = per_image_seed(args.seed, input);
        let outcome = checks.check(output).unwrap_or_else(|| {
            match degrade_one(input, output, preset, &preset.to_string(), seed, policy) {
                Ok(line) => {
                    if args.print_params {
                        bar.suspend(|| println!("{line}"));
                    }
                    // One line per finished file, for scripts that log stderr.
                    if !args.quiet {
                        bar.suspend(|| {
                            eprintln!(
                                "{} -> {}",
                                crate::fsutil::printable_path(input),
                                crate::fsutil::printable_path(output)
                            )
                        });
                    }
                    Outcome::Done
                }
                Err(why) => Outcome::Failed(why),
            }
        });
        summary.record(input, outcome);
        bar.inc(1);
    }
    bar.finish_and_clear();
    summary.finish()
}

/// Degrades and writes one image; returns the `--print-params` JSON line.
fn degrade_one(
    input: &Path,
    output: &Path,
    preset: Preset,
    preset_name: &str,
    seed: u64,
    policy: ExistingPolicy,
) -> Result<String, String> {
    let loaded = load_image(input).map_err(|e| reason(&e, input))?;
    let (degraded, params) =
        degrade_image(&loaded.rgb, preset, seed).map_err(|e| reason(&e, input))?;
    let params = serde_json::to_value(&params).map_err(|e| format!("parameters: {e}"))?;
    let alpha = loaded
        .alpha
        .as_ref()
        .filter(|a| (a.width, a.height) == (degraded.width, degraded.height));

    // The PNG text holds no paths, so the same image and seed give the same bytes anywhere.
    let mut record = serde_json::Map::new();
    record.insert("preset".into(), preset_name.into());
    record.insert("seed".into(), seed.into());
    match params {
        serde_json::Value::Object(fields) => record.extend(fields),
        other => {
            record.insert("params".into(), other);
        }
    }
    let embedded = serde_json::Value::Object(record.clone()).to_string();
    let mut line = serde_json::Map::new();
    line.insert("input".into(), input.display().to_string().into());
    line.insert("output".into(), output.display().to_string().into());
    line.extend(record);
    let line = serde_json::Value::Object(line).to_string();
    let text = [
        (
            "Software".to_string(),
            format!("pfstorer {}", env!("CARGO_PKG_VERSION")),
        ),
        ("pfstorer:degrade".to_string(), embedded),
    ];
    save_png(output, &degraded, alpha, false, &text, policy.overwrite())
        .map_err(|e| reason(&e, output))?;
    Ok(line)
}

/// Whether `-o` names an image file (an image extension, and not an existing directory)
/// rather than a folder.
fn names_an_image_file(out: &Path) -> bool {
    !out.is_dir()
        && out
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| crate::imaging::io::OutputFormat::from_extension(e).is_some())
}
