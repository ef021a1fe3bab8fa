//! The timestep embedding of the openaimodel networks, shared by the UNet and the time-aware
//! encoder.

use super::nn::{linear, Linear};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Sinusoidal timestep embedding of the openaimodel code: `[cos(t f_k), sin(t f_k)]`,
/// `f_k = exp(-ln(10000) k / (dim/2))`, computed in f32. `timesteps` holds one value per batch row.
pub fn timestep_embedding(timesteps: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let device = timesteps.device();
    // f32 arithmetic in the reference's order, so the phases at t ~ 1000 round the same way.
    let neg_log_period = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|k| (neg_log_period * k as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), device)?;
    let t = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?;
    let args = t.broadcast_mul(&freqs)?;
    let emb = Tensor::cat(&[args.cos()?, args.sin()?], 1)?;
    if dim % 2 == 1 {
        let pad = Tensor::zeros((emb.dim(0)?, 1), DType::F32, device)?;
        Tensor::cat(&[emb, pad], 1)
    } else {
        Ok(emb)
    }
}

/// `time_embed` of the openaimodel networks: sinusoidal embedding of the timesteps, then
/// `Linear(mc, 4mc)`, SiLU, `Linear(4mc, 4mc)` (keys `time_embed.0` and `time_embed.2`).
#[derive(Debug, Clone)]
pub struct TimeEmbedding {
    first: Linear,
    second: Linear,
    model_channels: usize,
}

impl TimeEmbedding {
    pub fn new(model_channels: usize, vb: VarBuilder) -> Result<Self> {
        let dim = 4 * model_channels;
        Ok(TimeEmbedding {
            first: linear(model_channels, dim, vb.pp("time_embed.0"))?,
            second: linear(dim, dim, vb.pp("time_embed.2"))?,
            model_channels,
        })
    }

    /// `[B]` original-scale timesteps -> `[B, 4mc]` in `dtype`.
    pub fn forward(&self, timesteps: &Tensor, dtype: DType) -> Result<Tensor> {
        let t = timestep_embedding(timesteps, self.model_channels)?.to_dtype(dtype)?;
        self.second.forward(&self.first.forward(&t)?.silu()?)
    }
}
