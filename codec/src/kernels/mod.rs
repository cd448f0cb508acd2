//! The per-element loops of the codecs and of the aggregator's sum, written to
//! auto-vectorize, and compiled twice: for the baseline target and for AVX2 + FMA +
//! F16C, chosen at run time (the CPU check is a cached atomic load, once per chunk).
//!
//! The kernels live by concern: `lanes` (block maxima; f32 and i32 lanes),
//! `narrow` (the i8 codec's i16 lanes), `quantize` (f32 to integers and back),
//! `halves` (f16 and bf16); this file holds the run-time dispatch, the prefetch
//! policy and the loop macros they share.
//!
//! Two exceptions call intrinsics explicitly (module `x86`). No portable code converts
//! f16 in vector registers, so the f16 kernels call F16C's conversions, and the
//! baseline converts element by element through the `half` crate. And the 8- and
//! 16-bit quantizers narrow with AVX2's saturating packs, which LLVM did not find.

/// Whether the CPU has AVX2, FMA and F16C (x86-64-v3), which the fast versions of
/// the kernels are compiled for.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn has_v3() -> bool {
    #[cfg(test)]
    if tests_force_baseline::get() {
        return false;
    }
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

/// Tests run every kernel in its baseline build too, on machines that have the fast
/// one: a flag per thread (each test runs on its own) that makes [`has_v3`] say no.
#[cfg(test)]
pub(crate) mod tests_force_baseline {
    use std::cell::Cell;

    thread_local!(static BASELINE: Cell<bool> = const { Cell::new(false) });

    pub(crate) fn get() -> bool {
        BASELINE.with(Cell::get)
    }

    /// Runs `f` with the baseline kernels on this thread.
    pub(crate) fn with<T>(f: impl FnOnce() -> T) -> T {
        BASELINE.with(|b| b.set(true));
        let r = f();
        BASELINE.with(|b| b.set(false));
        r
    }
}

/// Defines `pub(crate) fn $name` that runs `$body` compiled with AVX2/FMA/F16C when the
/// CPU has them, and compiled for the baseline target otherwise.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        pub(crate) fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if has_v3() {
                    // SAFETY: the CPU supports every feature `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// Elements of a pass handled between two prefetches: 1 KiB of f32 or 32-bit lanes
/// (512 bytes of the i8 sum's 16-bit lanes).
const BLOCK: usize = 256;

/// How far ahead of the block at hand a pass asks for its wide side, in bytes.
const AHEAD: usize = 2048;

/// Asks the CPU to fetch into L1 the lines of one block's worth of the wide side
/// that starts at `base` (the f32 tensor, or a slot's lanes), [`AHEAD`] bytes past
/// the start of block `k`: with 32-bit elements, block `k + 2`, so that its lines
/// arrive while blocks `k` and `k + 1` are worked on.
///
/// Every pass over a tensor that leaves the caches was latency-bound, not
/// bandwidth-bound: the hardware's stream prefetcher stops at each 4 KiB page, and a
/// loop of a dozen instructions per eight elements keeps too few misses in flight to
/// hide the memory's latency. Asking [`AHEAD`] bytes ahead made such passes faster,
/// the longest loops (bf16's narrowing) most (docs/performance.md, "Prefetching").
#[inline(always)]
fn prefetch_block<T>(base: *const T, k: usize) {
    let first = base
        .wrapping_add(k * BLOCK)
        .cast::<i8>()
        .wrapping_add(AHEAD);
    prefetch_lines(first, BLOCK * std::mem::size_of::<T>());
}

/// Asks the CPU to fetch into L1 the lines of the `bytes` bytes from `first`, the one
/// loop behind every prefetch of the kernels.
#[inline(always)]
fn prefetch_lines(first: *const i8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in 0..bytes.div_ceil(64) {
        // SAFETY: a prefetch is a hint: it never faults, whatever the address (past
        // the end of the side it may fetch a neighbour's lines or nothing), and the
        // address is formed with wrapping arithmetic, never dereferenced.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                first.wrapping_add(line * 64),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (first, bytes);
}

/// Asks for the first [`AHEAD`] bytes of a pass's wide side at `base` (at most
/// `bytes`), which [`prefetch_block`] asks for only `AHEAD` bytes ahead of the block
/// at hand, that is never for the first blocks: a pass starts with them in flight.
#[inline(always)]
fn prefetch_head<T>(base: *const T, bytes: usize) {
    prefetch_lines(base.cast(), bytes.min(AHEAD));
}

/// Runs `$body` over a pass that reads `$src`, the wide side (f32 or lanes), and
/// writes `$out`, `$per` bytes per element: on each block of [`BLOCK`] elements
/// (`$s`) and its bytes (`$o`), with the block's number (`$k`), after prefetching
/// `$src` ahead ([`prefetch_block`]). A macro, not a function taking a closure: LLVM
/// left the larger closures out of line, compiled without the fast build's features.
macro_rules! from_wide {
    ($src:expr, $out:expr, $per:expr, |$k:pat, $s:ident, $o:ident| $body:expr) => {{
        let src = $src;
        let base = src.as_ptr();
        prefetch_head(base, std::mem::size_of_val(src));
        for (k, ($s, $o)) in src
            .chunks(BLOCK)
            .zip($out.chunks_mut($per * BLOCK))
            .enumerate()
        {
            prefetch_block(base, k);
            let $k = k;
            $body;
        }
    }};
}

/// [`from_wide!`] the other way: reads `$src`, `$per` bytes per element, and writes
/// `$out`, the wide side, which it prefetches.
macro_rules! into_wide {
    ($src:expr, $per:expr, $out:expr, |$s:ident, $o:ident| $body:expr) => {{
        let out = $out;
        let base = out.as_ptr();
        for (k, ($s, $o)) in $src
            .chunks($per * BLOCK)
            .zip(out.chunks_mut(BLOCK))
            .enumerate()
        {
            prefetch_block(base, k);
            $body;
        }
    }};
}

/// Bytes per element of the integer kernels' `width`: 1, 2, and 4 for anything else
/// (their loops' arms).
#[inline(always)]
pub(crate) fn int_bytes(width: usize) -> usize {
    match width {
        1 | 2 => width,
        _ => 4,
    }
}

#[inline(always)]
fn lane4(c: &[u8]) -> [u8; 4] {
    [c[0], c[1], c[2], c[3]]
}

mod halves;
mod lanes;
mod narrow;
mod quantize;
#[cfg(target_arch = "x86_64")]
mod x86;

pub(crate) use halves::*;
pub(crate) use lanes::*;
pub(crate) use narrow::*;
pub(crate) use quantize::*;
