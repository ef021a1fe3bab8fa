//! The block machinery of the fused CPU attention ([`super::fused_cpu`]): strided matrix views
//! multiplied with the gemm crate on one thread, a work queue of (head, block of query rows)
//! items over candle's CPU threads, and read access to the operands' and the mask's storage.

use crate::kernels::cpu::f32_slice;
use candle_core::{CpuStorage, Layout, Result, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Sizes of one attention: heads (times batch), query rows, keys, key width and value width.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub(super) bh: usize,
    pub(super) n_q: usize,
    pub(super) n_k: usize,
    pub(super) d: usize,
    pub(super) d_v: usize,
}

/// A read-only matrix inside a slice: element (i, j) at `i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(super) struct MatRef<'a> {
    pub(super) data: &'a [f32],
    pub(super) rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// Row-major `rows x cols` at the start of `data`.
    pub(super) fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub(super) fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = lhs · rhs * factor` (or `dst += ...` with `accumulate`), `dst` row-major with row
/// length `rhs.cols`, on the calling thread.
pub(super) fn matmul_into(
    dst: &mut [f32],
    lhs: MatRef,
    rhs: MatRef,
    factor: f32,
    accumulate: bool,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(rhs.rows == k && dst.len() >= m * n && lhs.in_bounds() && rhs.in_bounds());
    // SAFETY: the assertion keeps every element gemm reads or writes inside the three slices,
    // and `dst` is borrowed mutably, so it overlaps neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            factor,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The mask's f32 elements with their strides over heads, rows and keys.
pub(super) struct MaskData<'a> {
    data: &'a [f32],
    strides: [usize; 3],
}

impl MaskData<'_> {
    /// Adds the mask's row (head `h`, query `i`) to `scores`.
    pub(super) fn add_row(&self, h: usize, i: usize, scores: &mut [f32]) {
        let start = h * self.strides[0] + i * self.strides[1];
        match self.strides[2] {
            0 => scores.iter_mut().for_each(|s| *s += self.data[start]),
            step => {
                for (j, s) in scores.iter_mut().enumerate() {
                    *s += self.data[start + j * step];
                }
            }
        }
    }
}

/// Runs `work(item, state)` for items `0..items` on candle's CPU thread count (the calling
/// thread included), each worker with its own `make()` state; returns the states.
pub(super) fn run_items<S: Send>(
    items: usize,
    make: impl Fn() -> S + Sync,
    work: impl Fn(usize, &mut S) + Sync,
) -> Vec<S> {
    let workers = candle_core::utils::get_num_threads().clamp(1, items.max(1));
    let next = AtomicUsize::new(0);
    let worker = || {
        let mut state = make();
        loop {
            let item = next.fetch_add(1, Ordering::Relaxed);
            if item >= items {
                break state;
            }
            work(item, &mut state);
        }
    };
    let worker = &worker;
    std::thread::scope(|scope| {
        let others: Vec<_> = (1..workers).map(|_| scope.spawn(worker)).collect();
        let mut states = vec![worker()];
        states.extend(
            others
                .into_iter()
                .map(|h| h.join().expect("attention worker")),
        );
        states
    })
}

/// `data` cut into per-(head, block) pieces of `rows_per_block` rows of `row_len`, in item
/// order, each behind its own lock (taken once, by the worker of that item).
pub(super) fn item_slices(
    data: &mut [f32],
    dims: Dims,
    rows_per_block: usize,
    row_len: usize,
) -> Vec<Mutex<&mut [f32]>> {
    let mut pieces = Vec::new();
    for head in data.chunks_mut(dims.n_q * row_len) {
        pieces.extend(head.chunks_mut(rows_per_block * row_len).map(Mutex::new));
    }
    pieces
}

/// A read lock on the mask's storage, where its view starts and its strides.
pub(super) struct MaskGuard<'a> {
    pub(super) storage: Box<dyn std::ops::Deref<Target = candle_core::Storage> + 'a>,
    pub(super) offset: usize,
    pub(super) strides: [usize; 3],
}

impl MaskGuard<'_> {
    pub(super) fn view(&self) -> Result<MaskData<'_>> {
        match &**self.storage {
            candle_core::Storage::Cpu(CpuStorage::F32(v)) => Ok(MaskData {
                data: &v[self.offset..],
                strides: self.strides,
            }),
            _ => candle_core::bail!("attention: the mask is not an f32 CPU tensor"),
        }
    }
}

pub(super) fn dims_of(q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
    let (bh, n_q, d) = q.shape().dims3()?;
    let (_, n_k, _) = k.shape().dims3()?;
    let (_, _, d_v) = v.shape().dims3()?;
    Ok(Dims {
        bh,
        n_q,
        n_k,
        d,
        d_v,
    })
}

/// The f32 slice of a contiguous CPU tensor, held under its storage's read lock.
pub(super) fn with_f32<T>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> Result<T>,
) -> Result<T> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => f(f32_slice(s, layout, what)?),
        _ => candle_core::bail!("{what}: a CPU tensor expected"),
    }
}
