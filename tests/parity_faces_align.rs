//! Parity of face alignment (similarity fit + bilinear warp) and facexlib paste-back against the
//! `faces/align` and `faces/paste` fixtures (OpenCV 5.1 / facexlib 0.3.0 on CPU; the READMEs
//! give the algorithm and the tolerances). Every face, case and mask is read from the fixture
//! json/safetensors, so a fixture set with other photos, sizes and face counts runs unchanged.
//!
//! 8-bit emulation in the tests: the reference works on uint8 arrays. Crops are compared after
//! rounding our f32 crop to 8 bits (as OpenCV rounds); the paste background is the Lanczos
//! upscale rounded to 8 bits and the restored face is `255 − crop` on the rounded crop (both
//! uint8 in the reference; OpenCV's 8-bit Lanczos is reproduced exactly by
//! `resize_cv2_lanczos4_8bit`), and so is the warped-back face (`inv_restored`): the composite is
//! built from `paste_mask` → `warp_back` → (8-bit rounding) → `blend`, then truncated to 8 bits
//! as facexlib's `astype(uint8)`. `paste` itself, on the float background of
//! `upscale_background` and with the warped face kept in f32, is checked too, within 2 levels
//! (each of the two unrounded inputs may move the truncated result by one).

mod common;

use candle_core::Tensor;
use common::{fixture, get, load};
use pfstorer::faces::align::{align, AlignedFace, Landmarks, Template, FACEXLIB_BORDER_RGB};
use pfstorer::faces::paste::{
    blend, paste, paste_inverse, paste_mask, upscale_background, warp_back,
};
use pfstorer::imaging::io::{load_image, quantize_u8};
use pfstorer::imaging::resize::resize_cv2_lanczos4_8bit;
use pfstorer::imaging::warp::Affine;
use pfstorer::imaging::ImageF32;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// README tolerances: matrices 1e-4 relative, crops and composites ±1 grey level, masks 1e-5.
const MATRIX_REL_TOL: f64 = 1e-4;
const GREY_LEVEL_TOL: i32 = 1;
const MASK_TOL: f32 = 1e-5;

fn json(rel: &str) -> Value {
    let path = fixture(rel);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn json_matrix(v: &Value) -> Affine {
    let row =
        |r: usize| -> [f64; 3] { std::array::from_fn(|c| v[r][c].as_f64().expect("matrix entry")) };
    [row(0), row(1)]
}

fn tensor_matrix(t: &Tensor) -> Affine {
    let rows: Vec<Vec<f32>> = t.to_vec2().unwrap();
    assert_eq!((rows.len(), rows[0].len()), (2, 3), "matrix shape");
    std::array::from_fn(|r| std::array::from_fn(|c| rows[r][c] as f64))
}

fn tensor_landmarks(t: &Tensor) -> Landmarks {
    let rows: Vec<Vec<f32>> = t.to_vec2().unwrap();
    assert_eq!(rows.len(), 5, "five landmarks");
    std::array::from_fn(|i| [rows[i][0], rows[i][1]])
}

/// Max over entries of `|a − b| / max(|b|, 1)`.
fn matrix_rel_err(a: &Affine, b: &Affine) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f64::max)
}

fn assert_matrix(name: &str, a: &Affine, b: &Affine) {
    let err = matrix_rel_err(a, b);
    println!("{name}: max relative error {err:.3e}");
    assert!(err <= MATRIX_REL_TOL, "{name}: {a:?} vs {b:?}");
}

/// The FFHQ template at the fixture's crop size, checked against the template the fixture lists.
fn fixture_template(align_json: &Value) -> Template {
    let size = align_json["size"][0].as_u64().expect("size") as usize;
    assert_eq!(
        align_json["size"][1].as_u64(),
        Some(size as u64),
        "square crops"
    );
    let t = Template::ffhq(size).unwrap();
    for (ours, theirs) in t
        .points
        .iter()
        .zip(align_json["template"].as_array().unwrap())
    {
        for k in 0..2 {
            let v = theirs[k].as_f64().unwrap();
            assert!((ours[k] - v).abs() < 1e-9, "template {ours:?} vs {theirs}");
        }
    }
    t
}

fn to_levels(img: &ImageF32) -> Vec<u8> {
    img.data.iter().map(|&v| quantize_u8(v)).collect()
}

/// Max |a − b| in grey levels and the number of samples that differ.
fn level_diff(a: &[u8], b: &[u8]) -> (i32, usize) {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold((0, 0), |(worst, n), (&x, &y)| {
        let d = (x as i32 - y as i32).abs();
        (worst.max(d), n + (d != 0) as usize)
    })
}

#[test]
fn alignment_matrices_match_the_umeyama_fixture() {
    let aj = json("faces/align/align.json");
    let tensors = load("faces/align/align.safetensors");
    let template = fixture_template(&aj);
    let faces = aj["faces"].as_array().unwrap();
    assert!(!faces.is_empty());
    for f in faces {
        let key = f["key"].as_str().unwrap();
        let lm = tensor_landmarks(get(&tensors, &format!("{key}.landmarks")));
        let from = lm.map(|[x, y]| [x as f64, y as f64]);
        let fit = pfstorer::faces::align::fit_similarity(&from, &template.points).unwrap();
        assert_matrix(&format!("{key} M"), &fit.matrix, &json_matrix(&f["M"]));
        let m_f32 = tensor_matrix(get(&tensors, &format!("{key}.M")));
        assert_matrix(&format!("{key} M (f32 key)"), &fit.matrix, &m_f32);
        let inv = pfstorer::imaging::warp::invert_affine(&fit.matrix).unwrap();
        assert_matrix(&format!("{key} M_inv"), &inv, &json_matrix(&f["M_inv"]));
        let scale = f["scale"].as_f64().unwrap();
        let rms = f["residual_px_rms"].as_f64().unwrap();
        println!(
            "{key}: scale {:.3e} rms {:.3e} abs error",
            (fit.scale - scale).abs(),
            (fit.residual_rms - rms).abs()
        );
        assert!((fit.scale - scale).abs() <= MATRIX_REL_TOL * scale);
        assert!((fit.residual_rms - rms).abs() <= MATRIX_REL_TOL * rms.max(1.0));
    }
}

#[test]
fn aligned_crops_match_opencv_within_one_level() {
    let aj = json("faces/align/align.json");
    let tensors = load("faces/align/align.safetensors");
    let template = fixture_template(&aj);
    let mut photos: HashMap<String, ImageF32> = HashMap::new();
    let mut hash_matches = 0;
    let faces = aj["faces"].as_array().unwrap();
    for f in faces {
        let key = f["key"].as_str().unwrap();
        let image = f["image"].as_str().unwrap();
        let photo = photos.entry(image.to_string()).or_insert_with(|| {
            load_image(fixture(&format!("faces/detect/{image}")))
                .unwrap()
                .rgb
        });
        let lm = tensor_landmarks(get(&tensors, &format!("{key}.landmarks")));
        let face = align(photo, &lm, &template, &FACEXLIB_BORDER_RGB).unwrap();
        let levels = to_levels(&face.crop);
        let bgr: Vec<u8> = levels
            .chunks_exact(3)
            .flat_map(|p| [p[2], p[1], p[0]])
            .collect();
        let sha = format!("{:x}", Sha256::digest(&bgr));
        let same_hash = sha == f["crop_sha256_bgr_hwc"].as_str().unwrap();
        hash_matches += same_hash as usize;
        let n = (levels.len() / 3) as f64;
        for (c, want) in f["crop_mean_bgr"].as_array().unwrap().iter().enumerate() {
            let ours = bgr
                .iter()
                .skip(c)
                .step_by(3)
                .map(|&v| v as f64)
                .sum::<f64>()
                / n;
            let want = want.as_f64().unwrap();
            println!(
                "{key}: mean channel {c} (BGR) {ours:.4} vs {want:.4}, sha256 equal: {same_hash}"
            );
            // ±1 level on a few pixels moves the mean by far less than 0.01 level.
            assert!((ours - want).abs() <= 0.01, "{key} mean channel {c}");
        }
        if let Some(png) = f["crop_png"].as_str() {
            let stored = load_image(fixture(&format!("faces/align/{png}")))
                .unwrap()
                .rgb;
            assert_eq!(
                (stored.width, stored.height),
                (face.crop.width, face.crop.height)
            );
            let (worst, count) = level_diff(&levels, &to_levels(&stored));
            println!("{key}: crop max abs error {worst} levels, {count} samples differ");
            assert!(worst <= GREY_LEVEL_TOL);
        }
    }
    println!(
        "crop sha256 equal for {hash_matches} of {} faces",
        faces.len()
    );
}

/// The face keys `<case>.face<k>` present in the safetensors, in order.
fn case_faces(tensors: &HashMap<String, Tensor>, case: &str) -> Vec<String> {
    (0..)
        .map(|k| format!("{case}.face{k}"))
        .take_while(|p| tensors.contains_key(&format!("{p}.landmarks")))
        .collect()
}

/// Compares one face's masks with the windowed fixture masks and the json statistics.
fn check_masks(
    prefix: &str,
    face: &AlignedFace,
    scale: usize,
    tensors: &HashMap<String, Tensor>,
    stats: Option<&Value>,
) {
    let mask = paste_mask(face, scale).unwrap();
    let out_w = face.source_width * scale;
    let ours_at = |plane: &[f32], x: usize, y: usize| -> f32 {
        let w = mask.window;
        if x >= w.x0 && x < w.x0 + w.width && y >= w.y0 && y < w.y0 + w.height {
            plane[(y - w.y0) * w.width + x - w.x0]
        } else {
            0.0
        }
    };
    if let Some(win) = tensors.get(&format!("{prefix}.mask_window_yx")) {
        let yx: Vec<i64> = win.to_vec1().unwrap();
        let (y0, y1, x0, x1) = (
            yx[0] as usize,
            yx[1] as usize,
            yx[2] as usize,
            yx[3] as usize,
        );
        for (name, plane) in [
            ("inv_mask_erosion", &mask.erosion),
            ("inv_soft_mask", &mask.soft),
        ] {
            let want: Vec<Vec<f32>> = get(tensors, &format!("{prefix}.{name}")).to_vec2().unwrap();
            assert_eq!(
                (want.len(), want[0].len()),
                (y1 - y0, x1 - x0),
                "{name} window"
            );
            let mut worst = 0f32;
            for y in y0..y1 {
                for x in x0..x1 {
                    worst = worst.max((ours_at(plane, x, y) - want[y - y0][x - x0]).abs());
                }
            }
            println!("{prefix}.{name}: max abs error {worst:.3e} over the window");
            assert!(worst <= MASK_TOL);
        }
        // Nothing of ours may lie outside the fixture's window (where the reference is zero).
        let outside = mask.erosion.iter().enumerate().filter(|&(i, &v)| {
            let (x, y) = (
                mask.window.x0 + i % mask.window.width,
                mask.window.y0 + i / mask.window.width,
            );
            v != 0.0 && !(x >= x0 && x < x1 && y >= y0 && y < y1)
        });
        assert_eq!(outside.count(), 0, "mask outside the fixture window");
    }
    let _ = out_w;
    if let Some(s) = stats {
        let area = s["total_face_area"].as_f64().unwrap();
        println!(
            "{prefix}: area {:.6} vs {area:.6}, w_edge {} vs {}",
            mask.area, mask.w_edge, s["w_edge"]
        );
        assert!((mask.area - area).abs() <= 1e-5 * area);
        assert_eq!(Some(mask.w_edge as u64), s["w_edge"].as_u64());
        assert_eq!(Some(2 * scale as u64), s["erode_kernel"].as_u64());
        assert_eq!(
            Some(2 * mask.w_edge as u64),
            s["center_erode_kernel"].as_u64()
        );
        assert_eq!(Some(2 * mask.w_edge as u64 + 1), s["blur_ksize"].as_u64());
        let sums = &s["mask_sums"];
        for (name, plane) in [
            ("inv_mask", &mask.coverage),
            ("inv_mask_erosion", &mask.erosion),
            ("inv_soft_mask", &mask.soft),
        ] {
            let ours: f64 = plane.iter().map(|&v| v as f64).sum();
            let want = sums[name].as_f64().unwrap();
            println!("{prefix}: sum of {name} {ours:.4} vs {want:.4}");
            assert!((ours - want).abs() <= 1e-5 * want, "{name} sum");
        }
    }
}

#[test]
fn paste_back_matches_facexlib() {
    let aj = json("faces/align/align.json");
    let pj = json("faces/paste/paste.json");
    let tensors = load("faces/paste/paste.safetensors");
    let template = fixture_template(&aj);
    let cases = pj["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let scale = case["upscale"].as_u64().unwrap() as usize;
        let input = load_image(fixture(&format!("faces/paste/{name}_input.png")))
            .unwrap()
            .rgb;
        // The reference's background is OpenCV's 8-bit Lanczos (a copy at scale 1); `paste`
        // alone is also run on the float upscale of `upscale_background`.
        let mut out = if scale > 1 {
            resize_cv2_lanczos4_8bit(&input, input.width * scale, input.height * scale).unwrap()
        } else {
            input.clone()
        };
        let mut direct = upscale_background(&input, scale).unwrap();
        let hw = &case["out_hw"];
        assert_eq!(
            (out.height as u64, out.width as u64),
            (hw[0].as_u64().unwrap(), hw[1].as_u64().unwrap())
        );
        let faces = case_faces(&tensors, name);
        assert_eq!(
            Some(faces.len() as u64),
            case["faces"].as_u64(),
            "{name}: face count"
        );
        for (k, prefix) in faces.iter().enumerate() {
            let lm = tensor_landmarks(get(&tensors, &format!("{prefix}.landmarks")));
            let face = align(&input, &lm, &template, &FACEXLIB_BORDER_RGB).unwrap();
            assert_matrix(
                &format!("{prefix} M"),
                &face.matrix,
                &tensor_matrix(get(&tensors, &format!("{prefix}.M"))),
            );
            let scaled = face.inverse.map(|r| r.map(|v| v * scale as f64));
            assert_matrix(
                &format!("{prefix} inverse_scaled"),
                &scaled,
                &tensor_matrix(get(&tensors, &format!("{prefix}.inverse_scaled"))),
            );
            assert_matrix(
                &format!("{prefix} inverse_with_offset"),
                &paste_inverse(&face, scale),
                &tensor_matrix(get(&tensors, &format!("{prefix}.inverse_with_offset"))),
            );
            check_masks(prefix, &face, scale, &tensors, case.get(format!("face{k}")));
            // "Restoration" of the fixture: 255 − crop on the 8-bit crop.
            let mut restored = face.crop.clone();
            restored
                .data
                .iter_mut()
                .for_each(|v| *v = (255 - quantize_u8(*v)) as f32 / 255.0);
            let mask = paste_mask(&face, scale).unwrap();
            let mut warped = warp_back(&restored, &face, &mask).unwrap();
            warped
                .data
                .iter_mut()
                .for_each(|v| *v = quantize_u8(*v) as f32 / 255.0);
            blend(&mut out, &warped, &mask).unwrap();
            paste(&mut direct, &restored, &face, scale).unwrap();
        }
        let truncate = |img: &ImageF32| -> Vec<u8> {
            img.data
                .iter()
                .map(|&v| (v * 255.0).clamp(0.0, 255.0) as u8)
                .collect()
        };
        let want = to_levels(
            &load_image(fixture(&format!("faces/paste/{name}_result.png")))
                .unwrap()
                .rgb,
        );
        let ours = truncate(&out);
        let (worst, count) = level_diff(&ours, &want);
        println!(
            "{name}: composite max abs error {worst} levels, {count} of {} samples differ",
            ours.len()
        );
        assert!(worst <= GREY_LEVEL_TOL, "{name}");
        let (worst, count) = level_diff(&truncate(&direct), &want);
        println!("{name}: paste() in f32: max abs error {worst} levels, {count} samples differ");
        assert!(worst <= GREY_LEVEL_TOL + 1, "{name} (paste)");
    }
}
