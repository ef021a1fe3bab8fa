//! What a restoration is asked to do: output size, sampling settings and limits, and the plan of
//! sizes one image goes through, checked before any compute.

use crate::error::{Error, Result};
use crate::imaging::colorfix::ColorFix;
use crate::imaging::patches::patches;

/// How large the output should be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TargetSize {
    /// Multiply both sides (fractional allowed).
    Scale(f64),
    /// Exact width and height.
    Size(usize, usize),
    /// Longest side in pixels, aspect kept.
    LongSide(usize),
}

impl TargetSize {
    /// Output `(width, height)` for an input of `width x height` (sizes truncate like the
    /// reference's `int()`).
    pub fn output_size(&self, width: usize, height: usize) -> Result<(usize, usize)> {
        let (w, h) = match *self {
            TargetSize::Scale(s) => {
                if !(s.is_finite() && s > 0.0) {
                    return Err(Error::Input(format!(
                        "--scale {s}: must be a positive number"
                    )));
                }
                ((width as f64 * s) as usize, (height as f64 * s) as usize)
            }
            TargetSize::Size(w, h) => (w, h),
            TargetSize::LongSide(n) => {
                let s = n as f64 / width.max(height) as f64;
                (
                    (width as f64 * s).round() as usize,
                    (height as f64 * s).round() as usize,
                )
            }
        };
        if w == 0 || h == 0 {
            return Err(Error::Input(format!("output size {w}x{h} is empty")));
        }
        Ok((w, h))
    }
}

/// Sampling and post-processing settings, with the defaults of `pfstorer restore`.
#[derive(Debug, Clone)]
pub struct RestoreSettings {
    pub steps: usize,
    /// Classifier-free guidance scale (paper Eq. 9); 1 disables the negative branch.
    pub guidance: f64,
    pub seed: u64,
    /// CFW fusion weight of the decoder.
    pub dec_w: f64,
    pub color_fix: ColorFix,
    /// Overlap of latent tiles, in latents.
    pub tile_overlap: usize,
    /// Pixel patch size and stride above which an image is processed in patches.
    pub patch_size: usize,
    pub patch_stride: usize,
    /// The model's native image size in pixels (short sides below it are processed at it, and
    /// latent tiles are this size over the VAE's downsampling factor); `None` takes
    /// `image_size` of the diffusion config.
    pub native_size: Option<usize>,
    /// Largest image, in pixels, processed at once (after upscaling and padding); larger
    /// requests are refused before any compute. Bounds the image buffers (about
    /// [`BYTES_PER_PROCESSED_PIXEL`] each pixel); the networks' memory is bounded by the patch
    /// size.
    pub max_pixels: usize,
}

/// Default of [`RestoreSettings::max_pixels`]: 64 megapixels (e.g. 8192x8192, a 4x upscale
/// of a 2048x2048 photo).
pub const DEFAULT_MAX_PIXELS: usize = 64_000_000;

/// Image buffers held per processed pixel: the upscaled and padded input, the patch blender's
/// sum and weights, the result and its crops (f32 RGB, 12 bytes each).
pub const BYTES_PER_PROCESSED_PIXEL: usize = 96;

/// Largest native size (`--input-size`, `image_size`) accepted: the released model's is 512,
/// and one latent tile of this size is what every UNet call holds.
pub const MAX_NATIVE_SIZE: usize = 2048;

/// Refuses a native size (`--input-size` or the config's `image_size`) outside 1..=
/// [`MAX_NATIVE_SIZE`].
pub fn check_native_size(native: usize) -> Result<()> {
    if native == 0 || native > MAX_NATIVE_SIZE {
        return Err(Error::Input(format!(
            "--input-size {native}: must be between 1 and {MAX_NATIVE_SIZE} pixels (the released model's is 512)"
        )));
    }
    Ok(())
}

/// The sizes one image goes through, known before any compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestorePlan {
    pub out_w: usize,
    pub out_h: usize,
    /// The size it is processed at (short side at least the native size).
    pub proc_w: usize,
    pub proc_h: usize,
    /// `proc` padded to a multiple of 32.
    pub padded_w: usize,
    pub padded_h: usize,
    /// Pixel patches (1 when the padded image fits one patch).
    pub patches: usize,
}

impl RestoreSettings {
    /// The sizes of restoring a `width x height` image to `target` with the model's native
    /// size `native`, or why it cannot be done within [`RestoreSettings::max_pixels`].
    pub fn plan(
        &self,
        native: usize,
        width: usize,
        height: usize,
        target: TargetSize,
    ) -> Result<RestorePlan> {
        let native = self.native_size.unwrap_or(native);
        check_native_size(native)?;
        let (out_w, out_h) = target.output_size(width, height)?;
        let up = (native as f64 / out_w.min(out_h) as f64).max(1.0);
        let (proc_w, proc_h) = ((out_w as f64 * up) as usize, (out_h as f64 * up) as usize);
        let (padded_w, padded_h) = (proc_w.div_ceil(32) * 32, proc_h.div_ceil(32) * 32);
        let pixels = (padded_w as u128) * (padded_h as u128);
        if pixels > self.max_pixels as u128 {
            return Err(Error::Input(format!(
                "restoring to {out_w}x{out_h} means processing {padded_w}x{padded_h} pixels ({:.0} MP, about {:.1} GB of image buffers), more than the limit of {:.0} MP; lower --scale/--size/--long-side or raise --max-megapixels",
                pixels as f64 / 1e6,
                pixels as f64 * BYTES_PER_PROCESSED_PIXEL as f64 / 1e9,
                self.max_pixels as f64 / 1e6
            )));
        }
        let patches = if padded_w <= self.patch_size && padded_h <= self.patch_size {
            1
        } else {
            patches(padded_h, padded_w, self.patch_size, self.patch_stride).len()
        };
        Ok(RestorePlan {
            out_w,
            out_h,
            proc_w,
            proc_h,
            padded_w,
            padded_h,
            patches,
        })
    }

    /// Refuses values no restoration can use: non-finite or out-of-range scalars.
    pub fn validate(&self) -> Result<()> {
        if !(self.guidance.is_finite() && (0.0..=100.0).contains(&self.guidance)) {
            return Err(Error::Input(format!(
                "--cfg {}: must be a number between 0 and 100 (1 turns guidance off)",
                self.guidance
            )));
        }
        if !(self.dec_w.is_finite() && (0.0..=1.0).contains(&self.dec_w)) {
            return Err(Error::Input(format!(
                "--dec-w {}: must be between 0 and 1",
                self.dec_w
            )));
        }
        if self.max_pixels == 0 {
            return Err(Error::Input("--max-megapixels: must be positive".into()));
        }
        Ok(())
    }
}

impl Default for RestoreSettings {
    fn default() -> Self {
        RestoreSettings {
            steps: 200,
            guidance: 4.0,
            seed: 42,
            dec_w: 0.5,
            color_fix: ColorFix::Adain,
            tile_overlap: 32,
            patch_size: 1280,
            patch_stride: 1000,
            native_size: None,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_sizes() {
        assert_eq!(
            TargetSize::Scale(4.0).output_size(32, 24).unwrap(),
            (128, 96)
        );
        // Fractional scales truncate like the reference's int().
        assert_eq!(
            TargetSize::Scale(2.5).output_size(33, 21).unwrap(),
            (82, 52)
        );
        assert_eq!(
            TargetSize::Size(2048, 1536).output_size(10, 10).unwrap(),
            (2048, 1536)
        );
        assert_eq!(
            TargetSize::LongSide(1000).output_size(400, 300).unwrap(),
            (1000, 750)
        );
        assert_eq!(
            TargetSize::LongSide(1000).output_size(300, 400).unwrap(),
            (750, 1000)
        );
        assert!(TargetSize::Scale(0.0).output_size(32, 24).is_err());
        assert!(TargetSize::Scale(f64::NAN).output_size(32, 24).is_err());
        assert!(
            TargetSize::Scale(0.01).output_size(32, 24).is_err(),
            "empty output"
        );
    }
}
