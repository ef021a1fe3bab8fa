//! PSNR/SSIM against BasicSR's numpy `calculate_psnr` / `calculate_ssim`
//! (fixture `degrade/degrade.safetensors`, tensors `metrics/...`).

mod common;

use candle_core::{DType, Tensor};
use pfstorer::imaging::ImageF32;
use pfstorer::metrics::{metric_by_name, psnr, ssim, MetricOptions};

const FIXTURE: &str = "degrade/degrade.safetensors";

/// A uint8 BGR HWC fixture image as an RGB [0, 1] image.
fn bgr_u8_to_rgb(t: &Tensor) -> ImageF32 {
    let (h, w, c) = t.dims3().unwrap();
    assert_eq!(c, 3, "expected a 3-channel image");
    let bgr: Vec<u8> = t
        .to_dtype(DType::U8)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut data = Vec::with_capacity(bgr.len());
    for px in bgr.chunks_exact(3) {
        data.extend([px[2], px[1], px[0]].map(|v| v as f32 / 255.0));
    }
    ImageF32::new(w, h, 3, data)
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

/// Cases are the fixture keys `metrics/psnr/crop<N>/y<0|1>`.
fn cases(map: &std::collections::HashMap<String, Tensor>) -> Vec<(String, usize, bool)> {
    let mut cases: Vec<(String, usize, bool)> = map
        .keys()
        .filter_map(|k| k.strip_prefix("metrics/psnr/"))
        .map(|case| {
            let (crop, y) = case
                .split_once('/')
                .unwrap_or_else(|| panic!("unexpected case name {case}"));
            let crop: usize = crop
                .strip_prefix("crop")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("unexpected crop in {case}"));
            let y = match y {
                "y0" => false,
                "y1" => true,
                other => panic!("unexpected channel flag {other} in {case}"),
            };
            (case.to_string(), crop, y)
        })
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no metrics/psnr/* cases in the fixture");
    cases
}

#[test]
fn psnr_ssim_match_basicsr() {
    let map = common::load(FIXTURE);
    let a = bgr_u8_to_rgb(common::get(&map, "metrics/img_a_u8_bgr_hwc"));
    let b = bgr_u8_to_rgb(common::get(&map, "metrics/img_b_u8_bgr_hwc"));
    let mut worst_psnr = 0f64;
    let mut worst_ssim = 0f64;
    for (case, crop, y) in cases(&map) {
        let want_psnr = scalar(common::get(&map, &format!("metrics/psnr/{case}")));
        let want_ssim = scalar(common::get(&map, &format!("metrics/ssim/{case}")));
        let got_psnr = psnr(&a, &b, crop, y).unwrap();
        let got_ssim = ssim(&a, &b, crop, y).unwrap();
        let (ep, es) = ((got_psnr - want_psnr).abs(), (got_ssim - want_ssim).abs());
        println!("{case}: psnr {got_psnr:.12} (ref {want_psnr:.12}, err {ep:.2e}), ssim {got_ssim:.12} (ref {want_ssim:.12}, err {es:.2e})");
        assert!(ep < 1e-9, "{case}: PSNR {got_psnr} vs {want_psnr}");
        assert!(es < 1e-9, "{case}: SSIM {got_ssim} vs {want_ssim}");
        worst_psnr = worst_psnr.max(ep);
        worst_ssim = worst_ssim.max(es);
    }
    println!("max abs error: psnr {worst_psnr:.3e}, ssim {worst_ssim:.3e}");
}

#[test]
fn registry_metrics_agree_with_functions() {
    let map = common::load(FIXTURE);
    let a = bgr_u8_to_rgb(common::get(&map, "metrics/img_a_u8_bgr_hwc"));
    let b = bgr_u8_to_rgb(common::get(&map, "metrics/img_b_u8_bgr_hwc"));
    for (case, crop, y) in cases(&map) {
        let options = MetricOptions {
            crop_border: crop,
            test_y_channel: y,
        };
        let want_psnr = scalar(common::get(&map, &format!("metrics/psnr/{case}")));
        let got = metric_by_name("psnr", options)
            .unwrap()
            .compute(&a, &b)
            .unwrap();
        assert!(
            (got - want_psnr).abs() < 1e-9,
            "{case}: registry PSNR {got}"
        );
        let want_ssim = scalar(common::get(&map, &format!("metrics/ssim/{case}")));
        let got = metric_by_name("SSIM", options)
            .unwrap()
            .compute(&a, &b)
            .unwrap();
        assert!(
            (got - want_ssim).abs() < 1e-9,
            "{case}: registry SSIM {got}"
        );
    }
    assert!(metric_by_name("lpips-not-yet", MetricOptions::default()).is_err());
}

#[test]
fn mismatched_sizes_are_an_error() {
    let a = ImageF32::zeros(20, 20, 3);
    let b = ImageF32::zeros(20, 21, 3);
    let err = psnr(&a, &b, 0, false).unwrap_err().to_string();
    assert!(err.contains("differ"), "{err}");
    let err = ssim(&a, &a, 5, false).unwrap_err().to_string();
    assert!(err.contains("11x11"), "{err}");
    let err = psnr(&a, &a, 10, false).unwrap_err().to_string();
    assert!(err.contains("crop border"), "{err}");
}
