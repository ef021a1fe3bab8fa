//! PSNR and SSIM computed the way BasicSR's `calculate_psnr` / `calculate_ssim` do (numpy
//! versions, `basicsr/metrics/psnr_ssim.py`), so numbers compare with published tables.
//!
//! BasicSR measures 8-bit images: the float images here are first quantised to 0..255 (round half
//! to even, as its `tensor2img`), then cropped by `crop_border` on every side, optionally reduced
//! to the BT.601 luma (`bgr2ycbcr(y_only=True)`, [16, 235], unrounded, with its float32 steps),
//! and evaluated in float64.

use crate::error::{Error, Result};
use crate::imaging::io::quantize_u8;
use crate::imaging::ImageF32;

/// An HWC float64 image with values on the 0..255 scale, channels in RGB order.
#[derive(Debug, Clone, PartialEq)]
pub struct Image255 {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<f64>,
}

impl Image255 {
    /// Quantises a [0, 1] image to 8-bit levels.
    pub fn from_unit(img: &ImageF32) -> Self {
        Image255 {
            width: img.width,
            height: img.height,
            channels: img.channels,
            data: img.data.iter().map(|&v| quantize_u8(v) as f64).collect(),
        }
    }

    /// Removes `border` pixels on every side.
    pub fn crop(&self, border: usize) -> Result<Self> {
        if border == 0 {
            return Ok(self.clone());
        }
        if 2 * border >= self.width || 2 * border >= self.height {
            return Err(Error::Input(format!(
                "crop border {border} leaves nothing of a {}x{} image",
                self.width, self.height
            )));
        }
        let (w, h, c) = (
            self.width - 2 * border,
            self.height - 2 * border,
            self.channels,
        );
        let mut data = Vec::with_capacity(w * h * c);
        for y in border..border + h {
            let row = (y * self.width + border) * c;
            data.extend_from_slice(&self.data[row..row + w * c]);
        }
        Ok(Image255 {
            width: w,
            height: h,
            channels: c,
            data,
        })
    }

    /// BasicSR's `to_y_channel` for a 3-channel image (other channel counts pass through):
    /// `x/255` in float32, `Y = 24.966 B + 128.553 G + 65.481 R + 16` in float64, `/255` cast
    /// to float32, `*255` in float32.
    pub fn to_y_channel(&self) -> Self {
        if self.channels != 3 {
            return self.clone();
        }
        let data = self
            .data
            .chunks_exact(3)
            .map(|px| {
                let unit = |v: f64| ((v as f32) / 255.0f32) as f64;
                let (r, g, b) = (unit(px[0]), unit(px[1]), unit(px[2]));
                let y = b * 24.966 + g * 128.553 + r * 65.481 + 16.0;
                (((y / 255.0) as f32) * 255.0f32) as f64
            })
            .collect();
        Image255 {
            width: self.width,
            height: self.height,
            channels: 1,
            data,
        }
    }

    fn plane(&self, channel: usize) -> Vec<f64> {
        self.data
            .iter()
            .skip(channel)
            .step_by(self.channels)
            .copied()
            .collect()
    }
}

fn check_same_shape(a: &Image255, b: &Image255) -> Result<()> {
    if (a.width, a.height, a.channels) != (b.width, b.height, b.channels) {
        return Err(Error::Input(format!(
            "image sizes differ: {}x{}x{} vs {}x{}x{}",
            a.width, a.height, a.channels, b.width, b.height, b.channels
        )));
    }
    Ok(())
}

fn prepare(
    a: &ImageF32,
    b: &ImageF32,
    crop_border: usize,
    test_y_channel: bool,
) -> Result<(Image255, Image255)> {
    let (a, b) = (Image255::from_unit(a), Image255::from_unit(b));
    prepare_255(&a, &b, crop_border, test_y_channel)
}

fn prepare_255(
    a: &Image255,
    b: &Image255,
    crop_border: usize,
    test_y_channel: bool,
) -> Result<(Image255, Image255)> {
    check_same_shape(a, b)?;
    let (mut a, mut b) = (a.crop(crop_border)?, b.crop(crop_border)?);
    if test_y_channel {
        a = a.to_y_channel();
        b = b.to_y_channel();
    }
    Ok((a, b))
}

/// PSNR in dB of two [0, 1] images (quantised to 8 bit first); `inf` when identical.
pub fn psnr(a: &ImageF32, b: &ImageF32, crop_border: usize, test_y_channel: bool) -> Result<f64> {
    let (a, b) = prepare(a, b, crop_border, test_y_channel)?;
    Ok(psnr_prepared(&a, &b))
}

/// PSNR of two images already on the 0..255 scale (not re-quantised).
pub fn psnr_255(
    a: &Image255,
    b: &Image255,
    crop_border: usize,
    test_y_channel: bool,
) -> Result<f64> {
    let (a, b) = prepare_255(a, b, crop_border, test_y_channel)?;
    Ok(psnr_prepared(&a, &b))
}

fn psnr_prepared(a: &Image255, b: &Image255) -> f64 {
    let sum: f64 = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    let mse = sum / a.data.len() as f64;
    if mse == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (255.0 * 255.0 / mse).log10()
}

/// SSIM of two [0, 1] images (quantised to 8 bit first), mean over channels.
pub fn ssim(a: &ImageF32, b: &ImageF32, crop_border: usize, test_y_channel: bool) -> Result<f64> {
    let (a, b) = prepare(a, b, crop_border, test_y_channel)?;
    ssim_prepared(&a, &b)
}

/// SSIM of two images already on the 0..255 scale (not re-quantised).
pub fn ssim_255(
    a: &Image255,
    b: &Image255,
    crop_border: usize,
    test_y_channel: bool,
) -> Result<f64> {
    let (a, b) = prepare_255(a, b, crop_border, test_y_channel)?;
    ssim_prepared(&a, &b)
}

/// Side of the Gaussian window.
const WINDOW: usize = 11;
const WINDOW_SIGMA: f64 = 1.5;

fn ssim_prepared(a: &Image255, b: &Image255) -> Result<f64> {
    if a.width < WINDOW || a.height < WINDOW {
        return Err(Error::Input(format!(
            "SSIM needs at least {WINDOW}x{WINDOW} pixels after cropping, got {}x{}",
            a.width, a.height
        )));
    }
    let taps = gaussian_taps(WINDOW, WINDOW_SIGMA);
    let total: f64 = (0..a.channels)
        .map(|c| ssim_plane(&a.plane(c), &b.plane(c), a.width, a.height, &taps))
        .sum();
    Ok(total / a.channels as f64)
}

/// `cv2.getGaussianKernel(n, sigma)` for sigma > 0: sampled, then scaled to sum 1.
fn gaussian_taps(n: usize, sigma: f64) -> Vec<f64> {
    let scale = -0.5 / (sigma * sigma);
    let centre = (n as f64 - 1.0) * 0.5;
    let raw: Vec<f64> = (0..n)
        .map(|i| {
            let x = i as f64 - centre;
            (scale * x * x).exp()
        })
        .collect();
    let inv_sum = 1.0 / raw.iter().sum::<f64>();
    raw.iter().map(|t| t * inv_sum).collect()
}

/// Correlation with the separable window, keeping only positions where the window lies wholly
/// inside (BasicSR filters with border handling, then slices `[5:-5, 5:-5]`, the same region).
fn filter_valid(plane: &[f64], width: usize, height: usize, taps: &[f64]) -> Vec<f64> {
    let k = taps.len();
    let out_w = width - k + 1;
    let out_h = height - k + 1;
    let mut rows = vec![0.0; out_w * height];
    for y in 0..height {
        let src = &plane[y * width..(y + 1) * width];
        let dst = &mut rows[y * out_w..(y + 1) * out_w];
        for (x, d) in dst.iter_mut().enumerate() {
            *d = taps.iter().zip(&src[x..x + k]).map(|(t, v)| t * v).sum();
        }
    }
    let mut out = vec![0.0; out_w * out_h];
    for y in 0..out_h {
        let dst = &mut out[y * out_w..(y + 1) * out_w];
        for (i, t) in taps.iter().enumerate() {
            let src = &rows[(y + i) * out_w..(y + i + 1) * out_w];
            for (d, v) in dst.iter_mut().zip(src) {
                *d += t * v;
            }
        }
    }
    out
}

fn ssim_plane(a: &[f64], b: &[f64], width: usize, height: usize, taps: &[f64]) -> f64 {
    let c1 = (0.01f64 * 255.0).powi(2);
    let c2 = (0.03f64 * 255.0).powi(2);
    let product = |f: &dyn Fn(f64, f64) -> f64| -> Vec<f64> {
        a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
    };
    let mu1 = filter_valid(a, width, height, taps);
    let mu2 = filter_valid(b, width, height, taps);
    let e11 = filter_valid(&product(&|x, _| x * x), width, height, taps);
    let e22 = filter_valid(&product(&|_, y| y * y), width, height, taps);
    let e12 = filter_valid(&product(&|x, y| x * y), width, height, taps);
    let mut sum = 0.0;
    for i in 0..mu1.len() {
        let (m1, m2) = (mu1[i], mu2[i]);
        let (m1_sq, m2_sq, m12) = (m1 * m1, m2 * m2, m1 * m2);
        let s1 = e11[i] - m1_sq;
        let s2 = e22[i] - m2_sq;
        let s12 = e12[i] - m12;
        sum += ((2.0 * m12 + c1) * (2.0 * s12 + c2)) / ((m1_sq + m2_sq + c1) * (s1 + s2 + c2));
    }
    sum / mu1.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_sum_to_one_and_are_symmetric() {
        let t = gaussian_taps(11, 1.5);
        assert!((t.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        assert_eq!(t[0], t[10]);
        assert!(t[5] > t[4]);
    }

    #[test]
    fn identical_images() {
        let img = ImageF32::new(
            16,
            12,
            3,
            (0..16 * 12 * 3).map(|i| (i % 7) as f32 / 7.0).collect(),
        );
        assert_eq!(psnr(&img, &img, 0, false).unwrap(), f64::INFINITY);
        assert!((ssim(&img, &img, 0, true).unwrap() - 1.0).abs() < 1e-12);
    }
}
