//! Five-point face alignment: a least-squares similarity fit of the landmarks onto a template,
//! then a bilinear warp of the photo into the template's crop (facexlib's
//! `FaceRestoreHelper.align_warp_face`, with the fit computed deterministically).
//!
//! The fit (Umeyama 1991, rotation + uniform scale + translation, reflections excluded) is done
//! in f64. In 2-D every rotation-with-scale is `[[a, -b], [b, a]]` for some real (a, b), so the
//! reflection-free Umeyama solution is exactly the linear least-squares solution in (a, b, tx,
//! ty), which is what [`fit_similarity`] computes in closed form from centred points (it agrees
//! with scikit-image's `SimilarityTransform` to ~1e-12). facexlib itself uses OpenCV's LMEDS
//! estimate, which on 5 points can pick a different fit entirely (see the align fixtures).
//! Conventions of the module tree in [`crate::faces`]; matrices as in [`crate::imaging::warp`].

use crate::error::{Error, Result};
use crate::imaging::warp::{apply_affine, invert_affine, warp_affine, Affine, SourceCoords};
use crate::imaging::ImageF32;

/// Five landmarks (left eye, right eye, nose, left mouth corner, right mouth corner), pixels.
pub type Landmarks = [[f32; 2]; 5];

/// facexlib's FFHQ template for a 512×512 crop (`FaceRestoreHelper`, face_size 512).
pub const FFHQ_512_POINTS: [[f64; 2]; 5] = [
    [192.98138, 239.94708],
    [318.90277, 240.1936],
    [256.63416, 314.01935],
    [201.26117, 371.41043],
    [313.08905, 371.15118],
];
/// Side of the crop [`FFHQ_512_POINTS`] is given for.
pub const FFHQ_REFERENCE_SIZE: usize = 512;

/// dlib's mean face at padding 0.25 in a 150×150 chip (eye centres, nose tip, mouth corners),
/// the input of dlib's face-recognition ResNet.
pub const DLIB_CHIP_POINTS: [[f64; 2]; 5] = [
    [47.55, 46.60],
    [100.48, 46.60],
    [74.01, 76.56],
    [50.42, 103.02],
    [97.61, 103.02],
];
/// Side of dlib's face chip.
pub const DLIB_CHIP_SIZE: usize = 150;

/// facexlib's border colour `(135, 133, 132)`, given there in BGR order: as RGB in [0, 1].
pub const FACEXLIB_BORDER_RGB: [f32; 3] = [132.0 / 255.0, 133.0 / 255.0, 135.0 / 255.0];

/// Where the five landmarks should land, and the size of the crop they land in.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub points: [[f64; 2]; 5],
    pub width: usize,
    pub height: usize,
}

impl Template {
    /// facexlib's FFHQ template for a `size`×`size` crop: the 512 template scaled by size/512.
    pub fn ffhq(size: usize) -> Result<Template> {
        if size == 0 {
            return Err(Error::Input("face crop size must be positive".into()));
        }
        let s = size as f64 / FFHQ_REFERENCE_SIZE as f64;
        Ok(Template {
            points: FFHQ_512_POINTS.map(|[x, y]| [x * s, y * s]),
            width: size,
            height: size,
        })
    }

    /// dlib's 150×150 chip (border colour 0, RGB).
    /// The template's points as landmarks shifted by `(x0, y0)`: where the five points of a face
    /// aligned to this template lie in a crop placed at that offset.
    pub fn landmarks_at(&self, x0: f64, y0: f64) -> Landmarks {
        self.points.map(|[x, y]| [(x0 + x) as f32, (y0 + y) as f32])
    }

    pub fn dlib_chip() -> Template {
        Template {
            points: DLIB_CHIP_POINTS,
            width: DLIB_CHIP_SIZE,
            height: DLIB_CHIP_SIZE,
        }
    }
}

/// A similarity transform `[[a, -b, tx], [b, a, ty]]` fitted to point pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct SimilarityFit {
    /// From the first point set to the second.
    pub matrix: Affine,
    /// Uniform scale `sqrt(a² + b²)`.
    pub scale: f64,
    /// Root-mean-square distance between the mapped points and their targets (target units).
    pub residual_rms: f64,
}

/// Least-squares similarity (reflection excluded) mapping `from[i]` onto `to[i]`, in f64.
pub fn fit_similarity(from: &[[f64; 2]], to: &[[f64; 2]]) -> Result<SimilarityFit> {
    if from.len() != to.len() || from.len() < 2 {
        return Err(Error::Input(format!(
            "similarity fit needs matching point lists of at least 2, got {} and {}",
            from.len(),
            to.len()
        )));
    }
    if from.iter().chain(to).flatten().any(|v| !v.is_finite()) {
        return Err(Error::Input("similarity fit: non-finite landmark".into()));
    }
    let n = from.len() as f64;
    let mean = |pts: &[[f64; 2]]| {
        let (sx, sy) = pts
            .iter()
            .fold((0.0, 0.0), |(sx, sy), p| (sx + p[0], sy + p[1]));
        [sx / n, sy / n]
    };
    let (ms, md) = (mean(from), mean(to));
    let (mut var, mut dot, mut cross) = (0.0, 0.0, 0.0);
    for (s, d) in from.iter().zip(to) {
        let (sx, sy) = (s[0] - ms[0], s[1] - ms[1]);
        let (dx, dy) = (d[0] - md[0], d[1] - md[1]);
        var += sx * sx + sy * sy;
        dot += sx * dx + sy * dy;
        cross += sx * dy - sy * dx;
    }
    // All source points coincide (relative to their spread in coordinates): no scale exists.
    let extent = ms[0].abs().max(ms[1].abs()).max(1.0);
    if var <= (extent * 1e-9).powi(2) * n {
        return Err(Error::Input(
            "similarity fit: the landmarks coincide, no transform is defined".into(),
        ));
    }
    let (a, b) = (dot / var, cross / var);
    let matrix = [
        [a, -b, md[0] - (a * ms[0] - b * ms[1])],
        [b, a, md[1] - (b * ms[0] + a * ms[1])],
    ];
    let sq: f64 = from
        .iter()
        .zip(to)
        .map(|(s, d)| {
            let (x, y) = apply_affine(&matrix, s[0], s[1]);
            (x - d[0]).powi(2) + (y - d[1]).powi(2)
        })
        .sum();
    Ok(SimilarityFit {
        matrix,
        scale: a.hypot(b),
        residual_rms: (sq / n).sqrt(),
    })
}

/// One face cut out of a photo: the crop and both transforms, so it can be pasted back any
/// number of times.
#[derive(Debug, Clone, PartialEq)]
pub struct AlignedFace {
    /// The template-sized crop, same channels as the photo.
    pub crop: ImageF32,
    /// Photo → crop pixel coordinates.
    pub matrix: Affine,
    /// Crop → photo (`cv2.invertAffineTransform(matrix)`).
    pub inverse: Affine,
    /// The fit that produced `matrix` (scale, residual in crop pixels).
    pub fit: SimilarityFit,
    /// Size of the photo the face was cut from.
    pub source_width: usize,
    pub source_height: usize,
}

/// Fits `landmarks` onto `template` and warps `img` into the template's crop
/// (`cv2.warpAffine(img, M, size, INTER_LINEAR, BORDER_CONSTANT, border)`, 8-bit coordinate
/// rounding). `border` holds one value per channel of `img`, or one for all (facexlib:
/// [`FACEXLIB_BORDER_RGB`]; dlib chips: `[0.0]`).
pub fn align(
    img: &ImageF32,
    landmarks: &Landmarks,
    template: &Template,
    border: &[f32],
) -> Result<AlignedFace> {
    if template.width == 0 || template.height == 0 {
        return Err(Error::Input("face template has an empty crop".into()));
    }
    let from = landmarks.map(|[x, y]| [x as f64, y as f64]);
    let fit = fit_similarity(&from, &template.points)?;
    let inverse = invert_affine(&fit.matrix)?;
    let crop = warp_affine(
        img,
        &fit.matrix,
        template.width,
        template.height,
        border,
        SourceCoords::F32,
    )?;
    Ok(AlignedFace {
        crop,
        matrix: fit.matrix,
        inverse,
        fit,
        source_width: img.width,
        source_height: img.height,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &Affine, b: &Affine, tol: f64) -> bool {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn template_fits_itself_with_the_identity() {
        let t = Template::ffhq(512).unwrap();
        let fit = fit_similarity(&t.points, &t.points).unwrap();
        assert!(close(
            &fit.matrix,
            &[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
            1e-12
        ));
        assert!(fit.residual_rms < 1e-12);
        assert_eq!(
            Template::ffhq(256).unwrap().points[0],
            [192.98138 / 2.0, 239.94708 / 2.0]
        );
    }

    #[test]
    fn a_known_similarity_is_recovered_exactly() {
        let (s, th, tx, ty) = (0.37_f64, 0.41_f64, 87.5, -12.25);
        let m: Affine = [
            [s * th.cos(), -s * th.sin(), tx],
            [s * th.sin(), s * th.cos(), ty],
        ];
        let src = DLIB_CHIP_POINTS;
        let dst = src.map(|[x, y]| {
            let (u, v) = apply_affine(&m, x, y);
            [u, v]
        });
        let fit = fit_similarity(&src, &dst).unwrap();
        assert!(close(&fit.matrix, &m, 1e-10), "{:?}", fit.matrix);
        assert!((fit.scale - s).abs() < 1e-12);
    }

    #[test]
    fn mirrored_landmarks_do_not_produce_a_reflection() {
        // Swapping left and right (a mirror image) cannot be fitted without a reflection: the
        // fit stays a rotation (positive determinant) and leaves a residual.
        let t = Template::ffhq(512).unwrap();
        let mirrored = t.points.map(|[x, y]| [1000.0 - x, y]);
        let fit = fit_similarity(&mirrored, &t.points).unwrap();
        let m = fit.matrix;
        assert!(m[0][0] * m[1][1] - m[0][1] * m[1][0] >= 0.0);
        assert!(fit.residual_rms > 10.0);
        assert!(fit_similarity(&[[3.0, 4.0]; 5], &t.points).is_err());
    }

    /// Sum of Gaussian blobs (sigma `sd`) at `centres`: a smooth test photo.
    fn blobs(w: usize, h: usize, centres: &[[f64; 2]], sd: f64) -> ImageF32 {
        let mut data = vec![0f32; w * h];
        for (i, v) in data.iter_mut().enumerate() {
            let (x, y) = ((i % w) as f64, (i / w) as f64);
            let s: f64 = centres
                .iter()
                .map(|c| (-((x - c[0]).powi(2) + (y - c[1]).powi(2)) / (2.0 * sd * sd)).exp())
                .sum();
            *v = s as f32;
        }
        ImageF32::new(w, h, 1, data)
    }

    /// Intensity-weighted centroid of `img` within `radius` of `guess`.
    fn centroid(img: &ImageF32, guess: [f64; 2], radius: f64) -> [f64; 2] {
        let (mut sw, mut sx, mut sy) = (0.0, 0.0, 0.0);
        for y in 0..img.height {
            for x in 0..img.width {
                let (fx, fy) = (x as f64, y as f64);
                if (fx - guess[0]).hypot(fy - guess[1]) <= radius {
                    let v = img.at(x, y, 0) as f64;
                    sw += v;
                    sx += v * fx;
                    sy += v * fy;
                }
            }
        }
        [sx / sw, sy / sw]
    }

    #[test]
    fn warped_landmarks_land_on_the_template() {
        // Blobs at landmark positions of a rotated, scaled face; after alignment the blob
        // centroids, located in the crop, must sit on the template points and re-fitting them
        // onto the template must give the identity.
        let t = Template::ffhq(128).unwrap();
        let (s, th) = (1.6_f64, -0.3_f64);
        let face_to_photo: Affine = [
            [s * th.cos(), -s * th.sin(), 40.0],
            [s * th.sin(), s * th.cos(), 90.0],
        ];
        let marks = t.points.map(|[x, y]| {
            let (u, v) = apply_affine(&face_to_photo, x, y);
            [u as f32, v as f32]
        });
        let centres = marks.map(|[x, y]| [x as f64, y as f64]);
        let photo = blobs(320, 320, &centres, 4.0);
        let face = align(&photo, &marks, &t, &[0.0]).unwrap();
        let found = t.points.map(|p| centroid(&face.crop, p, 7.0));
        for (f, p) in found.iter().zip(&t.points) {
            assert!((f[0] - p[0]).hypot(f[1] - p[1]) < 0.05, "{f:?} vs {p:?}");
        }
        let refit = fit_similarity(&found, &t.points).unwrap();
        assert!(close(
            &refit.matrix,
            &[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
            0.05
        ));
        let round_trip = invert_affine(&face.inverse).unwrap();
        assert!(close(&round_trip, &face.matrix, 1e-9));
    }
}
