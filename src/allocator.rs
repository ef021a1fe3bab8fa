//! Process-wide allocator policy for the heavy tensor work.
//!
//! candle allocates a fresh buffer for every op output. glibc serves buffers above its mmap
//! threshold (128 KiB, adapting up to 32 MiB) with a new `mmap` each time and unmaps them on
//! free, so each activation is zeroed page by page by the kernel on first touch, and the page
//! faults of the worker threads contend on the process's memory map. In a full-size UNet forward
//! that was over a third of the wall time. Serving every size from the heap and never trimming
//! it makes freed buffers reusable as they are: the same forward went from 21.5 s to 13.9 s on
//! 2 cores with the same peak RSS (the heap only grows to the peak the work needs anyway).

/// Keeps freed memory in the process for reuse (glibc only; elsewhere a no-op). Call once, at
/// the start of `main`, before the threads start.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // -1: never trim (mallopt(3)); a training step's memory swings by gigabytes.
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_TOP_PAD, 0);
    }
}

/// Returns the memory freed so far to the system (glibc only; elsewhere a no-op). With
/// [`retain_freed_memory`] the process keeps every buffer it ever freed, so a stage that ends
/// (its networks and activations dropped) would leave its whole peak resident for the next
/// stage, whose allocations fit around it only in part. Called between the stages of a staged
/// restore, each stage's peak is its own. Costs one page fault per page the next stage touches.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; live allocations are
    // untouched.
    unsafe {
        libc::malloc_trim(0);
    }
}
