//! The conformance suite: every codec, with and without stochastic rounding, through
//! the same tests: round trips, sums of N ranks within the bound, extremes.

use super::*;
use crate::fixed::{I16, I8};

const WORLDS: [u16; 6] = [1, 2, 3, 4, 8, 64];

/// Every codec with each rounding mode it supports (f32 has nothing to round).
fn variants() -> Vec<(&'static dyn Codec, bool)> {
    ALL.iter()
        .flat_map(|c| {
            let sr = c.id() != CodecId::F32;
            [(*c, false)].into_iter().chain(sr.then_some((*c, true)))
        })
        .collect()
}

/// The chunk's shared block exponent (what the lookahead delivers).
fn e_max(codec: &dyn Codec, inputs: &[Vec<f32>]) -> i8 {
    if !codec.block_scaled() {
        return NO_EXPONENT;
    }
    inputs
        .iter()
        .map(|v| block_exponent(v).expect("finite"))
        .max()
        .unwrap_or(NO_EXPONENT)
}

/// Runs `inputs` (one per rank) through encode, the aggregator's sum and decode, the
/// ranks in the order given.
fn sum_through(codec: &dyn Codec, world: u16, inputs: &[Vec<f32>], sr: Option<u64>) -> Vec<f32> {
    let order: Vec<usize> = (0..inputs.len()).collect();
    sum_in_order(codec, world, inputs, sr, &order)
}

/// [`sum_through`] with the contributions reaching the aggregator in `order`.
fn sum_in_order(
    codec: &dyn Codec,
    world: u16,
    inputs: &[Vec<f32>],
    sr: Option<u64>,
    order: &[usize],
) -> Vec<f32> {
    let shared = e_max(codec, inputs);
    let n = inputs[0].len();
    let mut acc = vec![0u32; n];
    let mut wire = vec![0u8; n * codec.wire_bytes()];
    let mut at = Alignment::EMPTY;
    for &i in order {
        let v = &inputs[i];
        // Each rank's own exponent where the aggregator aligns them, else the shared one.
        let e = if codec.aligns_exponents() {
            block_exponent(v).expect("finite")
        } else {
            shared
        };
        let mut scale = codec.scale(world, e);
        scale.dither = sr.map(|s| s.wrapping_add(i as u64 * 7919));
        codec.encode(v, scale, &mut wire);
        codec.sum_at(&mut acc, world, &mut at, e, &wire);
    }
    codec.store_at(&acc, world, at, &mut wire);
    let e = if codec.aligns_exponents() {
        at.top
    } else {
        shared
    };
    let mut out = vec![0f32; n];
    codec.decode(&wire, codec.result_scale(world, e), &mut out);
    out
}

/// Gradient-like values with a full mantissa over a few binades.
fn inputs(world: u16, n: usize, seed: u64) -> Vec<Vec<f32>> {
    (0..world)
        .map(|r| {
            (0..n)
                .map(|i| {
                    let u = uniform(seed ^ u64::from(r) << 32, i);
                    let v = uniform(seed ^ u64::from(r) << 40 ^ 1, i);
                    (2.0 * u - 1.0) * (0.5 + v) * 2f32.powi((i % 7) as i32 - 5)
                })
                .collect()
        })
        .collect()
}

fn assert_within_bound(codec: &dyn Codec, world: u16, sr: bool, inputs: &[Vec<f32>], out: &[f32]) {
    let e = e_max(codec, inputs);
    for (i, o) in out.iter().enumerate() {
        let exact: f64 = inputs.iter().map(|v| f64::from(v[i])).sum();
        let abs: f64 = inputs.iter().map(|v| f64::from(v[i]).abs()).sum();
        let bound = error_bound(codec, world, e, sr, exact, abs);
        let err = (f64::from(*o) - exact).abs();
        assert!(
            err <= bound,
            "{} sr={sr} world {world} element {i}: {o} vs {exact} (error {err:e} > bound {bound:e})",
            codec.name()
        );
    }
}

#[test]
fn registry_is_consistent() {
    for (i, c) in ALL.iter().enumerate() {
        assert_eq!(lookup(c.id()).map(|x| x.name()), Some(c.name()));
        assert_eq!(by_name(c.name()).map(|x| x.id()), Some(c.id()));
        assert!(ALL[..i]
            .iter()
            .all(|o| o.id() != c.id() && o.name() != c.name()));
    }
    assert_eq!(names(), vec!["f32", "i32", "f16", "bf16", "i16", "i8"]);
    assert!(lookup(CodecId(0)).is_none());
    assert!(by_name("f64").is_none());
}

#[test]
fn block_exponent_bounds_every_value() {
    assert_eq!(block_exponent(&[0.0, -0.0]), Ok(NO_EXPONENT));
    assert_eq!(block_exponent(&[]), Ok(NO_EXPONENT));
    assert_eq!(block_exponent(&[1.0]), Ok(0));
    assert_eq!(block_exponent(&[0.75, -1.5]), Ok(0));
    assert_eq!(block_exponent(&[-2.0]), Ok(1));
    assert_eq!(block_exponent(&[f32::MAX]), Ok(MAX_EXPONENT));
    assert_eq!(block_exponent(&[f32::MIN_POSITIVE]), Ok(-126));
    assert_eq!(block_exponent(&[1e-45]), Ok(MIN_EXPONENT));
    assert_eq!(block_exponent(&[1.0, f32::NAN]), Err(NonFinite));
    assert_eq!(block_exponent(&[f32::NEG_INFINITY]), Err(NonFinite));
    for x in [3.0f32, 1e-30, 7e30, 0.1, 1e-40] {
        let e = i32::from(block_exponent(&[x]).expect("finite"));
        assert!(f64::from(x) < 2f64.powi(e + 1));
    }
}

#[test]
fn one_rank_round_trips_within_bound() {
    for (codec, sr) in variants() {
        let ins = inputs(1, 1000, 3);
        let out = sum_through(codec, 1, &ins, sr.then_some(11));
        assert_within_bound(codec, 1, sr, &ins, &out);
    }
}

#[test]
fn every_codec_sums_within_its_bound() {
    for (codec, sr) in variants() {
        for world in WORLDS.into_iter().filter(|w| *w <= codec.max_world()) {
            for seed in 0..3 {
                let ins = inputs(world, 500, seed);
                let out = sum_through(codec, world, &ins, sr.then_some(seed));
                assert_within_bound(codec, world, sr, &ins, &out);
            }
        }
    }
}

#[test]
fn zeros_stay_exactly_zero() {
    for (codec, sr) in variants() {
        for world in [1u16, 3, 8] {
            let ins = vec![vec![0.0f32; 300]; usize::from(world)];
            let out = sum_through(codec, world, &ins, sr.then_some(5));
            // +0.0 itself, bit for bit (`==` would take -0.0 too).
            assert!(
                out.iter().all(|x| x.to_bits() == 0),
                "{} sr={sr}",
                codec.name()
            );
        }
    }
}

#[test]
fn fixed_point_never_overflows_at_the_extremes() {
    for codec in ALL.iter().filter(|c| c.block_scaled()) {
        for world in [1u16, 2, 3, 4, 8, 64] {
            // The largest magnitude whose sum over 64 ranks is still a finite f32.
            let top = f32::MAX / 64.0;
            for big in [top, -top, 1.0, -1.0, 1e-40, f32::MIN_POSITIVE] {
                // Every rank at the top of the range, with values that round up.
                let v = vec![big, big * 0.999_999_9, -big, 0.0];
                let ins = vec![v; usize::from(world)];
                let out = sum_through(*codec, world, &ins, None);
                assert_within_bound(*codec, world, false, &ins, &out);
                assert_eq!(
                    out[0].signum(),
                    big.signum(),
                    "{}: no wrap-around",
                    codec.name()
                );
                assert_eq!(out[2], -out[0]);
                assert_eq!(out[3], 0.0);
            }
        }
    }
}

#[test]
fn half_floats_carry_non_finite_values_and_overflow_to_infinity() {
    for codec in [&F16 as &dyn Codec, &Bf16, &F32] {
        let out = sum_through(
            codec,
            2,
            &[vec![1.5, f32::INFINITY, f32::NAN], vec![2.25, 1.0, 1.0]],
            None,
        );
        assert_eq!(out[..2], [3.75, f32::INFINITY], "{}", codec.name());
        assert!(out[2].is_nan());
    }
    // Documented: f16 holds at most 65504.
    let out = sum_through(&F16, 2, &[vec![60000.0], vec![60000.0]], None);
    assert_eq!(out[0], f32::INFINITY);
    let out = sum_through(&Bf16, 2, &[vec![3e38], vec![3e38]], None);
    assert_eq!(out[0], f32::INFINITY);
    // Subnormals: f16 keeps them to within its spacing of 2^-24.
    let tiny = 3.0 * 2f32.powi(-24);
    let out = sum_through(&F16, 1, &[vec![tiny]], None);
    assert_eq!(out[0], tiny);
}

#[test]
fn hostile_payloads_wrap_without_panicking() {
    for codec in ALL {
        let mut acc = vec![0u32; 3];
        let junk = [0xffu8, 0xff, 0xff, 0x7f, 0, 0, 0, 0x80, 1, 2, 3, 4];
        codec.sum_first(&mut acc, 2, &junk[..3 * codec.wire_bytes()]);
        codec.sum_add(&mut acc, 2, &junk[..3 * codec.wire_bytes()]);
        codec.sum_add(&mut acc, 2, &junk[..3]);
        let mut out = vec![0u8; 3 * codec.wire_bytes()];
        codec.sum_store(&acc, 2, &mut out);
        // And through the aligning path, at every extreme of the exponents, in 16- and
        // 32-bit lanes alike.
        for world in [2u16, 300] {
            let mut at = Alignment::EMPTY;
            for e in [NO_EXPONENT, MAX_EXPONENT, MIN_EXPONENT, 0, MAX_EXPONENT, -3] {
                codec.sum_at(&mut acc, world, &mut at, e, &junk[..3 * codec.wire_bytes()]);
            }
            codec.store_at(&acc, world, at, &mut out);
        }
    }
}

#[test]
fn block_exponents_in_one_pass_are_each_blocks_own() {
    // Against `block_exponent` block by block: chunks one element past a block, with
    // blocks of other scales, all zero, subnormal, or holding a NaN or an infinity.
    let b = EXPONENT_BLOCK;
    for len in [b + 1, 2 * b, 3 * b - 5, 8 * b - 1] {
        let k = len.div_ceil(b);
        for case in 0..4 {
            let mut v: Vec<f32> = (0..len)
                .map(|i| (((i * 7919) % 1000) as f32 - 500.0) * 2f32.powi(-((i / b) as i32) * 5))
                .collect();
            let last = (k - 1) * b;
            match case {
                0 => {}
                1 => v[b..(2 * b).min(len)].fill(0.0),
                2 => v[last..]
                    .iter_mut()
                    .for_each(|x| *x = f32::from_bits(1 + x.to_bits() % 7)),
                _ => {
                    v[len - 1] = if len % 2 == 0 {
                        f32::NAN
                    } else {
                        f32::INFINITY
                    }
                }
            }
            let mut got = vec![Ok(0); k];
            block_exponents_of(&v, &mut got);
            let want: Vec<_> = v.chunks(b).map(block_exponent).collect();
            assert_eq!(got, want, "len {len} case {case}");
            // One block is the whole chunk, as for codecs with one exponent per chunk.
            let mut whole = [Ok(0)];
            block_exponents_of(&v, &mut whole);
            assert_eq!(
                whole[0],
                block_exponent(&v),
                "len {len} case {case}, one block"
            );
        }
    }
}

#[test]
fn hostile_block_exponents_and_short_payloads_change_no_lane_outside_the_chunk() {
    // A chunk of three exponent blocks and one element over, summed block by block
    // (`sum_blocks`): trailing exponents at every extreme, and payloads shorter than
    // the chunk's (cut inside the data or inside the trailer), never panic, and the
    // stored result has the chunk's payload layout.
    let count = 2 * EXPONENT_BLOCK + 1;
    let codec: &dyn Codec = &I8;
    assert_eq!(exponent_blocks(codec, count), 3);
    assert_eq!(payload_bytes(codec, count), count + 2);
    assert_eq!(exponent_blocks(&I16, count), 1);
    assert_eq!(payload_bytes(&I16, count), 2 * count);
    let extremes = [NO_EXPONENT, MIN_EXPONENT, -1, 0, MAX_EXPONENT];
    for world in [2u16, 300] {
        let mut acc = vec![0u32; count + 8];
        let mut at = [Alignment::EMPTY; MAX_BLOCKS];
        for (k, &e) in extremes.iter().enumerate() {
            let mut payload: Vec<u8> = (0..count).map(|i| (i * 37 + k) as u8).collect();
            payload.extend([extremes[(k + 1) % 5] as u8, extremes[(k + 3) % 5] as u8]);
            for len in [payload.len(), count + 1, count, EXPONENT_BLOCK + 5, 0] {
                sum_blocks(codec, &mut acc[..count], world, &mut at, e, &payload[..len]);
            }
        }
        assert!(acc[count..].iter().all(|&x| x == 0), "lanes past the chunk");
        let mut out = vec![0u8; payload_bytes(codec, count)];
        let first = store_blocks(codec, &acc[..count], world, &at, &mut out);
        let got = block_exponents(codec, count, first, &out);
        assert_eq!(got.as_slice(), &[at[0].top, at[1].top, at[2].top]);
    }
}

/// Ranks whose tensors differ in magnitude by `2^spread` from the first to the last.
fn spread_inputs(world: u16, n: usize, seed: u64, spread: i32) -> Vec<Vec<f32>> {
    let mut ins = inputs(world, n, seed);
    for (r, v) in ins.iter_mut().enumerate() {
        let k = 2f32.powi(-(spread * r as i32) / i32::from(world.max(2) - 1));
        v.iter_mut().for_each(|x| *x *= k);
    }
    ins
}

#[test]
fn aligned_sums_do_not_depend_on_the_order_of_arrival() {
    // Spreads within the 16-bit lanes' span (4 at four ranks), beyond it (so the lanes
    // widen, at the first contribution or later) and up to the 32-bit lanes' span (22).
    // A binade below each span: a block's exponent may sit one off its rank's scale.
    for (world, spread) in [
        (4u16, 0),
        (4, 4),
        (4, 12),
        (4, 21),
        (3, 9),
        (8, 20),
        (64, 16),
    ] {
        let ins = spread_inputs(world, 300, u64::from(world) * 31 + spread as u64, spread);
        let forward: Vec<usize> = (0..usize::from(world)).collect();
        let reference = sum_in_order(&I8, world, &ins, None, &forward);
        assert_within_bound(&I8, world, false, &ins, &reference);
        let mut orders = vec![forward.iter().rev().copied().collect::<Vec<_>>()];
        // Every rotation, and the largest in the middle.
        orders.extend((1..forward.len()).map(|k| {
            let mut o = forward.clone();
            o.rotate_left(k);
            o
        }));
        for order in orders {
            let out = sum_in_order(&I8, world, &ins, None, &order);
            let same = out
                .iter()
                .zip(&reference)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "world {world} spread {spread}: order {order:?} changed the sum"
            );
        }
    }
}

#[test]
fn an_all_zero_block_aligns_nothing() {
    // Rank 1's chunk is zero: it has no exponent, adds nothing, and the others' sum
    // stays in 16-bit lanes, whichever comes first.
    let world = 4;
    let mut ins = inputs(world, 300, 21);
    ins[1].fill(0.0);
    let mut results = Vec::new();
    for order in [[1, 0, 2, 3], [0, 2, 1, 3], [3, 2, 0, 1]] {
        let mut acc = vec![0u32; 300];
        let mut wire = vec![0u8; 300];
        let mut at = Alignment::EMPTY;
        for &r in &order {
            let e = block_exponent(&ins[r]).expect("finite");
            I8.encode(&ins[r], I8.scale(world, e), &mut wire);
            I8.sum_at(&mut acc, world, &mut at, e, &wire);
        }
        assert!(
            !at.wide,
            "order {order:?}: the zero block widened the lanes"
        );
        I8.store_at(&acc, world, at, &mut wire);
        results.push((at.top, wire.clone()));
    }
    assert!(results.iter().all(|r| r == &results[0]));
    let order: Vec<usize> = (0..4).collect();
    assert_within_bound(
        &I8,
        world,
        false,
        &ins,
        &sum_in_order(&I8, world, &ins, None, &order),
    );
    // Zero blocks alone keep no exponent, and sum to zero.
    let zeros = vec![vec![0.0f32; 8]; 2];
    assert!(sum_through(&I8, 2, &zeros, None)
        .iter()
        .all(|x| x.to_bits() == 0));
}

#[test]
fn aligned_sums_stay_within_bound_at_any_spread() {
    // Wider than any lanes' span: the smaller contributions round, within the bound.
    for (world, spread) in [(2u16, 40), (4, 60), (3, 200), (8, 100)] {
        let ins = spread_inputs(world, 200, spread as u64, spread);
        let forward: Vec<usize> = (0..usize::from(world)).collect();
        let backward: Vec<usize> = forward.iter().rev().copied().collect();
        for order in [forward, backward] {
            let out = sum_in_order(&I8, world, &ins, None, &order);
            assert_within_bound(&I8, world, false, &ins, &out);
        }
    }
}

#[test]
fn aligning_exponents_beats_sharing_one_where_ranks_differ() {
    // Ranks a factor 2^6 apart: with one shared exponent the small ones lose six of
    // their seven bits; aligned, each keeps its own.
    let world = 4;
    let ins = spread_inputs(world, 4000, 5, 6);
    let shared = Fixed::new(CodecId(252), "i8-shared", 8, Room::Widen);
    let rms = |out: &[f32]| rms_error(&ins, out);
    let aligned = rms(&sum_through(&I8, world, &ins, None));
    let one = rms(&sum_through(&shared, world, &ins, None));
    assert!(aligned < one, "aligned {aligned:e}, shared {one:e}");
}

/// The root mean square of `out`'s errors against the exact sums of `ins`.
fn rms_error(ins: &[Vec<f32>], out: &[f32]) -> f64 {
    let s: f64 = out
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let exact: f64 = ins.iter().map(|v| f64::from(v[i])).sum();
            (f64::from(*o) - exact).powi(2)
        })
        .sum();
    (s / out.len() as f64).sqrt()
}

#[test]
fn widening_beats_headroom() {
    // The same bytes on the wire: 8 ranks of i8 (or i16), contributions quantized with
    // headroom against widened in the aggregator. Widening must be better.
    let world = 8;
    let ins = inputs(world, 4000, 9);
    for (wide, narrow) in [
        (
            I8,
            Fixed::new(CodecId(250), "i8-headroom", 8, Room::Headroom),
        ),
        (
            I16,
            Fixed::new(CodecId(251), "i16-headroom", 16, Room::Headroom),
        ),
    ] {
        let rms = |out: &[f32]| rms_error(&ins, out);
        let e_wide = rms(&sum_through(&wide, world, &ins, None));
        let e_narrow = rms(&sum_through(&narrow, world, &ins, None));
        assert!(
            e_wide * 2.0 < e_narrow,
            "{}: widened {e_wide:e}, headroom {e_narrow:e}",
            wide.name()
        );
    }
}

#[test]
fn stochastic_rounding_is_unbiased_where_nearest_is_not() {
    // Values a quarter step above a representable one, in a chunk whose largest value
    // is 1 (so the fixed-point step is 2^-(bits-2)): nearest always rounds down.
    let cases: Vec<(&dyn Codec, f32, f64)> = vec![
        (&I8, 0.5, 2f64.powi(-6)),
        (&I16, 0.5, 2f64.powi(-14)),
        (&fixed::I32, 2f32.powi(-20), 2f64.powi(-30)),
        (&F16, 1.0, 2f64.powi(-10)),
        (&Bf16, 1.0, 2f64.powi(-7)),
    ];
    for (codec, base, step) in cases {
        let x = base + (0.25 * step) as f32;
        assert_eq!(f64::from(x) - f64::from(base), 0.25 * step);
        let trials = 20_000;
        let mut sum_sr = 0f64;
        for t in 0..trials {
            sum_sr += f64::from(sum_through(codec, 1, &[vec![1.0, x]], Some(t))[1]) - f64::from(x);
        }
        let rn = f64::from(sum_through(codec, 1, &[vec![1.0, x]], None)[1]) - f64::from(x);
        let mean_sr = sum_sr / trials as f64;
        assert!(
            rn.abs() > 0.2 * step,
            "{}: nearest should be biased ({rn:e})",
            codec.name()
        );
        assert!(
            mean_sr.abs() < 0.03 * step,
            "{}: mean error {mean_sr:e}, step {step:e}",
            codec.name()
        );
    }
}

#[test]
fn uniform_is_uniform_enough() {
    let n = 100_000;
    let mean: f64 = (0..n).map(|i| f64::from(uniform(42, i))).sum::<f64>() / n as f64;
    assert!((mean - 0.5).abs() < 0.01);
    assert!((0..n).all(|i| (0.0..1.0).contains(&uniform(7, i))));
}

/// What the independent bound knows of a codec: its wire format as the module
/// documentation describes it, not anything its code computes.
#[derive(Debug, Clone, Copy)]
enum Format {
    /// f32 on the wire, summed in f32 lanes in the order of arrival.
    F32,
    /// A float of `sig` significant bits whose subnormals lie `tiny` apart; summed in
    /// f32 lanes, the sum rounded back to nearest.
    Half { sig: i32, tiny: f64 },
    /// `bits`-bit fixed point at a block's scale, where every value lies below the
    /// power of two above the block's largest magnitude. With `headroom` a contribution
    /// gives up `ceil(log2 N)` bits so that the sum of `N` fits; without, it keeps
    /// every bit and the sum is rounded once to a scale `ceil(log2 N)` bits coarser
    /// and clamped to the width. With `own`, each rank scales at its own block's
    /// largest magnitude (the sum at the largest of all), else all at the largest.
    Fixed {
        bits: i32,
        headroom: bool,
        own: bool,
    },
}

fn format(codec: &dyn Codec) -> Format {
    match codec.id() {
        CodecId::F32 => Format::F32,
        CodecId::F16 => Format::Half {
            sig: 11,
            tiny: 2f64.powi(-24),
        },
        CodecId::BF16 => Format::Half {
            sig: 8,
            tiny: 2f64.powi(-133),
        },
        CodecId::I32 => Format::Fixed {
            bits: 32,
            headroom: true,
            own: false,
        },
        CodecId::I16 => Format::Fixed {
            bits: 16,
            headroom: false,
            own: false,
        },
        CodecId::I8 => Format::Fixed {
            bits: 8,
            headroom: false,
            own: true,
        },
        id => panic!("no format known for {id:?}"),
    }
}

/// The smallest power of two above every `|x|` of `v` (0 for an all-zero `v`),
/// found by doubling and halving in f64.
fn power_above(v: &[f32]) -> f64 {
    let m = v.iter().map(|x| f64::from(*x).abs()).fold(0.0, f64::max);
    if m == 0.0 {
        return 0.0;
    }
    let mut t = 1.0f64;
    while t <= m {
        t *= 2.0;
    }
    while t / 2.0 > m {
        t /= 2.0;
    }
    t
}

/// Each element's error bound for `ins` (one chunk per rank, in one exponent block)
/// summed through a codec of format `f` by `world` ranks, derived from the format and
/// the f64 sums alone (none of `error_bound`, `sum_error`, `scale` or `precision`):
/// - f32: the sum's `N - 1` f32 additions, `gamma(N - 1)` of the magnitudes' sum;
/// - half floats: each contribution off by half a unit in its last place (a whole
///   one, stochastically), at most `2^-sig` of its magnitude plus half the subnormal
///   spacing; the f32 sum of those; the sum rounded to nearest;
/// - fixed point: each contribution off by half a step of its scale (a whole step
///   stochastically, or where the value lies within a step of the top and is
///   clamped); the integer sum exact; without headroom, its rounding to the result's
///   scale, half a step of it or a whole one where the clamp to the width may cut;
///   the result's conversion to f32.
///
/// Returns the bounds and, for fixed point, the bound of an element that is not zero
/// nor clamped, which any element of the chunk may meet (a zero's bound is zero here,
/// where a bound of the scale alone cannot tell it from its neighbours).
fn independent_bounds(f: Format, world: u16, sr: bool, ins: &[Vec<f32>]) -> (Vec<f64>, f64) {
    let n = f64::from(world);
    let h = n.log2().ceil() as i32;
    let u32_ = 2f64.powi(-24);
    let gamma = |k: f64| k * u32_ / (1.0 - k * u32_);
    let len = ins[0].len();
    let exact = |i: usize| ins.iter().map(|v| f64::from(v[i])).sum::<f64>();
    let abs = |i: usize| ins.iter().map(|v| f64::from(v[i]).abs()).sum::<f64>();
    match f {
        Format::F32 => ((0..len).map(|i| gamma(n - 1.0) * abs(i)).collect(), 0.0),
        Format::Half { sig, tiny } => {
            let u = 2f64.powi(-sig);
            let k = if sr { 2.0 } else { 1.0 };
            let each = (0..len)
                .map(|i| {
                    let c: f64 = ins
                        .iter()
                        .map(|v| k * (u * f64::from(v[i]).abs() + tiny / 2.0))
                        .sum();
                    let acc = gamma(n - 1.0) * (abs(i) + c);
                    let s = exact(i).abs() + c + acc;
                    c + acc + u * s + tiny / 2.0
                })
                .collect();
            (each, 0.0)
        }
        Format::Fixed {
            bits,
            headroom,
            own,
        } => {
            let p = if headroom { bits - 1 - h } else { bits - 1 };
            let all: Vec<f32> = ins.iter().flatten().copied().collect();
            let top = power_above(&all);
            let tops: Vec<f64> = ins
                .iter()
                .map(|v| if own { power_above(v) } else { top })
                .collect();
            let result_step = top * 2f64.powi(if headroom { -p } else { h - p });
            let widest = 2f64.powi(bits - 1) - 1.0;
            let k = if sr { 1.0 } else { 0.5 };
            let floor = tops.iter().map(|t| k * t * 2f64.powi(-p)).sum::<f64>()
                + if headroom { 0.0 } else { result_step / 2.0 };
            let each = (0..len)
                .map(|i| {
                    let c: f64 = ins
                        .iter()
                        .zip(&tops)
                        .map(|(v, t)| {
                            let x = f64::from(v[i]).abs();
                            let q = t * 2f64.powi(-p);
                            if x == 0.0 {
                                0.0
                            } else if sr || x > t - q {
                                q
                            } else {
                                q / 2.0
                            }
                        })
                        .sum();
                    let reach = exact(i).abs() + c;
                    let last = if headroom {
                        0.0
                    } else if reach >= (widest - 1.0) * result_step {
                        result_step
                    } else {
                        result_step / 2.0
                    };
                    c + last + u32_ * (reach + last)
                })
                .collect();
            (each, floor)
        }
    }
}

/// A case of the independent-bound tests: `world` ranks' chunks of `n` elements from
/// `seed`, each rank at its own scale (up to 2^8 apart either way, within every
/// aligned sum's span), elements spread over ten binades below it, with zeros and
/// values just below the rank's power of two (which round up into the clamp).
fn bound_case(world: u16, n: usize, seed: u64) -> Vec<Vec<f32>> {
    (0..u64::from(world))
        .map(|r| {
            let key = seed ^ r.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let scale = (uniform(key, usize::MAX) * 17.0).floor() as i32 - 8;
            (0..n)
                .map(|i| {
                    let kind = (uniform(key ^ 1, i) * 16.0) as u32;
                    let sign = if uniform(key ^ 2, i) < 0.5 { -1.0 } else { 1.0 };
                    let binade = -((uniform(key ^ 3, i) * 11.0) as i32);
                    match kind {
                        0 => 0.0,
                        1 => sign * (1.0 - f32::EPSILON / 2.0) * 2f32.powi(scale),
                        _ => {
                            let m = 0.5 + 0.5 * uniform(key ^ 4, i);
                            sign * m * 2f32.powi(scale + binade)
                        }
                    }
                })
                .collect()
        })
        .collect()
}

/// `0..world` in an order drawn from `seed`: rotated, and reversed half the time.
fn arrival(world: u16, seed: u64) -> Vec<usize> {
    let mut o: Vec<usize> = (0..usize::from(world)).collect();
    o.rotate_left((seed % u64::from(world)) as usize);
    if seed & 1 == 1 {
        o.reverse();
    }
    o
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Every codec's sums, with either rounding, over many seeds, world sizes and
    /// orders of arrival, lie within the bound derived from first principles; and the
    /// code's own `error_bound`, which every end-to-end check uses, is no looser than
    /// four times it plus `N + 2` f32 roundings of the magnitudes' sum (which
    /// `error_bound` charges every codec, integer sums included) and the step of an
    /// all-zero block's scale, so that a bound grown loose would not let wrong sums
    /// pass those checks.
    #[test]
    fn sums_lie_within_an_independent_bound_and_error_bound_stays_near_it(
        c in 0..ALL.len(),
        sr in proptest::bool::ANY,
        world in proptest::sample::select(vec![1u16, 2, 3, 4, 5, 8, 13, 33, 64]),
        n in 1usize..200,
        seed in proptest::prelude::any::<u64>(),
    ) {
        let codec = ALL[c];
        let sr = sr && codec.id() != CodecId::F32;
        let ins = bound_case(world, n, seed);
        let order = arrival(world, seed >> 8);
        let out = sum_in_order(codec, world, &ins, sr.then_some(seed), &order);
        let (bounds, floor) = independent_bounds(format(codec), world, sr, &ins);
        let e = e_max(codec, &ins);
        for (i, (o, b)) in out.iter().zip(&bounds).enumerate() {
            let exact: f64 = ins.iter().map(|v| f64::from(v[i])).sum();
            let abs: f64 = ins.iter().map(|v| f64::from(v[i]).abs()).sum();
            let err = (f64::from(*o) - exact).abs();
            proptest::prop_assert!(
                err <= *b,
                "{} sr={} world {} element {}: {} vs {} (error {:e} > bound {:e})",
                codec.name(), sr, world, i, o, exact, err, b
            );
            let theirs = error_bound(codec, world, e, sr, exact, abs);
            // A step of the scale that blocks of no magnitude get per rank, and N + 2
            // f32 roundings of the magnitudes' sum.
            let n = f64::from(world);
            let slack = (n + 1.0) * 2f64.powi(-126) + (n + 2.0) * 2f64.powi(-24) * abs;
            proptest::prop_assert!(
                theirs <= 4.0 * b.max(floor) + slack,
                "{} sr={} world {} element {}: error_bound {:e} against {:e}",
                codec.name(), sr, world, i, theirs, b
            );
        }
    }
}

/// The independent bound is tight enough to matter: on gradient-like sums of a few
/// thousand elements, each codec's worst error reaches at least half of it, so that a
/// codec off by one bit of scale (twice the error) would exceed it.
#[test]
fn the_independent_bound_is_reached_within_a_small_factor() {
    for codec in ALL.iter().filter(|c| c.id() != CodecId::F32) {
        for world in [2u16, 4, 8] {
            let ins = inputs(world, 4000, u64::from(world));
            let out = sum_through(*codec, world, &ins, None);
            let (bounds, _) = independent_bounds(format(*codec), world, false, &ins);
            let worst = out
                .iter()
                .zip(&bounds)
                .enumerate()
                .map(|(i, (o, b))| {
                    let exact: f64 = ins.iter().map(|v| f64::from(v[i])).sum();
                    (f64::from(*o) - exact).abs() / b
                })
                .fold(0.0, f64::max);
            assert!(
                (0.5..=1.0).contains(&worst),
                "{} world {world}: worst error {worst} of the bound",
                codec.name()
            );
        }
    }
}

/// [`sum_in_order`] in two levels: each rack's contributions summed and stored as a
/// partial sum in its wire form ([`crate::partial`]: packed in groups), the partials
/// added at the top, the result stored there. Every rank quantizes with the whole
/// job's world, as in a flat job.
fn sum_in_levels(
    codec: &dyn Codec,
    world: u16,
    inputs: &[Vec<f32>],
    sr: Option<u64>,
    racks: &[Vec<usize>],
) -> Vec<f32> {
    let shared = e_max(codec, inputs);
    let n = inputs[0].len();
    let mut wire = vec![0u8; n * codec.wire_bytes()];
    let (mut payload, mut scratch) = (Vec::new(), Vec::new());
    let (mut top, mut top_at) = (vec![0u32; n], [Alignment::EMPTY; MAX_BLOCKS]);
    for rack in racks {
        let (mut acc, mut at) = (vec![0u32; n], Alignment::EMPTY);
        for &i in rack {
            let e = if codec.aligns_exponents() {
                block_exponent(&inputs[i]).expect("finite")
            } else {
                shared
            };
            let mut scale = codec.scale(world, e);
            scale.dither = sr.map(|s| s.wrapping_add(i as u64 * 7919));
            codec.encode(&inputs[i], scale, &mut wire);
            codec.sum_at(&mut acc, world, &mut at, e, &wire);
        }
        let mut ats = [Alignment::EMPTY; MAX_BLOCKS];
        ats[0] = at;
        payload.clear();
        crate::partial::encode(codec, &acc, world, &ats, &mut scratch, &mut payload);
        crate::partial::add(codec, &mut top, world, &mut top_at, &payload, &mut scratch);
    }
    codec.store_at(&top, world, top_at[0], &mut wire);
    let e = if codec.aligns_exponents() {
        top_at[0].top
    } else {
        shared
    };
    let mut out = vec![0f32; n];
    codec.decode(&wire, codec.result_scale(world, e), &mut out);
    out
}

#[test]
fn partial_sums_in_two_levels_store_the_flat_result() {
    // Racks of rank blocks, even and not; for i8, exponents spread within the narrow
    // lanes' span, beyond it, and up to the wide lanes' span.
    let splits: [(u16, &[usize]); 5] = [
        (2, &[1, 1]),
        (4, &[2, 2]),
        (4, &[1, 3]),
        (8, &[3, 3, 2]),
        (64, &[16, 16, 16, 16]),
    ];
    for (codec, sr) in variants() {
        for &(world, sizes) in &splits {
            for spread in [0, 4, 12] {
                let seed = u64::from(world) * 131 + spread as u64;
                let ins = spread_inputs(world, 300, seed, spread);
                let sr = sr.then_some(seed);
                let mut racks = Vec::new();
                let mut next = 0;
                for &k in sizes {
                    racks.push((next..next + k).collect::<Vec<_>>());
                    next += k;
                }
                let flat = sum_through(codec, world, &ins, sr);
                let levels = sum_in_levels(codec, world, &ins, sr, &racks);
                if codec.block_scaled() {
                    let same = flat
                        .iter()
                        .zip(&levels)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{} sr={} world {world} racks {sizes:?} spread {spread}: not the flat result",
                        codec.name(),
                        sr.is_some()
                    );
                } else {
                    assert_within_bound(codec, world, sr.is_some(), &ins, &levels);
                }
            }
        }
    }
}
