//! Block-scaled fixed point (SwitchML's scheme), in two ways of making room for the
//! sum of `N` ranks, and, for `i8`, with each rank's own exponent.
//!
//! A contribution at block exponent `e` multiplies its chunk by `2^shift` with
//! `shift = p - (e + 1)`, so that every scaled value of a block whose values all lie
//! below `2^(e + 1)` lies strictly inside `±2^p`; it is rounded (to nearest, ties to
//! even; or stochastically) and clamped to `±(2^p - 1)`.
//!
//! - [`Room::Headroom`] (`i32`): `p = bits - 1 - ceil(log2 N)`. The sum of `N` values
//!   fits the wire width as it is. Each value loses `ceil(log2 N)` bits: cheap at 32.
//! - [`Room::Widen`] (`i16`, `i8`): `p = bits - 1`, full width on the wire; the
//!   aggregator sums in 32-bit lanes (no overflow below 2^(31 - p) ranks; `i8` in
//!   16-bit lanes where they hold the sums exactly), then shifts the sum right by
//!   `ceil(log2 N)` bits, rounding once, to send it back at the same width. Same bytes
//!   on the wire as headroom, but one rounding of the sum instead of `N` coarser
//!   ones: measured in the conformance tests, the error at N = 8 is several times
//!   smaller (`widening_beats_headroom`).
//!
//! Which exponent:
//! - `i32` and `i16` share one: `e` is the largest block exponent of the chunk over all
//!   ranks, which the exponent lookahead brings a window ahead (`worker::allreduce`).
//!   Every rank so reads its tensor twice, a window apart: for the lookahead and to
//!   quantize.
//! - `i8` aligns them in the aggregator ([`Codec::aligns_exponents`]): each rank
//!   quantizes at its own chunk's exponent, read just before, while the chunk is in
//!   cache, and its packet says which. The aggregator shifts each contribution left
//!   into lanes that count units of the smallest exponent's scale, exactly, as long as
//!   the exponents lie within `31 - p - ceil(log2 N)` binades of the largest (16 or
//!   more up to 256 ranks; within `15 - p - ceil(log2 N)` the sum stays in 16-bit
//!   lanes), and rounds the sum once to the largest exponent's scale, widened by
//!   `ceil(log2 N)` bits. A switch cannot shift each packet by its own amount, hence
//!   SwitchML's shared exponent; a software aggregator can, and that saves the
//!   worker's second read of the tensor, which on a host with few cores is a large
//!   part of an allreduce's time (docs/performance.md, "Aligning exponents in the
//!   aggregator"). It is also more precise: a rank whose values are small keeps its own
//!   bits (`aligning_exponents_beats_sharing_one_where_ranks_differ`). `i16`'s 32-bit
//!   lanes have no such spare bits at large worlds, and `i32`'s none at all.
//!
//! Integer sums do not depend on the order in which contributions arrive, so a job's
//! results repeat bit for bit; for `i8` that holds while a chunk's exponents lie within
//! the span above (maxima within a factor of 2^16 up to 256 ranks). Beyond it, the
//! lanes or the smaller contribution are rounded (half up) on arrival, at most
//! `2^-span` of a step each, which may depend on the order. Every rank gets the same
//! result either way: the aggregator sends one.
//!
//! Error of a sum: each contribution is off by at most half a step of its scale when
//! rounded to nearest, except within a step of the top of the range, where the clamp
//! to `2^p - 1` costs up to a whole step there; stochastic rounding, up to a step,
//! unbiased. So at most `N * 2^-shift` at the shared (largest) exponent for headroom,
//! plus `2^(ceil(log2 N) - shift) / 2` for the final rounding when widening.

use super::stream::{self, Wire};
use super::NO_EXPONENT;
use super::{kernels, AggregatorCodec, Alignment, Codec, CodecId, Scale, WorkerCodec};

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
    /// Each rank quantizes at its own block exponent; the aggregator aligns them.
    aligned: bool,
}

/// 32-bit block-scaled fixed point, with headroom.
pub const I32: Fixed = Fixed {
    id: CodecId::I32,
    name: "i32",
    bits: 32,
    room: Room::Headroom,
    aligned: false,
};

/// 16-bit block-scaled fixed point, widened in the aggregator.
pub const I16: Fixed = Fixed {
    id: CodecId::I16,
    name: "i16",
    bits: 16,
    room: Room::Widen,
    aligned: false,
};

/// 8-bit block-scaled fixed point, widened in the aggregator.
pub const I8: Fixed = Fixed {
    id: CodecId::I8,
    name: "i8",
    bits: 8,
    room: Room::Widen,
    aligned: true,
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
            aligned: false,
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

    /// How far below the largest block exponent of a chunk the lanes of an aligned sum
    /// may count, in binades: `31 - p - ceil(log2 N)`, so that `N` contributions of
    /// `p` bits, each shifted left by at most that much, fit the 32-bit lanes (24 for
    /// one `i8` rank, 16 at 256, 8 at the 65,535 the codec allows).
    fn align_span(&self, world: u16) -> i32 {
        31 - self.precision(world) - ceil_log2(world) as i32
    }

    /// How far below the largest block exponent of a chunk the 16-bit lanes of an
    /// aligned `i8` sum may count ([`Fixed::narrow_lanes`]): `15 - p - ceil(log2 N)`.
    fn narrow_span(&self, world: u16) -> i32 {
        15 - self.precision(world) - ceil_log2(world) as i32
    }

    /// The exponent whose scale a contribution at block exponent `e` was quantized
    /// with: what [`Codec::scale`] makes of tiny blocks (in `-120..=127` for `i8`).
    fn scale_exponent(&self, world: u16, e: i8) -> i8 {
        // `p - 127` is above `i8::MIN` for every width and world.
        i32::from(e).max(self.precision(world) - 127) as i8
    }

    /// The largest magnitude of a stored sum: the width's `2^(bits-1) - 1`.
    fn store_limit(&self) -> i32 {
        (1i32 << (self.bits - 1)) - 1
    }

    /// How far an aligned sum's lanes, counting units of `at.unit`, are shifted down to
    /// the result's scale: that of `at.top` widened by `ceil(log2 N)` bits.
    fn result_shift(world: u16, at: Alignment) -> u32 {
        let spread = (i32::from(at.top) - i32::from(at.unit)).clamp(0, 31) as u32;
        (spread + ceil_log2(world)).min(31)
    }

    /// Writes lanes (32-bit if `wide`, else `i8`'s 16-bit ones) at the wire width, each
    /// divided by `2^shift`, rounded half up, clamped to the width's `±(2^(bits-1) - 1)`.
    fn store_shifted(&self, acc: &[u32], wide: bool, shift: u32, out: &mut [u8]) {
        let lim = self.store_limit();
        if wide {
            kernels::store_int(acc, shift, lim, out, self.wire_bytes())
        } else {
            let lanes: &[i16] = bytemuck::cast_slice(acc);
            kernels::store_i16_i8(&lanes[..acc.len()], shift, lim, out)
        }
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
        // An aligned sum whose exponents spread wider than its lanes rounds the
        // smaller contributions, or its lanes, to a unit at most 2^-span of a step, at
        // most once per contribution.
        let spread = if self.aligned {
            f64::from(world) * step * 2f64.powi(-self.align_span(world))
        } else {
            0.0
        };
        f64::from(world) * per + last + spread
    }

    fn aligns_exponents(&self) -> bool {
        self.aligned
    }
}

impl WorkerCodec for Fixed {
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

    /// Around the cache for i8 only: streaming i8 results made allreduces faster, where
    /// i16 and i32, whose results are wider, gained nothing or lost (`stream`;
    /// docs/performance.md, "Decoding around the cache").
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
}

impl AggregatorCodec for Fixed {
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
        self.store_shifted(acc, !self.narrow_lanes(world), shift, out)
    }

    /// Aligned: the lanes count units of the scale of exponent `unit`, at most
    /// `Fixed::align_span` below `top`, and as low as the smallest contribution's
    /// exponent allows. While a chunk's exponents lie within the span, every
    /// contribution is shifted left into the lanes, exactly, and the sum does not
    /// depend on the order of arrival; only a wider spread rounds (half up) the lanes
    /// or the small contribution.
    fn sum_at(&self, acc: &mut [u32], world: u16, at: &mut Alignment, e: i8, payload: &[u8]) {
        if !self.aligned {
            return super::sum_in_turn(self, acc, world, at, payload);
        }
        // An all-zero block (no exponent) adds nothing, and aligns nothing: an honest
        // one's payload is zeros (a dishonest one's is ignored), and taking its
        // exponent as the least one would push every other rank's past the lanes' span.
        // Lanes of zero blocks alone keep no exponent, until a block with one comes.
        let e = (e != NO_EXPONENT).then(|| self.scale_exponent(world, e));
        if at.first {
            let wide = !self.narrow_lanes(world);
            match e {
                None => acc.fill(0),
                Some(_) if wide => kernels::load_int(acc, payload, self.wire_bytes()),
                Some(_) => kernels::load_i8_i16(narrow_mut(acc), payload),
            }
            let e = e.unwrap_or(NO_EXPONENT);
            *at = Alignment {
                first: false,
                unit: e,
                top: e,
                wide,
            };
            return;
        }
        let Some(e) = e else { return };
        if at.top == NO_EXPONENT {
            // Zero lanes: this block's exponent is theirs.
            at.unit = e;
            at.top = e;
        }
        let e = i32::from(e);
        let (unit, top) = (i32::from(at.unit), i32::from(at.top));
        let new_top = top.max(e);
        if !at.wide {
            // 16-bit lanes hold the exact sum while the exponents lie within their
            // span (at most 8 binades; 6 at four ranks): the usual case, at half the
            // accumulator traffic.
            let low = unit.min(e);
            if new_top - low <= self.narrow_span(world) {
                let lanes = narrow_mut(acc);
                if low < unit {
                    kernels::shl_i16_lanes(lanes, (unit - low) as u32);
                }
                kernels::add_i8_i16_shl(lanes, payload, (e - low) as u32);
                at.unit = low as i8;
                at.top = new_top as i8;
                return;
            }
            kernels::widen_i16_lanes(acc);
            at.wide = true;
        }
        self.add_wide(acc, world, at, (e, new_top), payload, self.wire_bytes());
    }

    fn sums_all_at_once(&self, world: u16) -> bool {
        self.aligned && self.narrow_lanes(world) && usize::from(world) <= super::MAX_AT_ONCE
    }

    /// Aligned `i8` in 16-bit lanes: every contribution with an exponent, shifted left
    /// by its distance from the least one, summed, and stored at the largest, all in
    /// one pass (`kernels::sum_store_i8`). While the exponents lie within the narrow
    /// lanes' span, [`Fixed::sum_at`] sums exactly that, whatever the order: its lanes
    /// end up counting units of the least exponent, at the largest; every step on the
    /// way spans no more than the whole.
    fn sum_store_all(
        &self,
        world: u16,
        exps: &[i8],
        payloads: &[&[u8]],
        out: &mut [u8],
    ) -> Option<Alignment> {
        if !self.sums_all_at_once(world) || exps.len() > super::MAX_AT_ONCE {
            return None;
        }
        let mut srcs: [&[u8]; super::MAX_AT_ONCE] = [&[]; super::MAX_AT_ONCE];
        let mut scaled = [0i32; super::MAX_AT_ONCE];
        let mut k = 0;
        // Blocks without an exponent add nothing (see `sum_at`).
        for (&e, &p) in exps.iter().zip(payloads) {
            if e != NO_EXPONENT {
                srcs[k] = p;
                scaled[k] = i32::from(self.scale_exponent(world, e));
                k += 1;
            }
        }
        let (Some(&low), Some(&top)) = (scaled[..k].iter().min(), scaled[..k].iter().max()) else {
            out.fill(0);
            return Some(Alignment {
                first: false,
                unit: NO_EXPONENT,
                top: NO_EXPONENT,
                wide: false,
            });
        };
        if top - low > self.narrow_span(world) {
            return None;
        }
        let shl = scaled.map(|e| (e - low).max(0) as u32);
        let at = Alignment {
            first: false,
            unit: low as i8,
            top: top as i8,
            wide: false,
        };
        let shift = Self::result_shift(world, at);
        kernels::sum_store_i8(&srcs[..k], &shl[..k], shift, self.store_limit(), out);
        Some(at)
    }

    /// Aligned: the lanes divided down to the result's scale, that of exponent `top`
    /// widened by `ceil(log2 N)` bits, rounded once (half up).
    fn store_at(&self, acc: &[u32], world: u16, at: Alignment, out: &mut [u8]) {
        if !self.aligned {
            return self.sum_store(acc, world, out);
        }
        self.store_shifted(acc, at.wide, Self::result_shift(world, at), out)
    }

    fn store_partial(&self, acc: &[u32], world: u16, at: Alignment, out: &mut [u8]) {
        let narrow = if self.aligned {
            !at.wide
        } else {
            self.narrow_lanes(world)
        };
        if narrow {
            let lanes: &[i16] = bytemuck::cast_slice(acc);
            for (o, &x) in out.chunks_exact_mut(4).zip(&lanes[..acc.len()]) {
                o.copy_from_slice(&i32::from(x).to_le_bytes());
            }
        } else {
            kernels::store_lanes(acc, out)
        }
    }

    /// Wrapping i32 sums for the shared-exponent codecs; aligned, the partial sum
    /// counting units of `p.unit` is shifted into the lanes as
    /// [`Fixed::sum_at`] shifts a contribution (exactly while the exponents lie within
    /// the span), and the largest exponent is the larger of both.
    fn add_partial(
        &self,
        acc: &mut [u32],
        world: u16,
        at: &mut Alignment,
        p: Alignment,
        payload: &[u8],
    ) {
        let w = super::PARTIAL_LANE_BYTES;
        if !self.aligned {
            if std::mem::replace(&mut at.first, false) {
                kernels::load_int(acc, payload, w)
            } else {
                kernels::add_int(acc, payload, w)
            }
            return;
        }
        if at.first {
            // A partial of zero blocks alone has no exponent and zero lanes.
            kernels::load_int(acc, payload, w);
            *at = Alignment {
                first: false,
                wide: true,
                ..p
            };
            return;
        }
        if p.top == NO_EXPONENT || p.unit == NO_EXPONENT {
            return;
        }
        if !at.wide {
            kernels::widen_i16_lanes(acc);
            at.wide = true;
        }
        if at.top == NO_EXPONENT {
            // Zero lanes: this partial's exponents are theirs.
            at.unit = p.unit;
            at.top = p.top;
        }
        let new_top = i32::from(at.top).max(i32::from(p.top));
        self.add_wide(acc, world, at, (i32::from(p.unit), new_top), payload, w);
    }
}

impl Fixed {
    /// Adds integers of `width` bytes counting units of exponent `e` to wide lanes
    /// aligned as `at` says, the largest exponent becoming `new_top`: the lanes move to
    /// the lower unit (within the span below `new_top`), and what comes is shifted
    /// in, exactly while it lies within the span, rounded (half up) below it.
    fn add_wide(
        &self,
        acc: &mut [u32],
        world: u16,
        at: &mut Alignment,
        (e, new_top): (i32, i32),
        payload: &[u8],
        width: usize,
    ) {
        let unit = i32::from(at.unit);
        let new_unit = unit.min(e).max(new_top - self.align_span(world));
        // Every shift below is at most the span (under 32): the unit stays within it
        // of the top, and no exponent lies above the top.
        if new_unit < unit {
            kernels::shl_lanes(acc, (unit - new_unit) as u32);
        } else if new_unit > unit {
            kernels::round_shr_lanes(acc, (new_unit - unit) as u32);
        }
        if e >= new_unit {
            kernels::add_int_shl(acc, payload, width, (e - new_unit) as u32);
        } else {
            kernels::add_int_round_shr(acc, payload, width, (new_unit - e) as u32);
        }
        at.unit = new_unit as i8;
        at.top = new_top as i8;
    }
}
