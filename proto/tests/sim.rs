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

/// The bound block scaling gives for `i32`: per chunk, half a step per rank plus the
/// final rounding to `f32`.
fn check_i32_bound(inputs: &[Vec<f32>], out: &[f32], chunk: usize, world: u16) {
    let codec = codec::lookup(CodecId::I32).expect("i32 codec");
    let sum = exact(inputs);
    for (c, range) in (0..out.len())
        .step_by(chunk)
        .map(|s| (s / chunk, s..(s + chunk).min(out.len())))
    {
        let e_max = inputs
            .iter()
            .map(|v| codec::block_exponent(&v[range.clone()]).expect("finite"))
            .max()
            .expect("ranks");
        let step = codec
            .step_error(codec.scale(world, e_max))
            .expect("fixed point has a step");
        for i in range {
            let bound = f64::from(world) * step + sum[i].abs() * 2f64.powi(-23);
            let err = (f64::from(out[i]) - sum[i]).abs();
            assert!(
                err <= bound,
                "chunk {c} element {i}: error {err} above bound {bound}"
            );
        }
    }
}

/// Runs `rounds` allreduces; returns every rank's outputs of every round.
fn run(
    sim_cfg: SimConfig,
    world: u16,
    codec: CodecId,
    len: usize,
    seed: u64,
    rounds: usize,
) -> Vec<Vec<Vec<f32>>> {
    let mut sim = Sim::new(sim_cfg, Default::default(), configs(9, world, codec, 64, 8));
    (0..rounds)
        .map(|round| {
            let ins = inputs(
                seed * 31 + round as u64,
                world,
                len + round * 7,
                codec == CodecId::F32,
            );
            sim.allreduce(ins)
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: {e}"))
        })
        .collect()
}

#[test]
fn lossy_runs_match_lossless_bit_for_bit() {
    let mut seeds = 0;
    for codec in [CodecId::F32, CodecId::I32] {
        for (wi, &world) in WORLDS.iter().enumerate() {
            // Lengths that are not multiples of the chunk (64) nor of the window.
            let len = 1000 + 37 * wi;
            let reference = run(SimConfig::lossless(0), world, codec, len, wi as u64, 2);
            for round in &reference {
                assert!(
                    round.iter().all(|out| out == &round[0]),
                    "ranks disagree without loss"
                );
            }
            // 200 seeds per world and codec: 2000 lossy runs of two allreduces each.
            for s in 0..SEEDS {
                let lossy = run(SimConfig::lossy(1000 + s), world, codec, len, wi as u64, 2);
                assert_eq!(lossy, reference, "codec {codec:?} world {world} seed {s}");
                seeds += 1;
            }
        }
    }
    assert_eq!(seeds, 2 * WORLDS.len() as u64 * SEEDS);
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
            assert_eq!(o, &want);
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
        assert_eq!(a, b, "round {round}");
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
        assert_eq!(out, vec![vec![7.0]; 3]);
        let out = sim.allreduce(vec![vec![0.0; 200]; 3]).expect("zeros");
        assert_eq!(out, vec![vec![0.0; 200]; 3]);
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
    assert!(out.iter().all(|o| o == &out[0]));
}
