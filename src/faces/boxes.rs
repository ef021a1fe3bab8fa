//! Face detections and their selection: score threshold, ranking, top-k and greedy
//! non-maximum suppression.
//!
//! The overlap follows the `py_cpu_nms` routine of the RetinaFace reference code (biubug6,
//! facexlib), in f32: a box `[x1, y1, x2, y2]` covers `(x2 - x1 + 1) * (y2 - y1 + 1)` pixels
//! (inclusive integer-corner convention), the intersection's sides are `max(0, min(x2) - max(x1) + 1)`,
//! and a box is dropped when its IoU with an already kept box is strictly above the threshold.
//! Coordinates are pixels with the conventions of [`crate::faces`].

/// One detected face: box corners, the face score (softmax probability of the face class) and
/// the five landmarks in [`crate::faces`]' order (left eye, right eye, nose, left mouth corner,
/// right mouth corner; "left" meaning image left).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// `[x1, y1, x2, y2]`, not clipped to the image.
    pub bbox: [f32; 4],
    pub score: f32,
    /// `[x, y]` per landmark.
    pub landmarks: [[f32; 2]; 5],
}

/// How detections are chosen among the scored candidates (the reference's post-processing).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Selection {
    /// Candidates whose score is strictly above this are kept.
    pub score_threshold: f32,
    /// A box is suppressed when its IoU with a better kept box is strictly above this.
    pub nms_threshold: f32,
    /// At most this many best-scored candidates enter the suppression.
    pub top_k_before_nms: usize,
    /// At most this many detections are returned after the suppression.
    pub keep_top_k: usize,
}

/// Area of `[x1, y1, x2, y2]` with the inclusive `+1` convention.
fn area(b: &[f32; 4]) -> f32 {
    (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0)
}

/// Intersection over union of two boxes with the `+1` convention of `py_cpu_nms`, in f32 and in
/// its order of operations (`inter / (area_a + area_b - inter)`).
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0]) + 1.0).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1]) + 1.0).max(0.0);
    let inter = w * h;
    inter / (area(a) + area(b) - inter)
}

/// Greedy NMS over `boxes` already in rank order (best first): returns the indices kept, in
/// rank order. A box is dropped when its IoU with a kept box is `> iou_threshold`.
pub fn nms(boxes: &[[f32; 4]], iou_threshold: f32) -> Vec<usize> {
    let mut suppressed = vec![false; boxes.len()];
    let mut kept = Vec::new();
    for i in 0..boxes.len() {
        if suppressed[i] {
            continue;
        }
        kept.push(i);
        for j in i + 1..boxes.len() {
            if !suppressed[j] && iou(&boxes[i], &boxes[j]) > iou_threshold {
                suppressed[j] = true;
            }
        }
    }
    kept
}

/// The reference post-processing: keep `score > score_threshold`, rank by descending score
/// (stable: ties keep their candidate order), truncate to `top_k_before_nms`, suppress, and
/// truncate to `keep_top_k`. NaN scores never pass the threshold.
pub fn select(candidates: Vec<Detection>, sel: &Selection) -> Vec<Detection> {
    let mut ranked: Vec<Detection> = candidates
        .into_iter()
        .filter(|d| d.score > sel.score_threshold)
        .collect();
    // `sort_by` is stable; scores are finite here (NaN fails the comparison above).
    ranked.sort_by(|a, b| b.score.total_cmp(&a.score));
    ranked.truncate(sel.top_k_before_nms);
    let boxes: Vec<[f32; 4]> = ranked.iter().map(|d| d.bbox).collect();
    nms(&boxes, sel.nms_threshold)
        .into_iter()
        .take(sel.keep_top_k)
        .map(|i| ranked[i])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(bbox: [f32; 4], score: f32) -> Detection {
        Detection {
            bbox,
            score,
            landmarks: [[0.0; 2]; 5],
        }
    }

    const SEL: Selection = Selection {
        score_threshold: 0.5,
        nms_threshold: 0.4,
        top_k_before_nms: 5000,
        keep_top_k: 750,
    };

    #[test]
    fn iou_uses_inclusive_pixel_areas() {
        // [0,0,9,9] covers 10x10 = 100 px; [5,0,14,9] likewise; overlap x 5..9 -> 5 x 10 = 50.
        let v = iou(&[0.0, 0.0, 9.0, 9.0], &[5.0, 0.0, 14.0, 9.0]);
        assert_eq!(v, 50.0 / 150.0);
        // Touching at one column still shares that column: 1 x 10 = 10 of 190.
        let v = iou(&[0.0, 0.0, 9.0, 9.0], &[9.0, 0.0, 18.0, 9.0]);
        assert_eq!(v, 10.0 / 190.0);
        // Disjoint: the clamp at 0 gives no overlap.
        assert_eq!(iou(&[0.0, 0.0, 4.0, 4.0], &[10.0, 10.0, 12.0, 12.0]), 0.0);
        assert_eq!(iou(&[1.0, 2.0, 5.0, 7.0], &[1.0, 2.0, 5.0, 7.0]), 1.0);
    }

    #[test]
    fn nms_drops_only_strictly_above_threshold() {
        // The second box overlaps the first with IoU 50/150 = 0.333; the third is far away.
        let boxes = [
            [0.0, 0.0, 9.0, 9.0],
            [5.0, 0.0, 14.0, 9.0],
            [100.0, 100.0, 120.0, 130.0],
        ];
        assert_eq!(nms(&boxes, 0.4), vec![0, 1, 2]);
        assert_eq!(nms(&boxes, 0.3), vec![0, 2]);
        // IoU exactly at the threshold is kept (`iou <= thr` survives): 1/3 vs 1/3.
        assert_eq!(nms(&boxes, 50.0 / 150.0), vec![0, 1, 2]);
    }

    #[test]
    fn nms_suppressed_boxes_do_not_suppress_others() {
        // a suppresses b; b would suppress c, but c overlaps a only a little, so c stays.
        let a = [0.0, 0.0, 9.0, 9.0];
        let b = [3.0, 0.0, 12.0, 9.0]; // IoU(a,b) = 70/130
        let c = [7.0, 0.0, 16.0, 9.0]; // IoU(a,c) = 30/170, IoU(b,c) = 60/140
        assert!(iou(&b, &c) > 0.4 && iou(&a, &c) < 0.4);
        assert_eq!(nms(&[a, b, c], 0.4), vec![0, 2]);
    }

    #[test]
    fn select_thresholds_ranks_stably_and_caps() {
        let candidates = vec![
            det([0.0, 0.0, 9.0, 9.0], 0.6),
            det([100.0, 0.0, 109.0, 9.0], 0.5), // not strictly above 0.5: dropped
            det([200.0, 0.0, 209.0, 9.0], 0.9),
            // ties with the first and overlaps it (IoU 80/120): the earlier one wins the tie
            det([2.0, 0.0, 11.0, 9.0], 0.6),
            det([201.0, 0.0, 210.0, 9.0], 0.95), // suppresses the 0.9 box (IoU 90/110)
            det([300.0, 0.0, 309.0, 9.0], f32::NAN),
            det([400.0, 0.0, 409.0, 9.0], 0.55),
        ];
        let out = select(candidates.clone(), &SEL);
        let scores: Vec<f32> = out.iter().map(|d| d.score).collect();
        assert_eq!(scores, vec![0.95, 0.6, 0.55]);
        assert_eq!(out[1].bbox, [0.0, 0.0, 9.0, 9.0]);

        let capped = select(
            candidates.clone(),
            &Selection {
                keep_top_k: 2,
                ..SEL
            },
        );
        assert_eq!(
            capped.iter().map(|d| d.score).collect::<Vec<_>>(),
            vec![0.95, 0.6]
        );
        // top-k before NMS: only the best two candidates (0.95, 0.9) enter, and 0.95 drops 0.9.
        let top2 = select(
            candidates,
            &Selection {
                top_k_before_nms: 2,
                ..SEL
            },
        );
        assert_eq!(top2.iter().map(|d| d.score).collect::<Vec<_>>(), vec![0.95]);
        assert!(select(Vec::new(), &SEL).is_empty());
    }
}
