//! The DDPM noise schedule of StableSR and its respacing to fewer sampling steps.
//!
//! The reference registers every array as a float32 buffer, but computes them with numpy in a
//! specific precision: the 1000-step schedule entirely in float64, a respaced schedule from the
//! float32 `alphas_cumprod` of the full one, with numpy's type promotion deciding per array whether
//! float32 or float64 arithmetic is used. [`Schedule`] keeps each array as the value numpy computed
//! (`Vec<f64>`, exact for the float32 ones); [`Schedule::buffer`] and [`Schedule::step`] give the
//! float32 values the sampler actually uses.

use crate::config::DiffusionConfig;
use crate::error::{Error, Result};
use std::collections::BTreeSet;

/// Lower bound applied to the posterior variance before its log (the first one is exactly 0).
const POSTERIOR_VARIANCE_FLOOR: f64 = 1e-20;

/// All schedule arrays of `DDPM.register_schedule`, indexed by (respaced) step.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    pub alphas_cumprod_prev: Vec<f64>,
    pub sqrt_alphas_cumprod: Vec<f64>,
    pub sqrt_one_minus_alphas_cumprod: Vec<f64>,
    pub log_one_minus_alphas_cumprod: Vec<f64>,
    pub sqrt_recip_alphas_cumprod: Vec<f64>,
    pub sqrt_recipm1_alphas_cumprod: Vec<f64>,
    pub posterior_variance: Vec<f64>,
    pub posterior_log_variance_clipped: Vec<f64>,
    pub posterior_mean_coef1: Vec<f64>,
    pub posterior_mean_coef2: Vec<f64>,
    /// Step index -> original timestep of the 1000-step process (`ori_timesteps`); the identity
    /// for the full schedule. The networks always receive the original timestep.
    pub timestep_map: Vec<usize>,
}

/// The float32 per-step scalars the sampler needs at respaced index `i`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCoefs {
    pub sqrt_alphas_cumprod: f32,
    pub sqrt_one_minus_alphas_cumprod: f32,
    pub posterior_mean_coef1: f32,
    pub posterior_mean_coef2: f32,
    pub posterior_log_variance_clipped: f32,
}

/// `torch.linspace(start, end, steps, dtype=float64)`: torch fills the first half forwards from
/// `start` and the second half backwards from `end`, which we mirror bit for bit.
fn torch_linspace_f64(start: f64, end: f64, steps: usize) -> Vec<f64> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f64;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f64
            } else {
                end - step * (steps - i - 1) as f64
            }
        })
        .collect()
}

/// `space_timesteps(num_timesteps, [count])` of the reference, sorted: `count` timesteps spread
/// evenly over `0..num_timesteps` with an accumulated fractional stride and Python's
/// round-half-to-even.
pub fn space_timesteps(num_timesteps: usize, count: usize) -> Result<Vec<usize>> {
    if count == 0 || count > num_timesteps {
        return Err(Error::Config(format!(
            "cannot respace {num_timesteps} diffusion steps to {count} sampling steps"
        )));
    }
    let stride = if count <= 1 {
        1.0
    } else {
        (num_timesteps - 1) as f64 / (count - 1) as f64
    };
    let mut cur = 0.0f64;
    let mut steps = BTreeSet::new();
    for _ in 0..count {
        steps.insert(cur.round_ties_even() as usize);
        cur += stride;
    }
    Ok(steps.into_iter().collect())
}

impl Schedule {
    /// The 1000-step (or `cfg.timesteps`) linear-in-sqrt schedule, computed in float64 as
    /// `register_schedule(beta_schedule="linear")` does.
    pub fn linear(cfg: &DiffusionConfig) -> Result<Self> {
        let n = cfg.timesteps;
        if n < 2 {
            return Err(Error::Config(format!(
                "the diffusion schedule needs at least 2 timesteps, got {n}"
            )));
        }
        let betas: Vec<f64> =
            torch_linspace_f64(cfg.linear_start.powf(0.5), cfg.linear_end.powf(0.5), n)
                .into_iter()
                .map(|b| b * b)
                .collect();
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1.0f64;
        for (i, a) in alphas.iter().enumerate() {
            acc = if i == 0 { *a } else { acc * a };
            alphas_cumprod.push(acc);
        }
        let mut alphas_cumprod_prev = vec![1.0];
        alphas_cumprod_prev.extend_from_slice(&alphas_cumprod[..n - 1]);

        let one_minus: Vec<f64> = alphas_cumprod.iter().map(|a| 1.0 - a).collect();
        let posterior_variance: Vec<f64> = (0..n)
            .map(|i| betas[i] * (1.0 - alphas_cumprod_prev[i]) / one_minus[i])
            .collect();
        Ok(Schedule {
            sqrt_alphas_cumprod: alphas_cumprod.iter().map(|a| a.sqrt()).collect(),
            sqrt_one_minus_alphas_cumprod: one_minus.iter().map(|a| a.sqrt()).collect(),
            log_one_minus_alphas_cumprod: one_minus.iter().map(|a| a.ln()).collect(),
            sqrt_recip_alphas_cumprod: alphas_cumprod.iter().map(|a| (1.0 / a).sqrt()).collect(),
            sqrt_recipm1_alphas_cumprod: alphas_cumprod
                .iter()
                .map(|a| (1.0 / a - 1.0).sqrt())
                .collect(),
            posterior_log_variance_clipped: posterior_variance
                .iter()
                .map(|v| v.max(POSTERIOR_VARIANCE_FLOOR).ln())
                .collect(),
            posterior_mean_coef1: (0..n)
                .map(|i| betas[i] * alphas_cumprod_prev[i].sqrt() / one_minus[i])
                .collect(),
            posterior_mean_coef2: (0..n)
                .map(|i| (1.0 - alphas_cumprod_prev[i]) * alphas[i].sqrt() / one_minus[i])
                .collect(),
            posterior_variance,
            timestep_map: (0..n).collect(),
            betas,
            alphas_cumprod,
            alphas_cumprod_prev,
        })
    }

    /// The schedule respaced to `steps` sampling steps exactly as the inference scripts build it:
    /// new betas `1 - ac[t_k] / ac[t_(k-1)]` in float32 from the float32 `alphas_cumprod` buffer of
    /// `full`, then `register_schedule(given_betas=float32 array)`, where numpy keeps the
    /// `alphas_cumprod`-derived arrays in float32 and promotes the posterior arrays to float64
    /// (`alphas_cumprod_prev` becomes float64 through `np.append(1., ...)`).
    pub fn respaced(full: &Schedule, steps: usize) -> Result<Self> {
        let timestep_map = space_timesteps(full.len(), steps)?;
        let full_acp = full.buffer(&full.alphas_cumprod);
        let mut betas32 = Vec::with_capacity(steps);
        let mut last = 1.0f32;
        for &t in &timestep_map {
            let acp = full_acp[t];
            betas32.push(1.0 - acp / last);
            last = acp;
        }
        let alphas32: Vec<f32> = betas32.iter().map(|b| 1.0 - b).collect();
        let mut acp32 = Vec::with_capacity(steps);
        let mut acc = 1.0f32;
        for (i, a) in alphas32.iter().enumerate() {
            acc = if i == 0 { *a } else { acc * a };
            acp32.push(acc);
        }
        let one_minus32: Vec<f32> = acp32.iter().map(|a| 1.0 - a).collect();
        let acp_prev: Vec<f64> = std::iter::once(1.0)
            .chain(acp32[..steps - 1].iter().map(|&a| a as f64))
            .collect();

        let widen = |v: &[f32]| -> Vec<f64> { v.iter().map(|&x| x as f64).collect() };
        let betas = widen(&betas32);
        let posterior_variance: Vec<f64> = (0..steps)
            .map(|i| betas[i] * (1.0 - acp_prev[i]) / one_minus32[i] as f64)
            .collect();
        Ok(Schedule {
            sqrt_alphas_cumprod: acp32.iter().map(|a| a.sqrt() as f64).collect(),
            sqrt_one_minus_alphas_cumprod: one_minus32.iter().map(|a| a.sqrt() as f64).collect(),
            log_one_minus_alphas_cumprod: one_minus32.iter().map(|a| a.ln() as f64).collect(),
            sqrt_recip_alphas_cumprod: acp32.iter().map(|a| (1.0 / a).sqrt() as f64).collect(),
            sqrt_recipm1_alphas_cumprod: acp32
                .iter()
                .map(|a| (1.0 / a - 1.0).sqrt() as f64)
                .collect(),
            posterior_log_variance_clipped: posterior_variance
                .iter()
                .map(|v| v.max(POSTERIOR_VARIANCE_FLOOR).ln())
                .collect(),
            posterior_mean_coef1: (0..steps)
                .map(|i| betas[i] * acp_prev[i].sqrt() / one_minus32[i] as f64)
                .collect(),
            posterior_mean_coef2: (0..steps)
                .map(|i| (1.0 - acp_prev[i]) * alphas32[i].sqrt() as f64 / one_minus32[i] as f64)
                .collect(),
            posterior_variance,
            timestep_map,
            betas,
            alphas_cumprod: widen(&acp32),
            alphas_cumprod_prev: acp_prev,
        })
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// An array as the reference's float32 buffer.
    pub fn buffer(&self, values: &[f64]) -> Vec<f32> {
        values.iter().map(|&v| v as f32).collect()
    }

    /// Original timestep of step `i`.
    pub fn original_timestep(&self, i: usize) -> Result<usize> {
        self.timestep_map.get(i).copied().ok_or_else(|| {
            Error::Input(format!(
                "step {i} outside a schedule of {} steps",
                self.len()
            ))
        })
    }

    /// The float32 buffer values used by one sampling step at index `i`.
    pub fn step(&self, i: usize) -> Result<StepCoefs> {
        if i >= self.len() {
            return Err(Error::Input(format!(
                "step {i} outside a schedule of {} steps",
                self.len()
            )));
        }
        Ok(StepCoefs {
            sqrt_alphas_cumprod: self.sqrt_alphas_cumprod[i] as f32,
            sqrt_one_minus_alphas_cumprod: self.sqrt_one_minus_alphas_cumprod[i] as f32,
            posterior_mean_coef1: self.posterior_mean_coef1[i] as f32,
            posterior_mean_coef2: self.posterior_mean_coef2[i] as f32,
            posterior_log_variance_clipped: self.posterior_log_variance_clipped[i] as f32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_timesteps_matches_reference_examples() {
        assert_eq!(space_timesteps(1000, 4).unwrap(), vec![0, 333, 666, 999]);
        assert_eq!(space_timesteps(1000, 2).unwrap(), vec![0, 999]);
        assert_eq!(space_timesteps(1000, 1).unwrap(), vec![0]);
        assert_eq!(
            space_timesteps(1000, 1000).unwrap(),
            (0..1000).collect::<Vec<_>>()
        );
        assert!(space_timesteps(1000, 1001).is_err());
    }
}
