//! Decoding a result into a tensor that does not fit in cache, around the caches.
//!
//! A cached store to memory that is not in cache first reads the line it writes
//! (read for ownership): decoding a 64 MiB tensor read it all, for nothing, on top of
//! writing it. Non-temporal stores (`vmovntps`) write whole lines without reading them,
//! which made bf16, f16 and i8 allreduces of large tensors faster. Not every codec
//! gains: f32, i32 and i16, whose results are the widest, were level or slower (their
//! `WorkerCodec::decode_around_cache` is their plain decode); see docs/performance.md,
//! "Decoding around the cache". The stores leave the tensor out of cache, so they suit
//! only tensors that would not stay there anyway: the worker streams from
//! [`STREAM_MIN_BYTES`] up.
//!
//! Every decode here gives the bits of [`WorkerCodec::decode`](super::WorkerCodec::decode) (the
//! same conversions, eight elements at a time); the ends of `out` outside whole
//! 64-byte lines are stored around the caches one element at a time (`movnti`),
//! since those lines are shared with neighbouring chunks or exponent blocks that are
//! decoded at other times. Each call ends with `sfence`, so that its stores are
//! visible to other threads before anything the caller writes after.

use super::kernels;

/// Tensors of at least this many bytes (f32) are decoded around the caches: 4 MiB,
/// twice a core's L2 on the machines inagg is measured on, beyond which a decoded
/// tensor is out of cache by the time its allreduce ends.
pub const STREAM_MIN_BYTES: usize = 4 << 20;

/// What a payload holds, to decode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Wire {
    /// Little-endian IEEE half precision.
    F16,
    /// Little-endian bfloat16.
    Bf16,
    /// Little-endian signed integers of `width` bytes (1, 2 or 4), times `inv`.
    Int {
        /// Bytes per element.
        width: usize,
        /// The scale's inverse.
        inv: f32,
    },
}

impl Wire {
    fn bytes(self) -> usize {
        match self {
            Wire::F16 | Wire::Bf16 => 2,
            Wire::Int { width, .. } => kernels::int_bytes(width),
        }
    }
}

/// Decodes `src` into `out` with the cached kernels.
fn cached(wire: Wire, src: &[u8], out: &mut [f32]) {
    match wire {
        Wire::F16 => kernels::from_f16(src, out),
        Wire::Bf16 => kernels::from_bf16(src, out),
        Wire::Int { width, inv } => kernels::dequantize(src, inv, out, width),
    }
}

/// Decodes `src` (`out.len()` elements) into `out` with non-temporal stores where the
/// CPU has AVX2, with the cached kernels elsewhere; the same bits either way.
pub(crate) fn decode_around_cache(wire: Wire, src: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if kernels::has_v3() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe { x86::decode(wire, src, out) };
    }
    cached(wire, src, out)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m256, _mm256_castsi256_ps, _mm256_cvtepi16_epi32, _mm256_cvtepi32_ps,
        _mm256_cvtepi8_epi32, _mm256_cvtepu16_epi32, _mm256_cvtph_ps, _mm256_loadu_si256,
        _mm256_mul_ps, _mm256_set1_ps, _mm256_slli_epi32, _mm256_stream_ps, _mm_cvtph_ps,
        _mm_cvtsi32_si128, _mm_cvtss_f32, _mm_loadl_epi64, _mm_loadu_si128, _mm_sfence,
        _mm_stream_si32,
    };

    use super::Wire;

    /// Elements per step: one 256-bit register of f32.
    const STEP: usize = 8;
    /// Elements per cache line: the body streams whole lines.
    const LINE: usize = 16;

    /// Element `i` of `src`, decoded with the same conversions as the vector loops
    /// below (F16C's for f16), one element at a time.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn one(wire: Wire, src: &[u8], i: usize) -> f32 {
        let b = |k: usize| src[i * wire.bytes() + k];
        match wire {
            Wire::F16 => {
                let h = u16::from_le_bytes([b(0), b(1)]);
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
            }
            Wire::Bf16 => f32::from_bits(u32::from(u16::from_le_bytes([b(0), b(1)])) << 16),
            Wire::Int { width: 1, inv } => f32::from(b(0) as i8) * inv,
            Wire::Int { width: 2, inv } => f32::from(i16::from_le_bytes([b(0), b(1)])) * inv,
            Wire::Int { inv, .. } => i32::from_le_bytes([b(0), b(1), b(2), b(3)]) as f32 * inv,
        }
    }

    /// The ends of `out` outside whole lines, stored one element at a time around the
    /// caches too (`movnti`). They share their lines with the neighbouring chunks or
    /// exponent blocks, decoded at other times, and went through the cached kernels
    /// at first: each such line was read from memory before it was written, and those
    /// kernels' prefetches read the 2 KiB after it as well, lines that the streamed
    /// body then wrote. With several exponent blocks per i8 chunk there are that many
    /// more ends, and they showed in profiles (docs/performance.md, "Decoding around
    /// the cache").
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn stream_each(wire: Wire, src: &[u8], out: &mut [f32]) {
        // At most as many elements as `src` holds, like the cached kernels.
        let n = src.len() / wire.bytes();
        for (i, o) in out.iter_mut().enumerate().take(n) {
            // SAFETY: the caller's CPU has the features; `o` is a valid, aligned `f32`,
            // and an `i32` has its size and alignment.
            unsafe {
                let v = one(wire, src, i);
                _mm_stream_si32(std::ptr::from_mut(o).cast(), v.to_bits() as i32);
            }
        }
    }

    /// [`super::decode_around_cache`] on a CPU with AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn decode(wire: Wire, src: &[u8], out: &mut [f32]) {
        let per = wire.bytes();
        let n = out.len().min(src.len() / per);
        // Up to the first line boundary of `out` (`vmovntps` stores at 32-byte ones),
        // and the tail after the last whole line, one element at a time.
        let head = out.as_ptr().align_offset(64).min(n);
        let steps = (n - head) / LINE * (LINE / STEP);
        let body = head + steps * STEP;
        let (out_head, rest) = out.split_at_mut(head);
        // SAFETY (both ends): the caller's CPU has the features.
        unsafe { stream_each(wire, &src[..head * per], out_head) };
        let (out_body, out_tail) = rest.split_at_mut(steps * STEP);
        let s = &src[head * per..body * per];
        let o = out_body.as_mut_ptr();
        // SAFETY (each loop): step `i` reads `STEP * per` bytes at `i * STEP * per`
        // of `s`, which holds `steps * STEP * per`, and stores 32 bytes at element
        // `i * STEP` of `out_body`, which holds `steps * STEP` elements from a 32-byte
        // boundary (a line's); the loads are unaligned ones.
        macro_rules! each_step {
            (|$p:ident| $convert:expr) => {
                for i in 0..steps {
                    unsafe {
                        let $p = s.as_ptr().add(i * STEP * per);
                        let v: __m256 = $convert;
                        _mm256_stream_ps(o.add(i * STEP), v);
                    }
                }
            };
        }
        match wire {
            Wire::F16 => each_step!(|p| _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))),
            Wire::Bf16 => each_step!(|p| {
                let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
            }),
            Wire::Int { width, inv } => {
                let inv = _mm256_set1_ps(inv);
                match width {
                    1 => each_step!(|p| {
                        let i = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()));
                        _mm256_mul_ps(_mm256_cvtepi32_ps(i), inv)
                    }),
                    2 => each_step!(|p| {
                        let i = _mm256_cvtepi16_epi32(_mm_loadu_si128(p.cast()));
                        _mm256_mul_ps(_mm256_cvtepi32_ps(i), inv)
                    }),
                    _ => each_step!(|p| {
                        let i = _mm256_loadu_si256(p.cast());
                        _mm256_mul_ps(_mm256_cvtepi32_ps(i), inv)
                    }),
                }
            }
        }
        unsafe { stream_each(wire, &src[body * per..n * per], out_tail) };
        // Non-temporal stores are weakly ordered: fence them before anything after.
        _mm_sfence();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests_force_baseline;

    fn payload(bytes: usize, seed: u32) -> Vec<u8> {
        (0..bytes as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
            .collect()
    }

    #[test]
    fn a_short_payload_decodes_what_it_holds_like_the_cached_kernels() {
        // `src` shorter than `out` asks for: the elements it holds, as the cached
        // kernels do (they zip the two), and no panic, whatever the alignment.
        for wire in [Wire::F16, Wire::Bf16, Wire::Int { width: 1, inv: 0.5 }] {
            for offset in 0..16 {
                let src = payload(70 * wire.bytes(), offset as u32);
                let mut want = vec![-1f32; 100];
                cached(wire, &src, &mut want);
                let mut buf = vec![-1f32; 116];
                decode_around_cache(wire, &src, &mut buf[offset..offset + 100]);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&buf[offset..offset + 100]), bits(&want), "{wire:?}");
            }
        }
    }

    #[test]
    fn every_wire_decodes_to_the_cached_kernels_bits_at_any_length_and_alignment() {
        let wires = [
            Wire::F16,
            Wire::Bf16,
            Wire::Int {
                width: 1,
                inv: 0.37,
            },
            Wire::Int {
                width: 2,
                inv: 1.0 / 4096.0,
            },
            Wire::Int {
                width: 4,
                inv: 3.0e-9,
            },
        ];
        for wire in wires {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 31, 64, 255, 256, 257, 1000] {
                for offset in 0..16 {
                    let src = payload(len * wire.bytes(), (len + offset) as u32);
                    let mut want = vec![0f32; len];
                    cached(wire, &src, &mut want);
                    let mut buf = vec![f32::NAN; len + 16];
                    let out = &mut buf[offset..offset + len];
                    decode_around_cache(wire, &src, out);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(out), bits(&want), "{wire:?} len {len} offset {offset}");
                    // Nothing outside `out` is touched.
                    assert!(buf[..offset].iter().all(|x| x.is_nan()));
                    assert!(buf[offset + len..].iter().all(|x| x.is_nan()));
                    // And the baseline build, on CPUs with the fast one.
                    let mut base = vec![0f32; len];
                    tests_force_baseline::with(|| decode_around_cache(wire, &src, &mut base));
                    assert_eq!(bits(&base), bits(&want), "{wire:?} baseline len {len}");
                }
            }
        }
    }
}
