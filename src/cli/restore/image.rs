//! One image of a restore batch: load it, say the cost before spending it, restore it, and
//! write it in its output's format with the settings as metadata.

use super::faces::{
    check_face_outputs, magnification, plan_photo, restore_faces, show_faces, FaceJob, PhotoPlan,
};
use crate::cli::batch;
use crate::cli::report::FaceRecord;
use crate::faces::select::NumberedFace;
use crate::imaging::io::{load_image_within, save_output, LoadedImage, OutputFormat, OutputImage};
use crate::imaging::ImageF32;
use crate::restore::{Conditioning, Restorer, TargetSize};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::path::Path;
use std::time::Instant;

/// Inputs smaller than this on a side are refused: there is no face to restore in them.
pub const MIN_INPUT_SIDE: usize = 8;

pub fn step_bar(quiet: bool) -> ProgressBar {
    let bar = batch::progress_bar(0, quiet);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} {bar:30} step {pos}/{len} [{elapsed_precise}<{eta_precise}]",
    ) {
        bar.set_style(style);
    }
    bar
}

pub fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// An identity faces can be matched to.
pub struct IdentityChoice<'a> {
    pub name: String,
    /// The mean dlib-ID descriptor of its references (`None` for identities made before them).
    pub mean: Option<Vec<f32>>,
    pub who: Conditioning<'a>,
}

/// Which identity each face gets (position in `job.identities`, or `None` for the base model),
/// with one line per face saying why, and each face's input descriptor.
#[allow(clippy::type_complexity)]
fn assign_faces(
    job: &ImageJob,
    rgb: &ImageF32,
    faces: &[NumberedFace],
) -> crate::Result<(Vec<Option<usize>>, Vec<String>, Vec<Option<Vec<f32>>>)> {
    use crate::faces::embed::descriptor_distance_slices as dist;
    let ids = job.identities;
    if ids.is_empty() || faces.is_empty() {
        return Ok((vec![None; faces.len()], Vec::new(), vec![None; faces.len()]));
    }
    let descriptors = match job.embedder {
        Some(e) => crate::cli::faces::embed_faces(e, rgb, faces)?,
        None => vec![None; faces.len()],
    };
    let distances: Vec<Vec<Option<f32>>> = descriptors
        .iter()
        .map(|d| {
            ids.iter()
                .map(|id| match (d, &id.mean) {
                    (Some(d), Some(m)) => Some(dist(d, m)),
                    _ => None,
                })
                .collect()
        })
        .collect();
    let threshold = crate::faces::matching::ASSIGN_THRESHOLD;
    let only_pair = ids.len() == 1 && faces.len() == 1;
    let mut assigned = if only_pair {
        vec![Some(0)]
    } else {
        crate::faces::matching::assign(&distances, threshold)
    };
    let mut lines = Vec::with_capacity(faces.len());
    for (f, face) in faces.iter().enumerate() {
        let by_hand = job.id_faces.iter().find(|(n, _)| *n == face.index);
        if let Some((_, pick)) = by_hand {
            assigned[f] = *pick;
        }
        let name = |i: usize| crate::fsutil::printable(&ids[i].name);
        let d = |i: usize| {
            distances[f][i]
                .map(|d| format!("{d:.2}"))
                .unwrap_or_else(|| "unknown".into())
        };
        let line = match (assigned[f], by_hand) {
            (Some(i), Some(_)) => format!(
                "face {} -> {} (--id-face; distance {})",
                face.index,
                name(i),
                d(i)
            ),
            (None, Some(_)) => format!("face {} -> base (--id-face)", face.index),
            (Some(i), None) if only_pair => {
                format!(
                    "face {} -> {} (the only face and identity; distance {})",
                    face.index,
                    name(i),
                    d(i)
                )
            }
            (Some(i), None) => format!("face {} -> {} ({})", face.index, name(i), d(i)),
            (None, None) => {
                let nearest = (0..ids.len())
                    .filter_map(|i| distances[f][i].map(|d| (i, d)))
                    .min_by(|a, b| a.1.total_cmp(&b.1));
                match nearest {
                    Some((i, dd)) => format!(
                        "face {} -> base (nearest {} {dd:.2}{})",
                        face.index,
                        name(i),
                        if dd < threshold {
                            ", taken by a closer face"
                        } else {
                            ""
                        }
                    ),
                    None => format!(
                        "face {} -> base (no identity has face descriptors; use --id-face)",
                        face.index
                    ),
                }
            }
        };
        lines.push(line);
    }
    Ok((assigned, lines, descriptors))
}

/// The dlib-ID distance of each restored face crop (FFHQ-aligned) to its identity's mean.
fn restored_distances(
    job: &ImageJob,
    crops: &[ImageF32],
    assigned: &[Option<usize>],
) -> crate::Result<Vec<Option<f32>>> {
    let Some(embedder) = job.embedder else {
        return Ok(vec![None; crops.len()]);
    };
    let mut out = Vec::with_capacity(crops.len());
    for (crop, pick) in crops.iter().zip(assigned) {
        let mean = pick.and_then(|i| job.identities[i].mean.as_ref());
        let Some(mean) = mean else {
            out.push(None);
            continue;
        };
        // The crop's landmarks are the template's.
        let lm = crate::faces::align::Template::ffhq(crop.width)?.landmarks_at(0.0, 0.0);
        let d = embedder.embed_at(crop, &[lm])?;
        out.push(Some(crate::faces::embed::descriptor_distance_slices(
            &d[0], mean,
        )));
    }
    Ok(out)
}

/// What every image of a batch shares besides the restorer.
pub struct ImageJob<'a> {
    /// Face detection and paste-back; `None` with `--faces whole`.
    pub faces: Option<&'a FaceJob<'a>>,
    /// The `--id` identities, in order.
    pub identities: &'a [IdentityChoice<'a>],
    /// `--id-face` overrides: face number to an identity's position, or the base model.
    pub id_faces: &'a [(usize, Option<usize>)],
    /// The dlib-ID embedder, when identities are matched to faces.
    pub embedder: Option<&'a crate::faces::embed::Embedder>,
    pub target: TargetSize,
    pub metadata: &'a [(String, String)],
    pub overwrite: bool,
    pub max_input_pixels: usize,
    /// `device, dtype` for the work line.
    pub run_label: &'a str,
    pub quality: u8,
    /// Print the sampling details under the plan line.
    pub verbose: bool,
}

/// Projected sampling times above this get a line on how to cut them.
const LONG_RUN_S: f64 = 3600.0;

/// A duration for people: seconds, minutes, hours or days.
pub(crate) fn human_duration(seconds: f64) -> String {
    if seconds < 90.0 {
        format!("{seconds:.1} s")
    } else if seconds < 5400.0 {
        format!("{:.0} min", seconds / 60.0)
    } else if seconds < 2.0 * 86400.0 {
        format!("{:.1} h", seconds / 3600.0)
    } else {
        format!("{:.1} days", seconds / 86400.0)
    }
}

/// `200 steps`, or `200 steps x 4 patches` when the image is processed in patches.
fn steps_and_patches(steps: usize, patches: usize) -> String {
    steps_times(steps, patches, "patch", "patches")
}

/// `200 steps`, or `200 steps x 4 <many>` for more than one piece (one face is still said).
fn steps_times(steps: usize, count: usize, one: &str, many: &str) -> String {
    let plural = |n: usize, a: &str, b: &str| format!("{n} {}", if n == 1 { a } else { b });
    let steps = plural(steps, "step", "steps");
    if count > 1 || one == "face" {
        format!("{steps} x {}", plural(count, one, many))
    } else {
        steps
    }
}

/// Drives a step bar; after the first step, says `project(seconds of that step)`.
fn step_progress<'a>(
    steps: &'a ProgressBar,
    say: &'a dyn Fn(String),
    project: impl Fn(f64) -> Vec<String> + 'a,
) -> impl FnMut(usize, usize) + 'a {
    let mut started: Option<Instant> = None;
    let mut projected = false;
    move |done: usize, total: usize| {
        steps.set_length(total as u64);
        steps.set_position(done as u64);
        if done == 0 && started.is_none() {
            started = Some(Instant::now());
        } else if done >= 1 && !projected {
            projected = true;
            if let Some(start) = started {
                // Faces sampled together finish their first step at once: `done` of them.
                for line in project(start.elapsed().as_secs_f64() / done as f64) {
                    say(line);
                }
            }
        }
    }
}

/// The line after the first sampling step: its time and the image's projected sampling time,
/// counted as users count it (steps x patches), plus how to cut it above [`LONG_RUN_S`].
fn projection_lines(
    first_step_s: f64,
    steps: usize,
    pieces: usize,
    one: &str,
    many: &str,
) -> Vec<String> {
    let projected = first_step_s * (steps * pieces) as f64;
    let counted = steps_times(steps, pieces, one, many);
    let mut lines = vec![format!(
        "first step {}: sampling will take about {} ({counted})",
        human_duration(first_step_s),
        human_duration(projected)
    )];
    if projected > LONG_RUN_S {
        lines.push(
            "to cut it: fewer --steps (e.g. --steps 50), a smaller --scale (fewer patches and latent tiles), or a GPU build (scripts/build-cuda.sh)".into(),
        );
    }
    lines
}

pub fn restore_one(
    restorer: &Restorer,
    input: &Path,
    (output, format): (&Path, OutputFormat),
    job: &ImageJob,
    steps: &ProgressBar,
    bars: &MultiProgress,
) -> crate::Result<Option<Vec<FaceRecord>>> {
    let job_all = job;
    let ImageJob {
        faces: face_job,
        target,
        metadata,
        overwrite,
        max_input_pixels,
        run_label,
        quality,
        verbose,
        ..
    } = *job;
    let loaded: LoadedImage = load_image_within(input, MIN_INPUT_SIDE, max_input_pixels)?;
    // Say the cost before spending it (stderr, also with --quiet: it is no progress bar).
    let say = |line: String| bars.suspend(|| eprintln!("{line}"));
    let name = crate::fsutil::printable(&file_name(input));
    let photo_plan = match face_job {
        Some(job) => {
            let (plan, notes) = plan_photo(job, &loaded.rgb)?;
            for note in notes {
                say(format!("{name}: {note}"));
            }
            plan
        }
        None => PhotoPlan::Whole(None),
    };
    let write = |restored: ImageF32| {
        write_restored(
            restored,
            &loaded,
            input,
            (output, format),
            metadata,
            quality,
            overwrite,
        )
    };
    if let (PhotoPlan::Faces(selected), Some(job)) = (&photo_plan, face_job) {
        // Where the face pictures go is settled before any face is restored.
        check_face_outputs(job, input, &selected.chosen)?;
        let (out_w, out_h) = target.output_size(loaded.rgb.width, loaded.rgb.height)?;
        let n = selected.chosen.len();
        let k = super::faces::paste_factor((loaded.rgb.width, loaded.rgb.height), (out_w, out_h));
        // Faces of one identity share UNet calls as the device's memory allows.
        let per_call = restorer.tiling().tiles_per_batch.min(n);
        say(format!(
            "{name}: {out_w}x{out_h} output, {n} face{} x {} steps at {} px{}, {} background; {run_label}",
            if n == 1 { "" } else { "s" },
            restorer.settings.steps,
            job.native,
            if per_call > 1 {
                format!(" (up to {per_call} per UNet call)")
            } else {
                String::new()
            },
            match job.background {
                super::faces::Background::Lanczos => "lanczos",
                super::faces::Background::Model => "model (whole photo through the diffusion)",
            }
        ));
        let (assigned, lines, _) = assign_faces(job_all, &loaded.rgb, &selected.chosen)?;
        for line in &lines {
            say(format!("{name}: {line}"));
        }
        let enlarged: Vec<(usize, f64)> = selected
            .chosen
            .iter()
            .map(|f| (f.index, magnification(f, job.native, k)))
            .filter(|&(_, m)| m > 1.05)
            .collect();
        if !enlarged.is_empty() && job.face_size.is_none() {
            let most = enlarged.iter().map(|e| e.1).fold(0.0, f64::max);
            let list: Vec<String> = enlarged
                .iter()
                .map(|(i, m)| format!("{i} ({m:.1}x)"))
                .collect();
            say(format!(
                "{name}: face{} {} will be larger in the output than the {} px crop (upsampled); --face-size {} restores such faces at their output size",
                if enlarged.len() == 1 { "" } else { "s" },
                list.join(", "),
                job.native,
                ((job.native as f64 * most / 64.0).ceil() * 64.0) as usize
            ));
        }
        let mut on_step = step_progress(steps, &say, |seconds| {
            projection_lines(seconds, restorer.settings.steps, n, "face", "faces")
        });
        let identities = job_all.identities;
        let conditioning = |face: &NumberedFace| -> Conditioning<'_> {
            let pos = selected.chosen.iter().position(|f| f.index == face.index);
            match pos.and_then(|p| assigned[p]) {
                Some(i) => identities[i].who,
                None => Conditioning::Base,
            }
        };
        let (restored, crops) = restore_faces(
            restorer,
            job,
            &loaded.rgb,
            selected,
            target,
            input,
            &conditioning,
            &mut on_step,
        )?;
        show_faces(job, input, &loaded.rgb, &selected.chosen)?;
        let distances = restored_distances(job_all, &crops, &assigned)?;
        for ((face, pick), &d) in selected.chosen.iter().zip(&assigned).zip(&distances) {
            if let (Some(i), Some(d)) = (pick, d) {
                say(distance_line(&name, face.index, &identities[*i].name, d));
            }
        }
        let records = selected
            .numbered
            .iter()
            .map(|face| {
                let pos = selected.chosen.iter().position(|c| c.index == face.index);
                FaceRecord {
                    bbox: face.detection.bbox,
                    score: Some(face.detection.score),
                    restored: pos.is_some(),
                    identity: pos
                        .and_then(|p| assigned[p])
                        .map(|i| identities[i].name.clone()),
                    dlib_id_distance: pos.and_then(|p| distances[p]),
                }
            })
            .collect();
        write(restored)?;
        return Ok(Some(records));
    }
    let (plan, work) = restorer.work(loaded.rgb.width, loaded.rgb.height, target)?;
    say(format!(
        "{}: {}x{} output, {}; {run_label}",
        crate::fsutil::printable(&file_name(input)),
        plan.out_w,
        plan.out_h,
        steps_and_patches(work.steps, work.patches),
    ));
    if verbose {
        say(format!("  work: {work}"));
    }
    let mut on_step = step_progress(steps, &say, |seconds| {
        projection_lines(seconds, work.steps, work.patches, "patch", "patches")
    });
    // A face crop restored whole: its one face is recorded, and matched to the identities like
    // any other.
    let single = match &photo_plan {
        PhotoPlan::Whole(Some(sel)) if sel.numbered.len() == 1 => Some(sel.numbered[0]),
        _ => None,
    };
    let (who, matched) = match single {
        Some(face) if !job_all.identities.is_empty() => {
            let (assigned, lines, _) = assign_faces(job_all, &loaded.rgb, &[face])?;
            for line in &lines {
                say(format!("{name}: {line}"));
            }
            let who = match assigned[0] {
                Some(i) => job_all.identities[i].who,
                None => Conditioning::Base,
            };
            (who, Some((face, assigned[0])))
        }
        Some(face) => (Conditioning::Configured, Some((face, None))),
        None if job_all.identities.len() > 1 => {
            say(format!(
                "{name}: no single face to match to the identities: restored with the base model"
            ));
            (Conditioning::Base, None)
        }
        None => (Conditioning::Configured, None),
    };
    let restored = restorer.restore_as(&loaded.rgb, target, who, &mut on_step)?;
    let records = match matched {
        Some((face, pick)) => {
            let distance = whole_face_distance(job_all, &restored, &loaded.rgb, &face, pick)?;
            if let (Some(i), Some(d)) = (pick, distance) {
                say(distance_line(
                    &name,
                    face.index,
                    &job_all.identities[i].name,
                    d,
                ));
            }
            Some(vec![FaceRecord {
                bbox: face.detection.bbox,
                score: Some(face.detection.score),
                restored: true,
                identity: pick.map(|i| job_all.identities[i].name.clone()),
                dlib_id_distance: distance,
            }])
        }
        None => None,
    };
    write(restored)?;
    Ok(records)
}

/// The line saying how close a restored face came to its identity.
fn distance_line(photo: &str, index: usize, identity: &str, distance: f32) -> String {
    format!(
        "{photo}: face {index} restored: dlib-ID distance {distance:.2} to {}",
        crate::fsutil::printable(identity)
    )
}

/// The dlib-ID distance of the face of a photo restored whole to its identity's mean: the
/// face's landmarks found in the input, scaled to the output.
fn whole_face_distance(
    job: &ImageJob,
    restored: &ImageF32,
    input: &ImageF32,
    face: &NumberedFace,
    pick: Option<usize>,
) -> crate::Result<Option<f32>> {
    let mean = pick.and_then(|i| job.identities[i].mean.as_ref());
    let (Some(embedder), Some(mean)) = (job.embedder, mean) else {
        return Ok(None);
    };
    let (sx, sy) = (
        restored.width as f32 / input.width as f32,
        restored.height as f32 / input.height as f32,
    );
    let landmarks = face.detection.landmarks.map(|[x, y]| [x * sx, y * sy]);
    let d = embedder.embed_at(restored, &[landmarks])?;
    Ok(Some(crate::faces::embed::descriptor_distance_slices(
        &d[0], mean,
    )))
}

/// Writes a restored RGB image with the input's alpha (resized), gray-ness and bit depth.
fn write_restored(
    restored: ImageF32,
    loaded: &LoadedImage,
    input: &Path,
    (output, format): (&Path, OutputFormat),
    metadata: &[(String, String)],
    quality: u8,
    overwrite: bool,
) -> crate::Result<()> {
    let (w, h) = (restored.width, restored.height);
    let alpha = match &loaded.alpha {
        Some(a) => Some(clamp01(crate::imaging::resize::resize_torch(
            a,
            w,
            h,
            crate::imaging::resize::TorchInterp::Bicubic,
        )?)),
        None => None,
    };
    let rgb = if loaded.gray {
        to_gray(&restored)
    } else {
        restored
    };
    let mut meta = metadata.to_vec();
    meta.push(("pfstorer:input".to_string(), file_name(input)));
    let image = OutputImage {
        rgb: &rgb,
        alpha: alpha.as_ref(),
        sixteen_bit: loaded.bit_depth > 8,
        text: &meta,
        quality,
    };
    save_output(output, format, &image, overwrite).map(drop)
}

fn clamp01(mut img: ImageF32) -> ImageF32 {
    img.data.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
    img
}

/// Gray sources stay gray: the BT.601 luma, saved as a one-channel (gray) PNG.
fn to_gray(img: &ImageF32) -> ImageF32 {
    let data = img
        .data
        .chunks_exact(3)
        .map(|px| 0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2])
        .collect();
    ImageF32::new(img.width, img.height, 1, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human_duration(11.34), "11.3 s");
        assert_eq!(human_duration(600.0), "10 min");
        assert_eq!(human_duration(9000.0), "2.5 h");
        assert_eq!(human_duration(3.0 * 86400.0), "3.0 days");
    }

    #[test]
    fn projection_and_the_hint_above_an_hour() {
        let short = projection_lines(2.0, 100, 1, "patch", "patches");
        assert_eq!(
            short,
            vec!["first step 2.0 s: sampling will take about 3 min (100 steps)".to_string()]
        );
        // Exactly one hour is not above it.
        assert_eq!(projection_lines(36.0, 100, 1, "patch", "patches").len(), 1);
        let long = projection_lines(12.0, 200, 4, "patch", "patches");
        assert_eq!(long.len(), 2);
        assert_eq!(
            long[0],
            "first step 12.0 s: sampling will take about 2.7 h (200 steps x 4 patches)"
        );
        for flag in ["--steps", "--scale", "GPU build"] {
            assert!(long[1].contains(flag), "{flag} in {}", long[1]);
        }
    }
}
