//! Image filtering: BasicSR `filter2D` / `cv2.filter2D` (correlation, reflect-101 border),
//! `cv2.medianBlur` (replicated border) and unsharp masking (`USMSharp`).

use super::kernels::{gaussian_kernel_1d, Kernel};
use super::Planar;
use crate::error::{Error, Result};

/// Mirror index without repeating the edge pixel (PyTorch `reflect`, OpenCV
/// `BORDER_REFLECT_101`), folded repeatedly so any offset is valid.
pub fn reflect101(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize) - 2;
    let mut m = i.rem_euclid(period);
    if m >= n as isize {
        m = period - m;
    }
    m as usize
}

fn replicate(i: isize, n: usize) -> usize {
    i.clamp(0, n as isize - 1) as usize
}

/// Pads one plane by `(py, px)` on every side with reflect-101.
fn pad_plane(src: &[f32], h: usize, w: usize, py: usize, px: usize) -> (Vec<f32>, usize) {
    let pw = w + 2 * px;
    let ph = h + 2 * py;
    let mut out = vec![0f32; ph * pw];
    let cols: Vec<usize> = (0..pw)
        .map(|x| reflect101(x as isize - px as isize, w))
        .collect();
    for y in 0..ph {
        let sy = reflect101(y as isize - py as isize, h);
        let row = &src[sy * w..(sy + 1) * w];
        for (o, &c) in out[y * pw..(y + 1) * pw].iter_mut().zip(&cols) {
            *o = row[c];
        }
    }
    (out, pw)
}

/// Direct 2-D correlation of one plane with a `kh x kw` kernel (anchor at the centre,
/// reflect-101 border): what `F.conv2d` after reflect padding and `cv2.filter2D` compute.
pub fn filter2d_plane(
    src: &[f32],
    h: usize,
    w: usize,
    kernel: &[f32],
    kh: usize,
    kw: usize,
) -> Vec<f32> {
    let (padded, pw) = pad_plane(src, h, w, kh / 2, kw / 2);
    let mut out = vec![0f32; h * w];
    for y in 0..h {
        let orow = &mut out[y * w..(y + 1) * w];
        for ky in 0..kh {
            let prow = &padded[(y + ky) * pw..(y + ky + 1) * pw];
            for kx in 0..kw {
                let k = kernel[ky * kw + kx];
                if k == 0.0 {
                    continue;
                }
                for (o, &p) in orow.iter_mut().zip(&prow[kx..kx + w]) {
                    *o += k * p;
                }
            }
        }
    }
    out
}

/// Separable correlation: rows with `kx`, then columns with `ky`, reflect-101 border.
pub fn sep_filter_plane(src: &[f32], h: usize, w: usize, ky: &[f32], kx: &[f32]) -> Vec<f32> {
    let (py, px) = (ky.len() / 2, kx.len() / 2);
    let (padded, pw) = pad_plane(src, h, w, py, px);
    let ph = h + 2 * py;
    let mut tmp = vec![0f32; ph * w];
    for y in 0..ph {
        let prow = &padded[y * pw..(y + 1) * pw];
        let trow = &mut tmp[y * w..(y + 1) * w];
        for (j, &k) in kx.iter().enumerate() {
            for (t, &p) in trow.iter_mut().zip(&prow[j..j + w]) {
                *t += k * p;
            }
        }
    }
    let mut out = vec![0f32; h * w];
    for y in 0..h {
        let orow = &mut out[y * w..(y + 1) * w];
        for (j, &k) in ky.iter().enumerate() {
            for (o, &t) in orow.iter_mut().zip(&tmp[(y + j) * w..(y + j + 1) * w]) {
                *o += k * t;
            }
        }
    }
    out
}

/// Symmetric eigen-decomposition (cyclic Jacobi) of an n x n row-major matrix; returns
/// (eigenvalues, eigenvectors as columns of a row-major matrix).
fn jacobi_eigen(mut a: Vec<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..60 {
        let mut off = 0.0;
        for p in 0..n {
            for q in p + 1..n {
                off += a[p * n + q] * a[p * n + q];
            }
        }
        let diag: f64 = (0..n).map(|i| a[i * n + i] * a[i * n + i]).sum();
        if off <= 1e-32 * diag.max(1e-300) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let akp = a[k * n + p];
                    let akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let apk = a[p * n + k];
                    let aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let vkp = v[k * n + p];
                    let vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

/// Rank-r separable decomposition `K ~= sum_i col_i row_i^T` (from the SVD of K), keeping
/// components until the residual's Frobenius norm is below `tol`. `None` when the kernel needs
/// so many components that direct filtering is cheaper.
pub fn separable_terms(kernel: &Kernel, tol: f64) -> Option<Vec<(Vec<f32>, Vec<f32>)>> {
    let n = kernel.size;
    let k = &kernel.data;
    let mut ktk = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            let s: f64 = (0..n).map(|r| k[r * n + i] * k[r * n + j]).sum();
            ktk[i * n + j] = s;
            ktk[j * n + i] = s;
        }
    }
    let (vals, vecs) = jacobi_eigen(ktk, n);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]));
    let total: f64 = vals.iter().map(|v| v.max(0.0)).sum();
    let mut remaining = total;
    let mut terms = Vec::new();
    for &i in &order {
        if remaining.max(0.0).sqrt() <= tol {
            break;
        }
        if 2 * (terms.len() + 1) * n > n * n * 3 / 4 {
            return None;
        }
        let row: Vec<f64> = (0..n).map(|j| vecs[j * n + i]).collect();
        let col: Vec<f64> = (0..n)
            .map(|r| (0..n).map(|j| k[r * n + j] * row[j]).sum())
            .collect();
        terms.push((
            col.iter().map(|&v| v as f32).collect(),
            row.iter().map(|&v| v as f32).collect(),
        ));
        remaining -= vals[i].max(0.0);
    }
    Some(terms)
}

/// `filter2D` of every plane with one float64 kernel (correlation, reflect-101). Low-rank
/// kernels (Gaussians, most BasicSR kernels) go through a separable decomposition that is
/// exact to ~1e-7 on [0, 1] images; the others are filtered directly.
pub fn filter2d(img: &Planar, kernel: &Kernel) -> Planar {
    let kernel = trim_negligible_border(kernel, 1e-9);
    let terms = separable_terms(&kernel, 1e-8);
    filter2d_with(img, &kernel, terms.as_deref())
}

/// Drops outer rings of the kernel whose total |weight| is below `tol` (a 41x41 Gaussian of
/// small sigma is mostly zeros); the result stays centred, so the filter output changes by at
/// most `tol` times the image range.
pub fn trim_negligible_border(kernel: &Kernel, tol: f64) -> Kernel {
    let n = kernel.size;
    let mut cut = 0usize;
    let mut dropped = 0f64;
    while cut + 1 < n / 2 + 1 && n - 2 * (cut + 1) >= 1 {
        let (lo, hi) = (cut, n - 1 - cut);
        let ring: f64 = (lo..=hi)
            .flat_map(|i| [(lo, i), (hi, i), (i, lo), (i, hi)])
            .map(|(y, x)| kernel.data[y * n + x].abs())
            .sum();
        if dropped + ring > tol {
            break;
        }
        dropped += ring;
        cut += 1;
    }
    if cut == 0 {
        return kernel.clone();
    }
    let m = n - 2 * cut;
    let data = (0..m * m)
        .map(|i| kernel.data[(i / m + cut) * n + i % m + cut])
        .collect();
    Kernel { size: m, data }
}

/// `filter2D` with the plain direct correlation in float32 (the reference's arithmetic).
pub fn filter2d_direct(img: &Planar, kernel: &Kernel) -> Planar {
    filter2d_with(img, kernel, None)
}

fn filter2d_with(img: &Planar, kernel: &Kernel, terms: Option<&[(Vec<f32>, Vec<f32>)]>) -> Planar {
    let (h, w) = (img.height, img.width);
    let k32 = kernel.to_f32();
    let mut out = Planar {
        channels: img.channels,
        height: h,
        width: w,
        data: Vec::with_capacity(img.data.len()),
    };
    for c in 0..img.channels {
        let plane = img.plane(c);
        let res = match terms {
            Some(terms) if !terms.is_empty() => {
                let mut acc = vec![0f32; h * w];
                for (col, row) in terms {
                    let part = sep_filter_plane(plane, h, w, col, row);
                    acc.iter_mut().zip(&part).for_each(|(a, p)| *a += p);
                }
                acc
            }
            _ => filter2d_plane(plane, h, w, &k32, kernel.size, kernel.size),
        };
        out.data.extend_from_slice(&res);
    }
    out
}

/// `cv2.medianBlur(img, ksize)` (odd ksize, replicated border) on every plane.
pub fn median_blur(img: &Planar, ksize: usize) -> Result<Planar> {
    if ksize == 0 || ksize.is_multiple_of(2) {
        return Err(Error::Input(format!(
            "median blur size must be odd, got {ksize}"
        )));
    }
    let (h, w) = (img.height, img.width);
    let r = (ksize / 2) as isize;
    let mut out = img.clone();
    let mut window = Vec::with_capacity(ksize * ksize);
    for c in 0..img.channels {
        let src = img.plane(c);
        let dst = out.plane_mut(c);
        for y in 0..h {
            for x in 0..w {
                window.clear();
                for dy in -r..=r {
                    let sy = replicate(y as isize + dy, h);
                    for dx in -r..=r {
                        window.push(src[sy * w + replicate(x as isize + dx, w)]);
                    }
                }
                let mid = window.len() / 2;
                window.select_nth_unstable_by(mid, |a, b| a.total_cmp(b));
                dst[y * w + x] = window[mid];
            }
        }
    }
    Ok(out)
}

/// Unsharp masking as StableSR applies it to the ground truth (`USMSharp` / `usm_sharp`):
/// Gaussian blur (size `2*radius+1`, OpenCV sigma rule), residual mask `|res|*255 > threshold`
/// softened by the same blur, `out = soft*clip(img + weight*res) + (1-soft)*img`.
pub fn usm_sharp(img: &Planar, weight: f32, radius: usize, threshold: f32) -> Planar {
    let k = 2 * radius + 1;
    let g: Vec<f32> = gaussian_kernel_1d(k, 0.0)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let (h, w) = (img.height, img.width);
    let mut out = img.clone();
    for c in 0..img.channels {
        let src = img.plane(c);
        let blur = sep_filter_plane(src, h, w, &g, &g);
        let residual: Vec<f32> = src.iter().zip(&blur).map(|(a, b)| a - b).collect();
        let mask: Vec<f32> = residual
            .iter()
            .map(|r| {
                if (r * 255.0).abs() > threshold {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        let soft = sep_filter_plane(&mask, h, w, &g, &g);
        let dst = out.plane_mut(c);
        for i in 0..h * w {
            let sharp = (src[i] + weight * residual[i]).clamp(0.0, 1.0);
            dst[i] = soft[i] * sharp + (1.0 - soft[i]) * src[i];
        }
    }
    out
}
