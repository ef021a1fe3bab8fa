//! Replaceable sources of the Gaussian noise the samplers draw.
//!
//! The samplers take every random tensor from a [`NoiseSource`], so a run can be replayed from
//! recorded draws ([`RecordedNoise`], used by the parity tests) or made reproducible across
//! machines and devices from a seed ([`SeededNoise`]).

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::collections::VecDeque;

/// Something that hands out standard-normal float32 tensors, one per call, in call order.
pub trait NoiseSource {
    fn next(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// Standard-normal draws from a seeded, platform-independent generator (`StdRng`, ChaCha12).
/// The numbers are generated on the CPU and then moved to the device, so a seed gives the same
/// noise on every machine and device (they differ from PyTorch's `randn` for the same seed).
pub struct SeededNoise {
    rng: StdRng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        SeededNoise {
            rng: StdRng::seed_from_u64(seed),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn next(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        standard_normal(&mut self.rng, shape, device)
    }
}

/// A standard-normal f32 tensor of `shape` drawn from `rng` on the CPU (the same numbers on
/// every machine), then moved to `device`.
pub fn standard_normal(rng: &mut StdRng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)?)
}

/// Replays previously recorded draws in order (e.g. the `noise.NNN` tensors of a fixture).
pub struct RecordedNoise {
    draws: VecDeque<Tensor>,
    used: usize,
}

impl RecordedNoise {
    pub fn new(draws: Vec<Tensor>) -> Self {
        RecordedNoise {
            draws: draws.into(),
            used: 0,
        }
    }

    /// Number of draws handed out so far.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Number of draws not yet handed out.
    pub fn remaining(&self) -> usize {
        self.draws.len()
    }
}

impl NoiseSource for RecordedNoise {
    fn next(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let draw = self.draws.pop_front().ok_or_else(|| {
            Error::Input(format!(
                "recorded noise exhausted: draw #{} of shape {shape:?} requested after {} draws",
                self.used, self.used
            ))
        })?;
        if draw.dims() != shape {
            return Err(Error::Input(format!(
                "recorded noise draw #{} has shape {:?}, but {shape:?} was requested",
                self.used,
                draw.dims()
            )));
        }
        self.used += 1;
        Ok(draw.to_device(device)?)
    }
}

/// The rows of a batch, each drawing from its own source: a draw of `[n, ...]` is row `i`'s
/// `[1, ...]` draw from source `i`, so samples batched together get the very numbers they get
/// one by one.
pub struct BatchedNoise {
    rows: Vec<Box<dyn NoiseSource>>,
}

impl BatchedNoise {
    pub fn new(rows: Vec<Box<dyn NoiseSource>>) -> Self {
        BatchedNoise { rows }
    }
}

impl NoiseSource for BatchedNoise {
    fn next(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        if shape.first() != Some(&self.rows.len()) {
            return Err(Error::Input(format!(
                "a batch of {} noise sources was asked for a draw of shape {shape:?}",
                self.rows.len()
            )));
        }
        let mut row_shape = shape.to_vec();
        row_shape[0] = 1;
        let draws = self
            .rows
            .iter_mut()
            .map(|row| row.next(&row_shape, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&draws, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_reproducible_and_standard_normal() {
        let dev = Device::Cpu;
        let a = SeededNoise::new(7).next(&[4, 1000], &dev).unwrap();
        let b = SeededNoise::new(7).next(&[4, 1000], &dev).unwrap();
        let va: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(va, vb);
        let mean = va.iter().map(|&x| x as f64).sum::<f64>() / va.len() as f64;
        let var = va.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / va.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var - 1.0).abs() < 0.1, "variance {var}");
        let c = SeededNoise::new(8).next(&[4, 1000], &dev).unwrap();
        let vc: Vec<f32> = c.flatten_all().unwrap().to_vec1().unwrap();
        assert_ne!(va, vc);
    }

    #[test]
    fn recorded_noise_checks_shape_and_count() {
        let dev = Device::Cpu;
        let t = Tensor::zeros((1, 2), candle_core::DType::F32, &dev).unwrap();
        let mut rec = RecordedNoise::new(vec![t.clone(), t]);
        assert!(rec.next(&[1, 2], &dev).is_ok());
        assert!(rec.next(&[2, 1], &dev).is_err());
        let mut rec = RecordedNoise::new(vec![]);
        assert!(rec.next(&[1, 2], &dev).is_err());
    }

    #[test]
    fn batched_noise_gives_each_row_its_own_sequence() {
        let dev = Device::Cpu;
        let seeds = [3u64, 11, 3];
        let mut batch = BatchedNoise::new(
            seeds
                .iter()
                .map(|&s| Box::new(SeededNoise::new(s)) as Box<dyn NoiseSource>)
                .collect(),
        );
        let mut alone: Vec<SeededNoise> = seeds.iter().map(|&s| SeededNoise::new(s)).collect();
        for _ in 0..2 {
            let drawn = batch.next(&[3, 2, 5], &dev).unwrap();
            for (i, source) in alone.iter_mut().enumerate() {
                let own: Vec<f32> = source
                    .next(&[1, 2, 5], &dev)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let row: Vec<f32> = drawn
                    .get(i)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(row, own, "row {i}");
            }
        }
        assert!(
            batch.next(&[2, 2, 5], &dev).is_err(),
            "rows must match the sources"
        );
    }
}
