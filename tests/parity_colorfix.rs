//! AdaIN and wavelet colour correction against `colorfix/colorfix.safetensors`.

mod common;

use candle_core::{DType, Tensor};
use common::{assert_module_close, get, load};
use pfstorer::imaging::colorfix::{self, ColorFix};
use std::collections::HashMap;

const FIXTURE: &str = "colorfix/colorfix.safetensors";

fn fixtures() -> HashMap<String, Tensor> {
    load(FIXTURE)
}

#[test]
fn adain_matches_reference() {
    let f = fixtures();
    let out = colorfix::adain(get(&f, "in.target"), get(&f, "in.source")).unwrap();
    assert_module_close("adain", &out, get(&f, "adain"));
    let out = colorfix::adain(get(&f, "in.target_pm1"), get(&f, "in.source_pm1")).unwrap();
    assert_module_close("adain_pm1", &out, get(&f, "adain_pm1"));
}

#[test]
fn wavelet_matches_reference() {
    let f = fixtures();
    let out = colorfix::wavelet(get(&f, "in.target"), get(&f, "in.source")).unwrap();
    assert_module_close("wavelet", &out, get(&f, "wavelet"));
    let out = colorfix::wavelet(get(&f, "in.target_pm1"), get(&f, "in.source_pm1")).unwrap();
    assert_module_close("wavelet_pm1", &out, get(&f, "wavelet_pm1"));
}

#[test]
fn wavelet_blur_and_bands_match_reference() {
    let f = fixtures();
    let target = get(&f, "in.target");
    let mut radii: Vec<usize> = f
        .keys()
        .filter_map(|k| k.strip_prefix("wavelet_blur_r"))
        .map(|r| r.parse().expect("radius suffix"))
        .collect();
    radii.sort();
    assert!(!radii.is_empty(), "no wavelet_blur_r* tensors in {FIXTURE}");
    for r in radii {
        let out = colorfix::wavelet_blur(target, r).unwrap();
        let name = format!("wavelet_blur_r{r}");
        assert_module_close(&name, &out, get(&f, &name));
    }
    let (high, low) = colorfix::wavelet_decomposition(target).unwrap();
    assert_module_close("wavelet_high", &high, get(&f, "wavelet_high"));
    assert_module_close("wavelet_low", &low, get(&f, "wavelet_low"));
}

/// HWC u8 -> NCHW f32 in [0, 1] (torchvision `ToTensor`).
fn u8_to_tensor(image: &Tensor) -> Tensor {
    (image
        .to_dtype(DType::F32)
        .unwrap()
        .permute((2, 0, 1))
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        / 255.0)
        .unwrap()
}

/// NCHW f32 -> HWC u8 as `ToPILImage` after `clamp(0, 1)`: `mul(255)` then truncation.
fn tensor_to_u8(image: &Tensor) -> Tensor {
    (image.clamp(0f32, 1f32).unwrap() * 255.0)
        .unwrap()
        .floor()
        .unwrap()
        .squeeze(0)
        .unwrap()
        .permute((1, 2, 0))
        .unwrap()
}

fn assert_within_one_level(name: &str, actual: &Tensor, expected: &Tensor) {
    assert_eq!(actual.dims(), expected.dims(), "{name}: shape");
    let diff = common::max_abs_diff(actual, expected);
    println!("{name}: max abs error {diff} levels");
    assert!(diff <= 1.0, "{name}: off by {diff} levels");
}

#[test]
fn u8_colour_fixes_match_pil_reference_within_one_level() {
    let f = fixtures();
    let target = u8_to_tensor(get(&f, "pil.in.target_u8"));
    let source = u8_to_tensor(get(&f, "pil.in.source_u8"));
    for (fix, name) in [
        (ColorFix::Adain, "pil.adain_color_fix_u8"),
        (ColorFix::Wavelet, "pil.wavelet_color_fix_u8"),
    ] {
        let out = tensor_to_u8(&fix.apply(&target, &source).unwrap());
        assert_within_one_level(name, &out, get(&f, name));
    }
}

#[test]
fn color_fix_names_parse_and_none_is_identity() {
    assert_eq!("adain".parse::<ColorFix>().unwrap(), ColorFix::Adain);
    assert_eq!("wavelet".parse::<ColorFix>().unwrap(), ColorFix::Wavelet);
    assert_eq!("none".parse::<ColorFix>().unwrap(), ColorFix::None);
    assert!("sharpen".parse::<ColorFix>().is_err());

    let f = fixtures();
    let target = get(&f, "in.target");
    let out = ColorFix::None.apply(target, get(&f, "in.source")).unwrap();
    assert_module_close("none", &out, target);
}

#[test]
fn mismatched_channels_are_rejected() {
    let f = fixtures();
    let target = get(&f, "in.target");
    let source = get(&f, "in.source").narrow(1, 0, 1).unwrap();
    assert!(colorfix::adain(target, &source).is_err());
    assert!(colorfix::wavelet(target, &source).is_err());
}
