//! RetinaFace anchors ("priors") and the decoding of the regression outputs into pixels.
//!
//! Priors, for each pyramid level `(step, sizes)` in `(8, [16, 32]), (16, [64, 128]),
//! (32, [256, 512])`, row-major over a `ceil(H/step) x ceil(W/step)` grid and, per cell, one
//! prior per size: `[(j + 0.5)·step / W, (i + 0.5)·step / H, size / W, size / H]` (centre and
//! size, normalised by the input's width `W` and height `H`; computed in f64, stored f32). This
//! is the row order of the network's outputs (see `net.rs`).
//!
//! Decoding (f32, the reference's order of operations) with variances `(0.1, 0.2)`:
//! centre `c = p.xy + loc.xy·0.1·p.wh`, size `wh = p.wh·exp(loc.wh·0.2)`, corners
//! `x1y1 = c - wh/2`, `x2y2 = x1y1 + wh`, then scaled by `[W, H, W, H]`; landmark `k` is
//! `(p.xy + lm[2k..2k+2]·0.1·p.wh)·[W, H]`. Results are input pixels, not clipped.

/// Anchor sizes (pixels) per pyramid level, two per grid cell.
pub const MIN_SIZES: [[usize; 2]; 3] = [[16, 32], [64, 128], [256, 512]];
/// Feature stride (pixels) of each pyramid level.
pub const STEPS: [usize; 3] = [8, 16, 32];
/// Scale of the centre offsets and of the log-size offsets.
pub const VARIANCES: [f32; 2] = [0.1, 0.2];

/// Grid of one level: `(rows, columns)` = `(ceil(H/step), ceil(W/step))`.
pub fn level_grid(height: usize, width: usize, step: usize) -> (usize, usize) {
    (height.div_ceil(step), width.div_ceil(step))
}

/// Number of priors (= output rows of the network) for an `height x width` input.
pub fn prior_count(height: usize, width: usize) -> usize {
    STEPS
        .iter()
        .zip(MIN_SIZES.iter())
        .map(|(&step, sizes)| {
            let (rows, cols) = level_grid(height, width, step);
            rows * cols * sizes.len()
        })
        .sum()
}

/// All priors `[cx, cy, w, h]` (normalised) of an `height x width` input, in output row order.
pub fn priors(height: usize, width: usize) -> Vec<[f32; 4]> {
    let (h, w) = (height as f64, width as f64);
    let mut out = Vec::with_capacity(prior_count(height, width));
    for (&step, sizes) in STEPS.iter().zip(MIN_SIZES.iter()) {
        let (rows, cols) = level_grid(height, width, step);
        let s = step as f64;
        for i in 0..rows {
            for j in 0..cols {
                for &size in sizes {
                    let size = size as f64;
                    out.push([
                        ((j as f64 + 0.5) * s / w) as f32,
                        ((i as f64 + 0.5) * s / h) as f32,
                        (size / w) as f32,
                        (size / h) as f32,
                    ]);
                }
            }
        }
    }
    out
}

/// Box `[x1, y1, x2, y2]` in input pixels from one `loc` row and its prior.
pub fn decode_box(loc: &[f32; 4], prior: &[f32; 4], width: usize, height: usize) -> [f32; 4] {
    let cx = prior[0] + loc[0] * VARIANCES[0] * prior[2];
    let cy = prior[1] + loc[1] * VARIANCES[0] * prior[3];
    let bw = prior[2] * (loc[2] * VARIANCES[1]).exp();
    let bh = prior[3] * (loc[3] * VARIANCES[1]).exp();
    let x1 = cx - bw / 2.0;
    let y1 = cy - bh / 2.0;
    let (x2, y2) = (x1 + bw, y1 + bh);
    let (w, h) = (width as f32, height as f32);
    [x1 * w, y1 * h, x2 * w, y2 * h]
}

/// The five landmarks `[x, y]` in input pixels from one `landmarks` row and its prior.
pub fn decode_landmarks(
    landmarks: &[f32; 10],
    prior: &[f32; 4],
    width: usize,
    height: usize,
) -> [[f32; 2]; 5] {
    let (w, h) = (width as f32, height as f32);
    std::array::from_fn(|k| {
        let x = prior[0] + landmarks[2 * k] * VARIANCES[0] * prior[2];
        let y = prior[1] + landmarks[2 * k + 1] * VARIANCES[0] * prior[3];
        [x * w, y * h]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-5 * b.abs().max(1.0)
    }

    #[test]
    fn priors_of_a_small_odd_input() {
        // H = 20, W = 12: stride 8 -> 3 x 2 cells, stride 16 -> 2 x 1, stride 32 -> 1 x 1.
        let p = priors(20, 12);
        assert_eq!(p.len(), (3 * 2 + 2 + 1) * 2);
        assert_eq!(prior_count(20, 12), p.len());
        let expect = |got: [f32; 4], want: [f64; 4]| {
            for (g, w) in got.iter().zip(want) {
                assert_eq!(*g, w as f32, "{got:?} vs {want:?}");
            }
        };
        // level 0, cell (0, 0), sizes 16 then 32
        expect(p[0], [4.0 / 12.0, 4.0 / 20.0, 16.0 / 12.0, 16.0 / 20.0]);
        expect(p[1], [4.0 / 12.0, 4.0 / 20.0, 32.0 / 12.0, 32.0 / 20.0]);
        // level 0, cell (0, 1): next column first (row-major)
        expect(p[2], [12.0 / 12.0, 4.0 / 20.0, 16.0 / 12.0, 16.0 / 20.0]);
        // level 0, cell (2, 1): the last one of the level
        expect(p[11], [12.0 / 12.0, 20.0 / 20.0, 32.0 / 12.0, 32.0 / 20.0]);
        // level 1, cell (1, 0), size 128
        expect(p[15], [8.0 / 12.0, 24.0 / 20.0, 128.0 / 12.0, 128.0 / 20.0]);
        // level 2, its single cell, size 512
        expect(
            p[17],
            [16.0 / 12.0, 16.0 / 20.0, 512.0 / 12.0, 512.0 / 20.0],
        );
        assert!(priors(0, 0).is_empty());
        assert_eq!(prior_count(1, 1), 6);
    }

    #[test]
    fn decode_by_hand() {
        // prior centre (0.5, 0.25), size (0.25, 0.5) in a W = 100, H = 40 input.
        let prior = [0.5, 0.25, 0.25, 0.5];
        let loc = [1.0, -1.0, 0.0, 2f32.ln() / 0.2];
        // centre (0.5 + 0.1·0.25, 0.25 - 0.1·0.5) = (0.525, 0.2); size (0.25, 1.0)
        let b = decode_box(&loc, &prior, 100, 40);
        let want = [40.0, -12.0, 65.0, 28.0];
        for (g, w) in b.iter().zip(want) {
            assert!(close(*g, w), "{b:?} vs {want:?}");
        }
        let lm = [0.0, 0.0, 2.0, 0.0, 0.0, 2.0, -4.0, 0.0, 0.0, -4.0];
        let pts = decode_landmarks(&lm, &prior, 100, 40);
        let want = [
            [50.0, 10.0],
            [55.0, 10.0],
            [50.0, 14.0],
            [40.0, 10.0],
            [50.0, 2.0],
        ];
        for (g, w) in pts.iter().zip(want) {
            assert!(
                close(g[0], w[0]) && close(g[1], w[1]),
                "{pts:?} vs {want:?}"
            );
        }
    }
}
