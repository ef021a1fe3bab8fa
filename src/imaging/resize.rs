//! Resizing that matches OpenCV `cv2.resize` (float path: INTER_AREA, INTER_LINEAR,
//! INTER_CUBIC, INTER_LANCZOS4) and PyTorch `F.interpolate` (area, bilinear, bicubic; align_corners=False,
//! no antialiasing). Both cubics use the Keys kernel with a = -0.75.
//!
//! All resizes are separable: a per-axis table of taps is built once, then rows and columns
//! are filtered (rows first, as both libraries do). Planar (C, H, W) functions serve the
//! restore pipeline's tensors; [`resize_cv2`] / [`resize_torch`] wrap HWC images.

use super::ImageF32;
use crate::error::{Error, Result};

const CUBIC_A: f64 = -0.75;

/// OpenCV interpolation modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CvInterp {
    Area,
    Linear,
    Cubic,
    /// 8-tap Lanczos (a = 4), weights normalised to sum 1; OpenCV's 8-bit path rounds them to
    /// 1/2048 fixed point, so 8-bit results may differ by one level.
    Lanczos4,
}

/// PyTorch `F.interpolate` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TorchInterp {
    Area,
    Bilinear,
    Bicubic,
}

/// For each output index: the source indices and weights that produce it.
type Taps = Vec<Vec<(usize, f32)>>;

fn cubic_weights(t: f64) -> [f64; 4] {
    let a = CUBIC_A;
    let w = |x: f64| -> f64 {
        let x = x.abs();
        if x <= 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
        } else {
            0.0
        }
    };
    [w(t + 1.0), w(t), w(1.0 - t), w(2.0 - t)]
}

fn clamp_idx(i: i64, n: usize) -> usize {
    i.clamp(0, n as i64 - 1) as usize
}

/// OpenCV's Lanczos-4 weights for the 8 source pixels `floor(x) - 3 ..= floor(x) + 4` at
/// fraction `t` of a pixel: `sinc(d)·sinc(d/4)` at distance `d`, normalised to sum 1.
fn lanczos4_weights(t: f64) -> [f64; 8] {
    if t < f32::EPSILON as f64 {
        // OpenCV's exact-hit case: the sample is the pixel itself.
        let mut w = [0.0; 8];
        w[3] = 1.0;
        return w;
    }
    let quarter_pi = std::f64::consts::FRAC_PI_4;
    let mut w = [0.0; 8];
    for (k, wk) in w.iter_mut().enumerate() {
        let d = t + 3.0 - k as f64;
        let y = d * quarter_pi;
        *wk = (y.sin() * (4.0 * y).sin()) / (4.0 * y * y);
    }
    let sum: f64 = w.iter().sum();
    w.map(|v| v / sum)
}

/// OpenCV taps along one axis (`scale` = in/out).
fn cv_taps(n_in: usize, n_out: usize, interp: CvInterp) -> Taps {
    let scale = n_in as f64 / n_out as f64;
    match interp {
        CvInterp::Area if scale >= 1.0 => cv_area_shrink_taps(n_in, n_out, scale),
        CvInterp::Area => (0..n_out)
            .map(|d| {
                // Enlarging INTER_AREA: linear taps with a pixel-overlap weight.
                let sx = (d as f64 * scale).floor();
                let mut f = (d as f64 + 1.0) - (sx + 1.0) / scale;
                f = if f <= 0.0 { 0.0 } else { f - f.floor() };
                let (mut s, mut f) = (sx as i64, f);
                if s >= n_in as i64 - 1 {
                    s = n_in as i64 - 1;
                    f = 0.0;
                }
                vec![
                    (clamp_idx(s, n_in), (1.0 - f) as f32),
                    (clamp_idx(s + 1, n_in), f as f32),
                ]
            })
            .collect(),
        CvInterp::Linear => (0..n_out)
            .map(|d| {
                let sx = (d as f64 + 0.5) * scale - 0.5;
                let s = sx.floor();
                let f = sx - s;
                let s = s as i64;
                vec![
                    (clamp_idx(s, n_in), (1.0 - f) as f32),
                    (clamp_idx(s + 1, n_in), f as f32),
                ]
            })
            .collect(),
        CvInterp::Cubic => (0..n_out)
            .map(|d| {
                let sx = (d as f64 + 0.5) * scale - 0.5;
                let s = sx.floor();
                let w = cubic_weights(sx - s);
                let s = s as i64;
                (0..4)
                    .map(|k| (clamp_idx(s - 1 + k as i64, n_in), w[k] as f32))
                    .collect()
            })
            .collect(),
        CvInterp::Lanczos4 => (0..n_out)
            .map(|d| {
                let sx = (d as f64 + 0.5) * scale - 0.5;
                let s = sx.floor();
                let w = lanczos4_weights(sx - s);
                let s = s as i64;
                (0..8)
                    .map(|k| (clamp_idx(s - 3 + k as i64, n_in), w[k] as f32))
                    .collect()
            })
            .collect(),
    }
}

/// OpenCV's exact pixel-area averaging table for shrinking.
fn cv_area_shrink_taps(n_in: usize, n_out: usize, scale: f64) -> Taps {
    (0..n_out)
        .map(|d| {
            let fs1 = d as f64 * scale;
            let fs2 = fs1 + scale;
            let mut s1 = fs1.ceil() as i64;
            let s2 = (fs2.floor() as i64).min(n_in as i64 - 1);
            s1 = s1.min(s2);
            let cell = scale.min(n_in as f64 - fs1);
            let mut taps = Vec::new();
            if s1 as f64 - fs1 > 1e-3 {
                taps.push((clamp_idx(s1 - 1, n_in), ((s1 as f64 - fs1) / cell) as f32));
            }
            for s in s1..s2 {
                taps.push((s as usize, (1.0 / cell) as f32));
            }
            if fs2 - s2 as f64 > 1e-3 {
                let wgt = (fs2 - s2 as f64).min(1.0).min(cell) / cell;
                taps.push((s2 as usize, wgt as f32));
            }
            taps
        })
        .collect()
}

/// PyTorch taps along one axis; `scale` is the coordinate scale (in/out, or 1/scale_factor).
fn torch_taps(n_in: usize, n_out: usize, mode: TorchInterp, scale: f64) -> Taps {
    match mode {
        TorchInterp::Area => (0..n_out)
            .map(|i| {
                let start = (i * n_in) / n_out;
                let end = ((i + 1) * n_in).div_ceil(n_out);
                let wgt = 1.0 / (end - start) as f32;
                (start..end).map(|s| (s, wgt)).collect()
            })
            .collect(),
        TorchInterp::Bilinear => {
            let scale = scale as f32;
            (0..n_out)
                .map(|d| {
                    let src = (scale * (d as f32 + 0.5) - 0.5).max(0.0);
                    let s0 = src as usize;
                    let s0 = s0.min(n_in - 1);
                    let s1 = if s0 < n_in - 1 { s0 + 1 } else { s0 };
                    let l1 = src - s0 as f32;
                    vec![(s0, 1.0 - l1), (s1, l1)]
                })
                .collect()
        }
        TorchInterp::Bicubic => {
            let scale = scale as f32;
            (0..n_out)
                .map(|d| {
                    let src = scale * (d as f32 + 0.5) - 0.5;
                    let s = src.floor();
                    let w = cubic_weights((src - s) as f64);
                    let s = s as i64;
                    (0..4)
                        .map(|k| (clamp_idx(s - 1 + k as i64, n_in), w[k] as f32))
                        .collect()
                })
                .collect()
        }
    }
}

/// Applies row taps then column taps to every plane of (channels, h, w) data.
fn apply_taps(
    data: &[f32],
    channels: usize,
    h: usize,
    w: usize,
    ytaps: &Taps,
    xtaps: &Taps,
) -> Vec<f32> {
    let (oh, ow) = (ytaps.len(), xtaps.len());
    let mut out = vec![0f32; channels * oh * ow];
    let mut tmp = vec![0f32; h * ow];
    for c in 0..channels {
        let plane = &data[c * h * w..(c + 1) * h * w];
        for y in 0..h {
            let row = &plane[y * w..(y + 1) * w];
            for (x, taps) in xtaps.iter().enumerate() {
                tmp[y * ow + x] = taps.iter().map(|&(s, wgt)| row[s] * wgt).sum();
            }
        }
        let oplane = &mut out[c * oh * ow..(c + 1) * oh * ow];
        for (y, taps) in ytaps.iter().enumerate() {
            let orow = &mut oplane[y * ow..(y + 1) * ow];
            for &(s, wgt) in taps {
                for (o, &t) in orow.iter_mut().zip(&tmp[s * ow..(s + 1) * ow]) {
                    *o += wgt * t;
                }
            }
        }
    }
    out
}

fn check_dims(channels: usize, h: usize, w: usize, len: usize, oh: usize, ow: usize) -> Result<()> {
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        return Err(Error::Input(format!(
            "resize: empty size {w}x{h} -> {ow}x{oh}"
        )));
    }
    if len != channels * h * w {
        return Err(Error::Input(format!(
            "resize: {len} values for {channels}x{h}x{w}"
        )));
    }
    Ok(())
}

/// `cv2.resize(src, (out_w, out_h), interpolation)` on planar (channels, h, w) float data.
pub fn resize_cv2_planar(
    data: &[f32],
    channels: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
    interp: CvInterp,
) -> Result<Vec<f32>> {
    check_dims(channels, h, w, data.len(), out_h, out_w)?;
    let ytaps = cv_taps(h, out_h, interp);
    let xtaps = cv_taps(w, out_w, interp);
    Ok(apply_taps(data, channels, h, w, &ytaps, &xtaps))
}

/// `F.interpolate(x, size=(out_h, out_w), mode)` on planar (channels, h, w) data
/// (coordinate scale in/out per axis).
pub fn resize_torch_planar(
    data: &[f32],
    channels: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
    mode: TorchInterp,
) -> Result<Vec<f32>> {
    check_dims(channels, h, w, data.len(), out_h, out_w)?;
    let ytaps = torch_taps(h, out_h, mode, h as f64 / out_h as f64);
    let xtaps = torch_taps(w, out_w, mode, w as f64 / out_w as f64);
    Ok(apply_taps(data, channels, h, w, &ytaps, &xtaps))
}

/// `F.interpolate(x, scale_factor=factor, mode)` (recompute_scale_factor=None): output
/// `floor(in*factor)`, coordinate scale `1/factor`. Returns (data, out_h, out_w).
pub fn resize_torch_scale_factor_planar(
    data: &[f32],
    channels: usize,
    h: usize,
    w: usize,
    factor: f64,
    mode: TorchInterp,
) -> Result<(Vec<f32>, usize, usize)> {
    if !factor.is_finite() || factor <= 0.0 {
        return Err(Error::Input(format!("resize: bad scale factor {factor}")));
    }
    let out_h = (h as f64 * factor).floor() as usize;
    let out_w = (w as f64 * factor).floor() as usize;
    check_dims(channels, h, w, data.len(), out_h, out_w)?;
    let ytaps = torch_taps(h, out_h, mode, 1.0 / factor);
    let xtaps = torch_taps(w, out_w, mode, 1.0 / factor);
    Ok((
        apply_taps(data, channels, h, w, &ytaps, &xtaps),
        out_h,
        out_w,
    ))
}

/// `F.interpolate(x, size=(out_h, out_w), mode='bicubic', align_corners=False)` on planar
/// (channels, h, w) float data. The result is not clipped.
pub fn resize_bicubic_torch(
    data: &[f32],
    channels: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
) -> Result<Vec<f32>> {
    resize_torch_planar(data, channels, h, w, out_h, out_w, TorchInterp::Bicubic)
}

fn hwc_to_planar(img: &ImageF32) -> Vec<f32> {
    let (c, hw) = (img.channels, img.width * img.height);
    let mut out = vec![0f32; c * hw];
    for (i, px) in img.data.chunks_exact(c).enumerate() {
        for (k, v) in px.iter().enumerate() {
            out[k * hw + i] = *v;
        }
    }
    out
}

fn planar_to_hwc(data: &[f32], c: usize, h: usize, w: usize) -> ImageF32 {
    let hw = h * w;
    let mut out = vec![0f32; c * hw];
    for k in 0..c {
        for i in 0..hw {
            out[i * c + k] = data[k * hw + i];
        }
    }
    ImageF32::new(w, h, c, out)
}

/// `cv2.resize` of an HWC image to `out_w x out_h`.
pub fn resize_cv2(
    img: &ImageF32,
    out_w: usize,
    out_h: usize,
    interp: CvInterp,
) -> Result<ImageF32> {
    let planar = hwc_to_planar(img);
    let out = resize_cv2_planar(
        &planar,
        img.channels,
        img.height,
        img.width,
        out_h,
        out_w,
        interp,
    )?;
    Ok(planar_to_hwc(&out, img.channels, out_h, out_w))
}

/// Fixed-point scale of OpenCV's 8-bit resize coefficients (`INTER_RESIZE_COEF_BITS` = 11).
const CV_COEF_SCALE: f32 = 2048.0;
/// Both passes' coefficient scales together: the 8-bit result is `(sum + 2^21) >> 22`.
const CV_COEF_SHIFT: u32 = 22;

/// `cv2.resize(img_u8, (out_w, out_h), interpolation=INTER_LANCZOS4)` bit-exactly for an 8-bit
/// image (values are taken as `round(v·255)`): OpenCV's integer path rounds every tap weight to
/// 1/2048, sums rows then columns in integers, rounds by the 22-bit shift and saturates. The
/// float path ([`resize_cv2`] with [`CvInterp::Lanczos4`]) differs from it by one level on
/// about 1% of the samples. Returns values `k/255`.
pub fn resize_cv2_lanczos4_8bit(img: &ImageF32, out_w: usize, out_h: usize) -> Result<ImageF32> {
    let (w, h, c) = (img.width, img.height, img.channels);
    check_dims(c, h, w, img.data.len(), out_h, out_w)?;
    let fixed = |taps: Taps| -> Vec<Vec<(usize, i64)>> {
        taps.into_iter()
            .map(|t| {
                t.into_iter()
                    .map(|(s, wgt)| (s, (wgt * CV_COEF_SCALE).round_ties_even() as i64))
                    .collect()
            })
            .collect()
    };
    let xtaps = fixed(cv_taps(w, out_w, CvInterp::Lanczos4));
    let ytaps = fixed(cv_taps(h, out_h, CvInterp::Lanczos4));
    let levels: Vec<i64> = img
        .data
        .iter()
        .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as i64)
        .collect();
    let mut rows = vec![0i64; h * out_w * c];
    for y in 0..h {
        for (x, taps) in xtaps.iter().enumerate() {
            for ch in 0..c {
                rows[(y * out_w + x) * c + ch] = taps
                    .iter()
                    .map(|&(s, wgt)| levels[(y * w + s) * c + ch] * wgt)
                    .sum();
            }
        }
    }
    let mut out = vec![0f32; out_h * out_w * c];
    for (y, taps) in ytaps.iter().enumerate() {
        for x in 0..out_w {
            for ch in 0..c {
                let sum: i64 = taps
                    .iter()
                    .map(|&(s, wgt)| rows[(s * out_w + x) * c + ch] * wgt)
                    .sum();
                let level = ((sum + (1 << (CV_COEF_SHIFT - 1))) >> CV_COEF_SHIFT).clamp(0, 255);
                out[(y * out_w + x) * c + ch] = level as f32 / 255.0;
            }
        }
    }
    Ok(ImageF32::new(out_w, out_h, c, out))
}

/// `F.interpolate(size=...)` of an HWC image to `out_w x out_h`.
pub fn resize_torch(
    img: &ImageF32,
    out_w: usize,
    out_h: usize,
    mode: TorchInterp,
) -> Result<ImageF32> {
    let planar = hwc_to_planar(img);
    let out = resize_torch_planar(
        &planar,
        img.channels,
        img.height,
        img.width,
        out_h,
        out_w,
        mode,
    )?;
    Ok(planar_to_hwc(&out, img.channels, out_h, out_w))
}

#[cfg(test)]
mod lanczos_tests {
    use super::*;

    #[test]
    fn lanczos4_matches_opencv_and_keeps_same_size_images() {
        // cv2.resize(p, (8, 6), interpolation=cv2.INTER_LANCZOS4) rows 0 and 3, for the 4x3
        // float32 pattern p = ((x·7 + y·13) mod 10) / 10 (opencv 5.1.0).
        let data: Vec<f32> = (0..12)
            .map(|i| (((i % 4) * 7 + (i / 4) * 13) % 10) as f32 / 10.0)
            .collect();
        let img = ImageF32::new(4, 3, 1, data);
        let out = resize_cv2(&img, 8, 6, CvInterp::Lanczos4).unwrap();
        for x in 0..8 {
            assert!(
                (out.at(x, 0, 0) - OPENCV_LANCZOS_ROW0[x]).abs() < 2e-6,
                "row 0, x={x}"
            );
            assert!(
                (out.at(x, 3, 0) - OPENCV_LANCZOS_ROW3[x]).abs() < 2e-6,
                "row 3, x={x}"
            );
        }
        let same = resize_cv2(&img, 4, 3, CvInterp::Lanczos4).unwrap();
        assert_eq!(same, img);
    }

    const OPENCV_LANCZOS_ROW0: [f32; 8] = [
        -0.1266769, 0.17784747, 0.6531663, 0.7991342, 0.51813555, 0.198008, 0.08392822, 0.07998689,
    ];
    const OPENCV_LANCZOS_ROW3: [f32; 8] = [
        0.4704217,
        0.26880398,
        0.007533435,
        0.07601898,
        0.43362963,
        0.64584804,
        0.566334,
        0.45983985,
    ];
}
