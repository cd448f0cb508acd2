//! The `inagg` command line: thin glue over the libraries.

mod admission;
mod args;
mod bench;
mod children;
mod cli_doc;
mod cmd_aggregator;
mod cmd_worker;
mod cputime;
mod demo;
mod harness;
mod job;
mod metrics;
mod peers;
mod plot;
mod relay;
mod report;
mod simulate;
mod stats;
mod sweep;
mod tcp_probe;
mod tensor;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

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
    Simulate(simulate::Args),
    /// Time short TCP request/response round trips (the cross-traffic probe), or
    /// answer them.
    TcpProbe(tcp_probe::Args),
    /// Print the command-line reference (docs/cli.md) as Markdown.
    #[command(hide = true)]
    CliReference,
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
        Command::Simulate(a) => simulate::run(a),
        Command::TcpProbe(a) => tcp_probe::run(a),
        Command::CliReference => {
            print!("{}", cli_doc::markdown(&Cli::command()));
            Ok(())
        }
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
