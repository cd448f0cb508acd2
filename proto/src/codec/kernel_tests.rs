//! The aggregator's fast sum kernels against plain scalar references: f16 (F16C, and
//! the portable fallback) and i8 (16-bit lanes up to 256 ranks, 32-bit above), on
//! random and extreme inputs, at lengths that are not multiples of a vector and at
//! payload offsets that are not aligned.

use half::f16;

use super::fixed::{Fixed, Room, I8};
use super::{kernels, uniform, Codec, CodecId, F16};

/// Lengths around the vector widths (8 f16 lanes, 16 or 32 i16 lanes, 64 unrolled).
const LENGTHS: [usize; 14] = [0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 1001];

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
