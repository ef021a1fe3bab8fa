//! Colour correction of the restored image against the LQ input (`scripts/wavelet_color_fix.py`
//! of IceClear/StableSR): AdaIN statistics transfer or wavelet low-band swap.
//!
//! Both work on NCHW float tensors in any value range; the pipeline applies them to [-1, 1]
//! images before the final clamp.

use crate::error::{Error, Result};
use candle_core::Tensor;
use std::str::FromStr;

/// Added to the variance before the square root, as in the reference's `calc_mean_std`.
const ADAIN_EPS: f64 = 1e-5;
/// Number of wavelet levels; level `i` blurs with dilation `2^i`.
const WAVELET_LEVELS: usize = 5;

/// Per-(batch, channel) mean and standard deviation (unbiased variance + eps), `[B, C, 1, 1]`.
fn mean_std(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, c, h, w) = x.dims4()?;
    let n = h * w;
    if n < 2 {
        return Err(Error::Input(format!(
            "colour fix needs at least 2 pixels per channel, got {h}x{w}"
        )));
    }
    let flat = x.reshape((b, c, n))?;
    let mean = flat.mean_keepdim(2)?;
    let var = (flat.broadcast_sub(&mean)?.sqr()?.sum_keepdim(2)? / (n - 1) as f64)?;
    let std = (var + ADAIN_EPS)?.sqrt()?;
    Ok((mean.reshape((b, c, 1, 1))?, std.reshape((b, c, 1, 1))?))
}

fn check_pair(target: &Tensor, source: &Tensor) -> Result<()> {
    let (tb, tc, _, _) = target.dims4()?;
    let (sb, sc, _, _) = source.dims4()?;
    if tb != sb || tc != sc {
        return Err(Error::Input(format!(
            "colour fix: target {:?} and source {:?} differ in batch or channels",
            target.dims(),
            source.dims()
        )));
    }
    Ok(())
}

/// Adaptive instance normalisation: gives `target` the per-channel mean and standard deviation
/// of `source`. Sizes may differ; batch and channels must agree.
pub fn adain(target: &Tensor, source: &Tensor) -> Result<Tensor> {
    check_pair(target, source)?;
    let (source_mean, source_std) = mean_std(source)?;
    let (target_mean, target_std) = mean_std(target)?;
    let normalized = target
        .broadcast_sub(&target_mean)?
        .broadcast_div(&target_std)?;
    Ok(normalized
        .broadcast_mul(&source_std)?
        .broadcast_add(&source_mean)?)
}

/// Depthwise 3x3 binomial blur ([1,2,1] x [1,2,1] / 16) with dilation `radius`, after
/// replicate-padding by `radius`, so the size is kept.
pub fn wavelet_blur(image: &Tensor, radius: usize) -> Result<Tensor> {
    let (_, channels, _, _) = image.dims4()?;
    let taps = [1f32, 2., 1.];
    let kernel: Vec<f32> = taps
        .iter()
        .flat_map(|a| taps.iter().map(move |b| a * b / 16.0))
        .collect();
    let kernel = Tensor::from_vec(kernel, (1, 1, 3, 3), image.device())?
        .to_dtype(image.dtype())?
        .repeat((channels, 1, 1, 1))?;
    let padded = image
        .pad_with_same(2, radius, radius)?
        .pad_with_same(3, radius, radius)?;
    Ok(padded.conv2d(&kernel, 0, 1, radius, channels)?)
}

/// Sum of the high-frequency bands and the remaining low band over the wavelet levels.
pub fn wavelet_decomposition(image: &Tensor) -> Result<(Tensor, Tensor)> {
    let mut high = image.zeros_like()?;
    let mut current = image.clone();
    for level in 0..WAVELET_LEVELS {
        let low = wavelet_blur(&current, 1 << level)?;
        high = (high + (&current - &low)?)?;
        current = low;
    }
    Ok((high, current))
}

/// Keeps the detail of `target` and takes the low-frequency colour of `source` (same size).
pub fn wavelet(target: &Tensor, source: &Tensor) -> Result<Tensor> {
    check_pair(target, source)?;
    if target.dims() != source.dims() {
        return Err(Error::Input(format!(
            "wavelet colour fix: target {:?} and source {:?} must have the same size",
            target.dims(),
            source.dims()
        )));
    }
    let (target_high, _) = wavelet_decomposition(target)?;
    let (_, source_low) = wavelet_decomposition(source)?;
    Ok((target_high + source_low)?)
}

/// Which colour correction to apply to the decoded image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ColorFix {
    /// Mean and standard deviation per channel matched to the LQ input (the paper's choice).
    Adain,
    /// Low frequencies from the LQ input, high frequencies from the restoration.
    Wavelet,
    /// No correction (StableSR's tile-script default).
    #[default]
    #[value(alias = "nofix")]
    None,
}

impl ColorFix {
    /// Corrects `target` (the restored image) towards the colours of `source` (the LQ input).
    pub fn apply(&self, target: &Tensor, source: &Tensor) -> Result<Tensor> {
        match self {
            ColorFix::Adain => adain(target, source),
            ColorFix::Wavelet => wavelet(target, source),
            ColorFix::None => Ok(target.clone()),
        }
    }
}

impl FromStr for ColorFix {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "adain" => Ok(ColorFix::Adain),
            "wavelet" => Ok(ColorFix::Wavelet),
            "none" | "nofix" => Ok(ColorFix::None),
            other => Err(Error::Input(format!(
                "unknown colour fix `{other}` (expected adain, wavelet or none)"
            ))),
        }
    }
}

impl std::fmt::Display for ColorFix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ColorFix::Adain => "adain",
            ColorFix::Wavelet => "wavelet",
            ColorFix::None => "none",
        })
    }
}
