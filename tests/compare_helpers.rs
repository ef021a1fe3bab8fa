//! The comparison helpers of `tests/common` must fail on a NaN or an infinity in either tensor:
//! candle's reductions skip NaN, so a max-error helper built on them passes a NaN output. Also
//! the child-process harness of the CLI tests: a child past its time limit is killed and fails.

mod common;

use candle_core::{Device, Tensor};
use common::training::{self, TensorStep};
use std::panic::{catch_unwind, AssertUnwindSafe};

fn tensor(values: &[f32]) -> Tensor {
    Tensor::new(values, &Device::Cpu).unwrap()
}

/// Runs `f`, which must panic with a message containing `expected`.
fn fails_with(what: &str, expected: &str, f: impl FnOnce()) {
    let message = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => panic!("{what}: passed"),
        Err(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
    };
    assert!(message.contains(expected), "{what}: {message}");
    println!("{what}: fails ({message})");
}

#[test]
fn every_comparison_fails_on_nan_or_infinity() {
    let good = tensor(&[1.0, -2.0, 0.5]);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let planted = tensor(&[1.0, bad, 0.5]);
        fails_with(
            &format!("assert_close, {bad} in the output"),
            "not finite",
            || {
                common::assert_close("out", &planted, &good, 1e9, 1e9);
            },
        );
        fails_with(
            &format!("assert_close, {bad} in the reference"),
            "not finite",
            || {
                common::assert_close("out", &good, &planted, 1e9, 1e9);
            },
        );
        fails_with(&format!("max_abs_diff, {bad}"), "not finite", || {
            common::max_abs_diff(&good, &planted);
        });
        fails_with(&format!("max_abs_diff, {bad} first"), "not finite", || {
            common::max_abs_diff(&planted, &good);
        });
        fails_with(&format!("max_abs, {bad}"), "not finite", || {
            common::max_abs(&planted);
        });
        let names = vec!["w".to_string()];
        fails_with(&format!("gradients, {bad}"), "not finite", || {
            training::assert_gradients_close(
                "g",
                &names,
                std::slice::from_ref(&planted),
                std::slice::from_ref(&good),
            );
        });
        let bounds = training::assert_gradients_close(
            "g",
            &names,
            std::slice::from_ref(&good),
            std::slice::from_ref(&good),
        );
        fails_with(&format!("updates, {bad}"), "not finite", || {
            let step = TensorStep {
                name: "w",
                before: &good,
                ours: &planted,
                theirs: &good,
            };
            training::assert_updates_close(
                "u",
                &[step],
                &[&bounds],
                &pfstorer::base_training::step::adamw(1e-3),
            );
        });
    }
    // Finite values still compare as before.
    assert_eq!(common::max_abs_diff(&good, &good), 0.0);
    assert_eq!(common::max_abs(&good), 2.0);
}

#[test]
fn gradient_bounds_scale_with_the_tensor() {
    // Two tensors, one a thousand times smaller: 1% off in the small one fails although it is
    // far below any fixed floor a large tensor would need.
    let names = vec!["large".to_string(), "small".to_string()];
    let large = tensor(&[1e-2, -2e-2, 5e-3]);
    let small = tensor(&[1e-5, -2e-5, 5e-6]);
    let off = (&small * 1.01).unwrap();
    training::assert_gradients_close(
        "same",
        &names,
        &[large.clone(), small.clone()],
        &[large.clone(), small.clone()],
    );
    fails_with("1% off in the small tensor", "`small` element", || {
        training::assert_gradients_close("off", &names, &[large.clone(), off], &[large, small]);
    });
}

#[test]
fn adam_direction_spread_opens_only_near_zero_gradients() {
    let p = pfstorer::base_training::step::adamw(1e-4);
    // One step: the direction is g/(|g|+eps).
    let d = training::adam_direction(&[3e-3], &p);
    assert!((d - 3e-3 / (3e-3 + 1e-8)).abs() < 1e-12);
    // A gradient far above its tolerance: the direction hardly moves.
    assert!(training::adam_direction_spread(&[1e-3], &[1e-9], &p) < 1e-5);
    assert!(training::adam_direction_spread(&[1e-3, -2e-3], &[1e-9, 1e-9], &p) < 1e-5);
    // A gradient within its tolerance of zero: the sign is open, the spread is about 1.
    assert!(training::adam_direction_spread(&[1e-10], &[1e-8], &p) > 0.4);
}

#[cfg(unix)]
#[test]
fn a_child_past_its_time_limit_is_killed_and_fails() {
    let mut sleeper = std::process::Command::new("sleep");
    sleeper.arg("30");
    let start = std::time::Instant::now();
    fails_with("sleep 30 within 0.5 s", "did not finish within", || {
        common::child::run_within(sleeper, std::time::Duration::from_millis(500));
    });
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
    // A quick child passes, with its exit status and (Linux) its peak memory.
    let done = common::child::run_within(
        std::process::Command::new("true"),
        std::time::Duration::from_secs(10),
    );
    assert!(done.output.status.success());
}
