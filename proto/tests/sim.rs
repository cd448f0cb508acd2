//! The protocol under loss, duplication and reordering, in the deterministic simulator:
//! every run finishes, every rank gets the same bits, and those bits are the lossless
//! run's.

use inagg_proto::codec::{self, CodecId};
use inagg_proto::sim::{Sim, SimConfig};
use inagg_proto::worker::WorkerConfig;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const WORLDS: [u16; 5] = [1, 2, 3, 4, 8];
/// Lossy seeds per codec and world size.
const SEEDS: u64 = 200;

fn configs(job: u32, world: u16, codec: CodecId, chunk: u16, window: u32) -> Vec<WorkerConfig> {
    (0..world)
        .map(|r| {
            let mut c = WorkerConfig::new(job, r, world, codec);
            c.chunk_elems = chunk;
            c.window = window;
            c.secret = b"sim".to_vec();
            c
        })
        .collect()
}

/// Seeded inputs: small integers for f32 (so every sum is exact), wide-ranging reals
/// for fixed point.
fn inputs(seed: u64, world: u16, len: usize, integers: bool) -> Vec<Vec<f32>> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..world)
        .map(|_| {
            (0..len)
                .map(|i| {
                    if integers {
                        rng.random_range(-1000i32..=1000) as f32
                    } else {
                        // Chunks of very different magnitudes exercise the block scale.
                        let mag = 2f32.powi((i / 16 % 12) as i32 - 6);
                        rng.random_range(-1.0f32..1.0) * mag
                    }
                })
                .collect()
        })
        .collect()
}

fn exact(inputs: &[Vec<f32>]) -> Vec<f64> {
    let mut sum = vec![0f64; inputs[0].len()];
    for v in inputs {
        for (s, x) in sum.iter_mut().zip(v) {
            *s += f64::from(*x);
        }
    }
    sum
}

/// Results as their bits, for comparisons bit for bit: `==` on f32 takes -0.0 for 0.0
/// and never takes a NaN for itself.
trait Bits {
    type Out: PartialEq + std::fmt::Debug;
    fn bits(&self) -> Self::Out;
}

impl Bits for f32 {
    type Out = u32;
    fn bits(&self) -> u32 {
        self.to_bits()
    }
}

impl<T: Bits> Bits for [T] {
    type Out = Vec<T::Out>;
    fn bits(&self) -> Self::Out {
        self.iter().map(Bits::bits).collect()
    }
}

impl<T: Bits> Bits for Vec<T> {
    type Out = Vec<T::Out>;
    fn bits(&self) -> Self::Out {
        self.as_slice().bits()
    }
}

/// Every element within the codec's bound (`codec::error_bound`, itself held to one
/// derived from first principles in the codec's tests), chunk by chunk.
fn check_bound(codec: CodecId, inputs: &[Vec<f32>], out: &[f32], chunk: usize, world: u16) {
    check_bound_sr(codec, false, inputs, out, chunk, world)
}

/// [`check_bound`], with stochastic rounding or not.
fn check_bound_sr(
    codec: CodecId,
    stochastic: bool,
    inputs: &[Vec<f32>],
    out: &[f32],
    chunk: usize,
    world: u16,
) {
    let codec = codec::lookup(codec).expect("codec");
    assert_eq!(out.len(), inputs[0].len(), "{}", codec.name());
    for start in (0..out.len()).step_by(chunk) {
        let range = start..(start + chunk).min(out.len());
        let e_max = if codec.block_scaled() {
            inputs
                .iter()
                .map(|v| codec::block_exponent(&v[range.clone()]).expect("finite"))
                .max()
                .expect("ranks")
        } else {
            inagg_proto::wire::NO_EXPONENT
        };
        for i in range {
            let exact: f64 = inputs.iter().map(|v| f64::from(v[i])).sum();
            let abs: f64 = inputs.iter().map(|v| f64::from(v[i]).abs()).sum();
            let bound = codec::error_bound(codec, world, e_max, stochastic, exact, abs);
            let err = (f64::from(out[i]) - exact).abs();
            assert!(
                err <= bound,
                "{} element {i}: error {err} above bound {bound}",
                codec.name()
            );
        }
    }
}

fn check_i32_bound(inputs: &[Vec<f32>], out: &[f32], chunk: usize, world: u16) {
    check_bound(CodecId::I32, inputs, out, chunk, world)
}

/// A codec with options.
#[derive(Debug, Clone, Copy)]
struct Variant {
    codec: CodecId,
    stochastic: bool,
    skip_zeros: bool,
}

/// Runs `rounds` allreduces; returns every rank's outputs of every round.
fn run(
    sim_cfg: SimConfig,
    world: u16,
    v: Variant,
    len: usize,
    seed: u64,
    rounds: usize,
) -> Vec<Vec<Vec<f32>>> {
    let mut cfgs = configs(9, world, v.codec, 64, 8);
    for c in &mut cfgs {
        c.stochastic_rounding = v.stochastic.then_some(seed);
        c.skip_zeros = v.skip_zeros;
    }
    let mut sim = Sim::new(sim_cfg, Default::default(), cfgs);
    (0..rounds)
        .map(|round| {
            sim.allreduce(round_inputs(world, v, len, seed, round))
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: {e}"))
        })
        .collect()
}

/// The inputs of round `round` of [`run`].
fn round_inputs(world: u16, v: Variant, len: usize, seed: u64, round: usize) -> Vec<Vec<f32>> {
    let integers = !codec::lookup(v.codec).expect("codec").block_scaled();
    let mut ins = inputs(seed * 31 + round as u64, world, len + round * 7, integers);
    if v.skip_zeros {
        // Every third chunk zero on every rank.
        for r in &mut ins {
            for (c, chunk) in r.chunks_mut(64).enumerate() {
                if c % 3 == 1 {
                    chunk.fill(0.0);
                }
            }
        }
    }
    ins
}

#[test]
fn lossy_runs_match_lossless_bit_for_bit() {
    let plain = |codec| Variant {
        codec,
        stochastic: false,
        skip_zeros: false,
    };
    // f32 and i32 over 200 seeds each; the other codecs and the options over 20.
    let mut variants: Vec<(Variant, u64)> =
        vec![(plain(CodecId::F32), SEEDS), (plain(CodecId::I32), SEEDS)];
    for c in [CodecId::F16, CodecId::BF16, CodecId::I16, CodecId::I8] {
        variants.push((plain(c), 20));
    }
    variants.push((
        Variant {
            codec: CodecId::I8,
            stochastic: true,
            skip_zeros: true,
        },
        20,
    ));
    variants.push((
        Variant {
            codec: CodecId::F16,
            stochastic: true,
            skip_zeros: true,
        },
        20,
    ));
    let mut runs = 0;
    for (v, seeds) in variants {
        for (wi, &world) in WORLDS.iter().enumerate() {
            // Lengths that are not multiples of the chunk (64) nor of the window.
            let len = 1000 + 37 * wi;
            let reference = run(SimConfig::lossless(0), world, v, len, wi as u64, 2);
            for (r, round) in reference.iter().enumerate() {
                assert!(
                    round.iter().all(|out| out.bits() == round[0].bits()),
                    "ranks disagree without loss"
                );
                // The bits every lossy run must give are the sums (a run that lost
                // every result the same way would agree with it too).
                let ins = round_inputs(world, v, len, wi as u64, r);
                check_bound_sr(v.codec, v.stochastic, &ins, &round[0], 64, world);
            }
            for s in 0..seeds {
                let lossy = run(SimConfig::lossy(1000 + s), world, v, len, wi as u64, 2);
                assert_eq!(
                    lossy.bits(),
                    reference.bits(),
                    "{v:?} world {world} seed {s}"
                );
                runs += 1;
            }
        }
    }
    assert_eq!(runs, WORLDS.len() as u64 * (2 * SEEDS + 6 * 20));
}

/// Runs one i8 allreduce of `ins` (job `job`, chunks of `chunk`, a window of
/// `window`) without loss, checks that every rank got the same result, then under ten
/// lossy, duplicating and reordering paths (seeds from `seed`), each of which must
/// give the lossless run's bits; returns the lossless run's outputs.
fn i8_runs_agree_under_loss(
    job: u32,
    world: u16,
    chunk: u16,
    window: u32,
    ins: &[Vec<f32>],
    seed: u64,
) -> Vec<Vec<f32>> {
    let once = |cfg: SimConfig| {
        let cfgs = configs(job, world, CodecId::I8, chunk, window);
        let mut sim = Sim::new(cfg, Default::default(), cfgs);
        sim.allreduce(ins.to_vec()).expect("allreduce")
    };
    let reference = once(SimConfig::lossless(0));
    assert!(
        reference.iter().all(|o| o.bits() == reference[0].bits()),
        "ranks disagree"
    );
    for s in 0..10 {
        assert_eq!(
            once(SimConfig::lossy(seed + s)).bits(),
            reference.bits(),
            "world {world} seed {s}"
        );
    }
    reference
}

#[test]
fn i8_ranks_of_different_magnitudes_align_alike_under_loss() {
    // Each rank quantizes at its own block exponent and the aggregator aligns them:
    // ranks 2^3 apart (beyond the 16-bit lanes' span at 4 and 8 ranks, so lanes widen),
    // under loss, duplication and reordering, give the lossless run's bits, within the
    // bound of one shared exponent.
    for world in [2u16, 4, 8] {
        let mut ins = inputs(77 + u64::from(world), world, 1000, false);
        for (r, v) in ins.iter_mut().enumerate() {
            let k = 2f32.powi(-3 * r as i32);
            v.iter_mut().for_each(|x| *x *= k);
        }
        let reference = i8_runs_agree_under_loss(3, world, 64, 8, &ins, 500);
        check_bound(CodecId::I8, &ins, &reference[0], 64, world);
    }
}

#[test]
fn i8_chunks_of_several_exponent_blocks_keep_each_blocks_precision() {
    // Chunks of three 8 Ki-element exponent blocks (and a last, shorter chunk of one),
    // whose blocks lie 2^8 apart in magnitude: each block is quantized at its own
    // exponent, so each is within the bound of its own, where one exponent for the
    // chunk would round the small blocks to zero. Under loss, duplication and
    // reordering the bits are the lossless run's, retransmissions included.
    let block = codec::EXPONENT_BLOCK;
    let chunk = 3 * block;
    for world in [1u16, 3, 4] {
        let mut ins = inputs(91 + u64::from(world), world, 2 * chunk + 5000, false);
        for v in &mut ins {
            for (i, x) in v.iter_mut().enumerate() {
                *x *= 2f32.powi(-8 * ((i % chunk) / block) as i32);
            }
        }
        let reference = i8_runs_agree_under_loss(4, world, chunk as u16, 4, &ins, 700);
        check_bound(CodecId::I8, &ins, &reference[0], block, world);
        // The small blocks keep their values: not one all-zero block of results.
        for (b, out) in reference[0].chunks(block).enumerate() {
            assert!(
                out.iter().any(|&x| x != 0.0),
                "world {world} block {b} lost"
            );
        }
    }
}

#[test]
fn zero_skipping_sees_every_exponent_block_of_an_i8_chunk() {
    // With --skip-zeros the exponent lookahead says which chunks are zero on every
    // rank. A chunk whose first exponent block is zero but whose second is not is not
    // such a chunk: it travels, and its sum is the one without skipping.
    let block = codec::EXPONENT_BLOCK;
    let chunk = 2 * block;
    let world = 3u16;
    let mut ins = inputs(5, world, 3 * chunk, false);
    for v in &mut ins {
        // Chunk 0: first block zero; chunk 2: wholly zero.
        v[..block].fill(0.0);
        v[2 * chunk..].fill(0.0);
    }
    let run = |skip: bool| {
        let mut cfgs = configs(6, world, CodecId::I8, chunk as u16, 4);
        for c in &mut cfgs {
            c.skip_zeros = skip;
        }
        let mut sim = Sim::new(SimConfig::lossless(0), Default::default(), cfgs);
        sim.allreduce(ins.clone()).expect("allreduce")
    };
    let plain = run(false);
    let skipping = run(true);
    assert!(skipping.bits() == plain.bits(), "skipping changed the sums");
    assert!(plain[0][block..chunk].iter().any(|&x| x != 0.0));
}

#[test]
fn error_feedback_tracks_the_accumulated_sum() {
    // Small values next to a large one in the same chunk: i8 rounds them to zero every
    // time. Over many steps, error feedback delivers what rounding held back.
    let steps = 60;
    let input: Vec<f32> = (0..64)
        .map(|i| if i == 0 { 1.0 } else { 0.003 + i as f32 * 1e-5 })
        .collect();
    let mut drift = Vec::new();
    for feedback in [None, Some(17)] {
        let mut sim = Sim::new(
            SimConfig::lossy(2),
            Default::default(),
            configs(1, 2, CodecId::I8, 64, 8),
        );
        sim.feedback = feedback;
        let mut acc = vec![0f64; 64];
        for _ in 0..steps {
            let out = sim
                .allreduce(vec![input.clone(), input.clone()])
                .expect("allreduce");
            for (a, o) in acc.iter_mut().zip(&out[0]) {
                *a += f64::from(*o);
            }
        }
        let worst = (1..64)
            .map(|i| (acc[i] - 2.0 * steps as f64 * f64::from(input[i])).abs())
            .fold(0.0, f64::max);
        drift.push(worst);
    }
    let (without, with) = (drift[0], drift[1]);
    assert!(
        without > 0.3,
        "without feedback the small values vanish: drift {without}"
    );
    assert!(with * 10.0 < without, "feedback drift {with} vs {without}");
}

#[test]
fn zero_skipping_saves_the_bytes_of_zero_chunks() {
    for codec in [CodecId::F32, CodecId::I32, CodecId::F16, CodecId::I8] {
        let world = 3;
        let mut ins = inputs(4, world, 64 * 60, codec == CodecId::F32);
        // Half of the chunks zero on every rank; one more zero on one rank only.
        for r in &mut ins {
            for (c, chunk) in r.chunks_mut(64).enumerate() {
                if c % 2 == 0 {
                    chunk.fill(0.0);
                }
            }
        }
        ins[0][64..128].fill(0.0);
        let mut sent = Vec::new();
        let mut outs = Vec::new();
        for skip in [false, true] {
            let mut cfgs = configs(1, world, codec, 64, 8);
            for c in &mut cfgs {
                c.skip_zeros = skip;
            }
            let mut sim = Sim::new(SimConfig::lossless(1), Default::default(), cfgs);
            outs.push(sim.allreduce(ins.clone()).expect("allreduce"));
            sent.push(sim.last_stats(0).expect("stats").bytes_sent as f64);
        }
        assert_eq!(
            outs[0].bits(),
            outs[1].bits(),
            "{codec:?}: results change with skipping"
        );
        let c = codec::lookup(codec).expect("codec");
        let payload = 64.0 * 60.0 * c.wire_bytes() as f64;
        // Half the payload is gone; headers (and the priming window) remain. A codec
        // that aligns exponents primes only to skip: its window of 8 headers is new.
        let priming = if c.aligns_exponents() {
            8.0 * inagg_proto::wire::DATA_HEADER_LEN as f64
        } else {
            0.0
        };
        assert!(
            sent[0] - sent[1] > 0.45 * payload - priming,
            "{codec:?}: {} -> {}",
            sent[0],
            sent[1]
        );
    }
}

#[test]
fn f32_sums_of_integers_are_exact() {
    for &world in &WORLDS {
        let mut sim = Sim::new(
            SimConfig::lossy(5),
            Default::default(),
            configs(1, world, CodecId::F32, 64, 8),
        );
        let ins = inputs(77, world, 999, true);
        let want: Vec<f32> = exact(&ins).iter().map(|x| *x as f32).collect();
        let out = sim.allreduce(ins).expect("allreduce");
        for o in &out {
            assert_eq!(o.bits(), want.bits());
        }
    }
}

#[test]
fn i32_error_is_within_block_scaling_bound() {
    for &world in &WORLDS {
        for seed in 0..5 {
            let mut sim = Sim::new(
                SimConfig::lossy(seed),
                Default::default(),
                configs(1, world, CodecId::I32, 64, 8),
            );
            let ins = inputs(seed, world, 1999, false);
            let out = sim.allreduce(ins.clone()).expect("allreduce");
            check_i32_bound(&ins, &out[0], 64, world);
        }
    }
}

#[test]
fn many_allreduces_in_a_row_with_loss() {
    // Sequence numbers run on across allreduces; stale packets of earlier ones, delayed
    // past their allreduce's end, must never be taken for current ones.
    let mut cfg = SimConfig::lossy(3);
    cfg.reorder = 0.2;
    cfg.reorder_delay = std::time::Duration::from_millis(30);
    let mut sim = Sim::new(cfg, Default::default(), configs(2, 4, CodecId::I32, 16, 4));
    let mut lossless = Sim::new(
        SimConfig::lossless(0),
        Default::default(),
        configs(2, 4, CodecId::I32, 16, 4),
    );
    for round in 0..30u64 {
        let ins = inputs(round, 4, 10 + (round as usize * 13) % 100, false);
        let a = sim.allreduce(ins.clone()).expect("lossy");
        let b = lossless.allreduce(ins).expect("lossless");
        assert_eq!(a.bits(), b.bits(), "round {round}");
    }
}

#[test]
fn empty_and_tiny_tensors() {
    for codec in [CodecId::F32, CodecId::I32] {
        let mut sim = Sim::new(
            SimConfig::lossy(8),
            Default::default(),
            configs(3, 3, codec, 64, 8),
        );
        assert_eq!(
            sim.allreduce(vec![vec![]; 3]).expect("empty"),
            vec![Vec::<f32>::new(); 3]
        );
        let out = sim
            .allreduce(vec![vec![1.0], vec![2.0], vec![4.0]])
            .expect("one element");
        assert_eq!(out.bits(), vec![vec![7.0f32]; 3].bits());
        let out = sim.allreduce(vec![vec![0.0; 200]; 3]).expect("zeros");
        assert_eq!(out.bits(), vec![vec![0.0f32; 200]; 3].bits());
    }
}

#[test]
fn heavy_loss_still_finishes() {
    let mut cfg = SimConfig::lossy(11);
    cfg.loss = 0.3;
    let mut sim = Sim::new(cfg, Default::default(), configs(4, 4, CodecId::I32, 32, 16));
    let ins = inputs(1, 4, 3000, false);
    let out = sim
        .allreduce(ins.clone())
        .expect("allreduce under 30% loss");
    check_i32_bound(&ins, &out[0], 32, 4);
    assert!(out.iter().all(|o| o.bits() == out[0].bits()));
}

#[test]
fn a_rank_that_starts_late_costs_the_others_probes_not_payload() {
    use std::time::Duration;
    for (codec, loss) in [
        (CodecId::I32, false),
        (CodecId::F32, false),
        (CodecId::I8, true),
    ] {
        let world = 4;
        let (chunk, window, chunks) = (256u16, 16u32, 40usize);
        let len = usize::from(chunk) * chunks;
        let ins = inputs(7, world, len, codec == CodecId::F32);
        let mut reference = Sim::new(
            SimConfig::lossless(1),
            Default::default(),
            configs(2, world, codec, chunk, window),
        );
        let want = reference.allreduce(ins.clone()).expect("allreduce");
        let cfg = if loss {
            SimConfig::lossy(3)
        } else {
            SimConfig::lossless(3)
        };
        let mut sim = Sim::new(
            cfg,
            Default::default(),
            configs(2, world, codec, chunk, window),
        );
        // The last rank comes 1.5 s late: the others' timers fire many times meanwhile.
        let mut starts = vec![Duration::ZERO; usize::from(world)];
        starts[3] = Duration::from_millis(1500);
        let got = sim.allreduce_staggered(ins, &starts).expect("allreduce");
        assert_eq!(
            got.bits(),
            want.bits(),
            "{codec:?}: a late rank changed the result"
        );
        let width = codec::lookup(codec).expect("codec").wire_bytes() as u64;
        let window_bytes = u64::from(window) * (u64::from(chunk) * width + 40);
        for r in 0..3 {
            let st = sim.last_stats(r).expect("stats");
            assert!(
                st.retransmissions >= 3 * u64::from(window),
                "{codec:?}: {st:?}"
            );
            assert!(st.probes > 0, "{codec:?}: {st:?}");
            // One retransmission of the window with payload (it learns the aggregator
            // holds it), probes after that; a lossy path resends a little more.
            let payload_retx = st.retransmitted_bytes - 40 * st.probes;
            let allowed = if loss { 3 * window_bytes } else { window_bytes };
            assert!(
                payload_retx <= allowed,
                "{codec:?} rank {r}: {payload_retx} bytes of payload resent, {st:?}"
            );
        }
    }
}

#[test]
fn congestion_marks_move_every_ranks_window_together() {
    let world = 3;
    let (chunk, window) = (64u16, 64u32);
    let len = usize::from(chunk) * 200;
    let mut sim = Sim::new(
        SimConfig::lossless(5),
        Default::default(),
        configs(3, world, CodecId::I32, chunk, window),
    );
    let ins = inputs(11, world, len, false);
    let want = sim.allreduce(ins.clone()).expect("allreduce");
    let windows = |sim: &Sim| -> Vec<u64> {
        (0..usize::from(world))
            .map(|i| sim.worker(i).congestion_window())
            .collect()
    };
    assert_eq!(windows(&sim), vec![u64::from(window); 3]);
    // The aggregator falls behind: every result is marked, every rank halves alike.
    sim.aggregator_mut().set_backlogged(true);
    let got = sim.allreduce(ins.clone()).expect("allreduce");
    assert_eq!(got.bits(), want.bits(), "marks change no result");
    let low = windows(&sim);
    assert!(low.iter().all(|w| *w == low[0]), "{low:?}");
    assert!(low[0] <= u64::from(window) / 8, "{low:?}");
    let marks = sim.last_stats(0).expect("stats").marks;
    assert!(marks > 0);
    // It catches up: unmarked results grow the windows back, still together.
    sim.aggregator_mut().set_backlogged(false);
    for _ in 0..5 {
        assert_eq!(
            sim.allreduce(ins.clone()).expect("allreduce").bits(),
            want.bits()
        );
    }
    let high = windows(&sim);
    assert!(high.iter().all(|w| *w == high[0]), "{high:?}");
    assert!(high[0] > low[0] + 10, "{low:?} -> {high:?}");
}

/// Jobs of the bottleneck tests: two ranks, f32 chunks of 256 elements, 64 slots asked.
const BN_WORLD: u16 = 2;
const BN_CHUNK: u16 = 256;
const BN_WINDOW: u32 = 64;

/// What one of those jobs' slots costs.
fn bn_slot_bytes() -> usize {
    let f32 = codec::lookup(CodecId::F32).expect("f32");
    inagg_proto::aggregator::slot_bytes(
        usize::from(BN_CHUNK),
        inagg_proto::aggregator::kept_bytes(f32, usize::from(BN_CHUNK)),
        BN_WORLD,
    )
}

/// A bottleneck run: per-job ATE/s, each job's window at the end, the most slot
/// memory the aggregator held.
struct Shared {
    ate: Vec<f64>,
    windows: Vec<u32>,
    peak: usize,
    regrants: u64,
}

/// Per-job ATE/s of jobs sharing one bottleneck into the aggregator, running
/// allreduces back to back; `jobs` lists (job id, chunks per tensor).
fn shared_bottleneck(jobs: &[(u32, usize)]) -> Vec<f64> {
    shared_bottleneck_with(jobs, None, std::time::Duration::ZERO).ate
}

/// The same with the aggregator's slot memory `budget`; job `j` (counting from 0)
/// joins `j * stagger` after the first (all within the warm-up).
fn shared_bottleneck_with(
    jobs: &[(u32, usize)],
    budget: Option<usize>,
    stagger: std::time::Duration,
) -> Shared {
    use inagg_proto::aggregator::AggregatorConfig;
    use inagg_proto::sim::Bottleneck;
    use std::time::Duration;
    let (world, chunk, window) = (BN_WORLD, BN_CHUNK, BN_WINDOW);
    let cfg = SimConfig {
        bottleneck: Some(Bottleneck {
            bytes_per_sec: 50e6,
            queue_bytes: 256 << 10,
            mark_bytes: 32 << 10,
            drain: None,
        }),
        ..SimConfig::lossless(9)
    };
    let mut cfgs = Vec::new();
    let mut ins = Vec::new();
    for &(job, chunks) in jobs {
        cfgs.extend(configs(job, world, CodecId::F32, chunk, window));
        ins.extend(inputs(
            u64::from(job),
            world,
            usize::from(chunk) * chunks,
            true,
        ));
    }
    let agg = AggregatorConfig {
        slot_memory: budget,
        ..AggregatorConfig::default()
    };
    let mut sim = Sim::new(cfg, agg, cfgs);
    for j in 1..jobs.len() {
        for r in 0..usize::from(world) {
            sim.delay_join(j * usize::from(world) + r, stagger * j as u32);
        }
    }
    let (counts, span) = sim
        .run_continuously(ins, Duration::from_millis(200), Duration::from_millis(1200))
        .expect("run");
    assert!(
        sim.net.marked > 0,
        "the bottleneck never marked: {:?}",
        sim.net
    );
    let ate = jobs
        .iter()
        .enumerate()
        .map(|(j, &(_, chunks))| {
            let done = counts[j * usize::from(world)];
            done as f64 * (usize::from(chunk) * chunks) as f64 / span.as_secs_f64()
        })
        .collect();
    let windows = jobs
        .iter()
        .map(|&(id, _)| sim.aggregator().job_slots(id).unwrap_or(0))
        .collect();
    Shared {
        ate,
        windows,
        peak: sim.peak_slot_memory,
        regrants: sim.regrants,
    }
}

fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let squares: f64 = x.iter().map(|x| x * x).sum();
    sum * sum / (x.len() as f64 * squares)
}

/// Without congestion control this fails: the jobs' shares drift far apart; with AIMD
/// on the bottleneck's marks they come out nearly equal, and together about the
/// throughput of one job alone (docs/performance.md, "Congestion control").
#[test]
fn jobs_sharing_a_bottleneck_converge_to_fair_shares() {
    let alone = shared_bottleneck(&[(1, 120)]);
    let three = shared_bottleneck(&[(1, 120), (2, 240), (3, 480)]);
    let sum: f64 = three.iter().sum();
    eprintln!(
        "no budget: alone {alone:?}, three {three:?}, sum {sum:.4e}, Jain {}",
        jain(&three)
    );
    let jain = jain(&three);
    assert!(jain >= 0.95, "per-job ATE/s {three:?}, Jain {jain}");
    assert!(
        (sum - alone[0]).abs() <= 0.1 * alone[0],
        "three jobs {sum:.3e} ATE/s against one alone {:.3e}",
        alone[0]
    );
}

/// A lossless network whose bottleneck serializes at `bytes_per_sec` and queues
/// 4 MiB without marking: deep enough that the tests' windows never overflow it.
fn deep_drop_tail(
    seed: u64,
    bytes_per_sec: f64,
    drain: Option<inagg_proto::sim::Drain>,
) -> SimConfig {
    SimConfig {
        bottleneck: Some(inagg_proto::sim::Bottleneck {
            bytes_per_sec,
            queue_bytes: 4 << 20,
            mark_bytes: usize::MAX,
            drain,
        }),
        ..SimConfig::lossless(seed)
    }
}

/// One job through a drop-tail bottleneck (it never marks, and its queue is deep
/// enough never to drop): with a queue target its windows keep their packets in the
/// queue near the target, without one they fill it with all they may send; the throughput is the
/// same. Returns the job's ATE/s and the mean wait a datagram found at the link.
fn through_a_drop_tail_queue(queue_target: Option<u32>) -> (f64, std::time::Duration) {
    use std::time::Duration;
    let (world, chunk, chunks) = (2u16, 256u16, 4000usize);
    let cfg = deep_drop_tail(11, 50e6, None);
    let mut cfgs = configs(1, world, CodecId::F32, chunk, 256);
    for c in &mut cfgs {
        c.queue_target = queue_target;
    }
    let ins = inputs(1, world, usize::from(chunk) * chunks, true);
    let mut sim = Sim::new(cfg, Default::default(), cfgs);
    let (counts, span) = sim
        .run_continuously(ins, Duration::from_millis(200), Duration::from_millis(1200))
        .expect("run");
    assert_eq!(
        (sim.net.queue_drops, sim.net.marked),
        (0, 0),
        "{:?}",
        sim.net
    );
    let ate = counts[0] as f64 * (usize::from(chunk) * chunks) as f64 / span.as_secs_f64();
    (ate, sim.net.mean_bottleneck_wait())
}

#[test]
fn the_queue_rule_keeps_a_drop_tail_queue_short_at_the_same_throughput() {
    use std::time::Duration;
    let (full_ate, full_wait) = through_a_drop_tail_queue(None);
    let (ate, wait) = through_a_drop_tail_queue(Some(16));
    eprintln!("without the rule {full_ate:.4e} ATE/s, {full_wait:?}; with {ate:.4e}, {wait:?}");
    // Without the rule each rank keeps its 256 chunks in flight, nearly all of them
    // queued at the link.
    assert!(full_wait > Duration::from_millis(8), "{full_wait:?}");
    // With it, a fraction of that: two ranks' 16 packets each, and each allreduce's
    // start, when both ranks send their windows at once.
    assert!(
        wait <= full_wait / 4 && wait <= Duration::from_millis(3),
        "{wait:?} against {full_wait:?}"
    );
    assert!(
        ate >= 0.95 * full_ate,
        "{ate:.4e} against {full_ate:.4e} ATE/s"
    );
}

/// One job through a drop-tail bottleneck that others share, with the queue rule off
/// so that each rank keeps its whole window queued, as it does beside flows that keep
/// the queue long; for 200 ms the others drain (the link serves the job at 2.5 times
/// the rate). Returns the mean wait a datagram found at the link during the drain.
fn through_a_drain(pacing_gain: Option<f64>) -> std::time::Duration {
    use inagg_proto::sim::Drain;
    use std::time::Duration;
    let (world, chunk, chunks) = (2u16, 256u16, 4000usize);
    let drain = Drain {
        from: Duration::from_millis(1500),
        until: Duration::from_millis(1700),
        bytes_per_sec: 25e6,
    };
    let cfg = deep_drop_tail(13, 10e6, Some(drain));
    let mut cfgs = configs(1, world, CodecId::F32, chunk, 64);
    for c in &mut cfgs {
        c.queue_target = None;
        c.dip_interval = None;
        c.pacing_gain = pacing_gain;
    }
    let ins = inputs(1, world, usize::from(chunk) * chunks, true);
    let mut sim = Sim::new(cfg, Default::default(), cfgs);
    sim.run_continuously(ins, Duration::ZERO, Duration::from_millis(2000))
        .expect("run");
    assert_eq!(sim.net.queue_drops, 0, "{:?}", sim.net);
    assert!(sim.net.drain_arrivals > 1000, "{:?}", sim.net);
    sim.net.mean_drain_wait()
}

/// A window alone keeps its packets queued while others drain, and a flow that
/// measures the path then (TCP BBR) takes the job's queue for the path; paced at a
/// little more than its rate, the job lets the queue empty.
#[test]
fn a_paced_job_lets_a_queue_that_others_drain_empty() {
    use inagg_proto::worker::PACING_GAIN;
    use std::time::Duration;
    let window = through_a_drain(None);
    let paced = through_a_drain(Some(PACING_GAIN));
    eprintln!("mean wait during the drain: by the window alone {window:?}, paced {paced:?}");
    // Two ranks' 64 packets of 1 KiB and more, at 25 MB/s.
    assert!(window > Duration::from_millis(4), "{window:?}");
    assert!(paced <= window / 4, "{paced:?} against {window:?}");
}

/// One job through a drop-tail queue deep enough never to drop, where each window it
/// sends at an allreduce's start waits longer than the timeouts its ranks set before
/// the queue stood: results keep coming, so no timer fires (each waits a timeout after
/// the latest result), nothing is sent twice, and the windows stay at the grant.
#[test]
fn a_standing_queue_fires_no_timer_and_leaves_the_window_alone() {
    let (world, chunk, chunks, window) = (2u16, 256u16, 2048usize, 256u32);
    let cfg = deep_drop_tail(12, 10e6, None);
    let mut cfgs = configs(1, world, CodecId::I32, chunk, window);
    for c in &mut cfgs {
        c.queue_target = None;
    }
    let ins = inputs(3, world, usize::from(chunk) * chunks, false);
    let want = {
        let mut sim = Sim::new(SimConfig::lossless(12), Default::default(), cfgs.clone());
        sim.allreduce(ins.clone())
            .expect("allreduce without a bottleneck")
    };
    let mut sim = Sim::new(cfg, Default::default(), cfgs);
    for round in 0..2 {
        let out = sim.allreduce(ins.clone()).expect("allreduce");
        assert_eq!(out.bits(), want.bits(), "round {round}");
    }
    assert_eq!(sim.net.queue_drops, 0, "{:?}", sim.net);
    let stats: Vec<_> = (0..usize::from(world))
        .map(|i| sim.last_stats(i).cloned().expect("stats"))
        .collect();
    let retx: u64 = stats.iter().map(|s| s.retransmissions).sum();
    let fast: u64 = stats.iter().map(|s| s.fast_retransmissions).sum();
    let windows: Vec<u64> = (0..usize::from(world))
        .map(|i| sim.worker(i).congestion_window())
        .collect();
    eprintln!("retransmissions in the last allreduce {retx} ({fast} fast), windows {windows:?}");
    assert_eq!(retx, 0, "retransmitted with nothing lost");
    assert!(
        windows.iter().all(|&w| w == u64::from(window)),
        "{windows:?}"
    );
}

#[test]
fn a_job_joining_and_one_leaving_mid_run_change_no_results() {
    use std::time::Duration;
    let (chunk, window) = (64u16, 16u32);
    let a_in = inputs(21, 2, usize::from(chunk) * 300, false);
    let b_in = inputs(22, 2, usize::from(chunk) * 40 + 5, false);
    let alone = |cfgs: Vec<WorkerConfig>, ins: &[Vec<f32>], rounds: usize| {
        let mut sim = Sim::new(SimConfig::lossy(4), Default::default(), cfgs);
        (0..rounds)
            .map(|_| sim.allreduce(ins.to_vec()).expect("allreduce"))
            .collect::<Vec<_>>()
    };
    let a_want = alone(configs(1, 2, CodecId::I32, chunk, window), &a_in, 2);
    let b_want = alone(configs(2, 2, CodecId::I32, chunk, window), &b_in, 1);
    let mut cfgs = configs(1, 2, CodecId::I32, chunk, window);
    cfgs.extend(configs(2, 2, CodecId::I32, chunk, window));
    let mut sim = Sim::new(SimConfig::lossy(5), Default::default(), cfgs);
    // Job 2's ranks join while job 1's allreduce runs and run their own beside it.
    sim.delay_join(2, Duration::from_millis(2));
    sim.delay_join(3, Duration::from_millis(2));
    let mut ins = a_in.clone();
    ins.extend(b_in.clone());
    let ms = Duration::from_millis(2);
    let out = sim
        .allreduce_staggered(ins, &[Duration::ZERO, Duration::ZERO, ms, ms])
        .expect("both jobs");
    assert!(sim.elapsed() > ms, "job 1 was over before job 2 came");
    assert_eq!(
        out[..2].bits(),
        a_want[0].bits(),
        "job 1 changed by a job joining"
    );
    assert_eq!(out[2..].bits(), b_want[0].bits(), "job 2 wrong");
    // Job 2 leaves as job 1 starts its next allreduce.
    sim.leave(2);
    sim.leave(3);
    let out = sim
        .allreduce_some(vec![
            Some(a_in[0].clone()),
            Some(a_in[1].clone()),
            None,
            None,
        ])
        .expect("job 1 after job 2 left");
    let out: Vec<Vec<f32>> = out.into_iter().flatten().collect();
    assert_eq!(
        out.bits(),
        a_want[1].bits(),
        "job 1 changed by a job leaving"
    );
    assert!(!sim.aggregator().jobs().contains(&2), "job 2 still held");
}

/// Issue 7, slot memory as a budget: the same three jobs, with an aggregator whose
/// slot memory holds 48 of their slots (each asks for 64), joining one after another. Alone, a
/// job gets all 48; each arrival shrinks the running jobs at their next allreduce
/// boundary, and the three converge to 16 each; the memory held never exceeds the
/// budget, and they share the bottleneck fairly with the throughput of one job alone.
#[test]
fn jobs_sharing_a_slot_memory_budget_converge_to_fair_shares() {
    use std::time::Duration;
    let budget = 48 * bn_slot_bytes();
    let alone = shared_bottleneck_with(&[(1, 120)], Some(budget), Duration::ZERO);
    assert_eq!(
        alone.windows,
        vec![48],
        "alone, a job takes the whole budget"
    );
    let jobs = [(1, 120), (2, 240), (3, 480)];
    let three = shared_bottleneck_with(&jobs, Some(budget), Duration::from_millis(40));
    assert_eq!(three.windows, vec![16, 16, 16], "max-min fair shares");
    // Job 1 shrinks twice, job 2 once.
    assert!(three.regrants >= 3, "{} pools re-sized", three.regrants);
    assert!(
        three.peak <= budget,
        "{} bytes held, budget {budget}",
        three.peak
    );
    assert!(
        alone.peak <= budget,
        "{} bytes held, budget {budget}",
        alone.peak
    );
    let sum: f64 = three.ate.iter().sum();
    let jain = jain(&three.ate);
    eprintln!(
        "budget of 48 slots: alone {:.3e} ATE/s; three jobs {:?} ATE/s, sum {sum:.3e}, Jain {jain:.4}, {} re-grants",
        alone.ate[0], three.ate, three.regrants
    );
    assert!(jain >= 0.95, "per-job ATE/s {:?}, Jain {jain}", three.ate);
    assert!(
        (sum - alone.ate[0]).abs() <= 0.1 * alone.ate[0],
        "three jobs {sum:.3e} ATE/s against one alone {:.3e}",
        alone.ate[0]
    );
}

/// Issue 7, slot memory as a budget: with room for 16 slots of these jobs, job 1 runs
/// alone with 16; job 2's ranks join during job 1's allreduces and wait; job 1's pool
/// shrinks to 8 at the end of the first allreduce whose results saw the decision, and
/// job 2 starts with the 8 freed; when job 2 leaves, job 1 grows back to 16 at the end
/// of its next allreduce. Under loss, duplication and reordering, every result has the
/// bits of the jobs alone, without a budget, and the slot memory held never exceeds
/// the budget.
#[test]
fn under_a_budget_a_job_joining_and_one_leaving_change_no_results() {
    use inagg_proto::aggregator::AggregatorConfig;
    use std::time::Duration;
    let (chunk, window) = (64u16, 16u32);
    let a_in = inputs(21, 2, usize::from(chunk) * 300, false);
    let b_in = inputs(22, 2, usize::from(chunk) * 40 + 5, false);
    let alone = |cfgs: Vec<WorkerConfig>, ins: &[Vec<f32>]| {
        let mut sim = Sim::new(SimConfig::lossy(4), Default::default(), cfgs);
        sim.allreduce(ins.to_vec()).expect("allreduce")
    };
    let a_want = alone(configs(1, 2, CodecId::I32, chunk, window), &a_in);
    let b_want = alone(configs(2, 2, CodecId::I32, chunk, window), &b_in);
    let i32_codec = codec::lookup(CodecId::I32).expect("i32");
    let kept = inagg_proto::aggregator::kept_bytes(i32_codec, usize::from(chunk));
    let slot = inagg_proto::aggregator::slot_bytes(usize::from(chunk), kept, 2);
    let budget = 16 * slot;
    let agg = AggregatorConfig {
        slot_memory: Some(budget),
        ..AggregatorConfig::default()
    };
    let job1 = |ins: &[Vec<f32>]| vec![Some(ins[0].clone()), Some(ins[1].clone()), None, None];
    let mut waited = Vec::new();
    for seed in 0..40 {
        let mut cfgs = configs(1, 2, CodecId::I32, chunk, window);
        cfgs.extend(configs(2, 2, CodecId::I32, chunk, window));
        let mut sim = Sim::new(SimConfig::lossy(50 + seed), agg.clone(), cfgs);
        // Job 2's ranks stay away until job 1 has joined (with loss, a join may take a
        // retry), then come while job 1's first allreduce runs.
        sim.delay_join(2, Duration::from_secs(3600));
        sim.delay_join(3, Duration::from_secs(3600));
        sim.join_some(&[0, 1]).expect("job 1 joins");
        assert_eq!(
            sim.aggregator().job_slots(1),
            Some(16),
            "alone: the whole budget"
        );
        let ms = Duration::from_millis(2);
        sim.delay_join(2, ms);
        sim.delay_join(3, ms);
        let t0 = sim.elapsed();
        // Job 1 allreduces until job 2 has its grant (a job between allreduces keeps
        // its pool: job 2 waits for job 1's next boundary).
        let mut rounds = 0;
        while !(sim.worker(2).grant().is_some() && sim.worker(3).grant().is_some()) {
            assert!(
                rounds < 10,
                "seed {seed}: job 2 still waits after {rounds} rounds"
            );
            let out = sim
                .allreduce_some(job1(&a_in))
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            let out: Vec<Vec<f32>> = out.into_iter().flatten().collect();
            assert_eq!(
                out.bits(),
                a_want.bits(),
                "seed {seed}: job 1 changed by a job joining"
            );
            rounds += 1;
            if rounds == 1 {
                assert!(sim.elapsed() > t0 + ms, "job 1 was over before job 2 came");
            }
            // Let the re-grant that follows the allreduce finish.
            sim.settle(Duration::from_millis(1)).expect("settle");
        }
        waited.push(rounds);
        assert_eq!(
            sim.aggregator().job_slots(1),
            Some(8),
            "seed {seed}: job 1 shrank"
        );
        assert_eq!(
            sim.aggregator().job_slots(2),
            Some(8),
            "seed {seed}: job 2's share"
        );
        // Both jobs at once.
        let mut ins = a_in.clone();
        ins.extend(b_in.clone());
        let out = sim
            .allreduce_staggered(ins, &[Duration::ZERO; 4])
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(
            out[..2].bits(),
            a_want.bits(),
            "seed {seed}: job 1 beside job 2"
        );
        assert_eq!(out[2..].bits(), b_want.bits(), "seed {seed}: job 2 wrong");
        // Job 2 leaves as job 1 starts its next allreduce; job 1 grows back at the end
        // of the allreduce in which the aggregator learns it (a lost leave is resent
        // after an interval that may outlast an allreduce), and runs the next one in
        // its grown pool.
        sim.leave(2);
        sim.leave(3);
        let mut gone_after = None;
        for round in 0..5 {
            if gone_after.is_some_and(|g| round > g + 1) {
                break;
            }
            let out = sim
                .allreduce_some(job1(&a_in))
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: {e}"));
            let out: Vec<Vec<f32>> = out.into_iter().flatten().collect();
            assert_eq!(
                out.bits(),
                a_want.bits(),
                "seed {seed}: job 1 changed by a job leaving"
            );
            if gone_after.is_none() && !sim.aggregator().jobs().contains(&2) {
                gone_after = Some(round);
            }
        }
        assert!(gone_after.is_some(), "seed {seed}: job 2 still held");
        assert_eq!(
            sim.aggregator().job_slots(1),
            Some(16),
            "seed {seed}: job 1 grew back"
        );
        assert!(
            sim.peak_slot_memory <= budget,
            "seed {seed}: {} bytes held",
            sim.peak_slot_memory
        );
        assert!(sim.regrants >= 2, "seed {seed}: {} re-grants", sim.regrants);
    }
    eprintln!("job 1 allreduces before job 2 got its grant, per seed: {waited:?}");
}

/// Two levels (issue 30): rack aggregators under a parent, with seeded loss,
/// duplication and reordering on every link of both levels. Every rank gets the same
/// results; the fixed-point codecs' are the flat run's bit for bit, the float codecs'
/// within their bounds (f32 sums of integers exact). Racks of even and uneven blocks.
#[test]
fn two_levels_under_loss_give_the_flat_results() {
    use inagg_proto::aggregator::AggregatorConfig;
    let (chunk, window) = (64u16, 16u32);
    for (world, racks) in [(4u16, 2usize), (7, 3)] {
        for codec in [
            CodecId::I32,
            CodecId::I16,
            CodecId::I8,
            CodecId::F32,
            CodecId::F16,
            CodecId::BF16,
        ] {
            let seed = u64::from(world) * 100 + u64::from(codec.0);
            let integers = codec == CodecId::F32;
            let len = usize::from(chunk) * 37 + 11;
            let ins = inputs(seed, world, len, integers);
            let cfgs = configs(1, world, codec, chunk, window);
            let mut flat = Sim::new(SimConfig::lossy(seed), Default::default(), cfgs.clone());
            let want = flat.allreduce(ins.clone()).expect("flat allreduce");
            let mut sim = Sim::with_racks(
                SimConfig::lossy(seed + 1),
                AggregatorConfig::default(),
                AggregatorConfig::default(),
                racks,
                cfgs,
            );
            for round in 0..2 {
                let out = sim
                    .allreduce(ins.clone())
                    .unwrap_or_else(|e| panic!("{codec:?} world {world} round {round}: {e}"));
                let what = format!("{codec:?} world {world} racks {racks} round {round}");
                for o in &out[1..] {
                    assert_eq!(o.bits(), out[0].bits(), "{what}: ranks differ");
                }
                let c = codec::lookup(codec).expect("codec");
                if c.block_scaled() || integers {
                    assert_eq!(out[0].bits(), want[0].bits(), "{what}: not the flat result");
                } else {
                    check_bound(codec, &ins, &out[0], usize::from(chunk), world);
                }
            }
            assert!(sim.net.lost > 0 && sim.net.duplicated > 0, "{:?}", sim.net);
            // The parent's members are the racks, and it summed their partial sums.
            let top = sim.aggregator().stats();
            assert!(top.chunks_completed > 0, "{top:?}");
            for k in 0..racks {
                assert!(sim.rack(k).stats().chunks_completed > 0, "rack {k}");
            }
            // Losses between the levels were repaired: racks sent partial sums again
            // for ranks that timed out, and the parent answered some from its copy.
            let held: u64 = (0..racks).map(|k| sim.rack(k).stats().probes_held).sum();
            eprintln!(
                "{codec:?} world {world}: racks held {held}, parent answered {} from its copy",
                top.copies_answered
            );
            assert!(held > 0 && top.copies_answered > 0, "{top:?}");
        }
    }
}

/// A dead rack aggregator or a dead parent ends the job at every rank with a clear
/// error, and nothing hangs: the ranks under the dead rack lose their aggregator, the
/// others hear from the parent that the rack went silent; with the parent dead every
/// rack tells its ranks that it lost its parent.
#[test]
fn a_dead_rack_or_parent_ends_the_job_at_every_rank() {
    use inagg_proto::aggregator::AggregatorConfig;
    use inagg_proto::wire::ErrorCode;
    use inagg_proto::worker::WorkerError;
    use std::time::Duration;
    let (world, chunk, window) = (4u16, 64u16, 8u32);
    let ins = inputs(5, world, usize::from(chunk) * 400, false);
    for kill_parent in [false, true] {
        let mut sim = Sim::with_racks(
            SimConfig::lossless(3),
            AggregatorConfig::default(),
            AggregatorConfig::default(),
            2,
            configs(1, world, CodecId::I32, chunk, window),
        );
        sim.allreduce(ins.clone()).expect("both levels up");
        if kill_parent {
            sim.kill_aggregator();
        } else {
            sim.kill_rack(1);
        }
        let err = sim
            .allreduce(ins.clone())
            .expect_err("the job cannot finish");
        // The first failure ends the call; the others follow within their timeouts.
        sim.settle(Duration::from_secs(120)).expect("settles");
        let failures: Vec<_> = (0..usize::from(world))
            .map(|i| sim.failure(i).cloned())
            .collect();
        for (i, f) in failures.iter().enumerate() {
            let f = f
                .as_ref()
                .unwrap_or_else(|| panic!("rank {i} did not fail: {err}"));
            let expected = match (kill_parent, i) {
                (true, _) => matches!(
                    f,
                    WorkerError::Aborted {
                        code: ErrorCode::ParentLost,
                        ..
                    }
                ),
                (false, 2 | 3) => matches!(f, WorkerError::AggregatorSilent(_)),
                (false, _) => matches!(
                    f,
                    WorkerError::Aborted {
                        code: ErrorCode::PeerSilent,
                        ..
                    }
                ),
            };
            assert!(expected, "parent dead {kill_parent}, rank {i}: {f}");
        }
    }
}

/// Under the parent's slot memory budget, a job of racks keeps the pool it started
/// with when another job comes (racks follow no re-grant), and the newcomer takes what
/// is left; both jobs' results stay exact.
#[test]
fn a_job_of_racks_keeps_its_pool_under_the_parents_budget() {
    use inagg_proto::aggregator::AggregatorConfig;
    use std::time::Duration;
    let (chunk, world) = (64u16, 4u16);
    let i32c = codec::lookup(CodecId::I32).expect("i32");
    let kept = inagg_proto::aggregator::kept_bytes(i32c, usize::from(chunk));
    let slot = inagg_proto::aggregator::slot_bytes(usize::from(chunk), kept, 2);
    let top = AggregatorConfig {
        slot_memory: Some(48 * slot),
        ..AggregatorConfig::default()
    };
    let mut cfgs = configs(1, world, CodecId::I32, chunk, 32);
    cfgs.extend(configs(2, world, CodecId::I32, chunk, 32));
    let mut sim = Sim::with_racks(SimConfig::lossy(9), top, Default::default(), 2, cfgs);
    let a = inputs(31, world, usize::from(chunk) * 200, false);
    let b = inputs(32, world, usize::from(chunk) * 150, false);
    let want = |ins: &Vec<Vec<f32>>, job| {
        let mut flat = Sim::new(
            SimConfig::lossless(1),
            Default::default(),
            configs(job, world, CodecId::I32, chunk, 32),
        );
        flat.allreduce(ins.clone()).expect("flat")
    };
    let (a_want, b_want) = (want(&a, 1), want(&b, 2));
    let first: Vec<_> = a
        .iter()
        .cloned()
        .map(Some)
        .chain([None, None, None, None])
        .collect();
    sim.delay_join(4, Duration::from_secs(3600));
    for i in 5..8 {
        sim.delay_join(i, Duration::from_secs(3600));
    }
    let out = sim.allreduce_some(first).expect("job 1 alone");
    let out: Vec<Vec<f32>> = out.into_iter().flatten().collect();
    assert_eq!(out.bits(), a_want.bits());
    assert_eq!(sim.aggregator().job_slots(1), Some(32), "job 1 alone");
    for i in 4..8 {
        sim.delay_join(i, Duration::from_millis(1));
    }
    for round in 0..2 {
        let mut ins = a.clone();
        ins.extend(b.clone());
        let out = sim
            .allreduce(ins)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(out[..4].bits(), a_want.bits(), "round {round}: job 1");
        assert_eq!(out[4..].bits(), b_want.bits(), "round {round}: job 2");
    }
    let (s1, s2) = (sim.aggregator().job_slots(1), sim.aggregator().job_slots(2));
    assert_eq!(
        (s1, s2),
        (Some(32), Some(16)),
        "the job of racks kept its pool"
    );
    assert_eq!(sim.regrants, 0, "no pool was re-sized");
}

/// A rack whose ranks come later than the other rack's: the first rack waits for its
/// grant longer than the silence timeout (the parent says nothing until every rack has
/// joined) and the job still runs, with the flat run's results.
#[test]
fn a_rack_waits_for_a_late_rack_beyond_the_silence_timeout() {
    use inagg_proto::aggregator::AggregatorConfig;
    use std::time::Duration;
    let (world, chunk) = (4u16, 64u16);
    let cfgs = configs(1, world, CodecId::I32, chunk, 16);
    let ins = inputs(41, world, usize::from(chunk) * 50, false);
    let mut flat = Sim::new(SimConfig::lossless(2), Default::default(), cfgs.clone());
    let want = flat.allreduce(ins.clone()).expect("flat");
    let agg = AggregatorConfig::default();
    let late = agg.silence_timeout * 3;
    let mut sim = Sim::with_racks(SimConfig::lossless(2), agg.clone(), agg, 2, cfgs);
    sim.delay_join(2, late);
    sim.delay_join(3, late);
    let out = sim.allreduce(ins).expect("the job runs");
    assert_eq!(out.bits(), want.bits());
    assert!(sim.elapsed() >= late, "{:?}", sim.elapsed());
    assert!(
        sim.elapsed() < late + Duration::from_secs(5),
        "{:?}",
        sim.elapsed()
    );
}

/// Under admission keys, a rack proves its parent the key it holds (one key for the
/// cluster's aggregators), and a rack with another key is refused at every rank.
#[test]
fn a_rack_proves_the_admission_key_to_its_parent() {
    use inagg_proto::aggregator::AggregatorConfig;
    use inagg_proto::wire::ErrorCode;
    use inagg_proto::worker::WorkerError;
    let (world, chunk) = (4u16, 64u16);
    let keyed = |key: &[u8]| AggregatorConfig {
        admission_key: Some(key.to_vec()),
        ..AggregatorConfig::default()
    };
    let mut cfgs = configs(1, world, CodecId::I32, chunk, 16);
    for c in &mut cfgs {
        c.admission_key = Some(b"cluster key".to_vec());
    }
    let ins = inputs(43, world, usize::from(chunk) * 20, false);
    let mut sim = Sim::with_racks(
        SimConfig::lossless(3),
        keyed(b"cluster key"),
        keyed(b"cluster key"),
        2,
        cfgs.clone(),
    );
    sim.allreduce(ins.clone()).expect("the racks are admitted");
    let mut sim = Sim::with_racks(
        SimConfig::lossless(3),
        keyed(b"another key"),
        keyed(b"cluster key"),
        2,
        cfgs,
    );
    match sim.allreduce(ins) {
        Err(inagg_proto::sim::SimError::Worker {
            error: WorkerError::Refused { code, .. },
            ..
        }) => assert_eq!(code, ErrorCode::NotAdmitted),
        other => panic!("{other:?}"),
    }
}

/// A rack refuses a chunk whose partial sum could not fit a datagram at 32 bits a
/// lane (for the fixed-point codecs, a width byte per group of 128 too), naming the
/// largest that fits; a job of that chunk runs and gives the flat result.
#[test]
fn a_rack_refuses_a_chunk_too_large_to_send_up_and_names_the_largest() {
    use inagg_proto::aggregator::AggregatorConfig;
    use inagg_proto::wire::ErrorCode;
    use inagg_proto::worker::WorkerError;
    let world = 4u16;
    let agg = AggregatorConfig::default();
    // f32 lanes fill a datagram at 16,366 elements; 127 groups of 513 bytes and their
    // heads fit, 128 do not. (An f32 chunk one larger does not fit a contribution,
    // which any aggregator refuses first.)
    let mut most = 0;
    for (codec, want) in [
        (CodecId::F16, 16_366u16),
        (CodecId::BF16, 16_366),
        (CodecId::I32, 16_256),
        (CodecId::I16, 16_256),
        (CodecId::I8, 16_256),
    ] {
        let too_large = configs(1, world, codec, want + 1, 4);
        let ins = inputs(47, world, usize::from(want + 1) * 2, false);
        let mut sim = Sim::with_racks(
            SimConfig::lossless(4),
            agg.clone(),
            agg.clone(),
            2,
            too_large,
        );
        most = match sim.allreduce(ins) {
            Err(inagg_proto::sim::SimError::Worker {
                error: WorkerError::Refused { code, text },
                ..
            }) => {
                assert_eq!(code, ErrorCode::NoCapacity, "{codec:?}: {text}");
                text.rsplit("at most ")
                    .next()
                    .and_then(|t| t.trim_end_matches(')').parse::<u16>().ok())
                    .unwrap_or_else(|| panic!("no largest chunk in {text:?}"))
            }
            other => panic!("{codec:?}: {other:?}"),
        };
        assert_eq!(most, want, "{codec:?}");
    }
    let cfgs = configs(1, world, CodecId::I8, most, 4);
    let ins = inputs(47, world, usize::from(most) * 2, false);
    let mut flat = Sim::new(SimConfig::lossless(4), agg.clone(), cfgs.clone());
    let want = flat.allreduce(ins.clone()).expect("flat");
    let mut sim = Sim::with_racks(SimConfig::lossless(4), agg.clone(), agg, 2, cfgs);
    let got = sim
        .allreduce(ins)
        .expect("the largest chunk runs in two levels");
    assert_eq!(got.bits(), want.bits());
}
