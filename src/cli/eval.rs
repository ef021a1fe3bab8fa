//! `pfstorer eval`: full-reference metrics of restored images against their ground truth.
//!
//! Pairing rule: both directories are listed (image extensions, not recursive). A restored
//! file pairs with the ground-truth file whose stem equals its own stem, or else with the
//! longest ground-truth stem that its stem starts with followed by `_` (so `face_restored.png`,
//! `face_light.png` and `face_00.png` all pair with `face.jpg`). When several ground-truth files
//! share a stem (`a.jpg`, `a.png`), they are also known as `a_jpg` / `a_png`, matching the
//! output names of `pfstorer degrade`; a restored file reaching only the shared stem is reported
//! as ambiguous. Each restored file gives one row; several may share one ground truth.

use super::batch::{progress_bar, reason};
use crate::fsutil::{write_bytes, WriteMode};
use crate::imaging::io::{has_image_extension, load_image};
use crate::metrics::{metric_by_name, Metric, MetricOptions};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Csv,
    Json,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Directory of restored images, or one restored image (with --gt an image).
    #[arg(long)]
    pub restored: PathBuf,
    /// Directory of ground-truth images, or one ground-truth image.
    #[arg(long)]
    pub gt: PathBuf,
    /// Pixels removed on every side before measuring.
    #[arg(long, default_value_t = 0)]
    pub crop_border: usize,
    /// Measure the luma (BT.601 Y) only, as BasicSR's `test_y_channel`.
    #[arg(long)]
    pub y_channel: bool,
    /// Metrics, comma-separated: psnr, ssim (BasicSR's), dlib-id-distance (the dlib-ID distance
    /// between the restored and the ground-truth faces, mean over the ground truth's faces;
    /// lower is better, same person under about 0.6; NaN for a photo without a face).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "psnr,ssim,dlib-id-distance"
    )]
    pub metrics: Vec<String>,
    /// Report format.
    #[arg(long, value_enum, default_value_t = Format::Csv)]
    pub format: Format,
    /// The same as --format json (the spelling `faces` and `ids show` take).
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    /// Write the report here instead of stdout (never over an existing file without --force,
    /// never over an input).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Replace an existing report file.
    #[arg(long)]
    pub force: bool,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
}

/// One evaluated pair.
#[derive(Debug, Clone)]
pub struct Row {
    pub restored: String,
    pub gt: String,
    pub values: Vec<f64>,
}

#[derive(Debug, Default)]
struct Pairing {
    pairs: Vec<(PathBuf, PathBuf)>,
    failed: Vec<(PathBuf, String)>,
    missing_restored: Vec<PathBuf>,
}

fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    crate::fsutil::list_files(dir, has_image_extension)
        .with_context(|| crate::fsutil::printable_path(dir))
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn pair_files(restored: &[PathBuf], gt: &[PathBuf]) -> Pairing {
    let mut by_key: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, g) in gt.iter().enumerate() {
        by_key.entry(stem(g)).or_default().push(i);
    }
    let shared: Vec<usize> = by_key
        .values()
        .filter(|v| v.len() > 1)
        .flatten()
        .copied()
        .collect();
    for i in shared {
        let ext = gt[i]
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default();
        by_key
            .entry(format!("{}_{ext}", stem(&gt[i])))
            .or_default()
            .push(i);
    }

    let mut out = Pairing::default();
    let mut used = vec![false; gt.len()];
    for r in restored {
        let s = stem(r);
        // The whole stem first, then shorter prefixes ending before each `_`, longest first.
        let candidates = std::iter::once(s.as_str()).chain(
            s.char_indices()
                .rev()
                .filter(|&(_, c)| c == '_')
                .map(|(i, _)| &s[..i]),
        );
        let mut found = None;
        for key in candidates {
            if let Some(idx) = by_key.get(key) {
                found = Some(idx);
                break;
            }
        }
        match found.map(|v| v.as_slice()) {
            Some([i]) => {
                used[*i] = true;
                out.pairs.push((r.clone(), gt[*i].clone()));
            }
            Some(several) => {
                let names: Vec<String> = several.iter().map(|&i| file_name(&gt[i])).collect();
                out.failed.push((
                    r.clone(),
                    format!("ambiguous ground truth: {}", names.join(", ")),
                ));
            }
            None => out.failed.push((
                r.clone(),
                "no ground-truth image with a matching name".into(),
            )),
        }
    }
    out.missing_restored = gt
        .iter()
        .zip(&used)
        .filter(|(_, &u)| !u)
        .map(|(g, _)| g.clone())
        .collect();
    out
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn evaluate_pair(
    restored: &Path,
    gt: &Path,
    metrics: &[Box<dyn Metric>],
) -> Result<Vec<f64>, String> {
    let r = load_image(restored).map_err(|e| format!("restored: {}", reason(&e, restored)))?;
    let g = load_image(gt)
        .map_err(|e| format!("ground truth {}: {}", file_name(gt), reason(&e, gt)))?;
    if (r.width(), r.height()) != (g.width(), g.height()) {
        return Err(format!(
            "size mismatch: restored {}x{}, ground truth {} {}x{}",
            r.width(),
            r.height(),
            file_name(gt),
            g.width(),
            g.height()
        ));
    }
    metrics
        .iter()
        .map(|m| {
            m.compute(&r.rgb, &g.rgb)
                .map_err(|e| format!("{}: {e}", m.name()))
        })
        .collect()
}

/// The mean of column `k` over the rows where it is defined (the dlib-ID distance is NaN for a
/// photo without a face; NaN when no row has a value).
fn mean(rows: &[Row], k: usize) -> f64 {
    let values: Vec<f64> = rows
        .iter()
        .map(|r| r.values[k])
        .filter(|v| !v.is_nan())
        .collect();
    values.iter().sum::<f64>() / values.len() as f64
}

fn format_value(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.6}")
    } else if v.is_nan() {
        "nan".to_string()
    } else {
        "inf".to_string()
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// CSV: a header `restored,gt,<metric>...`, one row per pair, and a last row `mean,,...`.
pub fn render_csv(names: &[&str], rows: &[Row]) -> String {
    let mut out = format!("restored,gt,{}\n", names.join(","));
    for row in rows {
        let values: Vec<String> = row.values.iter().map(|&v| format_value(v)).collect();
        out.push_str(&format!(
            "{},{},{}\n",
            csv_field(&row.restored),
            csv_field(&row.gt),
            values.join(",")
        ));
    }
    if !rows.is_empty() {
        let means: Vec<String> = (0..names.len())
            .map(|k| format_value(mean(rows, k)))
            .collect();
        out.push_str(&format!("mean,,{}\n", means.join(",")));
    }
    out
}

fn json_value(v: f64) -> serde_json::Value {
    // JSON has no infinity; identical images (PSNR = inf) are written as the string "inf".
    // A photo without a face has no dlib-ID distance: null.
    if v.is_finite() {
        serde_json::json!(v)
    } else if v.is_nan() {
        serde_json::Value::Null
    } else {
        serde_json::json!("inf")
    }
}

fn render_json(
    args: &EvalArgs,
    names: &[&str],
    rows: &[Row],
    pairing: &Pairing,
    failed: &[(PathBuf, String)],
) -> String {
    let images: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| {
            let mut obj = serde_json::Map::new();
            obj.insert("restored".into(), row.restored.clone().into());
            obj.insert("gt".into(), row.gt.clone().into());
            for (name, &v) in names.iter().zip(&row.values) {
                obj.insert((*name).into(), json_value(v));
            }
            serde_json::Value::Object(obj)
        })
        .collect();
    let mut mean_obj = serde_json::Map::new();
    mean_obj.insert("count".into(), rows.len().into());
    if !rows.is_empty() {
        for (k, name) in names.iter().enumerate() {
            mean_obj.insert((*name).into(), json_value(mean(rows, k)));
        }
    }
    let report = serde_json::json!({
        "restored_dir": args.restored.display().to_string(),
        "gt_dir": args.gt.display().to_string(),
        "crop_border": args.crop_border,
        "test_y_channel": args.y_channel,
        "metrics": names,
        "images": images,
        "mean": mean_obj,
        "failed": failed.iter().map(|(p, why)| serde_json::json!({"restored": file_name(p), "reason": why})).collect::<Vec<_>>(),
        "missing_restored": pairing.missing_restored.iter().map(|p| file_name(p)).collect::<Vec<_>>(),
    });
    format!(
        "{}\n",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    )
}

pub fn run(args: EvalArgs) -> Result<()> {
    let options = MetricOptions {
        crop_border: args.crop_border,
        test_y_channel: args.y_channel,
    };
    let metrics: Vec<Box<dyn Metric>> = args
        .metrics
        .iter()
        .map(|name| metric_by_name(name.trim(), options))
        .collect::<crate::Result<_>>()?;
    let names: Vec<&str> = metrics.iter().map(|m| m.name()).collect();
    let two_images = args.restored.is_file() && args.gt.is_file();
    let (restored, gt) = match (args.restored.is_file(), args.gt.is_file()) {
        // Two images: one pair, whatever their names.
        (true, true) => (vec![args.restored.clone()], vec![args.gt.clone()]),
        (false, false) => (image_files(&args.restored)?, image_files(&args.gt)?),
        (r, _) => {
            let (file, folder) = if r {
                (&args.restored, &args.gt)
            } else {
                (&args.gt, &args.restored)
            };
            anyhow::bail!(
                "{} is a file and {} is not: give --restored and --gt two images or two folders",
                crate::fsutil::printable_path(file),
                crate::fsutil::printable_path(folder)
            );
        }
    };
    // Where the report goes is settled before any image is read.
    if let Some(out) = &args.output {
        crate::fsutil::check_not_an_input(out, restored.iter().chain(&gt).map(PathBuf::as_path))?;
        crate::fsutil::check_output_location(out, args.force)?;
    }
    let pairing = if two_images {
        Pairing {
            pairs: vec![(restored[0].clone(), gt[0].clone())],
            ..Pairing::default()
        }
    } else {
        pair_files(&restored, &gt)
    };

    let bar = progress_bar(pairing.pairs.len(), args.quiet);
    let mut rows = Vec::new();
    let mut failed = pairing.failed.clone();
    for (r, g) in &pairing.pairs {
        bar.set_message(file_name(r));
        match evaluate_pair(r, g, &metrics) {
            Ok(values) => rows.push(Row {
                restored: file_name(r),
                gt: file_name(g),
                values,
            }),
            Err(why) => failed.push((r.clone(), why)),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();

    let format = if args.json { Format::Json } else { args.format };
    let report = match format {
        Format::Csv => render_csv(&names, &rows),
        Format::Json => render_json(&args, &names, &rows, &pairing, &failed),
    };
    match &args.output {
        Some(path) => write_bytes(path, report.as_bytes(), WriteMode::from_force(args.force))?,
        None => print!("{report}"),
    }

    let mut summary = format!("{} pairs evaluated, {} failed", rows.len(), failed.len());
    if !rows.is_empty() {
        for (k, name) in names.iter().enumerate() {
            summary.push_str(&format!(", mean {name} {}", format_value(mean(&rows, k))));
        }
    }
    eprintln!("{summary}");
    for (r, why) in &failed {
        eprintln!("failed {}: {why}", r.display());
    }
    for g in &pairing.missing_restored {
        eprintln!("missing restored image for ground truth {}", g.display());
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "{} of {} restored images failed",
            failed.len(),
            restored.len()
        );
    }
    if rows.is_empty() {
        anyhow::bail!(
            "no image pairs found between {} and {}",
            args.restored.display(),
            args.gt.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(names: &[&str]) -> Vec<PathBuf> {
        names.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn pairing_by_stem_and_suffix() {
        let gt = paths(&[
            "g/face.jpg",
            "g/face_b.png",
            "g/x.png",
            "g/x.jpg",
            "g/lonely.png",
        ]);
        let restored = paths(&[
            "r/face.png",
            "r/face_restored.png",
            "r/face_b_light.png",
            "r/x_jpg_light.png",
            "r/x_heavy.png",
            "r/other.png",
        ]);
        let p = pair_files(&restored, &gt);
        let pairs: Vec<(String, String)> = p
            .pairs
            .iter()
            .map(|(r, g)| (file_name(r), file_name(g)))
            .collect();
        assert_eq!(
            pairs,
            [
                ("face.png".into(), "face.jpg".into()),
                ("face_restored.png".into(), "face.jpg".into()),
                ("face_b_light.png".into(), "face_b.png".into()),
                ("x_jpg_light.png".into(), "x.jpg".into()),
            ]
        );
        let failed: Vec<String> = p.failed.iter().map(|(r, _)| file_name(r)).collect();
        assert_eq!(failed, ["x_heavy.png", "other.png"]);
        assert!(p.failed[0].1.contains("ambiguous"));
        assert_eq!(p.missing_restored, paths(&["g/x.png", "g/lonely.png"]));
    }
}
