//! Blur kernels of BasicSR's `degradations.py`: bivariate Gaussian, generalized Gaussian and
//! plateau kernels (isotropic or rotated anisotropic), `random_mixed_kernels`, and the
//! circular low-pass ("sinc") kernel. Kernels are float64, square and odd-sized, row = y.

use crate::error::{Error, Result};
use rand::Rng;
use serde::Serialize;
use std::f64::consts::PI;

/// A square (size x size) float64 kernel, row-major, row = y.
#[derive(Debug, Clone, PartialEq)]
pub struct Kernel {
    pub size: usize,
    pub data: Vec<f64>,
}

impl Kernel {
    pub fn new(size: usize, data: Vec<f64>) -> Result<Self> {
        if data.len() != size * size {
            return Err(Error::Input(format!(
                "kernel: {} values for {size}x{size}",
                data.len()
            )));
        }
        Ok(Kernel { size, data })
    }

    /// Divides by the sum (BasicSR normalises every kernel to sum 1).
    pub fn normalized(mut self) -> Self {
        let s: f64 = self.data.iter().sum();
        if s != 0.0 {
            self.data.iter_mut().for_each(|v| *v /= s);
        }
        self
    }

    /// Zero-pads symmetrically to `size` (no-op when already that large).
    pub fn padded_to(self, size: usize) -> Self {
        if size <= self.size {
            return self;
        }
        let pad = (size - self.size) / 2;
        let mut data = vec![0f64; size * size];
        for y in 0..self.size {
            for x in 0..self.size {
                data[(y + pad) * size + x + pad] = self.data[y * self.size + x];
            }
        }
        Kernel { size, data }
    }

    /// A `size x size` identity (pulse) kernel.
    pub fn pulse(size: usize) -> Self {
        let mut data = vec![0f64; size * size];
        data[(size / 2) * size + size / 2] = 1.0;
        Kernel { size, data }
    }

    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }
}

fn check_size(kernel_size: usize) -> Result<()> {
    if kernel_size == 0 || kernel_size.is_multiple_of(2) {
        return Err(Error::Input(format!(
            "kernel size must be odd and positive, got {kernel_size}"
        )));
    }
    Ok(())
}

/// Grid offsets of `mesh_grid(k)`: value `-(k/2) + i` along each axis.
fn grid_axis(kernel_size: usize) -> Vec<f64> {
    let half = (kernel_size / 2) as f64;
    (0..kernel_size).map(|i| i as f64 - half).collect()
}

/// `R diag(sx^2, sy^2) R^T` with `R = [[cos t, -sin t], [sin t, cos t]]`, row-major 2x2.
pub fn sigma_matrix2(sig_x: f64, sig_y: f64, theta: f64) -> [f64; 4] {
    let (s, c) = theta.sin_cos();
    let (a, b) = (sig_x * sig_x, sig_y * sig_y);
    // R D = [[c a, -s b], [s a, c b]]; (R D) R^T:
    let m00 = c * a * c + s * b * s;
    let m01 = c * a * s - s * b * c;
    let m10 = s * a * c - c * b * s;
    let m11 = s * a * s + c * b * c;
    [m00, m01, m10, m11]
}

fn inverse2(m: [f64; 4]) -> Result<[f64; 4]> {
    let det = m[0] * m[3] - m[1] * m[2];
    if det == 0.0 || !det.is_finite() {
        return Err(Error::Input("kernel: singular sigma matrix".into()));
    }
    Ok([m[3] / det, -m[1] / det, -m[2] / det, m[0] / det])
}

/// Quadratic form `[x y] inv(Sigma) [x y]^T` on the kernel grid (x = column offset).
fn quadratic_form(
    kernel_size: usize,
    sig_x: f64,
    sig_y: f64,
    theta: f64,
    isotropic: bool,
) -> Result<Vec<f64>> {
    check_size(kernel_size)?;
    if sig_x.is_nan() || sig_x <= 0.0 || (!isotropic && (sig_y.is_nan() || sig_y <= 0.0)) {
        return Err(Error::Input("kernel: sigma must be positive".into()));
    }
    let sigma = if isotropic {
        [sig_x * sig_x, 0.0, 0.0, sig_x * sig_x]
    } else {
        sigma_matrix2(sig_x, sig_y, theta)
    };
    let inv = inverse2(sigma)?;
    let ax = grid_axis(kernel_size);
    let mut q = Vec::with_capacity(kernel_size * kernel_size);
    for &y in &ax {
        for &x in &ax {
            // (grid @ inv) . grid, as numpy evaluates it.
            let a = x * inv[0] + y * inv[2];
            let b = x * inv[1] + y * inv[3];
            q.push(a * x + b * y);
        }
    }
    Ok(q)
}

/// `bivariate_Gaussian`: `exp(-q/2)`, normalised.
pub fn bivariate_gaussian(
    kernel_size: usize,
    sig_x: f64,
    sig_y: f64,
    theta: f64,
    isotropic: bool,
) -> Result<Kernel> {
    let q = quadratic_form(kernel_size, sig_x, sig_y, theta, isotropic)?;
    let data = q.iter().map(|&v| (-0.5 * v).exp()).collect();
    Ok(Kernel::new(kernel_size, data)?.normalized())
}

/// `bivariate_generalized_Gaussian`: `exp(-q^beta / 2)`, normalised.
pub fn bivariate_generalized_gaussian(
    kernel_size: usize,
    sig_x: f64,
    sig_y: f64,
    theta: f64,
    beta: f64,
    isotropic: bool,
) -> Result<Kernel> {
    let q = quadratic_form(kernel_size, sig_x, sig_y, theta, isotropic)?;
    let data = q.iter().map(|&v| (-0.5 * v.powf(beta)).exp()).collect();
    Ok(Kernel::new(kernel_size, data)?.normalized())
}

/// `bivariate_plateau`: `1 / (q^beta + 1)`, normalised.
pub fn bivariate_plateau(
    kernel_size: usize,
    sig_x: f64,
    sig_y: f64,
    theta: f64,
    beta: f64,
    isotropic: bool,
) -> Result<Kernel> {
    let q = quadratic_form(kernel_size, sig_x, sig_y, theta, isotropic)?;
    let data = q.iter().map(|&v| 1.0 / (v.powf(beta) + 1.0)).collect();
    Ok(Kernel::new(kernel_size, data)?.normalized())
}

/// Bessel function of the first kind, order 1, from its integral representation
/// `J1(x) = 1/(2 pi) * integral over [0, 2 pi) of cos(t - x sin t)`. The integrand is periodic
/// and analytic, so the trapezoidal rule converges geometrically once the number of nodes
/// exceeds |x| by a margin; 64 + 2|x| nodes reach double precision.
pub fn bessel_j1(x: f64) -> f64 {
    let n = 64 + 2 * x.abs().ceil() as usize;
    let step = 2.0 * PI / n as f64;
    let mut s = 0.0;
    for i in 0..n {
        let t = i as f64 * step;
        s += (t - x * t.sin()).cos();
    }
    s / n as f64
}

/// `circular_lowpass_kernel(cutoff, kernel_size, pad_to)`: `cutoff J1(cutoff r) / (2 pi r)`
/// around the centre, centre value `cutoff^2 / (4 pi)`, normalised, zero-padded to `pad_to`
/// when that is larger (0 = no padding).
pub fn circular_lowpass_kernel(cutoff: f64, kernel_size: usize, pad_to: usize) -> Result<Kernel> {
    check_size(kernel_size)?;
    if pad_to != 0 && pad_to.is_multiple_of(2) {
        return Err(Error::Input(format!(
            "sinc pad_to must be odd, got {pad_to}"
        )));
    }
    let c = (kernel_size as f64 - 1.0) / 2.0;
    let mut data = Vec::with_capacity(kernel_size * kernel_size);
    for y in 0..kernel_size {
        for x in 0..kernel_size {
            let r = ((x as f64 - c).powi(2) + (y as f64 - c).powi(2)).sqrt();
            data.push(if r == 0.0 {
                cutoff * cutoff / (4.0 * PI)
            } else {
                cutoff * bessel_j1(cutoff * r) / (2.0 * PI * r)
            });
        }
    }
    Ok(Kernel::new(kernel_size, data)?
        .normalized()
        .padded_to(pad_to))
}

/// The kernel families of `random_mixed_kernels`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelType {
    Iso,
    Aniso,
    GeneralizedIso,
    GeneralizedAniso,
    PlateauIso,
    PlateauAniso,
}

impl KernelType {
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "iso" => KernelType::Iso,
            "aniso" => KernelType::Aniso,
            "generalized_iso" => KernelType::GeneralizedIso,
            "generalized_aniso" => KernelType::GeneralizedAniso,
            "plateau_iso" => KernelType::PlateauIso,
            "plateau_aniso" => KernelType::PlateauAniso,
            other => return Err(Error::Input(format!("unknown kernel type `{other}`"))),
        })
    }

    pub fn isotropic(self) -> bool {
        matches!(
            self,
            KernelType::Iso | KernelType::GeneralizedIso | KernelType::PlateauIso
        )
    }
}

/// The parameters a kernel was built from (what BasicSR samples).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MixedKernelParams {
    pub kind: KernelType,
    pub size: usize,
    pub sigma_x: f64,
    pub sigma_y: f64,
    pub rotation: f64,
    /// Shape parameter (generalized / plateau only; 1 otherwise).
    pub beta: f64,
}

/// Builds the deterministic kernel for `params` (the functions `random_*` call).
pub fn kernel_from_params(p: &MixedKernelParams) -> Result<Kernel> {
    let iso = p.kind.isotropic();
    match p.kind {
        KernelType::Iso | KernelType::Aniso => {
            bivariate_gaussian(p.size, p.sigma_x, p.sigma_y, p.rotation, iso)
        }
        KernelType::GeneralizedIso | KernelType::GeneralizedAniso => {
            bivariate_generalized_gaussian(p.size, p.sigma_x, p.sigma_y, p.rotation, p.beta, iso)
        }
        KernelType::PlateauIso | KernelType::PlateauAniso => {
            bivariate_plateau(p.size, p.sigma_x, p.sigma_y, p.rotation, p.beta, iso)
        }
    }
}

/// Parameters of `random_mixed_kernels`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MixedKernelSettings {
    pub kernel_list: Vec<KernelType>,
    pub kernel_prob: Vec<f64>,
    pub kernel_size: usize,
    pub sigma_x_range: [f64; 2],
    pub sigma_y_range: [f64; 2],
    pub rotation_range: [f64; 2],
    pub betag_range: [f64; 2],
    pub betap_range: [f64; 2],
    /// Multiplicative kernel noise range (ignored for plateau kernels, as in BasicSR).
    pub noise_range: Option<[f64; 2]>,
}

/// `random.choices(kernel_list, kernel_prob)` for a uniform draw `u` in [0, 1): the first
/// index whose cumulative probability exceeds `u * total`.
pub fn choose_kernel_type(list: &[KernelType], prob: &[f64], u: f64) -> Result<KernelType> {
    if list.is_empty() || list.len() != prob.len() {
        return Err(Error::Input(
            "kernel_list and kernel_prob must match".into(),
        ));
    }
    let total: f64 = prob.iter().sum();
    let target = u * total;
    let mut acc = 0.0;
    for (k, p) in list.iter().zip(prob) {
        acc += p;
        if acc > target {
            return Ok(*k);
        }
    }
    Ok(*list.last().unwrap_or(&KernelType::Iso))
}

fn uniform<R: Rng>(rng: &mut R, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.gen::<f64>()
}

/// BasicSR's beta draw: `u < 0.5` -> U(beta_lo, 1), else U(1, beta_hi).
fn draw_beta<R: Rng>(rng: &mut R, range: [f64; 2]) -> f64 {
    if rng.gen::<f64>() < 0.5 {
        uniform(rng, range[0], 1.0)
    } else {
        uniform(rng, 1.0, range[1])
    }
}

/// `random_mixed_kernels` with our own generator, in BasicSR's draw order.
pub fn random_mixed_kernel<R: Rng>(
    rng: &mut R,
    s: &MixedKernelSettings,
) -> Result<(Kernel, MixedKernelParams)> {
    check_size(s.kernel_size)?;
    let kind = choose_kernel_type(&s.kernel_list, &s.kernel_prob, rng.gen::<f64>())?;
    let sigma_x = uniform(rng, s.sigma_x_range[0], s.sigma_x_range[1]);
    let (sigma_y, rotation) = if kind.isotropic() {
        (sigma_x, 0.0)
    } else {
        (
            uniform(rng, s.sigma_y_range[0], s.sigma_y_range[1]),
            uniform(rng, s.rotation_range[0], s.rotation_range[1]),
        )
    };
    let beta = match kind {
        KernelType::GeneralizedIso | KernelType::GeneralizedAniso => draw_beta(rng, s.betag_range),
        KernelType::PlateauIso | KernelType::PlateauAniso => draw_beta(rng, s.betap_range),
        _ => 1.0,
    };
    let params = MixedKernelParams {
        kind,
        size: s.kernel_size,
        sigma_x,
        sigma_y,
        rotation,
        beta,
    };
    let mut kernel = kernel_from_params(&params)?;
    let plateau = matches!(kind, KernelType::PlateauIso | KernelType::PlateauAniso);
    if let (Some(range), false) = (s.noise_range, plateau) {
        let noise: Vec<f64> = (0..kernel.data.len())
            .map(|_| uniform(rng, range[0], range[1]))
            .collect();
        kernel = apply_mult_noise(kernel, &noise)?;
    }
    Ok((kernel, params))
}

/// `normalize(kernel * noise)`: BasicSR's multiplicative kernel noise.
pub fn apply_mult_noise(mut kernel: Kernel, noise: &[f64]) -> Result<Kernel> {
    if noise.len() != kernel.data.len() {
        return Err(Error::Input("kernel noise has the wrong size".into()));
    }
    kernel.data.iter_mut().zip(noise).for_each(|(k, n)| *k *= n);
    Ok(kernel.normalized())
}

/// Rebuilds the output of a BasicSR random sampler from its recorded scalar draws (already
/// scaled into their ranges): iso `[sigma]` (+`[u, beta]` for generalized/plateau), aniso
/// `[sigma_x, sigma_y, rotation]` (+`[u, beta]`).
pub fn kernel_from_draws(kind: KernelType, kernel_size: usize, draws: &[f64]) -> Result<Kernel> {
    let need = match kind {
        KernelType::Iso => 1,
        KernelType::Aniso => 3,
        KernelType::GeneralizedIso | KernelType::PlateauIso => 3,
        KernelType::GeneralizedAniso | KernelType::PlateauAniso => 5,
    };
    if draws.len() < need {
        return Err(Error::Input(format!(
            "kernel draws: need {need} values for {kind:?}, got {}",
            draws.len()
        )));
    }
    let iso = kind.isotropic();
    let (sx, sy, rot) = if iso {
        (draws[0], draws[0], 0.0)
    } else {
        (draws[0], draws[1], draws[2])
    };
    let beta = if need >= 3 && !matches!(kind, KernelType::Aniso) {
        draws[need - 1]
    } else {
        1.0
    };
    kernel_from_params(&MixedKernelParams {
        kind,
        size: kernel_size,
        sigma_x: sx,
        sigma_y: sy,
        rotation: rot,
        beta,
    })
}

/// OpenCV `getGaussianKernel(ksize, sigma)` for sizes > 7 or sigma > 0 (sigma <= 0 uses
/// OpenCV's rule `0.3((ksize-1)/2 - 1) + 0.8`), float64, normalised.
pub fn gaussian_kernel_1d(ksize: usize, sigma: f64) -> Vec<f64> {
    let sigma = if sigma > 0.0 {
        sigma
    } else {
        0.3 * ((ksize as f64 - 1.0) * 0.5 - 1.0) + 0.8
    };
    let c = (ksize as f64 - 1.0) / 2.0;
    let scale = -0.5 / (sigma * sigma);
    let v: Vec<f64> = (0..ksize)
        .map(|i| ((i as f64 - c).powi(2) * scale).exp())
        .collect();
    let s: f64 = v.iter().sum();
    v.into_iter().map(|x| x / s).collect()
}
