//! Additive noise of BasicSR: Gaussian (colour or gray, sigma in 0..255 units) and Poisson
//! (shot) noise. The `*_from_draws` functions take the random fields explicitly so they can
//! replay recorded reference draws; the `add_*` functions draw with our generator.

use super::Planar;
use crate::error::{Error, Result};
use rand::Rng;
use rand_distr::{Distribution, Poisson, StandardNormal};

/// numpy `generate_gaussian_noise`: `noise = randn * sigma / 255` in float32. `randn` holds
/// one field per plane (colour) or a single (h, w) field shared by all planes (gray).
pub fn gaussian_noise_from_draws(img: &Planar, randn: &[f32], sigma: f64) -> Result<Vec<f32>> {
    let hw = img.height * img.width;
    let sigma = sigma as f32;
    let gray = if randn.len() == hw {
        true
    } else if randn.len() == hw * img.channels {
        false
    } else {
        return Err(Error::Input(
            "gaussian noise field has the wrong size".into(),
        ));
    };
    Ok((0..img.data.len())
        .map(|i| {
            let r = if gray { randn[i % hw] } else { randn[i] };
            r * sigma / 255.0
        })
        .collect())
}

/// `out = clip(img + noise, 0, 1)`, optionally rounded to 8-bit levels.
pub fn add_noise_clip(img: &Planar, noise: &[f32], rounds: bool) -> Planar {
    let mut out = img.clone();
    for (o, n) in out.data.iter_mut().zip(noise) {
        let v = *o + n;
        *o = if rounds {
            super::quantize_u8(v)
        } else {
            v.clamp(0.0, 1.0)
        };
    }
    out
}

/// Adds Gaussian noise of `sigma` (0..255 units), colour or gray, clipped to [0, 1].
pub fn add_gaussian_noise<R: Rng>(img: &Planar, sigma: f64, gray: bool, rng: &mut R) -> Planar {
    let hw = img.height * img.width;
    let n = if gray { hw } else { img.data.len() };
    let randn: Vec<f32> = (0..n)
        .map(|_| StandardNormal.sample(rng))
        .map(|v: f64| v as f32)
        .collect();
    let noise = gaussian_noise_from_draws(img, &randn, sigma).unwrap_or_default();
    add_noise_clip(img, &noise, false)
}

/// `clip(round(x*255), 0, 255) / 255` on a slice.
pub fn round_to_u8_levels(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| super::quantize_u8(v)).collect()
}

/// `2**ceil(log2(#unique values))` of already quantised data.
pub fn poisson_vals(rounded: &[f32]) -> f64 {
    let mut seen = [false; 256];
    let mut n = 0usize;
    for &v in rounded {
        let idx = (v * 255.0).round().clamp(0.0, 255.0) as usize;
        if !seen[idx] {
            seen[idx] = true;
            n += 1;
        }
    }
    2f64.powf((n.max(1) as f64).log2().ceil())
}

/// OpenCV `COLOR_BGR2GRAY` / torchvision `rgb_to_grayscale` weights on an RGB planar image.
pub fn rgb_to_gray(img: &Planar, weights: [f32; 3]) -> Vec<f32> {
    let hw = img.height * img.width;
    (0..hw)
        .map(|i| {
            weights[0] * img.data[i]
                + weights[1] * img.data[hw + i]
                + weights[2] * img.data[2 * hw + i]
        })
        .collect()
}

/// numpy Poisson noise from recorded draws: `(float32(poisson / vals) - rounded) * scale`,
/// repeated over the planes when `rounded` is a single gray plane.
pub fn poisson_noise_from_draws(
    img: &Planar,
    rounded: &[f32],
    poisson: &[f64],
    vals: f64,
    scale: f64,
) -> Result<Vec<f32>> {
    let hw = img.height * img.width;
    if rounded.len() != poisson.len() || (rounded.len() != hw && rounded.len() != img.data.len()) {
        return Err(Error::Input("poisson draws have the wrong size".into()));
    }
    let base: Vec<f32> = rounded
        .iter()
        .zip(poisson)
        .map(|(&r, &p)| ((p / vals) as f32 - r) * scale as f32)
        .collect();
    Ok(if base.len() == hw {
        (0..img.data.len()).map(|i| base[i % hw]).collect()
    } else {
        base
    })
}

/// Adds Poisson noise of `scale` (colour, or gray from the RGB luma), clipped to [0, 1].
pub fn add_poisson_noise<R: Rng>(img: &Planar, scale: f64, gray: bool, rng: &mut R) -> Planar {
    let src = if gray {
        rgb_to_gray(img, [0.299, 0.587, 0.114])
    } else {
        img.data.clone()
    };
    let rounded = round_to_u8_levels(&src);
    let vals = poisson_vals(&rounded);
    let draws: Vec<f64> = rounded
        .iter()
        .map(|&r| {
            let lam = r as f64 * vals;
            if lam > 0.0 {
                Poisson::new(lam).map(|d| d.sample(rng)).unwrap_or(lam)
            } else {
                0.0
            }
        })
        .collect();
    let noise = poisson_noise_from_draws(img, &rounded, &draws, vals, scale).unwrap_or_default();
    add_noise_clip(img, &noise, false)
}
