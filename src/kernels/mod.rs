//! The numeric kernels under the networks: fused CPU passes (and cuDNN's convolution
//! backward-data on CUDA builds with cuDNN) beside the composed candle ops they replace.
//!
//! The layout contract, stated once: a fused CPU kernel runs on contiguous f32 CPU tensors
//! (the rank, the broadcasting and whether a gradient may flow are each kernel's own). Each
//! kernel has one public entry that checks its `applies` predicate and otherwise runs the
//! composed candle ops, which take any device, dtype and strides; the composed form sits beside
//! it (`*_composed`) and the file's tests compare the two, values and gradients. Each file's
//! header says what it computes, which layout the fused path needs, what it falls back to and
//! where it pays. Device values (CUDA) are checked by `tests/cuda_kernels.rs`.
//!
//! - [`softmax`]: softmax over the last axis, and its backward.
//! - [`group_norm`], [`layer_norm`]: the norms, forward and backward, statistics in f32 or f64.
//! - [`geglu`]: the feed-forward's `value * gelu(gate)` in one pass; [`fast_exp`]: the
//!   vectorised exp the softmax, GEGLU and SiLU share.
//! - [`conv2d`]: the forward (Winograd, shifted GEMM or candle's), the input gradient (composed
//!   or cuDNN) and the trained kernel's gradient.
//! - [`attention`]: chunked scaled dot-product attention, fused per block on the CPU.
//! - [`frozen`]: input-only gradients for frozen layers and constant operands.
//!
//! Dependency direction: `model` calls `kernels`; nothing here imports `model`.
//!
//! Training or inference: candle's fused softmax and LayerNorm have no backward, and a frozen
//! layer's ordinary backward keeps a weight-sized gradient, so while a [`DifferentiableScope`]
//! is entered with `true` the kernels build graphs where a gradient flows; otherwise they take
//! the inference paths. The mode is per thread (a training thread does not switch an inference
//! thread) and lives exactly as long as the scope value.

pub mod attention;
pub mod conv2d;
mod cpu;
pub mod fast_exp;
pub mod frozen;
pub mod geglu;
pub mod group_norm;
pub mod layer_norm;
pub mod softmax;
#[cfg(test)]
pub(crate) mod test_util;

pub use attention::{
    attention, attention_chunk_elements, chunk_elements_for_free_memory, ATTENTION_CHUNK_ELEMENTS,
    CPU_CHUNK_ELEMENTS, CUDA_CHUNK_MAX_ELEMENTS, CUDA_CHUNK_MIN_ELEMENTS,
};
pub use frozen::{add_const, mul_const, with_input_gradient};
pub use geglu::{geglu, geglu_composed, gelu};
pub use group_norm::{group_norm, group_norm_composed, GroupNormParams};
pub use layer_norm::{layer_norm, layer_norm_composed};
pub use softmax::{softmax_last_dim, softmax_last_dim_no_grad};

use std::cell::{Cell, RefCell};
use std::marker::PhantomData;

thread_local! {
    // The modes of this thread's live scopes, innermost last, each with its scope's id.
    static SCOPES: RefCell<Vec<(u64, bool)>> = const { RefCell::new(Vec::new()) };
    static NEXT_SCOPE_ID: Cell<u64> = const { Cell::new(0) };
}

/// Whether the calling thread is in differentiable (training) mode: the innermost live
/// [`DifferentiableScope`]'s mode, `false` outside any.
pub fn differentiable() -> bool {
    SCOPES.with(|s| s.borrow().last().is_some_and(|&(_, on)| on))
}

/// Differentiable (`true`, training) or inference (`false`) kernels on this thread while the
/// value lives; dropping it restores the mode that held before, also when it is dropped by an
/// early `?` return or a panic.
///
/// Scopes nest. A scope dropped out of order (a trainer holding one is replaced by another
/// before being dropped) takes only its own entry away: the mode is always that of the
/// innermost scope still alive. Not `Send`: the mode belongs to the thread that entered it.
#[must_use = "the mode holds only while the scope value lives"]
#[derive(Debug)]
pub struct DifferentiableScope {
    id: u64,
    _this_thread: PhantomData<*const ()>,
}

impl DifferentiableScope {
    pub fn enter(on: bool) -> Self {
        let id = NEXT_SCOPE_ID.with(|n| {
            let id = n.get();
            n.set(id + 1);
            id
        });
        SCOPES.with(|s| s.borrow_mut().push((id, on)));
        DifferentiableScope {
            id,
            _this_thread: PhantomData,
        }
    }
}

impl Drop for DifferentiableScope {
    fn drop(&mut self) {
        // `try_with`: a scope dropped while the thread's locals are torn down has nothing to undo.
        let _ = SCOPES.try_with(|s| {
            let mut scopes = s.borrow_mut();
            if let Some(at) = scopes.iter().rposition(|&(id, _)| id == self.id) {
                scopes.remove(at);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fails_inside_a_scope(on: bool) -> Result<(), String> {
        let _mode = DifferentiableScope::enter(on);
        assert_eq!(differentiable(), on);
        Err("early return".to_string())?;
        unreachable!("the `?` above returns");
    }

    /// The pattern of the training code: a scope around work that returns early with `?`.
    #[test]
    fn an_error_inside_a_scope_leaves_the_mode_as_it_was() {
        assert!(!differentiable(), "inference outside any scope");
        assert!(fails_inside_a_scope(true).is_err());
        assert!(!differentiable());
        let _training = DifferentiableScope::enter(true);
        assert!(fails_inside_a_scope(false).is_err());
        assert!(
            differentiable(),
            "back to training after the inference scope failed"
        );
        assert!(fails_inside_a_scope(true).is_err());
        assert!(differentiable());
    }

    #[test]
    fn a_panic_inside_a_scope_leaves_the_mode_as_it_was() {
        let outcome = std::panic::catch_unwind(|| {
            let _mode = DifferentiableScope::enter(true);
            panic!("inside the scope");
        });
        assert!(outcome.is_err());
        assert!(!differentiable());
    }

    #[test]
    fn nested_scopes_restore_each_previous_mode() {
        assert!(!differentiable());
        {
            let _outer = DifferentiableScope::enter(true);
            assert!(differentiable());
            {
                let _inner = DifferentiableScope::enter(false);
                assert!(!differentiable());
                {
                    let _innermost = DifferentiableScope::enter(true);
                    assert!(differentiable());
                }
                assert!(!differentiable());
            }
            assert!(differentiable());
        }
        assert!(!differentiable());
    }

    /// A trainer holding a scope replaced by a new trainer: the new one is built (entering its
    /// scope) before the old one is dropped, so the old scope is not the innermost when it goes.
    #[test]
    fn a_scope_dropped_out_of_order_keeps_the_innermost_mode() {
        let mut held = DifferentiableScope::enter(true);
        assert!(differentiable());
        // The replacement is entered first, then the first scope is dropped.
        let first = std::mem::replace(&mut held, DifferentiableScope::enter(true));
        drop(first);
        assert!(differentiable(), "the replacement's mode holds");
        let inference = DifferentiableScope::enter(false);
        drop(held);
        assert!(!differentiable(), "the inner inference scope still holds");
        drop(inference);
        assert!(!differentiable(), "no scope left: inference");
    }

    /// Each thread has its own mode: a training scope here does not switch another thread.
    #[test]
    fn the_mode_is_per_thread() {
        let _training = DifferentiableScope::enter(true);
        let elsewhere = std::thread::spawn(differentiable).join().unwrap();
        assert!(differentiable() && !elsewhere);
    }
}
