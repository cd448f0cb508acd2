//! `inagg simulate`: one allreduce in the deterministic in-memory simulator (no
//! sockets), with seeded loss, duplication and reordering; fails unless every rank got
//! the same bits and every element is within the codec's error bound of the exact sum.

use anyhow::{bail, Result};
use inagg_proto::codec::{self, Codec};
use inagg_proto::sim::{Sim, SimConfig};
use inagg_proto::worker::WorkerConfig;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of ranks.
    #[arg(long, default_value_t = 4)]
    workers: u16,
    /// Elements of the tensor.
    #[arg(long, default_value_t = 100_000)]
    elements: usize,
    /// Codec.
    #[arg(long, default_value = "i32", value_parser = crate::args::codec)]
    codec: crate::args::CodecArg,
    /// Probability that a datagram is lost (duplication and reordering follow).
    #[arg(long, default_value_t = 0.05)]
    loss: f64,
    /// Seed of the simulated network and of the inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn run(a: &Args) -> Result<()> {
    let codec = a.codec.0;
    if a.workers == 0 {
        bail!("--workers must be at least 1");
    }
    if !(0.0..1.0).contains(&a.loss) {
        bail!("--loss must be in [0, 1)");
    }
    let mut cfg = SimConfig::lossy(a.seed);
    cfg.loss = a.loss;
    let workers = (0..a.workers)
        .map(|r| WorkerConfig::new(1, r, a.workers, codec.id()))
        .collect();
    let mut sim = Sim::new(cfg, Default::default(), workers);
    let inputs: Vec<Vec<f32>> = (0..a.workers)
        .map(|r| {
            (0..a.elements)
                .map(|i| {
                    ((i as u64 * 2654435761 + u64::from(r) * 97 + a.seed) % 2001) as f32 / 1000.0
                        - 1.0
                })
                .collect()
        })
        .collect();
    let out = sim.allreduce(inputs.clone())?;
    let checked = check(codec, &inputs, &out);
    let (max_err, identical) = match &checked {
        Ok(e) => (*e, true),
        Err(Mismatch::Ranks(_)) => (f64::NAN, false),
        Err(Mismatch::Element { err, .. }) => (*err, true),
    };
    println!(
        "{} ranks, {} elements, codec {}: virtual time {:.3} ms, datagrams {} (lost {}, duplicated {}, reordered {}), max abs error {:.3e}, ranks identical: {}",
        a.workers,
        a.elements,
        codec.name(),
        sim.elapsed().as_secs_f64() * 1e3,
        sim.net.sent,
        sim.net.lost,
        sim.net.duplicated,
        sim.net.reordered,
        max_err,
        identical
    );
    checked.map(|_| ()).map_err(|m| anyhow::anyhow!("{m}"))
}

/// How a simulated allreduce went wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Mismatch {
    /// A rank's result differs from rank 0's in some bit.
    #[error("ranks 0 and {0} got different results")]
    Ranks(usize),
    /// An element is further from the exact sum than the codec's error bound.
    #[error("element {index} is {got}, {err:.3e} from the exact sum {exact}, beyond the bound {bound:.3e}")]
    Element {
        index: usize,
        got: f32,
        exact: f64,
        err: f64,
        bound: f64,
    },
}

/// Checks rank results `out` of allreducing `inputs` through `codec`: every rank's
/// bits equal, and every element within [`codec::error_bound`] of the exact (f64) sum,
/// at the block exponent of the largest input (no block's is larger). Returns the
/// largest error.
pub fn check(codec: &dyn Codec, inputs: &[Vec<f32>], out: &[Vec<f32>]) -> Result<f64, Mismatch> {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let first = out.first().map(|o| bits(o)).unwrap_or_default();
    if let Some(r) = out.iter().position(|o| bits(o) != first) {
        return Err(Mismatch::Ranks(r));
    }
    let world = u16::try_from(inputs.len()).unwrap_or(u16::MAX);
    let all: Vec<f32> = inputs.iter().flatten().copied().collect();
    let e_max = codec::block_exponent(&all).unwrap_or(i8::MAX);
    let mut max_err = 0f64;
    for (i, &got) in out
        .first()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let exact: f64 = inputs.iter().map(|v| f64::from(v[i])).sum();
        let sum_abs: f64 = inputs.iter().map(|v| f64::from(v[i]).abs()).sum();
        let bound = codec::error_bound(codec, world, e_max, false, exact, sum_abs);
        let err = (f64::from(got) - exact).abs();
        // A NaN result fails too.
        if err.is_nan() || err > bound {
            return Err(Mismatch::Element {
                index: i,
                got,
                exact,
                err,
                bound,
            });
        }
        max_err = max_err.max(err);
    }
    Ok(max_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Vec<Vec<f32>> {
        (0..4)
            .map(|r| {
                (0..1000)
                    .map(|i| ((i * 7 + r * 13) % 200) as f32 / 100.0 - 1.0)
                    .collect()
            })
            .collect()
    }

    fn exact(inputs: &[Vec<f32>]) -> Vec<f32> {
        (0..inputs[0].len())
            .map(|i| inputs.iter().map(|v| f64::from(v[i])).sum::<f64>() as f32)
            .collect()
    }

    #[test]
    fn exact_sums_pass_and_a_wrong_element_or_rank_fails() {
        let codec = codec::by_name("i32").expect("i32");
        let inputs = inputs();
        let good = vec![exact(&inputs); 4];
        assert!(check(codec, &inputs, &good).is_ok());
        // One rank's contribution missing from one element.
        let mut wrong = good.clone();
        for o in &mut wrong {
            o[500] -= inputs[3][500].abs().max(0.25);
        }
        assert!(matches!(
            check(codec, &inputs, &wrong),
            Err(Mismatch::Element { index: 500, .. })
        ));
        // One rank's result one bit away.
        let mut split = good;
        split[2][7] = f32::from_bits(split[2][7].to_bits() ^ 1);
        assert_eq!(check(codec, &inputs, &split), Err(Mismatch::Ranks(2)));
    }

    #[test]
    fn every_codec_passes_the_simulator_over_loss() {
        for &c in codec::ALL {
            let name = c.name();
            let a = Args {
                workers: 3,
                elements: 5000,
                codec: crate::args::CodecArg(c),
                loss: 0.05,
                seed: 7,
            };
            run(&a).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
    }
}
