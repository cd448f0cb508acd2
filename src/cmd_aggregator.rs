//! `inagg aggregator`: run the aggregator server until SIGINT or SIGTERM, over UDP,
//! QUIC, or both.
//!
//! With both, each transport runs its own server loop on its own thread, with its own
//! state machine: a job lives on one transport (its ranks all use the same one), so
//! nothing needs sharing between them, and the UDP path keeps its lock-free loop.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use inagg_aggregator::{DropReason, Front, Identity, Server, ServerConfig, Stats};
use inagg_proto::aggregator::Aggregator;

/// The UDP address served when neither `--listen` nor `--quic` is given.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7070";

/// Flags of `inagg aggregator`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// UDP address to listen on (port 0: any free port; the address is printed as
    /// `listening on ADDR`). Default 0.0.0.0:7070 unless `--quic` is given alone.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// QUIC address to listen on, beside or instead of `--listen` (printed as
    /// `quic on ADDR sha256 FINGERPRINT certificate FILE`).
    #[arg(long)]
    pub quic: Option<SocketAddr>,
    /// The QUIC certificate (PEM). Generated, self-signed, on first start if neither it
    /// nor the key exists; workers trust it with `--ca FILE` or `--fingerprint`.
    #[arg(long, default_value = "inagg-aggregator.crt.pem")]
    pub cert: PathBuf,
    /// The QUIC private key (PEM), generated with the certificate (mode 0600).
    #[arg(long, default_value = "inagg-aggregator.key.pem")]
    pub key: PathBuf,
    /// The most slots one job may hold.
    #[arg(long, default_value_t = 1024)]
    pub max_window: u32,
    /// The most jobs at once.
    #[arg(long, default_value_t = 64)]
    pub max_jobs: usize,
    /// Slot memory budget in bytes (like a switch's SRAM), shared by the jobs present in
    /// max-min fair shares, re-granted at allreduce boundaries as jobs come and go. A
    /// slot costs 2 x (4 + codec bytes) x chunk elements + 16 x ceil(world / 64) bytes.
    /// A job waits while others shrink to make room, and is refused if even its
    /// minimal share (4 slots) cannot fit. Default: no budget (every job gets its
    /// window, up to --max-window).
    #[arg(long, value_name = "BYTES")]
    pub slot_memory: Option<usize>,
    /// A rank silent this long (milliseconds) aborts its job.
    #[arg(long, default_value_t = 3000)]
    pub silence_timeout_ms: u64,
    /// Serve Prometheus metrics over HTTP at this address (`GET /metrics`; port 0
    /// picks one; the address is printed on stderr).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
}

fn config(a: &Args, listen: SocketAddr) -> ServerConfig {
    let mut cfg = ServerConfig::new(listen);
    cfg.protocol.max_window = a.max_window;
    cfg.protocol.max_jobs = a.max_jobs;
    cfg.protocol.slot_memory = a.slot_memory;
    cfg.protocol.silence_timeout = Duration::from_millis(a.silence_timeout_ms);
    cfg.protocol.seed = {
        use rand::{Rng, SeedableRng};
        rand::rngs::StdRng::from_os_rng().random()
    };
    cfg
}

/// Runs a bound server until `stop`, publishing metrics if they are served. With two
/// transports, only the UDP one publishes (`publish` sets process-wide values).
fn serve<F: Front>(server: Server<F>, stop: &AtomicBool, metrics: bool) -> Result<Stats> {
    Ok(if metrics {
        server.run_observed(
            stop,
            Duration::from_millis(250),
            |agg: &Aggregator<SocketAddr>| crate::metrics::publish(agg),
        )?
    } else {
        server.run(stop)?
    })
}

pub fn run(a: &Args) -> Result<()> {
    let listen = match (a.listen, a.quic) {
        (None, None) => Some(DEFAULT_LISTEN.parse()?),
        (l, _) => l,
    };
    let udp = listen.map(|l| Server::bind(config(a, l))).transpose()?;
    let quic = match a.quic {
        Some(q) => {
            let id = Identity::load_or_generate(&a.cert, &a.key)
                .context("loading or generating the QUIC certificate")?;
            if id.generated {
                eprintln!(
                    "generated a self-signed certificate in {} (key in {})",
                    a.cert.display(),
                    a.key.display()
                );
            }
            Some((Server::bind_quic(config(a, q), &id)?, id))
        }
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    // Scripts and `inagg bench` read these lines to learn the ports.
    if let Some(s) = &udp {
        println!("listening on {}", s.local_addr()?);
    }
    if let Some((s, id)) = &quic {
        println!(
            "quic on {} sha256 {} certificate {}",
            s.local_addr()?,
            id.fingerprint(),
            id.cert_path.display()
        );
    }
    std::io::stdout().flush()?;
    if let Some(addr) = a.metrics {
        let bound = crate::metrics::serve(addr)?;
        eprintln!("metrics on http://{bound}/metrics");
    }
    let metrics = a.metrics.is_some();
    let stats = std::thread::scope(|scope| -> Result<Vec<Stats>> {
        let quic = quic.map(|(s, _)| {
            let stop = &stop;
            let m = metrics && udp.is_none();
            scope.spawn(move || serve(s, stop, m))
        });
        let mut all = Vec::new();
        if let Some(s) = udp {
            let r = serve(s, &stop, metrics);
            // One transport failing stops the other.
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            all.push(r?);
        }
        if let Some(h) = quic {
            all.push(
                h.join()
                    .map_err(|_| anyhow!("the QUIC server panicked"))??,
            );
        }
        Ok(all)
    })?;
    for stats in &stats {
        report(stats);
    }
    Ok(())
}

fn report(stats: &Stats) {
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
}
