//! `pfstorer faces PHOTO...`: the faces found in each photo, numbered as `restore --face` takes
//! them, as a table or JSON (with `--embed`, each face's dlib-ID descriptor), and `--show` to
//! write the photo with the numbered boxes drawn.

use super::batch::{self, InputItem};
use super::face_args::DetectionArgs;
use super::usage;
use crate::faces::draw::draw_faces;
use crate::faces::embed::Embedder;
use crate::faces::retinaface::RetinaFace;
use crate::faces::select::{number_faces, NumberedFace};
use crate::fsutil::printable_path;
use crate::imaging::io::{load_image, save_image};
use candle_core::Device;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct FacesArgs {
    /// Photos, folders (their images) or glob patterns.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// One JSON document on stdout: per image its path and faces (index, box [x1,y1,x2,y2],
    /// score, landmarks [[x,y] x 5]).
    #[arg(long)]
    pub json: bool,
    /// Also each face's dlib-ID descriptor (128 numbers; same person under 0.6 apart).
    #[arg(long)]
    pub embed: bool,
    /// Write the photo with the numbered boxes and landmarks to FILE (a folder for several
    /// photos: <stem>_faces.png in it).
    #[arg(long, value_name = "FILE")]
    pub show: Option<PathBuf>,
    /// Replace an existing --show picture.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub detection: DetectionArgs,
    /// No per-photo lines on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

/// One face as `faces --json` prints it.
#[derive(Debug, serde::Serialize)]
struct FaceRecord {
    index: usize,
    #[serde(rename = "box")]
    bbox: [f32; 4],
    score: f32,
    landmarks: [[f32; 2]; 5],
    #[serde(skip_serializing_if = "Option::is_none")]
    embedding: Option<Vec<f32>>,
}

#[derive(Debug, serde::Serialize)]
struct PhotoRecord {
    path: String,
    width: usize,
    height: usize,
    faces: Vec<FaceRecord>,
    /// Faces under --min-face (not numbered).
    too_small: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub fn run(args: FacesArgs) -> anyhow::Result<()> {
    args.detection.check().map_err(usage)?;
    let device = Device::Cpu;
    let detector = RetinaFace::load_embedded(&device)?;
    let embedder = if args.embed {
        Some(Embedder::load_embedded(&device)?)
    } else {
        None
    };
    let mut files = Vec::new();
    let mut records = Vec::new();
    for item in batch::expand_inputs(&args.inputs) {
        match item {
            InputItem::File(p) => files.push(p),
            InputItem::Invalid { arg, reason } => {
                // Errors go to stderr as they happen, whatever stdout is piped to.
                eprintln!("{}: {reason}", printable_path(&arg));
                records.push(PhotoRecord {
                    path: arg.display().to_string(),
                    width: 0,
                    height: 0,
                    faces: Vec::new(),
                    too_small: 0,
                    error: Some(reason),
                });
            }
        }
    }
    let many = files.len() > 1;
    let opts = args.detection.detect_options();
    for path in &files {
        let record = match faces_of(&detector, embedder.as_ref(), path, &args, &opts, many) {
            Ok(r) => r,
            Err(e) => {
                let reason = batch::reason_any(&e, path);
                eprintln!("{}: {reason}", printable_path(path));
                PhotoRecord {
                    path: path.display().to_string(),
                    width: 0,
                    height: 0,
                    faces: Vec::new(),
                    too_small: 0,
                    error: Some(reason),
                }
            }
        };
        records.push(record);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&records)?);
    } else {
        println!("image\tface\tbox (x1,y1,x2,y2)\tscore\twidth px");
        for r in &records {
            if let Some(e) = &r.error {
                println!("{}\t-\terror: {}", crate::fsutil::printable(&r.path), e);
                continue;
            }
            if r.faces.is_empty() {
                println!("{}\t-\tno face", crate::fsutil::printable(&r.path));
            }
            for f in &r.faces {
                println!(
                    "{}\t{}\t{:.0},{:.0},{:.0},{:.0}\t{:.3}\t{:.0}",
                    crate::fsutil::printable(&r.path),
                    f.index,
                    f.bbox[0],
                    f.bbox[1],
                    f.bbox[2],
                    f.bbox[3],
                    f.score,
                    f.bbox[2] - f.bbox[0]
                );
            }
        }
    }
    let failed = records.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} inputs failed", records.len());
    }
    Ok(())
}

fn faces_of(
    detector: &RetinaFace,
    embedder: Option<&Embedder>,
    path: &std::path::Path,
    args: &FacesArgs,
    opts: &crate::faces::retinaface::DetectOptions,
    many: bool,
) -> anyhow::Result<PhotoRecord> {
    // Where the picture goes is checked before the photo is read.
    let show = match &args.show {
        Some(show) => {
            let target = super::face_args::faces_picture_path(show, path, many);
            super::face_args::check_face_output(&target, path, args.force)?;
            Some(target)
        }
        None => None,
    };
    let loaded = load_image(path)?;
    let rgb = &loaded.rgb;
    let detections = detector.detect(rgb, opts)?;
    let (numbered, too_small) = number_faces(&detections, args.detection.min_face);
    let embeddings = match embedder {
        Some(e) => embed_faces(e, rgb, &numbered)?,
        None => vec![None; numbered.len()],
    };
    if let Some(target) = show {
        if let Some(folder) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(folder).map_err(|e| crate::Error::io(folder, e))?;
        }
        save_image(&target, &draw_faces(rgb, &numbered), None, args.force)?;
        if !args.quiet {
            eprintln!("{} -> {}", printable_path(path), printable_path(&target));
        }
    }
    if !args.quiet && !many {
        eprintln!(
            "{}: {} face{}{}",
            printable_path(path),
            numbered.len(),
            if numbered.len() == 1 { "" } else { "s" },
            if too_small > 0 {
                format!(" ({too_small} under --min-face)")
            } else {
                String::new()
            }
        );
    }
    Ok(PhotoRecord {
        path: path.display().to_string(),
        width: rgb.width,
        height: rgb.height,
        faces: numbered
            .iter()
            .zip(embeddings)
            .map(|(f, embedding)| FaceRecord {
                index: f.index,
                bbox: f.detection.bbox,
                score: f.detection.score,
                landmarks: f.detection.landmarks,
                embedding,
            })
            .collect(),
        too_small,
        error: None,
    })
}

/// The dlib-ID descriptor of each face, from its landmarks.
pub fn embed_faces(
    embedder: &Embedder,
    rgb: &crate::imaging::ImageF32,
    faces: &[NumberedFace],
) -> crate::Result<Vec<Option<Vec<f32>>>> {
    let landmarks: Vec<_> = faces.iter().map(|f| f.detection.landmarks).collect();
    Ok(embedder
        .embed_at(rgb, &landmarks)?
        .into_iter()
        .map(|d| Some(d.to_vec()))
        .collect())
}
