//! f32 to block-scaled integers and back: rounding to nearest or stochastically,
//! clamping, and the dequantizing multiply.

use super::*;
use crate::uniform;

/// Quantizes one value: scaled, rounded by `round`, clamped to `±lim` (`lim` an
/// integer below 2^31; a NaN becomes `-lim`).
///
/// The comparisons below compile to one `maxps` and one `minps`, where `f32::max` and
/// `f32::min` add a NaN check and a blend apiece; with `roundps` for the rounding (the
/// fast build has SSE4.1) the loop is half as long as with those and the
/// add-and-subtract rounding trick.
#[inline(always)]
pub(super) fn q(x: f32, s: f32, lim: f32, round: impl Fn(f32) -> f32) -> i32 {
    let r = round(x * s);
    // `maxps(r, -lim)` then `minps(r, lim)`: a NaN fails the comparison and takes
    // `-lim`.
    #[allow(clippy::manual_clamp)]
    let r = if r > -lim { r } else { -lim };
    #[allow(clippy::manual_clamp)]
    let r = if r < lim { r } else { lim };
    // SAFETY: `r` is a finite value in [-lim, lim] and `quantize` clamps `lim` below
    // 2^31: in range of i32. (The saturating `as` cast does not vectorize; this one
    // does.)
    unsafe { r.to_int_unchecked::<i32>() }
}

/// `y` rounded up with probability `y - floor(y)` (`u` uniform in `[0, 1)`), down
/// otherwise: unbiased. Computed in f64, where `y - floor(y)` is exact: `(y + u)
/// .floor()` in f32 rounds the sum first, which near 2^21 and above rounds up far more
/// often than the fraction says.
#[inline(always)]
pub(super) fn round_stochastically(y: f32, u: f32) -> f32 {
    let y = f64::from(y);
    let down = y.floor();
    let up = y - down > f64::from(u);
    (down + f64::from(u8::from(up))) as f32
}

/// Quantizes `src * s` to integers of `width` bytes, rounded to nearest (or up with
/// the probability of the fraction, by uniform noise from `dither`), clamped to
/// `±lim`, which must fit `width`.
///
/// The 8- and 16-bit roundings to nearest, the codecs' usual case, go through
/// [`x86::quantize_packed`] with AVX2: LLVM narrowed the vectorized loop's 32-bit
/// integers with a shuffle per eight elements, where two saturating packs narrow
/// thirty-two at once.
pub(crate) fn quantize(
    src: &[f32],
    s: f32,
    lim: f32,
    dither: Option<u64>,
    out: &mut [u8],
    width: usize,
) {
    // The quantizers clamp before they round (`x86::q8`), the same as after only for
    // a bound that is an integer, as every codec's is (`Fixed::limit`).
    debug_assert!(
        lim.is_nan() || lim.fract() == 0.0,
        "quantizing to a bound of {lim}"
    );
    // The largest f32 below 2^31: what keeps the conversion to i32 in range (a NaN
    // `lim`, which `clamp` would pass through, becomes 0).
    let lim = if lim >= 0.0 {
        lim.min(2_147_483_520.0)
    } else {
        0.0
    };
    #[cfg(target_arch = "x86_64")]
    if dither.is_none() && has_v3() {
        match width {
            // SAFETY: the CPU supports every feature `x86::quantize_packed` was
            // compiled for.
            1 => return unsafe { x86::quantize_packed::<1>(src, s, lim.min(127.0), out) },
            // SAFETY: as above.
            2 => return unsafe { x86::quantize_packed::<2>(src, s, lim.min(32_767.0), out) },
            _ => {}
        }
    }
    quantize_loop(src, s, lim, dither, out, width)
}

multiversion! {
    /// [`quantize`] as plain loops, for the widths and roundings without a packed
    /// version and for CPUs without AVX2.
    fn quantize_loop(src: &[f32], s: f32, lim: f32, dither: Option<u64>, out: &mut [u8], width: usize) {
        // Bytes per element: the dithered loop writes `width` (1-4) of each value.
        let w = if dither.is_some() { width.clamp(1, 4) } else { int_bytes(width) };
        from_wide!(src, out, w, |k, src, out| match (dither, w) {
            (None, 1) => {
                for (x, o) in src.iter().zip(out.iter_mut()) {
                    *o = q(*x, s, lim, f32::round_ties_even) as i8 as u8;
                }
            }
            (None, 2) => {
                for (x, o) in src.iter().zip(out.chunks_exact_mut(2)) {
                    o.copy_from_slice(&(q(*x, s, lim, f32::round_ties_even) as i16).to_le_bytes());
                }
            }
            (None, _) => {
                for (x, o) in src.iter().zip(out.chunks_exact_mut(4)) {
                    o.copy_from_slice(&q(*x, s, lim, f32::round_ties_even).to_le_bytes());
                }
            }
            (Some(key), _) => {
                let items = src.iter().zip(out.chunks_exact_mut(w));
                for (i, (x, o)) in (k * BLOCK..).zip(items) {
                    let v = q(*x, s, lim, |y| round_stochastically(y, uniform(key, i)));
                    o.copy_from_slice(&v.to_le_bytes()[..w]);
                }
            }
        })
    }
}

multiversion! {
    /// `out = int(src) * inv` for integers of `width` bytes.
    fn dequantize(src: &[u8], inv: f32, out: &mut [f32], width: usize) {
        let w = int_bytes(width);
        into_wide!(src, w, out, |src, out| match w {
            1 => {
                for (c, o) in src.iter().zip(out.iter_mut()) {
                    *o = f32::from(*c as i8) * inv;
                }
            }
            2 => {
                for (c, o) in src.chunks_exact(2).zip(out.iter_mut()) {
                    *o = f32::from(i16::from_le_bytes([c[0], c[1]])) * inv;
                }
            }
            _ => {
                for (c, o) in src.chunks_exact(4).zip(out.iter_mut()) {
                    *o = i32::from_le_bytes(lane4(c)) as f32 * inv;
                }
            }
        })
    }
}
