//! Whole photos end to end on the tiny model: `restore --faces each` finds every face, restores
//! each on an aligned crop and pastes it back over the Lanczos background; `--face` restricts;
//! a face-free photo is the background upscale with a note; `faces --json` lists what restore
//! numbers; a face-free reference is refused by `personalize`; a face rotated by 30 degrees is
//! cut upright; a photo of 500 small faces is bounded by --max-faces. The photo is the
//! fixture's image with the most faces (detect/detect.json), and the synthetic photos are made
//! from the fixture's face chip, so another fixture set runs other photos.

mod common;

use pfstorer::faces::align::{align, Template, FACEXLIB_BORDER_RGB};
use pfstorer::faces::paste::{paste_mask, upscale_background};
use pfstorer::faces::retinaface::{DetectOptions, RetinaFace};
use pfstorer::faces::select::number_faces;
use pfstorer::imaging::io::{load_image, quantize_u8};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const THRESHOLD: f32 = 0.9;

fn pfstorer(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pfstorer"))
        .args(args)
        .output()
        .expect("run pfstorer")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The detect/ image with the most faces at threshold 0.9, and that count.
fn group_photo() -> (PathBuf, usize) {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("faces/detect/detect.json")).unwrap(),
    )
    .unwrap();
    json["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|im| {
            let name = im["image"].as_str().unwrap();
            let count = im["thr_0.9"]["count"].as_u64().unwrap() as usize;
            (common::fixture(&format!("faces/detect/{name}")), count)
        })
        .max_by_key(|(_, n)| *n)
        .unwrap()
}

fn face_flags() -> Vec<String> {
    [
        "--face-threshold",
        &THRESHOLD.to_string(),
        "--min-face",
        "0",
        "--max-faces",
        "1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn restore_args(input: &Path, output: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "restore".to_string(),
        input.display().to_string(),
        "-o".into(),
        output.display().to_string(),
        "-s".into(),
        "2".into(),
        "--faces".into(),
        "each".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(face_flags());
    args.extend(common::fast_sampling_flags());
    args.extend(common::model_flags());
    args
}

/// The 8-bit samples of an RGB image.
fn quantized(img: &pfstorer::imaging::ImageF32) -> Vec<u8> {
    img.data.iter().map(|&v| quantize_u8(v)).collect()
}

#[test]
fn every_face_is_restored_and_pasted_over_the_lanczos_background() {
    let (photo, expected_faces) = group_photo();
    assert!(expected_faces >= 2, "the fixture photo needs faces");
    let dir = common::scratch("faces-each");
    let out = dir.join("out.png");
    let (saved, shown) = (dir.join("saved"), dir.join("shown.png"));
    let (saved_s, shown_s) = (saved.display().to_string(), shown.display().to_string());
    let o = pfstorer(&restore_args(
        &photo,
        &out,
        &["--save-faces", &saved_s, "--show-faces", &shown_s],
    ));
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");

    // The library's own detection, numbering and masks, as the CLI uses them.
    let rgb = load_image(&photo).unwrap().rgb;
    let detector = RetinaFace::load_embedded(&candle_core::Device::Cpu).unwrap();
    let opts = DetectOptions {
        score_threshold: THRESHOLD,
        ..DetectOptions::default()
    };
    let (faces, _) = number_faces(&detector.detect(&rgb, &opts).unwrap(), 0.0);
    assert_eq!(
        faces.len(),
        expected_faces,
        "the fixture's count at {THRESHOLD}"
    );
    assert!(
        err.contains(&format!("{} faces restored", faces.len())),
        "summary: {err}"
    );
    // --save-faces: each face's input crop and restoration, at the crop size; --show-faces: the
    // photo with the numbered boxes, at the photo's size.
    let stem = photo.file_stem().unwrap().to_string_lossy().into_owned();
    for sub in ["cropped_faces", "restored_faces"] {
        for face in &faces {
            let f = saved
                .join(sub)
                .join(format!("{stem}_{:02}.png", face.index));
            let img = image::open(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert_eq!(
                (img.width(), img.height()),
                (
                    common::FAST_INPUT_SIZE as u32,
                    common::FAST_INPUT_SIZE as u32
                )
            );
        }
    }
    let drawn = image::open(&shown).unwrap();
    assert_eq!(
        (drawn.width() as usize, drawn.height() as usize),
        (rgb.width, rgb.height)
    );
    let result = load_image(&out).unwrap().rgb;
    assert_eq!(
        (result.width, result.height),
        (2 * rgb.width, 2 * rgb.height)
    );
    let background = quantized(&upscale_background(&rgb, 2).unwrap());
    let got = quantized(&result);
    let native = common::FAST_INPUT_SIZE;
    let template = Template::ffhq(native).unwrap();
    let mut covered = vec![false; result.width * result.height];
    let mut changed_faces = 0;
    for face in &faces {
        let aligned = align(
            &rgb,
            &face.detection.landmarks,
            &template,
            &FACEXLIB_BORDER_RGB,
        )
        .unwrap();
        let mask = paste_mask(&aligned, 2).unwrap();
        let w = mask.window;
        let (mut diff, mut n) = (0f64, 0usize);
        for j in 0..w.height {
            for i in 0..w.width {
                let soft = mask.soft[j * w.width + i];
                let p = (w.y0 + j) * result.width + w.x0 + i;
                if soft > 0.0 {
                    covered[p] = true;
                }
                if soft > 0.99 {
                    for c in 0..3 {
                        diff += (got[p * 3 + c] as f64 - background[p * 3 + c] as f64).abs();
                    }
                    n += 3;
                }
            }
        }
        if n > 0 && diff / n as f64 > 1.0 {
            changed_faces += 1;
        }
    }
    assert_eq!(changed_faces, faces.len(), "every face region changed");
    let mut outside = 0usize;
    for (p, &c) in covered.iter().enumerate() {
        if !c {
            outside += 1;
            assert_eq!(
                &got[p * 3..p * 3 + 3],
                &background[p * 3..p * 3 + 3],
                "pixel {p} outside every face mask differs from the Lanczos background"
            );
        }
    }
    assert!(outside > 0);

    // All faces in one UNet batch give the photo of one face a call (rounding aside).
    assert!(
        !err.contains("per UNet call"),
        "one face a call on the CPU: {err}"
    );
    let batched = dir.join("batched.png");
    let per_call = faces.len().to_string();
    let o = pfstorer(&restore_args(
        &photo,
        &batched,
        &["--tile-batch", &per_call],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("(up to {per_call} per UNet call)")),
        "{}",
        stderr(&o)
    );
    // The projection comes also when the first step finishes several faces at once.
    assert!(stderr(&o).contains("first step"), "{}", stderr(&o));
    let together = quantized(&load_image(&batched).unwrap().rgb);
    let worst = together
        .iter()
        .zip(&got)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(
        worst <= 1,
        "faces batched together differ by {worst} levels"
    );

    // --face restricts: only face 1 differs from the background.
    let one = dir.join("one.png");
    let o = pfstorer(&restore_args(&photo, &one, &["--face", "1"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("1 face restored"), "{}", stderr(&o));
    let single = quantized(&load_image(&one).unwrap().rgb);
    let other = &faces[faces.len() - 1];
    let aligned = align(
        &rgb,
        &other.detection.landmarks,
        &template,
        &FACEXLIB_BORDER_RGB,
    )
    .unwrap();
    let mask = paste_mask(&aligned, 2).unwrap();
    let first = align(
        &rgb,
        &faces[0].detection.landmarks,
        &template,
        &FACEXLIB_BORDER_RGB,
    )
    .unwrap();
    let first_mask = paste_mask(&first, 2).unwrap();
    let w = mask.window;
    for j in 0..w.height {
        for i in 0..w.width {
            let (x, y) = (w.x0 + i, w.y0 + j);
            let in_first = x >= first_mask.window.x0
                && y >= first_mask.window.y0
                && x < first_mask.window.x0 + first_mask.window.width
                && y < first_mask.window.y0 + first_mask.window.height;
            if !in_first {
                let p = y * result.width + x;
                assert_eq!(&single[p * 3..p * 3 + 3], &background[p * 3..p * 3 + 3]);
            }
        }
    }
    // A face number the photo does not have is one line.
    let o = pfstorer(&restore_args(
        &photo,
        &dir.join("x.png"),
        &["--face", "999"],
    ));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--face 999"), "{}", stderr(&o));

    // `faces --json` numbers the same faces.
    let mut args = vec![
        "faces".to_string(),
        photo.display().to_string(),
        "--json".into(),
    ];
    args.extend(face_flags());
    let o = pfstorer(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let listed = json[0]["faces"].as_array().unwrap();
    assert_eq!(listed.len(), faces.len());
    for (f, l) in faces.iter().zip(listed) {
        assert_eq!(l["index"].as_u64().unwrap() as usize, f.index);
        let b: Vec<f32> = serde_json::from_value(l["box"].clone()).unwrap();
        assert_eq!(b, f.detection.bbox.to_vec());
        assert_eq!(l["landmarks"].as_array().unwrap().len(), 5);
    }
}

/// `eval` of a whole-photo restore against its photo: PSNR, SSIM and the dlib-ID distance.
#[test]
fn eval_reports_the_dlib_id_distance_of_restored_faces() {
    let (photo, _) = group_photo();
    let dir = common::scratch("faces-eval");
    let (restored, gt) = (dir.join("restored"), dir.join("gt"));
    std::fs::create_dir_all(&restored).unwrap();
    std::fs::create_dir_all(&gt).unwrap();
    std::fs::copy(&photo, gt.join("group.png")).unwrap();
    let mut args = restore_args(&photo, &restored.join("group.png"), &[]);
    let s = args.iter().position(|a| a == "-s").unwrap();
    args[s + 1] = "1".into();
    let o = pfstorer(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = pfstorer(&[
        "eval".to_string(),
        "--restored".into(),
        restored.display().to_string(),
        "--gt".into(),
        gt.display().to_string(),
        "--format".into(),
        "json".into(),
        "-q".into(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let text = json.to_string();
    for metric in ["psnr", "ssim", "dlib-id-distance"] {
        assert!(text.contains(metric), "{metric} in {text}");
    }
    let err = stderr(&o);
    let mean = err
        .split("mean dlib-id-distance ")
        .nth(1)
        .and_then(|t| t.split([',', '\n']).next())
        .and_then(|t| t.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no dlib-ID mean in: {err}"));
    // Random tiny weights paint noise over the faces: a distance, finite and positive.
    assert!(mean.is_finite() && mean > 0.0, "{mean}");
}

#[test]
fn a_photo_without_faces_is_the_background_upscale_with_a_note() {
    let dir = common::scratch("faces-none");
    let input = dir.join("wall.png");
    image::RgbImage::from_fn(150, 100, |x, y| {
        image::Rgb([(x * 3 % 256) as u8, (y * 5 % 256) as u8, 120])
    })
    .save(&input)
    .unwrap();
    let out = dir.join("wall_out.png");
    let o = pfstorer(&restore_args(&input, &out, &[]));
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("no face found"), "{err}");
    let rgb = load_image(&input).unwrap().rgb;
    let want = quantized(&upscale_background(&rgb, 2).unwrap());
    assert_eq!(quantized(&load_image(&out).unwrap().rgb), want);
}

#[test]
fn a_reference_without_a_face_is_refused() {
    let dir = common::scratch("faces-ref");
    let (photo, _) = group_photo();
    let mut refs = Vec::new();
    for k in 0..3u32 {
        let path = dir.join(format!("r{k}.png"));
        if k == 1 {
            image::RgbImage::from_fn(96, 96, |x, y| image::Rgb([(x + k) as u8, y as u8, 90]))
                .save(&path)
                .unwrap();
        } else {
            std::fs::copy(&photo, &path).unwrap();
            // Distinct contents: a changed pixel.
            let mut img = image::open(&path).unwrap().to_rgb8();
            img.put_pixel(0, 0, image::Rgb([k as u8, 0, 0]));
            img.save(&path).unwrap();
        }
        refs.push(path.display().to_string());
    }
    let mut args = vec!["personalize".to_string(), "--refs".into()];
    args.extend(refs);
    args.extend(["--id".into(), "x".into(), "--steps".into(), "1".into()]);
    args.extend([
        "-o".into(),
        dir.join("x.identity.safetensors").display().to_string(),
    ]);
    args.extend(common::model_flags());
    let o = pfstorer(&args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("r1.png: no face found"), "{err}");
    assert!(!dir.join("x.identity.safetensors").exists());
}

/// The first chip of identity/ (a face that fills a 150x150 image).
fn face_chip() -> image::RgbImage {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("faces/identity/identity.json")).unwrap(),
    )
    .unwrap();
    let file = json["chips"][0]["file"].as_str().unwrap().to_string();
    image::open(common::fixture(&format!("faces/identity/{file}")))
        .unwrap()
        .to_rgb8()
}

/// Hostile photos for the face path: a crowd is bounded by --max-faces, a face cut by the
/// corner is restored, a 1x1 image and a 20000x20000-claiming header are one line each; nothing
/// is written but the outputs.
#[test]
fn crowds_corners_and_absurd_photos() {
    let dir = common::scratch("faces-hostile");
    let chip = face_chip();
    let small = image::imageops::resize(&chip, 48, 48, image::imageops::FilterType::Triangle);
    let mut crowd = image::RgbImage::from_pixel(600, 400, image::Rgb([128, 124, 120]));
    for gy in 0..7 {
        for gx in 0..11 {
            image::imageops::overlay(&mut crowd, &small, 8 + gx * 54, 8 + gy * 56);
        }
    }
    let crowd_path = dir.join("crowd.png");
    crowd.save(&crowd_path).unwrap();
    let mut corner = image::RgbImage::from_pixel(220, 200, image::Rgb([128, 124, 120]));
    let big = image::imageops::resize(&chip, 180, 180, image::imageops::FilterType::Triangle);
    image::imageops::overlay(&mut corner, &big, -40, -30);
    let corner_path = dir.join("corner.png");
    corner.save(&corner_path).unwrap();
    image::RgbImage::new(1, 1)
        .save(dir.join("dot.png"))
        .unwrap();
    // A PNG whose header claims 20000x20000 pixels, with no image data behind it.
    let mut claim = Vec::new();
    claim.extend_from_slice(b"\x89PNG\r\n\x1a\n");
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(b"IHDR");
    ihdr.extend_from_slice(&20000u32.to_be_bytes());
    ihdr.extend_from_slice(&20000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    claim.extend_from_slice(&13u32.to_be_bytes());
    claim.extend_from_slice(&ihdr);
    claim.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    for chunk in [&b"IDAT"[..], &b"IEND"[..]] {
        claim.extend_from_slice(&0u32.to_be_bytes());
        claim.extend_from_slice(chunk);
        claim.extend_from_slice(&crc32(chunk).to_be_bytes());
    }
    std::fs::write(dir.join("claim.png"), &claim).unwrap();
    let before: Vec<PathBuf> = list(&dir);

    let out = dir.join("out");
    let mut args = vec![
        "restore".to_string(),
        dir.display().to_string(),
        "-o".into(),
    ];
    args.push(out.display().to_string());
    args.extend(
        [
            "-s",
            "1",
            "--faces",
            "each",
            "--face-threshold",
            "0.5",
            "--max-faces",
            "5",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.extend(common::fast_sampling_flags());
    args.extend(common::model_flags());
    let o = pfstorer(&args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "two inputs fail: {err}");
    assert!(err.contains("2 done, 0 skipped, 2 failed"), "{err}");
    assert!(err.contains("at least 8x8"), "{err}");
    assert!(
        err.contains("20000x20000") && err.contains("more than the limit"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // The crowd: at most 5 faces restored, the rest named as skipped.
    let crowd_line = err
        .lines()
        .find(|l| l.contains("crowd.png ->"))
        .unwrap_or_else(|| panic!("{err}"));
    let n: usize = crowd_line
        .rsplit(", ")
        .next()
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("face count in {crowd_line}"));
    assert!(n <= 5, "{crowd_line}");
    if err.contains("crowd.png: ") && n == 5 {
        assert!(
            err.contains("skipped: --max-faces 5 keeps the largest"),
            "{err}"
        );
    }
    let corner_out = image::open(out.join("corner_restored.png")).unwrap();
    assert_eq!((corner_out.width(), corner_out.height()), (220, 200));
    // Nothing but the two outputs was written.
    let mut after = list(&dir);
    after.retain(|p| !p.starts_with(&out));
    assert_eq!(after, before);
    assert_eq!(list(&out).len(), 2);
}

fn list(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(list(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// CRC-32 (PNG's) of `bytes`.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The fixture's face chip as an RGB image in [0, 1], resized to `side`.
fn chip_image(side: u32) -> pfstorer::imaging::ImageF32 {
    let small = image::imageops::resize(
        &face_chip(),
        side,
        side,
        image::imageops::FilterType::Triangle,
    );
    let data = small
        .pixels()
        .flat_map(|p| p.0.map(|v| v as f32 / 255.0))
        .collect();
    pfstorer::imaging::ImageF32::new(side as usize, side as usize, 3, data)
}

/// A grey `width x height` photo.
fn grey_photo(width: usize, height: usize) -> pfstorer::imaging::ImageF32 {
    let grey = [128.0 / 255.0, 124.0 / 255.0, 120.0 / 255.0];
    let data: Vec<f32> = (0..width * height).flat_map(|_| grey).collect();
    pfstorer::imaging::ImageF32::new(width, height, 3, data)
}

/// Pastes `face` into `photo` with its top left corner at `(x0, y0)`.
fn paste_at(
    photo: &mut pfstorer::imaging::ImageF32,
    face: &pfstorer::imaging::ImageF32,
    x0: usize,
    y0: usize,
) {
    for y in 0..face.height {
        let from = y * face.width * 3;
        let to = ((y0 + y) * photo.width + x0) * 3;
        photo.data[to..to + face.width * 3]
            .copy_from_slice(&face.data[from..from + face.width * 3]);
    }
}

/// A rotated face is detected and its aligned crop is upright: the crop cut from the photo
/// rotated by 30 degrees matches the upright photo's crop far better than the rotated photo
/// cut with the upright face's transform does, and the fitted rotation is the photo's.
/// `restore` then restores it like any face.
#[test]
fn a_rotated_face_is_aligned_upright_and_restored() {
    use pfstorer::imaging::warp::{warp_affine, SourceCoords};
    let (w, h) = (320usize, 300usize);
    let mut upright = grey_photo(w, h);
    paste_at(&mut upright, &chip_image(160), 80, 70);
    let (cx, cy) = (160.0f64, 150.0f64);
    let angle = 30f64.to_radians();
    let (s, c) = angle.sin_cos();
    // Destination = R (source - centre) + centre: the face turns by 30 degrees in the photo.
    let rotation = [[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy]];
    let grey = [128.0 / 255.0, 124.0 / 255.0, 120.0 / 255.0];
    let rotated = warp_affine(&upright, &rotation, w, h, &grey, SourceCoords::F64).unwrap();

    let detector = RetinaFace::load_embedded(&candle_core::Device::Cpu).unwrap();
    let opts = DetectOptions {
        score_threshold: 0.5,
        ..DetectOptions::default()
    };
    let largest = |img: &pfstorer::imaging::ImageF32| {
        let found = detector.detect(img, &opts).unwrap();
        assert!(!found.is_empty(), "no face found");
        found
            .into_iter()
            .max_by(|a, b| (a.bbox[2] - a.bbox[0]).total_cmp(&(b.bbox[2] - b.bbox[0])))
            .unwrap()
    };
    let (face_up, face_rot) = (largest(&upright), largest(&rotated));
    let template = Template::ffhq(128).unwrap();
    let border = FACEXLIB_BORDER_RGB;
    let crop_up = align(&upright, &face_up.landmarks, &template, &border).unwrap();
    let crop_rot = align(&rotated, &face_rot.landmarks, &template, &border).unwrap();
    let naive = warp_affine(
        &rotated,
        &crop_up.matrix,
        128,
        128,
        &border,
        SourceCoords::F32,
    )
    .unwrap();
    let mad = |a: &pfstorer::imaging::ImageF32| {
        a.data
            .iter()
            .zip(&crop_up.crop.data)
            .map(|(x, y)| (x - y).abs() as f64)
            .sum::<f64>()
            / a.data.len() as f64
    };
    let (aligned_diff, naive_diff) = (mad(&crop_rot.crop), mad(&naive));
    let turn = |m: &[[f64; 3]; 2]| m[1][0].atan2(m[0][0]).to_degrees();
    let fitted = turn(&crop_up.matrix) - turn(&crop_rot.matrix);
    println!(
        "rotated 30 deg: fitted turn {fitted:.1} deg; crop vs upright crop {aligned_diff:.4}, unaligned {naive_diff:.4}"
    );
    assert!(
        (fitted - 30.0).abs() < 6.0,
        "fitted rotation {fitted} degrees"
    );
    assert!(
        aligned_diff < 0.5 * naive_diff,
        "aligned crop {aligned_diff} vs unaligned {naive_diff}"
    );

    let dir = common::scratch("faces-rotated");
    let input = dir.join("rotated.png");
    let bytes: Vec<u8> = rotated.data.iter().map(|&v| quantize_u8(v)).collect();
    image::RgbImage::from_raw(w as u32, h as u32, bytes)
        .unwrap()
        .save(&input)
        .unwrap();
    let out = dir.join("out.png");
    let mut args = restore_args(&input, &out, &[]);
    common::hostile::set_flag(&mut args, "-s", "1");
    common::hostile::set_flag(&mut args, "--face-threshold", "0.5");
    let o = pfstorer(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("1 face restored"), "{}", stderr(&o));
    let restored = image::open(&out).unwrap();
    assert_eq!(
        (restored.width() as usize, restored.height() as usize),
        (w, h)
    );
}

/// A photo of 500 small faces: every one is found, the default --max-faces restores the largest
/// and names how many it skipped, within the time and memory bounds of a tiny-model restore.
#[test]
fn a_crowd_of_five_hundred_small_faces_is_bounded() {
    use pfstorer::cli::face_args::DEFAULT_MAX_FACES;
    let (side, cols, rows) = (32usize, 25usize, 20usize);
    let step = side + 4;
    let (w, h) = (cols * step + 8, rows * step + 8);
    let face = chip_image(side as u32);
    let mut crowd = grey_photo(w, h);
    for gy in 0..rows {
        for gx in 0..cols {
            paste_at(&mut crowd, &face, 4 + gx * step, 4 + gy * step);
        }
    }
    let dir = common::scratch("faces-crowd");
    let input = dir.join("crowd.png");
    let bytes: Vec<u8> = crowd.data.iter().map(|&v| quantize_u8(v)).collect();
    image::RgbImage::from_raw(w as u32, h as u32, bytes)
        .unwrap()
        .save(&input)
        .unwrap();
    let home = dir.join("home");
    let mut args = vec![
        "faces".to_string(),
        input.display().to_string(),
        "--json".into(),
    ];
    args.extend(common::hostile::strings(&[
        "--face-threshold",
        "0.5",
        "--min-face",
        "0",
    ]));
    let done = common::hostile::run_within(&home, &args, common::hostile::FULL_RUN);
    assert!(done.output.status.success());
    common::hostile::assert_peak_within(&done);
    let json: serde_json::Value = serde_json::from_slice(&done.output.stdout).unwrap();
    let found = json[0]["faces"].as_array().unwrap().len();
    println!("{found} of {} faces found", cols * rows);
    assert!(
        found > DEFAULT_MAX_FACES,
        "a crowd needs more than {DEFAULT_MAX_FACES} faces found: {found}"
    );

    let out = dir.join("out.png");
    let mut args = restore_args(&input, &out, &[]);
    common::hostile::set_flag(&mut args, "-s", "1");
    common::hostile::set_flag(&mut args, "--face-threshold", "0.5");
    common::hostile::set_flag(&mut args, "--max-faces", &DEFAULT_MAX_FACES.to_string());
    let done = common::hostile::run_within(&home, &args, common::hostile::FULL_RUN);
    let err = stderr(&done.output);
    assert!(done.output.status.success(), "{err}");
    common::hostile::assert_peak_within(&done);
    assert!(
        err.contains(&format!(
            "{} more faces skipped: --max-faces {DEFAULT_MAX_FACES} keeps the largest",
            found - DEFAULT_MAX_FACES
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{DEFAULT_MAX_FACES} faces restored")),
        "{err}"
    );
}

/// `faces --show` never overwrites a picture without --force, says so on stderr (a script's
/// log, not only the table on stdout) before reading the photo, and writes it with --force.
#[test]
fn faces_show_refuses_an_existing_picture_on_stderr() {
    let (photo, _) = group_photo();
    let dir = common::scratch("faces-show-exists");
    let shown = dir.join("shown.png");
    std::fs::write(&shown, b"keep me").unwrap();
    let args = |force: bool| {
        let mut a = vec![
            "faces".to_string(),
            photo.display().to_string(),
            "--show".into(),
            shown.display().to_string(),
        ];
        if force {
            a.push("--force".into());
        }
        a
    };
    let o = pfstorer(&args(false));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("shown.png: already exists"), "{err}");
    assert_eq!(std::fs::read(&shown).unwrap(), b"keep me");
    let o = pfstorer(&args(true));
    assert!(o.status.success(), "{}", stderr(&o));
    let drawn = image::open(&shown).unwrap();
    let rgb = load_image(&photo).unwrap().rgb;
    assert_eq!(
        (drawn.width() as usize, drawn.height() as usize),
        (rgb.width, rgb.height)
    );
}

/// `restore --show-faces` and `--save-faces` never replace a file without --force, and say so
/// before any face is restored (the photo's output is not written either); with --force they do.
#[test]
fn restore_face_pictures_never_replace_files_without_force() {
    let (photo, _) = group_photo();
    let stem = photo.file_stem().unwrap().to_string_lossy().into_owned();
    let dir = common::scratch("faces-pictures-exist");
    let (out, shown, saved) = (
        dir.join("out.png"),
        dir.join("shown.png"),
        dir.join("saved"),
    );
    let kept = saved.join("restored_faces").join(format!("{stem}_01.png"));
    std::fs::create_dir_all(kept.parent().unwrap()).unwrap();
    std::fs::write(&kept, b"keep me").unwrap();
    std::fs::write(&shown, b"keep me too").unwrap();
    let (shown_s, saved_s) = (shown.display().to_string(), saved.display().to_string());
    let fresh = dir.join("fresh.png").display().to_string();
    for (flags, name) in [
        (vec!["--show-faces", &shown_s], "shown.png"),
        (
            vec!["--save-faces", &saved_s, "--show-faces", &fresh],
            "_01.png",
        ),
    ] {
        let mut extra = vec!["--face", "1"];
        extra.extend(flags);
        let o = pfstorer(&restore_args(&photo, &out, &extra));
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains(name) && err.contains("already exists"),
            "{err}"
        );
        assert!(!err.contains("first step"), "refused after sampling: {err}");
        assert!(!out.exists(), "the photo was written");
    }
    assert_eq!(std::fs::read(&kept).unwrap(), b"keep me");
    assert_eq!(std::fs::read(&shown).unwrap(), b"keep me too");
    assert!(
        !dir.join("fresh.png").exists(),
        "nothing written by a refused photo"
    );
    let mut extra = vec!["--face", "1", "--force", "--save-faces", &saved_s];
    extra.extend(["--show-faces", &shown_s]);
    let o = pfstorer(&restore_args(&photo, &out, &extra));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(image::open(&kept).is_ok() && image::open(&shown).is_ok());
}
