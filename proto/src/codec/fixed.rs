//! Block-scaled fixed point (SwitchML's scheme).
//!
//! Every rank multiplies its chunk by the same power of two, `2^shift` with
//! `shift = p - (e_max + 1)` and `p = bits - 1 - ceil(log2 N)`, where `e_max` is the
//! largest block exponent over all ranks (so every `|x| < 2^(e_max + 1)`). Each quantized value then
//! lies strictly inside `±2^p`; it is rounded to nearest (ties to even) and clamped to
//! `±(2^p - 1)`, so the sum of `N <= 2^ceil(log2 N)` of them stays inside
//! `±(2^(bits-1) - 1)`: the integer sum can never overflow, and it does not depend on
//! the order in which contributions arrive. Every rank gets bit-identical results.
//!
//! The error of one value is at most half a step, `2^(e_max - p)`; the sum of `N`
//! carries at most `N` of those, plus the final conversion to `f32` (relative `2^-24`).

use super::{lane4, Codec, CodecId, Scale};
use crate::wire::NO_EXPONENT;

/// A block-scaled fixed-point codec of `bits` bits per element.
#[derive(Debug, Clone, Copy)]
pub struct Fixed {
    id: CodecId,
    name: &'static str,
    bits: u32,
}

/// 32-bit block-scaled fixed point.
pub const I32: Fixed = Fixed {
    id: CodecId::I32,
    name: "i32",
    bits: 32,
};

/// `ceil(log2 n)` for `n >= 1`.
pub(crate) fn ceil_log2(n: u16) -> u32 {
    u32::from(n.max(1)).next_power_of_two().trailing_zeros()
}

/// `2^e` as an `f32`, for `e` in `-149..=127`.
fn pow2(e: i32) -> f32 {
    if e >= -126 {
        // Normal range: build the float from its exponent field.
        f32::from_bits(((e + 127) as u32) << 23)
    } else {
        // Subnormal: exact as well.
        (2.0f64).powi(e) as f32
    }
}

impl Fixed {
    /// Bits of magnitude each contribution may use: `bits - 1 - ceil(log2 world)`.
    pub fn precision(&self, world: u16) -> i32 {
        self.bits as i32 - 1 - ceil_log2(world) as i32
    }

    /// The largest magnitude a quantized value may take, as an `f32` that is exactly
    /// an integer no larger than `2^p - 1`.
    fn limit(p: i32) -> f32 {
        if p <= 24 {
            ((1u32 << p) - 1) as f32
        } else {
            // 2^p - 1 is not representable; the next float below 2^p is 2^p - 2^(p-24).
            f32::from_bits(pow2(p).to_bits() - 1)
        }
    }
}

/// Rounds to nearest, ties to even, for any finite `y`: adding and subtracting
/// `1.5 * 2^23` rounds values below `2^22` in magnitude; larger ones are integers.
#[inline(always)]
fn round_even(y: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    if y.abs() < 4_194_304.0 {
        (y + MAGIC) - MAGIC
    } else {
        y
    }
}

impl Codec for Fixed {
    fn id(&self) -> CodecId {
        self.id
    }
    fn name(&self) -> &'static str {
        self.name
    }
    fn wire_bytes(&self) -> usize {
        (self.bits / 8) as usize
    }
    fn block_scaled(&self) -> bool {
        true
    }
    fn max_world(&self) -> u16 {
        // Keep at least 8 bits of magnitude per contribution.
        let spare = self.bits - 1 - 8;
        if spare >= 16 {
            u16::MAX
        } else {
            1 << spare
        }
    }
    fn scale(&self, world: u16, e_max: i8) -> Scale {
        let p = self.precision(world);
        // The bound on magnitudes is 2^(e_max + 1). Keep 2^shift a normal float: tiny
        // blocks lose only bits below 2^-126.
        let e = if e_max == NO_EXPONENT {
            p - 126
        } else {
            (i32::from(e_max) + 1).max(p - 126)
        };
        Scale {
            shift: p - e,
            precision: p,
        }
    }
    fn step_error(&self, scale: Scale) -> Option<f64> {
        Some(0.5 * 2f64.powi(-scale.shift))
    }
    fn encode(&self, src: &[f32], scale: Scale, out: &mut [u8]) {
        let s = pow2(scale.shift);
        // Rounding may lift a value just below 2^p to 2^p itself: the clamp is what
        // makes the headroom argument hold.
        let lim = Self::limit(scale.precision.clamp(1, self.bits as i32 - 1));
        for (x, o) in src.iter().zip(out.chunks_exact_mut(4)) {
            let q = round_even(x * s).clamp(-lim, lim) as i32;
            o.copy_from_slice(&q.to_le_bytes());
        }
    }
    fn decode(&self, src: &[u8], scale: Scale, out: &mut [f32]) {
        let inv = pow2(-scale.shift);
        for (c, o) in src.chunks_exact(4).zip(out.iter_mut()) {
            *o = i32::from_le_bytes(lane4(c)) as f32 * inv;
        }
    }
    fn sum_first(&self, acc: &mut [u32], payload: &[u8]) {
        for (c, a) in payload.chunks_exact(4).zip(acc.iter_mut()) {
            *a = u32::from_le_bytes(lane4(c));
        }
    }
    fn sum_add(&self, acc: &mut [u32], payload: &[u8]) {
        for (c, a) in payload.chunks_exact(4).zip(acc.iter_mut()) {
            *a = a.wrapping_add(u32::from_le_bytes(lane4(c)));
        }
    }
    fn sum_store(&self, acc: &[u32], out: &mut [u8]) {
        for (a, o) in acc.iter().zip(out.chunks_exact_mut(4)) {
            o.copy_from_slice(&a.to_le_bytes());
        }
    }
}
