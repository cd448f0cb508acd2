//! Codecs: how a chunk of `f32` gradients becomes wire bytes, how the aggregator sums
//! those bytes, and how a worker turns the sum back into `f32`. The SIMD kernels and
//! streaming stores that do it live here, so that the protocol crate (`inagg-proto`,
//! which re-exports this crate as `inagg_proto::codec`) holds no `unsafe` code.
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

#![warn(missing_docs)]

mod fixed;
mod float;
mod half16;
mod kernels;
pub mod partial;
pub mod stream;

use std::fmt;

pub use fixed::{Fixed, Room};
pub use float::F32;
pub use half16::{Bf16, F16};

/// The exponent value that means "no exponent": an all-zero block, or a packet that
/// carries no lookahead (the wire carries it as is).
pub const NO_EXPONENT: i8 = i8::MIN;

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

/// A gradient encoding: what it is on the wire and how precise, which both sides
/// need. Implementations are stateless and shared (`&'static`). A codec is also each
/// caller's half: [`WorkerCodec`] (quantize and restore a tensor's values) and
/// [`AggregatorCodec`] (sum contributions in a slot's lanes).
pub trait Codec: WorkerCodec + AggregatorCodec + Send + Sync + fmt::Debug {
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
    /// Whether each rank quantizes a chunk at its own block exponent, which its packet
    /// carries as `scale_exp`, and the aggregator aligns the contributions
    /// ([`AggregatorCodec::sum_at`]), instead of all ranks sharing one through the lookahead. A
    /// worker then reads each chunk once, while it is in cache, not once for the
    /// lookahead and again a window later (see the `fixed` module).
    fn aligns_exponents(&self) -> bool {
        false
    }
}

/// A codec as a worker uses it: values into a contribution's payload and a result's
/// payload back into values.
pub trait WorkerCodec {
    /// Whether encoding is a byte copy of the f32s (f32 on a little-endian host), so
    /// that a contribution can go to the kernel straight from the tensor.
    fn wire_is_native_f32(&self) -> bool {
        false
    }
    /// Quantizes `src` into `out`, which holds exactly `src.len() * wire_bytes()` bytes.
    fn encode(&self, src: &[f32], scale: Scale, out: &mut [u8]);
    /// Turns a payload back into values; `out.len() * wire_bytes() == src.len()`.
    fn decode(&self, src: &[u8], scale: Scale, out: &mut [f32]);
    /// [`WorkerCodec::decode`] into a tensor too large to stay in cache: the same values,
    /// written around the caches where the CPU can ([`stream`]), so that `out` is not
    /// read before it is written.
    fn decode_around_cache(&self, src: &[u8], scale: Scale, out: &mut [f32]) {
        self.decode(src, scale, out)
    }
}

/// A codec as an aggregator uses it: contributions summed into a slot's `u32` lanes,
/// the sum written at the wire width.
pub trait AggregatorCodec {
    /// Whether a sum's wire form is its 32-bit lanes as they lie in memory (f32 and
    /// i32 on a little-endian host): the aggregator then sends results straight from
    /// the lanes and keeps no copy.
    fn result_is_lanes(&self) -> bool {
        false
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
    /// Aggregator: adds a contribution quantized at block exponent `e` (the packet's
    /// `scale_exp`) to lanes whose exponents are `at` (the first contribution, with
    /// `first`, sets them). Codecs that do not align exponents ignore both and do
    /// [`AggregatorCodec::sum_first`] or [`AggregatorCodec::sum_add`].
    fn sum_at(&self, acc: &mut [u32], world: u16, at: &mut Alignment, e: i8, payload: &[u8]) {
        let _ = e;
        sum_in_turn(self, acc, world, at, payload)
    }
    /// Aggregator: [`AggregatorCodec::sum_store`] for lanes summed by [`AggregatorCodec::sum_at`]; the
    /// result's block exponent is `at.top` for codecs that align exponents.
    fn store_at(&self, acc: &[u32], world: u16, at: Alignment, out: &mut [u8]) {
        let _ = at;
        self.sum_store(acc, world, out)
    }
    /// Aggregator: whether [`AggregatorCodec::sum_store_all`] may sum a world of `world` ranks'
    /// contributions (up to [`MAX_AT_ONCE`]): a slot then holds them as they come,
    /// and sums them when the last does.
    fn sums_all_at_once(&self, world: u16) -> bool {
        let _ = world;
        false
    }
    /// Aggregator: one exponent block of every contribution to a chunk at once
    /// (`payloads[k]` quantized at block exponent `exps[k]`), summed and written as
    /// [`AggregatorCodec::store_at`] writes the lanes that [`AggregatorCodec::sum_at`] leaves after the
    /// same contributions, in any order; returns the alignment it leaves. One pass,
    /// where summing in turn reads and writes a slot's lanes once per contribution.
    /// `None` where the codec cannot ([`AggregatorCodec::sums_all_at_once`]), or where the
    /// exponents spread so far that the sum in turn would leave its narrow lanes and
    /// depend on the order: `out` must then be written by summing in turn.
    fn sum_store_all(
        &self,
        world: u16,
        exps: &[i8],
        payloads: &[&[u8]],
        out: &mut [u8],
    ) -> Option<Alignment> {
        let _ = (world, exps, payloads, out);
        None
    }
    /// Aggregator of a lower level (a rack aggregator, docs/protocol.md 8.5): writes
    /// the lanes of one exponent block of a finished partial sum as they stand, 4
    /// bytes per element, little-endian ([`PARTIAL_LANE_BYTES`]): f32 bits for the
    /// float codecs, two's complement i32 for the fixed-point ones (`i8`'s 16-bit lanes
    /// widened). Nothing is rounded, so an upper level that adds the partial sums
    /// ([`AggregatorCodec::add_partial`]) stores the result that one aggregator
    /// summing every rank's contribution would. `at` is what summing left (for codecs
    /// that align exponents, the exponents the lanes count and the largest).
    fn store_partial(&self, acc: &[u32], world: u16, at: Alignment, out: &mut [u8]) {
        let _ = (world, at);
        kernels::store_lanes(acc, out)
    }
    /// Aggregator of an upper level: adds one exponent block of a partial sum that
    /// [`AggregatorCodec::store_partial`] wrote (with exponents `p`, `p.first` unused)
    /// to lanes, as [`AggregatorCodec::sum_at`] adds a contribution; the first partial
    /// (`at.first`) sets them. `world` is the whole job's (every rank below every
    /// partial), the world that the ranks quantized with, so that
    /// [`AggregatorCodec::store_at`] then stores the job's result.
    fn add_partial(
        &self,
        acc: &mut [u32],
        world: u16,
        at: &mut Alignment,
        p: Alignment,
        payload: &[u8],
    );
}

/// Bytes per element of a partial sum between aggregator levels
/// ([`AggregatorCodec::store_partial`]): its 32-bit lanes.
pub const PARTIAL_LANE_BYTES: usize = 4;

/// The most contributions [`AggregatorCodec::sum_store_all`] sums at once: what a slot's lanes
/// hold of a chunk's payloads, as they came, before the last (a version's 4-byte lanes
/// hold three i8 payloads of one byte per element and their exponents; four do not
/// fit).
pub const MAX_AT_ONCE: usize = 4;

/// [`AggregatorCodec::sum_at`] without aligning: the first contribution sets the lanes
/// ([`AggregatorCodec::sum_first`]), the others add ([`AggregatorCodec::sum_add`]).
fn sum_in_turn<C: AggregatorCodec + ?Sized>(
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

/// The exponents of a slot's lanes under [`AggregatorCodec::sum_at`]: the lanes count units of
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

/// Elements under one block exponent of a codec that aligns exponents
/// ([`Codec::aligns_exponents`]): a longer chunk is quantized block by block, each at
/// its own exponent. The header's `scale_exp` is the first block's; the others follow
/// the payload's data, one byte each ([`payload_bytes`]). A chunk's precision so stays
/// that of 8 Ki-element chunks (one exponent for a longer chunk quantizes its small
/// values more coarsely), while a loopback chunk may take a whole datagram like the
/// other codecs' (57,344 elements, seven blocks): fewer, larger chunks save
/// per-datagram work (header decoding, and the decoders' ends of each chunk); see
/// docs/performance.md, "Exponents per chunk".
pub const EXPONENT_BLOCK: usize = 8192;

/// The most exponent blocks one chunk (at most `u16::MAX` elements) holds.
pub const MAX_BLOCKS: usize = (u16::MAX as usize).div_ceil(EXPONENT_BLOCK);

/// Exponent blocks in a chunk of `count` elements: one for codecs that do not align
/// exponents (their one exponent is shared), `ceil(count / EXPONENT_BLOCK)` for those
/// that do.
#[inline]
pub fn exponent_blocks(codec: &dyn Codec, count: usize) -> usize {
    if codec.aligns_exponents() {
        count.div_ceil(EXPONENT_BLOCK).clamp(1, MAX_BLOCKS)
    } else {
        1
    }
}

/// Bytes of a payload of `count` elements: the data, `count * wire_bytes()`, then the
/// exponents of the blocks after the first ([`EXPONENT_BLOCK`]).
#[inline]
pub fn payload_bytes(codec: &dyn Codec, count: usize) -> usize {
    count * codec.wire_bytes() + exponent_blocks(codec, count) - 1
}

/// The exponent of each block of a payload of `count` elements whose first block's is
/// `first` (the header's), in order; blocks whose trailing byte is missing (a payload
/// shorter than [`payload_bytes`], which `wire::decode` rejects) read as all-zero.
#[inline]
pub fn block_exponents(
    codec: &dyn Codec,
    count: usize,
    first: i8,
    payload: &[u8],
) -> BlockExponents {
    let k = exponent_blocks(codec, count);
    let trailer = payload.get(count * codec.wire_bytes()..).unwrap_or(&[]);
    let mut e = [NO_EXPONENT; MAX_BLOCKS];
    e[0] = first;
    for (b, slot) in e.iter_mut().enumerate().take(k).skip(1) {
        *slot = trailer.get(b - 1).map_or(NO_EXPONENT, |&x| x as i8);
    }
    BlockExponents { e, k }
}

/// A chunk's block exponents ([`block_exponents`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockExponents {
    e: [i8; MAX_BLOCKS],
    k: usize,
}

impl BlockExponents {
    /// The exponents, one per block.
    pub fn as_slice(&self) -> &[i8] {
        &self.e[..self.k]
    }
}

/// The elements of block `b` of a chunk of `count`.
#[inline]
pub fn block_range(b: usize, count: usize, blocks: usize) -> std::ops::Range<usize> {
    if blocks <= 1 {
        0..count
    } else {
        (b * EXPONENT_BLOCK).min(count)..((b + 1) * EXPONENT_BLOCK).min(count)
    }
}

/// Aggregator: adds a payload of `lanes.len()` elements, quantized at block exponents
/// starting with `first` (the header's), to lanes aligned as `at` says, block by block
/// ([`AggregatorCodec::sum_at`]).
#[inline]
pub fn sum_blocks(
    codec: &dyn Codec,
    lanes: &mut [u32],
    world: u16,
    at: &mut [Alignment; MAX_BLOCKS],
    first: i8,
    payload: &[u8],
) {
    let count = lanes.len();
    let exps = block_exponents(codec, count, first, payload);
    let k = exps.as_slice().len();
    let w = codec.wire_bytes();
    for (b, &e) in exps.as_slice().iter().enumerate() {
        let r = block_range(b, count, k);
        let data = payload.get(r.start * w..r.end * w).unwrap_or(&[]);
        codec.sum_at(&mut lanes[r], world, &mut at[b], e, data);
    }
}

/// Aggregator: writes finished lanes summed by [`sum_blocks`] as a result payload
/// ([`payload_bytes`] of `out`, [`store_each_block`]). Returns the first block's
/// exponent, the result header's.
#[inline]
pub fn store_blocks(
    codec: &dyn Codec,
    lanes: &[u32],
    world: u16,
    at: &[Alignment; MAX_BLOCKS],
    out: &mut [u8],
) -> i8 {
    let stored = store_each_block(codec, lanes.len(), out, |b, r, o| {
        codec.store_at(&lanes[r], world, at[b], o);
        at[b]
    });
    stored[0].top
}

/// Aggregator: writes a result payload of `count` elements ([`payload_bytes`] of
/// `out`) block by block: `store(b, elements, bytes)` writes block `b`'s data into
/// `bytes` and returns its alignment, whose `top` is the block's exponent; those of the
/// blocks after the first follow the data. Returns the blocks' alignments.
pub fn store_each_block(
    codec: &dyn Codec,
    count: usize,
    out: &mut [u8],
    mut store: impl FnMut(usize, std::ops::Range<usize>, &mut [u8]) -> Alignment,
) -> [Alignment; MAX_BLOCKS] {
    let k = exponent_blocks(codec, count);
    let w = codec.wire_bytes();
    let (data, trailer) = out.split_at_mut((count * w).min(out.len()));
    let mut stored = [Alignment::EMPTY; MAX_BLOCKS];
    for (b, a) in stored.iter_mut().enumerate().take(k) {
        let r = block_range(b, count, k);
        let Some(o) = data.get_mut(r.start * w..r.end * w) else {
            continue;
        };
        *a = store(b, r, o);
        if let Some(t) = b.checked_sub(1).and_then(|t| trailer.get_mut(t)) {
            *t = a.top as u8;
        }
    }
    stored
}

/// Every codec this build knows.
pub static ALL: &[&dyn Codec] = &[&F32, &fixed::I32, &F16, &Bf16, &fixed::I16, &fixed::I8];

/// The codec with this wire id.
#[inline]
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
#[inline]
pub fn block_exponent(src: &[f32]) -> Result<i8, NonFinite> {
    exponent_of(kernels::max_abs_bits(src))
}

/// The [`block_exponent`] of each [`EXPONENT_BLOCK`]-element block of `src` into
/// `out` (one per block, `out.len()` of them, the last taking the rest of `src`: one
/// is the whole of it, as [`block_range`] has it), in one pass over `src`.
pub fn block_exponents_of(src: &[f32], out: &mut [Result<i8, NonFinite>]) {
    let mut bits = [0u32; MAX_BLOCKS];
    let k = out.len().min(MAX_BLOCKS);
    kernels::max_abs_bits_blocks(src, EXPONENT_BLOCK, &mut bits[..k]);
    for (o, &b) in out.iter_mut().zip(&bits[..k]) {
        *o = exponent_of(b);
    }
}

/// The block exponent of a block whose largest `|x|` has the bits `max_bits`.
fn exponent_of(max_bits: u32) -> Result<i8, NonFinite> {
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
/// f32 accumulation (float codecs; fixed-point lanes sum integers exactly), and the
/// final conversion to f32.
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
    let accumulation = if codec.block_scaled() {
        0.0
    } else {
        (n + 1.0) * f32_eps
    };
    codec.sum_error(world, e_max, stochastic)
        + sum_abs * (u * (1.0 + u) + accumulation)
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
