//! `inagg aggregator`: run the aggregator server until SIGINT or SIGTERM.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use inagg_aggregator::{DropReason, Server, ServerConfig};

/// Flags of `inagg aggregator`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// UDP address to listen on (port 0: any free port; the address is printed).
    #[arg(long, default_value = "0.0.0.0:7070")]
    pub listen: SocketAddr,
    /// The most slots one job may hold.
    #[arg(long, default_value_t = 1024)]
    pub max_window: u32,
    /// The most jobs at once.
    #[arg(long, default_value_t = 64)]
    pub max_jobs: usize,
    /// A rank silent this long (milliseconds) aborts its job.
    #[arg(long, default_value_t = 3000)]
    pub silence_timeout_ms: u64,
    /// Serve Prometheus metrics over HTTP at this address (`GET /metrics`; port 0
    /// picks one; the address is printed on stderr).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
}

pub fn run(a: &Args) -> Result<()> {
    let mut cfg = ServerConfig::new(a.listen);
    cfg.protocol.max_window = a.max_window;
    cfg.protocol.max_jobs = a.max_jobs;
    cfg.protocol.silence_timeout = Duration::from_millis(a.silence_timeout_ms);
    cfg.protocol.seed = {
        use rand::{Rng, SeedableRng};
        rand::rngs::StdRng::from_os_rng().random()
    };
    let server = Server::bind(cfg)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    // Scripts and `inagg bench` read this line to learn the port.
    println!("listening on {}", server.local_addr()?);
    std::io::stdout().flush()?;
    let stats = match a.metrics {
        Some(addr) => {
            let bound = crate::metrics::serve(addr)?;
            eprintln!("metrics on http://{bound}/metrics");
            server.run_observed(&stop, Duration::from_millis(250), crate::metrics::publish)?
        }
        None => server.run(&stop)?,
    };
    let mut drops: Vec<String> = DropReason::ALL
        .iter()
        .filter(|r| stats.dropped(**r) > 0)
        .map(|r| format!("{}={}", r.name(), stats.dropped(*r)))
        .collect();
    if drops.is_empty() {
        drops.push("none".into());
    }
    eprintln!(
        "aggregator stopped: {} datagrams in, {} out, {} chunks completed, {} copies answered, {} held answered, dropped: {}",
        stats.packets_received,
        stats.packets_sent,
        stats.chunks_completed,
        stats.copies_answered,
        stats.probes_held,
        drops.join(" ")
    );
    Ok(())
}
