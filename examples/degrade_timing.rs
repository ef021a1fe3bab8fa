//! Times the light and heavy presets on a 512x512 image (one thread).
//! `cargo run --example degrade_timing [--release]`

use pfstorer::degrade::{degrade_image, Preset};
use pfstorer::imaging::ImageF32;
use std::time::Instant;

fn main() -> pfstorer::Result<()> {
    let (w, h) = (512usize, 512usize);
    let data: Vec<f32> = (0..w * h * 3)
        .map(|i| {
            let (p, c) = (i / 3, i % 3);
            let (x, y) = ((p % w) as f32 / w as f32, (p / w) as f32 / h as f32);
            (0.5 + 0.3 * ((5.0 + c as f32) * x + 3.0 * y).sin()).clamp(0.0, 1.0)
        })
        .collect();
    let img = ImageF32::new(w, h, 3, data);
    for preset in [Preset::Light, Preset::Heavy] {
        // Warm-up (builds cached ISP tone LUTs on first use).
        degrade_image(&img, preset, 0)?;
        let n = 10u64;
        let start = Instant::now();
        let mut worst = 0f64;
        for seed in 1..=n {
            let t = Instant::now();
            degrade_image(&img, preset, seed)?;
            worst = worst.max(t.elapsed().as_secs_f64());
        }
        let mean = start.elapsed().as_secs_f64() / n as f64;
        println!(
            "{preset}: mean {:.1} ms, worst {:.1} ms over {n} seeds",
            mean * 1e3,
            worst * 1e3
        );
    }
    Ok(())
}
