//! The networks of StableSR-face, each with `VarBuilder` paths equal to the checkpoint's keys.

pub mod base;
pub mod lq_encoder;
pub mod nn;
pub mod text_encoder;
pub mod time_embedding;
pub mod tokenizer;
pub mod unet;
pub mod vae;
