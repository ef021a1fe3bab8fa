//! Large collections from the command line, with the tiny fixture model: `restore --shard`
//! splits a folder between processes (every file exactly once, also from Slurm's variables),
//! `--report` writes one synced JSON line per finished file (a killed batch keeps a readable
//! report), `pfstorer report summarize` merges reports, impossible shards are usage errors.

mod common;

use pfstorer::cli::report::{Record, Status};
use pfstorer::cli::shard::shard_of;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn pfstorer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pfstorer"))
}

/// `restore` over `inputs` into `out` with the tiny model at fast settings, `-s 1`, the photo
/// restored whole, plus `extra`.
fn restore_cmd(inputs: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = pfstorer();
    cmd.arg("restore")
        .arg(inputs)
        .arg("-o")
        .arg(out)
        // Gradients have no faces: each photo is restored whole.
        .args(["-s", "1", "--quiet", "--faces", "whole"])
        .args(common::model_flags())
        .args(fast_flags(extra))
        .args(extra);
    cmd
}

/// The fast sampling flags, without `--steps` when `extra` sets it.
fn fast_flags(extra: &[&str]) -> Vec<String> {
    let flags = common::fast_sampling_flags();
    if !extra.contains(&"--steps") {
        return flags;
    }
    let at = flags.iter().position(|f| f == "--steps").unwrap();
    flags
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != at && i != at + 1)
        .map(|(_, f)| f.clone())
        .collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `count` small gradient images of varied sizes named like a camera's, in `dir`.
fn write_photos(dir: &Path, count: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    (0..count)
        .map(|i| {
            let (w, h) = (16 + 4 * (i as u32 % 3), 16 + 4 * (i as u32 % 2));
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([
                    (x * 13 + i as u32 * 29) as u8,
                    (y * 17) as u8,
                    ((x + y) * 7) as u8,
                ])
            });
            let path = dir.join(format!("IMG_{:04}.png", 7 * i + 3));
            img.save(&path).unwrap();
            path
        })
        .collect()
}

/// Every parsed line of a report; panics naming a line that does not parse.
fn read_report(path: &Path) -> Vec<Record> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: {e}: {line:?}", path.display()))
        })
        .collect()
}

/// The output name of a photo: `<stem>_restored.png`, or `<stem>_<ext>_restored.png` for the
/// `scan*` pair that shares a stem.
fn output_name(input: &Path) -> String {
    let stem = input.file_stem().unwrap().to_string_lossy();
    match input.extension() {
        Some(ext) if stem.starts_with("scan") => {
            format!("{stem}_{}_restored.png", ext.to_string_lossy())
        }
        _ => format!("{stem}_restored.png"),
    }
}

fn names_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn two_processes_cover_a_folder_once_and_their_reports_merge() {
    let dir = common::scratch("batch-shards");
    let mut photos = write_photos(&dir.join("in"), 7);
    // Two files sharing a stem, owned by different shards: their output names carry the
    // extension (`X_jpg_restored.png`) because they are named over the whole list.
    let stem = (0..)
        .map(|i| format!("scan{i}"))
        .find(|s| {
            shard_of(Path::new(&format!("{s}.jpg")), 2)
                != shard_of(Path::new(&format!("{s}.png")), 2)
        })
        .unwrap();
    for ext in ["jpg", "png"] {
        let path = dir.join(format!("in/{stem}.{ext}"));
        image::RgbImage::from_fn(20, 16, |x, y| {
            image::Rgb([(x * 9) as u8, (y * 5) as u8, 90])
        })
        .save(&path)
        .unwrap();
        photos.push(path);
    }
    std::fs::write(dir.join("in/broken.png"), "not an image\n").unwrap();
    let out = dir.join("out");
    let reports = [dir.join("r1.jsonl"), dir.join("r2.jsonl")];
    // Both shards own some of these names (the split is a fixed hash of the name).
    for k in 0..2 {
        assert!(
            photos.iter().any(|p| shard_of(p, 2) == k),
            "shard {k} empty"
        );
    }

    let children: Vec<_> = (0..2)
        .map(|k| {
            let spec = format!("{}/2", k + 1);
            let report = reports[k].display().to_string();
            restore_cmd(
                &dir.join("in"),
                &out,
                &["--shard", &spec, "--report", &report],
            )
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let runs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let broken_owner = shard_of(Path::new("broken.png"), 2);
    for (k, run) in runs.iter().enumerate() {
        let err = stderr(run);
        let owned = photos.iter().filter(|p| shard_of(p, 2) == k).count();
        let failed = usize::from(k == broken_owner);
        assert!(
            err.contains(&format!("{owned} done, 0 skipped, {failed} failed in ")),
            "shard {}: {err}",
            k + 1
        );
        assert_eq!(run.status.success(), failed == 0, "shard {}: {err}", k + 1);
    }

    // The union of the outputs is every photo, each restored by exactly one process.
    let expected: BTreeSet<String> = photos.iter().map(|p| output_name(p)).collect();
    assert_eq!(names_in(&out), expected);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (k, report) in reports.iter().enumerate() {
        for record in read_report(report) {
            let input = PathBuf::from(&record.input);
            assert_eq!(
                shard_of(&input, 2),
                k,
                "{} in shard {}",
                record.input,
                k + 1
            );
            assert_eq!(
                record.shard.as_deref(),
                Some(format!("{}/2", k + 1).as_str())
            );
            *seen.entry(record.input.clone()).or_default() += 1;
            if record.status == Status::Ok {
                let output = PathBuf::from(record.output.as_deref().unwrap());
                let decoded = image::open(&output).unwrap();
                let size = [decoded.width() as usize, decoded.height() as usize];
                assert_eq!(record.output_size, Some(size));
                assert_eq!(record.input_size, Some(size), "-s 1 keeps the size");
                assert_eq!((record.device.as_deref(), record.steps), (Some("cpu"), 2));
            } else {
                assert!(record.input.ends_with("broken.png"), "{record:?}");
                assert_eq!(record.status, Status::Failed);
                assert!(record.reason.is_some() && record.output_size.is_none());
            }
        }
    }
    assert_eq!(seen.len(), photos.len() + 1, "{seen:?}");
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");

    // A resumed first task appends skipped lines; the merged totals still count each input once.
    let report = reports[0].display().to_string();
    let rerun = restore_cmd(
        &dir.join("in"),
        &out,
        &["--shard", "1/2", "--report", &report, "--skip-existing"],
    )
    .output()
    .unwrap();
    let skipped = read_report(&reports[0])
        .into_iter()
        .filter(|r| r.status == Status::Skipped)
        .count();
    let owned_first = photos.iter().filter(|p| shard_of(p, 2) == 0).count();
    assert_eq!(skipped, owned_first, "{}", stderr(&rerun));

    let summary = pfstorer()
        .args(["report", "summarize", "--json"])
        .args(&reports)
        .output()
        .unwrap();
    assert!(summary.status.success(), "{}", stderr(&summary));
    let totals: serde_json::Value = serde_json::from_slice(&summary.stdout).unwrap();
    assert_eq!(totals["inputs"], photos.len() + 1);
    assert_eq!(totals["ok"], photos.len());
    assert_eq!(totals["skipped"], 0);
    assert_eq!(totals["failed"], 1);
    assert!(totals["failures"][0]["input"]
        .as_str()
        .unwrap()
        .ends_with("broken.png"));
    assert!(totals["faces"].is_null(), "no face data recorded yet");
    let table = pfstorer()
        .args(["report", "summarize"])
        .args(&reports)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&format!("total ({} inputs)", photos.len() + 1)),
        "{table}"
    );
    assert!(
        table.contains("failed ") && table.contains("broken.png"),
        "{table}"
    );
}

#[test]
fn auto_shard_follows_the_slurm_array_task() {
    let dir = common::scratch("batch-auto");
    let photos = write_photos(&dir.join("in"), 5);
    let out = dir.join("out");
    let report = dir.join("r.jsonl");
    // `--array=4-6`: task 5 is the second of three shards.
    let run = restore_cmd(
        &dir.join("in"),
        &out,
        &["--shard", "auto", "--report", &report.display().to_string()],
    )
    .env("SLURM_ARRAY_TASK_ID", "5")
    .env("SLURM_ARRAY_TASK_MIN", "4")
    .env("SLURM_ARRAY_TASK_COUNT", "3")
    .env_remove("SLURM_ARRAY_TASK_STEP")
    .output()
    .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let expected: BTreeSet<String> = photos
        .iter()
        .filter(|p| shard_of(p, 3) == 1)
        .map(|p| output_name(p))
        .collect();
    assert_eq!(names_in(&out), expected);
    let records = read_report(&report);
    assert_eq!(records.len(), expected.len());
    assert!(records.iter().all(|r| r.shard.as_deref() == Some("2/3")));

    // Outside an array, auto is a usage error and nothing is created.
    let outside = restore_cmd(&dir.join("in"), &dir.join("out2"), &["--shard", "auto"])
        .env_remove("SLURM_ARRAY_TASK_ID")
        .output()
        .unwrap();
    let err = stderr(&outside);
    assert_eq!(outside.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("SLURM_ARRAY_TASK_ID"), "{err}");
    assert!(!dir.join("out2").exists());
}

#[test]
fn impossible_shards_and_report_names_are_one_line_usage_errors() {
    let dir = common::scratch("batch-bad-shard");
    write_photos(&dir.join("in"), 2);
    for spec in ["3/2", "0/0", "0/3", "two/3"] {
        let out = dir.join("never");
        let report = dir.join("never.jsonl");
        let run = restore_cmd(
            &dir.join("in"),
            &out,
            &["--shard", spec, "--report", &report.display().to_string()],
        )
        .output()
        .unwrap();
        let err = stderr(&run);
        assert_eq!(run.status.code(), Some(2), "{spec}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{spec}: {err}");
        assert!(err.contains(&format!("--shard {spec}")), "{spec}: {err}");
        assert!(!out.exists() && !report.exists(), "{spec}: created files");
    }
    // A report named like an image (here one of the inputs) is refused the same way, untouched.
    let input = dir.join("in/IMG_0003.png");
    let before = std::fs::read(&input).unwrap();
    let run = restore_cmd(
        &dir.join("in"),
        &dir.join("never"),
        &["--report", &input.display().to_string()],
    )
    .output()
    .unwrap();
    let err = stderr(&run);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

#[test]
fn a_killed_batch_keeps_a_readable_report_of_its_finished_files() {
    let dir = common::scratch("batch-kill");
    let photos = write_photos(&dir.join("in"), 6);
    let out = dir.join("out");
    let report = dir.join("r.jsonl");
    // More steps than the other tests, so that the batch is still running when killed.
    let mut child = restore_cmd(
        &dir.join("in"),
        &out,
        &["--report", &report.display().to_string(), "--steps", "12"],
    )
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let lines = std::fs::read_to_string(&report)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= 2 {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the batch ended ({status}) before the report had two lines");
        }
        assert!(Instant::now() < deadline, "no report line after 10 minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let records = read_report(&report);
    println!(
        "killed after {} of {} report lines",
        records.len(),
        photos.len()
    );
    assert!(
        !records.is_empty() && records.len() < photos.len(),
        "killed mid-batch: {} of {} lines (raise --steps if the batch outran the kill)",
        records.len(),
        photos.len()
    );
    let mut reported = BTreeSet::new();
    for record in &records {
        assert_eq!(record.status, Status::Ok, "{record:?}");
        let output = PathBuf::from(record.output.as_deref().unwrap());
        image::open(&output).unwrap_or_else(|e| panic!("{}: {e}", output.display()));
        reported.insert(output.file_name().unwrap().to_string_lossy().into_owned());
    }
    // Each line is written before the next file starts: at most the file in flight when the
    // process died is on disk without its line.
    let written = names_in(&out);
    assert!(reported.is_subset(&written));
    assert!(
        written.difference(&reported).count() <= 1,
        "written {written:?}, reported {reported:?}"
    );
}
