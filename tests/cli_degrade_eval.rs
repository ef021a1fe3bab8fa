//! `pfstorer degrade` and `pfstorer eval` end to end, through the built binary.
mod common;

use image::{ImageEncoder, Rgb, RgbImage};
use std::path::Path;
use std::process::{Command, Output};

fn scratch(name: &str) -> common::Scratch {
    common::scratch(&format!("cli-{name}"))
}

fn pfstorer(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_pfstorer"))
        .args(args)
        .output()
        .expect("run pfstorer");
    println!(
        "$ pfstorer {}\n-- status {:?}\n-- stdout\n{}-- stderr\n{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn face_like(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f32 - w as f32 / 2.0, y as f32 - h as f32 / 2.0);
        let r = (dx * dx + dy * dy).sqrt();
        let v = (128.0 + 90.0 * (r / 6.0).sin()) as u8;
        Rgb([v, (x * 255 / w) as u8, (y * 255 / h) as u8])
    })
}

/// The input folder: three good images of several kinds and three bad files.
fn make_inputs(dir: &Path) -> Vec<(&'static str, (u32, u32))> {
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 92)
        .write_image(
            face_like(48, 40).as_raw(),
            48,
            40,
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
    std::fs::write(dir.join("good.jpg"), &jpeg).unwrap();
    std::fs::write(dir.join("cut.jpg"), &jpeg[..jpeg.len() * 2 / 3]).unwrap();
    std::fs::write(dir.join("notes.jpg"), "this is a text file\n").unwrap();

    image::GrayImage::from_fn(40, 32, |x, y| image::Luma([((x * 5 + y * 3) % 256) as u8]))
        .save(dir.join("gray.png"))
        .unwrap();
    image::RgbaImage::from_fn(36, 36, |x, y| {
        let p = face_like(36, 36).get_pixel(x, y).0;
        image::Rgba([p[0], p[1], p[2], (x * 7) as u8])
    })
    .save(dir.join("rgba.png"))
    .unwrap();
    let deep = image::ImageBuffer::<Rgb<u16>, Vec<u16>>::from_fn(32, 44, |x, y| {
        Rgb([(x * 2000) as u16, (y * 1400) as u16, 30000])
    });
    image::DynamicImage::ImageRgb16(deep)
        .save(dir.join("deep.png"))
        .unwrap();
    vec![
        ("deep", (32, 44)),
        ("good", (48, 40)),
        ("gray", (40, 32)),
        ("rgba", (36, 36)),
    ]
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn degrade_then_eval() {
    let root = scratch("degrade-eval");
    let inputs = root.join("in");
    let out = root.join("out");
    std::fs::create_dir_all(&inputs).unwrap();
    let good = make_inputs(&inputs);

    // First run: good images written at their size, bad ones named with a reason, exit != 0.
    let run = pfstorer(&[
        "degrade",
        s(&inputs),
        "--preset",
        "light",
        "--seed",
        "7",
        "-o",
        s(&out),
        "--print-params",
        "--quiet",
    ]);
    assert!(
        !run.status.success(),
        "bad inputs must make the exit code non-zero"
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("4 done, 0 skipped, 2 failed"), "{stderr}");
    let cut_line = stderr
        .lines()
        .find(|l| l.contains("cut.jpg"))
        .expect("cut.jpg reported");
    assert!(cut_line.contains("truncated or corrupt JPEG"), "{cut_line}");
    let notes_line = stderr
        .lines()
        .find(|l| l.contains("notes.jpg"))
        .expect("notes.jpg reported");
    assert!(notes_line.contains("not an image"), "{notes_line}");
    for (stem, (w, h)) in &good {
        let path = out.join(format!("{stem}_light.png"));
        let img = image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            (img.width(), img.height()),
            (*w, *h),
            "{stem}: size changed"
        );
    }
    let rgba = image::open(out.join("rgba_light.png")).unwrap();
    assert!(rgba.color().has_alpha(), "alpha of the input is kept");

    // --print-params: one JSON line per written image.
    let stdout = String::from_utf8_lossy(&run.stdout);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(lines.len(), good.len());
    for line in &lines {
        assert!(line["input"].is_string() && line["seed"].is_u64(), "{line}");
    }
    let seeds: std::collections::HashSet<u64> =
        lines.iter().map(|l| l["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds.len(), good.len(), "per-image seeds differ");

    // Rerun without --force: outputs untouched, reported, exit != 0; --skip-existing: exit 0.
    let before: Vec<Vec<u8>> = good
        .iter()
        .map(|(stem, _)| read(&out.join(format!("{stem}_light.png"))))
        .collect();
    let good_args = |seed: &'static str, dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = good
            .iter()
            .map(|(stem, _)| {
                let ext = if *stem == "good" { "jpg" } else { "png" };
                s(&inputs.join(format!("{stem}.{ext}"))).to_string()
            })
            .collect();
        v.extend(["--preset", "light", "--seed", seed, "-o", s(dir), "--quiet"].map(String::from));
        v
    };
    let mut args = vec!["degrade".to_string()];
    args.extend(good_args("7", &out));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let rerun = pfstorer(&argv);
    assert!(!rerun.status.success());
    let stderr = String::from_utf8_lossy(&rerun.stderr);
    assert!(stderr.contains("0 done, 0 skipped, 4 failed"), "{stderr}");
    assert!(
        stderr.contains("exists") && stderr.contains("--force"),
        "{stderr}"
    );
    for ((stem, _), bytes) in good.iter().zip(&before) {
        assert_eq!(
            &read(&out.join(format!("{stem}_light.png"))),
            bytes,
            "{stem} changed"
        );
    }
    let mut skip = argv.clone();
    skip.push("--skip-existing");
    let skipped = pfstorer(&skip);
    assert!(skipped.status.success());
    assert!(String::from_utf8_lossy(&skipped.stderr).contains("0 done, 4 skipped, 0 failed"));

    // Same seed in another folder: byte-identical; another seed: different.
    let same = root.join("same");
    let mut args = vec!["degrade".to_string()];
    args.extend(good_args("7", &same));
    assert!(
        pfstorer(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .status
            .success()
    );
    let other = root.join("other");
    let mut args = vec!["degrade".to_string()];
    args.extend(good_args("8", &other));
    assert!(
        pfstorer(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .status
            .success()
    );
    let mut any_different = false;
    for ((stem, _), bytes) in good.iter().zip(&before) {
        let name = format!("{stem}_light.png");
        assert_eq!(
            &read(&same.join(&name)),
            bytes,
            "{stem}: same seed, other bytes"
        );
        any_different |= &read(&other.join(&name)) != bytes;
    }
    assert!(any_different, "another seed gave identical outputs");

    // --force replaces.
    let mut args = vec!["degrade".to_string()];
    args.extend(good_args("8", &out));
    args.push("--force".into());
    let forced = pfstorer(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(forced.status.success());
    assert!(String::from_utf8_lossy(&forced.stderr).contains("4 done, 0 skipped, 0 failed"));

    // eval (outputs vs originals): CSV rows for the 4 pairs and the mean.
    let gt = root.join("gt");
    std::fs::create_dir_all(&gt).unwrap();
    for (stem, _) in &good {
        let ext = if *stem == "good" { "jpg" } else { "png" };
        let name = format!("{stem}.{ext}");
        std::fs::copy(inputs.join(&name), gt.join(&name)).unwrap();
    }
    let report = root.join("report.csv");
    let eval = pfstorer(&[
        "eval",
        "--restored",
        s(&other),
        "--gt",
        s(&gt),
        "--crop-border",
        "2",
        "-o",
        s(&report),
        "--quiet",
    ]);
    assert!(eval.status.success());
    let csv = String::from_utf8(read(&report)).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(
        rows[0],
        ["restored", "gt", "psnr", "ssim", "dlib-id-distance"]
    );
    assert_eq!(rows.len(), good.len() + 2, "{csv}");
    let mut psnrs = Vec::new();
    for row in &rows[1..=good.len()] {
        assert_eq!(row.len(), 5);
        // Synthetic pictures have no face: no identity distance.
        assert_eq!(row[4], "nan", "{row:?}");
        let psnr: f64 = row[2].parse().unwrap_or_else(|_| panic!("psnr {row:?}"));
        let ssim: f64 = row[3].parse().unwrap_or_else(|_| panic!("ssim {row:?}"));
        assert!(psnr.is_finite() && psnr > 5.0, "{row:?}");
        assert!(ssim > -1.0 && ssim < 1.0, "{row:?}");
        let gt_stem = row[1].split('.').next().unwrap();
        assert_eq!(row[0], format!("{gt_stem}_light.png"), "paired by stem");
        psnrs.push(psnr);
    }
    let mean_row = rows.last().unwrap();
    assert_eq!(mean_row[0], "mean");
    let mean: f64 = mean_row[2].parse().unwrap();
    let expect = psnrs.iter().sum::<f64>() / psnrs.len() as f64;
    assert!((mean - expect).abs() < 1e-5, "mean {mean} vs {expect}");

    // JSON to stdout, a missing ground truth and a size mismatch reported, exit != 0.
    std::fs::remove_file(gt.join("gray.png")).unwrap();
    image::RgbImage::new(8, 8)
        .save(gt.join("rgba.png"))
        .unwrap();
    let eval = pfstorer(&[
        "eval",
        "--restored",
        s(&other),
        "--gt",
        s(&gt),
        "--format",
        "json",
        "--y-channel",
        "--quiet",
    ]);
    assert!(!eval.status.success());
    let json: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(json["images"].as_array().unwrap().len(), 2);
    assert_eq!(json["mean"]["count"], 2);
    let stderr = String::from_utf8_lossy(&eval.stderr);
    assert!(
        stderr.contains("gray_light.png") && stderr.contains("no ground-truth"),
        "{stderr}"
    );
    assert!(
        stderr.contains("rgba_light.png") && stderr.contains("size mismatch"),
        "{stderr}"
    );

    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn unknown_preset_and_missing_input() {
    let root = scratch("args");
    let bad = pfstorer(&["degrade", "x.png", "--preset", "medium", "-o", s(&root)]);
    assert!(!bad.status.success());
    let run = pfstorer(&[
        "degrade",
        s(&root.join("nope.png")),
        "--preset",
        "heavy",
        "-o",
        s(&root.join("o")),
    ]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("0 done, 0 skipped, 1 failed") && stderr.contains("nope.png"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

/// `degrade one.png -o lq.png` writes that file (as `restore -o` does), not a folder named
/// `lq.png`; a JPEG name and several inputs for one file are one line each, before anything
/// is written; each written file is one line on stderr.
#[test]
fn degrade_to_a_named_file() {
    let root = scratch("degrade-file");
    let input = root.join("photo.png");
    face_like(40, 36).save(&input).unwrap();
    let lq = root.join("sub").join("photo_lq.png");
    let run = pfstorer(&["degrade", s(&input), "--preset", "light", "-o", s(&lq)]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(lq.is_file(), "{} is not a file", lq.display());
    let img = image::open(&lq).unwrap();
    assert_eq!((img.width(), img.height()), (40, 36));
    assert!(
        stderr.contains(&format!("{} -> {}", input.display(), lq.display())),
        "one line per file: {stderr}"
    );
    // The same image as the folder form gives (its seed comes from the input's name).
    let folder = root.join("folder");
    let run = pfstorer(&[
        "degrade",
        s(&input),
        "--preset",
        "light",
        "-o",
        s(&folder),
        "-q",
    ]);
    assert!(run.status.success());
    assert_eq!(read(&folder.join("photo_light.png")), read(&lq));

    let before: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let jpg = root.join("lq.jpg");
    let run = pfstorer(&["degrade", s(&input), "--preset", "light", "-o", s(&jpg)]);
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("degrade writes PNG"));
    let two = root.join("two.png");
    let run = pfstorer(&[
        "degrade",
        s(&input),
        s(&lq),
        "--preset",
        "light",
        "-o",
        s(&two),
    ]);
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("names one file, but 2 inputs"));
    let after: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(before, after, "nothing written by the refused runs");
}

/// `eval` of two images (not only two folders) gives their one row whatever the names; an image
/// against a folder is one line; `--json` is `--format json`.
#[test]
fn eval_two_images_and_json() {
    let root = scratch("eval-files");
    let (a, b) = (root.join("restored_any_name.png"), root.join("truth.png"));
    face_like(40, 36).save(&a).unwrap();
    let mut other = face_like(40, 36);
    other.put_pixel(3, 4, Rgb([0, 0, 0]));
    other.save(&b).unwrap();
    let run = pfstorer(&[
        "eval",
        "--restored",
        s(&a),
        "--gt",
        s(&b),
        "--metrics",
        "psnr",
        "-q",
    ]);
    assert!(run.status.success());
    let csv = String::from_utf8_lossy(&run.stdout);
    let row = csv
        .lines()
        .find(|l| l.starts_with("restored_any_name.png,truth.png,"))
        .unwrap_or_else(|| panic!("{csv}"));
    let psnr: f64 = row.rsplit(',').next().unwrap().parse().unwrap();
    assert!(psnr.is_finite() && psnr > 20.0, "one changed pixel: {row}");

    let run = pfstorer(&["eval", "--restored", s(&a), "--gt", s(&root), "-q"]);
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("is a file and") && err.lines().count() == 1,
        "{err}"
    );

    let run = pfstorer(&[
        "eval",
        "--restored",
        s(&a),
        "--gt",
        s(&b),
        "--metrics",
        "psnr",
        "--json",
        "-q",
    ]);
    assert!(run.status.success());
    let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert!(json.is_object(), "{json}");
    assert!(json.to_string().contains("restored_any_name.png"), "{json}");
}
