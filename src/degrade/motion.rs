//! Motion-blur kernels: KAIR's `blurkernel_synthesis` (random 3-D camera trajectory binned into
//! an h x h histogram, smoothed by a 3x3 Gaussian, centre-padded, sometimes enlarged). PFStorer
//! does not name its motion-blur generator; this is the labelled candidate of the fixtures.

use super::kernels::Kernel;
use crate::error::{Error, Result};
use crate::imaging::resize::{resize_cv2_planar, CvInterp};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

fn randn<R: Rng>(rng: &mut R) -> f64 {
    StandardNormal.sample(rng)
}

/// `randomTrajectory(T)`: a (3, T) row-major trajectory (rows x, y, z).
pub fn random_trajectory<R: Rng>(rng: &mut R, steps: usize) -> Vec<f64> {
    let t_len = steps;
    let mut x = vec![0f64; 3 * t_len];
    let mut v: Vec<f64> = (0..3 * t_len).map(|_| randn(rng)).collect();
    let mut r = vec![0f64; 3 * t_len];
    let trr = 2.0 * std::f64::consts::PI / t_len as f64;
    for t in 1..t_len {
        let f_rot: Vec<f64> = (0..3)
            .map(|k| randn(rng) / (t as f64 + 1.0) + r[k * t_len + t - 1])
            .collect();
        let f_trans: Vec<f64> = (0..3).map(|_| randn(rng) / (t as f64 + 1.0)).collect();
        for k in 0..3 {
            r[k * t_len + t] = r[k * t_len + t - 1] + trr * f_rot[k];
            v[k * t_len + t] = v[k * t_len + t - 1] + f_trans[k];
        }
        let st = [v[t], v[t_len + t], v[2 * t_len + t]];
        let rot = [r[t], r[t_len + t], r[2 * t_len + t]];
        let moved = rot3d(st, rot);
        for k in 0..3 {
            x[k * t_len + t] = x[k * t_len + t - 1] + moved[k];
        }
    }
    x
}

/// `Rz @ Ry @ Rx @ p`.
fn rot3d(p: [f64; 3], r: [f64; 3]) -> [f64; 3] {
    let (sx, cx) = r[0].sin_cos();
    let (sy, cy) = r[1].sin_cos();
    let (sz, cz) = r[2].sin_cos();
    let a = [p[0], cx * p[1] - sx * p[2], sx * p[1] + cx * p[2]];
    let b = [cy * a[0] + sy * a[2], a[1], -sy * a[0] + cy * a[2]];
    [cz * b[0] - sz * b[1], sz * b[0] + cz * b[1], b[2]]
}

/// Kernel size drawn by `kernelFromTrajectory` from `u` in (0, 1): `5 - ln(u)/0.15`, rounded,
/// at most 27, made odd.
pub fn trajectory_kernel_size(u: f64) -> usize {
    let h = (5.0 - u.ln() / 0.15).min(27.0).round_ties_even() as i64;
    (h + 1 - h.rem_euclid(2)) as usize
}

/// numpy `arange(start, stop, step)`.
fn arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let n = ((stop - start) / step).ceil().max(0.0) as usize;
    (0..n).map(|i| start + i as f64 * step).collect()
}

/// `kernelFromTrajectory` for a given size `h`: histogram of the (x, y) trajectory points
/// (row = x bin, column = y bin), normalised, 3x3 Gaussian (sigma 1, zero border), normalised.
/// `None` when no point falls in a bin (the reference then redraws).
pub fn kernel_from_trajectory(traj: &[f64], steps: usize, h: usize) -> Option<Kernel> {
    let xs = &traj[..steps];
    let ys = &traj[steps..2 * steps];
    let minmax = |v: &[f64]| {
        v.iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            })
    };
    let (xmin, xmax) = minmax(xs);
    let (ymin, ymax) = minmax(ys);
    let xthr = arange(xmin, xmax, (xmax - xmin) / h as f64);
    let ythr = arange(ymin, ymax, (ymax - ymin) / h as f64);
    let mut k = vec![0f64; h * h];
    for i in 1..xthr.len() {
        for j in 1..ythr.len() {
            let n = xs
                .iter()
                .zip(ys)
                .filter(|(&x, &y)| {
                    x >= xthr[i - 1] && x < xthr[i] && y >= ythr[j - 1] && y < ythr[j]
                })
                .count();
            if i - 1 < h && j - 1 < h {
                k[(i - 1) * h + j - 1] = n as f64;
            }
        }
    }
    let s: f64 = k.iter().sum();
    if s == 0.0 {
        return None;
    }
    k.iter_mut().for_each(|v| *v /= s);
    let g: Vec<f64> = {
        let raw: Vec<f64> = (0..9)
            .map(|i| {
                let (dy, dx) = ((i / 3) as f64 - 1.0, (i % 3) as f64 - 1.0);
                (-(dx * dx + dy * dy) / 2.0).exp()
            })
            .collect();
        let t: f64 = raw.iter().sum();
        raw.into_iter().map(|v| v / t).collect()
    };
    let mut out = vec![0f64; h * h];
    for y in 0..h as isize {
        for x in 0..h as isize {
            let mut acc = 0.0;
            for dy in -1..=1isize {
                for dx in -1..=1isize {
                    let (sy, sx) = (y - dy, x - dx);
                    if sy >= 0 && sx >= 0 && sy < h as isize && sx < h as isize {
                        acc +=
                            g[((dy + 1) * 3 + dx + 1) as usize] * k[sy as usize * h + sx as usize];
                    }
                }
            }
            out[y as usize * h + x as usize] = acc;
        }
    }
    Kernel::new(h, out).ok().map(Kernel::normalized)
}

/// Centre-pads (or crops the top-left `size x size`) as `blurkernel_synthesis` does, then
/// optionally enlarges by `enlarge = Some((new_w, new_h))` with INTER_LINEAR and centre-crops.
pub fn finish_motion_kernel(
    k: Kernel,
    size: usize,
    enlarge: Option<(usize, usize)>,
) -> Result<Kernel> {
    let mut k = if k.size <= size {
        k.padded_to(size)
    } else {
        let mut data = Vec::with_capacity(size * size);
        for y in 0..size {
            data.extend_from_slice(&k.data[y * k.size..y * k.size + size]);
        }
        Kernel::new(size, data)?
    };
    if let Some((nw, nh)) = enlarge {
        if nw < size || nh < size {
            return Err(Error::Input(
                "motion kernel enlargement must not shrink".into(),
            ));
        }
        let src: Vec<f32> = k.data.iter().map(|&v| v as f32).collect();
        let big = resize_cv2_planar(&src, 1, size, size, nh, nw, CvInterp::Linear)?;
        let (oy, ox) = ((nh - size) / 2, (nw - size) / 2);
        let mut data = Vec::with_capacity(size * size);
        for y in 0..size {
            for x in 0..size {
                data.push(big[(oy + y) * nw + ox + x] as f64);
            }
        }
        k = Kernel::new(size, data)?;
    }
    Ok(k.normalized())
}

/// KAIR `blurkernel_synthesis(h=size)` with our generator.
pub fn random_motion_kernel<R: Rng>(rng: &mut R, size: usize) -> Result<Kernel> {
    const STEPS: usize = 250;
    let traj = random_trajectory(rng, STEPS);
    let mut kernel = None;
    for _ in 0..100 {
        let h = trajectory_kernel_size(1.0 - rng.gen::<f64>());
        if let Some(k) = kernel_from_trajectory(&traj, STEPS, h) {
            kernel = Some(k);
            break;
        }
    }
    let kernel = kernel.unwrap_or_else(|| Kernel::pulse(size));
    let enlarge = if rng.gen_range(0..4) == 1 {
        Some((
            rng.gen_range(size..=5 * size),
            rng.gen_range(size..=5 * size),
        ))
    } else {
        None
    };
    finish_motion_kernel(kernel, size, enlarge)
}
