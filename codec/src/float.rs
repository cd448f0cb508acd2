//! `f32`: values travel as they are and the aggregator sums them in `f32`.

use super::{kernels, AggregatorCodec, Alignment, Codec, CodecId, Scale, WorkerCodec};

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
}

impl WorkerCodec for F32 {
    fn wire_is_native_f32(&self) -> bool {
        cfg!(target_endian = "little")
    }

    fn encode(&self, src: &[f32], _scale: Scale, out: &mut [u8]) {
        kernels::f32_to_le(src, out)
    }

    // `decode_around_cache` stays `decode` (docs/performance.md: streaming f32
    // results was slower).
    fn decode(&self, src: &[u8], _scale: Scale, out: &mut [f32]) {
        kernels::le_to_f32(src, out)
    }
}

impl AggregatorCodec for F32 {
    fn result_is_lanes(&self) -> bool {
        cfg!(target_endian = "little")
    }

    fn sum_first(&self, acc: &mut [u32], _world: u16, payload: &[u8]) {
        kernels::load_lanes(acc, payload)
    }

    fn sum_add(&self, acc: &mut [u32], _world: u16, payload: &[u8]) {
        kernels::add_f32(acc, payload)
    }

    fn sum_store(&self, acc: &[u32], _world: u16, out: &mut [u8]) {
        kernels::store_lanes(acc, out)
    }

    fn add_partial(&self, acc: &mut [u32], _: u16, at: &mut Alignment, _: Alignment, p: &[u8]) {
        add_f32_partial(acc, at, p)
    }
}

/// [`AggregatorCodec::add_partial`] for the codecs that sum in f32 lanes: f32 sums of
/// the partial sums, in the order they arrive.
pub(crate) fn add_f32_partial(acc: &mut [u32], at: &mut Alignment, payload: &[u8]) {
    if std::mem::replace(&mut at.first, false) {
        kernels::load_lanes(acc, payload)
    } else {
        kernels::add_f32(acc, payload)
    }
}
