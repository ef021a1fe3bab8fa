//! Loading and saving: formats, bit depths, alpha, EXIF orientation, PNG text, atomic writes.
mod common;

use image::{ImageEncoder, Rgb, RgbImage};
use pfstorer::imaging::io::{
    decode_image, load_image, load_image_with_min_size, save_image, save_png,
};
use pfstorer::imaging::ImageF32;
use std::path::Path;

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> common::Scratch {
    common::scratch(&format!("imaging-io-{name}"))
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// An RGB test image whose every sample differs, on the 8-bit grid.
fn pattern(width: usize, height: usize) -> ImageF32 {
    let data = (0..width * height * 3)
        .map(|i| ((i * 37 + 11) % 256) as f32 / 255.0)
        .collect();
    ImageF32::new(width, height, 3, data)
}

/// A little-endian EXIF (TIFF) block holding only the orientation tag.
fn exif_orientation(value: u16) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"II");
    b.extend_from_slice(&42u16.to_le_bytes());
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&0x0112u16.to_le_bytes());
    b.extend_from_slice(&3u16.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&value.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b
}

fn rgb8_pattern(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        Rgb([(x * 40) as u8, (y * 60) as u8, ((x + y) * 10) as u8])
    })
}

#[test]
fn png_exif_orientation_rotates_pixels() {
    let (w, h) = (5u32, 3u32);
    let src = rgb8_pattern(w, h);
    let mut bytes = Vec::new();
    let mut encoder = image::codecs::png::PngEncoder::new(&mut bytes);
    encoder.set_exif_metadata(exif_orientation(6)).unwrap();
    encoder
        .write_image(src.as_raw(), w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    let loaded = decode_image(&bytes).unwrap();
    // Orientation 6: displayed after a 90 degree clockwise turn.
    assert_eq!((loaded.width(), loaded.height()), (h as usize, w as usize));
    for yn in 0..w as usize {
        for xn in 0..h as usize {
            let old = src.get_pixel(yn as u32, h - 1 - xn as u32);
            for c in 0..3 {
                let got = (loaded.rgb.at(xn, yn, c) * 255.0).round() as u8;
                assert_eq!(got, old[c], "pixel ({xn},{yn}) channel {c}");
            }
        }
    }
}

#[test]
fn jpeg_exif_orientation_rotates() {
    // Left half red, right half blue, 32x16; orientation 8 = 90 degrees counter-clockwise,
    // which puts the right (blue) half on top.
    let src = RgbImage::from_fn(32, 16, |x, _| {
        if x < 16 {
            Rgb([220, 20, 20])
        } else {
            Rgb([20, 20, 220])
        }
    });
    let mut bytes = Vec::new();
    let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95);
    encoder.set_exif_metadata(exif_orientation(8)).unwrap();
    encoder
        .write_image(src.as_raw(), 32, 16, image::ExtendedColorType::Rgb8)
        .unwrap();
    let loaded = decode_image(&bytes).unwrap();
    assert_eq!((loaded.width(), loaded.height()), (16, 32));
    assert!(
        loaded.rgb.at(8, 4, 2) > 0.7 && loaded.rgb.at(8, 4, 0) < 0.3,
        "top should be blue"
    );
    assert!(
        loaded.rgb.at(8, 28, 0) > 0.7 && loaded.rgb.at(8, 28, 2) < 0.3,
        "bottom should be red"
    );
    assert_eq!(loaded.bit_depth, 8);
    assert!(!loaded.gray && loaded.alpha.is_none());
}

#[test]
fn sixteen_bit_round_trip() {
    let dir = scratch("sixteen");
    let (w, h) = (7, 5);
    let data = (0..w * h * 3)
        .map(|i| ((i as u32 * 1237 + 5) % 65536) as f32 / 65535.0)
        .collect();
    let img = ImageF32::new(w, h, 3, data);
    let path = dir.join("deep.png");
    save_png(&path, &img, None, true, &[], false).unwrap();
    let loaded = load_image(&path).unwrap();
    assert_eq!(loaded.bit_depth, 16);
    let worst = loaded
        .rgb
        .data
        .iter()
        .zip(&img.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("16-bit round trip: max abs error {worst:.3e}");
    assert!(worst < 1e-6);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn alpha_is_carried_and_gray_is_flagged() {
    let dir = scratch("alpha");
    let img = pattern(6, 4);
    let alpha = ImageF32::new(6, 4, 1, (0..24).map(|i| (i * 10) as f32 / 255.0).collect());
    let path = dir.join("rgba.png");
    save_png(&path, &img, Some(&alpha), false, &[], false).unwrap();
    let loaded = load_image(&path).unwrap();
    assert_eq!(loaded.rgb, img);
    assert_eq!(loaded.alpha.as_ref(), Some(&alpha));

    let gray_path = dir.join("gray.png");
    image::GrayImage::from_fn(4, 3, |x, y| image::Luma([(x * 50 + y) as u8]))
        .save(&gray_path)
        .unwrap();
    let gray = load_image(&gray_path).unwrap();
    assert!(gray.gray && gray.alpha.is_none());
    assert_eq!(gray.rgb.channels, 3);
    assert_eq!(gray.rgb.at(3, 2, 0), 152.0 / 255.0);
    assert_eq!(gray.rgb.at(3, 2, 0), gray.rgb.at(3, 2, 2));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn png_text_chunks_are_written() {
    let dir = scratch("text");
    let path = dir.join("meta.png");
    let meta = vec![
        ("Software".to_string(), "pfstorer test".to_string()),
        ("pfstorer:seed".to_string(), "42".to_string()),
        ("Comment".to_string(), "non-Latin-1: \u{2713}".to_string()),
    ];
    save_png(&path, &pattern(3, 3), None, false, &meta, false).unwrap();
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    let latin1: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    assert_eq!(latin1, meta[..2].to_vec());
    let utf8: Vec<(String, String)> = info
        .utf8_text
        .iter()
        .map(|t| (t.keyword.clone(), t.get_text().unwrap()))
        .collect();
    assert_eq!(utf8, meta[2..].to_vec());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn atomic_write_refuses_overwrite_and_is_deterministic() {
    let dir = scratch("atomic");
    let path = dir.join("out.png");
    let img = pattern(9, 6);
    save_png(&path, &img, None, false, &[], false).unwrap();
    assert_eq!(dir_names(&dir), ["out.png"], "no temporary file may remain");
    let first = std::fs::read(&path).unwrap();

    let err = save_png(&path, &pattern(2, 2), None, false, &[], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("out.png") && err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        first,
        "refused write changed the file"
    );
    assert_eq!(dir_names(&dir), ["out.png"]);

    let again = dir.join("again.png");
    save_png(&again, &img, None, false, &[], false).unwrap();
    assert_eq!(
        std::fs::read(&again).unwrap(),
        first,
        "same input, different bytes"
    );

    save_png(&path, &pattern(2, 2), None, false, &[], true).unwrap();
    assert_eq!(load_image(&path).unwrap().width(), 2);
    assert_eq!(dir_names(&dir), ["again.png", "out.png"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn other_formats_round_trip() {
    let dir = scratch("formats");
    let img = pattern(10, 8);
    for ext in ["bmp", "tiff", "webp", "png"] {
        let path = dir.join(format!("x.{ext}"));
        save_image(&path, &img, None, false).unwrap();
        let loaded = load_image(&path).unwrap();
        assert_eq!(loaded.rgb, img, "{ext} is lossless");
        assert_eq!(loaded.bit_depth, 8);
    }
    let smooth = ImageF32::new(16, 16, 3, vec![0.5; 16 * 16 * 3]);
    let path = dir.join("x.jpg");
    save_image(&path, &smooth, None, false).unwrap();
    let loaded = load_image(&path).unwrap();
    assert!(loaded.rgb.data.iter().all(|v| (v - 0.5).abs() < 0.02));
    let err = save_image(dir.join("x.gif"), &img, None, false).unwrap_err();
    assert!(err.to_string().contains("x.gif"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let dir = scratch("bad");
    let text = dir.join("notes.jpg");
    std::fs::write(&text, "just some text, not pixels\n").unwrap();
    let err = load_image(&text).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("{}: not an image (unrecognised format)", text.display())
    );

    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .write_image(
            rgb8_pattern(64, 48).as_raw(),
            64,
            48,
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
    let cut = dir.join("cut.jpg");
    std::fs::write(&cut, &jpeg[..jpeg.len() / 2]).unwrap();
    let err = load_image(&cut).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}: truncated or corrupt JPEG (", cut.display())),
        "{err}"
    );
    assert!(!err.contains('\n'));

    let tiny = dir.join("tiny.png");
    save_png(&tiny, &pattern(1, 1), None, false, &[], false).unwrap();
    let err = load_image_with_min_size(&tiny, 8).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("{}: image is 1x1; at least 8x8 needed", tiny.display())
    );

    let missing = dir.join("missing.png");
    let err = load_image(&missing).unwrap_err().to_string();
    assert!(err.contains("missing.png"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
