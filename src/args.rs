//! The flags several commands share: the transport, how a QUIC worker trusts its
//! aggregator, the protocol's tuning knobs, the faults a relay injects, and codec
//! names (checked once, as the flags are parsed).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Result};
use inagg_proto::codec::{self, Codec};
use inagg_worker::{QuicOptions, Trust};
use serde::Serialize;

/// A codec named on the command line, in any case.
#[derive(Clone, Copy)]
pub struct CodecArg(pub &'static dyn Codec);

impl CodecArg {
    /// The codec's own name (lower case).
    pub fn name(self) -> &'static str {
        self.0.name()
    }
}

impl std::fmt::Debug for CodecArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Display for CodecArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The clap value parser of codec names: `unknown codec "x"; known: f32, ...`.
pub fn codec(s: &str) -> Result<CodecArg, String> {
    codec::by_name(s)
        .map(CodecArg)
        .ok_or_else(|| format!("unknown codec {s:?}; known: {}", codec::names().join(", ")))
}

/// Refuses a pacing gain over QUIC, which paces its own packets (the worker library
/// turns the rule off there).
pub fn check_pacing(gain: Option<f64>, quic: bool) -> Result<()> {
    if quic && gain.is_some_and(|g| g > 0.0) {
        bail!(
            "--pacing-gain paces UDP datagrams: QUIC paces its own packets, so the rule is \
             off over --transport quic (leave the flag out, or give 0)"
        );
    }
    Ok(())
}

/// The clap value parser of `--pacing-gain`: 0 (off), or a number of at least 1.
pub fn pacing_gain(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(g) if g == 0.0 || inagg_proto::worker::is_pacing_gain(g) => Ok(g),
        _ => Err(format!(
            "{s:?} is not a pacing gain: give 0 (off) or a number of at least 1"
        )),
    }
}

/// How workers reach their aggregator (`--transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Plain UDP datagrams.
    Udp,
    /// QUIC (quinn, TLS 1.3): encrypted, the aggregator authenticated.
    Quic,
}

/// How a QUIC worker trusts its aggregator: one of the two is required with
/// `--transport quic` (there is no mode that skips verification).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TrustArgs {
    /// Trust the aggregator whose certificate chains to this PEM file (the file the
    /// aggregator printed).
    #[arg(long, conflicts_with = "fingerprint")]
    pub ca: Option<PathBuf>,
    /// Trust the aggregator whose certificate has this SHA-256 fingerprint (hex, as the
    /// aggregator printed it).
    #[arg(long)]
    pub fingerprint: Option<String>,
    /// The name the certificate must carry with `--ca`.
    #[arg(long, default_value = inagg_quic::DEFAULT_SERVER_NAME)]
    pub server_name: String,
}

impl TrustArgs {
    /// The QUIC options these flags ask for.
    pub fn quic(&self, mode: QuicMode) -> Result<QuicOptions> {
        let trust = match (&self.ca, &self.fingerprint) {
            (Some(ca), _) => Trust::Ca(ca.clone()),
            (None, Some(fp)) => Trust::fingerprint(fp)?,
            (None, None) => bail!(
                "--transport quic needs --ca FILE or --fingerprint HEX to check the aggregator"
            ),
        };
        let mut q = QuicOptions::new(trust);
        q.server_name = self.server_name.clone();
        q.mode = mode.into();
        Ok(q)
    }
}

/// How protocol messages travel in a QUIC connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuicMode {
    /// One reliable stream, any chunk size (the faster; see docs/performance.md).
    #[default]
    Stream,
    /// One QUIC datagram per message; chunks shrink to fit the path's datagrams.
    Datagram,
}

impl From<QuicMode> for inagg_quic::Mode {
    fn from(m: QuicMode) -> Self {
        match m {
            QuicMode::Stream => inagg_quic::Mode::Stream,
            QuicMode::Datagram => inagg_quic::Mode::Datagram,
        }
    }
}

/// How many allreduces a run makes and on which tensors, shared by `worker` and
/// `bench` (which passes them on to its workers).
#[derive(Debug, Clone, clap::Args)]
pub struct Runs {
    /// Timed allreduces.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Untimed allreduces first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Seed of the tensors (every rank derives its own from it).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Protocol knobs shared by `worker` and `bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct Tuning {
    // Elements per chunk; the help computes the defaults.
    #[arg(long, help = chunk_help())]
    pub chunk_elements: Option<u16>,
    // Slots to ask for; the help computes the defaults.
    #[arg(long, help = window_help())]
    pub window: Option<u32>,
    /// The job's secret.
    #[arg(long, default_value = "")]
    pub secret: String,
    /// Give up joining after this many milliseconds.
    #[arg(long, default_value_t = inagg_proto::worker::DEFAULT_JOIN_TIMEOUT.as_millis() as u64)]
    pub join_timeout_ms: u64,
    /// Fail when the aggregator is silent this many milliseconds.
    #[arg(long, default_value_t = inagg_proto::worker::DEFAULT_AGGREGATOR_TIMEOUT.as_millis() as u64)]
    pub aggregator_timeout_ms: u64,
    /// Round stochastically (unbiased) instead of to nearest.
    #[arg(long)]
    pub stochastic: bool,
    /// Send chunks that are zero on every rank as headers only.
    #[arg(long)]
    pub skip_zeros: bool,
    /// Keep the window at the grant instead of running AIMD on marks and losses.
    #[arg(long)]
    pub no_congestion_control: bool,
    /// Packets of this rank's own that may wait in queues on the path (its rate times
    /// the queueing delay it measures) before its window halves: the queue rule of
    /// the congestion control; 0 turns the rule off.
    #[arg(long, default_value_t = inagg_proto::worker::DEFAULT_QUEUE_TARGET)]
    pub queue_target: u32,
    /// Milliseconds the smallest RTT this rank measured may stand before it holds
    /// its window at the smallest for as long as a BBR drain, to see the path empty
    /// as TCP BBR does (so that BBR flows beside the job do not take its queue for
    /// their path): the dip rule of the congestion control; 0 turns the rule off. Rank 0's setting
    /// is the job's: rank 0 alone dips, and its dip holds every rank back.
    #[arg(long, default_value_t = inagg_proto::worker::DEFAULT_DIP_INTERVAL.as_millis() as u64)]
    pub dip_interval_ms: u64,
    /// Milliseconds the queue rule and the dip rule stand aside after a loss burst (a
    /// queue that flows waiting for loss, such as TCP CUBIC, keep overflowing), so
    /// that the window follows losses alone, as theirs do: the overflow rule of the
    /// congestion control; 0 turns the rule off.
    #[arg(long, default_value_t = inagg_proto::worker::DEFAULT_OVERFLOW_HOLD.as_millis() as u64)]
    pub overflow_hold_ms: u64,
    /// Send each rank's contributions at most this many times as fast as its results
    /// came back over about the last second, so that its packets leave spread out and,
    /// when flows beside the job drain a shared queue (TCP BBR does every 10 s), the
    /// job's part of it empties too: the pacing rule of the congestion control; at
    /// least 1, or 0 to turn the rule off. Default: 1.25 toward any aggregator but a
    /// loopback one, where no link is shared (off). Over UDP only: QUIC paces its own
    /// packets, and the rule is off over `--transport quic`.
    #[arg(long, value_parser = pacing_gain)]
    pub pacing_gain: Option<f64>,
    /// With `--transport quic`: messages on a stream or as QUIC datagrams.
    #[arg(long, value_enum, default_value_t = QuicMode::Stream)]
    pub quic_mode: QuicMode,
    /// Over UDP, times to yield the CPU while waiting for results before sleeping (0:
    /// sleep at once; the default suits ranks sharing cores with each other).
    #[arg(long, default_value_t = inagg_worker::DEFAULT_YIELDS_BEFORE_SLEEP)]
    pub yields_before_sleep: u32,
    /// Take every result at this rank's own address: do not ask a loopback aggregator
    /// to send the job's results once, to a multicast group its ranks join (the
    /// default over UDP toward 127.0.0.0/8; a job uses a group only if every rank asks).
    #[arg(long)]
    pub no_multicast: bool,
    /// Over UDP, send without ECN and ignore CE marks on results (by default datagrams
    /// go out ECN-capable, and a result marked CE on the path counts as a congestion
    /// mark).
    #[arg(long)]
    pub no_ecn: bool,
}

impl Tuning {
    /// Elements per chunk for `codec` toward `aggregator`: the flag, or the library's
    /// default for that path.
    pub fn chunk_for(&self, codec: &dyn inagg_proto::codec::Codec, aggregator: &SocketAddr) -> u16 {
        self.chunk_elements
            .unwrap_or_else(|| inagg_worker::default_chunk_elems(codec, aggregator))
    }

    /// Slots for `codec` toward `aggregator`: the flag, or the library's default for
    /// that codec, its chunks ([`Tuning::chunk_for`]) and path.
    pub fn window_for(
        &self,
        codec: &dyn inagg_proto::codec::Codec,
        aggregator: &SocketAddr,
    ) -> u32 {
        self.window.unwrap_or_else(|| {
            let chunk = self.chunk_for(codec, aggregator);
            inagg_worker::default_window_for(codec, aggregator, chunk, self.skip_zeros)
        })
    }
}

/// The faults to inject and the link to emulate, shared with `inagg bench` (which
/// puts a relay in the path when any is asked for).
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct FaultArgs {
    /// Probability that a datagram is dropped.
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Probability that a datagram is sent twice.
    #[arg(long, default_value_t = 0.0)]
    pub dup: f64,
    /// Probability that a datagram is held back so that later ones overtake it.
    #[arg(long, default_value_t = 0.0)]
    pub reorder: f64,
    /// Delay added to every datagram, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    pub delay_ms: f64,
    /// How long a reordered datagram is held back, in milliseconds.
    #[arg(long, default_value_t = 2.0)]
    pub reorder_ms: f64,
    /// Forward each direction at most at this rate (megabits per second), queueing
    /// what comes faster (unlimited by default).
    #[arg(long)]
    pub rate_mbit: Option<f64>,
    /// Mark CE on every datagram that joins a queue (of its direction) already
    /// holding more than this many bytes (datagrams held back by --delay-ms count as
    /// queued). The relay does not read the codepoint it received: it sends marked
    /// datagrams CE and the others not ECN-capable.
    #[arg(long, value_name = "BYTES")]
    pub mark_above: Option<usize>,
}

impl FaultArgs {
    /// True when the relay would change nothing.
    pub fn is_clean(&self) -> bool {
        self.loss == 0.0
            && self.dup == 0.0
            && self.reorder == 0.0
            && self.delay_ms == 0.0
            && self.rate_mbit.is_none()
            && self.mark_above.is_none()
    }

    pub fn validate(&self) -> Result<()> {
        for (name, p) in [
            ("--loss", self.loss),
            ("--dup", self.dup),
            ("--reorder", self.reorder),
        ] {
            if !(0.0..1.0).contains(&p) {
                bail!("{name} must be a probability in [0, 1), not {p}");
            }
        }
        for (name, ms) in [
            ("--delay-ms", self.delay_ms),
            ("--reorder-ms", self.reorder_ms),
        ] {
            if !(0.0..=10_000.0).contains(&ms) {
                bail!("{name} must be between 0 and 10000, not {ms}");
            }
        }
        if let Some(r) = self.rate_mbit {
            if !(r > 0.0 && r.is_finite()) {
                bail!("--rate-mbit must be a positive number of megabits per second");
            }
        }
        Ok(())
    }

    /// The flags that give a relay these faults, seeded with `seed`.
    pub fn flags(self, seed: u64) -> Vec<String> {
        [
            ("--loss", self.loss),
            ("--dup", self.dup),
            ("--reorder", self.reorder),
            ("--delay-ms", self.delay_ms),
            ("--reorder-ms", self.reorder_ms),
        ]
        .iter()
        .flat_map(|(f, v)| [f.to_string(), v.to_string()])
        .chain(self.rate_mbit.map(|r| format!("--rate-mbit={r}")))
        .chain(self.mark_above.map(|b| format!("--mark-above={b}")))
        .chain(["--seed".into(), seed.to_string()])
        .collect()
    }
}

/// `n` bytes as people write sizes: `1 GiB`, `16 MiB`, `8 KiB`, else `N bytes`.
pub fn size(n: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{} {unit}", n >> shift);
        }
    }
    format!("{n} bytes")
}

/// The aggregators `--chunk-elements` and `--window` describe their defaults toward:
/// one on loopback and one across a network.
fn paths() -> [(&'static str, SocketAddr); 2] {
    [
        (
            "a loopback aggregator",
            SocketAddr::from(([127, 0, 0, 1], 7070)),
        ),
        ("any other", SocketAddr::from(([10, 0, 0, 1], 7070))),
    ]
}

/// Every codec's value of `f` toward each of [`paths`], as `toward X: f32 A, f16 B,
/// ...; toward Y: ...`.
fn per_codec(f: impl Fn(&dyn Codec, &SocketAddr) -> u32) -> String {
    paths()
        .iter()
        .map(|(name, addr)| {
            let each: Vec<String> = codec::ALL
                .iter()
                .map(|c| format!("{} {}", c.name(), f(*c, addr)))
                .collect();
            format!("toward {name}: {}", each.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The help of `--chunk-elements`, with the library's defaults computed, not copied.
fn chunk_help() -> String {
    format!(
        "Elements per chunk (per datagram). Default: as many as fill {} of payload to a \
         loopback aggregator and {} to any other, at most {} for codecs that share one \
         exponent per chunk, whole exponent blocks for i8 (inagg_worker::default_chunk_elems); \
         so {}.",
        size(inagg_worker::default_chunk_bytes(&paths()[0].1) as u64),
        size(inagg_worker::default_chunk_bytes(&paths()[1].1) as u64),
        inagg_worker::BLOCK_SCALED_DEFAULT_CHUNK_CAP,
        per_codec(|c, a| u32::from(inagg_worker::default_chunk_elems(c, a))),
    )
}

/// The help of `--window`, with the library's defaults computed, not copied.
fn window_help() -> String {
    let [(_, lo), (_, net)] = paths();
    format!(
        "Slots to ask for (datagrams in flight). Default: as many of the default chunks as \
         keep {} in flight toward a loopback aggregator and {} toward any other, from half \
         to four times the lookahead window (inagg_worker::default_window_for); so {}. i32, \
         i16 and any codec with --skip-zeros, whose window is also their exponent \
         lookahead, ask for the lookahead window: {} on loopback, {} otherwise.",
        size(inagg_worker::default_in_flight(&lo) as u64),
        size(inagg_worker::default_in_flight(&net) as u64),
        per_codec(|c, a| {
            inagg_worker::default_window_for(c, a, inagg_worker::default_chunk_elems(c, a), false)
        }),
        inagg_worker::default_window(&lo),
        inagg_worker::default_window(&net),
    )
}
