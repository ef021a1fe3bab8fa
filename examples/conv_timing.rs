//! Throughput of the CPU 3x3 convolution (the path `Conv2d` picks: Winograd or shifted
//! products) at the VAE decoder's shapes, in direct-convolution GFLOP/s; for profiling.
//! `cargo run --release --example conv_timing`, or `CONV_SHAPES=c_in,c_out,side[,batch];... RUNS=5`.
use candle_core::{Device, Module, Tensor};
use pfstorer::model::nn::Conv2d;
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (c_in, c_out, side, batch) in conv_shapes() {
        let x = Tensor::randn(0f32, 1.0, (batch, c_in, side, side), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (c_out, c_in, 3, 3), &dev)?;
        let conv = Conv2d::new(
            w,
            None,
            candle_nn::Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
        );
        conv.forward(&x)?;
        let runs: usize = std::env::var("RUNS").map_or(3, |r| r.parse().unwrap());
        let mut s = f64::INFINITY;
        for _ in 0..runs {
            let t = Instant::now();
            conv.forward(&x)?;
            s = s.min(t.elapsed().as_secs_f64());
        }
        let flop = 2.0 * 9.0 * (batch * c_in * c_out * side * side) as f64;
        println!(
            "{c_in}->{c_out} at {batch}x{side}²: best {s:.3} s, {:.1} GFLOP/s",
            flop / s / 1e9
        );
    }
    Ok(())
}

/// The shapes timed: the decoder's, or `CONV_SHAPES=c_in,c_out,side[,batch];...`.
fn conv_shapes() -> Vec<(usize, usize, usize, usize)> {
    match std::env::var("CONV_SHAPES") {
        Ok(s) => s
            .split(';')
            .map(|t| {
                let v: Vec<usize> = t.split(',').map(|n| n.parse().unwrap()).collect();
                (v[0], v[1], v[2], v.get(3).copied().unwrap_or(1))
            })
            .collect(),
        Err(_) => vec![
            (128, 128, 512, 1),
            (256, 256, 256, 1),
            (512, 512, 128, 1),
            (512, 512, 64, 1),
            (256, 128, 512, 1),
        ],
    }
}
