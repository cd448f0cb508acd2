//! f16 and bf16: rounding f32 to them (to nearest even or stochastically) and
//! widening them into f32 lanes.

use super::*;
use crate::uniform;
use half::f16;

/// One f32 to bf16 bits after adding `add` below the cut (NaN stays NaN, quieted).
/// The choice is made on the 32-bit value, before the one narrowing shift, so that the
/// vector loop blends once and packs once.
#[inline(always)]
pub(super) fn bf16_bits(x: f32, add: u32) -> u16 {
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
pub(super) const F16_STEP: usize = 8;

/// f32 lanes: `acc = f16(src)`, or `acc += f16(src)` with `ADD`; the payload at any
/// alignment.
pub(super) fn f16_lanes<const ADD: bool>(acc: &mut [u32], src: &[u8]) {
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
/// function per eight elements, a large share of an f16 run's profile
/// (docs/performance.md, "Encode and decode kernels").
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
