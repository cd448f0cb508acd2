//! Block-scaled fixed point (SwitchML's scheme), in two ways of making room for the
//! sum of `N` ranks.
//!
//! Every rank multiplies its chunk by the same power of two, `2^shift` with
//! `shift = p - (e_max + 1)`, where `e_max` is the largest block exponent over all
//! ranks (so every `|x| < 2^(e_max + 1)`): each scaled value lies strictly inside
//! `±2^p`; it is rounded (to nearest, ties to even; or stochastically) and clamped to
//! `±(2^p - 1)`. Integer sums do not depend on the order in which contributions
//! arrive, so every rank gets bit-identical results.
//!
//! - [`Room::Headroom`] (`i32`): `p = bits - 1 - ceil(log2 N)`. The sum of `N` values
//!   fits the wire width as it is. Each value loses `ceil(log2 N)` bits: cheap at 32.
//! - [`Room::Widen`] (`i16`, `i8`): `p = bits - 1`, full width on the wire; the
//!   aggregator sums in 32-bit lanes (no overflow below 2^(31 - p) ranks; `i8` up to
//!   256 ranks in 16-bit lanes, which hold those sums exactly), then shifts the sum
//!   right by `ceil(log2 N)` bits, rounding once, to send it back at the same width.
//!   Same bytes on the wire as headroom, but one rounding of the sum instead of `N`
//!   coarser ones: measured in the conformance tests, the error at N = 8 is several
//!   times smaller (`widening_beats_headroom`).
//!
//! Error of a sum: each contribution is off by at most half a step when rounded to
//! nearest, except within a step of the top of the range, where the clamp to
//! `2^p - 1` costs up to a whole step; stochastic rounding, up to a step, unbiased.
//! So at most `N * 2^-shift` for headroom, plus `2^(ceil(log2 N) - shift) / 2` for
//! the final rounding when widening.

use super::stream::{self, Wire};
use super::{kernels, Codec, CodecId, Scale};
use crate::wire::NO_EXPONENT;

/// How a fixed-point codec makes room for the sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Contributions give up `ceil(log2 N)` bits.
    Headroom,
    /// The aggregator sums wider and rescales the result.
    Widen,
}

/// A block-scaled fixed-point codec.
#[derive(Debug, Clone, Copy)]
pub struct Fixed {
    id: CodecId,
    name: &'static str,
    bits: u32,
    room: Room,
}

/// 32-bit block-scaled fixed point, with headroom.
pub const I32: Fixed = Fixed {
    id: CodecId::I32,
    name: "i32",
    bits: 32,
    room: Room::Headroom,
};

/// 16-bit block-scaled fixed point, widened in the aggregator.
pub const I16: Fixed = Fixed {
    id: CodecId::I16,
    name: "i16",
    bits: 16,
    room: Room::Widen,
};

/// 8-bit block-scaled fixed point, widened in the aggregator.
pub const I8: Fixed = Fixed {
    id: CodecId::I8,
    name: "i8",
    bits: 8,
    room: Room::Widen,
};

/// `ceil(log2 n)` for `n >= 1`.
pub(crate) fn ceil_log2(n: u16) -> u32 {
    u32::from(n.max(1)).next_power_of_two().trailing_zeros()
}

/// The `i16` lanes of a slot, one per element, in the front half of its `u32` words
/// (the slot keeps its size, whatever the lanes).
fn narrow_mut(acc: &mut [u32]) -> &mut [i16] {
    let n = acc.len();
    &mut bytemuck::cast_slice_mut(acc)[..n]
}

/// `2^e` as an `f32`, for `e` in `-149..=127`.
fn pow2(e: i32) -> f32 {
    if e >= -126 {
        // Normal range: build the float from its exponent field.
        f32::from_bits(((e.min(127) + 127) as u32) << 23)
    } else {
        // Subnormal: exact as well.
        (2.0f64).powi(e) as f32
    }
}

impl Fixed {
    /// A codec of `bits` bits (8, 16 or 32) with the given way of making room; for
    /// comparisons (the registered codecs are `I32`, `I16` and `I8`).
    pub const fn new(id: CodecId, name: &'static str, bits: u32, room: Room) -> Self {
        Self {
            id,
            name,
            bits,
            room,
        }
    }

    /// Bits of magnitude each contribution may use.
    pub fn precision(&self, world: u16) -> i32 {
        match self.room {
            Room::Headroom => self.bits as i32 - 1 - ceil_log2(world) as i32,
            Room::Widen => self.bits as i32 - 1,
        }
    }

    /// Whether the aggregator sums `world` contributions in `i16` lanes rather than
    /// `i32`: for 8-bit codecs while any `world` payloads, honest or not, sum to at
    /// most `world * 128 <= 2^15` in magnitude, so that the sums are exact and the same
    /// as in 32-bit lanes. Half the accumulator traffic of 32-bit lanes.
    fn narrow_lanes(&self, world: u16) -> bool {
        self.bits == 8 && u32::from(world) << (self.bits - 1) <= 1 << 15
    }

    /// The largest magnitude a quantized value may take, as an `f32` that is exactly an
    /// integer no larger than `2^p - 1`.
    fn limit(p: i32) -> f32 {
        if p <= 24 {
            ((1u32 << p) - 1) as f32
        } else {
            // 2^p - 1 is not representable; the next float below 2^p is.
            f32::from_bits(pow2(p).to_bits() - 1)
        }
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
        // Headroom keeps at least 8 bits of magnitude per contribution; widening needs
        // N * 2^(bits-1) to fit the 32-bit lanes.
        let spare = match self.room {
            Room::Headroom => self.bits - 1 - 8,
            Room::Widen => 32 - self.bits,
        };
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
            dither: None,
        }
    }
    fn result_scale(&self, world: u16, e_max: i8) -> Scale {
        let s = self.scale(world, e_max);
        match self.room {
            Room::Headroom => s,
            Room::Widen => Scale {
                shift: s.shift - ceil_log2(world) as i32,
                ..s
            },
        }
    }
    fn sum_error(&self, world: u16, e_max: i8, stochastic: bool) -> f64 {
        let step = 2f64.powi(-self.scale(world, e_max).shift);
        // Half a step when rounding to nearest, but the top of the range is clamped to
        // 2^p - 1, which costs up to a whole step there; stochastic rounding, a step.
        let _ = stochastic;
        let per = step;
        let h = ceil_log2(world) as i32;
        let last = match self.room {
            Room::Widen if h > 0 => step * 2f64.powi(h) / 2.0,
            _ => 0.0,
        };
        f64::from(world) * per + last
    }
    fn encode(&self, src: &[f32], scale: Scale, out: &mut [u8]) {
        let s = pow2(scale.shift);
        // Rounding may lift a value just below 2^p to 2^p itself: the clamp is what
        // makes the headroom argument hold.
        let lim = Self::limit(scale.precision.clamp(1, self.bits as i32 - 1));
        kernels::quantize(src, s, lim, scale.dither, out, self.wire_bytes())
    }
    fn decode(&self, src: &[u8], scale: Scale, out: &mut [f32]) {
        kernels::dequantize(src, pow2(-scale.shift), out, self.wire_bytes())
    }
    /// Around the cache for i8 only: four ranks of 16 Mi elements gained 1-6% in four
    /// rounds, where i16 was level to 4% slower and i32 1-3% slower (`stream`).
    fn decode_around_cache(&self, src: &[u8], scale: Scale, out: &mut [f32]) {
        if self.wire_bytes() != 1 {
            return self.decode(src, scale, out);
        }
        let wire = Wire::Int {
            width: 1,
            inv: pow2(-scale.shift),
        };
        stream::decode_around_cache(wire, src, out)
    }
    fn sum_first(&self, acc: &mut [u32], world: u16, payload: &[u8]) {
        if self.narrow_lanes(world) {
            kernels::load_i8_i16(narrow_mut(acc), payload)
        } else {
            kernels::load_int(acc, payload, self.wire_bytes())
        }
    }
    fn sum_add(&self, acc: &mut [u32], world: u16, payload: &[u8]) {
        if self.narrow_lanes(world) {
            kernels::add_i8_i16(narrow_mut(acc), payload)
        } else {
            kernels::add_int(acc, payload, self.wire_bytes())
        }
    }
    fn result_is_lanes(&self) -> bool {
        // The one store that is a plain copy (see `sum_store`).
        self.room == Room::Headroom && self.bits == 32 && cfg!(target_endian = "little")
    }
    fn sum_store(&self, acc: &[u32], world: u16, out: &mut [u8]) {
        let shift = match self.room {
            Room::Headroom if self.bits == 32 => return kernels::store_lanes(acc, out),
            Room::Headroom => 0,
            Room::Widen => ceil_log2(world),
        };
        let lim = (1i32 << (self.bits - 1)) - 1;
        if self.narrow_lanes(world) {
            let lanes: &[i16] = bytemuck::cast_slice(acc);
            kernels::store_i16_i8(&lanes[..acc.len()], shift, lim, out)
        } else {
            kernels::store_int(acc, shift, lim, out, self.wire_bytes())
        }
    }
}
