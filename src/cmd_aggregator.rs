//! `inagg aggregator`: run the aggregator server until SIGINT or SIGTERM, over UDP,
//! QUIC, or both.
//!
//! With both, each transport runs its own server loop on its own thread, with its own
//! state machine: a job lives on one transport (its ranks all use the same one), so
//! nothing needs sharing between them, and the UDP path keeps its lock-free loop.
//! `--threads T` runs the UDP side as the library's sharded server
//! ([`inagg_aggregator::ShardedServer`]). This module parses flags, binds, and prints.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use inagg_aggregator::{
    run_together, DropReason, Front, Identity, Loop, ParentConfig, Server, ServerConfig,
    ShardedServer, Stats, DEFAULT_MAX_JOB_MEMORY, DEFAULT_SLOT_MEMORY,
};
use inagg_proto::aggregator::{Aggregator, AggregatorConfig};

/// The UDP address served when neither `--listen` nor `--quic` is given.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7070";

/// The help of `--slot-memory`, with the library's default.
fn slot_memory_help() -> String {
    format!(
        "Slot memory budget in bytes (like a switch's SRAM), shared by the jobs present in \
         max-min fair shares, re-granted at allreduce boundaries as jobs come and go. A slot \
         costs 2 x (4 + kept) x chunk elements + 16 x ceil(world / 64) bytes, where kept is \
         the codec's wire bytes (f16, bf16, i16: 2; i8: 1) and 0 for f32 and i32, whose \
         lanes are their results. A job waits while others shrink to make room, and is \
         refused if even its minimal share (4 slots) cannot fit. Default: {} per shard (and \
         for QUIC), with a cap per job (see --max-job-memory), which keeps strangers' joins \
         from claiming unbounded memory.",
        crate::args::size(DEFAULT_SLOT_MEMORY as u64)
    )
}

/// The help of `--max-job-memory`, with the library's default.
fn max_job_memory_help() -> String {
    format!(
        "The most slot memory one job may hold: its window is capped at as many slots as \
         fit. Without --slot-memory it defaults to {} per shard (the default budget over the \
         default --max-jobs, so that the default budget holds that many jobs at their caps \
         and no job waits for another's memory); with --slot-memory, to no cap (max-min fair \
         shares of that budget).",
        crate::args::size(DEFAULT_MAX_JOB_MEMORY as u64)
    )
}

/// Flags of `inagg aggregator`.
#[derive(Debug, clap::Args)]
pub struct Args {
    // UDP address to listen on; the help names the default.
    #[arg(long, value_parser = crate::admission::address, help = format!(
        "UDP address to listen on (port 0: any free port; the address is printed as \
         `listening on ADDR`). Default {DEFAULT_LISTEN} unless `--quic` is given alone."
    ))]
    pub listen: Option<SocketAddr>,
    /// QUIC address to listen on, beside or instead of `--listen` (printed as
    /// `quic on ADDR sha256 FINGERPRINT certificate FILE`).
    #[arg(long, value_parser = crate::admission::address)]
    pub quic: Option<SocketAddr>,
    /// The QUIC certificate (PEM). Generated, self-signed, on first start if neither it
    /// nor the key exists; workers trust it with `--ca FILE` or `--fingerprint`.
    #[arg(long, default_value = "inagg-aggregator.crt.pem")]
    pub cert: PathBuf,
    /// The QUIC private key (PEM), generated with the certificate (mode 0600).
    #[arg(long, default_value = "inagg-aggregator.key.pem")]
    pub key: PathBuf,
    /// The most slots one job may hold.
    #[arg(long, default_value_t = AggregatorConfig::default().max_window)]
    pub max_window: u32,
    /// The most jobs at once.
    #[arg(long, default_value_t = AggregatorConfig::default().max_jobs)]
    pub max_jobs: usize,
    // The slot memory budget; the help computes its default.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..),
          help = slot_memory_help())]
    pub slot_memory: Option<u64>,
    // The cap per job; the help computes its default.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..),
          help = max_job_memory_help())]
    pub max_job_memory: Option<u64>,
    /// UDP shards to run, one per thread (and core): shard k listens on the
    /// `--listen` port + k (with port 0, on a run of free ports), and workers stripe
    /// every job over all of them on their own. Each gets 1/T of `--slot-memory` and
    /// of `--max-job-memory` where they are given. QUIC runs one loop: with `--quic`
    /// alone, more than one thread is an error.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
    /// A rank silent this long (milliseconds) aborts its job.
    #[arg(long, default_value_t = AggregatorConfig::default().silence_timeout.as_millis() as u64)]
    pub silence_timeout_ms: u64,
    /// Over UDP, times a server loop with nothing to read yields the CPU, looking at
    /// the socket after each, before it sleeps (adaptive within N; 0: sleep at once).
    /// The default spares the ranks a wakeup per burst where they share cores with the
    /// aggregator; on a host of its own it is a short busy poll.
    #[arg(long, default_value_t = inagg_aggregator::DEFAULT_YIELDS_BEFORE_SLEEP)]
    pub yields_before_sleep: u32,
    /// Send every result to each rank, even for jobs whose ranks all asked for a
    /// multicast group. By default, over UDP listening on an IPv4 loopback address
    /// (not the wildcard), such a job's results go out once, to a group its ranks
    /// joined, as a switch multicasts; any local process may join that group and read
    /// them, so on a host shared with untrusted users pass this flag.
    #[arg(long)]
    pub no_multicast: bool,
    /// Over UDP, send without ECN and ignore CE marks on contributions (by default
    /// datagrams go out ECN-capable, and a contribution marked CE on the path counts
    /// as a congestion mark, which its result carries to the ranks).
    #[arg(long)]
    pub no_ecn: bool,
    /// Serve Prometheus metrics over HTTP at this address (`GET /metrics`; port 0
    /// picks one; the address is printed on stderr).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Admit only joins that prove this key (a file of at least 16 bytes, for example
    /// `head -c 32 /dev/urandom | base64 > inagg.key`; a final newline is ignored):
    /// without it nothing is created, so strangers can neither start jobs nor squat a
    /// job id. Every worker is given the same file (`--admission-key`). See
    /// docs/security.md for what it protects against.
    #[arg(long, value_name = "FILE", value_parser = crate::admission::key_file)]
    pub admission_key: Option<crate::admission::Key>,
    /// Serve as a rack aggregator under the aggregator at this UDP address
    /// (docs/protocol.md 8.5): each job takes rack `--rack`'s block of its ranks, sums
    /// their contributions, and joins the same job there as one rack of `--racks`,
    /// sending each chunk's sum up and the parent's result down. Its jobs take the
    /// parent's window (no `--slot-memory`); UDP only, one thread.
    #[arg(long, value_name = "ADDR", value_parser = crate::admission::address,
          requires_all = ["rack", "racks"])]
    pub parent: Option<SocketAddr>,
    /// With `--parent`: this rack's index, from 0 (below `--racks`).
    #[arg(long, value_name = "K", requires = "parent")]
    pub rack: Option<u16>,
    /// With `--parent`: how many racks the parent serves. Rack K takes ranks
    /// K * N / R up to (K + 1) * N / R (rounded down) of a job of N ranks.
    #[arg(long, value_name = "R", requires = "parent",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub racks: Option<u16>,
}

/// The configuration of each of `shards` servers (1 for QUIC), listening on `listen`.
fn config(a: &Args, listen: SocketAddr, shards: u16) -> ServerConfig {
    let mut cfg = ServerConfig::new(listen);
    cfg.protocol.max_window = a.max_window;
    cfg.protocol.max_jobs = a.max_jobs;
    let per_shard =
        |bytes: u64| usize::try_from(bytes).unwrap_or(usize::MAX) / usize::from(shards.max(1));
    // The defaults (those of `ServerConfig::new`) are per shard; given values are
    // shared among the shards.
    if let Some(b) = a.slot_memory {
        cfg.protocol.slot_memory = Some(per_shard(b));
        cfg.protocol.max_job_memory = None;
    }
    if let Some(m) = a.max_job_memory {
        cfg.protocol.max_job_memory = Some(per_shard(m));
    }
    cfg.protocol.silence_timeout = Duration::from_millis(a.silence_timeout_ms);
    cfg.yields_before_sleep = a.yields_before_sleep;
    cfg.multicast = !a.no_multicast;
    cfg.ecn = !a.no_ecn;
    cfg.protocol.admission_key = a.admission_key.as_ref().map(|k| k.0.clone());
    if let (Some(addr), Some(rack), Some(racks)) = (a.parent, a.rack, a.racks) {
        cfg.parent = Some(ParentConfig { addr, rack, racks });
    }
    cfg
}

/// Writes one line to stdout or stderr and ignores failure: whoever started the
/// aggregator may stop reading once it has the lines it needs (a closed pipe), and
/// that must not stop the aggregator (`println!` panics on a closed pipe).
fn say(to: &mut dyn Write, line: std::fmt::Arguments<'_>) {
    let _ = to
        .write_fmt(line)
        .and_then(|()| to.write_all(b"\n"))
        .and_then(|()| to.flush());
}

/// How a server loop publishes metrics.
#[derive(Debug, Clone, Copy)]
enum Publish {
    /// Not at all (no `--metrics`, or the other transport publishes).
    No,
    /// Unlabeled: the only UDP loop, or the only loop.
    Alone,
    /// With a `shard` label: one of several UDP shards.
    Shard(u16),
}

/// Runs a bound server until `stop`, publishing metrics as told. With two transports,
/// only the UDP side publishes (`publish` sets process-wide values).
fn serve<F: Front>(
    server: Server<F>,
    stop: &AtomicBool,
    publish: Publish,
) -> Result<Stats, inagg_aggregator::ServerError> {
    let shard = match publish {
        Publish::No => return server.run(stop),
        Publish::Alone => None,
        Publish::Shard(k) => Some(k),
    };
    server.run_observed(
        stop,
        Duration::from_millis(250),
        |agg: &Aggregator<SocketAddr>| crate::metrics::publish(agg, shard),
    )
}

/// What `--parent` cannot go with, as an error for the user.
fn check_rack_flags(a: &Args) -> Result<()> {
    let (Some(_), Some(rack), Some(racks)) = (a.parent, a.rack, a.racks) else {
        return Ok(());
    };
    if rack >= racks {
        bail!("--rack {rack} must be below --racks {racks} (racks count from 0)");
    }
    if a.quic.is_some() {
        bail!("--parent: a rack aggregator serves UDP only (drop --quic)");
    }
    if a.threads > 1 {
        bail!("--parent: a rack aggregator runs one thread (drop --threads)");
    }
    if a.slot_memory.is_some() || a.max_job_memory.is_some() {
        bail!(
            "--parent: a rack aggregator's jobs take its parent's window, so it keeps no \
             slot memory budget (drop --slot-memory and --max-job-memory)"
        );
    }
    Ok(())
}

pub fn run(a: &Args) -> Result<()> {
    check_rack_flags(a)?;
    let listen = match (a.listen, a.quic) {
        (None, None) => Some(DEFAULT_LISTEN.parse()?),
        (l, _) => l,
    };
    if listen.is_none() && a.threads > 1 {
        bail!(
            "--threads {} shards the UDP side, and --quic alone serves no UDP (QUIC runs one \
             loop): give --listen too, or drop --threads",
            a.threads
        );
    }
    let udp = listen
        .map(|l| ShardedServer::bind(&config(a, l, a.threads), a.threads))
        .transpose()?
        .map(ShardedServer::into_shards);
    let quic = match a.quic {
        Some(q) => {
            let id = Identity::load_or_generate(&a.cert, &a.key)
                .context("loading or generating the QUIC certificate")?;
            if id.generated {
                say(
                    &mut std::io::stderr(),
                    format_args!(
                        "generated a self-signed certificate in {} (key in {})",
                        a.cert.display(),
                        a.key.display()
                    ),
                );
            }
            Some((Server::bind_quic(config(a, q, 1), &id)?, id))
        }
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    // Scripts and `inagg bench` read these lines to learn the ports.
    if let Some(first) = udp.as_ref().and_then(|s| s.first()) {
        say(
            &mut std::io::stdout(),
            format_args!("listening on {}", first.local_addr()?),
        );
    }
    if let Some((s, id)) = &quic {
        say(
            &mut std::io::stdout(),
            format_args!(
                "quic on {} sha256 {} certificate {}",
                s.local_addr()?,
                id.fingerprint(),
                id.cert_path.display()
            ),
        );
    }
    if let Some(addr) = a.metrics {
        let bound = crate::metrics::serve(addr)?;
        say(
            &mut std::io::stderr(),
            format_args!("metrics on http://{bound}/metrics"),
        );
    }
    if let Some([first, .., last]) = udp.as_deref() {
        say(
            &mut std::io::stderr(),
            format_args!(
                "{} UDP shards on ports {}-{}",
                usize::from(a.threads),
                first.local_addr()?.port(),
                last.local_addr()?.port()
            ),
        );
    }
    let metrics = a.metrics.is_some();
    // One thread per loop: every UDP shard, and QUIC. Each loop's stop report is
    // labeled when the process runs more than one.
    let udp = udp.unwrap_or_default();
    let sharded = udp.len() > 1;
    let both = !udp.is_empty() && quic.is_some();
    let mut labels = Vec::new();
    let mut loops: Vec<Loop<'_, Stats>> = Vec::new();
    for (k, s) in (0u16..).zip(udp) {
        let (label, publish) = match (sharded, both) {
            (true, _) => (format!(" (UDP shard {k})"), Publish::Shard(k)),
            (false, true) => (" (UDP)".to_string(), Publish::Alone),
            (false, false) => (String::new(), Publish::Alone),
        };
        let publish = if metrics { publish } else { Publish::No };
        labels.push(label);
        loops.push(Box::new(move |stop| serve(s, stop, publish)));
    }
    if let Some((s, _)) = quic {
        // With UDP beside it, only the UDP side publishes metrics.
        let (label, publish) = match (both, metrics) {
            (true, _) => (" (QUIC)".to_string(), Publish::No),
            (false, true) => (String::new(), Publish::Alone),
            (false, false) => (String::new(), Publish::No),
        };
        labels.push(label);
        loops.push(Box::new(move |stop| serve(s, stop, publish)));
    }
    let stats = labels
        .into_iter()
        .zip(run_together(&stop, loops))
        .map(|(label, r)| {
            let stats = r.with_context(|| format!("the server loop{label}"))?;
            Ok((label, stats))
        })
        .collect::<Result<Vec<_>>>()?;
    for (label, stats) in &stats {
        report(label, stats);
    }
    Ok(())
}

/// Prints a server loop's counters as it stops; `label` names the shard or transport
/// when the process ran more than one loop.
fn report(label: &str, stats: &Stats) {
    let mut drops: Vec<String> = DropReason::ALL
        .iter()
        .filter(|r| stats.dropped(**r) > 0)
        .map(|r| format!("{}={}", r.name(), stats.dropped(*r)))
        .collect();
    if drops.is_empty() {
        drops.push("none".into());
    }
    say(
        &mut std::io::stderr(),
        format_args!(
            "aggregator stopped{label}: {} datagrams in, {} out, {} chunks completed, \
             {} copies answered, {} held answered, dropped: {}",
            stats.packets_received,
            stats.packets_sent,
            stats.chunks_completed,
            stats.copies_answered,
            stats.probes_held,
            drops.join(" ")
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `inagg aggregator`'s flags alone.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn shard_config(flags: &[&str]) -> ServerConfig {
        let cli = Cli::try_parse_from(std::iter::once("aggregator").chain(flags.iter().copied()))
            .expect("flags parse");
        config(&cli.args, SocketAddr::from(([127, 0, 0, 1], 0)), 1)
    }

    #[test]
    fn the_spin_flag_reaches_every_shard_config() {
        assert_eq!(
            shard_config(&[]).yields_before_sleep,
            inagg_aggregator::DEFAULT_YIELDS_BEFORE_SLEEP
        );
        assert_eq!(
            shard_config(&["--yields-before-sleep", "0"]).yields_before_sleep,
            0
        );
        assert_eq!(
            shard_config(&["--yields-before-sleep", "7"]).yields_before_sleep,
            7
        );
    }

    #[test]
    fn rack_flags_reach_the_config_and_bad_ones_are_refused() {
        let cfg = shard_config(&["--parent", "127.0.0.1:7000", "--rack", "1", "--racks", "2"]);
        assert_eq!(
            cfg.parent,
            Some(ParentConfig {
                addr: "127.0.0.1:7000".parse().expect("an address"),
                rack: 1,
                racks: 2
            })
        );
        assert_eq!(shard_config(&[]).parent, None);
        let parse = |flags: &[&str]| {
            Cli::try_parse_from(std::iter::once("aggregator").chain(flags.iter().copied()))
        };
        // Each flag needs the others.
        assert!(parse(&["--parent", "127.0.0.1:7000"]).is_err());
        assert!(parse(&["--rack", "0", "--racks", "2"]).is_err());
        for (flags, says) in [
            (&["--rack", "2", "--racks", "2"][..], "below --racks"),
            (
                &["--rack", "0", "--racks", "2", "--threads", "2"],
                "one thread",
            ),
            (
                &["--rack", "0", "--racks", "2", "--slot-memory", "1000"],
                "slot memory",
            ),
        ] {
            let mut all = vec!["--parent", "127.0.0.1:7000"];
            all.extend_from_slice(flags);
            let cli = parse(&all).expect("flags parse");
            let err = check_rack_flags(&cli.args).expect_err("refused");
            assert!(err.to_string().contains(says), "{flags:?}: {err}");
        }
    }

    #[test]
    fn multicast_is_on_unless_turned_off() {
        assert!(shard_config(&[]).multicast);
        assert!(!shard_config(&["--no-multicast"]).multicast);
    }
}
