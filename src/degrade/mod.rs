//! Synthetic degradations (light and heavy pipelines of the PFStorer supplement).
//!
//! The building blocks re-implement BasicSR/StableSR (`basicsr/data/degradations.py`,
//! `basicsr/utils/img_process_util.py`, `basicsr/utils/diffjpeg.py`), Kai Zhang's ISP camera
//! model (`utils_isp.py`) and KAIR's trajectory motion-blur kernel, and are checked against the
//! reference numbers in `tests/fixtures/degrade/degrade.safetensors`:
//!
//! * [`kernels`]: Gaussian / generalized Gaussian / plateau kernels (iso and rotated aniso),
//!   `random_mixed_kernels`, the circular low-pass (sinc) kernel;
//! * [`filter`]: `filter2D` (reflect-101 correlation, with a low-rank separable fast path),
//!   median blur, unsharp masking;
//! * [`crate::imaging::resize`]: OpenCV and PyTorch resizes;
//! * [`noise`]: Gaussian (colour/gray) and Poisson noise, numpy and torch flavours;
//! * [`jpeg`]: DiffJPEG (deterministic JPEG model used by StableSR's second-order pipeline;
//!   the pipelines here use it in place of OpenCV's libjpeg so results do not depend on a codec);
//! * [`isp`]: the ISP camera-noise model stage by stage;
//! * [`motion`]: KAIR's random-trajectory motion-blur kernel.
//!
//! [`pipeline`] composes them into the two presets; its module docs list every probability
//! and range, and which ones come from StableSR where the paper is silent.

pub mod filter;
pub mod isp;
pub mod jpeg;
pub mod kernels;
pub mod motion;
pub mod noise;
pub mod pipeline;

use crate::error::{Error, Result};
use crate::imaging::ImageF32;

pub use pipeline::{DegradeParams, Eq8Params, KernelParams};

/// Degradation preset of the PFStorer supplement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Blur, optional downsampling and noise, JPEG, resize back (the paper's test setting).
    Light,
    /// ISP noise, motion/median blur, two rounds of Eq. 8 around a sinc filter (training setting).
    Heavy,
}

impl std::str::FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "light" => Ok(Preset::Light),
            "heavy" => Ok(Preset::Heavy),
            other => Err(Error::Input(format!(
                "unknown degradation preset `{other}` (expected `light` or `heavy`)"
            ))),
        }
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Preset::Light => "light",
            Preset::Heavy => "heavy",
        })
    }
}

/// Degrades an RGB image in [0, 1] with the given preset. The output has the input's size and
/// is quantised to 8-bit levels; the same seed gives the same output on every machine.
/// Gray or RGBA input is rejected (convert to RGB first).
pub fn degrade_image(
    img: &ImageF32,
    preset: Preset,
    seed: u64,
) -> Result<(ImageF32, DegradeParams)> {
    if img.channels != 3 {
        return Err(Error::Input(format!(
            "degrade expects an RGB image, got {} channels",
            img.channels
        )));
    }
    if img.width == 0 || img.height == 0 {
        return Err(Error::Input("degrade: empty image".into()));
    }
    if img.data.len() != img.width * img.height * 3 {
        return Err(Error::Input("degrade: image buffer size mismatch".into()));
    }
    pipeline::run(img, preset, seed)
}

/// A planar (C, H, W) float image; most building blocks work plane by plane.
#[derive(Debug, Clone, PartialEq)]
pub struct Planar {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl Planar {
    pub fn new(channels: usize, height: usize, width: usize, data: Vec<f32>) -> Result<Self> {
        if data.len() != channels * height * width {
            return Err(Error::Input(format!(
                "planar image: {} values for {channels}x{height}x{width}",
                data.len()
            )));
        }
        Ok(Planar {
            channels,
            height,
            width,
            data,
        })
    }

    pub fn from_hwc(img: &ImageF32) -> Self {
        let (c, h, w) = (img.channels, img.height, img.width);
        let mut data = vec![0f32; c * h * w];
        for (i, px) in img.data.chunks_exact(c).enumerate() {
            for (k, v) in px.iter().enumerate() {
                data[k * h * w + i] = *v;
            }
        }
        Planar {
            channels: c,
            height: h,
            width: w,
            data,
        }
    }

    pub fn to_hwc(&self) -> ImageF32 {
        let (c, hw) = (self.channels, self.height * self.width);
        let mut data = vec![0f32; c * hw];
        for k in 0..c {
            for (i, v) in self.data[k * hw..(k + 1) * hw].iter().enumerate() {
                data[i * c + k] = *v;
            }
        }
        ImageF32::new(self.width, self.height, c, data)
    }

    pub fn plane(&self, c: usize) -> &[f32] {
        let hw = self.height * self.width;
        &self.data[c * hw..(c + 1) * hw]
    }

    pub fn plane_mut(&mut self, c: usize) -> &mut [f32] {
        let hw = self.height * self.width;
        &mut self.data[c * hw..(c + 1) * hw]
    }
}

/// float -> 8-bit level -> float, as `clip(round(x*255), 0, 255) / 255` with round-half-to-even.
pub fn quantize_u8(x: f32) -> f32 {
    (x * 255.0).round_ties_even().clamp(0.0, 255.0) / 255.0
}
