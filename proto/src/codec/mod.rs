//! Codecs: how a chunk of `f32` gradients becomes wire bytes, how the aggregator sums
//! those bytes, and how a worker turns the sum back into `f32`.
//!
//! The protocol only ever sees `&'static dyn Codec` from [`lookup`]: adding a codec
//! means one new implementation and one line in [`ALL`], nothing in the protocol.
//!
//! The aggregator sums into lanes held in one `u32` per element (an `f32` or an `i32`,
//! as the codec decides; `i8` sums of at most 256 ranks use `i16` lanes in the front
//! half of the same words, half the memory traffic) and writes the finished sum back
//! at the contribution's width.
//!
//! | codec | wire bytes | lanes | contribution | result |
//! |---|---|---|---|---|
//! | `f32` | 4 | f32 | exact | f32 sum (order-dependent rounding) |
//! | `f16` | 2 | f32 | rounded to f16 | f32 sum rounded to f16 |
//! | `bf16` | 2 | f32 | rounded to bf16 | f32 sum rounded to bf16 |
//! | `i32` | 4 | i32 | block-scaled, `ceil(log2 N)` bits of headroom | exact integer sum |
//! | `i16` | 2 | i32 | block-scaled at full width | integer sum, shifted right by `ceil(log2 N)` and rounded |
//! | `i8` | 1 | i16 up to N = 256, i32 above | block-scaled at full width | integer sum, shifted right by `ceil(log2 N)` and rounded |
//!
//! Block-scaled fixed point needs one shared scale per chunk: every rank sends the
//! exponent of its chunk ahead of time ([`block_exponent`]), the aggregator keeps the
//! maximum over ranks, and [`Codec::scale`] turns that maximum and the world size into
//! a [`Scale`].
//!
//! Non-finite values: `f32`, `f16` and `bf16` carry NaN and infinity through (f16
//! also overflows to infinity above 65504); block-scaled codecs cannot: a chunk that
//! holds one goes out clamped and flagged (`wire::FLAG_NONFINITE`), and the allreduce
//! ends in [`NonFinite`] on every rank while the job goes on. (Refusing before sending
//! anything, as inagg first did, cost a whole extra pass over the tensor before the
//! first packet and left the other ranks waiting until their progress timeout.)

mod fixed;
mod float;
mod half16;
mod kernels;
pub mod stream;

use std::fmt;

pub use fixed::{Fixed, Room};
pub use float::F32;
pub use half16::{Bf16, F16};

use crate::wire::NO_EXPONENT;

/// A codec's number on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CodecId(pub u8);

impl CodecId {
    /// Plain `f32`.
    pub const F32: CodecId = CodecId(1);
    /// Block-scaled 32-bit fixed point.
    pub const I32: CodecId = CodecId(2);
    /// IEEE half precision.
    pub const F16: CodecId = CodecId(3);
    /// bfloat16.
    pub const BF16: CodecId = CodecId(4);
    /// Block-scaled 16-bit fixed point.
    pub const I16: CodecId = CodecId(5);
    /// Block-scaled 8-bit fixed point.
    pub const I8: CodecId = CodecId(6);
}

/// The smallest block exponent: any subnormal block reports this one.
pub const MIN_EXPONENT: i8 = -127;
/// The largest block exponent (`f32::MAX < 2^128`).
pub const MAX_EXPONENT: i8 = 127;

/// How a worker quantizes a chunk: values are multiplied by `2^shift`, rounded, and
/// clamped; a result is multiplied by `2^-shift` of its own scale after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scale {
    /// The power of two applied before rounding (fixed point).
    pub shift: i32,
    /// Fixed point: quantized magnitudes are clamped to `2^precision - 1`, which is
    /// what keeps the sum of all ranks inside its lanes. Unused by float codecs.
    pub precision: i32,
    /// Stochastic rounding: the key of the packet's random stream (the same key gives
    /// the same bits, so a retransmission is identical). `None`: round to nearest.
    pub dither: Option<u64>,
}

/// A gradient encoding. Implementations are stateless and shared (`&'static`).
pub trait Codec: Send + Sync + fmt::Debug {
    /// The codec's number on the wire.
    fn id(&self) -> CodecId;
    /// The codec's name on the command line (`f32`, `i32`, ...).
    fn name(&self) -> &'static str;
    /// Bytes per element on the wire, for contributions and results alike.
    fn wire_bytes(&self) -> usize;
    /// Whether the codec is block-scaled fixed point: a block exponent per chunk,
    /// shared by the ranks through the exponent lookahead, or each rank's own where
    /// the codec aligns them ([`Codec::aligns_exponents`]).
    fn block_scaled(&self) -> bool;
    /// Whether encoding is a byte copy of the f32s (f32 on a little-endian host), so
    /// that a contribution can go to the kernel straight from the tensor.
    fn wire_is_native_f32(&self) -> bool {
        false
    }
    /// Whether a sum's wire form is its 32-bit lanes as they lie in memory (f32 and
    /// i32 on a little-endian host): the aggregator then sends results straight from
    /// the lanes and keeps no copy.
    fn result_is_lanes(&self) -> bool {
        false
    }
    /// The largest world size the codec supports (headroom for the sum).
    fn max_world(&self) -> u16 {
        u16::MAX
    }
    /// The scale of a contribution to a chunk whose largest exponent over all ranks is
    /// `e_max` ([`NO_EXPONENT`] for an all-zero chunk) in a job of `world` ranks.
    fn scale(&self, world: u16, e_max: i8) -> Scale {
        let _ = (world, e_max);
        Scale::default()
    }
    /// The scale to decode a result with (the aggregator may have rescaled the sum).
    fn result_scale(&self, world: u16, e_max: i8) -> Scale {
        self.scale(world, e_max)
    }
    /// Fixed point: the largest absolute quantization error of a sum of `world`
    /// contributions at this chunk's scale (round to nearest; stochastic rounding
    /// doubles the contributions' part). Float codecs: 0.
    fn sum_error(&self, world: u16, e_max: i8, stochastic: bool) -> f64 {
        let _ = (world, e_max, stochastic);
        0.0
    }
    /// Float codecs: the relative error of one rounding to the wire format (`2^-11`
    /// for f16). Fixed point and f32: 0.
    fn unit_roundoff(&self) -> f64 {
        0.0
    }
    /// Float codecs: half the spacing of the smallest values the wire format holds
    /// (the absolute error floor of its subnormals).
    fn underflow(&self) -> f64 {
        0.0
    }
    /// Quantizes `src` into `out`, which holds exactly `src.len() * wire_bytes()` bytes.
    fn encode(&self, src: &[f32], scale: Scale, out: &mut [u8]);
    /// Turns a payload back into values; `out.len() * wire_bytes() == src.len()`.
    fn decode(&self, src: &[u8], scale: Scale, out: &mut [f32]);
    /// [`Codec::decode`] into a tensor too large to stay in cache: the same values,
    /// written around the caches where the CPU can ([`stream`]), so that `out` is not
    /// read before it is written.
    fn decode_around_cache(&self, src: &[u8], scale: Scale, out: &mut [f32]) {
        self.decode(src, scale, out)
    }
    /// Aggregator: the first contribution to a slot initializes its lanes. `acc` holds
    /// one `u32` per element; `world` is the job's world size, the same in every call
    /// of one sum, from which the codec may choose narrower lanes that use only the
    /// front of `acc`.
    fn sum_first(&self, acc: &mut [u32], world: u16, payload: &[u8]);
    /// Aggregator: adds a contribution to the lanes. Never panics, never traps on
    /// overflow (hostile payloads wrap; honest ones have headroom).
    fn sum_add(&self, acc: &mut [u32], world: u16, payload: &[u8]);
    /// Aggregator: writes the finished sum of `world` contributions at the wire width.
    fn sum_store(&self, acc: &[u32], world: u16, out: &mut [u8]);
    /// Whether each rank quantizes a chunk at its own block exponent, which its packet
    /// carries as `scale_exp`, and the aggregator aligns the contributions
    /// ([`Codec::sum_at`]), instead of all ranks sharing one through the lookahead. A
    /// worker then reads each chunk once, while it is in cache, not once for the
    /// lookahead and again a window later (see the `fixed` module).
    fn aligns_exponents(&self) -> bool {
        false
    }
    /// Aggregator: adds a contribution quantized at block exponent `e` (the packet's
    /// `scale_exp`) to lanes whose exponents are `at` (the first contribution, with
    /// `first`, sets them). Codecs that do not align exponents ignore both and do
    /// [`Codec::sum_first`] or [`Codec::sum_add`].
    fn sum_at(&self, acc: &mut [u32], world: u16, at: &mut Alignment, e: i8, payload: &[u8]) {
        let _ = e;
        sum_in_turn(self, acc, world, at, payload)
    }
    /// Aggregator: [`Codec::sum_store`] for lanes summed by [`Codec::sum_at`]; the
    /// result's block exponent is `at.top` for codecs that align exponents.
    fn store_at(&self, acc: &[u32], world: u16, at: Alignment, out: &mut [u8]) {
        let _ = at;
        self.sum_store(acc, world, out)
    }
}

/// [`Codec::sum_at`] without aligning: the first contribution sets the lanes
/// ([`Codec::sum_first`]), the others add ([`Codec::sum_add`]).
fn sum_in_turn<C: Codec + ?Sized>(
    codec: &C,
    acc: &mut [u32],
    world: u16,
    at: &mut Alignment,
    payload: &[u8],
) {
    if at.first {
        at.first = false;
        codec.sum_first(acc, world, payload)
    } else {
        codec.sum_add(acc, world, payload)
    }
}

/// The exponents of a slot's lanes under [`Codec::sum_at`]: the lanes count units of
/// the scale of block exponent `unit`, and `top` is the largest exponent of the
/// contributions so far, the result's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    /// No contribution yet: the next one sets the lanes.
    pub first: bool,
    /// The block exponent whose scale's unit the lanes count.
    pub unit: i8,
    /// The largest block exponent of the contributions so far.
    pub top: i8,
    /// The lanes are 32-bit, having been widened from narrower ones (if the codec
    /// starts narrow) when the exponents spread too far for those.
    pub wide: bool,
}

impl Alignment {
    /// Lanes that no contribution has touched.
    pub const EMPTY: Alignment = Alignment {
        first: true,
        unit: NO_EXPONENT,
        top: NO_EXPONENT,
        wide: false,
    };
}

/// Every codec this build knows.
pub static ALL: &[&dyn Codec] = &[&F32, &fixed::I32, &F16, &Bf16, &fixed::I16, &fixed::I8];

/// The codec with this wire id.
pub fn lookup(id: CodecId) -> Option<&'static dyn Codec> {
    ALL.iter().copied().find(|c| c.id() == id)
}

/// The codec with this command-line name.
pub fn by_name(name: &str) -> Option<&'static dyn Codec> {
    ALL.iter()
        .copied()
        .find(|c| c.name().eq_ignore_ascii_case(name))
}

/// The names of all codecs, for help texts and error messages.
pub fn names() -> Vec<&'static str> {
    ALL.iter().map(|c| c.name()).collect()
}

/// A value that no fixed-point codec can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("tensor holds a NaN or an infinity, which block-scaled codecs cannot carry")]
pub struct NonFinite;

/// The block exponent of `src`: `floor(log2(max |x|))`, so every `|x| < 2^(e + 1)`
/// (subnormals report [`MIN_EXPONENT`]), or [`NO_EXPONENT`] when all are zero.
pub fn block_exponent(src: &[f32]) -> Result<i8, NonFinite> {
    let max_bits = kernels::max_abs_bits(src);
    if max_bits >= 0x7f80_0000 {
        return Err(NonFinite);
    }
    if max_bits == 0 {
        return Ok(NO_EXPONENT);
    }
    let biased = (max_bits >> 23) as i32;
    // In range: biased is 0..=254, so e is -127..=127.
    let e = if biased == 0 { -127 } else { biased - 127 };
    Ok(e as i8)
}

/// The error bound of one element of a sum through `codec`: `exact` is the exact sum,
/// `sum_abs` the sum of the ranks' magnitudes, `e_max` the chunk's block exponent.
/// Covers the codec's quantization (and its rounding of the result), the aggregator's
/// f32 accumulation, and the final conversion to f32.
pub fn error_bound(
    codec: &dyn Codec,
    world: u16,
    e_max: i8,
    stochastic: bool,
    exact: f64,
    sum_abs: f64,
) -> f64 {
    let n = f64::from(world);
    let f32_eps = 2f64.powi(-24);
    let u = codec.unit_roundoff() * if stochastic { 2.0 } else { 1.0 };
    codec.sum_error(world, e_max, stochastic)
        + sum_abs * (u * (1.0 + u) + (n + 1.0) * f32_eps)
        + exact.abs() * codec.unit_roundoff().max(f32_eps)
        + (n + 1.0) * codec.underflow() * if stochastic { 2.0 } else { 1.0 }
}

/// A uniform value in `[0, 1)` for element `i` of the stream `key` (stochastic
/// rounding): a counter-based hash, so any element can be drawn in any order.
#[inline(always)]
pub(crate) fn uniform(key: u64, i: usize) -> f32 {
    let mut z = key.wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

#[cfg(test)]
mod kernel_tests;
#[cfg(test)]
mod tests;
