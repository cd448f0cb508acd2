//! The wide side of the aggregator's sums and the scans before encoding: block
//! maxima, f32 lanes, and i32 lanes added, shifted, rounded and stored.

use super::*;

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
pub(super) fn int_block<const ADD: bool>(acc: &mut [u32], src: &[u8], w: usize, shl: u32) {
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
pub(super) fn round_shr(x: i64, shr: u32) -> i64 {
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
