//! PFStorer personalization on the StableSR-face base: where the personalization blocks attach
//! ([`host_specs`]), the learned token ([`token`]), the two-pass personalized UNet
//! ([`dual_stream`]), the training objective and loop ([`trainer`]) and the identity file
//! ([`identity`]). The design follows `docs/personalization.md`.

pub mod block;
pub mod dual_stream;
pub mod identity;
pub mod token;
pub mod trainer;

use crate::config::UNetConfig;

pub use crate::prompts::{INIT_WORD, PLACEHOLDER};

/// Loss weights and learning rates of the spec (§4).
pub const LAMBDA_GEN: f64 = 0.1;
pub const LAMBDA_PERS: f64 = 5e-4;
pub const LR_TOKEN: f64 = 5e-3;
pub const LR_ICA: f64 = 1e-5;
pub const LR_GAMMA: f64 = 5e-3;
pub const WEIGHT_DECAY: f64 = 0.01;
/// Probability that the LQ of an iteration is the HQ itself.
pub const P_HQ: f64 = 0.03;

/// A spatial transformer that carries a personalization block.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostSpec {
    /// Checkpoint path inside the UNet, e.g. `output_blocks.4.1`.
    pub path: String,
    /// Token width `d` (heads × d_head).
    pub dim: usize,
    pub heads: usize,
    pub d_head: usize,
}

/// The hosts of `cfg`: ViCo's rule, decoder spatial transformers whose running index among all
/// spatial transformers (encoder, middle, decoder order) is even. For the released UNet this is
/// `output_blocks.{4,6,8,10}.1`; the tiny fixture UNet gets `output_blocks.{1,3}.1`.
pub fn host_specs(cfg: &UNetConfig) -> Vec<HostSpec> {
    let spec = |path: String, channels: usize| HostSpec {
        path,
        dim: channels,
        heads: channels / cfg.num_head_channels,
        d_head: cfg.num_head_channels,
    };
    // Encoder transformers (one per residual block at an attention resolution) and the middle one.
    let mut running = 0usize;
    let mut ds = 1;
    for (level, _) in cfg.channel_mult.iter().enumerate() {
        if cfg.attention_resolutions.contains(&ds) {
            running += cfg.num_res_blocks;
        }
        if level + 1 != cfg.channel_mult.len() {
            ds *= 2;
        }
    }
    running += 1;
    let mut hosts = Vec::new();
    let mut n = 0;
    for (level, &mult) in cfg.channel_mult.iter().enumerate().rev() {
        for _ in 0..=cfg.num_res_blocks {
            if cfg.attention_resolutions.contains(&ds) {
                if running.is_multiple_of(2) {
                    hosts.push(spec(
                        format!("output_blocks.{n}.1"),
                        mult * cfg.model_channels,
                    ));
                }
                running += 1;
            }
            n += 1;
        }
        if level > 0 {
            ds /= 2;
        }
    }
    hosts
}
