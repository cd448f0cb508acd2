//! Codecs: how a chunk of `f32` gradients becomes wire bytes, how the aggregator sums
//! those bytes, and how a worker turns the sum back into `f32`.
//!
//! The protocol only ever sees `&'static dyn Codec` from [`lookup`]: adding a codec
//! means one new implementation and one line in [`ALL`], nothing in the protocol.
//!
//! The aggregator sums into 32-bit lanes (`u32` holding an `f32` or an `i32`, as the
//! codec decides) and writes the finished sum back at the contribution's width.
//!
//! Block-scaled fixed point needs one shared scale per chunk: every rank sends the
//! exponent of its chunk ahead of time ([`block_exponent`]), the aggregator keeps the
//! maximum over ranks, and [`Codec::scale`] turns that maximum and the world size into
//! a [`Scale`] with enough headroom that the integer sum of all ranks cannot overflow.

mod fixed;
mod float;

use std::fmt;

pub use fixed::Fixed;
pub use float::F32;

use crate::wire::NO_EXPONENT;

/// A codec's number on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CodecId(pub u8);

impl CodecId {
    /// Plain `f32`.
    pub const F32: CodecId = CodecId(1);
    /// Block-scaled 32-bit fixed point.
    pub const I32: CodecId = CodecId(2);
}

/// The smallest block exponent: any subnormal block reports this one.
pub const MIN_EXPONENT: i8 = -127;
/// The largest block exponent (`f32::MAX < 2^128`).
pub const MAX_EXPONENT: i8 = 127;

/// How a worker scales a chunk before quantizing it: values are multiplied by
/// `2^shift`, rounded, and the sum is multiplied by `2^-shift` after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scale {
    /// The power of two applied before rounding.
    pub shift: i32,
    /// Fixed point: quantized magnitudes are clamped to `2^precision - 1`, which is what
    /// keeps the sum of all ranks from overflowing. Unused by float codecs.
    pub precision: i32,
}

/// A gradient encoding. Implementations are stateless and shared (`&'static`).
pub trait Codec: Send + Sync + fmt::Debug {
    /// The codec's number on the wire.
    fn id(&self) -> CodecId;
    /// The codec's name on the command line (`f32`, `i32`, ...).
    fn name(&self) -> &'static str;
    /// Bytes per element on the wire, for contributions and results alike.
    fn wire_bytes(&self) -> usize;
    /// Whether the codec needs a shared block exponent per chunk (exponent lookahead).
    fn block_scaled(&self) -> bool;
    /// The largest world size the codec supports (headroom for the sum).
    fn max_world(&self) -> u16 {
        u16::MAX
    }
    /// The scale for a chunk whose largest exponent over all ranks is `e_max`
    /// ([`NO_EXPONENT`] for an all-zero chunk) in a job of `world` ranks.
    fn scale(&self, world: u16, e_max: i8) -> Scale {
        let _ = (world, e_max);
        Scale::default()
    }
    /// The largest absolute error one rank's value picks up in [`Codec::encode`] at this
    /// scale (for fixed point, half a quantization step). `None`: relative error only.
    fn step_error(&self, scale: Scale) -> Option<f64> {
        let _ = scale;
        None
    }
    /// Quantizes `src` into `out`, which holds exactly `src.len() * wire_bytes()` bytes.
    fn encode(&self, src: &[f32], scale: Scale, out: &mut [u8]);
    /// Turns a result payload back into values; `out.len() * wire_bytes() == src.len()`.
    fn decode(&self, src: &[u8], scale: Scale, out: &mut [f32]);
    /// Aggregator: the first contribution to a slot initializes its lanes.
    fn sum_first(&self, acc: &mut [u32], payload: &[u8]);
    /// Aggregator: adds a contribution to the lanes. Never panics, never traps on
    /// overflow (hostile payloads wrap; honest ones have headroom).
    fn sum_add(&self, acc: &mut [u32], payload: &[u8]);
    /// Aggregator: writes the finished sum at the wire width.
    fn sum_store(&self, acc: &[u32], out: &mut [u8]);
}

/// Every codec this build knows, in the order of their ids.
pub static ALL: &[&dyn Codec] = &[&F32, &fixed::I32];

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
    let max_bits = src
        .iter()
        .fold(0u32, |m, x| m.max(x.to_bits() & 0x7fff_ffff));
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

/// Reads the `i`-th little-endian 32-bit lane of `bytes`.
#[inline(always)]
fn lane4(c: &[u8]) -> [u8; 4] {
    [c[0], c[1], c[2], c[3]]
}

#[cfg(test)]
mod tests;
