//! The f16 kernels with F16C intrinsics. Registers are read and written through
//! `bytemuck` casts of whole arrays, which compile to unaligned loads and stores.

use std::arch::x86_64::{
    __m128i, __m256, __m256i, _mm256_add_ps, _mm256_cvtph_ps, _mm256_cvtps_epi32, _mm256_cvtps_ph,
    _mm256_max_ps, _mm256_min_ps, _mm256_mul_ps, _mm256_packs_epi16, _mm256_packs_epi32,
    _mm256_permute4x64_epi64, _mm256_permutevar8x32_epi32, _mm256_set1_ps, _mm256_setr_epi32,
    _MM_FROUND_TO_NEAREST_INT,
};

use super::{
    prefetch_block, prefetch_bytes, prefetch_head, quantize_loop, BLOCK, F16_STEP, SUM_BLOCK,
};

/// [`super::sum_store_i8`] with AVX2, 32 elements a step: each contribution's bytes
/// widened to 16 bits and shifted (`vpmovsxbw`, `vpsllw`), added in registers,
/// rounded with two arithmetic shifts, clamped, and packed back to bytes.
///
/// Sums at most [`super::super::MAX_AT_ONCE`] sources (the first of `srcs`).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn sum_store_i8(
    srcs: &[&[u8]],
    shl: &[u32],
    shift: u32,
    lim: i32,
    out: &mut [u8],
) {
    let srcs = &srcs[..srcs.len().min(shl.len()).min(super::super::MAX_AT_ONCE)];
    use std::arch::x86_64::{
        _mm256_add_epi16, _mm256_and_si256, _mm256_cvtepi8_epi16, _mm256_max_epi16,
        _mm256_min_epi16, _mm256_set1_epi16, _mm256_setzero_si256, _mm256_sll_epi16,
        _mm256_sra_epi16, _mm_cvtsi32_si128, _mm_loadu_si128,
    };
    const STEP: usize = 32;
    let n = srcs.iter().fold(out.len(), |n, s| n.min(s.len()));
    let shift = shift.min(15);
    let down = _mm_cvtsi32_si128(shift.saturating_sub(1) as i32);
    let bit = _mm256_set1_epi16(i16::from(shift > 0));
    let sra = _mm_cvtsi32_si128(shift as i32);
    let lim = lim.clamp(0, 127) as i16;
    let (lo, hi) = (_mm256_set1_epi16(-lim), _mm256_set1_epi16(lim));
    let counts: [__m128i; super::super::MAX_AT_ONCE] =
        std::array::from_fn(|k| _mm_cvtsi32_si128(shl.get(k).map_or(0, |&s| s.min(15)) as i32));
    let steps = n / STEP;
    let o = out.as_mut_ptr();
    for i in 0..steps {
        let at = i * STEP;
        if at % SUM_BLOCK == 0 {
            for src in srcs {
                prefetch_bytes(src, at, SUM_BLOCK);
            }
        }
        let (mut a, mut b) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for (src, count) in srcs.iter().zip(&counts) {
            // SAFETY: `at + STEP <= n`, and every source holds at least `n` bytes.
            let (x, y) = unsafe {
                let p = src.as_ptr().add(at);
                (_mm_loadu_si128(p.cast()), _mm_loadu_si128(p.add(16).cast()))
            };
            a = _mm256_add_epi16(a, _mm256_sll_epi16(_mm256_cvtepi8_epi16(x), *count));
            b = _mm256_add_epi16(b, _mm256_sll_epi16(_mm256_cvtepi8_epi16(y), *count));
        }
        let round = |v| {
            let r = _mm256_add_epi16(
                _mm256_sra_epi16(v, sra),
                _mm256_and_si256(_mm256_sra_epi16(v, down), bit),
            );
            _mm256_min_epi16(_mm256_max_epi16(r, lo), hi)
        };
        // The pack interleaves the halves' 128-bit lanes: a's low, b's low, a's
        // high, b's high; the permutation puts them back in order.
        let bytes =
            _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi16(round(a), round(b)));
        // SAFETY: `out` holds at least `n >= at + STEP` bytes.
        unsafe { o.add(at).cast::<__m256i>().write_unaligned(bytes) };
    }
    // The tail (fewer than 32 elements) through the portable loop.
    let at = steps * STEP;
    let tails: [&[u8]; super::super::MAX_AT_ONCE] =
        std::array::from_fn(|k| srcs.get(k).map_or(&[][..], |s| &s[at..n]));
    super::sum_store_i8_loop(
        &tails[..srcs.len()],
        shl,
        shift,
        i32::from(lim),
        &mut out[at..n],
    );
}

/// Elements quantized per step by [`quantize_packed`]: four registers of eight.
const QUANT_STEP: usize = 32;

/// Eight `round(x * s)` clamped to `[lo, hi]` (NaN to `lo`), as 32-bit integers:
/// the scalar loop's `q`, but clamped before it is rounded, by the conversion
/// itself (`vcvtps2dq`, to nearest even in the default floating-point environment,
/// which Rust assumes). The bounds are integers, so the order changes nothing, and
/// one instruction fewer (`vroundps`) in this tight loop makes i8's encode measurably
/// faster (docs/performance.md, "Encode and decode kernels").
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q8(x: &[f32; 8], s: __m256, lo: __m256, hi: __m256) -> __m256i {
    let r = _mm256_mul_ps(bytemuck::cast::<_, __m256>(*x), s);
    // `maxps(r, lo)` is `r > lo ? r : lo` and `minps(r, hi)` is `r < hi ? r : hi`.
    _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
}

/// [`super::quantize`] to nearest at `W` = 1 or 2 bytes on a CPU with AVX2;
/// `lim` (at most 127 or 32,767) keeps the saturating packs exact.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_packed<const W: usize>(
    src: &[f32],
    s: f32,
    lim: f32,
    out: &mut [u8],
) {
    // SAFETY: this function is compiled with the same features .
    from_wide!(src, out, W, |_, x, o| unsafe {
        quantize_packed_block::<W>(x, s, lim, o)
    });
}

/// [`quantize_packed`] on one block.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn quantize_packed_block<const W: usize>(src: &[f32], s: f32, lim: f32, out: &mut [u8]) {
    let n = src.len().min(out.len() / W);
    let (sv, lo, hi) = (_mm256_set1_ps(s), _mm256_set1_ps(-lim), _mm256_set1_ps(lim));
    // The packs work within 128-bit halves: after both, the four-byte groups hold
    // elements 0-3, 8-11, 16-19, 24-27, 4-7, 12-15, 20-23, 28-31; this puts them
    // back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut s32 = src[..n].chunks_exact(QUANT_STEP);
    let mut o32 = out[..W * n].chunks_exact_mut(W * QUANT_STEP);
    for (x, o) in (&mut s32).zip(&mut o32) {
        // Always taken: `chunks_exact` hands out slices of exactly these lengths.
        let Ok(x) = <&[f32; QUANT_STEP]>::try_from(x) else {
            continue;
        };
        let x: &[[f32; 8]; 4] = bytemuck::cast_ref(x);
        // SAFETY: this function is compiled with the same features.
        let v: [__m256i; 4] = std::array::from_fn(|k| unsafe { q8(&x[k], sv, lo, hi) });
        // Within each 128-bit half: four i32 of one register, then four of the next.
        let ab = _mm256_packs_epi32(v[0], v[1]);
        let cd = _mm256_packs_epi32(v[2], v[3]);
        if W == 1 {
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
            o.copy_from_slice(&bytemuck::cast::<_, [u8; 32]>(bytes));
        } else {
            let ab = _mm256_permute4x64_epi64::<0b11_01_10_00>(ab);
            let cd = _mm256_permute4x64_epi64::<0b11_01_10_00>(cd);
            o[..32].copy_from_slice(&bytemuck::cast::<_, [u8; 32]>(ab));
            o[32..].copy_from_slice(&bytemuck::cast::<_, [u8; 32]>(cd));
        }
    }
    // The tail (fewer than 32 elements, in the last block only) through the loop.
    let (s_tail, o_tail) = (s32.remainder(), o32.into_remainder());
    if !s_tail.is_empty() {
        quantize_loop(s_tail, s, lim, None, o_tail, W);
    }
}

/// Eight f32 to eight f16, round to nearest even (NaN stays NaN, quieted).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn narrow(src: [f32; F16_STEP]) -> [u8; 2 * F16_STEP] {
    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(bytemuck::cast::<_, __m256>(src));
    bytemuck::cast(h)
}

/// [`super::to_f16`] on a CPU with F16C.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn to_f16(src: &[f32], out: &mut [u8]) {
    // SAFETY: this function is compiled with the same features .
    from_wide!(src, out, 2, |_, s, o| unsafe { to_f16_block(s, o) });
}

/// [`to_f16`] on one block.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn to_f16_block(src: &[f32], out: &mut [u8]) {
    let n = src.len().min(out.len() / 2);
    let mut s8 = src[..n].chunks_exact(F16_STEP);
    let mut o8 = out[..2 * n].chunks_exact_mut(2 * F16_STEP);
    for (s, o) in (&mut s8).zip(&mut o8) {
        // Always taken: `chunks_exact` hands out slices of exactly these lengths.
        if let (Ok(s), Ok(o)) = (s.try_into(), <&mut [u8; 2 * F16_STEP]>::try_from(o)) {
            // SAFETY: this function is compiled with the same features.
            *o = unsafe { narrow(s) };
        }
    }
    // The tail (fewer than 8 elements) through the same instruction, padded.
    let (s_tail, o_tail) = (s8.remainder(), o8.into_remainder());
    if !s_tail.is_empty() {
        let mut s = [0f32; F16_STEP];
        s[..s_tail.len()].copy_from_slice(s_tail);
        // SAFETY: as above.
        let h = unsafe { narrow(s) };
        o_tail.copy_from_slice(&h[..o_tail.len()]);
    }
}

/// One step: 8 halves widened to f32 and stored into (or added to) 8 lanes.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn step<const ADD: bool>(acc: &mut [u32; F16_STEP], src: [u8; 2 * F16_STEP]) {
    let x = _mm256_cvtph_ps(bytemuck::cast::<_, __m128i>(src));
    let x = if ADD {
        _mm256_add_ps(bytemuck::cast::<_, __m256>(*acc), x)
    } else {
        x
    };
    *acc = bytemuck::cast(x);
}

/// [`super::f16_lanes`] on a CPU with F16C.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_lanes<const ADD: bool>(acc: &mut [u32], src: &[u8]) {
    // SAFETY: this function is compiled with the same features .
    into_wide!(src, 2, acc, |s, a| unsafe { f16_lanes_block::<ADD>(a, s) });
}

/// [`f16_lanes`] on one block.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f16_lanes_block<const ADD: bool>(acc: &mut [u32], src: &[u8]) {
    let n = acc.len().min(src.len() / 2);
    let mut a8 = acc[..n].chunks_exact_mut(F16_STEP);
    let mut s8 = src[..2 * n].chunks_exact(2 * F16_STEP);
    for (a, s) in (&mut a8).zip(&mut s8) {
        // Always taken: `chunks_exact` hands out slices of exactly these lengths.
        if let (Ok(a), Ok(s)) = (<&mut [u32; F16_STEP]>::try_from(a), s.try_into()) {
            // SAFETY: this function is compiled with the same features.
            unsafe { step::<ADD>(a, s) };
        }
    }
    // The tail (fewer than 8 elements) through the same instructions, padded.
    let (a_tail, s_tail) = (a8.into_remainder(), s8.remainder());
    if !a_tail.is_empty() {
        let mut a = [0u32; F16_STEP];
        let mut s = [0u8; 2 * F16_STEP];
        a[..a_tail.len()].copy_from_slice(a_tail);
        s[..s_tail.len()].copy_from_slice(s_tail);
        // SAFETY: as above.
        unsafe { step::<ADD>(&mut a, s) };
        a_tail.copy_from_slice(&a[..a_tail.len()]);
    }
}
