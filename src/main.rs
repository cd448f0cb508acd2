//! The `inagg` command line: thin glue over the libraries.

mod admission;
mod bench;
mod children;
mod cmd_aggregator;
mod cmd_worker;
mod demo;
mod metrics;
mod peers;
mod plot;
mod relay;
mod sweep;
mod tensor;

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use inagg_proto::codec;
use inagg_proto::sim::{Sim, SimConfig};
use inagg_proto::worker::WorkerConfig;

/// In-network gradient aggregation in software.
#[derive(Debug, Parser)]
#[command(name = "inagg", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model on N local worker processes through inagg, once per codec.
    Demo(demo::Args),
    /// One rank of `inagg demo` (started by it).
    #[command(hide = true)]
    DemoWorker(demo::worker::Args),
    /// Run an aggregator server until SIGINT or SIGTERM.
    Aggregator(cmd_aggregator::Args),
    /// Run one rank of a job: allreduce seeded tensors, time and check them.
    Worker(cmd_worker::Args),
    /// Start an aggregator and N workers on 127.0.0.1 and measure allreduce.
    Bench(bench::Args),
    /// Run the bench over codecs, worker counts and chunk sizes; write CSV and plots.
    Sweep(sweep::Args),
    /// Turn measurements (JSON lines) into peers.csv, peers.png and a ratio table
    /// (the last step of scripts/compare-peers.sh).
    #[command(hide = true)]
    PeersReport(peers::Args),
    /// Relay UDP between workers and an aggregator, injecting seeded faults.
    Relay(relay::Args),
    /// Run an allreduce in the deterministic in-memory simulator (no sockets).
    Simulate(SimulateArgs),
}

#[derive(Debug, clap::Args)]
struct SimulateArgs {
    /// Number of ranks.
    #[arg(long, default_value_t = 4)]
    workers: u16,
    /// Elements of the tensor.
    #[arg(long, default_value_t = 100_000)]
    elements: usize,
    /// Codec.
    #[arg(long, default_value = "i32")]
    codec: String,
    /// Probability that a datagram is lost (duplication and reordering follow).
    #[arg(long, default_value_t = 0.05)]
    loss: f64,
    /// Seed of the simulated network and of the inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn simulate(a: &SimulateArgs) -> Result<()> {
    let codec = codec::by_name(&a.codec).with_context(|| {
        format!(
            "unknown codec {:?}; known: {}",
            a.codec,
            codec::names().join(", ")
        )
    })?;
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
    let mut max_err = 0f64;
    for i in 0..a.elements {
        let exact: f64 = inputs.iter().map(|v| f64::from(v[i])).sum();
        max_err = max_err.max((f64::from(out[0][i]) - exact).abs());
    }
    let identical = out.iter().all(|o| o == &out[0]);
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
    if !identical {
        bail!("ranks got different results");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // The commands that start processes stop them when a signal ends this one.
    if matches!(
        cli.command,
        Command::Demo(_) | Command::Bench(_) | Command::Sweep(_)
    ) {
        if let Err(e) = children::stop_on_signals() {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let result = match &cli.command {
        Command::Demo(a) => demo::run(a),
        Command::DemoWorker(a) => demo::worker::run(a),
        Command::Aggregator(a) => cmd_aggregator::run(a),
        Command::Worker(a) => cmd_worker::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Sweep(a) => sweep::run(a),
        Command::Relay(a) => relay::run(a),
        Command::PeersReport(a) => peers::run(a),
        Command::Simulate(a) => simulate(a),
    };
    children::await_signal_exit();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
