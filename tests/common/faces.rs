//! Helpers of the whole-photo CLI tests (`cli_faces`, `cli_faces_hostile`): the binary, the
//! fixture photo with the most faces, and the face chip the synthetic photos are made of.

use pfstorer::imaging::io::quantize_u8;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The detector threshold of these tests: the fixture's own counts are at 0.9.
pub const THRESHOLD: f32 = 0.9;

pub fn pfstorer(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pfstorer"))
        .args(args)
        .output()
        .expect("run pfstorer")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The detect/ image with the most faces at threshold 0.9, and that count.
pub fn group_photo() -> (PathBuf, usize) {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(super::fixture("faces/detect/detect.json")).unwrap(),
    )
    .unwrap();
    json["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|im| {
            let name = im["image"].as_str().unwrap();
            let count = im["thr_0.9"]["count"].as_u64().unwrap() as usize;
            (super::fixture(&format!("faces/detect/{name}")), count)
        })
        .max_by_key(|(_, n)| *n)
        .unwrap()
}

pub fn face_flags() -> Vec<String> {
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

pub fn restore_args(input: &Path, output: &Path, extra: &[&str]) -> Vec<String> {
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
    args.extend(super::fast_sampling_flags());
    args.extend(super::model_flags());
    args
}

/// The 8-bit samples of an RGB image.
pub fn quantized(img: &pfstorer::imaging::ImageF32) -> Vec<u8> {
    img.data.iter().map(|&v| quantize_u8(v)).collect()
}

/// The first chip of identity/ (a face that fills a 150x150 image).
pub fn face_chip() -> image::RgbImage {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(super::fixture("faces/identity/identity.json")).unwrap(),
    )
    .unwrap();
    let file = json["chips"][0]["file"].as_str().unwrap().to_string();
    image::open(super::fixture(&format!("faces/identity/{file}")))
        .unwrap()
        .to_rgb8()
}
