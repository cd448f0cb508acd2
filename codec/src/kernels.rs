//! The per-element loops of the codecs and of the aggregator's sum, written to
//! auto-vectorize, and compiled twice: for the baseline target and for AVX2 + FMA +
//! F16C, chosen at run time (the CPU check is a cached atomic load, once per chunk).
//!
//! Two exceptions call intrinsics explicitly (module `x86`). No portable code converts
//! f16 in vector registers, so the f16 kernels call F16C's conversions, and the
//! baseline converts element by element through the `half` crate. And the 8- and
//! 16-bit quantizers narrow with AVX2's saturating packs, which LLVM did not find.

use half::f16;

use super::uniform;

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
/// hide the memory's latency. Reading 256 MiB into bf16 took 48-64 ms and into f16
/// 31-54 ms; asking 2 KiB ahead, 35-44 and 30-34 (one process, four rounds).
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

multiversion! {
    /// The largest `|x|` of `src`, as raw bits (NaN and infinity compare above all).
    fn max_abs_bits(src: &[f32]) -> u32 {
        let base = src.as_ptr();
        src.chunks(BLOCK).enumerate().fold(0u32, |m, (k, b)| {
            prefetch_block(base, k);
            b.iter().fold(m, |m, x| m.max(x.to_bits() & 0x7fff_ffff))
        })
    }
}

multiversion! {
    /// The largest `|x|` of each `per`-element block of `src` (`per` a multiple of
    /// [`BLOCK`]), as raw bits, into `out`, one per block, the last one taking
    /// whatever lies past the others (so one block is the whole of `src`): one pass,
    /// prefetching across the blocks' borders, where a pass per block left the first
    /// 2 KiB of each block unasked for.
    fn max_abs_bits_blocks(src: &[f32], per: usize, out: &mut [u32]) {
        let base = src.as_ptr();
        prefetch_head(base, std::mem::size_of_val(src));
        out.fill(0);
        let per_block = (per / BLOCK).max(1);
        let last = out.len().saturating_sub(1);
        for (k, b) in src.chunks(BLOCK).enumerate() {
            prefetch_block(base, k);
            let m = b.iter().fold(0u32, |m, x| m.max(x.to_bits() & 0x7fff_ffff));
            if let Some(o) = out.get_mut((k / per_block).min(last)) {
                *o = (*o).max(m);
            }
        }
    }
}

multiversion! {
    /// `out = le_bytes(src)`.
    fn f32_to_le(src: &[f32], out: &mut [u8]) {
        from_wide!(src, out, 4, |_, src, out| {
            for (x, o) in src.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&x.to_le_bytes());
            }
        })
    }
}

multiversion! {
    /// `out = from_le_bytes(src)`.
    fn le_to_f32(src: &[u8], out: &mut [f32]) {
        into_wide!(src, 4, out, |src, out| {
            for (c, o) in src.chunks_exact(4).zip(out.iter_mut()) {
                *o = f32::from_le_bytes(lane4(c));
            }
        })
    }
}

multiversion! {
    /// `acc = src` (32-bit lanes, any type).
    fn load_lanes(acc: &mut [u32], src: &[u8]) {
        into_wide!(src, 4, acc, |src, acc| {
            for (c, a) in src.chunks_exact(4).zip(acc.iter_mut()) {
                *a = u32::from_le_bytes(lane4(c));
            }
        })
    }
}

multiversion! {
    /// `out = le_bytes(acc)` (32-bit lanes, any type).
    fn store_lanes(acc: &[u32], out: &mut [u8]) {
        from_wide!(acc, out, 4, |_, acc, out| {
            for (a, o) in acc.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&a.to_le_bytes());
            }
        })
    }
}

multiversion! {
    /// f32 lanes: `acc += src`.
    fn add_f32(acc: &mut [u32], src: &[u8]) {
        into_wide!(src, 4, acc, |src, acc| {
            for (c, a) in src.chunks_exact(4).zip(acc.iter_mut()) {
                *a = (f32::from_bits(*a) + f32::from_le_bytes(lane4(c))).to_bits();
            }
        })
    }
}

/// One block of [`int_lanes`] for integers of `w` bytes: `ADD` chooses the operation
/// at compile time, so that each loop is a plain store or a plain add (of each value
/// times `2^shl`, `shl` below 32).
#[inline(always)]
fn int_block<const ADD: bool>(acc: &mut [u32], src: &[u8], w: usize, shl: u32) {
    let put = |a: &mut u32, v: i32| {
        let v = (v as u32) << shl;
        *a = if ADD { a.wrapping_add(v) } else { v }
    };
    match w {
        1 => {
            for (c, a) in src.iter().zip(acc.iter_mut()) {
                put(a, i32::from(*c as i8));
            }
        }
        2 => {
            for (c, a) in src.chunks_exact(2).zip(acc.iter_mut()) {
                put(a, i32::from(i16::from_le_bytes([c[0], c[1]])));
            }
        }
        _ => {
            for (c, a) in src.chunks_exact(4).zip(acc.iter_mut()) {
                put(a, i32::from_le_bytes(lane4(c)));
            }
        }
    }
}

multiversion! {
    /// i32 lanes: `acc += src * 2^shl` with `add`, wrapping, else `acc = src * 2^shl`,
    /// where `src` holds integers of `width` bytes (1, 2, 4) and `shl` is below 32.
    fn int_lanes(acc: &mut [u32], src: &[u8], width: usize, add: bool, shl: u32) {
        let w = int_bytes(width);
        let shl = shl.min(31);
        into_wide!(src, w, acc, |src, acc| {
            if add {
                int_block::<true>(acc, src, w, shl)
            } else {
                int_block::<false>(acc, src, w, shl)
            }
        })
    }
}

/// i32 lanes: `acc += src` where `src` holds integers of `width` bytes (1, 2, 4),
/// wrapping.
pub(crate) fn add_int(acc: &mut [u32], src: &[u8], width: usize) {
    int_lanes(acc, src, width, true, 0)
}

/// i32 lanes: `acc += src * 2^shl` (`shl` below 32), wrapping.
pub(crate) fn add_int_shl(acc: &mut [u32], src: &[u8], width: usize, shl: u32) {
    int_lanes(acc, src, width, true, shl)
}

/// i32 lanes: `acc = src` for integers of `width` bytes.
pub(crate) fn load_int(acc: &mut [u32], src: &[u8], width: usize) {
    int_lanes(acc, src, width, false, 0)
}

/// `x / 2^shr`, rounded half up, for `shr` of any size (0 for `shr` of 64 and more,
/// where even `i64::MIN` rounds to 0).
#[inline(always)]
fn round_shr(x: i64, shr: u32) -> i64 {
    match shr {
        0 => x,
        1..=62 => (x + (1i64 << (shr - 1))) >> shr,
        _ => 0,
    }
}

multiversion! {
    /// i32 lanes: `acc *= 2^shl` (`shl` below 32), wrapping.
    fn shl_lanes(acc: &mut [u32], shl: u32) {
        let shl = shl.min(31);
        for a in acc.iter_mut() {
            *a <<= shl;
        }
    }
}

/// i32 lanes: `acc /= 2^shr`, rounded half up: what the lanes lose when a slot's sum
/// must give up low bits to make room at the top.
pub(crate) fn round_shr_lanes(acc: &mut [u32], shr: u32) {
    for a in acc.iter_mut() {
        *a = round_shr(i64::from(*a as i32), shr) as i32 as u32;
    }
}

/// i32 lanes: `acc += src / 2^shr`, each value rounded half up, wrapping, where `src`
/// holds integers of `width` bytes (1, 2, 4): a contribution too small for the lanes'
/// unit.
pub(crate) fn add_int_round_shr(acc: &mut [u32], src: &[u8], width: usize, shr: u32) {
    let w = int_bytes(width);
    for (c, a) in src.chunks_exact(w).zip(acc.iter_mut()) {
        let v = match w {
            1 => i64::from(c[0] as i8),
            2 => i64::from(i16::from_le_bytes([c[0], c[1]])),
            _ => i64::from(i32::from_le_bytes(lane4(c))),
        };
        *a = a.wrapping_add(round_shr(v, shr) as i32 as u32);
    }
}

multiversion! {
    /// i32 lanes to integers of `width` bytes: each lane divided by `2^shift`, rounded
    /// (half up), clamped to `±lim`.
    fn store_int(acc: &[u32], shift: u32, lim: i32, out: &mut [u8], width: usize) {
        let half = if shift == 0 { 0i64 } else { 1i64 << (shift - 1) };
        let q = |a: u32| -> i32 {
            (((a as i32 as i64) + half) >> shift).clamp(-i64::from(lim), i64::from(lim)) as i32
        };
        let w = int_bytes(width);
        from_wide!(acc, out, w, |_, acc, out| match w {
            1 => {
                for (a, o) in acc.iter().zip(out.iter_mut()) {
                    *o = q(*a) as i8 as u8;
                }
            }
            2 => {
                for (a, o) in acc.iter().zip(out.chunks_exact_mut(2)) {
                    o.copy_from_slice(&(q(*a) as i16).to_le_bytes());
                }
            }
            _ => {
                for (a, o) in acc.iter().zip(out.chunks_exact_mut(4)) {
                    o.copy_from_slice(&q(*a).to_le_bytes());
                }
            }
        })
    }
}

multiversion! {
    /// i16 lanes: `acc = src` for i8 integers.
    fn load_i8_i16(acc: &mut [i16], src: &[u8]) {
        into_wide!(src, 1, acc, |src, acc| {
            for (c, a) in src.iter().zip(acc.iter_mut()) {
                *a = i16::from(*c as i8);
            }
        })
    }
}

multiversion! {
    /// i16 lanes: `acc += src * 2^shl` for i8 integers (`shl` below 16), wrapping.
    fn add_i8_i16_shl(acc: &mut [i16], src: &[u8], shl: u32) {
        let shl = shl.min(15);
        into_wide!(src, 1, acc, |src, acc| {
            for (c, a) in src.iter().zip(acc.iter_mut()) {
                *a = a.wrapping_add(i16::from(*c as i8) << shl);
            }
        })
    }
}

/// i16 lanes: `acc += src` for i8 integers, wrapping.
pub(crate) fn add_i8_i16(acc: &mut [i16], src: &[u8]) {
    add_i8_i16_shl(acc, src, 0)
}

/// i16 lanes: `acc *= 2^shl` (`shl` below 16), wrapping.
pub(crate) fn shl_i16_lanes(acc: &mut [i16], shl: u32) {
    let shl = shl.min(15);
    for a in acc.iter_mut() {
        *a <<= shl;
    }
}

/// Widens the i16 lanes in the front half of `acc` to its i32 lanes, in place (from
/// the back, so that no lane is overwritten before it is read).
pub(crate) fn widen_i16_lanes(acc: &mut [u32]) {
    for i in (0..acc.len()).rev() {
        let v = bytemuck::cast_slice::<u32, i16>(acc)[i];
        acc[i] = i32::from(v) as u32;
    }
}

multiversion! {
    /// i16 lanes to i8 integers: each lane divided by `2^shift` (at most 15), rounded
    /// (half up), clamped to `±lim`; the same as [`store_int`] on the same sums.
    fn store_i16_i8(acc: &[i16], shift: u32, lim: i32, out: &mut [u8]) {
        let shift = shift.min(15);
        let half = (1i32 << shift) >> 1;
        from_wide!(acc, out, 1, |_, acc, out| {
            for (a, o) in acc.iter().zip(out.iter_mut()) {
                *o = ((i32::from(*a) + half) >> shift).clamp(-lim, lim) as i8 as u8;
            }
        })
    }
}

/// Elements [`sum_store_i8`] sums at a time: its 16-bit sums (512 bytes, on the
/// stack) stay in L1 while every contribution is added.
const SUM_BLOCK: usize = 256;

/// Asks the CPU to fetch into L1 the `len` bytes at `at + AHEAD` of `src`, one
/// line at a time: a hint, like [`prefetch_block`], for a narrow side.
#[inline(always)]
fn prefetch_bytes(src: &[u8], at: usize, len: usize) {
    prefetch_lines(src.as_ptr().wrapping_add(at + AHEAD).cast(), len);
}

/// Several contributions of i8 integers, the `k`-th times `2^shl[k]` (below 16),
/// summed in 16-bit lanes (wrapping) and written as [`store_i16_i8`] writes lanes:
/// divided by `2^shift` (at most 15), rounded half up, clamped to `±lim` (at most
/// 127). One pass, where [`add_i8_i16_shl`] reads and writes a slot's lanes once per
/// contribution. Writes the first `n` elements of `out`, `n` the shortest of `out`
/// and `srcs` (at most [`super::MAX_AT_ONCE`] of them are summed).
///
/// With AVX2, all of the contributions' sums for 32 elements stay in registers
/// ([`x86::sum_store_i8`]): LLVM kept the portable loop's 16-bit sums on the stack
/// and clamped with blends, and the aggregator spent as long in it as in the lanes'
/// loops it replaced.
pub(crate) fn sum_store_i8(srcs: &[&[u8]], shl: &[u32], shift: u32, lim: i32, out: &mut [u8]) {
    let m = srcs.len().min(shl.len()).min(super::MAX_AT_ONCE);
    #[cfg(target_arch = "x86_64")]
    if has_v3() {
        // SAFETY: the CPU supports every feature `x86::sum_store_i8` was compiled for.
        return unsafe { x86::sum_store_i8(&srcs[..m], &shl[..m], shift, lim, out) };
    }
    sum_store_i8_loop(&srcs[..m], &shl[..m], shift, lim, out)
}

multiversion! {
    /// [`sum_store_i8`] in portable loops: the sums of [`SUM_BLOCK`] elements stay in
    /// L1 while every contribution is added.
    fn sum_store_i8_loop(srcs: &[&[u8]], shl: &[u32], shift: u32, lim: i32, out: &mut [u8]) {
        let n = srcs.iter().fold(out.len(), |n, s| n.min(s.len()));
        let shift = shift.min(15);
        // Rounding half up in 16 bits: `(a + 2^(shift-1)) >> shift` is `a >> shift`
        // plus bit `shift - 1` of `a`, without the sum that could leave 16 bits.
        let (down, bit) = (shift.saturating_sub(1), i16::from(shift > 0));
        let lim = lim.clamp(0, 127) as i16;
        let mut sums = [0i16; SUM_BLOCK];
        for (b, o) in out[..n].chunks_mut(SUM_BLOCK).enumerate() {
            let at = b * SUM_BLOCK;
            let sums = &mut sums[..o.len()];
            sums.fill(0);
            for (src, &k) in srcs.iter().zip(shl) {
                prefetch_bytes(src, at, SUM_BLOCK);
                let k = k.min(15);
                for (a, c) in sums.iter_mut().zip(&src[at..at + o.len()]) {
                    *a = a.wrapping_add(i16::from(*c as i8) << k);
                }
            }
            for (a, o) in sums.iter().zip(o.iter_mut()) {
                let r = (*a >> shift) + ((*a >> down) & bit);
                *o = r.clamp(-lim, lim) as i8 as u8;
            }
        }
    }
}

/// Quantizes one value: scaled, rounded by `round`, clamped to `±lim` (`lim` an
/// integer below 2^31; a NaN becomes `-lim`).
///
/// The comparisons below compile to one `maxps` and one `minps`, where `f32::max` and
/// `f32::min` add a NaN check and a blend apiece; with `roundps` for the rounding (the
/// fast build has SSE4.1) the loop is half as long as with those and the
/// add-and-subtract rounding trick.
#[inline(always)]
fn q(x: f32, s: f32, lim: f32, round: impl Fn(f32) -> f32) -> i32 {
    let r = round(x * s);
    // `maxps(r, -lim)` then `minps(r, lim)`: a NaN fails the comparison and takes
    // `-lim`.
    #[allow(clippy::manual_clamp)]
    let r = if r > -lim { r } else { -lim };
    #[allow(clippy::manual_clamp)]
    let r = if r < lim { r } else { lim };
    // SAFETY: `r` is a finite value in [-lim, lim] and `quantize` clamps `lim` below
    // 2^31: in range of i32. (The saturating `as` cast does not vectorize; this one
    // does.)
    unsafe { r.to_int_unchecked::<i32>() }
}

/// `y` rounded up with probability `y - floor(y)` (`u` uniform in `[0, 1)`), down
/// otherwise: unbiased. Computed in f64, where `y - floor(y)` is exact: `(y + u)
/// .floor()` in f32 rounds the sum first, which near 2^21 and above rounds up far more
/// often than the fraction says.
#[inline(always)]
fn round_stochastically(y: f32, u: f32) -> f32 {
    let y = f64::from(y);
    let down = y.floor();
    let up = y - down > f64::from(u);
    (down + f64::from(u8::from(up))) as f32
}

/// Quantizes `src * s` to integers of `width` bytes, rounded to nearest (or up with
/// the probability of the fraction, by uniform noise from `dither`), clamped to
/// `±lim`, which must fit `width`.
///
/// The 8- and 16-bit roundings to nearest, the codecs' usual case, go through
/// [`x86::quantize_packed`] with AVX2: LLVM narrowed the vectorized loop's 32-bit
/// integers with a shuffle per eight elements, where two saturating packs narrow
/// thirty-two at once.
pub(crate) fn quantize(
    src: &[f32],
    s: f32,
    lim: f32,
    dither: Option<u64>,
    out: &mut [u8],
    width: usize,
) {
    // The quantizers clamp before they round (`x86::q8`), the same as after only for
    // a bound that is an integer, as every codec's is (`Fixed::limit`).
    debug_assert!(
        lim.is_nan() || lim.fract() == 0.0,
        "quantizing to a bound of {lim}"
    );
    // The largest f32 below 2^31: what keeps the conversion to i32 in range (a NaN
    // `lim`, which `clamp` would pass through, becomes 0).
    let lim = if lim >= 0.0 {
        lim.min(2_147_483_520.0)
    } else {
        0.0
    };
    #[cfg(target_arch = "x86_64")]
    if dither.is_none() && has_v3() {
        match width {
            // SAFETY: the CPU supports every feature `x86::quantize_packed` was
            // compiled for.
            1 => return unsafe { x86::quantize_packed::<1>(src, s, lim.min(127.0), out) },
            // SAFETY: as above.
            2 => return unsafe { x86::quantize_packed::<2>(src, s, lim.min(32_767.0), out) },
            _ => {}
        }
    }
    quantize_loop(src, s, lim, dither, out, width)
}

multiversion! {
    /// [`quantize`] as plain loops, for the widths and roundings without a packed
    /// version and for CPUs without AVX2.
    fn quantize_loop(src: &[f32], s: f32, lim: f32, dither: Option<u64>, out: &mut [u8], width: usize) {
        // Bytes per element: the dithered loop writes `width` (1-4) of each value.
        let w = if dither.is_some() { width.clamp(1, 4) } else { int_bytes(width) };
        from_wide!(src, out, w, |k, src, out| match (dither, w) {
            (None, 1) => {
                for (x, o) in src.iter().zip(out.iter_mut()) {
                    *o = q(*x, s, lim, f32::round_ties_even) as i8 as u8;
                }
            }
            (None, 2) => {
                for (x, o) in src.iter().zip(out.chunks_exact_mut(2)) {
                    o.copy_from_slice(&(q(*x, s, lim, f32::round_ties_even) as i16).to_le_bytes());
                }
            }
            (None, _) => {
                for (x, o) in src.iter().zip(out.chunks_exact_mut(4)) {
                    o.copy_from_slice(&q(*x, s, lim, f32::round_ties_even).to_le_bytes());
                }
            }
            (Some(key), _) => {
                let items = src.iter().zip(out.chunks_exact_mut(w));
                for (i, (x, o)) in (k * BLOCK..).zip(items) {
                    let v = q(*x, s, lim, |y| round_stochastically(y, uniform(key, i)));
                    o.copy_from_slice(&v.to_le_bytes()[..w]);
                }
            }
        })
    }
}

multiversion! {
    /// `out = int(src) * inv` for integers of `width` bytes.
    fn dequantize(src: &[u8], inv: f32, out: &mut [f32], width: usize) {
        let w = int_bytes(width);
        into_wide!(src, w, out, |src, out| match w {
            1 => {
                for (c, o) in src.iter().zip(out.iter_mut()) {
                    *o = f32::from(*c as i8) * inv;
                }
            }
            2 => {
                for (c, o) in src.chunks_exact(2).zip(out.iter_mut()) {
                    *o = f32::from(i16::from_le_bytes([c[0], c[1]])) * inv;
                }
            }
            _ => {
                for (c, o) in src.chunks_exact(4).zip(out.iter_mut()) {
                    *o = i32::from_le_bytes(lane4(c)) as f32 * inv;
                }
            }
        })
    }
}

/// One f32 to bf16 bits after adding `add` below the cut (NaN stays NaN, quieted).
/// The choice is made on the 32-bit value, before the one narrowing shift, so that the
/// vector loop blends once and packs once.
#[inline(always)]
fn bf16_bits(x: f32, add: u32) -> u16 {
    let b = x.to_bits();
    // Rounding up past the largest finite value gives infinity, as IEEE does.
    let r = if x.is_nan() {
        b | 0x0040_0000
    } else {
        b.wrapping_add(add)
    };
    (r >> 16) as u16
}

multiversion! {
    /// f32 to bf16 bits, round to nearest even (NaN stays NaN), or stochastically with
    /// `dither`. One loop per rounding, so that each compiles to straight vector code.
    fn to_bf16(src: &[f32], dither: Option<u64>, out: &mut [u8]) {
        from_wide!(src, out, 2, |k, src, out| match dither {
            None => {
                for (x, o) in src.iter().zip(out.chunks_exact_mut(2)) {
                    let add = 0x7fff + ((x.to_bits() >> 16) & 1);
                    o.copy_from_slice(&bf16_bits(*x, add).to_le_bytes());
                }
            }
            Some(key) => {
                let items = src.iter().zip(out.chunks_exact_mut(2));
                for (i, (x, o)) in (k * BLOCK..).zip(items) {
                    let add = (uniform(key, i) * 65536.0) as u32;
                    o.copy_from_slice(&bf16_bits(*x, add).to_le_bytes());
                }
            }
        })
    }
}

multiversion! {
    /// bf16 bits to f32.
    fn from_bf16(src: &[u8], out: &mut [f32]) {
        into_wide!(src, 2, out, |src, out| {
            for (c, o) in src.chunks_exact(2).zip(out.iter_mut()) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            }
        })
    }
}

multiversion! {
    /// f32 lanes: `acc += bf16(src)`.
    fn add_bf16(acc: &mut [u32], src: &[u8]) {
        into_wide!(src, 2, acc, |src, acc| {
            for (c, a) in src.chunks_exact(2).zip(acc.iter_mut()) {
                let x = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
                *a = (f32::from_bits(*a) + x).to_bits();
            }
        })
    }
}

/// Elements of an f16 payload converted per step by F16C (one 256-bit register).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const F16_STEP: usize = 8;

/// f32 lanes: `acc = f16(src)`, or `acc += f16(src)` with `ADD`; the payload at any
/// alignment.
fn f16_lanes<const ADD: bool>(acc: &mut [u32], src: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if has_v3() {
        // SAFETY: the CPU supports every feature `x86::f16_lanes` was compiled for.
        return unsafe { x86::f16_lanes::<ADD>(acc, src) };
    }
    f16_lanes_portable::<ADD>(acc, src)
}

/// [`f16_lanes`] for CPUs without F16C: element by element through `half`.
pub(crate) fn f16_lanes_portable<const ADD: bool>(acc: &mut [u32], src: &[u8]) {
    for (c, a) in src.chunks_exact(2).zip(acc.iter_mut()) {
        let x = f16::from_le_bytes([c[0], c[1]]).to_f32();
        *a = if ADD {
            (f32::from_bits(*a) + x).to_bits()
        } else {
            x.to_bits()
        };
    }
}

/// f32 lanes: `acc = f16(src)`.
pub(crate) fn load_f16(acc: &mut [u32], src: &[u8]) {
    f16_lanes::<false>(acc, src)
}

/// f32 lanes: `acc += f16(src)`.
pub(crate) fn add_f16(acc: &mut [u32], src: &[u8]) {
    f16_lanes::<true>(acc, src)
}

/// f32 to f16 bytes (little-endian), round to nearest even; `out` at any alignment.
/// With F16C, eight at a time in registers: `half`'s slice conversion called a
/// function per eight elements and was a quarter of an f16 run's samples.
pub(crate) fn to_f16(src: &[f32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if has_v3() {
        // SAFETY: the CPU supports every feature `x86::to_f16` was compiled for.
        return unsafe { x86::to_f16(src, out) };
    }
    to_f16_portable(src, out)
}

/// [`to_f16`] for CPUs without F16C: element by element through `half`.
pub(crate) fn to_f16_portable(src: &[f32], out: &mut [u8]) {
    for (x, o) in src.iter().zip(out.chunks_exact_mut(2)) {
        o.copy_from_slice(&f16::from_f32(*x).to_le_bytes());
    }
}

/// f16 bytes (little-endian) to f32, exact; `src` at any alignment.
pub(crate) fn from_f16(src: &[u8], out: &mut [f32]) {
    f16_lanes::<false>(bytemuck::cast_slice_mut(out), src)
}

/// The f16 kernels with F16C intrinsics. Registers are read and written through
/// `bytemuck` casts of whole arrays, which compile to unaligned loads and stores.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m128i, __m256, __m256i, _mm256_add_ps, _mm256_cvtph_ps, _mm256_cvtps_epi32,
        _mm256_cvtps_ph, _mm256_max_ps, _mm256_min_ps, _mm256_mul_ps, _mm256_packs_epi16,
        _mm256_packs_epi32, _mm256_permute4x64_epi64, _mm256_permutevar8x32_epi32, _mm256_set1_ps,
        _mm256_setr_epi32, _MM_FROUND_TO_NEAREST_INT,
    };

    use super::{
        prefetch_block, prefetch_bytes, prefetch_head, quantize_loop, BLOCK, F16_STEP, SUM_BLOCK,
    };

    /// [`super::sum_store_i8`] with AVX2, 32 elements a step: each contribution's bytes
    /// widened to 16 bits and shifted (`vpmovsxbw`, `vpsllw`), added in registers,
    /// rounded with two arithmetic shifts, clamped, and packed back to bytes.
    ///
    /// Sums at most [`super::super::MAX_AT_ONCE`] sources (the first of `srcs`).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn sum_store_i8(
        srcs: &[&[u8]],
        shl: &[u32],
        shift: u32,
        lim: i32,
        out: &mut [u8],
    ) {
        let srcs = &srcs[..srcs.len().min(shl.len()).min(super::super::MAX_AT_ONCE)];
        use std::arch::x86_64::{
            _mm256_add_epi16, _mm256_and_si256, _mm256_cvtepi8_epi16, _mm256_max_epi16,
            _mm256_min_epi16, _mm256_set1_epi16, _mm256_setzero_si256, _mm256_sll_epi16,
            _mm256_sra_epi16, _mm_cvtsi32_si128, _mm_loadu_si128,
        };
        const STEP: usize = 32;
        let n = srcs.iter().fold(out.len(), |n, s| n.min(s.len()));
        let shift = shift.min(15);
        let down = _mm_cvtsi32_si128(shift.saturating_sub(1) as i32);
        let bit = _mm256_set1_epi16(i16::from(shift > 0));
        let sra = _mm_cvtsi32_si128(shift as i32);
        let lim = lim.clamp(0, 127) as i16;
        let (lo, hi) = (_mm256_set1_epi16(-lim), _mm256_set1_epi16(lim));
        let counts: [__m128i; super::super::MAX_AT_ONCE] =
            std::array::from_fn(|k| _mm_cvtsi32_si128(shl.get(k).map_or(0, |&s| s.min(15)) as i32));
        let steps = n / STEP;
        let o = out.as_mut_ptr();
        for i in 0..steps {
            let at = i * STEP;
            if at % SUM_BLOCK == 0 {
                for src in srcs {
                    prefetch_bytes(src, at, SUM_BLOCK);
                }
            }
            let (mut a, mut b) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for (src, count) in srcs.iter().zip(&counts) {
                // SAFETY: `at + STEP <= n`, and every source holds at least `n` bytes.
                let (x, y) = unsafe {
                    let p = src.as_ptr().add(at);
                    (_mm_loadu_si128(p.cast()), _mm_loadu_si128(p.add(16).cast()))
                };
                a = _mm256_add_epi16(a, _mm256_sll_epi16(_mm256_cvtepi8_epi16(x), *count));
                b = _mm256_add_epi16(b, _mm256_sll_epi16(_mm256_cvtepi8_epi16(y), *count));
            }
            let round = |v| {
                let r = _mm256_add_epi16(
                    _mm256_sra_epi16(v, sra),
                    _mm256_and_si256(_mm256_sra_epi16(v, down), bit),
                );
                _mm256_min_epi16(_mm256_max_epi16(r, lo), hi)
            };
            // The pack interleaves the halves' 128-bit lanes: a's low, b's low, a's
            // high, b's high; the permutation puts them back in order.
            let bytes =
                _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi16(round(a), round(b)));
            // SAFETY: `out` holds at least `n >= at + STEP` bytes.
            unsafe { o.add(at).cast::<__m256i>().write_unaligned(bytes) };
        }
        // The tail (fewer than 32 elements) through the portable loop.
        let at = steps * STEP;
        let tails: [&[u8]; super::super::MAX_AT_ONCE] =
            std::array::from_fn(|k| srcs.get(k).map_or(&[][..], |s| &s[at..n]));
        super::sum_store_i8_loop(
            &tails[..srcs.len()],
            shl,
            shift,
            i32::from(lim),
            &mut out[at..n],
        );
    }

    /// Elements quantized per step by [`quantize_packed`]: four registers of eight.
    const QUANT_STEP: usize = 32;

    /// Eight `round(x * s)` clamped to `[lo, hi]` (NaN to `lo`), as 32-bit integers:
    /// the scalar loop's `q`, but clamped before it is rounded, by the conversion
    /// itself (`vcvtps2dq`, to nearest even in the default floating-point environment,
    /// which Rust assumes). The bounds are integers, so the order changes nothing, and
    /// one instruction fewer (`vroundps`) made i8's encode 13-21% faster (`cargo bench
    /// --bench codecs -- i8/encode`).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn q8(x: &[f32; 8], s: __m256, lo: __m256, hi: __m256) -> __m256i {
        let r = _mm256_mul_ps(bytemuck::cast::<_, __m256>(*x), s);
        // `maxps(r, lo)` is `r > lo ? r : lo` and `minps(r, hi)` is `r < hi ? r : hi`.
        _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
    }

    /// [`super::quantize`] to nearest at `W` = 1 or 2 bytes on a CPU with AVX2;
    /// `lim` (at most 127 or 32,767) keeps the saturating packs exact.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_packed<const W: usize>(
        src: &[f32],
        s: f32,
        lim: f32,
        out: &mut [u8],
    ) {
        // SAFETY: this function is compiled with the same features .
        from_wide!(src, out, W, |_, x, o| unsafe {
            quantize_packed_block::<W>(x, s, lim, o)
        });
    }

    /// [`quantize_packed`] on one block.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn quantize_packed_block<const W: usize>(src: &[f32], s: f32, lim: f32, out: &mut [u8]) {
        let n = src.len().min(out.len() / W);
        let (sv, lo, hi) = (_mm256_set1_ps(s), _mm256_set1_ps(-lim), _mm256_set1_ps(lim));
        // The packs work within 128-bit halves: after both, the four-byte groups hold
        // elements 0-3, 8-11, 16-19, 24-27, 4-7, 12-15, 20-23, 28-31; this puts them
        // back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut s32 = src[..n].chunks_exact(QUANT_STEP);
        let mut o32 = out[..W * n].chunks_exact_mut(W * QUANT_STEP);
        for (x, o) in (&mut s32).zip(&mut o32) {
            // Always taken: `chunks_exact` hands out slices of exactly these lengths.
            let Ok(x) = <&[f32; QUANT_STEP]>::try_from(x) else {
                continue;
            };
            let x: &[[f32; 8]; 4] = bytemuck::cast_ref(x);
            // SAFETY: this function is compiled with the same features.
            let v: [__m256i; 4] = std::array::from_fn(|k| unsafe { q8(&x[k], sv, lo, hi) });
            // Within each 128-bit half: four i32 of one register, then four of the next.
            let ab = _mm256_packs_epi32(v[0], v[1]);
            let cd = _mm256_packs_epi32(v[2], v[3]);
            if W == 1 {
                let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
                o.copy_from_slice(&bytemuck::cast::<_, [u8; 32]>(bytes));
            } else {
                let ab = _mm256_permute4x64_epi64::<0b11_01_10_00>(ab);
                let cd = _mm256_permute4x64_epi64::<0b11_01_10_00>(cd);
                o[..32].copy_from_slice(&bytemuck::cast::<_, [u8; 32]>(ab));
                o[32..].copy_from_slice(&bytemuck::cast::<_, [u8; 32]>(cd));
            }
        }
        // The tail (fewer than 32 elements, in the last block only) through the loop.
        let (s_tail, o_tail) = (s32.remainder(), o32.into_remainder());
        if !s_tail.is_empty() {
            quantize_loop(s_tail, s, lim, None, o_tail, W);
        }
    }

    /// Eight f32 to eight f16, round to nearest even (NaN stays NaN, quieted).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn narrow(src: [f32; F16_STEP]) -> [u8; 2 * F16_STEP] {
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(bytemuck::cast::<_, __m256>(src));
        bytemuck::cast(h)
    }

    /// [`super::to_f16`] on a CPU with F16C.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn to_f16(src: &[f32], out: &mut [u8]) {
        // SAFETY: this function is compiled with the same features .
        from_wide!(src, out, 2, |_, s, o| unsafe { to_f16_block(s, o) });
    }

    /// [`to_f16`] on one block.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn to_f16_block(src: &[f32], out: &mut [u8]) {
        let n = src.len().min(out.len() / 2);
        let mut s8 = src[..n].chunks_exact(F16_STEP);
        let mut o8 = out[..2 * n].chunks_exact_mut(2 * F16_STEP);
        for (s, o) in (&mut s8).zip(&mut o8) {
            // Always taken: `chunks_exact` hands out slices of exactly these lengths.
            if let (Ok(s), Ok(o)) = (s.try_into(), <&mut [u8; 2 * F16_STEP]>::try_from(o)) {
                // SAFETY: this function is compiled with the same features.
                *o = unsafe { narrow(s) };
            }
        }
        // The tail (fewer than 8 elements) through the same instruction, padded.
        let (s_tail, o_tail) = (s8.remainder(), o8.into_remainder());
        if !s_tail.is_empty() {
            let mut s = [0f32; F16_STEP];
            s[..s_tail.len()].copy_from_slice(s_tail);
            // SAFETY: as above.
            let h = unsafe { narrow(s) };
            o_tail.copy_from_slice(&h[..o_tail.len()]);
        }
    }

    /// One step: 8 halves widened to f32 and stored into (or added to) 8 lanes.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn step<const ADD: bool>(acc: &mut [u32; F16_STEP], src: [u8; 2 * F16_STEP]) {
        let x = _mm256_cvtph_ps(bytemuck::cast::<_, __m128i>(src));
        let x = if ADD {
            _mm256_add_ps(bytemuck::cast::<_, __m256>(*acc), x)
        } else {
            x
        };
        *acc = bytemuck::cast(x);
    }

    /// [`super::f16_lanes`] on a CPU with F16C.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn f16_lanes<const ADD: bool>(acc: &mut [u32], src: &[u8]) {
        // SAFETY: this function is compiled with the same features .
        into_wide!(src, 2, acc, |s, a| unsafe { f16_lanes_block::<ADD>(a, s) });
    }

    /// [`f16_lanes`] on one block.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn f16_lanes_block<const ADD: bool>(acc: &mut [u32], src: &[u8]) {
        let n = acc.len().min(src.len() / 2);
        let mut a8 = acc[..n].chunks_exact_mut(F16_STEP);
        let mut s8 = src[..2 * n].chunks_exact(2 * F16_STEP);
        for (a, s) in (&mut a8).zip(&mut s8) {
            // Always taken: `chunks_exact` hands out slices of exactly these lengths.
            if let (Ok(a), Ok(s)) = (<&mut [u32; F16_STEP]>::try_from(a), s.try_into()) {
                // SAFETY: this function is compiled with the same features.
                unsafe { step::<ADD>(a, s) };
            }
        }
        // The tail (fewer than 8 elements) through the same instructions, padded.
        let (a_tail, s_tail) = (a8.into_remainder(), s8.remainder());
        if !a_tail.is_empty() {
            let mut a = [0u32; F16_STEP];
            let mut s = [0u8; 2 * F16_STEP];
            a[..a_tail.len()].copy_from_slice(a_tail);
            s[..s_tail.len()].copy_from_slice(s_tail);
            // SAFETY: as above.
            unsafe { step::<ADD>(&mut a, s) };
            a_tail.copy_from_slice(&a[..a_tail.len()]);
        }
    }
}
