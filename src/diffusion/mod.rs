//! The diffusion process around the networks: schedule, DDPM sampler with CFG, tiled canvas.

pub mod canvas;
pub mod noise;
pub mod sampler;
pub mod schedule;
