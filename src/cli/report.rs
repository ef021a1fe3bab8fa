//! `restore --report FILE.jsonl` (one JSON line per input, appended and synced to disk as each
//! file finishes) and `pfstorer report summarize FILE...` (the totals of one or more reports).
//!
//! A line (a [`Record`]) is written after the output file is in place and before the next
//! input starts, in one `write` on a file opened for appending, then `fsync`ed: a killed job
//! loses at most the file in flight, and a resumed task may append to its old report. Inputs
//! refused before the model is loaded (unreadable arguments, existing outputs, sizes over the
//! limit) get their line first, with `device`/`dtype` null. Concurrent processes write
//! distinct reports (one per array task).
//!
//! Summaries count each input once, by its best outcome over all lines (ok, then skipped,
//! then failed): a task that failed on a file and restored it on its rerun counts it as ok,
//! and a rerun that skips the outputs of the first run does not count them twice.

use super::batch::{Outcome, Summary};
use super::shard::Shard;
use anyhow::Context;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The `--report` flag of `restore`.
#[derive(Debug, Clone, Default, Args)]
pub struct ReportFlag {
    /// Append one JSON line per input to this file as each one finishes (input, output,
    /// status, sizes, settings, seconds, shard); `pfstorer report summarize` totals them.
    #[arg(long = "report", value_name = "FILE.jsonl")]
    pub path: Option<PathBuf>,
}

impl ReportFlag {
    /// Refuses a report name that would land on an image (an input, or an output of the
    /// batch) or a directory: a usage error before anything is read.
    pub fn check(&self) -> anyhow::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if crate::imaging::io::has_image_extension(path) || path.is_dir() {
            anyhow::bail!(
                "--report {}: name a JSON-lines file (e.g. report.jsonl), not an image or a directory",
                path.display()
            );
        }
        Ok(())
    }
}

/// How one input ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Skipped,
    Failed,
}

/// One face of an input, as the face pipeline found and restored it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaceRecord {
    /// `[x0, y0, x1, y1]` in input pixels.
    pub bbox: [f32; 4],
    /// Detector confidence, where the detector gives one.
    #[serde(default)]
    pub score: Option<f32>,
    /// Whether this face was restored (and pasted back).
    pub restored: bool,
    /// The identity assigned to it, if any.
    #[serde(default)]
    pub identity: Option<String>,
    /// The dlib-ID distance of the restored face to its identity's mean descriptor (when it
    /// has an identity with descriptors).
    #[serde(default)]
    pub dlib_id_distance: Option<f32>,
}

/// One line of a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub input: String,
    /// The output path (written for ok; the one that exists or could not be written otherwise;
    /// null when the argument named no file).
    pub output: Option<String>,
    pub status: Status,
    /// The one-line reason of a skipped or failed input; null for ok.
    pub reason: Option<String>,
    /// `[width, height]` of the input, when its header reads.
    pub input_size: Option<[usize; 2]>,
    /// `[width, height]` of the written output (ok only).
    pub output_size: Option<[usize; 2]>,
    /// The faces found and restored; null when face data is not recorded.
    #[serde(default)]
    pub faces: Option<Vec<FaceRecord>>,
    pub steps: usize,
    pub seed: u64,
    /// `cpu`, `cuda:0`, ...; null for inputs refused before the model was loaded.
    pub device: Option<String>,
    pub dtype: Option<String>,
    /// Wall time spent on this input.
    pub seconds: f64,
    /// `K/N` (1-based) under `--shard`, else null.
    pub shard: Option<String>,
    /// When the line was written, seconds since the Unix epoch.
    pub finished_unix: f64,
}

/// The settings every line of one run shares.
#[derive(Debug, Clone)]
struct RunFields {
    steps: usize,
    seed: u64,
    device: Option<String>,
    dtype: Option<String>,
    shard: Option<String>,
}

/// Appends records to a report; does nothing without `--report`.
pub struct ReportWriter {
    file: Option<(File, PathBuf)>,
    run: RunFields,
}

impl ReportWriter {
    /// Opens (creates or appends to) the report named by `flag`.
    pub fn open(
        flag: &ReportFlag,
        shard: Option<Shard>,
        steps: usize,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let file = match &flag.path {
            None => None,
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("--report {}: cannot open", path.display()))?;
                Some((file, path.clone()))
            }
        };
        let run = RunFields {
            steps,
            seed,
            device: None,
            dtype: None,
            shard: shard.map(|s| s.to_string()),
        };
        Ok(ReportWriter { file, run })
    }

    /// The device and precision of the lines that follow.
    pub fn set_device(&mut self, device: &candle_core::Device, dtype: candle_core::DType) {
        self.run.device = Some(crate::device::device_label(device));
        self.run.dtype = Some(crate::device::dtype_name(dtype).to_string());
    }

    /// A line for every input the plan refused (skipped or failed before any model work);
    /// `summary.outputs` gives their output names where known.
    pub fn refused(&mut self, summary: &Summary) -> anyhow::Result<()> {
        let items = summary
            .skipped
            .iter()
            .map(|(input, why)| (input, Outcome::Skipped(why.clone())))
            .chain(
                summary
                    .failed
                    .iter()
                    .map(|(input, why)| (input, Outcome::Failed(why.clone()))),
            );
        for (input, outcome) in items {
            let output = summary.outputs.get(input).map(PathBuf::as_path);
            self.finished(input, output, &outcome, 0.0, None)?;
        }
        Ok(())
    }

    /// Appends and syncs the line of one finished input.
    pub fn finished(
        &mut self,
        input: &Path,
        output: Option<&Path>,
        outcome: &Outcome,
        seconds: f64,
        faces: Option<Vec<FaceRecord>>,
    ) -> anyhow::Result<()> {
        let Some((file, path)) = &mut self.file else {
            return Ok(());
        };
        let (status, reason) = match outcome {
            Outcome::Done => (Status::Ok, None),
            Outcome::Skipped(why) => (Status::Skipped, Some(why.clone())),
            Outcome::Failed(why) => (Status::Failed, Some(why.clone())),
        };
        let record = Record {
            input: input.to_string_lossy().into_owned(),
            output: output.map(|o| o.to_string_lossy().into_owned()),
            status,
            reason,
            input_size: image_size(input),
            output_size: output.filter(|_| status == Status::Ok).and_then(image_size),
            faces,
            steps: self.run.steps,
            seed: self.run.seed,
            device: self.run.device.clone(),
            dtype: self.run.dtype.clone(),
            seconds,
            shard: self.run.shard.clone(),
            finished_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        };
        let mut line = serde_json::to_string(&record)?;
        line.push('\n');
        // One write of the whole line on an append-mode file: lines never interleave.
        file.write_all(line.as_bytes())
            .and_then(|()| file.sync_data())
            .with_context(|| format!("--report {}: cannot write", path.display()))
    }
}

/// Width and height from an image file's header, if it reads (regular files only: a FIFO
/// would block).
fn image_size(path: &Path) -> Option<[usize; 2]> {
    if !path.is_file() {
        return None;
    }
    let (w, h) = image::ImageReader::open(path)
        .ok()?
        .with_guessed_format()
        .ok()?
        .into_dimensions()
        .ok()?;
    Some([w as usize, h as usize])
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(subcommand)]
    pub command: ReportCommand,
}

#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// Totals of one or more `restore --report` files (ok/skipped/failed, time, faces, the
    /// failures), each input counted once by its best outcome.
    Summarize(SummarizeArgs),
}

#[derive(Debug, Args)]
pub struct SummarizeArgs {
    /// Report files (JSON lines), e.g. one per array task.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Print the totals as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let ReportCommand::Summarize(args) = args.command;
    let mut reports = Vec::new();
    for path in &args.files {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let parsed = parse_report(&text);
        for (line, err) in parsed.bad_lines.iter().take(5) {
            eprintln!(
                "warning: {}:{line}: not a report line ({err})",
                path.display()
            );
        }
        reports.push((path.display().to_string(), parsed));
    }
    let totals = summarize(&reports);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&totals)?);
    } else {
        print!("{}", totals.table());
    }
    Ok(())
}

/// The records of one report file and the lines that did not parse (1-based number, error).
#[derive(Debug, Default)]
pub struct ParsedReport {
    pub records: Vec<Record>,
    pub bad_lines: Vec<(usize, String)>,
}

pub fn parse_report(text: &str) -> ParsedReport {
    let mut parsed = ParsedReport::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(record) => parsed.records.push(record),
            Err(e) => parsed.bad_lines.push((i + 1, e.to_string())),
        }
    }
    parsed
}

/// Counts of one report file's lines.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct FileCounts {
    pub path: String,
    pub lines: usize,
    pub ok: usize,
    pub skipped: usize,
    pub failed: usize,
    pub seconds: f64,
    pub bad_lines: usize,
}

/// The merged totals; `ok + skipped + failed == inputs`.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Totals {
    pub reports: Vec<FileCounts>,
    /// Distinct inputs over all reports.
    pub inputs: usize,
    pub ok: usize,
    pub skipped: usize,
    pub failed: usize,
    /// Wall time of all lines (work repeated by reruns included).
    pub seconds: f64,
    /// Faces over the ok inputs whose lines carry face data; null when none does.
    pub faces: Option<usize>,
    pub faces_restored: Option<usize>,
    /// Ok inputs without face data (counted only when some input has it).
    pub ok_without_face_data: usize,
    /// Inputs whose best outcome is a failure, with the reason of their last failed line.
    pub failures: Vec<Failure>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    pub input: String,
    pub reason: String,
}

/// Merges parsed reports (name, content) into totals; see the module documentation.
pub fn summarize(reports: &[(String, ParsedReport)]) -> Totals {
    let mut totals = Totals::default();
    // Per input: the best status, and the record that gave it (the last such line).
    let mut best: BTreeMap<&str, &Record> = BTreeMap::new();
    for (path, parsed) in reports {
        let mut counts = FileCounts {
            path: path.clone(),
            lines: parsed.records.len(),
            bad_lines: parsed.bad_lines.len(),
            ..FileCounts::default()
        };
        for record in &parsed.records {
            match record.status {
                Status::Ok => counts.ok += 1,
                Status::Skipped => counts.skipped += 1,
                Status::Failed => counts.failed += 1,
            }
            counts.seconds += record.seconds;
            let entry = best.entry(record.input.as_str()).or_insert(record);
            if record.status <= entry.status {
                *entry = record;
            }
        }
        totals.seconds += counts.seconds;
        totals.reports.push(counts);
    }
    totals.inputs = best.len();
    for (input, record) in best {
        match record.status {
            Status::Ok => {
                totals.ok += 1;
                match &record.faces {
                    Some(faces) => {
                        *totals.faces.get_or_insert(0) += faces.len();
                        *totals.faces_restored.get_or_insert(0) +=
                            faces.iter().filter(|f| f.restored).count();
                    }
                    None => totals.ok_without_face_data += 1,
                }
            }
            Status::Skipped => totals.skipped += 1,
            Status::Failed => totals.failures.push(Failure {
                input: input.to_string(),
                reason: record.reason.clone().unwrap_or_default(),
            }),
        }
    }
    totals.failed = totals.failures.len();
    if totals.faces.is_none() {
        totals.ok_without_face_data = 0;
    }
    totals
}

impl Totals {
    /// A table of the report files and the merged totals, then the failures.
    pub fn table(&self) -> String {
        use crate::fsutil::printable;
        let total_label = format!("total ({} inputs)", self.inputs);
        let width = self
            .reports
            .iter()
            .map(|r| printable(&r.path).chars().count())
            .chain([total_label.len(), "report".len()])
            .max()
            .unwrap_or(0);
        let row = |name: &str, ok: usize, skipped: usize, failed: usize, seconds: f64| {
            format!("{name:<width$}  {ok:>7}  {skipped:>7}  {failed:>7}  {seconds:>10.1}\n")
        };
        let mut out = format!(
            "{:<width$}  {:>7}  {:>7}  {:>7}  {:>10}\n",
            "report", "ok", "skipped", "failed", "seconds"
        );
        for r in &self.reports {
            out.push_str(&row(
                &printable(&r.path),
                r.ok,
                r.skipped,
                r.failed,
                r.seconds,
            ));
        }
        out.push_str(&row(
            &total_label,
            self.ok,
            self.skipped,
            self.failed,
            self.seconds,
        ));
        let bad: usize = self.reports.iter().map(|r| r.bad_lines).sum();
        if bad > 0 {
            out.push_str(&format!("{bad} lines were not report lines (skipped)\n"));
        }
        if let (Some(found), Some(restored)) = (self.faces, self.faces_restored) {
            out.push_str(&format!("faces: {found} found, {restored} restored"));
            if self.ok_without_face_data > 0 {
                out.push_str(&format!(
                    " ({} ok inputs without face data)",
                    self.ok_without_face_data
                ));
            }
            out.push('\n');
        }
        for f in &self.failures {
            out.push_str(&format!(
                "failed {}: {}\n",
                printable(&f.input),
                printable(&f.reason)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(input: &str, status: Status, seconds: f64) -> Record {
        Record {
            input: input.into(),
            output: Some(format!("{input}.out.png")),
            status,
            reason: (status != Status::Ok).then(|| format!("{input} went wrong")),
            input_size: Some([32, 24]),
            output_size: (status == Status::Ok).then_some([128, 96]),
            faces: None,
            steps: 2,
            seed: 42,
            device: Some("cpu".into()),
            dtype: Some("f32".into()),
            seconds,
            shard: Some("1/2".into()),
            finished_unix: 1.0,
        }
    }

    fn report(name: &str, records: &[Record]) -> (String, ParsedReport) {
        let text: String = records
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect();
        (name.to_string(), parse_report(&text))
    }

    #[test]
    fn reports_are_never_images_or_directories() {
        let flag = |p: &str| ReportFlag {
            path: Some(PathBuf::from(p)),
        };
        assert!(flag("runs/shard-1.jsonl").check().is_ok());
        assert!(ReportFlag::default().check().is_ok());
        for bad in ["photo.png", "scan.JPG", "."] {
            let err = flag(bad).check().expect_err(bad).to_string();
            assert!(err.starts_with("--report "), "{err}");
        }
    }

    #[test]
    fn records_round_trip_with_lowercase_status_and_null_faces() {
        let r = record("a.png", Status::Skipped, 0.5);
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains(r#""status":"skipped""#), "{line}");
        assert!(line.contains(r#""faces":null"#), "{line}");
        assert_eq!(serde_json::from_str::<Record>(&line).unwrap(), r);
    }

    #[test]
    fn totals_count_each_input_once_by_its_best_outcome() {
        let mut with_faces = record("c.png", Status::Ok, 4.0);
        with_faces.faces = Some(vec![
            FaceRecord {
                bbox: [1.0, 2.0, 10.0, 12.0],
                score: Some(0.9),
                restored: true,
                identity: None,
                dlib_id_distance: None,
            },
            FaceRecord {
                bbox: [20.0, 2.0, 30.0, 12.0],
                score: None,
                restored: false,
                identity: Some("bob".into()),
                dlib_id_distance: Some(0.41),
            },
        ]);
        let first = report(
            "r1.jsonl",
            &[
                record("a.png", Status::Failed, 1.0),
                record("b.png", Status::Ok, 2.0),
                with_faces,
            ],
        );
        // The resumed task: a restored now, b skipped as existing, d fails twice.
        let second = report(
            "r2.jsonl",
            &[
                record("a.png", Status::Ok, 3.0),
                record("b.png", Status::Skipped, 0.0),
                record("d.png", Status::Failed, 0.5),
                record("e.png", Status::Skipped, 0.0),
            ],
        );
        let totals = summarize(&[first, second]);
        assert_eq!(totals.inputs, 5);
        assert_eq!((totals.ok, totals.skipped, totals.failed), (3, 1, 1));
        assert_eq!(totals.seconds, 10.5);
        assert_eq!(totals.faces, Some(2));
        assert_eq!(totals.faces_restored, Some(1));
        assert_eq!(totals.ok_without_face_data, 2);
        assert_eq!(
            totals.failures,
            vec![Failure {
                input: "d.png".into(),
                reason: "d.png went wrong".into()
            }]
        );
        assert_eq!(
            (totals.reports[0].ok, totals.reports[0].failed),
            (2, 1),
            "per-file rows count lines"
        );
        let table = totals.table();
        assert!(table.contains("total (5 inputs)"), "{table}");
        assert!(table.contains("faces: 2 found, 1 restored"), "{table}");
        assert!(table.contains("failed d.png: d.png went wrong"), "{table}");
    }

    #[test]
    fn no_face_data_means_no_face_totals_and_bad_lines_are_counted() {
        let mut parsed = report("r.jsonl", &[record("a.png", Status::Ok, 1.0)]);
        parsed.1 = parse_report(&format!(
            "{}\n{{\"input\": \"trunc\n\n",
            serde_json::to_string(&record("a.png", Status::Ok, 1.0)).unwrap()
        ));
        assert_eq!(parsed.1.bad_lines.len(), 1);
        let totals = summarize(&[parsed]);
        assert_eq!(totals.faces, None);
        assert_eq!(totals.ok_without_face_data, 0);
        assert!(!totals.table().contains("faces"));
        assert!(totals.table().contains("1 lines were not report lines"));
    }
}
