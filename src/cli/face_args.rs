//! The face-detection flags shared by `restore`, `faces` and `personalize`.

use crate::faces::retinaface::DetectOptions;
use crate::faces::select::FaceSelection;
use clap::Args;

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
