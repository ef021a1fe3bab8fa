//! The face-detection flags shared by `restore`, `faces` and `personalize`.

use crate::faces::retinaface::DetectOptions;
use crate::faces::select::FaceSelection;
use clap::Args;
use std::path::{Path, PathBuf};

/// Default `--min-face`: faces narrower than this many pixels carry too little to restore.
pub const DEFAULT_MIN_FACE: f32 = 16.0;
/// Default `--max-faces`: a crowd is bounded, the largest faces first.
pub const DEFAULT_MAX_FACES: usize = 20;

#[derive(Debug, Clone, Args)]
pub struct DetectionArgs {
    /// Detector score above which a face counts (0-1; facexlib's 0.97 for restoration; lower
    /// finds small or turned faces, and more false ones).
    #[arg(long, default_value_t = 0.97, value_name = "P")]
    pub face_threshold: f32,
    /// Faces narrower than this many pixels are skipped (with a note).
    #[arg(long, default_value_t = DEFAULT_MIN_FACE, value_name = "PX")]
    pub min_face: f32,
    /// At most this many faces per photo, the largest first (a line says how many were skipped).
    #[arg(long, default_value_t = DEFAULT_MAX_FACES, value_name = "N")]
    pub max_faces: usize,
}

impl DetectionArgs {
    /// Checks the values (a usage error before anything is read).
    pub fn check(&self) -> anyhow::Result<()> {
        if !(self.face_threshold.is_finite() && (0.0..1.0).contains(&self.face_threshold)) {
            anyhow::bail!(
                "--face-threshold {}: must be at least 0 and below 1",
                self.face_threshold
            );
        }
        if !(self.min_face.is_finite() && self.min_face >= 0.0) {
            anyhow::bail!(
                "--min-face {}: must be a number of pixels, 0 or more",
                self.min_face
            );
        }
        if self.max_faces == 0 {
            anyhow::bail!("--max-faces 0: must be at least 1");
        }
        Ok(())
    }

    pub fn detect_options(&self) -> DetectOptions {
        DetectOptions {
            score_threshold: self.face_threshold,
            ..DetectOptions::default()
        }
    }

    pub fn selection(&self, only: &[usize], only_center: bool) -> FaceSelection {
        FaceSelection {
            min_face: self.min_face,
            max_faces: Some(self.max_faces),
            only: only.to_vec(),
            only_center,
        }
    }
}

/// Where `faces --show` / `restore --show-faces TARGET` puts the picture of `input`'s numbered
/// faces: TARGET itself for a single input, else `TARGET/<stem>_faces.png`.
pub fn faces_picture_path(target: &Path, input: &Path, many_inputs: bool) -> PathBuf {
    if many_inputs {
        target.join(format!("{}_faces.png", file_stem(input)))
    } else {
        target.to_path_buf()
    }
}

/// `--save-faces DIR`: `DIR/cropped_faces/<stem>_<NN>.png` and `DIR/restored_faces/<stem>_<NN>.png`
/// (GFPGAN's folder names), the aligned input crop and its restoration.
pub fn saved_face_paths(dir: &Path, input: &Path, index: usize) -> [PathBuf; 2] {
    let name = format!("{}_{index:02}.png", file_stem(input));
    [
        dir.join("cropped_faces").join(&name),
        dir.join("restored_faces").join(name),
    ]
}

/// Before any work on `input`: a file the face pictures will write is not an input, and exists
/// only when `force` allows replacing it.
pub fn check_face_output(path: &Path, input: &Path, force: bool) -> crate::Result<()> {
    crate::fsutil::check_not_an_input(path, std::iter::once(input))?;
    crate::fsutil::check_overwrite(path, force)
}

fn file_stem(input: &Path) -> String {
    input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into())
}
