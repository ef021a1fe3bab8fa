//! The picture a user looks at before choosing faces: the photo with each numbered face's box,
//! its five landmarks and its number drawn on it (`pfstorer faces --show`,
//! `restore --show-faces`). Lines scale with the photo so they stay visible on large photos.

use super::select::NumberedFace;
use crate::imaging::ImageF32;

/// 3x5 bitmaps of the digits 0-9, one row per `u8` (bit 2 = left column).
const DIGITS: [[u8; 5]; 10] = [
    [0b111, 0b101, 0b101, 0b101, 0b111],
    [0b010, 0b110, 0b010, 0b010, 0b111],
    [0b111, 0b001, 0b111, 0b100, 0b111],
    [0b111, 0b001, 0b111, 0b001, 0b111],
    [0b101, 0b101, 0b111, 0b001, 0b001],
    [0b111, 0b100, 0b111, 0b001, 0b111],
    [0b111, 0b100, 0b111, 0b101, 0b111],
    [0b111, 0b001, 0b010, 0b010, 0b010],
    [0b111, 0b101, 0b111, 0b101, 0b111],
    [0b111, 0b101, 0b111, 0b001, 0b111],
];

/// Box colour (green), landmark colour (red) and the number's colour (yellow), RGB.
const BOX_RGB: [f32; 3] = [0.1, 0.95, 0.2];
const LANDMARK_RGB: [f32; 3] = [1.0, 0.15, 0.1];
const LABEL_RGB: [f32; 3] = [1.0, 0.9, 0.1];

/// Fills the clipped rectangle `[x0, x1) x [y0, y1)` of an RGB(A) image with `rgb`.
fn fill(img: &mut ImageF32, x0: i64, y0: i64, x1: i64, y1: i64, rgb: [f32; 3]) {
    let (w, h) = (img.width as i64, img.height as i64);
    let (x0, x1) = (x0.clamp(0, w), x1.clamp(0, w));
    let (y0, y1) = (y0.clamp(0, h), y1.clamp(0, h));
    let c = img.channels;
    for y in y0..y1 {
        for x in x0..x1 {
            let px = (y as usize * img.width + x as usize) * c;
            for k in 0..c.min(3) {
                img.data[px + k] = rgb[k];
            }
            if c == 4 {
                img.data[px + 3] = 1.0;
            }
        }
    }
}

/// `photo` (RGB or RGBA) with every face in `faces` drawn on it.
pub fn draw_faces(photo: &ImageF32, faces: &[NumberedFace]) -> ImageF32 {
    let mut img = if photo.channels >= 3 {
        photo.clone()
    } else {
        // Gray photos are drawn on in colour.
        let c = photo.channels;
        let data = photo
            .data
            .chunks_exact(c)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect();
        ImageF32::new(photo.width, photo.height, 3, data)
    };
    let line = ((img.width.max(img.height) as f32 / 400.0).ceil() as i64).max(1);
    for face in faces {
        let b = face.detection.bbox.map(|v| v.round() as i64);
        let [x0, y0, x1, y1] = b;
        fill(&mut img, x0, y0, x1 + 1, y0 + line, BOX_RGB);
        fill(&mut img, x0, y1 + 1 - line, x1 + 1, y1 + 1, BOX_RGB);
        fill(&mut img, x0, y0, x0 + line, y1 + 1, BOX_RGB);
        fill(&mut img, x1 + 1 - line, y0, x1 + 1, y1 + 1, BOX_RGB);
        let dot = line + 1;
        for [x, y] in face.detection.landmarks {
            let (x, y) = (x.round() as i64, y.round() as i64);
            fill(
                &mut img,
                x - dot,
                y - dot,
                x + dot + 1,
                y + dot + 1,
                LANDMARK_RGB,
            );
        }
        // The number above the box (inside it when the box touches the top edge).
        let cell = (((x1 - x0) / 16).max(2)).min(4 * line + 2);
        let digits: Vec<usize> = face
            .index
            .to_string()
            .bytes()
            .map(|d| (d - b'0') as usize)
            .collect();
        let label_h = 5 * cell;
        let top = if y0 - label_h - line >= 0 {
            y0 - label_h - line
        } else {
            y0 + line
        };
        for (n, d) in digits.iter().enumerate() {
            let left = x0 + n as i64 * 4 * cell;
            for (row, bits) in DIGITS[*d].iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        let (x, y) = (left + col * cell, top + row as i64 * cell);
                        fill(&mut img, x, y, x + cell, y + cell, LABEL_RGB);
                    }
                }
            }
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faces::boxes::Detection;

    #[test]
    fn boxes_landmarks_and_numbers_are_drawn_inside_the_photo() {
        let photo = ImageF32::zeros(120, 90, 3);
        let face = NumberedFace {
            index: 12,
            detection: Detection {
                bbox: [30.0, 40.0, 80.0, 100.0], // reaches past the bottom edge
                score: 0.99,
                landmarks: [
                    [40.0, 55.0],
                    [70.0, 55.0],
                    [55.0, 65.0],
                    [45.0, 80.0],
                    [65.0, 80.0],
                ],
            },
        };
        let out = draw_faces(&photo, &[face]);
        assert_eq!((out.width, out.height, out.channels), (120, 90, 3));
        // Box corner green, a landmark red, a pixel far away untouched.
        assert_eq!(&out.data[(40 * 120 + 30) * 3..][..3], &BOX_RGB);
        assert_eq!(&out.data[(55 * 120 + 40) * 3..][..3], &LANDMARK_RGB);
        assert_eq!(&out.data[(5 * 120 + 110) * 3..][..3], &[0.0; 3]);
        // Some label pixels above the box.
        let label =
            (0..40).any(|y| (30..60).any(|x| out.data[(y * 120 + x) * 3..][..3] == LABEL_RGB));
        assert!(label);
    }
}
