//! Slot pools go back to the operating system when their job ends.
//!
//! A pool is a few large allocations (up to the per-job cap, 16 MiB by default).
//! glibc serves the first ones with `mmap` and unmaps them on free, but each such
//! free raises its mmap threshold to the freed size (up to 32 MiB), so from then on
//! pools come from the heap, whose freed blocks stay resident until the process ends:
//! 63 one-rank jobs at the cap, started and timed out again and again, left about
//! 1 GB resident from the second round on. Fixing the threshold turns the dynamic
//! adjustment off, so every block at or above it is mapped and unmapped on its own.

use std::sync::Once;

/// Allocations at or above this size get their own mapping: every pool's lanes and
/// kept results of any real size, and nothing of the per-packet path, which
/// allocates nothing.
pub const MMAP_THRESHOLD: usize = 256 << 10;

/// Makes freed slot pools return to the operating system (process-wide, once; a
/// no-op where the C library is not glibc).
pub fn return_freed_pools() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            // SAFETY: mallopt only changes allocator parameters; any value is valid,
            // and allocations already made are unaffected.
            let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as i32) };
            if ok != 1 {
                tracing::warn!(
                    "mallopt(M_MMAP_THRESHOLD) failed: freed slot pools may stay resident"
                );
            }
        }
    });
}
