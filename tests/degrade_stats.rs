//! Statistical properties of the degradation blocks and presets.

use pfstorer::degrade::jpeg::diff_jpeg;
use pfstorer::degrade::noise::{add_gaussian_noise, add_poisson_noise};
use pfstorer::degrade::{degrade_image, Planar, Preset};
use pfstorer::imaging::ImageF32;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn psnr(a: &[f32], b: &[f32]) -> f64 {
    let mse: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (1.0 / mse.max(1e-12)).log10()
}

fn flat(h: usize, w: usize, v: f32) -> Planar {
    Planar::new(3, h, w, vec![v; 3 * h * w]).unwrap()
}

/// A smooth colour test image with some edges (RGB HWC).
fn test_image(w: usize, h: usize) -> ImageF32 {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let (u, v) = (x as f32 / w as f32, y as f32 / h as f32);
            let disk = if (u - 0.5).powi(2) + (v - 0.5).powi(2) < 0.06 {
                0.2
            } else {
                0.0
            };
            data.push(0.5 + 0.3 * (6.0 * u + 2.0 * v).sin() + disk);
            data.push(0.5 + 0.3 * (4.0 * v - 3.0 * u).cos() - disk);
            data.push(0.4 + 0.25 * (9.0 * u * v).sin() + 0.5 * disk);
        }
    }
    for v in data.iter_mut() {
        *v = v.clamp(0.0, 1.0);
    }
    ImageF32::new(w, h, 3, data)
}

#[test]
fn gaussian_noise_sigma_on_flat_image() {
    let img = flat(128, 128, 0.5);
    let mut rng = StdRng::seed_from_u64(1);
    for sigma in [2.0f64, 10.0, 25.0] {
        for gray in [false, true] {
            let out = add_gaussian_noise(&img, sigma, gray, &mut rng);
            let n = out.data.len() as f64;
            let mean: f64 = out.data.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var: f64 = out
                .data
                .iter()
                .map(|&v| (v as f64 - mean).powi(2))
                .sum::<f64>()
                / n;
            let measured = var.sqrt() * 255.0;
            println!("sigma {sigma} gray {gray}: measured {measured:.3}");
            assert!(
                (measured - sigma).abs() < 0.05 * sigma,
                "sigma {sigma}: measured {measured}"
            );
            if gray {
                let hw = 128 * 128;
                assert!((0..hw).all(
                    |i| out.data[i] == out.data[hw + i] && out.data[i] == out.data[2 * hw + i]
                ));
            }
        }
    }
}

#[test]
fn poisson_noise_grows_with_intensity() {
    let mut rng = StdRng::seed_from_u64(2);
    let mut last = 0.0;
    for level in [0.1f32, 0.4, 0.8] {
        // A small ramp (64 distinct 8-bit levels) around `level`, so the Poisson rate uses the
        // usual `vals = 2**ceil(log2(#levels))` rather than the degenerate flat-image case.
        let (h, w) = (96usize, 96usize);
        let data: Vec<f32> = (0..3 * h * w)
            .map(|i| level + ((i % w) % 64) as f32 / 255.0 - 0.1)
            .map(|v| v.clamp(0.0, 1.0))
            .collect();
        let img = Planar::new(3, h, w, data).unwrap();
        let out = add_poisson_noise(&img, 1.0, false, &mut rng);
        let noise: Vec<f64> = out
            .data
            .iter()
            .zip(&img.data)
            .map(|(o, i)| (o - i) as f64)
            .collect();
        let n = noise.len() as f64;
        let mean: f64 = noise.iter().sum::<f64>() / n;
        let std = (noise.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        println!("level {level}: noise std {std:.4}");
        assert!(std > last, "Poisson noise must grow with intensity");
        last = std;
    }
}

#[test]
fn jpeg_quality_orders_psnr() {
    let img = Planar::from_hwc(&test_image(96, 80));
    let low = diff_jpeg(&img, 30.0).unwrap();
    let high = diff_jpeg(&img, 95.0).unwrap();
    let (p30, p95) = (psnr(&low.data, &img.data), psnr(&high.data, &img.data));
    println!("DiffJPEG PSNR q30 {p30:.2} dB, q95 {p95:.2} dB");
    assert!(p30 < p95);
    assert!(p95 > 35.0);
}

#[test]
fn heavy_degrades_more_than_light() {
    let img = test_image(64, 64);
    let (mut light, mut heavy) = (0.0, 0.0);
    for seed in 0..20u64 {
        let (l, _) = degrade_image(&img, Preset::Light, seed).unwrap();
        let (h, _) = degrade_image(&img, Preset::Heavy, seed).unwrap();
        light += psnr(&l.data, &img.data);
        heavy += psnr(&h.data, &img.data);
    }
    println!(
        "mean PSNR light {:.2} dB, heavy {:.2} dB",
        light / 20.0,
        heavy / 20.0
    );
    assert!(heavy < light);
}

#[test]
fn seeds_are_reproducible_and_distinct() {
    let img = test_image(48, 40);
    for preset in [Preset::Light, Preset::Heavy] {
        let (a, pa) = degrade_image(&img, preset, 7).unwrap();
        let (b, _) = degrade_image(&img, preset, 7).unwrap();
        let (c, _) = degrade_image(&img, preset, 8).unwrap();
        assert_eq!(a, b, "{preset}: same seed, same output");
        assert_ne!(a, c, "{preset}: different seeds, different output");
        let json = serde_json::to_string(&pa).unwrap();
        assert!(json.contains("\"preset\""), "{json}");
    }
}

#[test]
fn output_size_equals_input_size() {
    for (w, h) in [(33usize, 17usize), (7, 9), (101, 63)] {
        let img = test_image(w, h);
        for preset in [Preset::Light, Preset::Heavy] {
            for seed in 0..4 {
                let (out, _) = degrade_image(&img, preset, seed).unwrap();
                assert_eq!(
                    (out.width, out.height, out.channels),
                    (w, h, 3),
                    "{preset} {w}x{h}"
                );
                assert!(out.data.iter().all(|v| (0.0..=1.0).contains(v)));
            }
        }
    }
}

#[test]
fn preset_parsing() {
    assert_eq!("light".parse::<Preset>().unwrap(), Preset::Light);
    assert_eq!("HEAVY".parse::<Preset>().unwrap(), Preset::Heavy);
    assert!("medium".parse::<Preset>().is_err());
    assert_eq!(Preset::Heavy.to_string(), "heavy");
}
