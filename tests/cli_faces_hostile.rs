//! Hostile photos through the whole-photo path, on the tiny model: a crowd is bounded by
//! --max-faces (also one of 500 small faces), a face cut by the corner and a face rotated by 30
//! degrees restore, a 1x1 image and a 20000x20000-claiming header are one line each, and
//! nothing is written but the outputs. The synthetic photos are made of the fixture's face chip,
//! so another fixture set runs other faces.

mod common;

use common::faces::{face_chip, pfstorer, restore_args, stderr};
use pfstorer::faces::align::{align, Template, FACEXLIB_BORDER_RGB};
use pfstorer::faces::retinaface::{DetectOptions, RetinaFace};
use pfstorer::imaging::io::quantize_u8;
use std::path::{Path, PathBuf};

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
