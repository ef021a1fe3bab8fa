//! `pfstorer personalize`: learn an identity (blocks, γ gates, token) from reference photos.

use super::batch::progress_bar;
use super::model_args::ModelArgs;
use crate::error::Error;
use crate::faces::retinaface::RetinaFace;
use crate::imaging::io::load_image_with_min_size;
use crate::model::base::BaseModel;
use crate::personalize::identity::{self, Identity, IdentityInfo};
use crate::personalize::trainer::{TrainConfig, TrainableParams, Trainer};
use crate::weights::base_fingerprint_cached;
use crate::weights::digest::sha256_hex;
use clap::Args;
use std::collections::HashMap;
use std::path::PathBuf;

/// Fewest and most reference photos accepted.
pub const MIN_REFS: usize = 3;
pub const MAX_REFS: usize = 20;
/// Smallest accepted reference side in pixels.
pub const MIN_REF_SIDE: usize = 64;

#[derive(Debug, Args)]
pub struct PersonalizeArgs {
    /// Reference photos of the person (3 to 20; 5 recommended): files, folders (their images)
    /// or glob patterns; sharp, varied, face centred.
    #[arg(long, required = true, num_args = 1.., value_name = "PATHS")]
    pub refs: Vec<PathBuf>,
    /// Name of the identity (stored in the identity directory unless -o is given).
    #[arg(long, value_name = "NAME")]
    pub id: String,
    /// Training iterations.
    #[arg(long, default_value_t = 500)]
    pub steps: usize,
    /// Seed of the initialisation and of every random draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the identity here instead of the identity directory.
    #[arg(short, long = "output", alias = "out", value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Replace an existing identity of the same name or path.
    #[arg(long)]
    pub force: bool,
    /// Save a resumable checkpoint (`<output>.checkpoint`, see --resume) every N iterations
    /// (0 = never).
    #[arg(long, default_value_t = DEFAULT_CHECKPOINT_EVERY, value_name = "N")]
    pub checkpoint_every: usize,
    /// Continue from the checkpoint of an interrupted run with the same output.
    #[arg(long)]
    pub resume: bool,
    /// Training resolution in pixels (default: the model's native size).
    #[arg(long)]
    pub size: Option<usize>,
    /// The references are already aligned face crops (e.g. FFHQ-style): centre-cropped as they
    /// are, without face detection.
    #[arg(long)]
    pub refs_aligned: bool,
    #[command(flatten)]
    pub detection: super::face_args::DetectionArgs,
    /// No progress bar and no progress lines.
    #[arg(short, long)]
    pub quiet: bool,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Side of the aligned reference crops: the FFHQ-512 template restore's crops use (the trainer
/// resizes them to its resolution).
pub const ALIGN_SIZE: usize = 512;
/// Faces narrower than this in a reference are upsampled a lot by the alignment: warned about.
pub const SMALL_REFERENCE_FACE: f32 = 128.0;

/// The aligned face crop of one reference photo and its record: the largest face (noted when
/// there are several), refused when there is none, warned about when small.
fn reference_face(
    detector: &RetinaFace,
    rgb: &crate::imaging::ImageF32,
    path: &std::path::Path,
    args: &PersonalizeArgs,
) -> anyhow::Result<(
    crate::imaging::ImageF32,
    serde_json::Value,
    crate::imaging::ImageF32,
)> {
    let detections = detector.detect(rgb, &args.detection.detect_options())?;
    let (faces, _) = crate::faces::select::number_faces(&detections, 0.0);
    let shown = crate::fsutil::printable_path(path);
    let Some(face) = faces
        .iter()
        .max_by(|a, b| a.area().total_cmp(&b.area()))
        .copied()
    else {
        return Err(Error::Input(format!(
            "{shown}: no face found in this reference photo (give photos where the face is visible, lower --face-threshold, or pass --refs-aligned for crops that are already aligned)"
        ))
        .into());
    };
    if !args.quiet && faces.len() > 1 {
        eprintln!(
            "note: {shown}: {} faces; using the largest (face {}, {:.0} px wide)",
            faces.len(),
            face.index,
            face.width()
        );
    }
    if face.width() < SMALL_REFERENCE_FACE {
        eprintln!(
            "warning: {shown}: the face is only {:.0} px wide; it will be upsampled to the {ALIGN_SIZE} px crop (sharper, larger faces teach the identity more)",
            face.width()
        );
    }
    let template = crate::faces::align::Template::ffhq(ALIGN_SIZE)?;
    let aligned = crate::faces::align::align(
        rgb,
        &face.detection.landmarks,
        &template,
        &crate::faces::align::FACEXLIB_BORDER_RGB,
    )?;
    let chip = crate::faces::embed::chip_at(rgb, &face.detection.landmarks)?;
    let record = serde_json::json!({
        "aligned": format!("ffhq-{ALIGN_SIZE}"),
        "box": face.detection.bbox,
        "landmarks": face.detection.landmarks,
        "faces_in_photo": faces.len(),
    });
    Ok((aligned.crop, record, chip))
}

/// The dlib chip of a reference that is already an FFHQ-aligned crop (`--refs-aligned`): its
/// landmarks are the template's, scaled to the centre square.
fn aligned_reference_chip(
    rgb: &crate::imaging::ImageF32,
) -> crate::Result<crate::imaging::ImageF32> {
    let side = rgb.width.min(rgb.height);
    let (x0, y0) = ((rgb.width - side) / 2, (rgb.height - side) / 2);
    let landmarks = crate::faces::align::Template::ffhq(side)?.landmarks_at(x0 as f64, y0 as f64);
    crate::faces::embed::chip_at(rgb, &landmarks)
}

/// Names the references whose descriptor lies farther than dlib's same-person distance from the
/// median of the others' distances (another person among the photos, or a bad crop).
fn odd_references(embeddings: &[Vec<f32>], refs: &[PathBuf]) -> Vec<(PathBuf, f32)> {
    use crate::faces::embed::descriptor_distance_slices as dist;
    let mut odd = Vec::new();
    for (i, e) in embeddings.iter().enumerate() {
        let mut d: Vec<f32> = embeddings
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, o)| dist(e, o))
            .collect();
        d.sort_by(f32::total_cmp);
        let median = match d.len() {
            0 => 0.0,
            n if n % 2 == 1 => d[n / 2],
            n => 0.5 * (d[n / 2 - 1] + d[n / 2]),
        };
        if median > crate::faces::embed::SAME_PERSON_THRESHOLD {
            odd.push((refs[i].clone(), median));
        }
    }
    odd
}

/// Iterations between checkpoints by default: a run killed at 103/500 resumes from 100, and a
/// checkpoint (the identity plus optimizer moments) every 50 costs well under 1% of the run.
pub const DEFAULT_CHECKPOINT_EVERY: usize = 50;

/// Most iterations one run may ask for (the paper trains 500).
pub const MAX_STEPS: usize = 1_000_000;

/// Training resolutions accepted: multiples of 64 up to [`crate::config::MAX_IMAGE_SIZE`].
fn check_size(size: usize) -> anyhow::Result<()> {
    let max = crate::config::MAX_IMAGE_SIZE;
    if size < 64 || !size.is_multiple_of(64) || size > max {
        return Err(Error::Input(format!(
            "--size {size}: use a multiple of 64 between 64 and {max} (the paper trains at 512)"
        ))
        .into());
    }
    Ok(())
}

/// The iteration a checkpoint resumes at, if it belongs to this very run: same base (checked
/// by the caller), same references by content, seed, size and training settings, and an
/// iteration counter (and optimizer step count) below `--steps`. The total may differ from the
/// interrupted run's: learning rates are constant and iteration i's draws depend only on
/// (seed, i), so N iterations resumed to M equal an uninterrupted run of M, which is what the
/// identity's metadata then records.
fn check_resumable(
    saved: &Identity,
    checkpoint: &std::path::Path,
    info: &IdentityInfo,
    steps: usize,
) -> anyhow::Result<usize> {
    let refuse = |why: String| -> anyhow::Error {
        Error::Input(format!(
            "--resume: {} belongs to another run ({why}); rerun without --resume, or with that run's settings",
            crate::fsutil::printable_path(checkpoint)
        ))
        .into()
    };
    let hashes = |sources: &[serde_json::Value]| -> Vec<String> {
        sources
            .iter()
            .map(|s| s["sha256"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let saved_sources: Vec<serde_json::Value> = saved
        .metadata
        .get("ref_sources")
        .and_then(|j| serde_json::from_str(j).ok())
        .ok_or_else(|| refuse("no reference list".into()))?;
    if hashes(&saved_sources) != hashes(&info.ref_sources) {
        return Err(refuse("other reference photos".into()));
    }
    let saved_training: serde_json::Value = saved
        .metadata
        .get("training")
        .and_then(|j| serde_json::from_str(j).ok())
        .ok_or_else(|| refuse("no training record".into()))?;
    for key in ["seed", "size", "batch", "config", "references"] {
        if saved_training[key] != info.training[key] {
            return Err(refuse(format!(
                "{key} {} there, {} here",
                saved_training[key], info.training[key]
            )));
        }
    }
    let done: usize = saved
        .metadata
        .get("iterations_done")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| refuse("no iteration count".into()))?;
    let planned = saved_training["iterations"].as_u64().unwrap_or(0) as usize;
    // A finished identity (done = planned) may be continued as well.
    if done == 0 || done > planned {
        return Err(refuse(format!(
            "it claims {done} of its {planned} iterations done"
        )));
    }
    if done >= steps {
        return Err(Error::Input(format!(
            "--resume: {} has {done} iterations done already; ask for more with --steps",
            crate::fsutil::printable_path(checkpoint)
        ))
        .into());
    }
    if let Some(optimizer_steps) = saved.metadata.get("optimizer_steps") {
        if optimizer_steps.parse::<usize>().ok() != Some(done) {
            return Err(refuse(format!(
                "{optimizer_steps} optimizer steps for {done} iterations"
            )));
        }
    }
    Ok(done)
}

pub fn run(args: PersonalizeArgs) -> anyhow::Result<()> {
    identity::validate_name(&args.id)?;
    let out = match &args.out {
        Some(p) => p.clone(),
        None => identity::resolve(&args.id)?,
    };
    if args.steps == 0 || args.steps > MAX_STEPS {
        return Err(Error::Input(format!(
            "--steps {}: must be between 1 and {MAX_STEPS}",
            args.steps
        ))
        .into());
    }
    if let Some(size) = args.size {
        check_size(size)?;
    }
    // The identity file (and its checkpoint) can be written: checked before any training.
    crate::fsutil::check_not_an_input(&out, args.refs.iter().map(PathBuf::as_path))?;
    crate::fsutil::check_output_location(&out, args.force)?;
    let mut refs = Vec::new();
    for item in super::batch::expand_inputs(&args.refs) {
        match item {
            super::batch::InputItem::File(p) => refs.push(p),
            super::batch::InputItem::Invalid { arg, reason } => {
                return Err(Error::Input(format!(
                    "--refs {}: {reason}",
                    crate::fsutil::printable_path(&arg)
                ))
                .into())
            }
        }
    }
    refs.sort_by(|a, b| a.file_name().cmp(&b.file_name()).then(a.cmp(b)));
    if refs.len() < MIN_REFS || refs.len() > MAX_REFS {
        return Err(Error::Input(format!(
            "{} reference photos given; between {MIN_REFS} and {MAX_REFS} are needed (5 recommended)",
            refs.len()
        ))
        .into());
    }
    args.detection.check().map_err(super::usage)?;
    // References go through the detector and the alignment restore uses, so the identity
    // learns the framing it will see; the detector runs on the CPU (a second per photo).
    let detector = if args.refs_aligned {
        None
    } else {
        Some(RetinaFace::load_embedded(&candle_core::Device::Cpu)?)
    };
    let mut images = Vec::with_capacity(refs.len());
    let mut chips = Vec::with_capacity(refs.len());
    let mut sources = Vec::with_capacity(refs.len());
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    for path in &refs {
        let bytes = crate::imaging::io::read_input_file(path)?;
        let digest = sha256_hex(&bytes);
        if let Some(first) = seen.get(&digest) {
            return Err(Error::Input(format!(
                "{} is a duplicate of {} (same file contents); give distinct photos",
                path.display(),
                first.display()
            ))
            .into());
        }
        seen.insert(digest.clone(), path.clone());
        let loaded = load_image_with_min_size(path, MIN_REF_SIDE)?;
        let (w, h) = (loaded.width(), loaded.height());
        let side = w.min(h);
        let (image, crop) = match &detector {
            None => (
                loaded.rgb,
                serde_json::json!([(w - side) / 2, (h - side) / 2, side]),
            ),
            Some(detector) => {
                let (crop, face, chip) = reference_face(detector, &loaded.rgb, path, &args)?;
                chips.push(chip);
                (crop, face)
            }
        };
        if detector.is_none() {
            chips.push(aligned_reference_chip(&image)?);
        }
        sources.push(serde_json::json!({
            "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "sha256": digest,
            "crop": crop,
        }));
        images.push(image);
    }

    // Who the references show: their dlib-ID descriptors, stored with the identity so restore
    // can tell this person's faces from others'.
    let embedder = crate::faces::embed::Embedder::load_embedded(&candle_core::Device::Cpu)?;
    let embeddings: Vec<Vec<f32>> = embedder
        .embed(&chips)?
        .into_iter()
        .map(|d| d.to_vec())
        .collect();
    let odd = odd_references(&embeddings, &refs);
    for (path, median) in &odd {
        eprintln!(
            "warning: {} looks like another person: its dlib-ID distance to the other references is {median:.2} (median), above the same-person {}",
            crate::fsutil::printable_path(path),
            crate::faces::embed::SAME_PERSON_THRESHOLD
        );
    }
    if !odd.is_empty() && !args.force {
        return Err(Error::Input(format!(
            "{} reference photo{} of another person? remove {} or pass --force to train on them anyway",
            odd.len(),
            if odd.len() == 1 { "" } else { "s" },
            if odd.len() == 1 { "it" } else { "them" }
        ))
        .into());
    }
    let cfg = args.model.base_config()?;
    let base_path = args.model.base_path(!args.quiet)?;
    let size = args.size.unwrap_or(cfg.diffusion.image_size);
    check_size(size)?;
    let fingerprint = base_fingerprint_cached(&base_path)?;
    // Training runs in f32: `--dtype auto` resolves to it on every device.
    let (device, dtype) = args
        .model
        .device_dtype_for(crate::device::Workload::Training)?;
    let (base, _) = BaseModel::load(&base_path, cfg, dtype, &device)?;
    let params = TrainableParams::init(&base, args.seed)?;
    let config = TrainConfig::default();
    let mut trainer = Trainer::new(&base, params, &images, size, config, args.seed)?;
    let info = IdentityInfo {
        name: args.id.clone(),
        base_fingerprint: fingerprint.clone(),
        ref_sources: sources,
        training: serde_json::json!({
            "seed": args.seed,
            "iterations": args.steps,
            "batch": 1,
            "size": size,
            "optimizer": "AdamW(0.9, 0.999, eps 1e-8)",
            "config": config,
            "degradation": "heavy",
            "target": "v",
            "references": refs.len(),
            "preprocessing": if args.refs_aligned {
                "centre crop (--refs-aligned)".to_string()
            } else {
                format!("RetinaFace (threshold {}) + FFHQ-{ALIGN_SIZE} similarity alignment", args.detection.face_threshold)
            },
        }),
    };

    let checkpoint = crate::fsutil::checkpoint_path(&out);
    if args.resume {
        if !checkpoint.is_file() {
            return Err(Error::Input(format!(
                "--resume: no checkpoint at {}",
                checkpoint.display()
            ))
            .into());
        }
        let saved = Identity::load_file(&checkpoint)?;
        saved.check_base(&fingerprint)?;
        let done = check_resumable(&saved, &checkpoint, &info, args.steps)?;
        trainer.params.set_from(&saved.tensors)?;
        trainer.iteration = done;
        // Iteration i's draws depend only on (seed, i), so with the moments restored the run
        // continues exactly as if it had never stopped.
        match saved.optimizer_state() {
            Some((moments, steps)) => trainer.load_optimizer_state(&moments, steps)?,
            None => eprintln!(
                "note: {} has no optimizer moments (older pfstorer); they restart at zero",
                checkpoint.display()
            ),
        }
    }

    let bar = progress_bar(args.steps, args.quiet);
    bar.set_position(trainer.iteration as u64);
    let mut smoothed: Option<f32> = None;
    let say = |line: String| {
        if !args.quiet {
            bar.suspend(|| eprintln!("{line}"));
        }
    };
    let first_iteration = trainer.iteration;
    while trainer.iteration < args.steps {
        let started = std::time::Instant::now();
        let report = trainer.step()?;
        let s = smoothed.map_or(report.total, |s| 0.9 * s + 0.1 * report.total);
        smoothed = Some(s);
        bar.set_position(trainer.iteration as u64);
        bar.set_message(format!(
            "loss {s:.4} (diff {:.4}, gen {:.4}, pers {:.3})",
            report.diff, report.gen, report.pers
        ));
        if trainer.iteration == first_iteration + 1 {
            let left = args.steps - first_iteration;
            let seconds = started.elapsed().as_secs_f64();
            say(format!(
                "first iteration {}: training will take about {} ({left} iterations)",
                super::restore::human_duration(seconds),
                super::restore::human_duration(seconds * left as f64)
            ));
        }
        if args.checkpoint_every > 0
            && trainer.iteration % args.checkpoint_every == 0
            && trainer.iteration < args.steps
        {
            let mut saved = Identity::checkpoint_from_trainer(&trainer, &info)?;
            saved.set_embeddings(&embeddings)?;
            saved.save(&checkpoint, true)?;
            say(format!(
                "iteration {}/{}: loss {s:.4}; checkpoint {} (resume with --resume)",
                trainer.iteration,
                args.steps,
                crate::fsutil::printable_path(&checkpoint)
            ));
        }
    }
    bar.finish_and_clear();
    let mut identity = Identity::from_trainer(&trainer, &info)?;
    identity.set_embeddings(&embeddings)?;
    identity.save(&out, args.force)?;
    if checkpoint.is_file() {
        let _ = std::fs::remove_file(&checkpoint);
    }
    if !args.quiet {
        eprintln!(
            "identity {:?} written to {}",
            args.id,
            crate::fsutil::printable_path(&out)
        );
    }
    Ok(())
}
