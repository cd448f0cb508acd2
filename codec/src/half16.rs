//! Half-width floats: `f16` (IEEE binary16) and `bf16` (bfloat16). Contributions are
//! rounded to two bytes; the aggregator widens them to `f32` lanes, sums, and rounds
//! the sum back to two bytes.
//!
//! f16 conversions use the CPU's F16C instructions, eight elements per register, when
//! it has them (checked at run time; [`kernels::to_f16`], [`kernels::from_f16`]), and
//! the `half` crate element by element otherwise; the aggregator's f16 sum converts
//! and adds with F16C in one pass ([`kernels::add_f16`]). All work at any payload
//! alignment. bf16 is a bit trick (round to nearest even on the upper 16
//! bits), which vectorizes as well.

use half::f16;

use super::stream::{self, Wire};
use super::{kernels, uniform, AggregatorCodec, Alignment, Codec, CodecId, Scale, WorkerCodec};

/// IEEE half precision: 11 significant bits, largest finite value 65504.
#[derive(Debug, Clone, Copy)]
pub struct F16;

/// bfloat16: 8 significant bits, the range of `f32`.
#[derive(Debug, Clone, Copy)]
pub struct Bf16;

/// Stochastic rounding to f16: the neighbour above with probability equal to the
/// distance from the one below, in units of their gap.
fn f32_to_f16_stochastic(src: &[f32], key: u64, out: &mut [u8]) {
    for (i, (x, o)) in src.iter().zip(out.chunks_exact_mut(2)).enumerate() {
        let near = f16::from_f32(*x);
        let y = near.to_f32();
        let h = if !x.is_finite() || !y.is_finite() || y == *x {
            near
        } else {
            // The other neighbour, one step away from `near` towards `x`.
            let bits = near.to_bits();
            let away_from_zero = (y < *x) == (*x > 0.0);
            let other = if y == 0.0 {
                f16::from_bits(if *x > 0.0 { 1 } else { 0x8001 })
            } else if away_from_zero {
                f16::from_bits(bits + 1)
            } else {
                f16::from_bits(bits - 1)
            };
            let (lo, hi) = if y < *x { (near, other) } else { (other, near) };
            let (l, u) = (lo.to_f32(), hi.to_f32());
            if u.is_finite() && uniform(key, i) < (*x - l) / (u - l) {
                hi
            } else {
                lo
            }
        };
        o.copy_from_slice(&h.to_le_bytes());
    }
}

impl Codec for F16 {
    fn id(&self) -> CodecId {
        CodecId::F16
    }

    fn name(&self) -> &'static str {
        "f16"
    }

    fn wire_bytes(&self) -> usize {
        2
    }

    fn block_scaled(&self) -> bool {
        false
    }

    fn unit_roundoff(&self) -> f64 {
        2f64.powi(-11)
    }

    fn underflow(&self) -> f64 {
        // Subnormal spacing 2^-24.
        2f64.powi(-25)
    }
}

impl WorkerCodec for F16 {
    fn encode(&self, src: &[f32], scale: Scale, out: &mut [u8]) {
        match scale.dither {
            None => kernels::to_f16(src, out),
            Some(key) => f32_to_f16_stochastic(src, key, out),
        }
    }

    fn decode(&self, src: &[u8], _scale: Scale, out: &mut [f32]) {
        kernels::from_f16(src, out)
    }

    fn decode_around_cache(&self, src: &[u8], _scale: Scale, out: &mut [f32]) {
        stream::decode_around_cache(Wire::F16, src, out)
    }
}

impl AggregatorCodec for F16 {
    fn sum_first(&self, acc: &mut [u32], _world: u16, payload: &[u8]) {
        kernels::load_f16(acc, payload)
    }

    fn sum_add(&self, acc: &mut [u32], _world: u16, payload: &[u8]) {
        kernels::add_f16(acc, payload)
    }

    fn sum_store(&self, acc: &[u32], _world: u16, out: &mut [u8]) {
        kernels::to_f16(bytemuck::cast_slice(acc), out)
    }

    fn add_partial(&self, acc: &mut [u32], _: u16, at: &mut Alignment, _: Alignment, p: &[u8]) {
        crate::float::add_f32_partial(acc, at, p)
    }
}

impl Codec for Bf16 {
    fn id(&self) -> CodecId {
        CodecId::BF16
    }

    fn name(&self) -> &'static str {
        "bf16"
    }

    fn wire_bytes(&self) -> usize {
        2
    }

    fn block_scaled(&self) -> bool {
        false
    }

    fn unit_roundoff(&self) -> f64 {
        2f64.powi(-8)
    }

    fn underflow(&self) -> f64 {
        2f64.powi(-134)
    }
}

impl WorkerCodec for Bf16 {
    fn encode(&self, src: &[f32], scale: Scale, out: &mut [u8]) {
        kernels::to_bf16(src, scale.dither, out)
    }

    fn decode(&self, src: &[u8], _scale: Scale, out: &mut [f32]) {
        kernels::from_bf16(src, out)
    }

    fn decode_around_cache(&self, src: &[u8], _scale: Scale, out: &mut [f32]) {
        stream::decode_around_cache(Wire::Bf16, src, out)
    }
}

impl AggregatorCodec for Bf16 {
    fn sum_first(&self, acc: &mut [u32], _world: u16, payload: &[u8]) {
        kernels::from_bf16(payload, bytemuck::cast_slice_mut(acc))
    }

    fn sum_add(&self, acc: &mut [u32], _world: u16, payload: &[u8]) {
        kernels::add_bf16(acc, payload)
    }

    fn sum_store(&self, acc: &[u32], _world: u16, out: &mut [u8]) {
        kernels::to_bf16(bytemuck::cast_slice(acc), None, out)
    }

    fn add_partial(&self, acc: &mut [u32], _: u16, at: &mut Alignment, _: Alignment, p: &[u8]) {
        crate::float::add_f32_partial(acc, at, p)
    }
}
