//! Whole photos: find the faces, restore each at the model's scale on a crop aligned from the
//! original photo, and paste them back over a cheaply upscaled background (GFPGAN/CodeFormer's
//! flow, with pfstorer's diffusion restorer on the crops).
//!
//! The photo is pasted at an integer factor `k` (the facexlib paste-back the fixtures check);
//! a fractional `--scale`, `--size` or `--long-side` resizes that result once with Lanczos.

use crate::cli::face_args::{check_face_output, faces_picture_path, saved_face_paths};
use crate::faces::align::{align, AlignedFace, Template, FACEXLIB_BORDER_RGB};
use crate::faces::draw::draw_faces;
use crate::faces::paste::{match_color, paste, upscale_background};
use crate::faces::retinaface::{DetectOptions, RetinaFace};
use crate::faces::select::{is_face_crop, select, FaceSelection, NumberedFace, Selected};
use crate::imaging::resize::{resize_cv2, CvInterp};
use crate::imaging::ImageF32;
use crate::restore::{Conditioning, FaceCrop, Restorer, TargetSize};
use std::path::{Path, PathBuf};

/// `--faces`: how a photo's faces are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FacesMode {
    /// `whole` for a face crop (one face covering much of the photo) or a photo too small for
    /// the detector to find one; `each` otherwise.
    Auto,
    /// Detect every face, restore each on an aligned crop, paste back.
    Each,
    /// The whole photo is one face crop (GFPGAN's `--aligned`): the diffusion runs over all of it.
    Whole,
}

/// `--background`: what is under the pasted faces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Background {
    /// The photo upscaled with Lanczos-4 (seconds).
    Lanczos,
    /// The whole photo restored by the diffusion model first (the old whole-canvas restore:
    /// patches x latent tiles x steps; hours on a CPU for a large photo).
    Model,
}

/// The face settings of a restore batch.
pub struct FaceJob<'a> {
    pub detector: &'a RetinaFace,
    pub detect: DetectOptions,
    pub selection: FaceSelection,
    pub mode: FacesMode,
    pub background: Background,
    /// Crop side for faces that would be magnified when pasted (`--face-size`).
    pub face_size: Option<usize>,
    /// The model's native size: the crop side by default.
    pub native: usize,
    pub save_faces: Option<PathBuf>,
    pub show_faces: Option<PathBuf>,
    /// Several inputs: `show_faces` is a folder.
    pub many_inputs: bool,
    /// `--force`: the face pictures may replace existing files.
    pub overwrite: bool,
}

/// What happens to one photo.
pub enum PhotoPlan {
    /// The diffusion over the whole photo, as one face (with the faces found, if detection ran).
    Whole(Option<Selected>),
    /// The chosen faces, each on its own crop (possibly none: background only).
    Faces(Selected),
}

/// Decides how `rgb` is restored, with the lines that say why.
pub fn plan_photo(job: &FaceJob, rgb: &ImageF32) -> crate::Result<(PhotoPlan, Vec<String>)> {
    let mut notes = Vec::new();
    if job.mode == FacesMode::Whole {
        return Ok((PhotoPlan::Whole(None), notes));
    }
    let detections = job.detector.detect(rgb, &job.detect)?;
    let selected = select(&detections, rgb.width, rgb.height, &job.selection)?;
    if job.mode == FacesMode::Auto {
        let small = rgb.width.max(rgb.height) <= job.native;
        if is_face_crop(&selected.numbered, rgb.width, rgb.height)
            || (selected.numbered.is_empty() && small)
        {
            if selected.numbered.is_empty() {
                notes.push(format!(
                    "no face found in a {}x{} photo: restoring it whole as one face (--faces each upscales it without the model)",
                    rgb.width, rgb.height
                ));
            }
            return Ok((PhotoPlan::Whole(Some(selected)), notes));
        }
    }
    if selected.too_small > 0 {
        notes.push(format!(
            "{} face{} under --min-face {} px skipped",
            selected.too_small,
            plural(selected.too_small),
            job.selection.min_face
        ));
    }
    if selected.over_limit > 0 {
        notes.push(format!(
            "{} more face{} skipped: --max-faces {} keeps the largest",
            selected.over_limit,
            plural(selected.over_limit),
            job.selection.max_faces.unwrap_or(0)
        ));
    }
    if selected.numbered.is_empty() {
        notes.push("no face found: the output is the photo upscaled (nothing restored)".into());
    }
    Ok((PhotoPlan::Faces(selected), notes))
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The integer paste factor for an output of `out` from a photo of `photo` pixels.
pub fn paste_factor(photo: (usize, usize), out: (usize, usize)) -> usize {
    let k = (out.0 as f64 / photo.0 as f64).max(out.1 as f64 / photo.1 as f64);
    (k.ceil() as usize).max(1)
}

/// The crop side of a face: the native size, or `--face-size` for a face that would be larger
/// in the output than a native crop (its scale from the photo to the crop is below `k`).
pub fn crop_side(job: &FaceJob, face: &NumberedFace, k: usize) -> usize {
    let native = job.native;
    match job.face_size {
        Some(n) if magnification(face, native, k) > 1.0 => n,
        _ => native,
    }
}

/// How much a native crop of `face` is enlarged when pasted at factor `k` (above 1: upsampled).
pub fn magnification(face: &NumberedFace, native: usize, k: usize) -> f64 {
    // The FFHQ template's eyes are 126 px apart in a 512 crop: the face's eye distance in the
    // photo times k over that gives the pasted size relative to the crop.
    let [l, r] = [face.detection.landmarks[0], face.detection.landmarks[1]];
    let eyes = (((r[0] - l[0]).powi(2) + (r[1] - l[1]).powi(2)) as f64).sqrt();
    let template_eyes = 125.92 * native as f64 / 512.0;
    eyes * k as f64 / template_eyes
}

/// Restores the chosen faces of `rgb` and pastes them over the background at the output size of
/// `target`. `conditioning(face)` picks each face's identity; `on_step` counts steps over faces.
#[allow(clippy::too_many_arguments)]
pub fn restore_faces<'p>(
    restorer: &Restorer,
    job: &FaceJob,
    rgb: &ImageF32,
    selected: &Selected,
    target: TargetSize,
    input: &Path,
    conditioning: &dyn Fn(&NumberedFace) -> Conditioning<'p>,
    on_step: &mut dyn FnMut(usize, usize),
) -> crate::Result<(ImageF32, Vec<ImageF32>)> {
    let (out_w, out_h) = target.output_size(rgb.width, rgb.height)?;
    let k = paste_factor((rgb.width, rgb.height), (out_w, out_h));
    let mut aligned: Vec<AlignedFace> = Vec::with_capacity(selected.chosen.len());
    for face in &selected.chosen {
        let side = crop_side(job, face, k);
        let template = Template::ffhq(side)?;
        aligned.push(align(
            rgb,
            &face.detection.landmarks,
            &template,
            &FACEXLIB_BORDER_RGB,
        )?);
    }
    let seed = restorer.settings.seed;
    let crops: Vec<FaceCrop> = selected
        .chosen
        .iter()
        .zip(&aligned)
        .map(|(face, a)| FaceCrop {
            image: &a.crop,
            conditioning: conditioning(face),
            // Each face its own random sequence, the same whatever else is selected.
            seed: crate::seeds::mix64(
                seed ^ (face.index as u64).wrapping_mul(crate::seeds::GOLDEN),
            ),
        })
        .collect();
    let restored = if crops.is_empty() {
        Vec::new()
    } else {
        restorer.restore_crops(&crops, on_step)?
    };
    let (big_w, big_h) = (rgb.width * k, rgb.height * k);
    let mut canvas = match job.background {
        Background::Lanczos => upscale_background(rgb, k)?,
        Background::Model => {
            restorer.restore(rgb, TargetSize::Size(big_w, big_h), &mut |_, _| {})?
        }
    };
    let mut faces_out = Vec::with_capacity(restored.len());
    for ((face, a), out) in selected.chosen.iter().zip(&aligned).zip(&restored) {
        // The diffusion may shift a face's colour: bring it back to the photo's.
        let matched = match_color(out, &a.crop)?;
        paste(&mut canvas, &matched, a, k)?;
        if let Some(dir) = &job.save_faces {
            save_face_pair(job, dir, input, face.index, &a.crop, &matched)?;
        }
        faces_out.push(matched);
    }
    if (big_w, big_h) != (out_w, out_h) {
        canvas = resize_cv2(&canvas, out_w, out_h, CvInterp::Lanczos4)?;
        canvas.data.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
    }
    Ok((canvas, faces_out))
}

/// `--save-faces`: the aligned input crop and its restoration of face `index`.
fn save_face_pair(
    job: &FaceJob,
    dir: &Path,
    input: &Path,
    index: usize,
    crop: &ImageF32,
    restored: &ImageF32,
) -> crate::Result<()> {
    for (path, img) in saved_face_paths(dir, input, index)
        .iter()
        .zip([crop, restored])
    {
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder).map_err(|e| crate::Error::io(folder, e))?;
        }
        crate::imaging::io::save_png(path, img, None, false, &[], job.overwrite)?;
    }
    Ok(())
}

/// Before a photo's faces are restored: the `--show-faces` picture and the `--save-faces`
/// files of `faces` may be written (not inputs; existing ones only with --force).
pub fn check_face_outputs(
    job: &FaceJob,
    input: &Path,
    faces: &[NumberedFace],
) -> crate::Result<()> {
    if let Some(target) = &job.show_faces {
        let path = faces_picture_path(target, input, job.many_inputs);
        check_face_output(&path, input, job.overwrite)?;
    }
    if let Some(dir) = &job.save_faces {
        for face in faces {
            for path in saved_face_paths(dir, input, face.index) {
                check_face_output(&path, input, job.overwrite)?;
            }
        }
    }
    Ok(())
}

/// `--show-faces`: the photo with the restored faces' numbered boxes.
pub fn show_faces(
    job: &FaceJob,
    input: &Path,
    rgb: &ImageF32,
    faces: &[NumberedFace],
) -> crate::Result<()> {
    let Some(target) = &job.show_faces else {
        return Ok(());
    };
    let path = faces_picture_path(target, input, job.many_inputs);
    if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder).map_err(|e| crate::Error::io(folder, e))?;
    }
    crate::imaging::io::save_image(&path, &draw_faces(rgb, faces), None, job.overwrite)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faces::boxes::Detection;

    #[test]
    fn integer_paste_factor_covers_the_output() {
        assert_eq!(paste_factor((100, 80), (400, 320)), 4);
        assert_eq!(paste_factor((100, 80), (250, 200)), 3);
        assert_eq!(paste_factor((100, 80), (100, 80)), 1);
        assert_eq!(paste_factor((100, 80), (50, 40)), 1);
    }

    #[test]
    fn faces_larger_than_their_crop_are_magnified() {
        let face = |eyes: f32| NumberedFace {
            index: 1,
            detection: Detection {
                bbox: [0.0, 0.0, 2.0 * eyes, 2.0 * eyes],
                score: 0.99,
                landmarks: [
                    [10.0, 10.0],
                    [10.0 + eyes, 10.0],
                    [0.0; 2],
                    [0.0; 2],
                    [0.0; 2],
                ],
            },
        };
        // 63 px between the eyes at x4 is 252 px in the output: twice a 512 crop's 126.
        assert!((magnification(&face(63.0), 512, 4) - 2.0).abs() < 0.01);
        assert!(magnification(&face(20.0), 512, 4) < 1.0);
    }
}
