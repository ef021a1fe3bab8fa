//! Image quality metrics (PSNR, SSIM as BasicSR computes them).
//!
//! Every metric implements [`Metric`]; [`metric_by_name`] is the registry the `eval` subcommand
//! reads, so later metrics (LPIPS, landmark distance) only add an entry. [`identity`] holds the
//! dlib-ID distance (face identity, lower is better).

pub mod identity;
pub mod psnr_ssim;

pub use psnr_ssim::{psnr, ssim, Image255};

use crate::error::{Error, Result};
use crate::imaging::ImageF32;

/// Settings shared by the full-reference metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricOptions {
    /// Pixels removed on every side before measuring.
    pub crop_border: usize,
    /// Measure the BT.601 luma only.
    pub test_y_channel: bool,
}

/// A full-reference image quality metric.
pub trait Metric: Send + Sync {
    /// Short lower-case name (column header, `--metrics` value).
    fn name(&self) -> &'static str;
    /// Whether larger values mean better restorations.
    fn higher_is_better(&self) -> bool {
        true
    }
    /// Scores `restored` against `reference`; both RGB (or gray) in [0, 1], same size.
    fn compute(&self, restored: &ImageF32, reference: &ImageF32) -> Result<f64>;
}

/// PSNR in dB ([`psnr_ssim::psnr`]).
#[derive(Debug, Clone, Copy)]
pub struct Psnr(pub MetricOptions);

impl Metric for Psnr {
    fn name(&self) -> &'static str {
        "psnr"
    }
    fn compute(&self, restored: &ImageF32, reference: &ImageF32) -> Result<f64> {
        psnr(
            restored,
            reference,
            self.0.crop_border,
            self.0.test_y_channel,
        )
    }
}

/// SSIM ([`psnr_ssim::ssim`]).
#[derive(Debug, Clone, Copy)]
pub struct Ssim(pub MetricOptions);

impl Metric for Ssim {
    fn name(&self) -> &'static str {
        "ssim"
    }
    fn compute(&self, restored: &ImageF32, reference: &ImageF32) -> Result<f64> {
        ssim(
            restored,
            reference,
            self.0.crop_border,
            self.0.test_y_channel,
        )
    }
}

/// Names [`metric_by_name`] knows.
pub const METRIC_NAMES: &[&str] = &["psnr", "ssim", "dlib-id-distance"];

/// The registry: a metric from its name.
pub fn metric_by_name(name: &str, options: MetricOptions) -> Result<Box<dyn Metric>> {
    match name.to_ascii_lowercase().as_str() {
        "psnr" => Ok(Box::new(Psnr(options))),
        "ssim" => Ok(Box::new(Ssim(options))),
        "dlib-id-distance" | "dlib-id" => Ok(Box::new(identity::DlibIdDistance::new()?)),
        _ => Err(Error::Input(format!(
            "unknown metric `{name}` (known: {})",
            METRIC_NAMES.join(", ")
        ))),
    }
}
