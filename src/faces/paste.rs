//! Paste-back of a restored face crop into the (upscaled) photo, as facexlib 0.3.0's
//! `FaceRestoreHelper.paste_faces_to_input_image` does it with its square mask:
//!
//! 1. the background is the photo resized ×`scale` with Lanczos-4 ([`upscale_background`]);
//! 2. the crop → photo matrix is scaled by `scale`, plus `0.5·scale` on the translation when
//!    `scale > 1` ([`paste_inverse`]);
//! 3. the restored crop and a crop-sized mask of ones are warped back with it (border 0);
//! 4. the mask is eroded by a `2·scale` box (removes the warp's soft black border);
//! 5. `area` = sum of that mask, `w_edge = floor(sqrt(area)) / 20` (integer division);
//! 6. the mask is eroded again by a `2·w_edge` box and blurred by a `(2·w_edge + 1)` Gaussian;
//! 7. `photo = soft·(eroded·warped) + (1 − soft)·photo`, in f32, face after face.
//!
//! Work is limited to the face's footprint in the output (plus the erosion/blur margins), so a
//! face costs the same on a small or a huge photo; see [`paste_mask`] for why the window is exact.
//! Conventions in [`crate::faces`]. The photo may be gray (1 channel), gray + alpha, RGB or RGBA:
//! alpha is kept, a gray photo receives the restored crop's luma.

use super::align::AlignedFace;
use crate::error::{Error, Result};
use crate::imaging::filter::{erode_box, gaussian_blur};
use crate::imaging::resize::{resize_cv2, CvInterp};
use crate::imaging::warp::{footprint, warp_affine_window, Affine, SourceCoords, Window};
use crate::imaging::ImageF32;

/// Divisor of `sqrt(area)` that gives the soft edge width (facexlib's `// 20`).
const EDGE_FRACTION_DIVISOR: usize = 20;
/// OpenCV's `COLOR_BGR2GRAY` weights, in RGB order.
const LUMA_RGB: [f32; 3] = [0.299, 0.587, 0.114];

/// The masks of one face in output pixels; all three are zero outside `window`.
#[derive(Debug, Clone, PartialEq)]
pub struct PasteMask {
    /// Output rectangle the masks cover (row-major, `window.width` per row); empty when the
    /// face does not reach the output.
    pub window: Window,
    /// The warped mask of ones (facexlib's `inv_mask`).
    pub coverage: Vec<f32>,
    /// `coverage` eroded by `2·scale` (`inv_mask_erosion`), the weight of the warped face.
    pub erosion: Vec<f32>,
    /// The blend weight (`inv_soft_mask`).
    pub soft: Vec<f32>,
    /// Sum of `erosion` (`total_face_area`).
    pub area: f64,
    /// Soft edge width, `floor(sqrt(area)) / 20`.
    pub w_edge: usize,
    /// Crop → output matrix the masks were warped with ([`paste_inverse`]).
    pub inverse: Affine,
}

/// Crop → output matrix at `scale`: the face's inverse times `scale`, with `0.5·scale` added to
/// the translation when `scale > 1` (facexlib's offset for a more accurate back-alignment).
pub fn paste_inverse(face: &AlignedFace, scale: usize) -> Affine {
    let u = scale as f64;
    let offset = if scale > 1 { 0.5 * u } else { 0.0 };
    face.inverse
        .map(|row| [row[0] * u, row[1] * u, row[2] * u + offset])
}

/// Output size at `scale`, checked.
fn output_size(face: &AlignedFace, scale: usize) -> Result<(usize, usize)> {
    if scale == 0 {
        return Err(Error::Input("paste: scale must be at least 1".into()));
    }
    match (
        face.source_width.checked_mul(scale),
        face.source_height.checked_mul(scale),
    ) {
        (Some(w), Some(h)) if w > 0 && h > 0 => Ok((w, h)),
        _ => Err(Error::Input(format!(
            "paste: {}x{} photo at scale {scale} has no valid size",
            face.source_width, face.source_height
        ))),
    }
}

/// Copies a `from`-window plane into a zero `to`-window plane (`to` contains `from`).
fn embed(plane: &[f32], from: Window, to: Window) -> Vec<f32> {
    let mut out = vec![0f32; to.width * to.height];
    for j in 0..from.height {
        let dst = (from.y0 - to.y0 + j) * to.width + (from.x0 - to.x0);
        out[dst..dst + from.width].copy_from_slice(&plane[j * from.width..(j + 1) * from.width]);
    }
    out
}

/// Steps 2–6 for one face: the three masks in the output of `scale`×the photo.
///
/// Exactness of the window: outside the warp's footprint the warped mask is exactly 0, and
/// every window edge is either the output's edge (where OpenCV's semantics apply unchanged) or
/// separated from the footprint by a band of zeros. An erosion box reaching past such an edge
/// also covers that band, so it sees the 0 it would see on the full image; the band is made
/// wider than the blur's reach twice over, so the reflected border only ever mirrors zeros.
pub fn paste_mask(face: &AlignedFace, scale: usize) -> Result<PasteMask> {
    let (out_w, out_h) = output_size(face, scale)?;
    let inverse = paste_inverse(face, scale);
    let (crop_w, crop_h) = (face.crop.width, face.crop.height);
    let empty = PasteMask {
        window: Window {
            x0: 0,
            y0: 0,
            width: 0,
            height: 0,
        },
        coverage: Vec::new(),
        erosion: Vec::new(),
        soft: Vec::new(),
        area: 0.0,
        w_edge: 0,
        inverse,
    };
    let Some(fp) = footprint(&inverse, crop_w, crop_h, out_w, out_h) else {
        return Ok(empty);
    };
    let ones = ImageF32::new(crop_w, crop_h, 1, vec![1.0; crop_w * crop_h]);
    // The mask is float in facexlib: OpenCV's float kernel (f64 coordinates).
    let inner = fp.expanded(1, out_w, out_h);
    let coverage = warp_affine_window(&ones, &inverse, inner, &[0.0], SourceCoords::F64)?;
    let erosion = erode_box(&coverage, 2 * scale)?;
    let area: f64 = erosion.data.iter().map(|&v| v as f64).sum();
    let w_edge = (area.sqrt() as usize) / EDGE_FRACTION_DIVISOR;
    // An empty kernel (w_edge 0) is OpenCV's 3×3 box: reproduced by erode_box.
    let centre_kernel = 2 * w_edge;
    let blur_size = 2 * w_edge + 1;
    let margin = centre_kernel.max(3) + 2 * blur_size + 2;
    let window = fp.expanded(1 + margin, out_w, out_h);
    let erosion = ImageF32::new(
        window.width,
        window.height,
        1,
        embed(&erosion.data, inner, window),
    );
    let centre = erode_box(&erosion, centre_kernel)?;
    let soft = gaussian_blur(&centre, blur_size)?;
    Ok(PasteMask {
        window,
        coverage: embed(&coverage.data, inner, window),
        erosion: erosion.data,
        soft: soft.data,
        area,
        w_edge,
        inverse,
    })
}

/// Luma of an RGB image (OpenCV's BGR2GRAY weights).
fn to_gray(img: &ImageF32) -> ImageF32 {
    let data = img
        .data
        .chunks_exact(3)
        .map(|p| LUMA_RGB[0] * p[0] + LUMA_RGB[1] * p[1] + LUMA_RGB[2] * p[2])
        .collect();
    ImageF32::new(img.width, img.height, 1, data)
}

/// `restored` with `colour` channels (RGB → luma for a gray photo, gray → RGB replicated).
fn with_colour_channels(restored: &ImageF32, colour: usize) -> Result<ImageF32> {
    match (restored.channels, colour) {
        (c, k) if c == k => Ok(restored.clone()),
        (3, 1) => Ok(to_gray(restored)),
        (1, 3) => Ok(ImageF32::new(
            restored.width,
            restored.height,
            3,
            restored.data.iter().flat_map(|&v| [v; 3]).collect(),
        )),
        (c, _) => Err(Error::Input(format!(
            "paste: restored face has {c} channels, expected RGB or gray"
        ))),
    }
}

/// Number of colour channels of a photo with `channels` (alpha, when present, is last).
fn colour_channels(channels: usize) -> Result<usize> {
    match channels {
        1 | 2 => Ok(1),
        3 | 4 => Ok(3),
        c => Err(Error::Input(format!(
            "paste: target has {c} channels (expected gray, gray+alpha, RGB or RGBA)"
        ))),
    }
}

/// Step 3 for the restored face: `restored` (same size as `face.crop`) warped into
/// `mask.window` of the output with `mask.inverse` (border 0, 8-bit coordinate rounding as
/// facexlib's uint8 face gets). The result has `restored`'s channels.
pub fn warp_back(restored: &ImageF32, face: &AlignedFace, mask: &PasteMask) -> Result<ImageF32> {
    if restored.width != face.crop.width || restored.height != face.crop.height {
        return Err(Error::Input(format!(
            "paste: restored face is {}x{}, the aligned crop {}x{}",
            restored.width, restored.height, face.crop.width, face.crop.height
        )));
    }
    warp_affine_window(
        restored,
        &mask.inverse,
        mask.window,
        &[0.0],
        SourceCoords::F32,
    )
}

/// Step 7: `onto = soft·(erosion·warped) + (1 − soft)·onto` over the mask's window, on the
/// colour channels of `onto` (alpha untouched). `warped` is [`warp_back`]'s window with as many
/// channels as `onto` has colour channels.
pub fn blend(onto: &mut ImageF32, warped: &ImageF32, mask: &PasteMask) -> Result<()> {
    let colour = colour_channels(onto.channels)?;
    let win = mask.window;
    if win.is_empty() {
        return Ok(());
    }
    if warped.width != win.width || warped.height != win.height || warped.channels != colour {
        return Err(Error::Input(format!(
            "paste: warped face is {}x{}x{}, expected {}x{}x{colour}",
            warped.width, warped.height, warped.channels, win.width, win.height
        )));
    }
    if win.x0 + win.width > onto.width || win.y0 + win.height > onto.height {
        return Err(Error::Input(
            "paste: mask window lies outside the target".into(),
        ));
    }
    let c = onto.channels;
    for j in 0..win.height {
        for i in 0..win.width {
            let m = j * win.width + i;
            let soft = mask.soft[m];
            if soft == 0.0 {
                continue;
            }
            let (eroded, keep) = (mask.erosion[m], 1.0 - soft);
            let px = ((win.y0 + j) * onto.width + win.x0 + i) * c;
            for k in 0..colour {
                let pasted = eroded * warped.data[m * colour + k];
                onto.data[px + k] = soft * pasted + keep * onto.data[px + k];
            }
        }
    }
    Ok(())
}

/// Pastes `restored` (the crop after restoration, same size as `face.crop`) into `onto`, the
/// photo the face was aligned on upscaled `scale` times (e.g. by [`upscale_background`]):
/// [`paste_mask`], [`warp_back`], [`blend`]. Faces pasted one after another blend in that order.
pub fn paste(
    onto: &mut ImageF32,
    restored: &ImageF32,
    face: &AlignedFace,
    scale: usize,
) -> Result<()> {
    let (out_w, out_h) = output_size(face, scale)?;
    if onto.width != out_w || onto.height != out_h {
        return Err(Error::Input(format!(
            "paste: target is {}x{}, expected {out_w}x{out_h} ({}x{} at scale {scale})",
            onto.width, onto.height, face.source_width, face.source_height
        )));
    }
    let restored = with_colour_channels(restored, colour_channels(onto.channels)?)?;
    let mask = paste_mask(face, scale)?;
    if mask.window.is_empty() {
        return Ok(());
    }
    let warped = warp_back(&restored, face, &mask)?;
    blend(onto, &warped, &mask)
}

/// Step 1: the photo resized `scale` times with `cv2.resize(..., INTER_LANCZOS4)` (all channels,
/// alpha included), clamped to [0, 1] as OpenCV's 8-bit result saturates; a copy at scale 1.
pub fn upscale_background(img: &ImageF32, scale: usize) -> Result<ImageF32> {
    if scale == 0 {
        return Err(Error::Input("upscale: scale must be at least 1".into()));
    }
    if scale == 1 {
        return Ok(img.clone());
    }
    let (w, h) = match (img.width.checked_mul(scale), img.height.checked_mul(scale)) {
        (Some(w), Some(h)) => (w, h),
        _ => return Err(Error::Input("upscale: output size overflows".into())),
    };
    let mut out = resize_cv2(img, w, h, CvInterp::Lanczos4)?;
    out.data.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
    Ok(out)
}

/// Per-channel mean and (population) standard deviation of the first `colour` channels.
fn channel_stats(img: &ImageF32, colour: usize) -> Vec<(f64, f64)> {
    let n = (img.width * img.height).max(1) as f64;
    (0..colour)
        .map(|k| {
            let vals = img.data.iter().skip(k).step_by(img.channels);
            let mean = vals.clone().map(|&v| v as f64).sum::<f64>() / n;
            let var = vals.map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            (mean, var.sqrt())
        })
        .collect()
}

/// Optional colour matching of a restored crop to the crop it was restored from: each colour
/// channel is shifted and scaled to the input crop's mean and standard deviation, then clamped
/// to [0, 1]. The diffusion restorer can drift in overall colour (a tint or a brightness shift
/// that is not in the photo); pasting such a face would leave a visible patch, so the face is
/// put back into the photo's colour statistics. Alpha (a 4th or 2nd channel) is left alone.
pub fn match_color(restored: &ImageF32, input_crop: &ImageF32) -> Result<ImageF32> {
    if restored.channels != input_crop.channels
        || restored.data.is_empty()
        || input_crop.data.is_empty()
    {
        return Err(Error::Input(format!(
            "colour match: {}-channel face against a {}-channel crop",
            restored.channels, input_crop.channels
        )));
    }
    let colour = match restored.channels {
        1 | 2 => 1,
        _ => 3.min(restored.channels),
    };
    let from = channel_stats(restored, colour);
    let to = channel_stats(input_crop, colour);
    let mut out = restored.clone();
    for px in out.data.chunks_exact_mut(restored.channels) {
        for k in 0..colour {
            let ((m0, s0), (m1, s1)) = (from[k], to[k]);
            // A flat channel carries no contrast to rescale: only its level moves.
            let gain = if s0 > 1e-6 { s1 / s0 } else { 1.0 };
            px[k] = ((px[k] as f64 - m0) * gain + m1).clamp(0.0, 1.0) as f32;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faces::align::{align, Landmarks, Template};
    use crate::imaging::warp::{apply_affine, warp_affine};

    /// A smooth RGB photo (period ≥ 40 px), so bilinear round trips stay accurate.
    fn smooth_photo(w: usize, h: usize) -> ImageF32 {
        let data = (0..w * h)
            .flat_map(|i| {
                let (x, y) = ((i % w) as f32, (i / w) as f32);
                [
                    0.5 + 0.3 * (x / 9.0).sin(),
                    0.5 + 0.3 * (y / 11.0).cos(),
                    0.4 + 0.2 * ((x + y) / 13.0).sin(),
                ]
            })
            .collect();
        ImageF32::new(w, h, 3, data)
    }

    /// Landmarks of a face whose template maps into the photo by scale `s`, angle `th`, shift t.
    fn landmarks(t: &Template, s: f64, th: f64, tx: f64, ty: f64) -> Landmarks {
        let m: Affine = [
            [s * th.cos(), -s * th.sin(), tx],
            [s * th.sin(), s * th.cos(), ty],
        ];
        t.points.map(|[x, y]| {
            let (u, v) = apply_affine(&m, x, y);
            [u as f32, v as f32]
        })
    }

    /// Steps 2–6 on the whole output image, without windows.
    fn brute_force_mask(face: &AlignedFace, scale: usize) -> (Vec<f32>, Vec<f32>, usize) {
        let (w, h) = (face.source_width * scale, face.source_height * scale);
        let (cw, ch) = (face.crop.width, face.crop.height);
        let ones = ImageF32::new(cw, ch, 1, vec![1.0; cw * ch]);
        let inv = paste_inverse(face, scale);
        let cov = warp_affine(&ones, &inv, w, h, &[0.0], SourceCoords::F64).unwrap();
        let ero = erode_box(&cov, 2 * scale).unwrap();
        let area: f64 = ero.data.iter().map(|&v| v as f64).sum();
        let w_edge = (area.sqrt() as usize) / 20;
        let centre = erode_box(&ero, 2 * w_edge).unwrap();
        let soft = gaussian_blur(&centre, 2 * w_edge + 1).unwrap();
        (ero.data, soft.data, w_edge)
    }

    #[test]
    fn windowed_masks_equal_the_whole_image_computation() {
        let photo = smooth_photo(90, 70);
        let t = Template::ffhq(64).unwrap();
        // Centre, corner (partly outside), a tiny face (w_edge 0), each at scale 1 and 2.
        let faces = [
            (0.9, 0.2, 15.0, 10.0, 1),
            (0.9, -0.1, -25.0, -20.0, 1),
            (0.12, 0.3, 40.0, 30.0, 1),
            (0.9, 0.2, 15.0, 10.0, 2),
            (0.9, 0.4, 50.0, 35.0, 2),
        ];
        let mut saw_degenerate = false;
        for (s, th, tx, ty, scale) in faces {
            let face = align(&photo, &landmarks(&t, s, th, tx, ty), &t, &[0.0]).unwrap();
            let mask = paste_mask(&face, scale).unwrap();
            let (ero, soft, w_edge) = brute_force_mask(&face, scale);
            assert_eq!(mask.w_edge, w_edge);
            saw_degenerate |= w_edge == 0;
            let out_w = face.source_width * scale;
            let win = mask.window;
            let mut area = 0.0;
            for (p, (&e, &sf)) in ero.iter().zip(&soft).enumerate() {
                let (x, y) = (p % out_w, p / out_w);
                let inside =
                    x >= win.x0 && x < win.x0 + win.width && y >= win.y0 && y < win.y0 + win.height;
                let (we, ws) = if inside {
                    let m = (y - win.y0) * win.width + x - win.x0;
                    (mask.erosion[m], mask.soft[m])
                } else {
                    (0.0, 0.0)
                };
                assert!(
                    (we - e).abs() <= 1e-7 && (ws - sf).abs() <= 1e-7,
                    "({x},{y}) face {s} {tx} {ty}"
                );
                area += e as f64;
            }
            assert!((mask.area - area).abs() < 1e-6);
        }
        assert!(saw_degenerate, "the tiny face must exercise w_edge = 0");
    }

    #[test]
    fn pasting_the_unrestored_crop_changes_pixels_only_within_the_interpolation_bound() {
        // The whole crop lies inside the photo (no border colour is pasted back).
        let photo = smooth_photo(150, 140);
        let t = Template::ffhq(96).unwrap();
        let face = align(&photo, &landmarks(&t, 0.8, 0.25, 30.0, 12.0), &t, &[0.0]).unwrap();
        let mut out = photo.clone();
        paste(&mut out, &face.crop, &face, 1).unwrap();
        let mask = paste_mask(&face, 1).unwrap();
        let win = mask.window;
        let mut worst = 0f32;
        for y in 0..photo.height {
            for x in 0..photo.width {
                let inside =
                    x >= win.x0 && x < win.x0 + win.width && y >= win.y0 && y < win.y0 + win.height;
                // facexlib weights the warped face by the eroded mask inside the soft mask, and
                // there the warped face itself is diluted by the zero border (by its coverage),
                // so the outer ring darkens by soft·(1 − eroded·coverage)·value.
                let ring = if inside {
                    let m = (y - win.y0) * win.width + x - win.x0;
                    mask.soft[m] * (1.0 - mask.erosion[m] * mask.coverage[m])
                } else {
                    0.0
                };
                for k in 0..3 {
                    let d = (out.at(x, y, k) - photo.at(x, y, k)).abs();
                    if !inside {
                        assert_eq!(d, 0.0, "({x},{y}) is outside the face window");
                    }
                    // Two bilinear resamplings of a signal with slope ≤ 0.034/px and curvature
                    // ≤ 0.004/px² move it by well under 2e-3.
                    assert!(
                        d <= 2e-3 + ring * photo.at(x, y, k),
                        "({x},{y}) changed by {d}"
                    );
                    worst = worst.max(d - ring * photo.at(x, y, k));
                }
            }
        }
        assert!(worst > 0.0, "the round trip must resample");
    }

    #[test]
    fn faces_at_the_corner_or_outside_are_handled() {
        let photo = smooth_photo(64, 48);
        let t = Template::ffhq(64).unwrap();
        let corner = align(&photo, &landmarks(&t, 1.0, 0.0, -30.0, -28.0), &t, &[0.0]).unwrap();
        let mut out = photo.clone();
        paste(&mut out, &corner.crop.clone(), &corner, 1).unwrap();
        assert_eq!(out.at(63, 47, 0), photo.at(63, 47, 0));
        let mask = paste_mask(&corner, 1).unwrap();
        assert_eq!((mask.window.x0, mask.window.y0), (0, 0));
        assert!(mask.area > 0.0);
        let away = align(&photo, &landmarks(&t, 1.0, 0.0, 500.0, 500.0), &t, &[0.0]).unwrap();
        let mut untouched = photo.clone();
        paste(&mut untouched, &away.crop, &away, 2).unwrap_err();
        let mut big = upscale_background(&photo, 2).unwrap();
        let before = big.clone();
        paste(&mut big, &away.crop, &away, 2).unwrap();
        assert_eq!(big, before);
        assert_eq!(paste_mask(&away, 2).unwrap().area, 0.0);
    }

    #[test]
    fn alpha_is_kept_gray_is_blended_and_faces_blend_in_order() {
        let rgb = smooth_photo(80, 80);
        let t = Template::ffhq(64).unwrap();
        let a = align(&rgb, &landmarks(&t, 0.9, 0.0, 2.0, 2.0), &t, &[0.0]).unwrap();
        let b = align(&rgb, &landmarks(&t, 0.9, 0.1, 12.0, 10.0), &t, &[0.0]).unwrap();
        let white = ImageF32::new(64, 64, 3, vec![1.0; 64 * 64 * 3]);
        let black = ImageF32::zeros(64, 64, 3);
        let rgba_data = rgb
            .data
            .chunks_exact(3)
            .flat_map(|p| [p[0], p[1], p[2], 0.25])
            .collect();
        let mut rgba = ImageF32::new(80, 80, 4, rgba_data);
        paste(&mut rgba, &white, &a, 1).unwrap();
        assert!(rgba.data.chunks_exact(4).all(|p| p[3] == 0.25));
        let mut gray = ImageF32::new(80, 80, 1, vec![0.5; 6400]);
        paste(&mut gray, &white, &a, 1).unwrap();
        assert!(gray.data.iter().any(|&v| v > 0.99));
        // Overlap: where b's soft mask is 1 the result is b's face, wherever a was pasted.
        let mut ab = rgb.clone();
        paste(&mut ab, &white, &a, 1).unwrap();
        paste(&mut ab, &black, &b, 1).unwrap();
        let mut ba = rgb.clone();
        paste(&mut ba, &black, &b, 1).unwrap();
        paste(&mut ba, &white, &a, 1).unwrap();
        let mb = paste_mask(&b, 1).unwrap();
        let full = mb.soft.iter().position(|&s| s == 1.0).unwrap();
        let (x, y) = (
            mb.window.x0 + full % mb.window.width,
            mb.window.y0 + full / mb.window.width,
        );
        assert_eq!(ab.at(x, y, 0), 0.0);
        assert_ne!(ab, ba);
        // No hidden state: the same face pasted twice onto copies gives the same image.
        let mut again = rgb.clone();
        paste(&mut again, &white, &a, 1).unwrap();
        paste(&mut again, &black, &b, 1).unwrap();
        assert_eq!(again, ab);
    }

    #[test]
    fn colour_matching_moves_the_channel_statistics() {
        let crop = smooth_photo(32, 32);
        let tinted = ImageF32::new(
            32,
            32,
            3,
            crop.data
                .iter()
                .enumerate()
                .map(|(i, &v)| if i % 3 == 0 { 0.8 * v + 0.15 } else { v * 0.9 })
                .collect(),
        );
        let fixed = match_color(&tinted, &crop).unwrap();
        let (got, want) = (channel_stats(&fixed, 3), channel_stats(&crop, 3));
        for ((m0, s0), (m1, s1)) in got.iter().zip(&want) {
            assert!((m0 - m1).abs() < 1e-5 && (s0 - s1).abs() < 1e-5);
        }
        assert!(match_color(&tinted, &ImageF32::zeros(4, 4, 1)).is_err());
    }
}
