//! `pfstorer bench faces`: the face networks on the CPU: RetinaFace detection of a photo of
//! `--size WxH` (default 1600x900: the synthetic face pattern tiled), and dlib-ID embedding of
//! 150x150 chips, one at a time and in a batch. One JSON line; the onnxruntime and dlib figures
//! for the README's ratios come from their own runtimes on the same inputs (see the README).

use super::{at_least_one, median, synthetic_face};
use crate::faces::embed::Embedder;
use crate::faces::retinaface::{preprocess, DetectOptions, RetinaFace};
use crate::imaging::ImageF32;
use candle_core::Device;
use clap::Args;
use std::time::Instant;

#[derive(Debug, Args)]
pub struct FacesBench {
    /// Photo size for detection, WIDTHxHEIGHT.
    #[arg(long, default_value = "1600x900")]
    pub size: String,
    /// Timed runs of each after one warm-up (at least 1).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    pub runs: usize,
    /// Chips per batch in the batched embedding timing.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub batch: usize,
}

/// A `w x h` photo: the synthetic face pattern repeated.
fn photo(w: usize, h: usize) -> ImageF32 {
    let tile = synthetic_face(256, 3);
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let p = ((y % 256) * 256 + x % 256) * 3;
            data.extend_from_slice(&tile.data[p..p + 3]);
        }
    }
    ImageF32::new(w, h, 3, data)
}

fn timed(runs: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Vec<f64>> {
    f()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(times)
}

pub fn run(b: FacesBench) -> anyhow::Result<()> {
    let (w, h) = b
        .size
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.parse::<usize>().ok()?, h.parse::<usize>().ok()?)))
        .filter(|&(w, h)| w > 0 && h > 0 && w * h <= 64_000_000)
        .ok_or_else(|| anyhow::anyhow!("--size {}: expected WIDTHxHEIGHT up to 64 MP", b.size))?;
    let device = Device::Cpu;
    let detector = RetinaFace::load_embedded(&device)?;
    let image = photo(w, h);
    let opts = DetectOptions {
        max_side: None,
        ..DetectOptions::default()
    };
    let input = preprocess(&image, &device)?;
    let forward = timed(b.runs, || {
        detector.forward(&input)?;
        Ok(())
    })?;
    let detect = timed(b.runs, || {
        detector.detect(&image, &opts)?;
        Ok(())
    })?;
    let embedder = Embedder::load_embedded(&device)?;
    let chip = synthetic_face(crate::faces::embed::CHIP_SIZE, 1);
    let one = timed(b.runs, || {
        embedder.embed(std::slice::from_ref(&chip))?;
        Ok(())
    })?;
    let chips = vec![chip.clone(); b.batch];
    let batch = timed(b.runs, || {
        embedder.embed(&chips)?;
        Ok(())
    })?;
    println!(
        "{}",
        serde_json::json!({
            "what": "pfstorer: RetinaFace-MobileNet0.25 detection and dlib-ID embedding, CPU f32",
            "size": [w, h],
            "detector_forward_s": median(&forward),
            "detect_s": median(&detect),
            "embed_one_chip_s": median(&one),
            "embed_batch": b.batch,
            "embed_per_chip_in_batch_s": median(&batch).map(|s| s / b.batch as f64),
            "runs": b.runs,
            "threads": candle_core::utils::get_num_threads(),
        })
    );
    Ok(())
}
