//! Bilinear affine warps as OpenCV's `cv2.warpAffine(src, M, dsize, INTER_LINEAR,
//! BORDER_CONSTANT, value)` computes them, and `cv2.invertAffineTransform`.
//!
//! Conventions: `M` is 2×3, row-major, and maps SOURCE pixel coordinates to DESTINATION pixel
//! coordinates (pixel centres at integers). Like OpenCV, the warp inverts `M` and samples the
//! source at `M⁻¹·(x, y)` for every destination pixel; each of the four bilinear neighbours that
//! lies outside the source takes the border value. Images are interleaved [`ImageF32`] with any
//! channel count (a mask is one channel).
//!
//! Arithmetic, measured against opencv-python-headless 5.1.0 (the version of the fixtures): its
//! warp kernels no longer use 1/32-pixel fixed-point tables. The source coordinate is
//! `M⁻¹₀₀·x + (M⁻¹₀₁·y + M⁻¹₀₂)` in f64 — for 8-bit images then rounded to f32
//! ([`SourceCoords::F32`]), for float images kept in f64 ([`SourceCoords::F64`]) — split into
//! floor and fraction, and interpolated in f32 as two horizontal lerps and one vertical, each a
//! fused multiply-add `a + t·(b − a)`. 8-bit results are then rounded half to even with
//! saturation; that last step belongs to whoever quantises the f32 output.

use super::ImageF32;
use crate::error::{Error, Result};

/// A 2×3 affine matrix `[[a, b, tx], [c, d, ty]]`: `(x, y) ↦ (a·x + b·y + tx, c·x + d·y + ty)`.
pub type Affine = [[f64; 3]; 2];

/// How the source coordinate of a destination pixel is rounded before it is split into an
/// integer pixel and a fraction (see the module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceCoords {
    /// OpenCV's float-image kernel: f64 coordinates.
    F64,
    /// OpenCV's 8-bit kernel: coordinates rounded to f32.
    F32,
}

/// A rectangle of destination pixels: columns `x0..x0 + width`, rows `y0..y0 + height`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub x0: usize,
    pub y0: usize,
    pub width: usize,
    pub height: usize,
}

impl Window {
    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    /// Grown by `margin` pixels on every side, clipped to a `width` × `height` image.
    pub fn expanded(&self, margin: usize, width: usize, height: usize) -> Window {
        let x0 = self.x0.saturating_sub(margin);
        let y0 = self.y0.saturating_sub(margin);
        let x1 = (self.x0 + self.width + margin).min(width);
        let y1 = (self.y0 + self.height + margin).min(height);
        Window {
            x0,
            y0,
            width: x1.saturating_sub(x0),
            height: y1.saturating_sub(y0),
        }
    }
}

/// `M·(x, y)`.
pub fn apply_affine(m: &Affine, x: f64, y: f64) -> (f64, f64) {
    (
        m[0][0] * x + m[0][1] * y + m[0][2],
        m[1][0] * x + m[1][1] * y + m[1][2],
    )
}

/// `cv2.invertAffineTransform`: the inverse of the linear part and `-A⁻¹·t`. Fails on a
/// singular or non-finite matrix.
pub fn invert_affine(m: &Affine) -> Result<Affine> {
    let det = m[0][0] * m[1][1] - m[0][1] * m[1][0];
    if !det.is_finite() || det == 0.0 || m.iter().flatten().any(|v| !v.is_finite()) {
        return Err(Error::Input(format!(
            "affine matrix {m:?} is not invertible"
        )));
    }
    let inv_det = 1.0 / det;
    let a = m[1][1] * inv_det;
    let b = -m[0][1] * inv_det;
    let c = -m[1][0] * inv_det;
    let d = m[0][0] * inv_det;
    Ok([
        [a, b, -a * m[0][2] - b * m[1][2]],
        [c, d, -c * m[0][2] - d * m[1][2]],
    ])
}

/// Destination pixels of a `out_w` × `out_h` image whose bilinear sample can touch a
/// `src_w` × `src_h` source under `m` (source → destination); everything outside is pure
/// border. `None` when no pixel can.
pub fn footprint(
    m: &Affine,
    src_w: usize,
    src_h: usize,
    out_w: usize,
    out_h: usize,
) -> Option<Window> {
    // A sample at source (sx, sy) reads a source pixel iff -1 < sx < src_w and -1 < sy < src_h.
    let (w, h) = (src_w as f64, src_h as f64);
    let corners = [(-1.0, -1.0), (w, -1.0), (-1.0, h), (w, h)].map(|(x, y)| apply_affine(m, x, y));
    let min_x = corners.iter().map(|c| c.0).fold(f64::INFINITY, f64::min);
    let max_x = corners
        .iter()
        .map(|c| c.0)
        .fold(f64::NEG_INFINITY, f64::max);
    let min_y = corners.iter().map(|c| c.1).fold(f64::INFINITY, f64::min);
    let max_y = corners
        .iter()
        .map(|c| c.1)
        .fold(f64::NEG_INFINITY, f64::max);
    if !(min_x.is_finite() && max_x.is_finite() && min_y.is_finite() && max_y.is_finite()) {
        return None;
    }
    // One pixel of slack on each side covers the rounding of the sampling coordinates.
    let x0 = (min_x.floor() - 1.0).max(0.0);
    let y0 = (min_y.floor() - 1.0).max(0.0);
    let x1 = (max_x.ceil() + 2.0).min(out_w as f64);
    let y1 = (max_y.ceil() + 2.0).min(out_h as f64);
    if x1 <= x0 || y1 <= y0 {
        return None;
    }
    Some(Window {
        x0: x0 as usize,
        y0: y0 as usize,
        width: (x1 - x0) as usize,
        height: (y1 - y0) as usize,
    })
}

/// The border value for every channel: one value per channel, or a single value for all.
fn border_per_channel(border: &[f32], channels: usize) -> Result<Vec<f32>> {
    match border.len() {
        1 => Ok(vec![border[0]; channels]),
        n if n == channels => Ok(border.to_vec()),
        n => Err(Error::Input(format!(
            "warp: {n} border values for a {channels}-channel image"
        ))),
    }
}

/// `cv2.warpAffine(src, m, (out_w, out_h), INTER_LINEAR, BORDER_CONSTANT, border)`.
pub fn warp_affine(
    src: &ImageF32,
    m: &Affine,
    out_w: usize,
    out_h: usize,
    border: &[f32],
    coords: SourceCoords,
) -> Result<ImageF32> {
    let window = Window {
        x0: 0,
        y0: 0,
        width: out_w,
        height: out_h,
    };
    warp_affine_window(src, m, window, border, coords)
}

/// The pixels of `window` of [`warp_affine`]'s output (a `window.width` × `window.height`
/// image whose pixel `(i, j)` is destination pixel `(window.x0 + i, window.y0 + j)`). Work and
/// memory are proportional to the window.
pub fn warp_affine_window(
    src: &ImageF32,
    m: &Affine,
    window: Window,
    border: &[f32],
    coords: SourceCoords,
) -> Result<ImageF32> {
    let c = src.channels;
    if c == 0 || src.data.len() != src.width * src.height * c {
        return Err(Error::Input(format!(
            "warp: malformed {}x{}x{} source",
            src.width, src.height, c
        )));
    }
    if window.is_empty() {
        return Err(Error::Input(format!(
            "warp: empty output {}x{}",
            window.width, window.height
        )));
    }
    let len = window
        .width
        .checked_mul(window.height)
        .and_then(|n| n.checked_mul(c))
        .ok_or_else(|| Error::Input("warp: output size overflows".into()))?;
    let border = border_per_channel(border, c)?;
    let inv = invert_affine(m)?;
    let mut out = vec![0f32; len];
    let (w, h) = (src.width as i64, src.height as i64);
    for j in 0..window.height {
        let y = (window.y0 + j) as f64;
        let row_x = inv[0][1] * y + inv[0][2];
        let row_y = inv[1][1] * y + inv[1][2];
        for i in 0..window.width {
            let x = (window.x0 + i) as f64;
            let sx = inv[0][0] * x + row_x;
            let sy = inv[1][0] * x + row_y;
            let (ix, iy, fx, fy) = split_coords(sx, sy, coords);
            let dst = &mut out[(j * window.width + i) * c..(j * window.width + i + 1) * c];
            if ix < -1 || iy < -1 || ix >= w || iy >= h {
                dst.copy_from_slice(&border);
                continue;
            }
            let inside = ix >= 0 && iy >= 0 && ix + 1 < w && iy + 1 < h;
            let fetch = |px: i64, py: i64, k: usize| -> f32 {
                if inside || (px >= 0 && py >= 0 && px < w && py < h) {
                    src.data[((py * w + px) as usize) * c + k]
                } else {
                    border[k]
                }
            };
            for (k, d) in dst.iter_mut().enumerate() {
                let p00 = fetch(ix, iy, k);
                let p01 = fetch(ix + 1, iy, k);
                let p10 = fetch(ix, iy + 1, k);
                let p11 = fetch(ix + 1, iy + 1, k);
                let top = fx.mul_add(p01 - p00, p00);
                let bottom = fx.mul_add(p11 - p10, p10);
                *d = fy.mul_add(bottom - top, top);
            }
        }
    }
    Ok(ImageF32::new(window.width, window.height, c, out))
}

/// Integer pixel (floor) and f32 fraction of a source coordinate, rounded as `coords` says.
#[inline]
fn split_coords(sx: f64, sy: f64, coords: SourceCoords) -> (i64, i64, f32, f32) {
    // Far-away coordinates are clamped so the integer conversion stays meaningful; anything
    // beyond ±2^30 is outside every image anyway.
    const FAR: f64 = (1u64 << 30) as f64;
    let (sx, sy) = (sx.clamp(-FAR, FAR), sy.clamp(-FAR, FAR));
    match coords {
        SourceCoords::F64 => {
            let (fx, fy) = (sx.floor(), sy.floor());
            (fx as i64, fy as i64, (sx - fx) as f32, (sy - fy) as f32)
        }
        SourceCoords::F32 => {
            let (sx, sy) = (sx as f32, sy as f32);
            let (fx, fy) = (sx.floor(), sy.floor());
            (fx as i64, fy as i64, sx - fx, sy - fy)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: usize, h: usize) -> ImageF32 {
        let data = (0..w * h)
            .map(|i| ((i % w) as f32 * 0.01 + (i / w) as f32 * 0.02).min(1.0))
            .collect();
        ImageF32::new(w, h, 1, data)
    }

    #[test]
    fn inverse_composes_to_identity() {
        let m: Affine = [[1.7, -0.4, 12.5], [0.3, 2.1, -7.25]];
        let inv = invert_affine(&m).unwrap();
        for (x, y) in [(0.0, 0.0), (10.0, -3.0), (123.4, 56.7)] {
            let (u, v) = apply_affine(&m, x, y);
            let (bx, by) = apply_affine(&inv, u, v);
            assert!((bx - x).abs() < 1e-12 && (by - y).abs() < 1e-12);
        }
        assert!(invert_affine(&[[1.0, 2.0, 0.0], [2.0, 4.0, 0.0]]).is_err());
    }

    #[test]
    fn translation_by_a_fraction_interpolates_linearly() {
        // Destination (x, y) samples the source at (x - 0.25, y): a quarter of the left neighbour.
        let src = ramp(8, 4);
        let m: Affine = [[1.0, 0.0, 0.25], [0.0, 1.0, 0.0]];
        let out = warp_affine(&src, &m, 8, 4, &[0.5], SourceCoords::F64).unwrap();
        for y in 0..4 {
            for x in 1..8 {
                let expect = 0.75 * src.at(x, y, 0) + 0.25 * src.at(x - 1, y, 0);
                assert!((out.at(x, y, 0) - expect).abs() < 1e-6, "({x},{y})");
            }
            // Column 0 mixes the border (0.5) with the first pixel.
            let expect = 0.75 * src.at(0, y, 0) + 0.25 * 0.5;
            assert!((out.at(0, y, 0) - expect).abs() < 1e-6);
        }
    }

    #[test]
    fn opencv_reference_values() {
        // cv2.warpAffine(np.arange(12, dtype=np.float32).reshape(3, 4) / 16, M, (5, 4),
        // borderValue=0.75) with M = [[0.9, 0.2, 0.3], [-0.1, 1.1, 0.4]] (opencv 5.1.0).
        let src = ImageF32::new(4, 3, 1, (0..12).map(|v| v as f32 / 16.0).collect());
        let m: Affine = [[0.9, 0.2, 0.3], [-0.1, 1.1, 0.4]];
        let out = warp_affine(&src, &m, 5, 4, &[0.75], SourceCoords::F64).unwrap();
        let expect: [f32; 20] = OPENCV_WARP_REFERENCE;
        for (k, (a, b)) in out.data.iter().zip(expect).enumerate() {
            assert!((a - b).abs() < 1e-6, "pixel {k}: {a} vs {b}");
        }
    }

    // Filled from opencv-python-headless 5.1.0 (see `opencv_reference_values`).
    const OPENCV_WARP_REFERENCE: [f32; 20] = [
        0.40356335, 0.25284284, 0.23905745, 0.24776982, 0.75, 0.40415156, 0.19121286, 0.28403464,
        0.37685645, 0.7199478, 0.60707283, 0.4016089, 0.4944307, 0.58725244, 0.71712947, 0.7217675,
        0.6060313, 0.6642976, 0.70908487, 0.7403931,
    ];

    #[test]
    fn windowed_warp_equals_the_full_warp() {
        let src = ramp(20, 15);
        let m: Affine = [[1.3, 0.4, -3.0], [-0.4, 1.3, 5.0]];
        let full = warp_affine(&src, &m, 30, 25, &[0.0], SourceCoords::F32).unwrap();
        let win = Window {
            x0: 4,
            y0: 7,
            width: 11,
            height: 9,
        };
        let part = warp_affine_window(&src, &m, win, &[0.0], SourceCoords::F32).unwrap();
        for j in 0..win.height {
            for i in 0..win.width {
                assert_eq!(part.at(i, j, 0), full.at(win.x0 + i, win.y0 + j, 0));
            }
        }
        let fp = footprint(&m, 20, 15, 30, 25).unwrap();
        for y in 0..25 {
            for x in 0..30 {
                let inside =
                    x >= fp.x0 && x < fp.x0 + fp.width && y >= fp.y0 && y < fp.y0 + fp.height;
                if !inside {
                    assert_eq!(full.at(x, y, 0), 0.0, "({x},{y}) outside the footprint");
                }
            }
        }
    }
}
