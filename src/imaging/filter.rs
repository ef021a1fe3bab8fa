//! Erosion with a box of ones and Gaussian blur with OpenCV's defaults (`cv2.erode(x,
//! np.ones((k, k)))`, `cv2.GaussianBlur(x, (n, n), 0)`), on interleaved [`ImageF32`] data, every
//! channel on its own.
//!
//! Erosion: the anchor is the kernel centre `k / 2` (so an even kernel reaches one pixel
//! further up/left than down/right); pixels outside the image do not erode (OpenCV's default
//! border value for erosion is +∞); an empty kernel (k = 0) is OpenCV's default 3×3 box.
//! Blur: sigma 0 means `0.3·((n − 1)/2 − 1) + 0.8`, except that n ∈ {1, 3, 5, 7, 9} uses
//! OpenCV's fixed binomial-like tables; the separable f32 kernel runs rows then columns with
//! BORDER_REFLECT_101 (`dcb|abcd|cba`).

use super::ImageF32;
use crate::error::{Error, Result};

/// OpenCV's kernels for sigma ≤ 0 and the smallest odd sizes (`getGaussianKernel`).
const SMALL_GAUSSIAN: [&[f64]; 5] = [
    &[1.0],
    &[0.25, 0.5, 0.25],
    &[0.0625, 0.25, 0.375, 0.25, 0.0625],
    &[
        0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125,
    ],
    &[
        4.0 / 256.0,
        13.0 / 256.0,
        30.0 / 256.0,
        51.0 / 256.0,
        60.0 / 256.0,
        51.0 / 256.0,
        30.0 / 256.0,
        13.0 / 256.0,
        4.0 / 256.0,
    ],
];

fn check_image(img: &ImageF32, what: &str) -> Result<()> {
    if img.channels == 0
        || img.width == 0
        || img.height == 0
        || img.data.len() != img.width * img.height * img.channels
    {
        return Err(Error::Input(format!(
            "{what}: malformed {}x{}x{} image",
            img.width, img.height, img.channels
        )));
    }
    Ok(())
}

/// `cv2.erode(img, np.ones((k, k)))`: the minimum over the `k`×`k` box anchored at its centre.
pub fn erode_box(img: &ImageF32, k: usize) -> Result<ImageF32> {
    check_image(img, "erode")?;
    let k = if k == 0 { 3 } else { k };
    let (w, h, c) = (img.width, img.height, img.channels);
    // The box minimum is separable: rows, then columns.
    let mut rows = vec![0f32; img.data.len()];
    for y in 0..h {
        for x in 0..w {
            let (lo, hi) = box_range(x, k, w);
            for ch in 0..c {
                rows[(y * w + x) * c + ch] = (lo..hi)
                    .map(|s| img.data[(y * w + s) * c + ch])
                    .fold(f32::INFINITY, f32::min);
            }
        }
    }
    let mut out = vec![0f32; img.data.len()];
    for y in 0..h {
        let (lo, hi) = box_range(y, k, h);
        for x in 0..w {
            for ch in 0..c {
                out[(y * w + x) * c + ch] = (lo..hi)
                    .map(|s| rows[(s * w + x) * c + ch])
                    .fold(f32::INFINITY, f32::min);
            }
        }
    }
    Ok(ImageF32::new(w, h, c, out))
}

/// Source indices `lo..hi` of a `k`-wide box anchored at `k / 2` around `i`, clipped to `0..n`.
fn box_range(i: usize, k: usize, n: usize) -> (usize, usize) {
    let lo = i.saturating_sub(k / 2);
    let hi = (i + k - k / 2).min(n);
    (lo, hi)
}

/// `cv2.getGaussianKernel(n, 0)` as f32 (computed in f64, as OpenCV does). `n` must be odd.
pub fn gaussian_kernel(n: usize) -> Result<Vec<f32>> {
    if n.is_multiple_of(2) {
        return Err(Error::Input(format!(
            "Gaussian kernel size must be odd, got {n}"
        )));
    }
    if let Some(table) = SMALL_GAUSSIAN.get(n / 2) {
        return Ok(table.iter().map(|&v| v as f32).collect());
    }
    let sigma = 0.3 * ((n as f64 - 1.0) * 0.5 - 1.0) + 0.8;
    let scale = -0.5 / (sigma * sigma);
    let centre = (n as f64 - 1.0) * 0.5;
    let raw: Vec<f64> = (0..n)
        .map(|i| {
            let x = i as f64 - centre;
            (scale * x * x).exp()
        })
        .collect();
    let sum: f64 = raw.iter().sum();
    Ok(raw.iter().map(|v| (v / sum) as f32).collect())
}

/// BORDER_REFLECT_101 index of `i` (may be negative or ≥ n) into `0..n`.
fn reflect101(mut i: i64, n: usize) -> usize {
    let n = n as i64;
    if n == 1 {
        return 0;
    }
    while i < 0 || i >= n {
        i = if i < 0 { -i } else { 2 * (n - 1) - i };
    }
    i as usize
}

/// `cv2.GaussianBlur(img, (n, n), 0)` (BORDER_REFLECT_101); `n` odd.
pub fn gaussian_blur(img: &ImageF32, n: usize) -> Result<ImageF32> {
    check_image(img, "Gaussian blur")?;
    let kernel = gaussian_kernel(n)?;
    if n == 1 {
        return Ok(img.clone());
    }
    let (w, h, c) = (img.width, img.height, img.channels);
    let r = (n / 2) as i64;
    let xs: Vec<Vec<usize>> = (0..w as i64)
        .map(|x| (-r..=r).map(|d| reflect101(x + d, w)).collect())
        .collect();
    let ys: Vec<Vec<usize>> = (0..h as i64)
        .map(|y| (-r..=r).map(|d| reflect101(y + d, h)).collect())
        .collect();
    let mut rows = vec![0f32; img.data.len()];
    for y in 0..h {
        for (x, taps) in xs.iter().enumerate() {
            for ch in 0..c {
                rows[(y * w + x) * c + ch] = taps
                    .iter()
                    .zip(&kernel)
                    .map(|(&s, &kv)| kv * img.data[(y * w + s) * c + ch])
                    .sum();
            }
        }
    }
    let mut out = vec![0f32; img.data.len()];
    for (y, taps) in ys.iter().enumerate() {
        for x in 0..w {
            for ch in 0..c {
                out[(y * w + x) * c + ch] = taps
                    .iter()
                    .zip(&kernel)
                    .map(|(&s, &kv)| kv * rows[(s * w + x) * c + ch])
                    .sum();
            }
        }
    }
    Ok(ImageF32::new(w, h, c, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 7×6 single-channel test pattern: `((x·7 + y·13) mod 10) / 10`.
    fn pattern() -> ImageF32 {
        let data = (0..42)
            .map(|i| (((i % 7) * 7 + (i / 7) * 13) % 10) as f32 / 10.0)
            .collect();
        ImageF32::new(7, 6, 1, data)
    }

    #[test]
    fn erosion_matches_opencv_for_even_odd_and_empty_kernels() {
        // cv2.erode(pattern, np.ones((k, k), np.uint8)) row 2 and row 5 (opencv 5.1.0).
        let cases: [(usize, [f32; 7], [f32; 7]); 3] = [
            (2, OPENCV_ERODE2_ROW2, OPENCV_ERODE2_ROW5),
            (3, OPENCV_ERODE3_ROW2, OPENCV_ERODE3_ROW5),
            (0, OPENCV_ERODE3_ROW2, OPENCV_ERODE3_ROW5),
        ];
        let img = pattern();
        for (k, row2, row5) in cases {
            let out = erode_box(&img, k).unwrap();
            for x in 0..7 {
                assert_eq!(out.at(x, 2, 0), row2[x], "k={k} ({x},2)");
                assert_eq!(out.at(x, 5, 0), row5[x], "k={k} ({x},5)");
            }
        }
    }

    const OPENCV_ERODE2_ROW2: [f32; 7] = [0.3, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1];
    const OPENCV_ERODE2_ROW5: [f32; 7] = [0.2, 0.2, 0.2, 0.3, 0.0, 0.0, 0.0];
    const OPENCV_ERODE3_ROW2: [f32; 7] = [0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.1];
    const OPENCV_ERODE3_ROW5: [f32; 7] = [0.2, 0.2, 0.2, 0.0, 0.0, 0.0, 0.0];

    #[test]
    fn gaussian_kernels_match_opencv() {
        let k9 = gaussian_kernel(9).unwrap();
        assert_eq!(k9[4], 60.0 / 256.0);
        // cv2.getGaussianKernel(11, 0)
        let k11 = gaussian_kernel(11).unwrap();
        let expect = [
            0.00881223, 0.02714358, 0.06511406, 0.12164907, 0.17699836, 0.20056541,
        ];
        for (a, b) in k11.iter().zip(expect) {
            assert!((a - b).abs() < 1e-7, "{a} vs {b}");
        }
        assert!(gaussian_kernel(4).is_err());
    }

    #[test]
    fn blur_matches_opencv_at_the_borders() {
        // cv2.GaussianBlur(pattern, (n, n), 0) row 0 (opencv 5.1.0).
        let img = pattern();
        for (n, row0) in [(5, OPENCV_BLUR5_ROW0), (11, OPENCV_BLUR11_ROW0)] {
            let out = gaussian_blur(&img, n).unwrap();
            for (x, want) in row0.iter().enumerate() {
                assert!((out.at(x, 0, 0) - want).abs() < 1e-6, "n={n} x={x}");
            }
        }
        assert_eq!(gaussian_blur(&img, 1).unwrap(), img);
    }

    const OPENCV_BLUR5_ROW0: [f32; 7] = [
        0.296875, 0.3328125, 0.3828125, 0.403125, 0.43906254, 0.4890625, 0.509375,
    ];
    const OPENCV_BLUR11_ROW0: [f32; 7] = [
        0.3775244, 0.3800288, 0.38854322, 0.4020358, 0.41828933, 0.43284604, 0.43842152,
    ];
}
