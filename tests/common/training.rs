//! Comparing one training step with a reference step: the gradient of every trained tensor, and
//! the AdamW update (after − before) of every element.
//!
//! Bounds, f32 (see `tests/fixtures/stablesr/README.md`, "train_step.safetensors"):
//! - a gradient element may differ by `1e-5·max|ref tensor| + 1e-4·|ref| + 1e-6·G`. The reference
//!   itself, rerun with 2 threads instead of 1, moves its step-1 gradients by at most 3.5e-6 of
//!   their tensor's max |g|: the first term is about 3x that. `G` is the largest |g| of all trained
//!   tensors: f32 rounding of a gradient element scales with the terms summed into it, which reach
//!   the loss's gradient size even where they cancel — a gradient that is analytically zero (a
//!   per-channel constant in front of a GroupNorm whose groups hold one channel) comes out as
//!   noise of about 1e-7·G on either side, and so do the small tensors' last digits. Measured
//!   against the committed fixture: tensors carrying a gradient agree to 4.5e-6 of their max
//!   where that is above the floor, the analytically-zero ones to 2.6e-7·G; 1e-6·G (17 f32 ulps
//!   of G) is 4x that, and below 1e-4 of every tensor that carries a gradient;
//! - an update element may differ by `2^-21·|θ| + 1e-3·|Δref| + lr·S`: 2^-21·|θ| is 4 half-ulps of
//!   the parameter (the update is a difference of two rounded f32 values), 1e-3·|Δref| the
//!   rounding of Adam's arithmetic, and `S` how far Adam's normalised direction m̂/(√v̂+ε) can
//!   move when each gradient seen so far moves within its bound above. `S` is negligible unless
//!   a reference gradient lies within its own bound of zero; there the direction (≈ sign(g)) is
//!   not determined and the bound opens to what a gradient inside its tolerance allows — no
//!   fixed exemption, no cap, and the widened elements are derived from the reference only.

use candle_core::Tensor;
use pfstorer::optim::AdamWParams;

/// Per-element gradient bounds of one step (one vector per tensor, in the order compared).
pub struct GradientBounds {
    /// The reference gradients, flattened.
    pub reference: Vec<Vec<f64>>,
    /// The allowed |ours − reference| per element.
    pub tolerance: Vec<Vec<f64>>,
}

/// Gradient bound coefficients (module doc).
const GRAD_OF_TENSOR_MAX: f64 = 1e-5;
const GRAD_OF_ELEMENT: f64 = 1e-4;
const GRAD_OF_GLOBAL_MAX: f64 = 1e-6;

/// Compares every tensor's gradient with the reference's under the bound of the module doc,
/// prints the worst tensor by name (error / bound, and its max error) and the worst relative to
/// its own max among the tensors that carry a gradient, and fails naming the tensor and element on any excess or
/// non-finite value.
pub fn assert_gradients_close(
    label: &str,
    names: &[String],
    ours: &[Tensor],
    theirs: &[Tensor],
) -> GradientBounds {
    assert_eq!(names.len(), ours.len(), "{label}: one gradient per tensor");
    assert_eq!(
        names.len(),
        theirs.len(),
        "{label}: one reference per tensor"
    );
    let reference: Vec<Vec<f64>> = names
        .iter()
        .zip(theirs)
        .map(|(n, t)| super::finite_values(&format!("{label} reference `{n}`"), t))
        .collect();
    let global = reference.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
    assert!(global > 0.0, "{label}: every reference gradient is zero");
    let mut tolerance = Vec::with_capacity(names.len());
    // (error / bound, name, max error, tensor max)
    let mut per_tensor: Vec<(f64, &str, f64, f64)> = Vec::new();
    for ((name, ours), theirs) in names.iter().zip(ours).zip(&reference) {
        assert_eq!(ours.elem_count(), theirs.len(), "{label} `{name}`: size");
        let ours = super::finite_values(&format!("{label} `{name}`"), ours);
        let scale = theirs.iter().fold(0f64, |m, v| m.max(v.abs()));
        let floor = GRAD_OF_TENSOR_MAX * scale + GRAD_OF_GLOBAL_MAX * global;
        let tol: Vec<f64> = theirs
            .iter()
            .map(|r| floor + GRAD_OF_ELEMENT * r.abs())
            .collect();
        let (mut ratio, mut max_err) = (0f64, 0f64);
        for (i, ((a, b), t)) in ours.iter().zip(theirs).zip(&tol).enumerate() {
            let err = (a - b).abs();
            assert!(
                err <= *t,
                "{label} `{name}` element {i}: {a:e} vs reference {b:e} (error {err:.3e}, bound {t:.3e}; tensor max |g| {scale:.3e}, all tensors {global:.3e})"
            );
            ratio = ratio.max(err / t);
            max_err = max_err.max(err);
        }
        per_tensor.push((ratio, name, max_err, scale));
        tolerance.push(tol);
    }
    let worst = per_tensor
        .iter()
        .fold(per_tensor[0], |w, t| if t.0 > w.0 { *t } else { w });
    println!(
        "{label}: worst tensor `{}`: max error {:.3e} = {:.3} of its bound (its max |g| {:.3e}; largest |g| of all {global:.3e})",
        worst.1, worst.2, worst.0, worst.3
    );
    // The tensors that carry a gradient (not rounding noise of an analytically-zero one).
    let carrying = per_tensor
        .iter()
        .filter(|t| t.3 >= 1e-4 * global)
        .map(|t| (t.2 / t.3, t.1, t.2))
        .fold((0f64, "", 0f64), |w, t| if t.0 > w.0 { t } else { w });
    println!(
        "{label}: worst tensor carrying a gradient (max |g| >= 1e-4·G) `{}`: max error {:.3e} = {:.3e} of its max |g|",
        carrying.1, carrying.2, carrying.0
    );
    GradientBounds {
        reference,
        tolerance,
    }
}

/// Adam's normalised direction m̂/(√v̂+ε) after the gradients `history` (oldest first), from
/// zero moments, in f64.
pub fn adam_direction(history: &[f64], p: &AdamWParams) -> f64 {
    let (mut m, mut v) = (0f64, 0f64);
    for g in history {
        m = p.beta1 * m + (1.0 - p.beta1) * g;
        v = p.beta2 * v + (1.0 - p.beta2) * g * g;
    }
    let k = history.len() as i32;
    let m_hat = m / (1.0 - p.beta1.powi(k));
    let v_hat = v / (1.0 - p.beta2.powi(k));
    m_hat / (v_hat.sqrt() + p.eps)
}

/// The largest change of [`adam_direction`] when each gradient `history[k]` moves within
/// `± tolerance[k]`: one step is monotone in its gradient (the two ends); over two steps the
/// direction is not monotone, so 9 points per gradient span the box.
pub fn adam_direction_spread(history: &[f64], tolerance: &[f64], p: &AdamWParams) -> f64 {
    let centre = adam_direction(history, p);
    let points: usize = if history.len() == 1 { 3 } else { 9 };
    let count = points.pow(history.len() as u32);
    let mut spread = 0f64;
    let mut g = history.to_vec();
    for index in 0..count {
        let mut rest = index;
        for (k, gk) in g.iter_mut().enumerate() {
            let offset = (rest % points) as f64 / (points - 1) as f64 * 2.0 - 1.0;
            rest /= points;
            *gk = history[k] + offset * tolerance[k];
        }
        spread = spread.max((adam_direction(&g, p) - centre).abs());
    }
    spread
}

/// One trained tensor's step: its values before, after our update and after the reference's.
pub struct TensorStep<'a> {
    pub name: &'a str,
    pub before: &'a Tensor,
    pub ours: &'a Tensor,
    pub theirs: &'a Tensor,
}

/// Compares our update (after − before) with the reference's, element by element, under the
/// bound of the module doc; `steps[k]` are the gradient bounds of every step taken so far (the
/// reference gradients whose Adam moments produced this update). Prints the worst error and how
/// many elements had a direction not determined by their gradients, and returns the worst
/// |ours − reference| / lr among the elements whose direction is determined.
pub fn assert_updates_close(
    label: &str,
    tensors: &[TensorStep],
    steps: &[&GradientBounds],
    p: &AdamWParams,
) -> f64 {
    let (mut worst, mut widened, mut total) = (0f64, 0usize, 0usize);
    let mut worst_name = "";
    for (t, step) in tensors.iter().enumerate() {
        let name = step.name;
        let before = super::finite_values(&format!("{label} `{name}` before"), step.before);
        let ours = super::finite_values(&format!("{label} `{name}`"), step.ours);
        let theirs = super::finite_values(&format!("{label} reference `{name}`"), step.theirs);
        for (i, ((b, a), r)) in before.iter().zip(&ours).zip(&theirs).enumerate() {
            total += 1;
            let (ours_update, their_update) = (a - b, r - b);
            let err = (ours_update - their_update).abs();
            let tight = 2f64.powi(-21) * b.abs().max(r.abs()) + 1e-3 * their_update.abs();
            if err <= tight {
                if err / p.lr > worst {
                    (worst, worst_name) = (err / p.lr, name);
                }
                continue;
            }
            let history: Vec<f64> = steps.iter().map(|s| s.reference[t][i]).collect();
            let tolerance: Vec<f64> = steps.iter().map(|s| s.tolerance[t][i]).collect();
            let spread = adam_direction_spread(&history, &tolerance, p);
            let bound = tight + p.lr * spread;
            assert!(
                err <= bound,
                "{label} `{name}` element {i}: update {ours_update:e} vs reference {their_update:e} (error {err:.3e}, bound {bound:.3e}; reference gradients {history:?} within {tolerance:?})"
            );
            if spread > 1e-2 {
                widened += 1;
            } else if err / p.lr > worst {
                (worst, worst_name) = (err / p.lr, name);
            }
        }
    }
    println!(
        "{label}: updates agree to {worst:.3e}·lr (worst in `{worst_name}`) over {} elements; {widened} of {total} elements needed the bound opened by a reference gradient within its tolerance of zero",
        total - widened
    );
    worst
}
