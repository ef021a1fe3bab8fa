//! `pfstorer restore` end to end with the tiny fixture model, driven from the command line:
//! a folder of good and bad inputs, collision-free names, no overwriting without --force,
//! reproducible seeds, PNG metadata, clear errors, and a large output through the tiling paths.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn tmp_dir(name: &str) -> common::Scratch {
    common::scratch(&format!("restore-{name}"))
}

/// The tiny model flags plus fast sampling settings.
fn model_flags() -> Vec<String> {
    let f = |rel: &str| common::fixture(rel).display().to_string();
    vec![
        "--base".into(),
        f("stablesr/model.safetensors"),
        "--config".into(),
        f("stablesr/config.yaml"),
        "--cfw".into(),
        f("stablesr/cfw.safetensors"),
        "--cfw-config".into(),
        f("stablesr/cfw.yaml"),
        "--quiet".into(),
    ]
}

fn fast() -> Vec<String> {
    common::fast_sampling_flags()
}

fn restore(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pfstorer"))
        .arg("restore")
        .args(args)
        .output()
        .expect("run pfstorer")
}

fn gradient(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 7 % 256) as u8,
            (y * 11 % 256) as u8,
            ((x + y) * 5 % 256) as u8,
        ])
    })
}

fn write_inputs(dir: &Path) {
    gradient(32, 24).save(dir.join("good.jpg")).unwrap();
    image::GrayImage::from_fn(20, 16, |x, y| image::Luma([(x * 9 + y * 3) as u8]))
        .save(dir.join("gray.png"))
        .unwrap();
    image::RgbaImage::from_fn(16, 20, |x, y| {
        image::Rgba([x as u8 * 10, y as u8 * 10, 128, (x * 16) as u8])
    })
    .save(dir.join("alpha.png"))
    .unwrap();
    let deep = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(24, 16, |x, y| {
        image::Rgb([x as u16 * 2000, y as u16 * 3000, 40000])
    });
    image::DynamicImage::ImageRgb16(deep)
        .save(dir.join("deep.png"))
        .unwrap();
    image::RgbImage::new(1, 1)
        .save(dir.join("dot.png"))
        .unwrap();
    let jpeg = std::fs::read(dir.join("good.jpg")).unwrap();
    std::fs::write(dir.join("truncated.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    std::fs::write(dir.join("notes.jpg"), "not an image\n").unwrap();
}

/// Windows of `size` every `stride` along `n` until one reaches the end (the last moved back to
/// end there), walked one by one.
fn walk_windows(n: usize, size: usize, stride: usize) -> usize {
    if n <= size {
        return 1;
    }
    let mut starts = std::collections::BTreeSet::new();
    let mut start = 0;
    loop {
        starts.insert(start.min(n - size));
        if start + size >= n {
            break;
        }
        start += stride;
    }
    starts.len()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn folder_batch_with_good_and_bad_inputs() {
    let dir = tmp_dir("batch");
    let input = dir.join("in");
    let out = dir.join("out");
    std::fs::create_dir_all(&input).unwrap();
    write_inputs(&input);

    let mut args = vec![
        input.display().to_string(),
        "-o".into(),
        out.display().to_string(),
        "--scale".into(),
        "2".into(),
        "--seed".into(),
        "7".into(),
    ];
    args.extend(fast());
    args.extend(model_flags());
    let run = restore(&args);
    let err = stderr(&run);
    assert!(
        !run.status.success(),
        "bad inputs make the exit code non-zero: {err}"
    );
    assert!(err.contains("4 done, 0 skipped, 3 failed"), "{err}");
    assert!(
        err.contains("dot.png") && err.contains("1x1"),
        "1x1 input refused with the reason: {err}"
    );
    assert!(
        err.contains("truncated.jpg") && err.contains("truncated"),
        "{err}"
    );
    assert!(
        err.contains("notes.jpg") && err.contains("not an image"),
        "{err}"
    );

    // Good inputs are written at input size x scale, keeping gray, alpha and bit depth.
    let good = image::open(out.join("good_restored.png")).unwrap();
    assert_eq!((good.width(), good.height()), (64, 48));
    let gray = image::open(out.join("gray_restored.png")).unwrap();
    assert_eq!((gray.width(), gray.height()), (40, 32));
    assert_eq!(
        gray.color(),
        image::ColorType::L8,
        "gray input gives a gray (one-channel) output"
    );
    let alpha = image::open(out.join("alpha_restored.png")).unwrap();
    assert_eq!((alpha.width(), alpha.height()), (32, 40));
    assert!(alpha.color().has_alpha(), "alpha carried over");
    let deep = image::open(out.join("deep_restored.png")).unwrap();
    assert_eq!((deep.width(), deep.height()), (48, 32));
    assert_eq!(
        deep.color(),
        image::ColorType::Rgb16,
        "16-bit input gives a 16-bit output"
    );

    // Settings are stored as PNG text.
    let png = std::fs::read(out.join("good_restored.png")).unwrap();
    let text = String::from_utf8_lossy(&png);
    assert!(
        text.contains("pfstorer:seed")
            && text.contains("pfstorer:steps")
            && text.contains("model.safetensors"),
        "metadata present"
    );

    // A second run without --force leaves the outputs untouched and reports them.
    let before = std::fs::read(out.join("good_restored.png")).unwrap();
    let again = restore(&args);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("exists"), "{}", stderr(&again));
    assert_eq!(
        std::fs::read(out.join("good_restored.png")).unwrap(),
        before
    );
    // --skip-existing resumes: nothing failed but the bad inputs.
    let mut skip = args.clone();
    skip.push("--skip-existing".into());
    let resumed = restore(&skip);
    assert!(
        stderr(&resumed).contains("0 done, 4 skipped, 3 failed"),
        "{}",
        stderr(&resumed)
    );
}

#[test]
fn same_seed_same_bytes_other_seed_other_output() {
    let dir = tmp_dir("seed");
    gradient(32, 24).save(dir.join("face.png")).unwrap();
    let run = |seed: &str, out: &str| {
        let mut args = vec![
            dir.join("face.png").display().to_string(),
            "-o".into(),
            dir.join(out).display().to_string(),
            "--seed".into(),
            seed.into(),
            "--scale".into(),
            "2".into(),
        ];
        args.extend(fast());
        args.extend(model_flags());
        let o = restore(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read(dir.join(out)).unwrap()
    };
    let a = run("3", "a.png");
    let b = run("3", "b.png");
    let c = run("4", "c.png");
    assert_eq!(a, b, "same seed, same bytes");
    assert_ne!(a, c, "another seed, another output");
}

#[test]
fn clear_errors_for_unsupported_or_missing_things() {
    let dir = tmp_dir("errors");
    gradient(16, 16).save(dir.join("face.png")).unwrap();
    let input = dir.join("face.png").display().to_string();

    // An identity name that is not stored: one line naming it.
    let o = Command::new(env!("CARGO_BIN_EXE_pfstorer"))
        .args(["restore", &input, "--id", "me"])
        .args(model_flags())
        .env("PFSTORER_HOME", dir.join("home"))
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("identity \"me\" not found"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // No --base and no network/cache: one line naming the file and the flag.
    let o = Command::new(env!("CARGO_BIN_EXE_pfstorer"))
        .args(["restore", &input, "--quiet"])
        .env("HF_HOME", dir.join("hf"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("face_stablesr_000050.ckpt") && err.contains("--base"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // An overlap as large as the latent tile (input size / the fixture VAE's factor) is refused.
    let tile = common::fast_latent_tile();
    let mut args = vec![
        input,
        "--tile-overlap".into(),
        tile.to_string(),
        "--input-size".into(),
        common::FAST_INPUT_SIZE.to_string(),
    ];
    args.extend(model_flags());
    let o = restore(&args);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!("--tile-overlap {tile}")),
        "{}",
        stderr(&o)
    );

    // No tiles per call, an unknown device or precision: one line naming the flag, before any
    // file is read.
    for (flag, value, says) in [
        ("--tile-batch", "0", "--tile-batch 0"),
        ("--device", "gpu", "--device"),
        ("--dtype", "f8", "--dtype"),
    ] {
        let o = restore(&[
            dir.join("face.png").display().to_string(),
            flag.into(),
            value.into(),
        ]);
        let err = stderr(&o);
        assert!(!o.status.success(), "{flag} {value}");
        assert!(err.contains(says), "{flag} {value}: {err}");
        assert!(err.contains(value), "{flag} {value}: {err}");
    }
}

#[test]
fn large_output_goes_through_pixel_patches_and_latent_tiles() {
    // Small patches and tiles so that both tiling levels run in test time: a 400x300 output in
    // 128-px patches (stride 100), each a canvas of 128/f latents in tiles of 64/f latents (f the
    // fixture VAE's factor; 16x16 canvases of 8-latent tiles for f = 8). The full-size
    // 2048x1536 case is measured in the README's performance notes.
    let dir = tmp_dir("large");
    gradient(100, 75).save(dir.join("big.png")).unwrap();
    let out = dir.join("big_out.png");
    let mut args = vec![
        dir.join("big.png").display().to_string(),
        "-o".into(),
        out.display().to_string(),
        "--scale".into(),
        "4".into(),
    ];
    let overlap = (common::fast_latent_tile() / 2).to_string();
    args.extend(
        [
            "--steps",
            "1",
            "--input-size",
            "64",
            "--tile-overlap",
            &overlap,
            "--patch-size",
            "128",
            "--patch-stride",
            "100",
            "--tile-batch",
            "4",
            "-v",
            "--faces",
            "whole",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.extend(model_flags());
    let o = restore(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    // The work is announced before sampling, counted here window by window: 400x300 padded to
    // 416x320, 128-px patches every 100 px, canvases of 128/f latents in 64/f tiles every 32/f.
    let f = common::tiny_config().vae.downsample_factor();
    let patches = walk_windows(416, 128, 100) * walk_windows(320, 128, 100);
    let tile = common::fast_latent_tile();
    let tiles = walk_windows(128 / f, tile, tile - tile / 2).pow(2);
    let calls = patches * tiles.div_ceil(4);
    let plan = format!("big.png: 400x300 output, 1 step x {patches} patches");
    let work = format!(
        "work: {patches} patches x {tiles} latent tiles x 1 step = {} UNet passes (x2 for CFG), in {calls} UNet calls of up to 4 tiles",
        2 * patches * tiles
    );
    let err = stderr(&o);
    assert!(err.contains(&plan), "expected `{plan}` in:\n{err}");
    assert!(err.contains(&work), "-v: expected `{work}` in:\n{err}");
    if !candle_core::utils::cuda_is_available() {
        assert!(err.contains(&format!("{plan}; cpu, f32")), "{err}");
        assert!(
            err.contains("device: cpu (this build has no CUDA); dtype: f32 (auto on the CPU)"),
            "{err}"
        );
    }
    assert!(
        err.contains("sampling will take about")
            && err.contains(&format!("(1 step x {patches} patches)")),
        "projection after the first step: {err}"
    );
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (400, 300));
    // Blending leaves no step at the patch borders: neighbouring columns there differ about as
    // much as anywhere else.
    let col_diff = |x: u32| -> f64 {
        (0..img.height())
            .map(|y| (img.get_pixel(x, y)[1] as f64 - img.get_pixel(x + 1, y)[1] as f64).abs())
            .sum::<f64>()
            / img.height() as f64
    };
    let mean: f64 = (0..img.width() - 1).map(col_diff).sum::<f64>() / (img.width() - 1) as f64;
    for border in [127u32, 227, 271, 327] {
        assert!(
            col_diff(border) < 3.0 * mean + 4.0,
            "seam at column {border}: {} vs mean {mean}",
            col_diff(border)
        );
    }
}

/// `--residency staged` (each stage loads its networks and frees them) writes the bytes
/// `--residency resident` writes, through pixel patches too; a CFW checkpoint that does not fit
/// is refused before any image is read, naming the file, in both modes.
#[test]
fn staged_and_resident_networks_write_the_same_bytes() {
    let dir = tmp_dir("residency");
    gradient(40, 30).save(dir.join("face.png")).unwrap();
    let run = |residency: &str, out: &str, cfw: Option<&Path>| {
        let mut args = vec![
            dir.join("face.png").display().to_string(),
            "-o".into(),
            dir.join(out).display().to_string(),
            "--scale".into(),
            "4".into(),
            "--residency".into(),
            residency.into(),
            "--patch-size".into(),
            "128".into(),
            "--patch-stride".into(),
            "100".into(),
        ];
        args.extend(fast());
        args.extend(model_flags());
        if let Some(cfw) = cfw {
            let at = args.iter().position(|a| a == "--cfw").unwrap();
            args[at + 1] = cfw.display().to_string();
        }
        restore(&args)
    };
    let staged = run("staged", "staged.png", None);
    assert!(staged.status.success(), "{}", stderr(&staged));
    let resident = run("resident", "resident.png", None);
    assert!(resident.status.success(), "{}", stderr(&resident));
    let patches = walk_windows(160, 128, 100) * walk_windows(128, 128, 100);
    assert!(
        stderr(&staged).contains(&format!("{patches} patches")),
        "{}",
        stderr(&staged)
    );
    assert_eq!(
        std::fs::read(dir.join("staged.png")).unwrap(),
        std::fs::read(dir.join("resident.png")).unwrap(),
        "staged == resident"
    );

    // The diffusion checkpoint given as the CFW one: refused up front, nothing written.
    let wrong = common::fixture("stablesr/model.safetensors");
    for residency in ["staged", "resident"] {
        let out = format!("wrong-{residency}.png");
        let o = run(residency, &out, Some(&wrong));
        assert!(!o.status.success(), "{residency}");
        let err = stderr(&o);
        assert!(
            err.contains(&wrong.display().to_string()) && err.contains("missing"),
            "{residency}: {err}"
        );
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{residency}: one error line: {err}");
        assert!(
            !err.contains("work:"),
            "{residency}: refused before any image: {err}"
        );
        assert!(!dir.join(&out).exists());
    }

    let o = run("sometimes", "never.png", None);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--residency"), "{}", stderr(&o));
}
