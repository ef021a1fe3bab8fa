//! ISP camera-noise model ("ISP model [44]" of PFStorer): Kai Zhang's `ISPModel` from
//! `utils_isp.py` (BSRGAN/SCUNet code, as published in ofsoundof/GRL-Image-Restoration).
//! sRGB is unprocessed to a noisy RGGB raw image and processed back:
//!
//! reverse: inverse gamma -> inverse tone curve -> linear sRGB to XYZ(D50) -> XYZ to camera
//! (inverse colour correction and white balance, one matrix) -> inverse exposure -> mosaic ->
//! heteroscedastic Gaussian noise; forward: Malvar demosaic -> exposure -> camera to XYZ ->
//! XYZ to linear sRGB -> tone curve -> gamma. Every stage clamps to [0, 1] except the two
//! colour-matrix steps. Images are planar RGB (3, H, W) in [0, 1].
//!
//! `data/isp_profiles.bin` (little-endian f32) holds the numbers the random draw needs, taken
//! from the reference files via `tests/fixtures/degrade/degrade.safetensors`
//! (`isp/profiles/<camera>/fm1|fm2`, `isp/tonecurves/<i>`, `isp/m_xyz2rgb`), which record
//! GRL-Image-Restoration@3123fca `utils/cameraprofile/*.mat` and `tonecurves.mat`: for the
//! 11 cameras of [`CAMERAS`] ForwardMatrix1 then ForwardMatrix2 (3x3 row-major), then for the
//! 11 tone curves of [`TONE_CURVES`] 1024 x values then 1024 y values, then the XYZ(D50) ->
//! linear sRGB(D65) matrix (sRGB matrix times Bradford D50->D65).

use super::Planar;
use crate::error::{Error, Result};
use rand::Rng;
use rand_distr::{Distribution, Normal, StandardNormal};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Camera profiles `ISPModel` chooses from (`random.choice(CameraType)`).
pub const CAMERAS: [&str; 11] = [
    "canon_eos_1d_mark_ii",
    "canon_eos_5d_mark_iii",
    "canon",
    "canon_eos_6d_v1",
    "huawei_p20",
    "huawei_p30",
    "huawei_v8",
    "nikon_d500",
    "nikon_d810",
    "nikon_d5600",
    "olympus_em1",
];

/// Tone-curve indices `ISPModel` chooses from (`np.random.choice([...])`).
pub const TONE_CURVES: [usize; 11] = [0, 1, 2, 66, 126, 115, 127, 128, 132, 133, 74];

const PROFILE_DATA: &[u8] = include_bytes!("data/isp_profiles.bin");
const N_TONE_POINTS: usize = 1024;
/// LUT step of `ToneMapping` (1e6 + 1 entries).
pub const TONE_DELTA: f64 = 1e-6;
const LUT_LEN: usize = 1_000_001;

fn profile_f32(index: usize) -> f32 {
    let b = &PROFILE_DATA[index * 4..index * 4 + 4];
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// (ForwardMatrix1, ForwardMatrix2) of a camera (row-major 3x3).
pub fn forward_matrices(camera: usize) -> Result<([f32; 9], [f32; 9])> {
    if camera >= CAMERAS.len() {
        return Err(Error::Input(format!(
            "ISP camera index {camera} out of range"
        )));
    }
    let base = camera * 18;
    Ok((
        std::array::from_fn(|i| profile_f32(base + i)),
        std::array::from_fn(|i| profile_f32(base + 9 + i)),
    ))
}

/// Control points (x, y) of tone curve `TONE_CURVES[slot]`.
pub fn tone_curve(slot: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    if slot >= TONE_CURVES.len() {
        return Err(Error::Input(format!(
            "ISP tone-curve slot {slot} out of range"
        )));
    }
    let base = CAMERAS.len() * 18 + slot * 2 * N_TONE_POINTS;
    let x = (0..N_TONE_POINTS).map(|i| profile_f32(base + i)).collect();
    let y = (0..N_TONE_POINTS)
        .map(|i| profile_f32(base + N_TONE_POINTS + i))
        .collect();
    Ok((x, y))
}

/// XYZ(D50) -> linear sRGB(D65) matrix (row-major).
pub fn xyz_to_rgb_matrix() -> [f32; 9] {
    let base = CAMERAS.len() * 18 + TONE_CURVES.len() * 2 * N_TONE_POINTS;
    std::array::from_fn(|i| profile_f32(base + i))
}

/// Inverse of a 3x3 row-major matrix (float64 arithmetic, float32 result).
pub fn inverse3(m: &[f32; 9]) -> Result<[f32; 9]> {
    let a: [f64; 9] = std::array::from_fn(|i| m[i] as f64);
    let c00 = a[4] * a[8] - a[5] * a[7];
    let c01 = a[5] * a[6] - a[3] * a[8];
    let c02 = a[3] * a[7] - a[4] * a[6];
    let det = a[0] * c00 + a[1] * c01 + a[2] * c02;
    if det == 0.0 || !det.is_finite() {
        return Err(Error::Input("ISP: singular colour matrix".into()));
    }
    let inv = [
        c00,
        a[2] * a[7] - a[1] * a[8],
        a[1] * a[5] - a[2] * a[4],
        c01,
        a[0] * a[8] - a[2] * a[6],
        a[2] * a[3] - a[0] * a[5],
        c02,
        a[1] * a[6] - a[0] * a[7],
        a[0] * a[4] - a[1] * a[3],
    ];
    Ok(std::array::from_fn(|i| (inv[i] / det) as f32))
}

/// Not-a-knot cubic spline through (xs, ys) (scipy `interp1d(kind='cubic')`), evaluated at the
/// increasing points `at`. Points outside the node range use the end polynomials.
pub fn cubic_spline_eval(
    xs: &[f64],
    ys: &[f64],
    at: impl Iterator<Item = f64>,
) -> Result<Vec<f64>> {
    let n = xs.len();
    if n < 4 || ys.len() != n {
        return Err(Error::Input(
            "cubic spline needs at least 4 matching points".into(),
        ));
    }
    let h: Vec<f64> = xs.windows(2).map(|w| w[1] - w[0]).collect();
    if h.iter().any(|&d| d.is_nan() || d <= 0.0) {
        return Err(Error::Input(
            "cubic spline nodes must increase strictly".into(),
        ));
    }
    let d: Vec<f64> = (0..n - 1).map(|i| (ys[i + 1] - ys[i]) / h[i]).collect();
    // Unknown second derivatives M_1..M_{n-2}; M_0 and M_{n-1} eliminated by not-a-knot.
    let m = n - 2;
    let mut sub = vec![0f64; m];
    let mut diag = vec![0f64; m];
    let mut sup = vec![0f64; m];
    let mut rhs = vec![0f64; m];
    for k in 0..m {
        let i = k + 1;
        sub[k] = h[i - 1];
        diag[k] = 2.0 * (h[i - 1] + h[i]);
        sup[k] = h[i];
        rhs[k] = 6.0 * (d[i] - d[i - 1]);
    }
    // M_0 = ((h0+h1) M_1 - h0 M_2) / h1
    let (h0, h1) = (h[0], h[1]);
    diag[0] += h0 * (h0 + h1) / h1;
    sup[0] -= h0 * h0 / h1;
    // M_{n-1} = ((hb+ha) M_{n-2} - hb M_{n-3}) / ha with ha = h[n-3], hb = h[n-2]
    let (ha, hb) = (h[n - 3], h[n - 2]);
    diag[m - 1] += hb * (hb + ha) / ha;
    sub[m - 1] -= hb * hb / ha;
    // Thomas algorithm.
    for k in 1..m {
        let w = sub[k] / diag[k - 1];
        diag[k] -= w * sup[k - 1];
        rhs[k] -= w * rhs[k - 1];
    }
    let mut mm = vec![0f64; n];
    mm[m] = rhs[m - 1] / diag[m - 1];
    for k in (0..m - 1).rev() {
        mm[k + 1] = (rhs[k] - sup[k] * mm[k + 2]) / diag[k];
    }
    mm[0] = ((h0 + h1) * mm[1] - h0 * mm[2]) / h1;
    mm[n - 1] = ((hb + ha) * mm[n - 2] - hb * mm[n - 3]) / ha;
    let mut out = Vec::new();
    let mut seg = 0usize;
    for x in at {
        while seg + 2 < n && x > xs[seg + 1] {
            seg += 1;
        }
        let t = x - xs[seg];
        let hi = h[seg];
        let b = d[seg] - hi * (2.0 * mm[seg] + mm[seg + 1]) / 6.0;
        let c = mm[seg] / 2.0;
        let e = (mm[seg + 1] - mm[seg]) / (6.0 * hi);
        out.push(ys[seg] + t * (b + t * (c + t * e)));
    }
    Ok(out)
}

/// The two 1e6+1-entry lookup tables of `ToneMapping`.
#[derive(Debug)]
pub struct ToneLut {
    pub forward: Vec<f32>,
    pub inverse: Vec<f32>,
}

impl ToneLut {
    /// `yi = spline(X, Y)(xi)` and `yi_inv = spline(yi, xi)(xi)` on `xi = linspace(0, 1, 1e6+1)`.
    pub fn new(xs: &[f32], ys: &[f32]) -> Result<Self> {
        let xs: Vec<f64> = xs.iter().map(|&v| v as f64).collect();
        let ys: Vec<f64> = ys.iter().map(|&v| v as f64).collect();
        let grid = || (0..LUT_LEN).map(|i| i as f64 / (LUT_LEN - 1) as f64);
        let yi = cubic_spline_eval(&xs, &ys, grid())?;
        // `yi` overshoots (decreases) where a curve is flat; `interp1d` sorts its nodes
        // (stable), so the inverse spline runs through the (yi, xi) pairs in yi order.
        let mut order: Vec<usize> = (0..LUT_LEN).collect();
        order.sort_by(|&a, &b| yi[a].total_cmp(&yi[b]));
        let mut nodes_x = Vec::with_capacity(LUT_LEN);
        let mut nodes_y = Vec::with_capacity(LUT_LEN);
        for &i in &order {
            // Exact duplicates would make scipy fail; keep the first so ours stays defined.
            if nodes_x.last() != Some(&yi[i]) {
                nodes_x.push(yi[i]);
                nodes_y.push(i as f64 / (LUT_LEN - 1) as f64);
            }
        }
        let inv = cubic_spline_eval(&nodes_x, &nodes_y, grid())?;
        Ok(ToneLut {
            forward: yi.iter().map(|&v| v as f32).collect(),
            inverse: inv.iter().map(|&v| v as f32).collect(),
        })
    }

    /// Cached LUTs of tone-curve slot `slot` (building one takes a few tens of ms).
    pub fn cached(slot: usize) -> Result<Arc<ToneLut>> {
        static CACHE: OnceLock<Mutex<HashMap<usize, Arc<ToneLut>>>> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        if let Some(lut) = cache.lock().ok().and_then(|c| c.get(&slot).cloned()) {
            return Ok(lut);
        }
        let (x, y) = tone_curve(slot)?;
        let lut = Arc::new(ToneLut::new(&x, &y)?);
        if let Ok(mut c) = cache.lock() {
            c.insert(slot, lut.clone());
        }
        Ok(lut)
    }
}

fn lut_lookup(lut: &[f32], x: f32) -> f32 {
    let idx = (x.clamp(0.0, 1.0) / TONE_DELTA as f32).round_ties_even() as usize;
    lut[idx.min(lut.len() - 1)].clamp(0.0, 1.0)
}

/// `ToneMapping.forward`.
pub fn tone_forward(img: &mut Planar, lut: &ToneLut) {
    img.data
        .iter_mut()
        .for_each(|v| *v = lut_lookup(&lut.forward, *v));
}

/// `ToneMapping.reverse`.
pub fn tone_reverse(img: &mut Planar, lut: &ToneLut) {
    img.data
        .iter_mut()
        .for_each(|v| *v = lut_lookup(&lut.inverse, *v));
}

/// `GammaCorrect.forward` (linear -> sRGB).
pub fn gamma_forward(img: &mut Planar) {
    for v in img.data.iter_mut() {
        let x = v.clamp(0.0, 1.0);
        let y = if x > 0.0031308 {
            1.055 * x.powf(1.0 / 2.4) - 0.055
        } else {
            12.92 * x
        };
        *v = y.clamp(0.0, 1.0);
    }
}

/// `GammaCorrect.reverse` (sRGB -> linear).
pub fn gamma_reverse(img: &mut Planar) {
    for v in img.data.iter_mut() {
        let x = v.clamp(0.0, 1.0);
        let y = if x <= 0.04045 {
            x.max(1e-8) / 12.92
        } else {
            ((200.0 * x + 11.0) / 211.0).powf(2.4)
        };
        *v = y.clamp(0.0, 1.0);
    }
}

/// Per-pixel colour matrix `out_c = sum_k m[c][k] x_k` (no clamping).
pub fn color_matrix(img: &mut Planar, m: &[f32; 9]) {
    let hw = img.height * img.width;
    for i in 0..hw {
        let x = [img.data[i], img.data[hw + i], img.data[2 * hw + i]];
        for c in 0..3 {
            img.data[c * hw + i] = x[0] * m[c * 3] + x[1] * m[c * 3 + 1] + x[2] * m[c * 3 + 2];
        }
    }
}

/// `ExposureCompensation.forward` (`reverse = false`) or `.reverse`.
pub fn exposure(img: &mut Planar, exposure: f32, reverse: bool) {
    let gain = 2f32.powf(exposure);
    for v in img.data.iter_mut() {
        *v = if reverse { *v / gain } else { *v * gain }.clamp(0.0, 1.0);
    }
}

/// `Demosaic.reverse`: RGGB mosaic (R at (0,0), G at (0,1) and (1,0), B at (1,1)).
pub fn mosaic(img: &Planar) -> Planar {
    let (h, w) = (img.height, img.width);
    let hw = h * w;
    let data = (0..hw)
        .map(|i| {
            let (y, x) = (i / w, i % w);
            let c = match (y % 2, x % 2) {
                (0, 0) => 0,
                (1, 1) => 2,
                _ => 1,
            };
            img.data[c * hw + i].clamp(0.0, 1.0)
        })
        .collect();
    Planar {
        channels: 1,
        height: h,
        width: w,
        data,
    }
}

/// `Demosaic.forward`: Malvar-He-Cutler 5x5 demosaicing (reflect-101 padding by 2), clamp.
pub fn demosaic(raw: &Planar) -> Planar {
    let (h, w) = (raw.height, raw.width);
    let k_g_at_rb: [[f32; 5]; 5] = [
        [0., 0., -1., 0., 0.],
        [0., 0., 2., 0., 0.],
        [-1., 2., 4., 2., -1.],
        [0., 0., 2., 0., 0.],
        [0., 0., -1., 0., 0.],
    ];
    let k_rb_row: [[f32; 5]; 5] = [
        [0., 0., 0.5, 0., 0.],
        [0., -1., 0., -1., 0.],
        [-1., 4., 5., 4., -1.],
        [0., -1., 0., -1., 0.],
        [0., 0., 0.5, 0., 0.],
    ];
    let k_rb_col: [[f32; 5]; 5] = std::array::from_fn(|i| std::array::from_fn(|j| k_rb_row[j][i]));
    let k_rb_diag: [[f32; 5]; 5] = [
        [0., 0., -1.5, 0., 0.],
        [0., 2., 0., 2., 0.],
        [-1.5, 0., 6., 0., -1.5],
        [0., 2., 0., 2., 0.],
        [0., 0., -1.5, 0., 0.],
    ];
    let kernels = [k_g_at_rb, k_rb_row, k_rb_col, k_rb_diag];
    let at = |y: isize, x: isize| -> f32 {
        raw.data[super::filter::reflect101(y, h) * w + super::filter::reflect101(x, w)]
    };
    let conv = |k: usize, y: usize, x: usize| -> f32 {
        let mut s = 0f32;
        for (dy, row) in kernels[k].iter().enumerate() {
            for (dx, &v) in row.iter().enumerate() {
                if v != 0.0 {
                    s += (v / 8.0) * at(y as isize + dy as isize - 2, x as isize + dx as isize - 2);
                }
            }
        }
        s
    };
    let hw = h * w;
    let mut out = vec![0f32; 3 * hw];
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let v = raw.data[i];
            let (r, g, b) = match (y % 2, x % 2) {
                (0, 0) => (v, conv(0, y, x), conv(3, y, x)),
                (0, 1) => (conv(1, y, x), v, conv(2, y, x)),
                (1, 0) => (conv(2, y, x), v, conv(1, y, x)),
                _ => (conv(3, y, x), conv(0, y, x), v),
            };
            out[i] = r.clamp(0.0, 1.0);
            out[hw + i] = g.clamp(0.0, 1.0);
            out[2 * hw + i] = b.clamp(0.0, 1.0);
        }
    }
    Planar {
        channels: 3,
        height: h,
        width: w,
        data: out,
    }
}

/// Per-pixel noise standard deviation `sqrt(raw*shot + read)`.
pub fn noise_std(raw: &Planar, shot: f32, read: f32) -> Vec<f32> {
    raw.data.iter().map(|&v| (v * shot + read).sqrt()).collect()
}

/// `clamp(raw + noise, 0, 1)`.
pub fn add_raw_noise(raw: &Planar, noise: &[f32]) -> Planar {
    let mut out = raw.clone();
    out.data
        .iter_mut()
        .zip(noise)
        .for_each(|(v, n)| *v = (*v + n).clamp(0.0, 1.0));
    out
}

/// Every random choice of one `ISPModel` call.
#[derive(Debug, Clone, Serialize)]
pub struct IspParams {
    pub camera: &'static str,
    pub tone_curve: usize,
    /// Blend weight of ForwardMatrix1 vs ForwardMatrix2.
    pub forward_weight: f32,
    pub wb_gains: [f32; 3],
    pub exposure: f32,
    pub shot_noise: f64,
    pub read_noise: f64,
    /// Index into [`CAMERAS`].
    #[serde(skip)]
    pub camera_index: usize,
    /// Index into [`TONE_CURVES`].
    #[serde(skip)]
    pub tone_slot: usize,
}

impl IspParams {
    /// Draws the parameters as `ISPModel.forward` and `random_noise_levels_dnd` do.
    pub fn sample<R: Rng>(rng: &mut R) -> Self {
        let camera_index = rng.gen_range(0..CAMERAS.len());
        let tone_slot = rng.gen_range(0..TONE_CURVES.len());
        let forward_weight: f32 = rng.gen();
        let u_r: f32 = rng.gen();
        let u_b: f32 = rng.gen();
        let u_e: f32 = rng.gen();
        let (lo, hi) = (1e-4f64.log10(), 0.006f64.log10());
        let log_shot = lo + rng.gen::<f64>() * (hi - lo);
        let offset: f64 = Normal::new(0.0f64, 0.25)
            .map(|n| n.sample(rng))
            .unwrap_or(0.0)
            .clamp(-1.5, 1.5);
        IspParams {
            camera: CAMERAS[camera_index],
            tone_curve: TONE_CURVES[tone_slot],
            forward_weight,
            wb_gains: [1.2 + 1.2 * u_r, 1.0, 1.2 + 1.2 * u_b],
            exposure: 0.2 * u_e - 0.1,
            shot_noise: 10f64.powf(log_shot),
            read_noise: 10f64.powf(2.275 * log_shot + 1.47 + offset),
            camera_index,
            tone_slot,
        }
    }

    /// `(FW*FM1 + (1-FW)*FM2) @ diag(wb)`: camera raw -> XYZ(D50).
    pub fn camera_to_xyz(&self) -> Result<[f32; 9]> {
        camera_to_xyz(self.camera_index, self.forward_weight, self.wb_gains)
    }
}

/// `(fw*FM1 + (1-fw)*FM2) @ diag(wb)` for camera `camera` (float32, as the reference).
pub fn camera_to_xyz(camera: usize, fw: f32, wb: [f32; 3]) -> Result<[f32; 9]> {
    let (fm1, fm2) = forward_matrices(camera)?;
    Ok(std::array::from_fn(|i| {
        (fw * fm1[i] + (1.0 - fw) * fm2[i]) * wb[i % 3]
    }))
}

/// The clean branch of `ISPModel` (reverse and forward without mosaic and noise).
pub fn isp_clean(
    img: &Planar,
    lut: &ToneLut,
    cam2xyz: &[f32; 9],
    exposure_value: f32,
) -> Result<Planar> {
    let cam2xyz_inv = inverse3(cam2xyz)?;
    let xyz2rgb = xyz_to_rgb_matrix();
    let xyz2rgb_inv = inverse3(&xyz2rgb)?;
    let mut x = img.clone();
    gamma_reverse(&mut x);
    tone_reverse(&mut x, lut);
    color_matrix(&mut x, &xyz2rgb_inv);
    color_matrix(&mut x, &cam2xyz_inv);
    exposure(&mut x, exposure_value, true);
    exposure(&mut x, exposure_value, false);
    color_matrix(&mut x, cam2xyz);
    color_matrix(&mut x, &xyz2rgb);
    tone_forward(&mut x, lut);
    gamma_forward(&mut x);
    Ok(x)
}

/// The noisy branch of `ISPModel` with our generator: returns the noisy RGB image.
pub fn apply_isp<R: Rng>(img: &Planar, p: &IspParams, rng: &mut R) -> Result<Planar> {
    if img.channels != 3 {
        return Err(Error::Input("ISP model expects RGB".into()));
    }
    let lut = ToneLut::cached(p.tone_slot)?;
    let cam2xyz = p.camera_to_xyz()?;
    let cam2xyz_inv = inverse3(&cam2xyz)?;
    let xyz2rgb = xyz_to_rgb_matrix();
    let xyz2rgb_inv = inverse3(&xyz2rgb)?;
    let mut x = img.clone();
    gamma_reverse(&mut x);
    tone_reverse(&mut x, &lut);
    color_matrix(&mut x, &xyz2rgb_inv);
    color_matrix(&mut x, &cam2xyz_inv);
    exposure(&mut x, p.exposure, true);
    let raw = mosaic(&x);
    let std = noise_std(&raw, p.shot_noise as f32, p.read_noise as f32);
    let noise: Vec<f32> = std
        .iter()
        .map(|&s| {
            let n: f64 = StandardNormal.sample(rng);
            let v = s * n as f32;
            if v.is_finite() {
                v
            } else {
                0.0
            }
        })
        .collect();
    let noisy = add_raw_noise(&raw, &noise);
    let mut y = demosaic(&noisy);
    exposure(&mut y, p.exposure, false);
    color_matrix(&mut y, &cam2xyz);
    color_matrix(&mut y, &xyz2rgb);
    tone_forward(&mut y, &lut);
    gamma_forward(&mut y);
    Ok(y)
}
