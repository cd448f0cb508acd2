//! inagg-worker: the client library. A [`Worker`] joins one job on an aggregator
//! and then sums tensors with every other rank of the job, as often as it likes.
//!
//! ```no_run
//! use inagg_worker::{Options, Worker};
//! use inagg_proto::codec::CodecId;
//!
//! let opts = Options::new("127.0.0.1:7070".parse().unwrap(), 1, 0, 2, CodecId::I32);
//! let worker = Worker::connect(opts).unwrap(); // waits for every rank to join
//! let mut grad = vec![0.5f32; 1 << 20];
//! let report = worker.allreduce(&mut grad).unwrap(); // grad now holds the sum
//! println!("{:?} for {} bytes sent", report.elapsed, report.bytes_sent);
//! worker.close();
//! ```
//!
//! Every call is bounded in time: joining by `join_timeout`, an allreduce by the
//! aggregator's abort (a peer went silent), `aggregator_timeout` (the aggregator went
//! silent) and `progress_timeout` (a peer is alive but never takes part). A background
//! thread keeps heartbeats going between calls, so a rank that computes for a long
//! time between allreduces is not taken for dead.
//!
//! A job can spread over several aggregators (PANAMA's several aggregation trees):
//! with [`Options::stripes`], the worker joins the job on each, cuts every tensor
//! into as many runs of whole chunks, and sums each run through its own aggregator
//! in parallel. The shards of one aggregator of several cores are joined the same
//! way, found from its grant. Chunk boundaries do not move, so fixed-point results are
//! bit-identical to a single aggregator's (stochastic rounding excepted: its random
//! stream follows each aggregator's sequence numbers).
//!
//! The library drives the sans-IO state machine of `inagg_proto::worker`; this crate
//! only adds the socket and the loop. It is the layer the Python binding wraps: the
//! blocking call takes a plain `&mut [f32]`.

#![warn(missing_docs)]

mod driver;
pub mod failover;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

pub use driver::AllreduceReport;
pub use failover::Failover;
pub use inagg_net::mem::{MemFaults, MemNet};
pub use inagg_proto::codec::CodecId;
pub use inagg_proto::wire::Grant;
pub use inagg_proto::worker::{ConfigError, WorkerConfig, WorkerError};
pub use inagg_quic::{ClientOptions as QuicOptions, Mode as QuicMode, Trust};
use thiserror::Error;

use driver::Session;

/// How a worker reaches its aggregators.
#[derive(Debug, Clone, Default)]
pub enum Transport {
    /// Plain UDP datagrams (the fastest; the secret travels in clear).
    #[default]
    Udp,
    /// QUIC: encrypted, the aggregator authenticated by its certificate.
    Quic(inagg_quic::ClientOptions),
    /// The in-memory network of `inagg_net::mem` (tests: the same driver as over UDP,
    /// without sockets).
    Memory(MemNet),
}

/// Everything a worker needs to join its job.
#[derive(Debug, Clone)]
pub struct Options {
    /// The aggregator's address.
    pub aggregator: SocketAddr,
    /// Further aggregators: the job's tensors are striped over `aggregator` and these,
    /// every rank listing them in the same order.
    pub stripes: Vec<SocketAddr>,
    /// The local address to bind (default: the wildcard of the aggregator's family,
    /// any port).
    pub bind: Option<SocketAddr>,
    /// Socket buffer size to ask for.
    pub socket_buffer: usize,
    /// UDP or QUIC.
    pub transport: Transport,
    /// The protocol settings: job, rank, world, codec, secret, chunk, window, timeouts.
    pub protocol: WorkerConfig,
    /// Over UDP, how many times to give the CPU away (`sched_yield`) while waiting
    /// for results, looking at the socket after each, before sleeping in `poll(2)`
    /// ([`DEFAULT_YIELDS_BEFORE_SLEEP`]; 0 sleeps at once).
    pub yields_before_sleep: u32,
    /// Over UDP to an IPv4 loopback aggregator, ask for the job's results to come to
    /// a multicast group (on by default): the aggregator then sends each result once
    /// for all ranks instead of once per rank, where every rank of the job asked and
    /// it offers groups ([`inagg_net::group`]). Elsewhere it changes nothing.
    pub multicast: bool,
    /// Over UDP, send ECN-capable datagrams (ECT(0)) and take a result that arrives
    /// marked CE (congestion experienced on the path) as a congestion mark, as if the
    /// aggregator had set it (on by default).
    pub ecn: bool,
    /// Aggregators to move the job to, in order, when its aggregator fails (refuses
    /// the connection, goes silent, shuts down): every rank lists the same ones.
    /// Empty (the default): a failed aggregator fails the rank. See [`failover`].
    pub failover: Vec<SocketAddr>,
}

/// Yields before a worker sleeps waiting for results, by default.
///
/// On a host where the ranks and the aggregator outnumber the cores, a rank that
/// sleeps costs the aggregator a wakeup per result burst and itself a context switch;
/// yielding lets the others run and finds the results there: f32 and f16 allreduces
/// got faster on two cores, i8 and i16 stayed level. A fixed spin made i8 slower (its
/// ranks wait on each other's quantizing, and a spin that ends in sleep is CPU lost),
/// hence the adaptive spin of [`UdpEndpoint::set_yields_before_sleep`]. On emulated
/// links, where the wire bounds the time, it changes nothing (docs/performance.md,
/// "Yielding before sleeping"). Where nothing else wants the CPU, a yield returns at
/// once: 16 cost some microseconds per wait.
///
/// [`UdpEndpoint::set_yields_before_sleep`]: inagg_net::UdpEndpoint::set_yields_before_sleep
pub const DEFAULT_YIELDS_BEFORE_SLEEP: u32 = 16;

impl Options {
    /// Defaults for a rank of a job, with the chunk size and window that suit the path
    /// to `aggregator` ([`default_chunk_bytes`], [`default_window_for`]).
    pub fn new(aggregator: SocketAddr, job: u32, rank: u16, world: u16, codec: CodecId) -> Self {
        let mut protocol = WorkerConfig::new(job, rank, world, codec);
        protocol.window = default_window(&aggregator);
        if let Some(c) = inagg_proto::codec::lookup(codec) {
            protocol.chunk_elems = default_chunk_elems(c, &aggregator);
            protocol.window = default_window_for(c, &aggregator, protocol.chunk_elems, false);
        }
        protocol.pacing_gain = default_pacing_gain(&aggregator);
        Self {
            aggregator,
            stripes: Vec::new(),
            bind: None,
            socket_buffer: inagg_net::DEFAULT_SOCKET_BUFFER,
            transport: Transport::Udp,
            protocol,
            yields_before_sleep: DEFAULT_YIELDS_BEFORE_SLEEP,
            multicast: true,
            ecn: true,
            failover: Vec::new(),
        }
    }
}

/// Payload bytes per datagram by default: 65,024 (63.5 KiB) to a loopback aggregator,
/// 8 KiB to any other.
///
/// On a network, 8 KiB of payload (2048 f32 elements, 8260-byte datagrams) fits a
/// 9000-byte jumbo frame; on 1500-byte links pass a chunk of about 1400 bytes. 8 KiB
/// rather than less brings emulated links closer to their line rate: fewer datagrams
/// for the kernel's veth, bridge and qdisc work on few cores.
/// On loopback there is no wire MTU (65,536) and the cost is all per datagram in the
/// kernel's UDP path, so larger datagrams win: fewer, larger datagrams cost the kernel
/// less per byte. Hence 65,024 bytes of payload, the largest multiple of 512 that fits
/// a UDP datagram over IPv4 (65,507 bytes) with the header and i8's exponent bytes,
/// with as many slots as keep the same 1 MiB in flight ([`default_in_flight`]); see
/// docs/performance.md, "Chunk size and window".
/// Every rank of a job uses the same aggregator address, so every rank picks the same
/// chunk.
pub fn default_chunk_bytes(aggregator: &SocketAddr) -> usize {
    if aggregator.ip().is_loopback() {
        LOOPBACK_CHUNK_BYTES
    } else {
        8 * 1024
    }
}

/// [`default_chunk_bytes`] on loopback.
const LOOPBACK_CHUNK_BYTES: usize = 65_024;

/// The most elements a chunk of a block-scaled codec that shares one exponent per
/// chunk (i32, i16) has by default. Such a chunk shares one exponent, so a larger
/// chunk quantizes its small values more coarsely, and beyond 8192 elements larger
/// chunks ran no faster on loopback (docs/performance.md, "Exponents per chunk").
/// i8, which aligns exponents, carries one per 8 Ki-element block instead
/// ([`inagg_proto::codec::EXPONENT_BLOCK`]), so its chunks take the path's whole
/// payload at that precision, in whole blocks: 57,344 elements on loopback, 8 Ki on a
/// network.
pub const BLOCK_SCALED_DEFAULT_CHUNK_CAP: usize = 8192;

/// Elements per chunk of `codec` by default toward `aggregator`: the
/// [`default_chunk_bytes`] of payload, and for block-scaled codecs that share one
/// exponent per chunk at most [`BLOCK_SCALED_DEFAULT_CHUNK_CAP`].
pub fn default_chunk_elems(codec: &dyn inagg_proto::codec::Codec, aggregator: &SocketAddr) -> u16 {
    let mut elems = default_chunk_bytes(aggregator) / codec.wire_bytes().max(1);
    if codec.block_scaled() && !codec.aligns_exponents() {
        elems = elems.min(BLOCK_SCALED_DEFAULT_CHUNK_CAP);
    }
    let block = inagg_proto::codec::EXPONENT_BLOCK;
    if codec.aligns_exponents() && elems > block {
        // Whole exponent blocks, so that every block starts at a multiple of 8192
        // elements of the tensor: `inagg bench`'s tensors change magnitude every 4096
        // elements, and a block that straddles such a change quantizes the smaller
        // side coarsely (docs/performance.md, "Exponents per chunk").
        elems -= elems % block;
    }
    u16::try_from(elems).unwrap_or(u16::MAX)
}

/// The pacing rule's gain by default (docs/protocol.md 6.10): off toward a loopback
/// aggregator, where no link is shared and pacing would only add wakeups on busy cores
/// (docs/performance.md, "Pacing"), and
/// [`PACING_GAIN`](inagg_proto::worker::PACING_GAIN) toward any other. Over QUIC
/// the rule is off whatever this says: QUIC paces its own packets.
pub fn default_pacing_gain(aggregator: &SocketAddr) -> Option<f64> {
    (!aggregator.ip().is_loopback()).then_some(inagg_proto::worker::PACING_GAIN)
}

/// Bytes a rank keeps in flight by default: 512 KiB on a network (64 slots of 8 KiB
/// chunks, room for 8 ranks in a 4 MiB socket buffer), 1 MiB on loopback.
pub fn default_in_flight(aggregator: &SocketAddr) -> usize {
    if aggregator.ip().is_loopback() {
        1 << 20
    } else {
        512 << 10
    }
}

/// Slots to ask for by default for codecs whose window is also their exponent
/// lookahead (i32, i16, and any codec with `--skip-zeros`): 64 on a network (512 KiB
/// of 8 KiB chunks in flight per rank), 32 on loopback; the others keep
/// [`default_in_flight`] bytes in flight ([`default_window_for`]).
pub fn default_window(aggregator: &SocketAddr) -> u32 {
    if aggregator.ip().is_loopback() {
        32
    } else {
        64
    }
}

/// Slots to ask for by default for `codec` in chunks of `chunk_elems` toward
/// `aggregator`: [`default_window`] for a codec whose window is also its exponent
/// lookahead (i32 and i16, or any with `skip_zeros`); for the others (f32, f16,
/// bf16, and i8, which aligns exponents) as many slots as keep
/// [`default_in_flight`] bytes in flight, from half to four times
/// [`default_window`]. Their default chunks take the whole payload, so they ask for
/// 16 slots on loopback (of 65,024 bytes; i8's 57,344-byte chunks get 18; windows
/// somewhat smaller or larger ran level) and 64 on a network; i8 given
/// `--chunk-elements 8192` on loopback, 128 (1 MiB), which was its default while its
/// chunks were capped at 8 Ki elements, and beat 32 slots then. i16 and i32 keep
/// [`default_window`]: their window is also their exponent lookahead, which a larger
/// one makes longer to prime, a cost that smaller tensors feel (docs/performance.md,
/// "Chunk size and window").
pub fn default_window_for(
    codec: &dyn inagg_proto::codec::Codec,
    aggregator: &SocketAddr,
    chunk_elems: u16,
    skip_zeros: bool,
) -> u32 {
    let base = default_window(aggregator);
    let lookahead = skip_zeros || (codec.block_scaled() && !codec.aligns_exponents());
    if lookahead {
        return base;
    }
    let chunk = usize::from(chunk_elems) * codec.wire_bytes();
    let slots =
        (default_in_flight(aggregator) / chunk.max(1)).clamp(base as usize / 2, 4 * base as usize);
    u32::try_from(slots).unwrap_or(base)
}

/// Resolves an aggregator's address as users write it, `host:port` with a name or an
/// address (`aggregator.local:7070`, `127.0.0.1:7070`, `[::1]:7070`), as
/// `MASTER_ADDR` is. Where a name has both, an IPv4 address is taken first: an
/// aggregator listens on one family, IPv4 by default (`0.0.0.0:7070`), and the worker
/// sends to one address.
pub fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let all: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or_else(|| all.first())
        .copied()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{addr} resolves to no address"),
            )
        })
}

/// The fewest bytes an admission key file may hold.
pub const MIN_ADMISSION_KEY: usize = 16;

/// Reads an admission key (`inagg aggregator --admission-key FILE`): the file's bytes,
/// less trailing whitespace (a final newline), at least [`MIN_ADMISSION_KEY`] of them.
/// The aggregator and every worker read the same file.
pub fn read_admission_key(path: &std::path::Path) -> Result<Vec<u8>, Error> {
    let bad = |reason: String| Error::AdmissionKey {
        path: path.to_path_buf(),
        reason,
    };
    let mut key = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    while key.last().is_some_and(|b| b.is_ascii_whitespace()) {
        key.pop();
    }
    if key.len() < MIN_ADMISSION_KEY {
        return Err(bad(format!(
            "{} bytes; a key has at least {MIN_ADMISSION_KEY}",
            key.len()
        )));
    }
    Ok(key)
}

/// Why a worker call failed.
#[derive(Debug, Error)]
pub enum Error {
    /// The admission key file cannot be used.
    #[error("admission key {}: {reason}", path.display())]
    AdmissionKey {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The settings cannot work.
    #[error("invalid worker settings")]
    Config(#[from] ConfigError),
    /// A shard of a sharded aggregator answered as something else than its first
    /// shard announced (another service on that port, or another aggregator).
    #[error("{addr} was expected to be {expected} but granted {got}")]
    ShardMismatch {
        /// The shard's address.
        addr: SocketAddr,
        /// What the first shard's grant implied.
        expected: String,
        /// What this one granted.
        got: String,
    },
    /// Nothing listens at the aggregator's address: its port answered "unreachable".
    #[error("connection refused by {0}: no aggregator listens there")]
    Refused(SocketAddr),
    /// The socket failed.
    #[error("socket error")]
    Io(#[from] std::io::Error),
    /// The multicast group the grant named could not be joined (turn groups off with
    /// `Options::multicast`, `--no-multicast`).
    #[error("cannot join the result group {group}")]
    Group {
        /// The group's address.
        group: std::net::SocketAddrV4,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The grant named a result group beyond those that have an address.
    #[error("the aggregator's grant names result group {0}, which has no address")]
    GroupOutOfRange(u32),
    /// The QUIC connection failed or could not be made.
    #[error(transparent)]
    Quic(#[from] inagg_quic::Error),
    /// The protocol failed: refused, aborted, timed out.
    #[error(transparent)]
    Protocol(#[from] WorkerError),
    /// The background thread panicked while holding the session.
    #[error("the worker's session is poisoned by an earlier panic")]
    Poisoned,
    /// The worker holds no session with an aggregator: a failover found none that
    /// granted the job, and the rank failed with that error before.
    #[error("the worker has no session with an aggregator (its last failover failed)")]
    NoSession,
}

/// The state shared with the heartbeat thread.
#[derive(Debug)]
struct Shared {
    session: Mutex<Session>,
    stop: AtomicBool,
}

/// One session with one aggregator, and the thread that keeps it alive between calls.
#[derive(Debug)]
pub(crate) struct Stripe {
    shared: Arc<Shared>,
    heartbeats: Mutex<Option<JoinHandle<()>>>,
}

impl Stripe {
    pub(crate) fn connect(opts: &Options, aggregator: SocketAddr) -> Result<Self, Error> {
        let mut session = Session::new(opts, aggregator)?;
        session.join()?;
        let shared = Arc::new(Shared {
            session: Mutex::new(session),
            stop: AtomicBool::new(false),
        });
        let tick = (opts.protocol.heartbeat_interval / 4).max(Duration::from_millis(5));
        let bg = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name(format!("inagg-hb-{}", opts.protocol.rank))
            .spawn(move || {
                while !bg.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    // An allreduce holds the lock and services the socket itself.
                    if let Ok(mut s) = bg.session.try_lock() {
                        s.service();
                    }
                }
            })?;
        Ok(Self {
            shared,
            heartbeats: Mutex::new(Some(handle)),
        })
    }

    pub(crate) fn session(&self) -> Result<MutexGuard<'_, Session>, Error> {
        self.shared.session.lock().map_err(|_| Error::Poisoned)
    }

    pub(crate) fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Ok(mut h) = self.heartbeats.lock() {
            if let Some(h) = h.take() {
                let _ = h.join();
            }
        }
        if let Ok(mut s) = self.shared.session.lock() {
            s.leave();
        }
    }
}

/// What a shard's grant says of its place: (shard, shards, chunk elements).
type ShardGrant = (u16, u16, u16);

/// The other shards of the aggregator at `addr` that sent `grant`, with their numbers:
/// shard `k` listens on port `base + k`, and `addr` is shard `grant.shard`'s.
fn sibling_shards(addr: SocketAddr, grant: &Grant) -> Vec<(u16, SocketAddr)> {
    let (shard, shards) = (grant.shard, grant.shards);
    let Some(base) = addr.port().checked_sub(shard) else {
        return Vec::new();
    };
    (0..shards)
        .filter(|k| *k != shard)
        .filter_map(|k| {
            let mut a = addr;
            a.set_port(base.checked_add(k)?);
            Some((k, a))
        })
        .collect()
}

/// The name [`Worker`] had before it also spoke QUIC.
#[deprecated(
    since = "0.1.0",
    note = "renamed to `Worker`: it speaks QUIC as well as UDP"
)]
pub type UdpWorker = Worker;

/// One rank of one job, over UDP or QUIC ([`Options`] says which), striped over one
/// or more aggregators, with failover where asked. Cheap to clone: clones share the
/// sessions.
#[derive(Debug, Clone)]
pub struct Worker {
    rank: Arc<Mutex<failover::Rank>>,
}

impl Worker {
    /// Binds a socket and joins the job (on every aggregator, in order); returns once
    /// every rank has joined (or with the error that stopped it: refused, or no grant
    /// within `join_timeout`).
    ///
    /// An aggregator of several shards (`inagg aggregator --threads`) says so in its
    /// grant: the worker then joins the job on its other shards too, right after it,
    /// and stripes over all of them. As with stripes, every rank must name the same
    /// addresses in the same order (joins wait for every rank, so ranks that named
    /// different shards time out rather than sum mismatched runs). If any join fails,
    /// the ones made already are left.
    ///
    /// With [`Options::failover`], an aggregator that refuses the connection, goes
    /// silent or shuts down, while joining or in an allreduce, is replaced by the next
    /// address of the list (see [`failover`]).
    pub fn connect(opts: Options) -> Result<Self, Error> {
        let rank = failover::Rank::connect(opts)?;
        Ok(Self {
            rank: Arc::new(Mutex::new(rank)),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, failover::Rank>, Error> {
        self.rank.lock().map_err(|_| Error::Poisoned)
    }

    /// Joins every listed aggregator and every shard their grants announce, in order,
    /// pushing each session onto `stripes` as it is made.
    pub(crate) fn join_all(opts: &Options, stripes: &mut Vec<Stripe>) -> Result<(), Error> {
        // Each address to join, with what its grant must say when it is a shard that
        // another aggregator's grant announced.
        let mut todo: Vec<(SocketAddr, Option<ShardGrant>)> = std::iter::once(opts.aggregator)
            .chain(opts.stripes.iter().copied())
            .map(|a| (a, None))
            .collect();
        let mut i = 0;
        // Bounded: each pass joins one address; a grant adds at most `MAX_SHARDS - 1`
        // siblings, and an address is never added twice.
        while let Some(&(addr, expected)) = todo.get(i) {
            i += 1;
            let stripe = Stripe::connect(opts, addr)?;
            let g = stripe.session()?.grant()?;
            stripes.push(stripe);
            let got = (g.shard, g.shards, g.chunk_elems);
            match expected {
                Some(want) if want != got => {
                    let show =
                        |(k, n, c): (u16, u16, u16)| format!("shard {k} of {n}, chunks of {c}");
                    return Err(Error::ShardMismatch {
                        addr,
                        expected: show(want),
                        got: show(got),
                    });
                }
                Some(_) => {}
                None => {
                    let mut at = i;
                    for (k, sibling) in sibling_shards(addr, &g) {
                        if todo.iter().all(|t| t.0 != sibling) {
                            todo.insert(at, (sibling, Some((k, g.shards, g.chunk_elems))));
                            at += 1;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The grant of the first aggregator: world size, codec, chunk size, slots.
    pub fn grant(&self) -> Result<Grant, Error> {
        let rank = self.lock()?;
        let first = rank.stripes.first().ok_or(Error::NoSession)?;
        let g = first.session()?.grant()?;
        Ok(g)
    }

    /// The number of aggregators the job is striped over.
    pub fn stripes(&self) -> usize {
        self.lock().map_or(0, |r| r.stripes.len())
    }

    /// The failovers so far: where to, and how long each took from the failure to the
    /// new aggregator's grant.
    pub fn failovers(&self) -> Vec<Failover> {
        self.lock()
            .map_or_else(|_| Vec::new(), |r| r.failovers.clone())
    }

    /// Datagrams from the aggregator(s) that this rank dropped, by reason (forged
    /// grants and errors, other sessions' results, garbage), over every session it
    /// has now: the reasons with a count.
    pub fn dropped(&self) -> Vec<(inagg_proto::worker::DropReason, u64)> {
        let mut total = inagg_proto::worker::Dropped::default();
        if let Ok(rank) = self.lock() {
            for s in &rank.stripes {
                if let Ok(session) = s.session() {
                    total.absorb(&session.dropped());
                }
            }
        }
        total.iter().filter(|(_, n)| *n > 0).collect()
    }

    /// Sums `data` with every other rank's buffer of the same length, in place.
    /// Every rank must call it the same number of times with the same lengths.
    pub fn allreduce(&self, data: &mut [f32]) -> Result<AllreduceReport, Error> {
        self.lock()?.allreduce(data, None)
    }

    /// [`Worker::allreduce`] with error feedback: the quantization residual this
    /// rank's contribution lost in the previous call with the same `key` (a tensor or
    /// gradient bucket id) is added to `data` before it is sent.
    pub fn allreduce_with_feedback(
        &self,
        data: &mut [f32],
        key: u64,
    ) -> Result<AllreduceReport, Error> {
        self.lock()?.allreduce(data, Some(key))
    }

    /// Cuts `data` into one run of whole chunks per aggregator of `stripes` and sums
    /// the runs in parallel, the first on the calling thread.
    pub(crate) fn striped(
        stripes: &[Stripe],
        data: &mut [f32],
        key: Option<u64>,
    ) -> Result<AllreduceReport, Error> {
        let [first, rest @ ..] = stripes else {
            return Err(Error::NoSession);
        };
        if rest.is_empty() {
            return first.session()?.allreduce(data, key);
        }
        let chunk = usize::from(first.session()?.grant()?.chunk_elems).max(1);
        let chunks = data.len().div_ceil(chunk);
        let n = stripes.len();
        // Stripe i takes chunks [i * chunks / n, (i + 1) * chunks / n).
        let bounds: Vec<usize> = (0..=n)
            .map(|i| (i * chunks / n * chunk).min(data.len()))
            .collect();
        let mut parts: Vec<&mut [f32]> = Vec::with_capacity(n);
        let mut left = data;
        for w in bounds.windows(2) {
            let (head, tail) = std::mem::take(&mut left).split_at_mut(w[1] - w[0]);
            parts.push(head);
            left = tail;
        }
        let Some((p0, others)) = parts.split_first_mut() else {
            return Err(Error::NoSession);
        };
        std::thread::scope(|scope| {
            let handles: Vec<_> = others
                .iter_mut()
                .zip(rest)
                .map(|(part, stripe)| scope.spawn(move || stripe.session()?.allreduce(part, key)))
                .collect();
            let mut report = first.session().and_then(|mut s| s.allreduce(p0, key));
            for h in handles {
                let r = h.join().map_err(|_| Error::Poisoned).and_then(|r| r);
                report = match (report, r) {
                    (Ok(mut a), Ok(b)) => {
                        a.absorb(&b);
                        Ok(a)
                    }
                    (Err(e), _) | (_, Err(e)) => Err(e),
                };
            }
            report
        })
    }

    /// The async form: the buffer is moved in and handed back with the sum (as with
    /// io_uring, owning the buffer is what lets the work run off the caller's task
    /// without copying it). Runs on tokio's blocking pool.
    pub async fn allreduce_async(
        &self,
        mut data: Vec<f32>,
    ) -> Result<(Vec<f32>, AllreduceReport), Error> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let report = me.allreduce(&mut data)?;
            Ok((data, report))
        })
        .await
        .map_err(|_| Error::Poisoned)?
    }

    /// Leaves the job on every aggregator (each frees it once every rank left) and
    /// stops the heartbeat threads.
    pub fn close(self) {
        self.shutdown();
    }

    fn shutdown(&self) {
        if let Ok(mut r) = self.lock() {
            r.shutdown();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // The last handle leaves the job.
        if Arc::strong_count(&self.rank) == 1 {
            self.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(shard: u16, shards: u16) -> Grant {
        Grant {
            job: 1,
            rank: 0,
            world: 2,
            codec: CodecId::I32,
            chunk_elems: 1024,
            window: 8,
            token: 1,
            nonce: 0,
            shard,
            shards,
            group: None,
        }
    }

    #[test]
    fn siblings_are_the_other_shards_ports_in_shard_order() {
        let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        assert_eq!(
            sibling_shards(at(7071), &grant(1, 3)),
            [(0, at(7070)), (2, at(7072))]
        );
        assert_eq!(sibling_shards(at(7070), &grant(0, 1)), []);
        // Ports that would fall outside 0..=65535 are skipped, not wrapped.
        assert_eq!(sibling_shards(at(65535), &grant(0, 2)), []);
        assert_eq!(sibling_shards(at(1), &grant(2, 3)), []);
        // An IPv6 link-local address keeps its scope.
        let ip = std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
        let v6 = SocketAddr::V6(std::net::SocketAddrV6::new(ip, 9000, 0, 3));
        let s = sibling_shards(v6, &grant(0, 2));
        assert_eq!(s.len(), 1);
        assert_eq!(
            s[0].1,
            SocketAddr::V6(std::net::SocketAddrV6::new(ip, 9001, 0, 3))
        );
    }
}
