//! pfstorer: personalized face restoration and super-resolution (PFStorer, CVPR 2024) on candle.
//!
//! The base model is StableSR-face: an SD-2.1 UNet with SFT/SPADE conditioning from a time-aware
//! LQ encoder ([`model::unet`], [`model::lq_encoder`]), an OpenCLIP ViT-H text encoder
//! ([`model::text_encoder`]) and a VAE whose decoder fuses encoder features (CFW,
//! [`model::vae`]). [`diffusion`] holds the schedule, the DDPM sampler with classifier-free
//! guidance and the tiled canvas sampler; [`imaging`] the image work around them; [`degrade`] the
//! synthetic degradations of the paper; [`metrics`] PSNR/SSIM. [`personalize`] learns an
//! identity on a frozen base; [`base_training`] fine-tunes the base itself (the paper's Base
//! Model); both update with [`optim`]'s AdamW.

pub mod allocator;
pub mod base_training;
pub mod bench;
pub mod cli;
pub mod config;
pub mod degrade;
pub mod device;
pub mod diffusion;
pub mod error;
pub mod faces;
pub mod fsutil;
pub mod imaging;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod personalize;
pub mod prompts;
pub mod restore;
pub mod seeds;
pub mod weights;

pub use error::{Error, Result};
