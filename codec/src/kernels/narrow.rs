//! The i8 codec's narrow lanes: i16 sums of i8 contributions, widened when they
//! would overflow, and the one-pass sum and store of several contributions.

use super::*;

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
pub(super) const SUM_BLOCK: usize = 256;

/// Asks the CPU to fetch into L1 the `len` bytes at `at + AHEAD` of `src`, one
/// line at a time: a hint, like [`prefetch_block`], for a narrow side.
#[inline(always)]
pub(super) fn prefetch_bytes(src: &[u8], at: usize, len: usize) {
    prefetch_lines(src.as_ptr().wrapping_add(at + AHEAD).cast(), len);
}

/// Several contributions of i8 integers, the `k`-th times `2^shl[k]` (below 16),
/// summed in 16-bit lanes (wrapping) and written as [`store_i16_i8`] writes lanes:
/// divided by `2^shift` (at most 15), rounded half up, clamped to `±lim` (at most
/// 127). One pass, where [`add_i8_i16_shl`] reads and writes a slot's lanes once per
/// contribution. Writes the first `n` elements of `out`, `n` the shortest of `out`
/// and `srcs` (at most [`crate::MAX_AT_ONCE`] of them are summed).
///
/// With AVX2, all of the contributions' sums for 32 elements stay in registers
/// ([`x86::sum_store_i8`]): LLVM kept the portable loop's 16-bit sums on the stack
/// and clamped with blends, and the aggregator spent as long in it as in the lanes'
/// loops it replaced.
pub(crate) fn sum_store_i8(srcs: &[&[u8]], shl: &[u32], shift: u32, lim: i32, out: &mut [u8]) {
    let m = srcs.len().min(shl.len()).min(crate::MAX_AT_ONCE);
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
