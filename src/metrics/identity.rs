//! The dlib-ID distance: how far a restored face is from the ground truth's face, as the
//! Euclidean distance of their dlib face-recognition descriptors (same person under about 0.6).
//! Faces are found in the ground truth (RetinaFace) and the same landmarks cut the 150x150 chip
//! from both images, so a restoration that loses the face cannot move the crop. The value is
//! the mean over the ground truth's faces; NaN when it has none.
//!
//! This is not the paper's identity score (ArcFace cosine similarity): the numbers are not
//! comparable with its tables.

use super::Metric;
use crate::error::{Error, Result};
use crate::faces::embed::{chip_at, descriptor_distance, Embedder};
use crate::faces::retinaface::{DetectOptions, RetinaFace};
use crate::imaging::ImageF32;
use candle_core::Device;

/// Detector score for ground-truth faces: clean photos, so facexlib's restoration threshold.
const GT_FACE_THRESHOLD: f32 = 0.97;

pub struct DlibIdDistance {
    detector: RetinaFace,
    embedder: Embedder,
}

impl DlibIdDistance {
    pub fn new() -> Result<Self> {
        Ok(DlibIdDistance {
            detector: RetinaFace::load_embedded(&Device::Cpu)?,
            embedder: Embedder::load_embedded(&Device::Cpu)?,
        })
    }
}

impl Metric for DlibIdDistance {
    fn name(&self) -> &'static str {
        "dlib-id-distance"
    }

    fn higher_is_better(&self) -> bool {
        false
    }

    fn compute(&self, restored: &ImageF32, reference: &ImageF32) -> Result<f64> {
        if (restored.width, restored.height) != (reference.width, reference.height) {
            return Err(Error::Input(
                "dlib-ID distance: images differ in size".into(),
            ));
        }
        let opts = DetectOptions {
            score_threshold: GT_FACE_THRESHOLD,
            ..DetectOptions::default()
        };
        let faces = self.detector.detect(reference, &opts)?;
        if faces.is_empty() {
            return Ok(f64::NAN);
        }
        let mut total = 0.0;
        for face in &faces {
            let chips = [
                chip_at(reference, &face.landmarks)?,
                chip_at(restored, &face.landmarks)?,
            ];
            let d = self.embedder.embed(&chips)?;
            total += descriptor_distance(&d[0], &d[1]) as f64;
        }
        Ok(total / faces.len() as f64)
    }
}
