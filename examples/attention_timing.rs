//! Throughput of the CPU attention at the UNet's 64x64-latent self-attention (4096 tokens, head
//! width 64): the inference forward at CFG batch 2 (10 heads) and the training forward and
//! backward at batch 1 (5 heads), in GFLOP/s of the matrix products; for profiling.
//! `cargo run --release --example attention_timing`, or `RUNS=5`.
use candle_core::{Device, Tensor, Var};
use pfstorer::kernels::{attention, DifferentiableScope};
use std::time::Instant;

const TOKENS: usize = 4096;
const HEAD_WIDTH: usize = 64;

fn main() -> candle_core::Result<()> {
    pfstorer::allocator::retain_freed_memory();
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dev = Device::Cpu;
    let scale = (HEAD_WIDTH as f64).powf(-0.5);
    let random = |heads: usize| Tensor::randn(0f32, 1.0, (heads, TOKENS, HEAD_WIDTH), &dev);
    // Two products of 2 * heads * n^2 * d flops each in the forward, five in the backward.
    let product_gflop = |heads: usize| (2 * heads * TOKENS * TOKENS * HEAD_WIDTH) as f64 / 1e9;

    let (q, k, v) = (random(10)?, random(10)?, random(10)?);
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let t = Instant::now();
        attention(&q, &k, &v, scale, None)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "inference, 10 heads: {:.3} s, {:.0} GFLOP/s",
        best,
        2.0 * product_gflop(10) / best
    );

    let _training = DifferentiableScope::enter(true);
    let vars = [
        Var::from_tensor(&random(5)?)?,
        Var::from_tensor(&random(5)?)?,
        Var::from_tensor(&random(5)?)?,
    ];
    let weight = random(5)?;
    let (mut forward, mut backward) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..runs {
        let t = Instant::now();
        let out = attention(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
            scale,
            None,
        )?;
        forward = forward.min(t.elapsed().as_secs_f64());
        let loss = (out * &weight)?.sum_all()?;
        let t = Instant::now();
        let grads = loss.backward()?;
        backward = backward.min(t.elapsed().as_secs_f64());
        assert!(vars.iter().all(|v| grads.get(v.as_tensor()).is_some()));
    }
    println!(
        "training, 5 heads: forward {:.3} s ({:.0} GFLOP/s), backward {:.3} s ({:.0} GFLOP/s)",
        forward,
        2.0 * product_gflop(5) / forward,
        backward,
        5.0 * product_gflop(5) / backward
    );
    Ok(())
}
