//! Float codecs: values travel as IEEE floats and the aggregator sums them in `f32`.

use super::{lane4, Codec, CodecId, Scale};

/// Plain `f32`: the exact-float baseline. Four bytes per element.
#[derive(Debug, Clone, Copy)]
pub struct F32;

impl Codec for F32 {
    fn id(&self) -> CodecId {
        CodecId::F32
    }
    fn name(&self) -> &'static str {
        "f32"
    }
    fn wire_bytes(&self) -> usize {
        4
    }
    fn block_scaled(&self) -> bool {
        false
    }
    fn encode(&self, src: &[f32], _scale: Scale, out: &mut [u8]) {
        for (x, o) in src.iter().zip(out.chunks_exact_mut(4)) {
            o.copy_from_slice(&x.to_le_bytes());
        }
    }
    fn decode(&self, src: &[u8], _scale: Scale, out: &mut [f32]) {
        for (c, o) in src.chunks_exact(4).zip(out.iter_mut()) {
            *o = f32::from_le_bytes(lane4(c));
        }
    }
    fn sum_first(&self, acc: &mut [u32], payload: &[u8]) {
        for (c, a) in payload.chunks_exact(4).zip(acc.iter_mut()) {
            *a = u32::from_le_bytes(lane4(c));
        }
    }
    fn sum_add(&self, acc: &mut [u32], payload: &[u8]) {
        for (c, a) in payload.chunks_exact(4).zip(acc.iter_mut()) {
            *a = (f32::from_bits(*a) + f32::from_le_bytes(lane4(c))).to_bits();
        }
    }
    fn sum_store(&self, acc: &[u32], out: &mut [u8]) {
        for (a, o) in acc.iter().zip(out.chunks_exact_mut(4)) {
            o.copy_from_slice(&a.to_le_bytes());
        }
    }
}
