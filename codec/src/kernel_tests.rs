//! The fast kernels against plain scalar references, on random and extreme inputs, at
//! lengths that are not multiples of a vector and at payload offsets that are not
//! aligned: the aggregator's sums (f16 with F16C and the portable fallback; i8 in
//! 16-bit lanes up to 256 ranks, 32-bit above) and the workers' encoders (fixed-point
//! quantization at every width and rounding, f32 to bf16, f32 to f16 and back).

use half::f16;

use super::fixed::{Fixed, Room, I8};
use super::{kernels, uniform, AggregatorCodec, Codec, CodecId, F16};

/// Lengths around the vector widths (8 f16 lanes, 16 or 32 i16 lanes, 64 unrolled)
/// and the blocks of 256 elements between two prefetches.
const LENGTHS: [usize; 17] = [
    0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 255, 256, 257, 1001,
];

/// f16 bit patterns at the edges: zeros, the smallest and largest subnormals, the
/// smallest normal, one, the largest finite value, infinities, quiet and signaling
/// NaNs (with payloads), each with both signs.
const F16_EDGES: [u16; 10] = [
    0x0000, 0x0001, 0x03ff, 0x0400, 0x3c00, 0x7bff, 0x7c00, 0x7e00, 0x7d01, 0x7fff,
];

/// A random f16 for element `i` of stream `key`: one in four from [`F16_EDGES`] (with
/// a random sign), the rest any bit pattern.
fn f16_bits(key: u64, i: usize) -> u16 {
    let r = (uniform(key, i) * 16_777_216.0) as u32;
    let sign = ((r >> 16) as u16 & 1) << 15;
    if r & 3 == 0 {
        F16_EDGES[(r >> 2) as usize % F16_EDGES.len()] | sign
    } else {
        (r >> 2) as u16
    }
}

/// A sum kernel: lanes, payload.
type Kernel = fn(&mut [u32], &[u8]);

/// The value of a rank's element.
type Fill<'a> = &'a dyn Fn(u16, usize) -> i8;

/// f32 bits equal, or both NaN (which NaN an addition returns is not specified).
fn same_f32(a: u32, b: u32) -> bool {
    a == b || (f32::from_bits(a).is_nan() && f32::from_bits(b).is_nan())
}

#[test]
fn f16_widening_is_exact_for_every_bit_pattern() {
    let all: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
    let mut acc = vec![0u32; 1 << 16];
    let loads: [Kernel; 2] = [kernels::load_f16, kernels::f16_lanes_portable::<false>];
    for load in loads {
        load(&mut acc, &all);
        for (h, a) in (0..=u16::MAX).zip(&acc) {
            let want = f16::from_bits(h).to_f32_const().to_bits();
            assert!(same_f32(*a, want), "{h:#06x}: {a:#010x}, want {want:#010x}");
            assert_eq!(a >> 31, want >> 31, "{h:#06x}: sign");
        }
    }
}

#[test]
fn f16_sum_matches_scalar_reference() {
    let paths: [(&str, Kernel, Kernel); 2] = [
        ("dispatched", kernels::load_f16, kernels::add_f16),
        (
            "portable",
            kernels::f16_lanes_portable::<false>,
            kernels::f16_lanes_portable::<true>,
        ),
    ];
    for (name, load, add) in paths {
        for n in LENGTHS {
            for offset in [0, 1] {
                let world = 5;
                let mut want = vec![0f32; n];
                // Guard lanes after the chunk: the kernels must not touch them.
                let mut acc = vec![0xdead_beef_u32; n + 3];
                for r in 0..world {
                    let key = (n as u64) << 8 | r;
                    let bits: Vec<u16> = (0..n).map(|i| f16_bits(key, i)).collect();
                    let mut wire = vec![0u8; offset];
                    wire.extend(bits.iter().flat_map(|b| b.to_le_bytes()));
                    let payload = &wire[offset..];
                    for (w, b) in want.iter_mut().zip(&bits) {
                        let x = f16::from_bits(*b).to_f32_const();
                        *w = if r == 0 { x } else { *w + x };
                    }
                    if r == 0 {
                        load(&mut acc[..n], payload);
                    } else {
                        add(&mut acc[..n], payload);
                    }
                }
                for (i, (a, w)) in acc.iter().zip(&want).enumerate() {
                    assert!(
                        same_f32(*a, w.to_bits()),
                        "{name} n={n} offset={offset} element {i}: {} vs {w}",
                        f32::from_bits(*a)
                    );
                }
                assert!(acc[n..].iter().all(|a| *a == 0xdead_beef), "{name} n={n}");
                // And through the codec, rounded back to f16.
                let mut out = vec![0u8; 2 * n];
                F16.sum_store(&acc[..n], 5, &mut out);
                for (c, w) in out.chunks_exact(2).zip(&want) {
                    let got = f16::from_le_bytes([c[0], c[1]]);
                    let want = f16::from_f32_const(*w);
                    assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()));
                }
            }
        }
    }
}

/// The scalar reference of a widened fixed-point sum: the exact sum of the payloads'
/// integers, shifted right by `shift` rounding half up, clamped to `±lim`.
fn fixed_reference(payloads: &[Vec<u8>], shift: u32, lim: i64) -> Vec<u8> {
    let n = payloads.first().map_or(0, Vec::len);
    (0..n)
        .map(|i| {
            let sum: i64 = payloads.iter().map(|p| i64::from(p[i] as i8)).sum();
            let half = (1i64 << shift) >> 1;
            ((sum + half) >> shift).clamp(-lim, lim) as i8 as u8
        })
        .collect()
}

/// `world` payloads of `n` bytes each, filled by `fill(rank, element)`.
fn i8_payloads(world: u16, n: usize, fill: impl Fn(u16, usize) -> i8) -> Vec<Vec<u8>> {
    (0..world)
        .map(|r| (0..n).map(|i| fill(r, i) as u8).collect())
        .collect()
}

/// Sums `payloads` through `codec` as the aggregator does, into a slot of `n` words
/// with guard words around it, and checks the lane layout: up to 256 ranks, 16-bit
/// lanes in the front half of the words, the back half untouched.
fn i8_through(codec: &Fixed, world: u16, payloads: &[Vec<u8>]) -> Vec<u8> {
    let n = payloads.first().map_or(0, Vec::len);
    let mut slot = vec![0x5555_5555u32; n + 2];
    let acc = &mut slot[1..n + 1];
    for (r, p) in payloads.iter().enumerate() {
        if r == 0 {
            codec.sum_first(acc, world, p);
        } else {
            codec.sum_add(acc, world, p);
        }
    }
    let mut out = vec![0u8; n];
    codec.sum_store(acc, world, &mut out);
    let back_untouched = slot[1 + n.div_ceil(2)..n + 1]
        .iter()
        .all(|w| *w == 0x5555_5555);
    if n >= 2 {
        assert_eq!(
            back_untouched,
            world <= 256,
            "{} world {world}",
            codec.name()
        );
    }
    assert_eq!(
        [slot[0], slot[n + 1]],
        [0x5555_5555; 2],
        "{}: guard words",
        codec.name()
    );
    out
}

#[test]
fn i8_sum_matches_scalar_reference_at_every_lane_layout() {
    // 16-bit lanes up to 256 ranks (the largest and the first beyond), 32-bit lanes
    // above, up to the codec's largest world.
    let worlds = [1u16, 2, 3, 4, 200, 255, 256, 257, 300, I8.max_world()];
    assert_eq!(I8.max_world(), u16::MAX);
    for world in worlds {
        let shift = super::fixed::ceil_log2(world);
        let lengths: &[usize] = if world > 300 { &[1, 33] } else { &LENGTHS };
        for &n in lengths {
            let key = u64::from(world) << 16 | n as u64;
            let random = |r: u16, i: usize| {
                (uniform(key ^ u64::from(r) << 32, i) * 256.0) as i32 as u8 as i8
            };
            let fills: [(&str, Fill); 4] = [
                ("random", &random),
                ("all -128", &|_, _| i8::MIN),
                ("all 127", &|_, _| i8::MAX),
                // Extremes and random values mixed: sums anywhere in the range.
                ("mixed", &|r, i| match (r as usize + i) % 3 {
                    0 => i8::MIN,
                    1 => i8::MAX,
                    _ => random(r, i),
                }),
            ];
            for (what, fill) in fills {
                let payloads = i8_payloads(world, n, fill);
                let got = i8_through(&I8, world, &payloads);
                assert_eq!(
                    got,
                    fixed_reference(&payloads, shift, 127),
                    "i8 world {world} n={n} {what}"
                );
                // The same lanes serve the headroom variant, which stores without a
                // shift (clamped: its honest sums fit, these need not).
                if world <= 300 {
                    let headroom = Fixed::new(CodecId(252), "i8-headroom", 8, Room::Headroom);
                    assert_eq!(
                        i8_through(&headroom, world, &payloads),
                        fixed_reference(&payloads, 0, 127),
                        "i8-headroom world {world} n={n} {what}"
                    );
                }
            }
        }
    }
}

#[test]
fn i8_sum_of_256_extremes_reaches_the_ends_of_16_bit_lanes() {
    // -128 * 256 = -32768 and 127 * 256 = 32512: the edge of i16, exactly.
    let n = 65;
    for (v, want) in [(i8::MIN, -128i8), (i8::MAX, 127)] {
        let payloads = i8_payloads(256, n, |_, _| v);
        let got = i8_through(&I8, 256, &payloads);
        // Shifted right by 8 bits: -32768 / 256 = -128, clamped to -127; 32512 / 256
        // = 127.
        let want = want.max(-127) as u8;
        assert!(got.iter().all(|b| *b == want), "{v}: {got:?}");
    }
}

/// f32 inputs at the edges of quantization: zeros of both signs, ties at every
/// position around the limits, values just inside and outside them, the largest
/// finite values, infinities and NaNs; `lim` is the codec's largest integer.
fn quantize_inputs(key: u64, lim: f32, n: usize) -> Vec<f32> {
    let edges = [
        0.0,
        -0.0,
        0.5,
        1.5,
        2.5,
        -0.5,
        -2.5,
        lim,
        lim - 0.5,
        lim + 0.5,
        lim + 0.49,
        lim + 1.0,
        -lim - 0.5,
        -lim + 0.5,
        -lim - 1.0,
        4_194_303.5,
        8_388_607.0,
        2_147_483_520.0,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
    ];
    (0..n)
        .map(|i| {
            let r = uniform(key, i);
            if i % 3 == 0 {
                edges[(r * edges.len() as f32) as usize % edges.len()]
            } else {
                (r - 0.5) * 2.5 * lim
            }
        })
        .collect()
}

/// What `quantize` must give for one value: `x * s` rounded (to nearest, ties to even,
/// or up where the element's noise lies below the fraction), then clamped to `±lim`;
/// NaN to `-lim`.
fn quantize_reference(x: f32, s: f32, lim: f32, dither: Option<(u64, usize)>) -> i64 {
    let y = x * s;
    if y.is_nan() {
        return -(lim as i64);
    }
    let r = match dither {
        None => f64::from(y).round_ties_even(),
        Some((key, i)) => {
            let (y, u) = (f64::from(y), f64::from(uniform(key, i)));
            y.floor() + if y - y.floor() > u { 1.0 } else { 0.0 }
        }
    };
    r.clamp(-f64::from(lim), f64::from(lim)) as i64
}

/// Stochastic rounding is unbiased wherever the fraction is representable: rounding
/// `y + u` in f32 first rounded values near 2^21 up half again as often as their
/// fraction says, and exact integers near 2^24 up at times.
#[test]
fn stochastic_rounding_rounds_up_as_often_as_the_fraction_says() {
    let n = 200_000;
    // 2^21 + 1/4 and -(2^20 + 3/4): exact in f32, each a quarter above its floor.
    let (near_2_21, near_2_20) = ((1u32 << 21) as f32 + 0.25, -((1u32 << 20) as f32 + 0.75));
    for (y, frac) in [
        (0.3f32, 0.3f64),
        (near_2_21, 0.25),
        (near_2_20, 0.25),
        (16_777_000.0, 0.0),
    ] {
        let src = vec![y; n];
        let mut out = vec![0u8; 4 * n];
        kernels::quantize(&src, 1.0, 2_147_483_520.0, Some(0xabcd), &mut out, 4);
        let floor = f64::from(y).floor();
        let ups = out
            .chunks_exact(4)
            .map(|o| f64::from(i32::from_le_bytes([o[0], o[1], o[2], o[3]])))
            .inspect(|&v| assert!(v == floor || v == floor + 1.0, "{y}: {v}"))
            .filter(|&v| v > floor)
            .count();
        let p = ups as f64 / n as f64;
        // Five standard deviations of a binomial proportion.
        let sd = (frac * (1.0 - frac) / n as f64).sqrt();
        assert!(
            (p - frac).abs() <= 5.0 * sd + 1e-9,
            "{y}: rounded up {p}, want {frac}"
        );
    }
}

#[test]
fn quantize_matches_scalar_reference_at_every_width_and_rounding() {
    check_quantize();
    kernels::tests_force_baseline::with(check_quantize);
}

fn check_quantize() {
    // The limits the fixed-point codecs use (i8, i16, i32 with and without headroom).
    let cases: [(usize, f32); 5] = [
        (1, 127.0),
        (2, 32_767.0),
        (4, 2_147_483_520.0),
        (4, 536_870_911.0),
        (4, 1_048_575.0),
    ];
    for (case, (width, lim)) in cases.into_iter().enumerate() {
        for &len in &LENGTHS {
            for offset in [0usize, 1] {
                let src = quantize_inputs(case as u64 * 1000 + len as u64, lim, len + offset);
                let src = &src[offset..];
                for s in [1.0f32, 0.25] {
                    for dither in [None, Some(0xfeed_u64 + len as u64)] {
                        let mut out = vec![0u8; len * width + 3];
                        let out = &mut out[3..];
                        kernels::quantize(src, s, lim, dither, out, width);
                        for (i, (x, o)) in src.iter().zip(out.chunks_exact(width)).enumerate() {
                            let mut b = [0u8; 4];
                            b[..width].copy_from_slice(o);
                            // Sign-extend the little-endian integer of `width` bytes.
                            let bits = 32 - 8 * width as u32;
                            let got = i64::from((i32::from_le_bytes(b) << bits) >> bits);
                            let want = quantize_reference(*x, s, lim, dither.map(|k| (k, i)));
                            assert_eq!(
                                got, want,
                                "width {width} lim {lim} s {s} dither {dither:?} x {x:e} at {i}/{len}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn bf16_encoding_matches_half_crate_to_nearest_even_and_dithers_as_defined() {
    check_bf16();
    kernels::tests_force_baseline::with(check_bf16);
}

fn check_bf16() {
    let edges = [
        0.0f32,
        -0.0,
        1.0 + f32::EPSILON,
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001),
        f32::from_bits(0xff80_0001),
    ];
    for &len in &LENGTHS {
        let src: Vec<f32> = (0..len)
            .map(|i| {
                let r = (uniform(len as u64, i) * 16_777_216.0) as u32;
                if r % 4 == 0 {
                    edges[(r >> 2) as usize % edges.len()]
                } else {
                    f32::from_bits(r.wrapping_mul(0x9e37_79b9))
                }
            })
            .collect();
        let mut out = vec![0u8; 2 * len + 1];
        kernels::to_bf16(&src, None, &mut out[1..]);
        for (i, (x, o)) in src.iter().zip(out[1..].chunks_exact(2)).enumerate() {
            let got = u16::from_le_bytes([o[0], o[1]]);
            let want = half::bf16::from_f32(*x);
            if x.is_nan() {
                assert!(
                    half::bf16::from_bits(got).is_nan(),
                    "NaN {:#x} became {got:#x}",
                    x.to_bits()
                );
            } else {
                assert_eq!(got, want.to_bits(), "{x:e} ({:#x}) at {i}", x.to_bits());
            }
        }
        // Stochastic: the bits below the cut plus 16 bits of the element's noise, cut.
        let key = 0xb16 + len as u64;
        kernels::to_bf16(&src, Some(key), &mut out[1..]);
        for (i, (x, o)) in src.iter().zip(out[1..].chunks_exact(2)).enumerate() {
            let got = u16::from_le_bytes([o[0], o[1]]);
            if x.is_nan() {
                assert!(half::bf16::from_bits(got).is_nan(), "{got:#x}");
                continue;
            }
            let noise = (f64::from(uniform(key, i)) * 65536.0).floor() as u32;
            let want = (x.to_bits().wrapping_add(noise) >> 16) as u16;
            assert_eq!(got, want, "{x:e} at {i} with noise {noise}");
        }
    }
}

/// f32 values at f16's edges: zeros, ties between neighbouring halves (even and odd
/// below), the largest finite half and the ties and values around it, overflow,
/// subnormal halves and their ties, below the smallest subnormal, infinities, NaNs.
fn f16_edge_inputs() -> Vec<f32> {
    let mut v = vec![
        0.0,
        1.0,
        1.0 + 2f32.powi(-11),       // tie: to 1.0 (even)
        1.0 + 3.0 * 2f32.powi(-11), // tie: up to the even neighbour
        65504.0,
        65519.99,
        65520.0, // tie between 65504 and infinity: infinity
        1e6,
        f32::MAX,
        2f32.powi(-24),       // the smallest subnormal half
        2f32.powi(-25),       // tie with zero: zero (even)
        3.0 * 2f32.powi(-25), // tie: up to 2^-23
        2f32.powi(-26),
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        6.103_515_6e-5, // the smallest normal half
        f32::INFINITY,
        f32::NAN,
        f32::from_bits(0x7f80_0001), // a signaling NaN
        f32::from_bits(0x7fc1_2345), // a NaN with a payload
    ];
    let neg: Vec<f32> = v.iter().map(|x| -x).collect();
    v.extend(neg);
    v
}

#[test]
fn f16_narrowing_matches_half_at_edges_and_random_values() {
    type Narrow = fn(&[f32], &mut [u8]);
    let paths: [(&str, Narrow); 2] = [
        ("dispatched", kernels::to_f16),
        ("portable", kernels::to_f16_portable),
    ];
    let edges = f16_edge_inputs();
    for (name, narrow) in paths {
        for n in LENGTHS {
            for offset in [0, 1] {
                // Half from the edges, half any bit pattern scaled into f16's range.
                let src: Vec<f32> = (0..n)
                    .map(|i| {
                        let r = uniform(n as u64, i);
                        if i % 2 == 0 {
                            edges[(r * edges.len() as f32) as usize % edges.len()]
                        } else {
                            f32::from_bits((r * 16_777_216.0) as u32 * 127 + 0x3000_0000)
                                * if i % 4 == 1 { 1.0 } else { -1.0 }
                        }
                    })
                    .collect();
                // Guard bytes around the output: the kernel must not touch them.
                let mut out = vec![0xa5u8; offset + 2 * n + 3];
                narrow(&src, &mut out[offset..offset + 2 * n]);
                assert!(out[..offset].iter().all(|&b| b == 0xa5), "{name}: before");
                assert!(
                    out[offset + 2 * n..].iter().all(|&b| b == 0xa5),
                    "{name}: after"
                );
                for (i, x) in src.iter().enumerate() {
                    let o = offset + 2 * i;
                    let got = f16::from_le_bytes([out[o], out[o + 1]]);
                    let want = f16::from_f32(*x);
                    if want.is_nan() {
                        assert!(got.is_nan(), "{name}: {x:e} gave {got:?}");
                    } else {
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{name}: {x:e} (n {n}, i {i})"
                        );
                    }
                }
            }
        }
    }
    // Every f16 value goes back to itself through f32.
    let all: Vec<f32> = (0..=u16::MAX)
        .map(f16::from_bits)
        .filter(|h| !h.is_nan())
        .map(f16::to_f32)
        .collect();
    let mut wire = vec![0u8; 2 * all.len()];
    kernels::to_f16(&all, &mut wire);
    let mut back = vec![0f32; all.len()];
    kernels::from_f16(&wire, &mut back);
    for (a, b) in all.iter().zip(&back) {
        assert_eq!(a.to_bits(), b.to_bits());
    }
}

/// The scalar reference of [`kernels::sum_store_i8`]: the contributions' integers,
/// each shifted left by its `shl`, added in wrapping 16-bit lanes, then stored as the
/// lanes' store does (`(sum + half) >> shift` in 32 bits, clamped to `±lim`).
fn sum_store_reference(srcs: &[&[u8]], shl: &[u32], shift: u32, lim: i32) -> Vec<u8> {
    let n = srcs.iter().map(|s| s.len()).min().unwrap_or(0);
    let half = (1i32 << shift) >> 1;
    (0..n)
        .map(|i| {
            let sum = srcs.iter().zip(shl).fold(0i16, |a, (s, &k)| {
                a.wrapping_add(i16::from(s[i] as i8) << k)
            });
            ((i32::from(sum) + half) >> shift).clamp(-lim, lim) as i8 as u8
        })
        .collect()
}

#[test]
fn i8_one_pass_sum_and_store_matches_scalar_reference() {
    check_sum_store();
    kernels::tests_force_baseline::with(check_sum_store);
}

fn check_sum_store() {
    // Up to four contributions (what a slot stages), shifts in and beyond the 16-bit
    // lanes' exact range (the kernel wraps, as the lanes do), every store shift, and
    // payloads at offsets that are not aligned.
    let shls: [&[u32]; 6] = [
        &[0],
        &[0, 0],
        &[3, 0, 5],
        &[0, 1, 2, 3],
        &[6, 6, 6, 6],
        &[15, 9, 0, 12],
    ];
    for (c, shl) in shls.iter().enumerate() {
        for &n in &LENGTHS {
            let bufs: Vec<Vec<u8>> = (0..shl.len())
                .map(|k| {
                    (0..n + 3)
                        .map(|i| match (i + k) % 7 {
                            0 => i8::MIN as u8,
                            1 => i8::MAX as u8,
                            _ => (uniform((c * 16 + k) as u64, i) * 256.0) as u8,
                        })
                        .collect()
                })
                .collect();
            let srcs: Vec<&[u8]> = bufs
                .iter()
                .enumerate()
                .map(|(k, b)| &b[k % 3..k % 3 + n])
                .collect();
            for shift in [0, 1, 2, 7, 8, 15] {
                let want = sum_store_reference(&srcs, shl, shift, 127);
                let mut out = vec![0xa5u8; n + 1];
                kernels::sum_store_i8(&srcs, shl, shift, 127, &mut out[..n]);
                assert_eq!(&out[..n], &want[..], "shl {shl:?} n={n} shift {shift}");
                assert_eq!(out[n], 0xa5, "wrote past the end");
            }
        }
    }
}
