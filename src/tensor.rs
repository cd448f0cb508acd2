//! Seeded test tensors and the check of a result against the exact sum: what `inagg
//! worker` and `inagg bench` use to prove every rank got the right answer.

use inagg_proto::codec::{self, Codec};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Rank `rank`'s input for a run seeded with `seed`: gradient-like values in (-1, 1)
/// times a magnitude that changes every 4096 elements (2^-12 to 1), so that
/// blocks of very different scales meet in one tensor.
#[cfg(test)]
pub fn input(seed: u64, rank: u16, len: usize) -> Vec<f32> {
    input_with_zeros(seed, rank, len, 0.0, 1)
}

/// `input`, with a seeded fraction `zeros` of the `chunk`-element chunks set to zero
/// on every rank (the same chunks on all: sparse gradients, as for embeddings).
pub fn input_with_zeros(seed: u64, rank: u16, len: usize, zeros: f64, chunk: usize) -> Vec<f32> {
    let mut v = vec![0.0; len];
    Input::new(seed, rank, zeros, chunk).fill(&mut v);
    v
}

/// Elements in a block of one magnitude.
const BLOCK: usize = 4096;

/// Rank `rank`'s input produced in order, a piece at a time: the values of
/// [`input_with_zeros`] without holding the tensor, so that a check against the
/// exact sum needs every rank's current chunk only, not every rank's tensor.
pub struct Input {
    values: SmallRng,
    magnitudes: SmallRng,
    magnitude: f32,
    /// Draws which chunks are zero; `None` without zeros.
    zero_picks: Option<SmallRng>,
    zeros: f64,
    chunk: usize,
    zero_chunk: bool,
    /// Elements produced so far.
    at: usize,
}

impl Input {
    pub fn new(seed: u64, rank: u16, zeros: f64, chunk: usize) -> Input {
        Input {
            values: SmallRng::seed_from_u64(seed ^ (u64::from(rank) << 48) ^ 0x9e37_79b9_7f4a_7c15),
            magnitudes: SmallRng::seed_from_u64(seed.wrapping_add(1)),
            magnitude: 0.0,
            zero_picks: (zeros > 0.0).then(|| SmallRng::seed_from_u64(seed ^ 0x5eed_0000)),
            zeros: zeros.clamp(0.0, 1.0),
            chunk: chunk.max(1),
            zero_chunk: false,
            at: 0,
        }
    }

    /// The next `out.len()` elements.
    pub fn fill(&mut self, out: &mut [f32]) {
        for x in out {
            if self.at % BLOCK == 0 {
                self.magnitude = 2f32.powi(-self.magnitudes.random_range(0..=12));
            }
            if self.at % self.chunk == 0 {
                if let Some(picks) = &mut self.zero_picks {
                    self.zero_chunk = picks.random_bool(self.zeros);
                }
            }
            // A product of two uniforms fills the whole mantissa (one uniform alone
            // lies on a 2^-23 grid, whose sums would be exact in any codec and prove
            // nothing). Zeroed chunks draw their values too, so that the chunks after
            // them do not depend on which were zeroed.
            let v = self.values.random_range(-1.0f32..1.0)
                * self.values.random_range(0.5f32..1.0)
                * self.magnitude;
            *x = if self.zero_chunk { 0.0 } else { v };
            self.at += 1;
        }
    }
}

/// How far a result is from the exact sum.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Check {
    /// Largest absolute error.
    pub max_abs_err: f64,
    /// `||out - exact|| / ||exact||`.
    pub rel_l2_err: f64,
    /// Every element within the codec's error bound.
    pub within_bound: bool,
    /// Elements outside the bound.
    pub violations: usize,
    /// FNV-1a of the result's bits: equal on every rank when results are identical.
    pub checksum: u64,
}

impl Check {
    /// Whether this check found worse than `other`: more elements outside the bound,
    /// or as many and a larger error.
    pub fn worse_than(&self, other: &Check) -> bool {
        (self.violations, self.max_abs_err) > (other.violations, other.max_abs_err)
    }
}

/// Whether `a` and `b` hold the same bits (NaNs included), in one pass that
/// vectorizes.
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .fold(0u32, |d, (x, y)| d | (x.to_bits() ^ y.to_bits()))
            == 0
}

/// FNV-1a over the bits of `v` (serial: once per run, not per allreduce).
pub fn checksum(v: &[f32]) -> u64 {
    v.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
        x.to_bits()
            .to_le_bytes()
            .iter()
            .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
    })
}

/// Checks `out` against the exact (f64) sum of every rank's input (`inputs`, each
/// at its start), element by element, with the bound the codec gives
/// (`inagg_proto::codec::error_bound`). Holds one chunk of every rank's input at a
/// time.
pub fn check(
    codec: &dyn Codec,
    world: u16,
    chunk: usize,
    stochastic: bool,
    mut inputs: Vec<Input>,
    out: &[f32],
) -> Check {
    let n = out.len();
    let chunk = chunk.max(1);
    let mut max_abs = 0f64;
    let (mut err2, mut ref2) = (0f64, 0f64);
    let mut violations = 0;
    let mut pieces = vec![vec![0f32; chunk]; inputs.len()];
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        for (input, piece) in inputs.iter_mut().zip(&mut pieces) {
            input.fill(&mut piece[..len]);
        }
        let e_max = if codec.block_scaled() {
            pieces
                .iter()
                .map(|v| codec::block_exponent(&v[..len]).unwrap_or(i8::MAX))
                .max()
                .unwrap_or(i8::MIN)
        } else {
            i8::MIN
        };
        for j in 0..len {
            let i = start + j;
            let (mut exact, mut abs) = (0f64, 0f64);
            for v in &pieces {
                exact += f64::from(v[j]);
                abs += f64::from(v[j]).abs();
            }
            let err = (f64::from(out[i]) - exact).abs();
            let bound = codec::error_bound(codec, world, e_max, stochastic, exact, abs);
            if err > bound || err.is_nan() {
                violations += 1;
            }
            max_abs = max_abs.max(err);
            err2 += err * err;
            ref2 += exact * exact;
        }
    }
    Check {
        max_abs_err: max_abs,
        rel_l2_err: if ref2 > 0.0 {
            (err2 / ref2).sqrt()
        } else {
            err2.sqrt()
        },
        within_bound: violations == 0,
        violations,
        checksum: checksum(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inagg_proto::codec::ALL;

    #[test]
    fn inputs_are_seeded() {
        assert_eq!(input(1, 0, 100), input(1, 0, 100));
        assert_ne!(input(1, 0, 100), input(1, 1, 100));
        assert_ne!(input(1, 0, 100), input(2, 0, 100));
    }

    #[test]
    fn an_input_read_in_pieces_is_the_whole_tensor() {
        let len = 3 * BLOCK + 1234;
        for zeros in [0.0, 0.3] {
            let whole = input_with_zeros(9, 2, len, zeros, 1000);
            let mut stream = Input::new(9, 2, zeros, 1000);
            let mut pieces = vec![0.0; len];
            let mut at = 0;
            for step in [1, 999, 4097, 7, 5000].iter().cycle() {
                let end = (at + step).min(len);
                stream.fill(&mut pieces[at..end]);
                at = end;
                if at == len {
                    break;
                }
            }
            assert!(same_bits(&whole, &pieces), "zeros {zeros}");
            let zeroed = whole.chunks(1000).filter(|c| c.iter().all(|x| *x == 0.0));
            assert_eq!(zeroed.count() > 0, zeros > 0.0);
        }
    }

    #[test]
    fn check_catches_a_wrong_element() {
        let inputs: Vec<Vec<f32>> = (0..3).map(|r| input(5, r, 1000)).collect();
        let streams = || (0..3).map(|r| Input::new(5, r, 0.0, 1)).collect::<Vec<_>>();
        let mut sum: Vec<f32> = (0..1000)
            .map(|i| inputs.iter().map(|v| f64::from(v[i])).sum::<f64>() as f32)
            .collect();
        for c in ALL {
            assert!(
                check(*c, 3, 256, false, streams(), &sum).within_bound,
                "{}",
                c.name()
            );
        }
        sum[10] += 1e-3;
        for c in ALL {
            let r = check(*c, 3, 256, false, streams(), &sum);
            assert!(!r.within_bound && r.violations == 1, "{}", c.name());
        }
    }
}
