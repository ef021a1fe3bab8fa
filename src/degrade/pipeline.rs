//! The two degradation presets of the PFStorer supplement.
//!
//! Eq. 8: `I_D = {[(I * k_sigma) down_r + n_delta]_JPEG_q} up_r`; one application of it is a
//! full round trip: the output has the input's size.
//!
//! **Light** (paper): blur always, sigma ~ U[0.1, 10]; downsampling with p = 0.7, r ~ U[1, 4];
//! Gaussian noise with p = 0.4, delta ~ U[0, 2]; JPEG always, q ~ U[30, 100); resize back.
//! Where the paper is silent the face-dataset form of BasicSR (`FFHQDegradationDataset`) is
//! used: 41x41 kernel, iso/aniso with p = 0.5 each, rotation ~ U[-pi, pi]; OpenCV INTER_LINEAR
//! for the down- and up-resize (to `(int(w/r), int(h/r))` and back); colour noise.
//!
//! **Heavy** (paper): ISP camera noise with p = 0.5; motion blur with p = 0.05; median blur
//! with p = 0.1; Eq. 8 with r ~ U[1, 10], delta ~ U[0, 15]; a sinc filter; Eq. 8 once more with
//! p = 0.9. Blur sigma and JPEG range as in the light set. StableSR second-order settings fill
//! the gaps: resize mode of every down/up resize drawn from {area, bilinear, bicubic}
//! (PyTorch `F.interpolate`); gray noise with p = 0.4; the sinc kernel size from
//! {7, 9, ..., 21} with cutoff ~ U[pi/3, pi] (U[pi/5, pi] for sizes >= 13, as for StableSR's
//! first-order sinc) zero-padded to 21. Downsampling and noise are always applied in heavy
//! Eq. 8 (r = 1 keeps the size). Motion blur is KAIR's 25x25 trajectory kernel; the median
//! filter size is 3 or 5 (p = 0.5 each), the sizes OpenCV supports on float images.
//!
//! Both presets: JPEG is DiffJPEG ([`super::jpeg`]); the result is clipped and quantised to
//! 8-bit levels, as BasicSR/StableSR do with their LQ images.

use super::filter::{filter2d, median_blur};
use super::isp::{apply_isp, IspParams};
use super::jpeg::diff_jpeg;
use super::kernels::{
    circular_lowpass_kernel, random_mixed_kernel, KernelType, MixedKernelSettings,
};
use super::motion::random_motion_kernel;
use super::noise::add_gaussian_noise;
use super::{quantize_u8, Planar, Preset};
use crate::error::Result;
use crate::imaging::resize::{resize_cv2_planar, resize_torch_planar, CvInterp, TorchInterp};
use crate::imaging::ImageF32;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::f64::consts::PI;

pub use super::kernels::MixedKernelParams as KernelParams;

/// Sampled parameters of one Eq. 8 application.
#[derive(Debug, Clone, Serialize)]
pub struct Eq8Params {
    pub kernel: KernelParams,
    /// Downscale factor r (None: no downsampling).
    pub downscale: Option<f64>,
    /// Size after downsampling, [w, h].
    pub down_size: [usize; 2],
    /// Interpolation of the down- and up-resize.
    pub resize_mode: String,
    /// Gaussian noise sigma in 0..255 units (None: no noise).
    pub noise_sigma: Option<f64>,
    pub gray_noise: bool,
    pub jpeg_quality: f32,
}

/// Sinc filter parameters.
#[derive(Debug, Clone, Serialize)]
pub struct SincParams {
    pub kernel_size: usize,
    pub cutoff: f64,
}

/// Every sampled parameter of one degradation (printed by `pfstorer degrade --print-params`).
#[derive(Debug, Clone, Serialize)]
pub struct DegradeParams {
    pub preset: Preset,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub isp: Option<IspParams>,
    pub motion_blur: bool,
    pub median_ksize: Option<usize>,
    /// Eq. 8 applications in order (light: one; heavy: one or two).
    pub eq8: Vec<Eq8Params>,
    pub sinc: Option<SincParams>,
}

struct Eq8Ranges {
    scale_prob: f64,
    scale: [f64; 2],
    noise_prob: f64,
    noise: [f64; 2],
    gray_prob: f64,
    torch_modes: bool,
}

const LIGHT: Eq8Ranges = Eq8Ranges {
    scale_prob: 0.7,
    scale: [1.0, 4.0],
    noise_prob: 0.4,
    noise: [0.0, 2.0],
    gray_prob: 0.0,
    torch_modes: false,
};

const HEAVY: Eq8Ranges = Eq8Ranges {
    scale_prob: 1.0,
    scale: [1.0, 10.0],
    noise_prob: 1.0,
    noise: [0.0, 15.0],
    gray_prob: 0.4,
    torch_modes: true,
};

fn blur_settings() -> MixedKernelSettings {
    MixedKernelSettings {
        kernel_list: vec![KernelType::Iso, KernelType::Aniso],
        kernel_prob: vec![0.5, 0.5],
        kernel_size: 41,
        sigma_x_range: [0.1, 10.0],
        sigma_y_range: [0.1, 10.0],
        rotation_range: [-PI, PI],
        betag_range: [0.5, 4.0],
        betap_range: [1.0, 2.0],
        noise_range: None,
    }
}

fn resize_planar(img: &Planar, w: usize, h: usize, mode: Option<TorchInterp>) -> Result<Planar> {
    let data = match mode {
        Some(m) => resize_torch_planar(&img.data, img.channels, img.height, img.width, h, w, m)?,
        None => resize_cv2_planar(
            &img.data,
            img.channels,
            img.height,
            img.width,
            h,
            w,
            CvInterp::Linear,
        )?,
    };
    Planar::new(img.channels, h, w, data)
}

fn eq8(img: &Planar, ranges: &Eq8Ranges, rng: &mut StdRng) -> Result<(Planar, Eq8Params)> {
    let (w, h) = (img.width, img.height);
    let (kernel, kparams) = random_mixed_kernel(rng, &blur_settings())?;
    let mut x = filter2d(img, &kernel);

    let downscale = (rng.gen::<f64>() < ranges.scale_prob)
        .then(|| rng.gen_range(ranges.scale[0]..ranges.scale[1]));
    let mode = if ranges.torch_modes {
        Some(
            [
                TorchInterp::Area,
                TorchInterp::Bilinear,
                TorchInterp::Bicubic,
            ][rng.gen_range(0..3)],
        )
    } else {
        None
    };
    let mode_name = match mode {
        Some(TorchInterp::Area) => "torch_area",
        Some(TorchInterp::Bilinear) => "torch_bilinear",
        Some(TorchInterp::Bicubic) => "torch_bicubic",
        None => "cv2_linear",
    };
    let (dw, dh) = match downscale {
        Some(r) => (
            ((w as f64 / r) as usize).max(1),
            ((h as f64 / r) as usize).max(1),
        ),
        None => (w, h),
    };
    if (dw, dh) != (w, h) {
        x = resize_planar(&x, dw, dh, mode)?;
    }

    let noise_sigma = (rng.gen::<f64>() < ranges.noise_prob)
        .then(|| rng.gen_range(ranges.noise[0]..ranges.noise[1]));
    let mut gray_noise = false;
    if let Some(sigma) = noise_sigma {
        gray_noise = rng.gen::<f64>() < ranges.gray_prob;
        x = add_gaussian_noise(&x, sigma, gray_noise, rng);
    }

    let quality = rng.gen_range(30.0f32..100.0);
    x = diff_jpeg(&x, quality)?;

    if (dw, dh) != (w, h) {
        x = resize_planar(&x, w, h, mode)?;
    }
    x.data.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
    Ok((
        x,
        Eq8Params {
            kernel: kparams,
            downscale,
            down_size: [dw, dh],
            resize_mode: mode_name.into(),
            noise_sigma,
            gray_noise,
            jpeg_quality: quality,
        },
    ))
}

/// Runs a preset (input already validated as RGB by [`super::degrade_image`]).
pub fn run(img: &ImageF32, preset: Preset, seed: u64) -> Result<(ImageF32, DegradeParams)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut x = Planar::from_hwc(img);
    let mut params = DegradeParams {
        preset,
        seed,
        width: img.width,
        height: img.height,
        isp: None,
        motion_blur: false,
        median_ksize: None,
        eq8: Vec::new(),
        sinc: None,
    };
    match preset {
        Preset::Light => {
            let (y, p) = eq8(&x, &LIGHT, &mut rng)?;
            x = y;
            params.eq8.push(p);
        }
        Preset::Heavy => {
            if rng.gen::<f64>() < 0.5 {
                let p = IspParams::sample(&mut rng);
                x = apply_isp(&x, &p, &mut rng)?;
                params.isp = Some(p);
            }
            if rng.gen::<f64>() < 0.05 {
                let k = random_motion_kernel(&mut rng, 25)?;
                x = filter2d(&x, &k);
                params.motion_blur = true;
            }
            if rng.gen::<f64>() < 0.10 {
                let k = if rng.gen::<bool>() { 3 } else { 5 };
                x = median_blur(&x, k)?;
                params.median_ksize = Some(k);
            }
            let (y, p) = eq8(&x, &HEAVY, &mut rng)?;
            x = y;
            params.eq8.push(p);

            let size = 7 + 2 * rng.gen_range(0..8usize);
            let cutoff = if size < 13 {
                rng.gen_range(PI / 3.0..PI)
            } else {
                rng.gen_range(PI / 5.0..PI)
            };
            let sinc = circular_lowpass_kernel(cutoff, size, 21)?;
            x = filter2d(&x, &sinc);
            x.data.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
            params.sinc = Some(SincParams {
                kernel_size: size,
                cutoff,
            });

            if rng.gen::<f64>() < 0.9 {
                let (y, p) = eq8(&x, &HEAVY, &mut rng)?;
                x = y;
                params.eq8.push(p);
            }
        }
    }
    x.data.iter_mut().for_each(|v| *v = quantize_u8(*v));
    Ok((x.to_hwc(), params))
}
