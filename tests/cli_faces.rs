//! Whole photos end to end on the tiny model: `restore --faces each` finds every face, restores
//! each on an aligned crop and pastes it back over the Lanczos background; `--face` restricts;
//! a face-free photo is the background upscale with a note; `faces --json` lists what restore
//! numbers; a face-free reference is refused by `personalize`; face pictures never replace a
//! file without --force. The photo is the fixture's image with the most faces
//! (detect/detect.json), so another fixture set runs other photos. Hostile photos (crowds,
//! corners, rotations, absurd sizes) are in `cli_faces_hostile.rs`.

mod common;

use common::faces::{
    face_flags, group_photo, pfstorer, quantized, restore_args, stderr, THRESHOLD,
};
use pfstorer::faces::align::{align, Template, FACEXLIB_BORDER_RGB};
use pfstorer::faces::paste::{paste_mask, upscale_background};
use pfstorer::faces::retinaface::{DetectOptions, RetinaFace};
use pfstorer::faces::select::number_faces;
use pfstorer::imaging::io::load_image;

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
