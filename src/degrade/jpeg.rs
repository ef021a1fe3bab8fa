//! DiffJPEG (`basicsr/utils/diffjpeg.py`, `differentiable=False`): the deterministic JPEG model
//! of StableSR's second-order degradation. Used by both pipelines of [`super::pipeline`] for
//! the JPEG step (a libjpeg round trip as in `add_jpg_compression` would tie the output to one
//! codec build; DiffJPEG gives the same blocking/ringing character and is reproducible).
//!
//! Steps on RGB in [0, 1]: zero-pad to a multiple of 16; x*255 -> YCbCr (JPEG full-range, +128
//! on Cb/Cr); 2x2 average of Cb/Cr; 8x8 DCT of (v - 128) with 0.25 a(u) a(v) scaling;
//! quantise with the module's tables (standard tables transposed, unrounded) times
//! `factor(q)` and round half to even; dequantise; IDCT; +128; chroma repeated 2x2; back to
//! RGB; clamp to [0, 255]; /255; crop.

use super::Planar;
use crate::error::{Error, Result};

const Y_TABLE: [[f32; 8]; 8] = [
    [16., 11., 10., 16., 24., 40., 51., 61.],
    [12., 12., 14., 19., 26., 58., 60., 55.],
    [14., 13., 16., 24., 40., 57., 69., 56.],
    [14., 17., 22., 29., 51., 87., 80., 62.],
    [18., 22., 37., 56., 68., 109., 103., 77.],
    [24., 35., 55., 64., 81., 104., 113., 92.],
    [49., 64., 78., 87., 103., 121., 120., 101.],
    [72., 92., 95., 98., 112., 100., 103., 99.],
];
const C_TABLE_4: [[f32; 4]; 4] = [
    [17., 18., 24., 47.],
    [18., 21., 26., 66.],
    [24., 26., 56., 99.],
    [47., 66., 99., 99.],
];

/// Quantisation table entry `(u, v)` as the module uses it (the standard table transposed).
fn table(chroma: bool, u: usize, v: usize) -> f32 {
    if chroma {
        if u < 4 && v < 4 {
            C_TABLE_4[v][u]
        } else {
            99.0
        }
    } else {
        Y_TABLE[v][u]
    }
}

/// `quality_to_factor`: 50/q for q < 50, else 2 - q/50, in float32 as DiffJPEG computes it for
/// a tensor of qualities (pass the result to [`diff_jpeg_factor`]).
pub fn quality_to_factor(quality: f32) -> f32 {
    if quality < 50.0 {
        5000.0 / quality / 100.0
    } else {
        (200.0 - quality * 2.0) / 100.0
    }
}

struct Dct {
    /// cos((2x+1) u pi / 16), index [x][u].
    basis: [[f32; 8]; 8],
    alpha: [f32; 8],
}

impl Dct {
    fn new() -> Self {
        let mut basis = [[0f32; 8]; 8];
        for (x, row) in basis.iter_mut().enumerate() {
            for (u, v) in row.iter_mut().enumerate() {
                *v = (((2 * x + 1) * u) as f64 * std::f64::consts::PI / 16.0).cos() as f32;
            }
        }
        let mut alpha = [1f32; 8];
        alpha[0] = (1.0 / 2f64.sqrt()) as f32;
        Dct { basis, alpha }
    }

    /// Quantise/dequantise one 8x8 block in place (values already shifted by -128 not yet).
    fn roundtrip(&self, block: &mut [f32; 64], chroma: bool, factor: f32) {
        // Forward DCT, separable: rows then columns (accumulation order differs from the
        // reference's tensordot only at float32 rounding level).
        let mut tmp = [0f32; 64];
        for x in 0..8 {
            for v in 0..8 {
                let mut s = 0f32;
                for y in 0..8 {
                    s += (block[x * 8 + y] - 128.0) * self.basis[y][v];
                }
                tmp[x * 8 + v] = s;
            }
        }
        let mut coef = [0f32; 64];
        for u in 0..8 {
            for v in 0..8 {
                let mut s = 0f32;
                for x in 0..8 {
                    s += tmp[x * 8 + v] * self.basis[x][u];
                }
                let scale = (self.alpha[u] as f64 * self.alpha[v] as f64 * 0.25) as f32;
                let q = table(chroma, u, v) * factor;
                let d = (scale * s) / q;
                coef[u * 8 + v] = d.round_ties_even() * q * (self.alpha[u] * self.alpha[v]);
            }
        }
        // Inverse DCT: out[x, y] = 0.25 sum_{u,v} coef[u,v] cos((2x+1)u pi/16) cos((2y+1)v pi/16) + 128.
        for u in 0..8 {
            for y in 0..8 {
                let mut s = 0f32;
                for v in 0..8 {
                    s += coef[u * 8 + v] * self.basis[y][v];
                }
                tmp[u * 8 + y] = s;
            }
        }
        for x in 0..8 {
            for y in 0..8 {
                let mut s = 0f32;
                for u in 0..8 {
                    s += tmp[u * 8 + y] * self.basis[x][u];
                }
                block[x * 8 + y] = 0.25 * s + 128.0;
            }
        }
    }
}

fn process_plane(plane: &mut [f32], h: usize, w: usize, chroma: bool, factor: f32, dct: &Dct) {
    let mut block = [0f32; 64];
    for by in (0..h).step_by(8) {
        for bx in (0..w).step_by(8) {
            for i in 0..8 {
                block[i * 8..i * 8 + 8]
                    .copy_from_slice(&plane[(by + i) * w + bx..(by + i) * w + bx + 8]);
            }
            dct.roundtrip(&mut block, chroma, factor);
            for i in 0..8 {
                plane[(by + i) * w + bx..(by + i) * w + bx + 8]
                    .copy_from_slice(&block[i * 8..i * 8 + 8]);
            }
        }
    }
}

/// DiffJPEG round trip of an RGB planar image in [0, 1] at `quality` (0 < q < 100; q = 100
/// would divide by a zero table in the reference and is rejected).
pub fn diff_jpeg(img: &Planar, quality: f32) -> Result<Planar> {
    if img.channels != 3 {
        return Err(Error::Input("DiffJPEG expects an RGB image".into()));
    }
    if quality.is_nan() || quality <= 0.0 || quality >= 100.0 {
        return Err(Error::Input(format!(
            "JPEG quality must be in (0, 100), got {quality}"
        )));
    }
    // A scalar quality is converted in double precision, then multiplies the float32 tables.
    let q = quality as f64;
    let factor = if q < 50.0 {
        5000.0 / q / 100.0
    } else {
        (200.0 - q * 2.0) / 100.0
    };
    diff_jpeg_factor(img, factor as f32)
}

/// DiffJPEG with an explicit quantisation factor.
pub fn diff_jpeg_factor(img: &Planar, factor: f32) -> Result<Planar> {
    let (h, w) = (img.height, img.width);
    let ph = h.div_ceil(16) * 16;
    let pw = w.div_ceil(16) * 16;
    let hw = h * w;
    let mut ycc = vec![vec![0f32; ph * pw]; 3];
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let r = img.data[i] * 255.0;
            let g = img.data[hw + i] * 255.0;
            let b = img.data[2 * hw + i] * 255.0;
            let o = y * pw + x;
            ycc[0][o] = r * 0.299 + g * 0.587 + b * 0.114;
            ycc[1][o] = r * -0.168736 + g * -0.331264 + b * 0.5 + 128.0;
            ycc[2][o] = r * 0.5 + g * -0.418688 + b * -0.081312 + 128.0;
        }
    }
    // Zero padding goes through the colour transform too (Cb/Cr of black are 128).
    for y in 0..ph {
        for x in 0..pw {
            if y >= h || x >= w {
                ycc[1][y * pw + x] = 128.0;
                ycc[2][y * pw + x] = 128.0;
            }
        }
    }
    let dct = Dct::new();
    process_plane(&mut ycc[0], ph, pw, false, factor, &dct);
    let (ch, cw) = (ph / 2, pw / 2);
    let mut chroma_planes = Vec::with_capacity(2);
    for plane in &ycc[1..] {
        let mut sub = vec![0f32; ch * cw];
        for y in 0..ch {
            for x in 0..cw {
                let s = plane[2 * y * pw + 2 * x]
                    + plane[2 * y * pw + 2 * x + 1]
                    + plane[(2 * y + 1) * pw + 2 * x]
                    + plane[(2 * y + 1) * pw + 2 * x + 1];
                sub[y * cw + x] = s / 4.0;
            }
        }
        process_plane(&mut sub, ch, cw, true, factor, &dct);
        chroma_planes.push(sub);
    }
    let mut out = vec![0f32; 3 * hw];
    for y in 0..h {
        for x in 0..w {
            let yv = ycc[0][y * pw + x];
            let cb = chroma_planes[0][(y / 2) * cw + x / 2] - 128.0;
            let cr = chroma_planes[1][(y / 2) * cw + x / 2] - 128.0;
            let r = yv + 1.402 * cr;
            let g = yv - 0.344136 * cb - 0.714136 * cr;
            let b = yv + 1.772 * cb;
            let i = y * w + x;
            out[i] = r.clamp(0.0, 255.0) / 255.0;
            out[hw + i] = g.clamp(0.0, 255.0) / 255.0;
            out[2 * hw + i] = b.clamp(0.0, 255.0) / 255.0;
        }
    }
    Planar::new(3, h, w, out)
}
