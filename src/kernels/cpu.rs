//! What the fused CPU kernels share: reading a contiguous f32 storage, and running a kernel's
//! rows over candle's CPU threads.

use candle_core::Result;

/// The f32 elements of a contiguous CPU tensor.
pub(crate) fn f32_slice<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    what: &str,
) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("{what}: contiguous f32 input expected"),
    }
}

/// Runs `work(row, out_row)` over the rows of `row_len` elements of `out`, split over the
/// threads.
pub(crate) fn for_each_row(
    out: &mut [f32],
    row_len: usize,
    work: impl Fn(usize, &mut [f32]) + Sync,
) {
    let rows = out.len() / row_len.max(1);
    let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
    let rows_per_thread = rows.div_ceil(threads).max(1);
    let work = &work;
    std::thread::scope(|scope| {
        for (t, out_chunk) in out.chunks_mut(rows_per_thread * row_len).enumerate() {
            scope.spawn(move || {
                for (r, out_row) in out_chunk.chunks_mut(row_len).enumerate() {
                    work(t * rows_per_thread + r, out_row);
                }
            });
        }
    });
}

/// Below this many elements one thread does a whole row-wise kernel (spawning costs more).
const SERIAL_ELEMENTS: usize = 1 << 15;

/// [`for_each_row`], or on this thread alone for tensors where spawning costs more.
pub(crate) fn for_each_row_sized(
    out: &mut [f32],
    row_len: usize,
    work: impl Fn(usize, &mut [f32]) + Sync,
) {
    if out.len() < SERIAL_ELEMENTS {
        for (r, out_row) in out.chunks_mut(row_len).enumerate() {
            work(r, out_row);
        }
    } else {
        for_each_row(out, row_len, work);
    }
}
