//! `inagg demo-worker`: one rank of the demo's training job. Trains the shared MLP on
//! its shard, sums the gradients through inagg after every backward pass, and prints a
//! JSON line per step and one at the end (the parent `inagg demo` reads them).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use inagg_worker::{Options, Worker};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::data::{self, Dataset, Split};
use super::model::Mlp;

/// Flags of `inagg demo-worker` (passed by `inagg demo`).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[arg(long)]
    pub aggregator: SocketAddr,
    #[arg(long)]
    pub job: u32,
    #[arg(long)]
    pub rank: u16,
    #[arg(long)]
    pub world: u16,
    #[arg(long, value_parser = crate::args::codec)]
    pub codec: crate::args::CodecArg,
    /// Transport to the aggregator.
    #[arg(long, value_enum, default_value_t = crate::args::Transport::Udp)]
    pub transport: crate::args::Transport,
    #[command(flatten)]
    pub trust: crate::args::TrustArgs,
    #[command(flatten)]
    pub train: Training,
}

/// Training settings shared by `demo` and `demo-worker`.
#[derive(Debug, Clone, clap::Args)]
pub struct Training {
    /// Optimizer steps.
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    // Rows per rank per step; the help names both defaults.
    #[arg(long, help = format!(
        "Rows per rank per step [default: {DEFAULT_BATCH}; {} with `inagg demo --link-rate`, \
         so that computing a step does not hide its allreduce]",
        super::links::LINK_BATCH
    ))]
    pub batch: Option<usize>,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Seed of the data, the model and the batches.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// `synthetic` (generated at start), `fashion-mnist` (Debian's
    /// dataset-fashion-mnist) or `mnist:DIR` (the four standard IDX files in DIR,
    /// plain or gzipped).
    #[arg(long, default_value = "synthetic")]
    pub data: String,
    /// Hidden layer widths.
    #[arg(long, value_delimiter = ',', default_value = "512,512")]
    pub hidden: Vec<usize>,
    /// Turn off error feedback for fixed-point codecs.
    #[arg(long)]
    pub no_error_feedback: bool,
    /// One allreduce per parameter tensor instead of one over all gradients.
    #[arg(long)]
    pub per_layer: bool,
    /// Evaluate held-out accuracy every this many steps (and after the last), on
    /// the first 1000 held-out rows, outside the timed steps; 0: only at the end.
    #[arg(long, default_value_t = 25)]
    pub eval_every: usize,
}

/// Where Debian's dataset-fashion-mnist installs Fashion-MNIST (gzipped IDX files).
pub const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// Rows per rank per step unless `--batch` says.
pub const DEFAULT_BATCH: usize = 64;

impl Training {
    /// Rows per rank per step.
    pub fn batch(&self) -> usize {
        self.batch.unwrap_or(DEFAULT_BATCH)
    }

    /// Loads the data set the flags name.
    pub fn dataset(&self) -> Result<Split> {
        if self.data == "synthetic" {
            Ok(data::synthetic(self.seed, 20_000, 5_000))
        } else if let Some(dir) = self.data.strip_prefix("mnist:") {
            data::mnist(std::path::Path::new(dir))
        } else if self.data == "fashion-mnist" {
            let dir = std::path::Path::new(FASHION_MNIST);
            if !dir.is_dir() {
                bail!(
                    "--data fashion-mnist reads Debian's dataset-fashion-mnist from {FASHION_MNIST}, \
                     which is not installed: apt-get install dataset-fashion-mnist"
                );
            }
            data::mnist(dir)
        } else {
            bail!(
                "--data must be `synthetic`, `fashion-mnist` or `mnist:DIR`, not {:?}",
                self.data
            )
        }
    }
}

/// Held-out rows of the periodic evaluation.
pub const EVAL_ROWS: usize = 1000;

/// A line a demo worker prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Line {
    Step {
        step: usize,
        loss: f64,
        allreduce_s: f64,
        step_s: f64,
        bytes_sent: u64,
        bytes_recv: u64,
    },
    /// Held-out accuracy after `step + 1` steps, which took `train_s` of training
    /// (the steps' wall time, evaluation excluded). Rank 0's.
    Eval {
        step: usize,
        train_s: f64,
        accuracy: f64,
    },
    Final {
        checksum: u64,
        accuracy: f64,
        train_loss: f64,
        parameters: usize,
    },
}

fn tensors(d: &Dataset) -> Result<(Tensor, Tensor)> {
    let x = Tensor::from_slice(&d.x, (d.len(), d.dim), &Device::Cpu)?;
    let y = Tensor::from_slice(&d.y, d.len(), &Device::Cpu)?;
    Ok((x, y))
}

fn emit(line: &Line) -> Result<()> {
    println!("{}", serde_json::to_string(line)?);
    Ok(())
}

pub fn run(a: &Args) -> Result<()> {
    let codec = a.codec.0;
    let t = &a.train;
    let split = t.dataset()?;
    let shard = split.train.shard(usize::from(a.rank), usize::from(a.world));
    if shard.len() < t.batch() {
        bail!(
            "rank {}'s shard has {} rows, fewer than a batch of {}",
            a.rank,
            shard.len(),
            t.batch()
        );
    }
    let mut dims = vec![split.train.dim];
    dims.extend(&t.hidden);
    dims.push(split.train.classes);
    let model = Mlp::new(&dims, t.seed)?;
    let vars: Vec<_> = model.vars.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: t.lr,
            ..Default::default()
        },
    )?;

    let mut opts = Options::new(a.aggregator, a.job, a.rank, a.world, codec.id());
    opts.protocol.join_timeout = Duration::from_secs(60);
    if a.transport == crate::args::Transport::Quic {
        opts.transport = inagg_worker::Transport::Quic(a.trust.quic(Default::default())?);
    }
    let worker = Worker::connect(opts)
        .with_context(|| format!("rank {} could not join job {}", a.rank, a.job))?;
    let feedback = codec.block_scaled() && !t.no_error_feedback;

    let sizes: Vec<usize> = model.vars.iter().map(|(_, v)| v.elem_count()).collect();
    let mut flat = vec![0f32; sizes.iter().sum()];
    let mut rng = SmallRng::seed_from_u64(t.seed ^ (u64::from(a.rank) << 32) ^ 0xba7c);
    let scale = 1.0 / f32::from(a.world);
    let (vx, vy) = tensors(
        &split
            .test
            .rows(&(0..split.test.len().min(EVAL_ROWS)).collect::<Vec<_>>()),
    )?;
    let mut train_s = 0.0;
    for step in 0..t.steps {
        let started = Instant::now();
        let rows: Vec<usize> = (0..t.batch())
            .map(|_| rng.random_range(0..shard.len()))
            .collect();
        let (x, y) = tensors(&shard.rows(&rows))?;
        let loss = candle_nn::loss::cross_entropy(&model.forward(&x)?, &y)?;
        let mut grads = loss.backward()?;
        let mut off = 0;
        for ((_, v), n) in model.vars.iter().zip(&sizes) {
            let g = grads
                .get(v.as_tensor())
                .context("a parameter without a gradient")?;
            flat[off..off + n].copy_from_slice(&g.flatten_all()?.to_vec1::<f32>()?);
            off += n;
        }
        let (mut ar_s, mut sent, mut recv) = (0.0, 0, 0);
        let mut reduce = |part: &mut [f32], key: u64| -> Result<()> {
            let r = if feedback {
                worker.allreduce_with_feedback(part, key)
            } else {
                worker.allreduce(part)
            }
            .with_context(|| format!("rank {}: allreduce at step {step}", a.rank))?;
            ar_s += r.elapsed.as_secs_f64();
            sent += r.bytes_sent;
            recv += r.bytes_received;
            Ok(())
        };
        if t.per_layer {
            let mut off = 0;
            for (i, n) in sizes.iter().enumerate() {
                reduce(&mut flat[off..off + n], i as u64)?;
                off += n;
            }
        } else {
            reduce(&mut flat, 0)?;
        }
        let mut off = 0;
        for ((_, v), n) in model.vars.iter().zip(&sizes) {
            let avg: Vec<f32> = flat[off..off + n].iter().map(|g| g * scale).collect();
            grads.insert(
                v.as_tensor(),
                Tensor::from_vec(avg, v.shape(), &Device::Cpu)?,
            );
            off += n;
        }
        opt.step(&grads)?;
        let step_s = started.elapsed().as_secs_f64();
        train_s += step_s;
        emit(&Line::Step {
            step,
            loss: f64::from(loss.to_scalar::<f32>()?),
            allreduce_s: ar_s,
            step_s,
            bytes_sent: sent,
            bytes_recv: recv,
        })?;
        // Every rank evaluates, so that each pauses as long and none waits for
        // another in the next step's allreduce; rank 0 reports.
        let due = t.eval_every > 0 && ((step + 1) % t.eval_every == 0 || step + 1 == t.steps);
        if due {
            let accuracy = model.accuracy(&vx, &vy)?;
            if a.rank == 0 {
                emit(&Line::Eval {
                    step,
                    train_s,
                    accuracy,
                })?;
            }
        }
    }
    worker.close();
    let (tx, ty) = tensors(&split.test)?;
    let eval = shard.rows(&(0..shard.len().min(5000)).collect::<Vec<_>>());
    let (ex, ey) = tensors(&eval)?;
    let train_loss =
        candle_nn::loss::cross_entropy(&model.forward(&ex)?, &ey)?.to_scalar::<f32>()?;
    emit(&Line::Final {
        checksum: model.checksum()?,
        accuracy: model.accuracy(&tx, &ty)?,
        train_loss: f64::from(train_loss),
        parameters: model.parameters(),
    })
}
