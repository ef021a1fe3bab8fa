//! Time per chip of the face embedder (dlib's ResNet, `pfstorer::faces::embed`) on the CPU, for
//! batches of 1 and 8 chips. Chips: the PNGs named in `tests/fixtures/faces/identity/identity.json`
//! (or `$PFSTORER_FIXTURES/faces/identity`), repeated to fill the batch.
//!
//! `cargo run --release --example faces_embed_timing`; `RAYON_NUM_THREADS=1` for one thread (dlib's
//! CPU build without BLAS runs single-threaded), `RUNS=n` timed runs per batch size (best kept).
//! dlib's figure for comparison: `compute_face_descriptor(chip)` per chip with the same threads.
//! Measured on 2 shared cores under load (load average ~9.5), one thread, release build: 24 ms
//! per chip at batch 1, 21-30 ms at batch 8; dlib-bin 20.0.1.post1 (no BLAS, single-threaded)
//! 170-190 ms per chip under the same load, 83 ms on a quieter machine.
use pfstorer::faces::embed::Embedder;
use pfstorer::imaging::{io::load_image, ImageF32};
use std::path::PathBuf;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::env::var_os("PFSTORER_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
        .join("faces/identity");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("identity.json"))?)?;
    let mut chips: Vec<ImageF32> = Vec::new();
    for entry in json["chips"].as_array().ok_or("identity.json: no chips")? {
        let file = entry["file"].as_str().ok_or("chip without file")?;
        chips.push(load_image(root.join(file))?.rgb);
    }
    if chips.is_empty() {
        return Err("no chips".into());
    }
    let runs: usize = std::env::var("RUNS").map_or(Ok(5), |r| r.parse())?;
    let threads = candle_core::utils::get_num_threads();

    let started = Instant::now();
    let embedder = Embedder::load_embedded(&candle_core::Device::Cpu)?;
    println!(
        "load: {:.3} s, {threads} thread(s)",
        started.elapsed().as_secs_f64()
    );
    for batch_size in [1usize, 8] {
        let batch: Vec<ImageF32> = chips.iter().cycle().take(batch_size).cloned().collect();
        embedder.embed(&batch)?; // warm-up
        let mut best = f64::INFINITY;
        let mut total = 0.0;
        for _ in 0..runs {
            let t = Instant::now();
            embedder.embed(&batch)?;
            let s = t.elapsed().as_secs_f64();
            best = best.min(s);
            total += s;
        }
        println!(
            "batch {batch_size}: best {:.1} ms per chip, mean {:.1} ms per chip ({runs} runs)",
            1e3 * best / batch_size as f64,
            1e3 * total / (runs * batch_size) as f64
        );
    }
    Ok(())
}
