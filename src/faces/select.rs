//! Which detected faces a restore works on: numbering that users can refer to, the size floor,
//! the crowd bound, `--face` lists and `--only-center-face`, and whether a photo already is a
//! face crop.
//!
//! Numbering: faces at least `min_face` pixels wide are numbered from 1 in reading order (by
//! the box centre's row band, then left to right), so `pfstorer faces` and `restore --face`
//! agree whatever the thresholds for selection are. Smaller faces get no number and are
//! reported as skipped.

use super::boxes::Detection;
use crate::error::{Error, Result};

/// A detection with the number users see.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NumberedFace {
    /// 1-based, in reading order.
    pub index: usize,
    pub detection: Detection,
}

impl NumberedFace {
    /// Width of the box in pixels (the face size the floor applies to).
    pub fn width(&self) -> f32 {
        self.detection.bbox[2] - self.detection.bbox[0]
    }

    /// Box area in square pixels.
    pub fn area(&self) -> f32 {
        let b = self.detection.bbox;
        (b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0)
    }

    fn centre(&self) -> (f32, f32) {
        let b = self.detection.bbox;
        (0.5 * (b[0] + b[2]), 0.5 * (b[1] + b[3]))
    }
}

/// How faces are chosen among the detections.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FaceSelection {
    /// Faces narrower than this (box width, pixels) are skipped with a note.
    pub min_face: f32,
    /// At most this many faces, the largest first; `None` = all.
    pub max_faces: Option<usize>,
    /// Only these numbers (`--face 1,3`); empty = every face.
    pub only: Vec<usize>,
    /// Only the face whose centre is nearest the image centre (`--only-center-face`).
    pub only_center: bool,
}

/// The outcome of [`select`]: the faces to restore and what was left out, in words.
#[derive(Debug, Clone, Default)]
pub struct Selected {
    /// Every face with a number (at least `min_face`), in number order.
    pub numbered: Vec<NumberedFace>,
    /// The faces to restore, in number order.
    pub chosen: Vec<NumberedFace>,
    /// Faces below `min_face`.
    pub too_small: usize,
    /// Faces beyond `max_faces`.
    pub over_limit: usize,
}

/// Numbers the detections in reading order: rows of faces (centres within half a median face
/// height of each other share a row), top row first, left to right inside a row.
pub fn number_faces(detections: &[Detection], min_face: f32) -> (Vec<NumberedFace>, usize) {
    let mut kept: Vec<Detection> = detections
        .iter()
        .copied()
        .filter(|d| d.bbox[2] - d.bbox[0] >= min_face)
        .collect();
    let too_small = detections.len() - kept.len();
    let mut heights: Vec<f32> = kept.iter().map(|d| d.bbox[3] - d.bbox[1]).collect();
    heights.sort_by(f32::total_cmp);
    let band = heights
        .get(heights.len() / 2)
        .copied()
        .unwrap_or(1.0)
        .max(1.0)
        * 0.5;
    let cy = |d: &Detection| 0.5 * (d.bbox[1] + d.bbox[3]);
    let cx = |d: &Detection| 0.5 * (d.bbox[0] + d.bbox[2]);
    kept.sort_by(|a, b| cy(a).total_cmp(&cy(b)));
    // Walk top to bottom, opening a new row when a centre falls below the row's first by more
    // than the band; then sort each row left to right.
    let mut rows: Vec<Vec<Detection>> = Vec::new();
    for d in kept {
        match rows.last_mut() {
            Some(row) if cy(&d) - cy(&row[0]) <= band => row.push(d),
            _ => rows.push(vec![d]),
        }
    }
    let numbered = rows
        .into_iter()
        .flat_map(|mut row| {
            row.sort_by(|a, b| cx(a).total_cmp(&cx(b)));
            row
        })
        .enumerate()
        .map(|(i, detection)| NumberedFace {
            index: i + 1,
            detection,
        })
        .collect();
    (numbered, too_small)
}

/// Applies `sel` to the detections of a `width x height` photo.
pub fn select(
    detections: &[Detection],
    width: usize,
    height: usize,
    sel: &FaceSelection,
) -> Result<Selected> {
    let (numbered, too_small) = number_faces(detections, sel.min_face);
    for &i in &sel.only {
        if i == 0 || i > numbered.len() {
            return Err(Error::Input(format!(
                "--face {i}: the photo has {} face{} (numbered from 1; `pfstorer faces` lists them)",
                numbered.len(),
                if numbered.len() == 1 { "" } else { "s" }
            )));
        }
    }
    let mut chosen: Vec<NumberedFace> = if sel.only.is_empty() {
        numbered.clone()
    } else {
        numbered
            .iter()
            .copied()
            .filter(|f| sel.only.contains(&f.index))
            .collect()
    };
    if sel.only_center {
        let (mx, my) = (0.5 * width as f32, 0.5 * height as f32);
        let dist = |f: &NumberedFace| {
            let (x, y) = f.centre();
            (x - mx).powi(2) + (y - my).powi(2)
        };
        chosen = chosen
            .iter()
            .copied()
            .min_by(|a, b| dist(a).total_cmp(&dist(b)))
            .into_iter()
            .collect();
    }
    let mut over_limit = 0;
    if let Some(max) = sel.max_faces {
        if chosen.len() > max {
            over_limit = chosen.len() - max;
            // The largest faces matter most in a crowd; ties keep the lower number.
            let mut by_size = chosen.clone();
            by_size.sort_by(|a, b| b.area().total_cmp(&a.area()).then(a.index.cmp(&b.index)));
            by_size.truncate(max);
            by_size.sort_by_key(|f| f.index);
            chosen = by_size;
        }
    }
    Ok(Selected {
        numbered,
        chosen,
        too_small,
        over_limit,
    })
}

/// Fraction of the photo's area a single face's box must cover for the photo to count as a face
/// crop (`--faces auto` restores it whole). An FFHQ-aligned 512 crop's face box covers about a
/// quarter of it; a half-body portrait's face about a twentieth.
pub const FACE_CROP_AREA_FRACTION: f32 = 0.15;

/// Whether a `width x height` photo with these faces already is a face crop: exactly one face,
/// covering at least [`FACE_CROP_AREA_FRACTION`] of the photo.
pub fn is_face_crop(faces: &[NumberedFace], width: usize, height: usize) -> bool {
    let photo = (width * height).max(1) as f32;
    faces.len() == 1 && faces[0].area() >= FACE_CROP_AREA_FRACTION * photo
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face(x: f32, y: f32, w: f32) -> Detection {
        Detection {
            bbox: [x, y, x + w, y + w * 1.2],
            score: 0.99,
            landmarks: [[x + 0.3 * w, y + 0.4 * w]; 5],
        }
    }

    #[test]
    fn faces_are_numbered_in_reading_order() {
        // Two rows: (100,10) (10,12) on top, (50,200) below; detector order is by score.
        let dets = [
            face(100.0, 10.0, 40.0),
            face(50.0, 200.0, 40.0),
            face(10.0, 12.0, 40.0),
        ];
        let (n, small) = number_faces(&dets, 16.0);
        assert_eq!(small, 0);
        let xs: Vec<f32> = n.iter().map(|f| f.detection.bbox[0]).collect();
        assert_eq!(xs, [10.0, 100.0, 50.0]);
        assert_eq!(n.iter().map(|f| f.index).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn small_faces_crowds_lists_and_the_centre() {
        let dets = [
            face(0.0, 0.0, 10.0),   // below the floor
            face(20.0, 0.0, 30.0),  // 1
            face(60.0, 0.0, 50.0),  // 2, largest
            face(120.0, 0.0, 40.0), // 3
        ];
        let sel = FaceSelection {
            min_face: 16.0,
            max_faces: Some(2),
            ..Default::default()
        };
        let s = select(&dets, 200, 100, &sel).unwrap();
        assert_eq!(s.too_small, 1);
        assert_eq!(s.over_limit, 1);
        assert_eq!(s.chosen.iter().map(|f| f.index).collect::<Vec<_>>(), [2, 3]);

        let only = FaceSelection {
            min_face: 16.0,
            only: vec![1, 3],
            ..Default::default()
        };
        let s = select(&dets, 200, 100, &only).unwrap();
        assert_eq!(s.chosen.iter().map(|f| f.index).collect::<Vec<_>>(), [1, 3]);
        let bad = FaceSelection {
            min_face: 16.0,
            only: vec![4],
            ..Default::default()
        };
        let err = select(&dets, 200, 100, &bad).unwrap_err().to_string();
        assert!(err.contains("--face 4") && err.contains("3 faces"), "{err}");

        let centre = FaceSelection {
            min_face: 16.0,
            only_center: true,
            ..Default::default()
        };
        let s = select(&dets, 200, 100, &centre).unwrap();
        assert_eq!(s.chosen.len(), 1);
        assert_eq!(s.chosen[0].index, 2);
    }

    #[test]
    fn a_face_crop_is_one_face_covering_much_of_the_photo() {
        let (one, _) = number_faces(&[face(10.0, 10.0, 40.0)], 1.0);
        assert!(is_face_crop(&one, 64, 64));
        assert!(!is_face_crop(&one, 400, 300));
        let (two, _) = number_faces(&[face(0.0, 0.0, 40.0), face(40.0, 0.0, 40.0)], 1.0);
        assert!(!is_face_crop(&two, 64, 64));
        assert!(!is_face_crop(&[], 64, 64));
    }
}
