//! The restoration pipeline of `pfstorer restore`, reading straight through:
//! image -> bicubic upscale -> pad -> (pixel patches when large) -> VAE encode -> DDPM over
//! latent tiles with classifier-free guidance -> CFW decode -> colour fix -> crop -> resize.
//!
//! It follows StableSR's tile script (`sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py`): the
//! LQ latent comes from the diffusion checkpoint's VAE, the fusion features from the CFW
//! encoder, sampling starts from the LQ latent noised to t = 999, images above 1280 px are
//! processed in 1280-px patches with stride 1000 blended with Gaussian weights, and each patch
//! restarts the random sequence from the seed.
//!
//! - [`settings`]: what the user asks for (sizes, steps, guidance, limits) and the plan of sizes
//!   an image goes through, known before any compute;
//! - [`denoisers`]: the UNet as the samplers' v-denoiser, with and without an identity
//!   ([`Personalization`]);
//! - [`networks`]: where each stage's networks come from: loaded once for a batch, or loaded for
//!   the stage and freed after it ([`ResidencyPolicy`]);
//! - [`pipeline`]: [`Restorer`], the steps above end to end.
//!
//! Image/tensor conversions live in [`crate::imaging::tensor`]; the prompts in [`crate::prompts`].

pub mod denoisers;
pub mod networks;
pub mod pipeline;
pub mod settings;

pub use crate::imaging::tensor::{
    image_to_tensor, pad_reflect_to_multiple, resize_bicubic_nchw, tensor_to_image,
};
pub use crate::prompts::{BASE_SUBJECT, DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT};
pub use denoisers::{ModelDenoiser, Personalization, PersonalizedDenoiser};
pub use networks::{Networks, ResidencyPolicy, StagedNetworks, WeightSource};
pub use pipeline::{Conditioning, FaceCrop, Restorer, Stage, StageSeconds};
pub use settings::{
    auto_tile_batch, bytes_per_unet_row, check_native_size, default_tile_overlap, RestorePlan,
    RestoreSettings, SamplingWork, TargetSize, BYTES_PER_PROCESSED_PIXEL, DEFAULT_MAX_PIXELS,
    MAX_NATIVE_SIZE,
};
