//! `inagg worker`: one rank of a job that allreduces seeded tensors, times every call,
//! checks the last result against the exact sum, and reports.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use inagg_proto::codec;
use inagg_worker::{Options, Worker};

use crate::args::{Transport, TrustArgs, Tuning};
use crate::report::{FailoverRow, Report};

use crate::tensor;

/// Flags of `inagg worker`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The aggregator's address, `HOST:PORT` (a name or an address).
    #[arg(long, required_unless_present = "aggregators", value_parser = crate::admission::address)]
    pub aggregator: Option<SocketAddr>,
    /// Stripe the job over these aggregators instead (every rank lists them in the
    /// same order).
    #[arg(long, value_delimiter = ',', conflicts_with = "aggregator", value_parser = crate::admission::address)]
    pub aggregators: Vec<SocketAddr>,
    /// Job id, shared by all ranks.
    #[arg(long)]
    pub job: u32,
    /// This worker's rank.
    #[arg(long)]
    pub rank: u16,
    /// Number of ranks.
    #[arg(long)]
    pub world: u16,
    /// Codec.
    #[arg(long, default_value = "f32", value_parser = crate::args::codec)]
    pub codec: crate::args::CodecArg,
    /// Elements of the tensor.
    #[arg(long, default_value_t = 1 << 20)]
    pub elements: usize,
    #[command(flatten)]
    pub runs: crate::args::Runs,
    #[command(flatten)]
    pub tuning: Tuning,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    pub json: bool,
    /// Skip the check against the exact sum (it regenerates every rank's tensor).
    #[arg(long)]
    pub no_check: bool,
    /// Check every allreduce's result, warm-up included, against the exact sum, not
    /// only the last (every rank's tensor regenerated after each call, outside its
    /// timing): `check` reports the worst, `checked` how many were checked.
    #[arg(long, conflicts_with = "no_check")]
    pub check_every: bool,
    /// Fraction of chunks that are zero on every rank (sparse gradients).
    #[arg(long, default_value_t = 0.0)]
    pub zero_fraction: f64,
    /// Stop starting allreduces after this many seconds (`--iters` stays the most).
    #[arg(long)]
    pub duration_s: Option<f64>,
    /// Transport to the aggregator(s).
    #[arg(long, value_enum, default_value_t = Transport::Udp)]
    pub transport: Transport,
    /// Aggregators to move the job to, in order, when its aggregator fails (refuses,
    /// goes silent, shuts down), redoing the interrupted allreduce there: every rank
    /// lists the same ones. Costs a copy of the tensor per allreduce.
    #[arg(long, value_delimiter = ',', value_name = "ADDR[,ADDR...]", value_parser = crate::admission::address)]
    pub failover: Vec<SocketAddr>,
    /// The aggregator's admission key file (`inagg aggregator --admission-key`):
    /// every join proves it.
    #[arg(long, value_name = "FILE", value_parser = crate::admission::key_file)]
    pub admission_key: Option<crate::admission::Key>,
    #[command(flatten)]
    pub trust: TrustArgs,
}

pub fn options(a: &Args) -> Result<Options> {
    let codec = a.codec.0;
    let mut addrs = a
        .aggregator
        .into_iter()
        .chain(a.aggregators.iter().copied());
    let first = addrs
        .next()
        .context("--aggregator or --aggregators is required")?;
    let mut o = Options::new(first, a.job, a.rank, a.world, codec.id());
    o.stripes = addrs.collect();
    o.protocol.chunk_elems = a.tuning.chunk_for(codec, &first);
    o.protocol.window = a.tuning.window_for(codec, &first);
    o.protocol.secret = a.tuning.secret.as_bytes().to_vec();
    o.protocol.join_timeout = Duration::from_millis(a.tuning.join_timeout_ms);
    o.protocol.aggregator_timeout = Duration::from_millis(a.tuning.aggregator_timeout_ms);
    o.protocol.stochastic_rounding = a.tuning.stochastic.then_some(a.runs.seed);
    o.protocol.skip_zeros = a.tuning.skip_zeros;
    o.protocol.congestion_control = !a.tuning.no_congestion_control;
    o.protocol.queue_target = (a.tuning.queue_target > 0).then_some(a.tuning.queue_target);
    crate::args::check_pacing(a.tuning.pacing_gain, a.transport == Transport::Quic)?;
    if let Some(g) = a.tuning.pacing_gain {
        o.protocol.pacing_gain = (g > 0.0).then_some(g);
    }
    o.protocol.dip_interval =
        (a.tuning.dip_interval_ms > 0).then(|| Duration::from_millis(a.tuning.dip_interval_ms));
    o.protocol.overflow_hold =
        (a.tuning.overflow_hold_ms > 0).then(|| Duration::from_millis(a.tuning.overflow_hold_ms));
    o.yields_before_sleep = a.tuning.yields_before_sleep;
    o.multicast = !a.tuning.no_multicast;
    o.ecn = !a.tuning.no_ecn;
    o.protocol.admission_key = a.admission_key.as_ref().map(|k| k.0.clone());
    o.failover = a.failover.clone();
    if a.transport == Transport::Quic {
        o.transport = inagg_worker::Transport::Quic(a.trust.quic(a.tuning.quic_mode)?);
    }
    Ok(o)
}

pub fn run(a: &Args) -> Result<()> {
    let opts = options(a)?;
    let codec = codec::lookup(opts.protocol.codec).context("codec")?;
    if !(0.0..=1.0).contains(&a.zero_fraction) {
        bail!("--zero-fraction must be between 0 and 1");
    }
    let chunk0 = usize::from(opts.protocol.chunk_elems);
    let input = tensor::input_with_zeros(a.runs.seed, a.rank, a.elements, a.zero_fraction, chunk0);
    let mut buf = input.clone();
    let worker = Worker::connect(opts).with_context(|| {
        format!(
            "rank {} could not join job {} at {}",
            a.rank,
            a.job,
            a.aggregator
                .map_or_else(|| format!("{:?}", a.aggregators), |x| x.to_string())
        )
    })?;
    let chunk = usize::from(worker.grant()?.chunk_elems);
    let mut report = Report {
        rank: a.rank,
        codec: codec.name().into(),
        elements: a.elements,
        times_s: Vec::with_capacity(a.runs.iters),
        bytes_sent: 0,
        bytes_recv: 0,
        retransmissions: 0,
        retransmitted_bytes: 0,
        probes: 0,
        marks: 0,
        dips: 0,
        pacing_holds: 0,
        overflows: 0,
        allreduces: 0,
        mismatches: 0,
        chunk_elements: u16::try_from(chunk).unwrap_or(u16::MAX),
        result_checksum: String::new(),
        failovers: Vec::new(),
        dropped: Default::default(),
        congestion_window_min: None,
        checked: 0,
        check: None,
        cpu_s_per_allreduce: None,
    };
    // With a duration, the ranks must agree on when to stop: each allreduce carries
    // one more element, every rank's vote to stop (1 once its time is up), and all
    // stop after the first allreduce whose sum of votes is positive. The vote sits
    // alone in the last chunk, so that it never changes the other chunks' scales.
    let n = input.len();
    let vote = n.div_ceil(chunk.max(1)) * chunk.max(1);
    if a.duration_s.is_some() {
        buf.resize(vote + 1, 0.0);
    }
    let started = std::time::Instant::now();
    // The first timed result of a fixed-point codec, which every later one must
    // equal bit for bit (compared in one vectorized pass: a per-element hash here
    // took about as long as an allreduce, and its CPU time slowed the other ranks;
    // docs/performance.md, "Checking results in the bench").
    let mut first: Option<Vec<f32>> = None;
    // Every rank's input from its start, for the check against the exact sum.
    let inputs = || -> Vec<tensor::Input> {
        (0..a.world)
            .map(|r| tensor::Input::new(a.runs.seed, r, a.zero_fraction, chunk0))
            .collect()
    };
    let sr = a.tuning.stochastic;
    let mut worst: Option<tensor::Check> = None;
    let mut cpu_timed = 0.0;
    for i in 0..a.runs.warmup + a.runs.iters {
        buf[..n].copy_from_slice(&input);
        if let Some(d) = a.duration_s {
            buf[vote] = if started.elapsed().as_secs_f64() >= d {
                1.0
            } else {
                0.0
            };
        }
        // A one-element allreduce first, as a barrier: every rank starts the timed call
        // together, as Gloo's and MPI's benchmarks do (`scripts/peers`), so a rank's
        // time does not include the others' copying of their inputs.
        worker
            .allreduce(&mut [0.0])
            .with_context(|| format!("rank {}: barrier {} of job {} failed", a.rank, i, a.job))?;
        let cpu_before = crate::cputime::own();
        let r = worker
            .allreduce(&mut buf)
            .with_context(|| format!("rank {}: allreduce {} of job {} failed", a.rank, i, a.job))?;
        let cpu = crate::cputime::own() - cpu_before;
        if i >= a.runs.warmup {
            cpu_timed += cpu;
            report.times_s.push(r.elapsed.as_secs_f64());
            report.bytes_sent += r.bytes_sent;
            report.bytes_recv += r.bytes_received;
            report.retransmissions += r.retransmissions;
            report.retransmitted_bytes += r.retransmitted_bytes;
            report.probes += r.probes;
            report.marks += r.marks;
            report.dips += r.dips;
            report.pacing_holds += r.pacing_holds;
            report.overflows += r.overflows;
            report.allreduces += 1;
            report.congestion_window_min = Some(
                report
                    .congestion_window_min
                    .map_or(r.congestion_window, |w| w.min(r.congestion_window)),
            );
            // Fixed-point sums repeat bit for bit. (For i8, while the ranks' block
            // exponents of a chunk lie within the aggregator's span, `codec::Fixed`: the
            // seeded tensors here share one magnitude, so they always do.)
            if codec.block_scaled() {
                let out = &buf[..n];
                if !tensor::same_bits(first.get_or_insert_with(|| out.to_vec()), out) {
                    report.mismatches += 1;
                }
            }
        }
        if a.check_every {
            let c = tensor::check(codec, a.world, chunk, sr, inputs(), &buf[..n]);
            report.checked += 1;
            worst = Some(match worst {
                Some(w) if w.worse_than(&c) => w,
                _ => c,
            });
        }
        if a.duration_s.is_some() && buf[vote] > 0.5 {
            break;
        }
    }
    buf.truncate(n);
    report.result_checksum = format!("{:016x}", fnv1a(bytemuck_bytes(&buf)));
    report.failovers = worker
        .failovers()
        .into_iter()
        .map(|f| FailoverRow {
            to: f.to.to_string(),
            resume_s: f.resumed_after.as_secs_f64(),
            cause: f.cause,
        })
        .collect();
    report.dropped = worker
        .dropped()
        .into_iter()
        .map(|(r, n)| (r.name().to_string(), n))
        .collect();
    worker.close();
    if report.mismatches > 0 {
        bail!(
            "rank {}: {} of {} results of job {} differ from the first",
            a.rank,
            report.mismatches,
            report.allreduces,
            a.job
        );
    }
    let timed = report.allreduces.max(1);
    report.cpu_s_per_allreduce = (report.allreduces > 0).then(|| cpu_timed / timed as f64);
    report.bytes_sent /= timed;
    report.bytes_recv /= timed;
    report.retransmitted_bytes /= timed;
    if worst.is_some() {
        report.check = worst;
    } else if !a.no_check && a.runs.warmup + a.runs.iters > 0 {
        report.check = Some(tensor::check(codec, a.world, chunk, sr, inputs(), &buf));
        report.checked = 1;
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let med = crate::stats::median(&report.times_s);
        println!(
            "rank {} job {}: {} allreduces of {} elements ({}), median {:.3} ms, {} bytes sent each, check: {}",
            a.rank,
            a.job,
            report.allreduces,
            a.elements,
            codec.name(),
            med * 1e3,
            report.bytes_sent,
            report
                .check
                .as_ref()
                .map_or("skipped".to_string(), |c| format!("max abs error {:.3e}, within bound: {}", c.max_abs_err, c.within_bound))
        );
    }
    if let Some(c) = &report.check {
        if !c.within_bound {
            bail!(
                "rank {}: {} elements outside the {} error bound",
                a.rank,
                c.violations,
                codec.name()
            );
        }
    }
    Ok(())
}

/// The bytes of `v` (little-endian on every machine inagg runs on).
fn bytemuck_bytes(v: &[f32]) -> impl Iterator<Item = u8> + '_ {
    v.iter().flat_map(|x| x.to_le_bytes())
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: impl Iterator<Item = u8>) -> u64 {
    bytes.fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
