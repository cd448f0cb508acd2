//! A benchmark job as `inagg bench` and `inagg sweep` run it: what to run
//! ([`JobSpec`], `inagg bench`'s flags), its worker processes (spawned with the
//! flags of `inagg worker`, their JSON reports collected), and the JSON row that
//! sums up one codec's jobs ([`Row`], a contract with scripts; [`write_csv`]).

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use crate::args::FaultArgs;
use crate::args::Transport;
use crate::args::Tuning;
use crate::harness::{Netlab, Proc};
use crate::report::Report;
use crate::stats::{jain, median};

/// What a benchmark runs: the flags of `inagg bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct JobSpec {
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    pub workers: u16,
    /// Elements of the tensor.
    #[arg(long, default_value_t = 1 << 20)]
    pub elements: usize,
    /// Codecs to run, one job each, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "f32", value_parser = crate::args::codec)]
    pub codec: Vec<crate::args::CodecArg>,
    /// Transport between workers and aggregator.
    #[arg(long, value_enum, default_value_t = Transport::Udp)]
    pub transport: Transport,
    #[command(flatten)]
    pub runs: crate::args::Runs,
    #[command(flatten)]
    pub tuning: Tuning,
    /// One JSON object per line per configuration.
    #[arg(long)]
    pub json: bool,
    /// Fraction of chunks that are zero on every rank (sparse gradients).
    #[arg(long, default_value_t = 0.0)]
    pub zero_fraction: f64,
    /// Concurrent jobs per codec, each with its own `--workers` processes, sharing the
    /// aggregator(s).
    #[arg(long, default_value_t = 1)]
    pub jobs: u16,
    /// Aggregator processes to start; every job is striped over all of them.
    #[arg(long, default_value_t = 1)]
    pub aggregators: u16,
    /// UDP shards per aggregator, one thread each (`inagg aggregator --threads`); the
    /// workers find them in their grants and stripe over them.
    #[arg(long, default_value_t = 1)]
    pub aggregator_threads: u16,
    /// Start the aggregator(s) with this slot memory budget in bytes (`inagg
    /// aggregator --slot-memory`); default the aggregator's own.
    #[arg(long, value_name = "BYTES")]
    pub slot_memory: Option<usize>,
    /// Start the aggregator(s) with `--yields-before-sleep N`: times an aggregator
    /// with nothing to read over UDP yields the CPU before sleeping; default the
    /// aggregator's own.
    #[arg(long, value_name = "N")]
    pub aggregator_yields: Option<u32>,
    /// Faults for a relay in the path (none: no relay), as `inagg relay` takes them.
    #[command(flatten)]
    pub faults: FaultArgs,
    /// Seed of the relay's fault decisions.
    #[arg(long, default_value_t = 1)]
    pub fault_seed: u64,
    #[command(flatten)]
    pub netlab: Netlab,
    /// Give up (and kill every process) after this many seconds per configuration.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// With `--transport quic`: the certificate the aggregators use, which the
    /// workers are told to trust (set by `run`).
    #[arg(skip)]
    pub ca: Option<PathBuf>,
    /// Start one more aggregator, which stays idle, and give every worker
    /// `--failover` to it: each rank then keeps a copy of every allreduce's input to
    /// redo it elsewhere, and the row (`failover: true`) shows what that costs.
    #[arg(long)]
    pub failover_standby: bool,
    /// The standby aggregator's address (set by `run`).
    #[arg(skip)]
    pub standby: Option<SocketAddr>,
    /// Aggregate in two levels (docs/protocol.md 8.5): start R rack aggregators
    /// under the aggregator (`inagg aggregator --parent`), rack k serving ranks
    /// k * N / R up to (k + 1) * N / R, each rank joining its rack's. Inside
    /// `scripts/netlab.sh --racks R`, rack k's aggregator runs on rack k's bridge and
    /// the aggregator at the spine.
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u16).range(1..))]
    pub racks: Option<u16>,
    /// The rack aggregators' addresses, rack by rack (set by `run`).
    #[arg(skip)]
    pub rack_aggs: Vec<SocketAddr>,
}

impl JobSpec {
    /// Every flag at its default, as `inagg bench` without flags has them: what
    /// `inagg sweep` starts from and varies.
    pub fn defaults() -> Self {
        #[derive(clap::Parser)]
        struct Bench {
            #[command(flatten)]
            spec: JobSpec,
        }
        <Bench as clap::Parser>::parse_from(["inagg-bench"]).spec
    }
}

/// One line of `inagg bench --json`. Field names are a contract with scripts.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub transport: Transport,
    pub codec: String,
    pub workers: u16,
    pub elements: usize,
    pub iters: usize,
    pub warmup: usize,
    pub chunk_elements: u16,
    pub window: u32,
    pub stochastic: bool,
    pub skip_zeros: bool,
    pub zero_fraction: f64,
    /// Concurrent jobs and aggregators.
    pub jobs: u16,
    pub aggregators: u16,
    /// Shards (threads) per aggregator.
    pub aggregator_threads: u16,
    /// `--aggregator-yields` where given (null: the aggregator's default).
    pub aggregator_yields: Option<u32>,
    /// Whether the ranks asked for their results by multicast (not `--no-multicast`);
    /// only a loopback aggregator reached without a relay sends them so.
    pub multicast: bool,
    /// Whether the ranks had a failover aggregator (`--failover-standby`), and so
    /// kept a copy of each allreduce's input.
    pub failover: bool,
    /// ATE/s of each job (from its median); `ate_per_s` is their sum.
    pub per_job_ate_per_s: Vec<f64>,
    /// Jain's fairness index over `per_job_ate_per_s` (1: perfectly fair).
    pub jain: f64,
    /// Faults injected by the relay in the path (0 without one).
    pub loss: f64,
    pub dup: f64,
    pub reorder: f64,
    /// The relay's link rate and CE-marking threshold (`--rate-mbit`,
    /// `--mark-above`), where given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_mbit: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mark_above: Option<usize>,
    /// Median over iterations of the slowest rank's time (with several jobs, the
    /// slowest job's median).
    pub median_s: f64,
    pub min_s: f64,
    /// Elements of the reduced tensor per second, from the median.
    pub ate_per_s: f64,
    /// f32 tensor bytes / median time, in GB/s.
    pub algbw_gbps: f64,
    /// Per allreduce, on the wire, IP and UDP headers included (mean over ranks).
    pub bytes_sent_per_worker: u64,
    pub bytes_recv_per_worker: u64,
    pub max_abs_err: f64,
    pub rel_l2_err: f64,
    /// Over all ranks and timed iterations.
    pub retransmissions: u64,
    /// Per allreduce, the part of `bytes_sent_per_worker` that retransmissions took.
    pub retransmitted_bytes_per_worker: u64,
    /// Retransmissions that went as header-only probes (over all ranks and iterations).
    pub probes: u64,
    /// Results that carried a congestion mark (from the aggregator's queue or CE on
    /// the path), over all ranks and timed iterations.
    pub marks: u64,
    /// Dips the ranks' congestion control began (moments at the smallest window so
    /// that the path's queue empties), over all ranks and timed iterations.
    pub dips: u64,
    /// Times the ranks' pacing rule held a send back until its timer, over all ranks
    /// and timed iterations: 0 where pacing is off (toward a loopback aggregator, over
    /// QUIC, `--pacing-gain 0`).
    pub pacing_holds: u64,
    /// Loss bursts that set the ranks' queue and dip rules aside (the overflow rule:
    /// flows that wait for loss keep the queue overflowing), over all ranks and timed
    /// iterations.
    pub overflows: u64,
    /// The smallest congestion window any rank ended a timed allreduce with (null
    /// without timed allreduces).
    pub congestion_window_min: Option<u64>,
    pub ranks_identical: bool,
    pub within_bound: bool,
    /// Rack aggregators between the ranks and the aggregator (`--racks`), where given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub racks: Option<u16>,
    /// Checksum of rank 0's last result (hex): equal runs give equal bits.
    pub result_checksum: String,
    /// In `scripts/netlab.sh`: the time each worker's link needs for the bytes the
    /// worker sends (first transmissions) or receives, the larger (and the time the
    /// aggregator's link needs for all ranks' bytes, where `--aggregator-link-rate`
    /// shapes it, if longer), and that bound over the median time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line_rate_bound_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line_rate_fraction: Option<f64>,
    /// Seconds of CPU (user and system) one allreduce cost, all of a job's ranks and
    /// the aggregators together: `worker_cpu_s_per_allreduce` plus
    /// `aggregator_cpu_s_per_allreduce` (null where either is unknown).
    pub cpu_s_per_allreduce: Option<f64>,
    /// The ranks' part: each rank's CPU in its timed allreduce calls, summed over the
    /// ranks of a job (mean over jobs).
    pub worker_cpu_s_per_allreduce: Option<f64>,
    /// The aggregators' part: their CPU over the whole run of this codec's jobs
    /// (warm-ups, barriers and joins included) over the allreduces they served.
    pub aggregator_cpu_s_per_allreduce: Option<f64>,
}

/// Writes rows as CSV: the JSON fields in order, lists joined by `;`.
pub fn write_csv<T: Serialize>(path: &std::path::Path, rows: &[T]) -> Result<()> {
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("writing {}", path.display()))?;
    for (i, r) in rows.iter().enumerate() {
        let serde_json::Value::Object(fields) = serde_json::to_value(r)? else {
            bail!("a row is not a JSON object");
        };
        if i == 0 {
            w.write_record(fields.keys())?;
        }
        w.write_record(fields.values().map(|v| {
            match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(a) => a
                    .iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(";"),
                other => other.to_string(),
            }
        }))?;
    }
    w.flush()?;
    Ok(())
}

fn worker_args(a: &JobSpec, aggs: &[SocketAddr], job: u32, rank: u16, codec: &str) -> Vec<String> {
    let t = &a.tuning;
    let list: Vec<String> = aggs.iter().map(|x| x.to_string()).collect();
    [
        "worker",
        "--json",
        if aggs.len() == 1 {
            "--aggregator"
        } else {
            "--aggregators"
        },
        &list.join(","),
        "--job",
        &job.to_string(),
        "--rank",
        &rank.to_string(),
        "--world",
        &a.workers.to_string(),
        "--codec",
        codec,
        "--elements",
        &a.elements.to_string(),
        "--iters",
        &a.runs.iters.to_string(),
        "--warmup",
        &a.runs.warmup.to_string(),
        "--seed",
        &a.runs.seed.to_string(),
        "--secret",
        &t.secret,
        "--join-timeout-ms",
        &t.join_timeout_ms.to_string(),
        "--aggregator-timeout-ms",
        &t.aggregator_timeout_ms.to_string(),
        "--zero-fraction",
        &a.zero_fraction.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(
        t.chunk_elements
            .iter()
            .flat_map(|c| ["--chunk-elements".to_string(), c.to_string()]),
    )
    .chain(
        t.window
            .iter()
            .flat_map(|w| ["--window".to_string(), w.to_string()]),
    )
    .chain(t.stochastic.then(|| "--stochastic".to_string()))
    .chain(t.skip_zeros.then(|| "--skip-zeros".to_string()))
    .chain(
        t.no_congestion_control
            .then(|| "--no-congestion-control".to_string()),
    )
    .chain([
        "--yields-before-sleep".to_string(),
        t.yields_before_sleep.to_string(),
        "--queue-target".to_string(),
        t.queue_target.to_string(),
        "--dip-interval-ms".to_string(),
        t.dip_interval_ms.to_string(),
        "--overflow-hold-ms".to_string(),
        t.overflow_hold_ms.to_string(),
    ])
    .chain(
        t.pacing_gain
            .into_iter()
            .flat_map(|g| ["--pacing-gain".to_string(), g.to_string()]),
    )
    .chain(t.no_multicast.then(|| "--no-multicast".to_string()))
    .chain(t.no_ecn.then(|| "--no-ecn".to_string()))
    .chain(
        a.standby
            .iter()
            .flat_map(|s| ["--failover".to_string(), s.to_string()]),
    )
    .chain(match (a.transport, &a.ca) {
        (Transport::Quic, Some(ca)) => vec![
            "--transport".to_string(),
            "quic".to_string(),
            "--ca".to_string(),
            ca.display().to_string(),
            "--quic-mode".to_string(),
            inagg_quic::Mode::from(t.quic_mode).name().to_string(),
        ],
        _ => Vec::new(),
    })
    .collect()
}

/// A job's worker processes and the threads draining their pipes.
pub struct RunningJob {
    job: u32,
    codec: String,
    procs: Vec<Proc>,
    readers: Vec<std::thread::JoinHandle<(String, String)>>,
}

/// Runs one job: N worker processes; returns their reports.
pub fn run_job(a: &JobSpec, aggs: &[SocketAddr], job: u32, codec: &str) -> Result<Vec<Report>> {
    let running = spawn_job(a, aggs, job, codec)?;
    finish_job(
        running,
        Instant::now() + Duration::from_secs(a.timeout_s),
        a.timeout_s,
    )
}

/// Starts one job's N worker processes.
pub fn spawn_job(a: &JobSpec, aggs: &[SocketAddr], job: u32, codec: &str) -> Result<RunningJob> {
    let mut procs = Vec::new();
    for rank in 0..a.workers {
        let ns = a.netlab.worker_netns.as_ref().map(|p| format!("{p}{rank}"));
        // With racks, each rank joins its rack's aggregator.
        let racks = u16::try_from(a.rack_aggs.len()).unwrap_or(u16::MAX);
        let rack = (0..racks)
            .find(|&k| inagg_proto::aggregator::rack_ranks(a.workers, k, racks).contains(&rank));
        let own;
        let aggs = match rack {
            Some(k) => {
                own = [a.rack_aggs[usize::from(k)]];
                &own[..]
            }
            None => aggs,
        };
        procs.push(Proc::spawn(
            Netlab::command(ns.as_deref())?
                .args(worker_args(a, aggs, job, rank, codec))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
            format!("worker {rank}"),
        )?);
    }
    // Drain every pipe on its own thread so that no child blocks on a full pipe.
    let readers: Vec<_> = procs
        .iter_mut()
        .map(|p| {
            let mut out = p.child.stdout.take();
            let mut err = p.child.stderr.take();
            std::thread::spawn(move || {
                let (mut o, mut e) = (String::new(), String::new());
                if let Some(s) = out.as_mut() {
                    let _ = s.read_to_string(&mut o);
                }
                if let Some(s) = err.as_mut() {
                    let _ = s.read_to_string(&mut e);
                }
                (o, e)
            })
        })
        .collect();
    Ok(RunningJob {
        job,
        codec: codec.to_string(),
        procs,
        readers,
    })
}

/// Waits for a job's workers (killing them at `deadline`) and parses their reports.
pub fn finish_job(j: RunningJob, deadline: Instant, timeout_s: u64) -> Result<Vec<Report>> {
    let RunningJob {
        job,
        codec,
        mut procs,
        readers,
    } = j;
    let mut statuses = vec![None; procs.len()];
    while statuses.iter().any(Option::is_none) {
        for (p, st) in procs.iter_mut().zip(statuses.iter_mut()) {
            if st.is_none() {
                *st = p.child.try_wait()?;
            }
        }
        if Instant::now() > deadline {
            bail!("job {job} ({codec}) did not finish within {timeout_s} s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for ((p, st), r) in procs.iter().zip(&statuses).zip(readers) {
        let (out, err) = r.join().map_err(|_| anyhow!("reader thread panicked"))?;
        let ok = st.is_some_and(|s| s.success());
        if !ok {
            failures.push(format!("{} exited with {:?}: {}", p.name, st, err.trim()));
            continue;
        }
        let line = out.lines().last().unwrap_or_default();
        reports.push(
            serde_json::from_str::<Report>(line)
                .with_context(|| format!("{} printed {line:?}", p.name))?,
        );
    }
    if !failures.is_empty() {
        bail!("job {job} ({codec}) failed:\n{}", failures.join("\n"));
    }
    Ok(reports)
}

/// Median over iterations of the slowest rank's time, and the fastest such time.
fn job_times(reports: &[Report]) -> (f64, f64) {
    let iters = reports.iter().map(|r| r.times_s.len()).min().unwrap_or(0);
    let slowest: Vec<f64> = (0..iters)
        .map(|i| reports.iter().map(|r| r.times_s[i]).fold(0.0, f64::max))
        .collect();
    (
        median(&slowest),
        slowest.iter().copied().fold(f64::INFINITY, f64::min),
    )
}

/// The JSON row of one codec from the reports of each of its concurrent jobs.
pub fn row(
    a: &JobSpec,
    codec: &str,
    jobs: &[Vec<Report>],
    aggregator_cpu_s_per_allreduce: Option<f64>,
) -> Row {
    // The path the defaults were chosen for: loopback unless netlab placed the
    // aggregator elsewhere.
    let agg = SocketAddr::new(
        a.netlab
            .agg_ip
            .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1])),
        0,
    );
    let times: Vec<(f64, f64)> = jobs.iter().map(|r| job_times(r)).collect();
    let per_job: Vec<f64> = times
        .iter()
        .map(|(m, _)| if *m > 0.0 { a.elements as f64 / m } else { 0.0 })
        .collect();
    let med = times.iter().map(|t| t.0).fold(0.0, f64::max);
    let total: f64 = per_job.iter().sum();
    let identical = jobs.iter().all(|r| {
        let sums: Vec<u64> = r
            .iter()
            .filter_map(|x| x.check.as_ref())
            .map(|c| c.checksum)
            .collect();
        sums.windows(2).all(|w| w[0] == w[1])
    });
    let reports: Vec<&Report> = jobs.iter().flatten().collect();
    let n = reports.len().max(1) as u64;
    // The busiest worker link's bytes (either way) at the netlab link rate: the bytes
    // the allreduce needs, so retransmissions are left out (they would raise the
    // bound with the waste). Where the aggregator's link is shaped too, every rank's
    // bytes cross it, each way.
    let needed = |r: &&Report| r.bytes_sent.saturating_sub(r.retransmitted_bytes);
    let bound = a.netlab.link_bps.map(|bps| {
        let worst = reports
            .iter()
            .map(|r| needed(r).max(r.bytes_recv))
            .max()
            .unwrap_or(0);
        let worker_link = worst as f64 * 8.0 / bps;
        let agg_link = a.netlab.agg_link_bps.map_or(0.0, |agg| {
            let up: u64 = reports.iter().map(needed).sum();
            let down: u64 = reports.iter().map(|r| r.bytes_recv).sum();
            up.max(down) as f64 * 8.0 / agg
        });
        worker_link.max(agg_link)
    });
    let checks: Vec<_> = reports.iter().filter_map(|r| r.check.as_ref()).collect();
    // Each job's ranks' CPU per allreduce, summed; the mean over jobs.
    let per_job_cpu: Option<Vec<f64>> = jobs
        .iter()
        .map(|ranks| {
            ranks
                .iter()
                .map(|r| r.cpu_s_per_allreduce)
                .sum::<Option<f64>>()
        })
        .collect();
    let worker_cpu = per_job_cpu
        .filter(|v| !v.is_empty())
        .map(|v| v.iter().sum::<f64>() / v.len() as f64);
    Row {
        transport: a.transport,
        codec: codec.to_string(),
        workers: a.workers,
        elements: a.elements,
        iters: a.runs.iters,
        warmup: a.runs.warmup,
        // As granted (QUIC datagrams shrink it), from the ranks' reports.
        chunk_elements: reports.first().map_or(0, |r| r.chunk_elements),
        window: inagg_proto::codec::by_name(codec).map_or_else(
            || inagg_worker::default_window(&agg),
            |c| a.tuning.window_for(c, &agg),
        ),
        stochastic: a.tuning.stochastic,
        skip_zeros: a.tuning.skip_zeros,
        zero_fraction: a.zero_fraction,
        loss: a.faults.loss,
        dup: a.faults.dup,
        reorder: a.faults.reorder,
        rate_mbit: a.faults.rate_mbit,
        mark_above: a.faults.mark_above,
        jobs: jobs.len() as u16,
        aggregators: a.aggregators,
        aggregator_threads: a.aggregator_threads,
        racks: a.racks,
        aggregator_yields: a.aggregator_yields,
        multicast: !a.tuning.no_multicast,
        failover: a.standby.is_some(),
        jain: jain(&per_job),
        per_job_ate_per_s: per_job,
        median_s: med,
        min_s: times.iter().map(|t| t.1).fold(f64::INFINITY, f64::min),
        ate_per_s: total,
        algbw_gbps: total * 4.0 / 1e9,
        bytes_sent_per_worker: reports.iter().map(|r| r.bytes_sent).sum::<u64>() / n,
        bytes_recv_per_worker: reports.iter().map(|r| r.bytes_recv).sum::<u64>() / n,
        max_abs_err: checks.iter().map(|c| c.max_abs_err).fold(0.0, f64::max),
        rel_l2_err: checks.iter().map(|c| c.rel_l2_err).fold(0.0, f64::max),
        retransmissions: reports.iter().map(|r| r.retransmissions).sum(),
        probes: reports.iter().map(|r| r.probes).sum(),
        marks: reports.iter().map(|r| r.marks).sum(),
        dips: reports.iter().map(|r| r.dips).sum(),
        pacing_holds: reports.iter().map(|r| r.pacing_holds).sum(),
        overflows: reports.iter().map(|r| r.overflows).sum(),
        congestion_window_min: reports.iter().filter_map(|r| r.congestion_window_min).min(),
        retransmitted_bytes_per_worker: reports.iter().map(|r| r.retransmitted_bytes).sum::<u64>()
            / n,
        ranks_identical: identical,
        line_rate_fraction: bound.filter(|_| med > 0.0).map(|b| b / med),
        line_rate_bound_s: bound,
        result_checksum: checks
            .first()
            .map_or_else(String::new, |c| format!("{:016x}", c.checksum)),
        within_bound: checks.len() == reports.len() && checks.iter().all(|c| c.within_bound),
        cpu_s_per_allreduce: worker_cpu
            .zip(aggregator_cpu_s_per_allreduce)
            .map(|(w, g)| w + g),
        worker_cpu_s_per_allreduce: worker_cpu,
        aggregator_cpu_s_per_allreduce,
    }
}
