//! The worker as a state machine: joining a job, heartbeats, and one allreduce at a time.
//!
//! Call order, as for the aggregator: feed datagrams from the aggregator with
//! [`Worker::handle_datagram`] and the time with [`Worker::handle_timeout`]; then drain
//! [`Worker::poll_transmit`], [`Worker::poll_event`] and [`Worker::poll_timeout`]. The
//! allreduce works in place on a buffer the caller owns and passes to every call that
//! needs it: [`Worker::poll_transmit`] reads the chunks it sends from it and
//! [`Worker::handle_datagram`] writes each result into it. A chunk is overwritten only
//! once its result is in, and is never read again after that.
//!
//! No call waits: every way the job can fail (no grant, a silent aggregator, a peer
//! that died) ends in an [`Event::Failed`] within the configured timeouts.
//!
//! Re-grants: when the aggregator re-sizes the job's slot pool (a slot memory budget
//! shared with other jobs), results carry [`wire::FLAG_REGRANT`]. A rank that got one
//! sends a regrant request when its allreduce ends and takes its new grant (window and
//! token) before its next allreduce starts; an allreduce started meanwhile waits for
//! it. Every rank sees the same flagged results, so all switch at the same boundary.

mod allreduce;
mod cwnd;
mod dropped;
mod rtt;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use thiserror::Error;

pub use allreduce::{AllreduceStats, Tail};
pub use dropped::{DropReason, Dropped};
pub use rtt::RttEstimator;

use crate::codec::{self, Codec, CodecId};
use crate::wire::{self, Control, ErrorCode, Grant, Join, Message, MAX_SECRET_LEN};
use allreduce::{Allreduce, ResultOutcome};
pub use cwnd::Cwnd;

/// Tokens of earlier grants remembered, so that a late duplicate of an old grant is
/// never taken for a re-grant.
const OLD_TOKENS: usize = 16;

/// Leaves sent before giving up on the aggregator's echo.
const LEAVE_TRIES: u32 = 3;
/// Time between them.
const LEAVE_INTERVAL: Duration = Duration::from_millis(100);

/// Settings of one worker (one rank of one job).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The job id, shared by all ranks.
    pub job: u32,
    /// This worker's rank, below `world`.
    pub rank: u16,
    /// The number of ranks.
    pub world: u16,
    /// The codec every rank uses.
    pub codec: CodecId,
    /// Elements per chunk (per packet).
    pub chunk_elems: u16,
    /// Slots to ask for (the window); the aggregator may grant fewer.
    pub window: u32,
    /// Run AIMD on the window from congestion marks and losses (on by default).
    pub congestion_control: bool,
    /// The job's shared secret, at most 64 bytes.
    pub secret: Vec<u8>,
    /// How often to resend a join until the grant arrives.
    pub join_interval: Duration,
    /// Give up joining after this long (every rank must join within it).
    pub join_timeout: Duration,
    /// Send a heartbeat when the link has been quiet this long.
    pub heartbeat_interval: Duration,
    /// Fail when nothing at all came from the aggregator for this long.
    pub aggregator_timeout: Duration,
    /// Fail an allreduce in which no result arrived for this long (a peer that is
    /// alive but never calls allreduce). Long enough for any honest straggler.
    pub progress_timeout: Duration,
    /// Retransmission timeout before the first RTT sample.
    pub initial_rto: Duration,
    /// Lower bound of the retransmission timeout.
    pub min_rto: Duration,
    /// Upper bound of the retransmission timeout (after backoff).
    pub max_rto: Duration,
    /// Stochastic rounding, with this seed (unbiased; every rank and retransmission
    /// draws from its own reproducible stream). `None`: round to nearest.
    pub stochastic_rounding: Option<u64>,
    /// Chunks that are zero on every rank travel as headers only.
    pub skip_zeros: bool,
    /// Ask for results sent to a group ([`Join::groups`]): the driver can join the
    /// group a grant names ([`Grant::group`]) before the first allreduce. Off by
    /// default; the UDP driver turns it on toward a loopback aggregator.
    pub groups: bool,
    /// This session's join nonce ([`Join::nonce`]): grants and errors without it are
    /// dropped. Drivers draw it from the operating system's randomness; a guessable
    /// nonce lets anyone who can send from the aggregator's address fail the rank.
    pub nonce: u64,
    /// Allreduces this rank completed in the job before this session ([`Join::completed`]):
    /// 0, or after a failover the count from the session before.
    pub completed: u64,
    /// The aggregator's admission key, if it has one: every join proves it
    /// ([`Join::prove`]).
    pub admission_key: Option<Vec<u8>>,
}

impl WorkerConfig {
    /// Checks that these settings can work; returns the codec they name.
    pub fn validate(&self) -> Result<&'static dyn Codec, ConfigError> {
        let codec = codec::lookup(self.codec).ok_or(ConfigError::Codec(self.codec))?;
        if self.world == 0 || self.rank >= self.world {
            return Err(ConfigError::Rank {
                rank: self.rank,
                world: self.world,
            });
        }
        if self.world > codec.max_world() {
            return Err(ConfigError::World {
                codec: codec.name(),
                max: codec.max_world(),
            });
        }
        if self.secret.len() > MAX_SECRET_LEN {
            return Err(ConfigError::Secret);
        }
        if self.chunk_elems == 0
            || self.window == 0
            || wire::DATA_HEADER_LEN + codec::payload_bytes(codec, usize::from(self.chunk_elems))
                > wire::MAX_DATAGRAM
        {
            return Err(ConfigError::Size);
        }
        Ok(codec)
    }

    /// Defaults for everything but the job's identity.
    pub fn new(job: u32, rank: u16, world: u16, codec: CodecId) -> Self {
        Self {
            job,
            rank,
            world,
            codec,
            chunk_elems: 256,
            window: 256,
            congestion_control: true,
            secret: Vec::new(),
            join_interval: Duration::from_millis(200),
            join_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_millis(500),
            aggregator_timeout: Duration::from_secs(10),
            progress_timeout: Duration::from_secs(60),
            // Loopback RTTs are tens of microseconds, but a busy host deschedules a
            // process for milliseconds: a lower bound of 20 ms keeps retransmissions
            // for real losses (measured: 5 ms gave thousands of spurious ones per
            // allreduce with 4 workers on 2 cores).
            initial_rto: Duration::from_millis(100),
            min_rto: Duration::from_millis(20),
            max_rto: Duration::from_secs(1),
            stochastic_rounding: None,
            skip_zeros: false,
            groups: false,
            nonce: 0,
            completed: 0,
            admission_key: None,
        }
    }
}

/// A setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// Rank not below world size, or world size 0.
    #[error("rank {rank} is not below the world size {world}")]
    Rank {
        /// The rank asked for.
        rank: u16,
        /// The world size.
        world: u16,
    },
    /// Unknown codec id.
    #[error("unknown codec {0:?}")]
    Codec(CodecId),
    /// Secret too long.
    #[error("the job secret is longer than {MAX_SECRET_LEN} bytes")]
    Secret,
    /// Chunk size or window of zero, or a chunk that does not fit a datagram.
    #[error("chunk size and window must be positive and a chunk must fit a datagram")]
    Size,
    /// World size beyond what the codec can sum without overflow.
    #[error("codec {codec} supports at most {max} ranks")]
    World {
        /// The codec's name.
        codec: &'static str,
        /// Its limit.
        max: u16,
    },
}

/// Why a worker's job or allreduce failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WorkerError {
    /// No grant in time.
    #[error(
        "no grant within {0:?}: the aggregator is unreachable, not every rank joined, or its slot memory is still held by other jobs"
    )]
    JoinTimeout(Duration),
    /// The aggregator refused the join.
    #[error("the aggregator refused to admit this rank: {text}")]
    Refused {
        /// What kind of refusal.
        code: ErrorCode,
        /// The aggregator's words.
        text: String,
    },
    /// The aggregator aborted the job.
    #[error("job aborted by the aggregator: {text}")]
    Aborted {
        /// Why.
        code: ErrorCode,
        /// The rank the abort is about, if any.
        rank: Option<u16>,
        /// The aggregator's words.
        text: String,
    },
    /// No result arrived for too long while the aggregator was alive: some rank does
    /// not take part in the allreduce (or called it with another length).
    #[error("no progress for {0:?}: some rank is not taking part in this allreduce")]
    Stalled(Duration),
    /// Nothing came from the aggregator for too long.
    #[error("nothing heard from the aggregator for {0:?}: it is down or unreachable")]
    AggregatorSilent(Duration),
    /// The input holds a value the codec cannot carry.
    #[error(transparent)]
    NonFinite(#[from] codec::NonFinite),
    /// An allreduce was started before the job was granted or while another ran.
    #[error("the worker is not ready for an allreduce ({0})")]
    NotReady(&'static str),
    /// The worker already failed or closed.
    #[error("the worker is closed")]
    Closed,
}

/// Something the driver should know about.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The job started: every rank joined.
    Joined(Grant),
    /// The allreduce finished: the caller's buffer holds the sum.
    AllreduceDone {
        /// Its counters.
        stats: AllreduceStats,
        /// How long it took.
        elapsed: Duration,
    },
    /// The worker failed; every later call fails too.
    Failed(WorkerError),
}

#[derive(Debug)]
enum State {
    Joining {
        since: Instant,
        next_join: Instant,
    },
    Ready,
    Running(Box<Allreduce>),
    /// Waiting for a re-grant: the request goes out every `next`, and an allreduce
    /// started meanwhile waits in `pending`.
    Regranting {
        since: Instant,
        next: Instant,
        pending: Option<Pending>,
    },
    Failed(WorkerError),
    /// Leaving: the leave goes out up to [`LEAVE_TRIES`] times, [`LEAVE_INTERVAL`]
    /// apart, until the aggregator echoes it.
    Closing {
        sent: u32,
        next: Instant,
    },
    Closed,
}

/// An allreduce started while a re-grant is pending: what it needs to start.
#[derive(Debug)]
struct Pending {
    len: usize,
    residual: Option<Vec<f32>>,
}

/// The worker state machine. See the module documentation for the call order.
#[derive(Debug)]
pub struct Worker {
    config: WorkerConfig,
    codec: &'static dyn Codec,
    state: State,
    grant: Option<Grant>,
    /// The sequence number the next allreduce starts at.
    seq_base: u64,
    rtt: RttEstimator,
    last_heard: Instant,
    last_sent: Instant,
    heartbeat_due: bool,
    events: VecDeque<Event>,
    /// Bytes and packets outside any allreduce (join, heartbeats).
    idle_packets: u64,
    /// Error feedback: the residual of the last allreduce of each tensor key.
    residuals: HashMap<u64, Vec<f32>>,
    /// The key of the running allreduce, if it uses error feedback.
    feedback_key: Option<u64>,
    /// The congestion window (AIMD), kept across allreduces.
    cwnd: Cwnd,
    /// Tokens of earlier grants (see [`OLD_TOKENS`]).
    old_tokens: VecDeque<u64>,
    /// Encoded payloads that [`Worker::poll_transmit_head`] left for the driver
    /// ([`Tail::Encoded`]), one place per slot, kept across allreduces.
    payloads: Vec<u8>,
    /// Datagrams dropped, by reason.
    dropped: Dropped,
}

impl Worker {
    /// The congestion window now: packets allowed in flight.
    pub fn congestion_window(&self) -> u64 {
        self.cwnd.window()
    }

    /// A worker that starts joining its job at `now`.
    pub fn new(config: WorkerConfig, now: Instant) -> Result<Self, ConfigError> {
        let codec = config.validate()?;
        let rtt = RttEstimator::new(config.initial_rto, config.min_rto, config.max_rto);
        Ok(Self {
            codec,
            state: State::Joining {
                since: now,
                next_join: now,
            },
            grant: None,
            seq_base: 0,
            cwnd: Cwnd::new(config.window),
            rtt,
            last_heard: now,
            last_sent: now,
            heartbeat_due: false,
            events: VecDeque::new(),
            idle_packets: 0,
            residuals: HashMap::new(),
            feedback_key: None,
            old_tokens: VecDeque::new(),
            payloads: Vec::new(),
            dropped: Dropped::default(),
            config,
        })
    }

    /// Datagrams this worker dropped, by reason.
    pub fn dropped(&self) -> &Dropped {
        &self.dropped
    }

    /// Bytes `r` of the payloads that [`Worker::poll_transmit_head`] encoded and left
    /// in place ([`Tail::Encoded`]); empty if out of range.
    pub fn payload(&self, r: std::ops::Range<usize>) -> &[u8] {
        self.payloads.get(r).unwrap_or(&[])
    }

    /// The settings.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// The codec.
    pub fn codec(&self) -> &'static dyn Codec {
        self.codec
    }

    /// The grant, once the job started.
    pub fn grant(&self) -> Option<&Grant> {
        self.grant.as_ref()
    }

    /// The RTT estimator.
    pub fn rtt(&self) -> &RttEstimator {
        &self.rtt
    }

    /// Joined and no allreduce running: one may start.
    pub fn is_ready(&self) -> bool {
        matches!(
            self.state,
            State::Ready | State::Regranting { pending: None, .. }
        )
    }

    /// An allreduce is running (or started and waits for a re-grant).
    pub fn is_running(&self) -> bool {
        matches!(
            self.state,
            State::Running(_)
                | State::Regranting {
                    pending: Some(_),
                    ..
                }
        )
    }

    /// Waiting for a re-grant from the aggregator.
    pub fn is_regranting(&self) -> bool {
        matches!(self.state, State::Regranting { .. })
    }

    /// The error the worker failed with, if it did.
    pub fn error(&self) -> Option<&WorkerError> {
        match &self.state {
            State::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// Closed (after [`Worker::close`] and its leave went out) or failed.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Closed | State::Failed(_))
    }

    /// Datagrams sent outside allreduces (joins, heartbeats, leave).
    pub fn idle_packets(&self) -> u64 {
        self.idle_packets
    }

    fn fail(&mut self, e: WorkerError) {
        if !matches!(self.state, State::Failed(_) | State::Closed) {
            self.events.push_back(Event::Failed(e.clone()));
            self.state = State::Failed(e);
        }
    }

    /// Starts an allreduce of `data.len()` elements. The same `data` must be passed to
    /// every later call until [`Event::AllreduceDone`] or [`Event::Failed`]; every rank
    /// must call with the same length.
    ///
    /// With `feedback: Some(key)`, error feedback: the quantization residual left by the
    /// previous allreduce with the same key (and length) is added to `data` first, and
    /// this allreduce's residual is kept for the next one.
    ///
    /// A NaN or an infinity in `data` under a block-scaled codec does not stop the
    /// allreduce half-way (the other ranks would wait for this one's chunks): the chunk
    /// goes out clamped and flagged, and on every rank the allreduce ends with
    /// [`AllreduceStats::nonfinite_chunks`] above zero, which drivers report as
    /// [`WorkerError::NonFinite`]; the buffer then holds no meaningful sum, and the job
    /// goes on.
    pub fn start_allreduce(
        &mut self,
        now: Instant,
        data: &mut [f32],
        feedback: Option<u64>,
    ) -> Result<(), WorkerError> {
        match &self.state {
            State::Ready | State::Regranting { pending: None, .. } => {}
            State::Joining { .. } => return Err(WorkerError::NotReady("still joining")),
            State::Running(_) | State::Regranting { .. } => {
                return Err(WorkerError::NotReady("an allreduce is running"))
            }
            State::Failed(e) => return Err(e.clone()),
            State::Closing { .. } | State::Closed => return Err(WorkerError::Closed),
        }
        let Some(g) = self.grant else {
            return Err(WorkerError::NotReady("no grant"));
        };
        let residual = feedback.map(|key| {
            let mut r = self.residuals.remove(&key).unwrap_or_default();
            if r.len() == data.len() {
                for (x, e) in data.iter_mut().zip(&r) {
                    *x += e;
                }
            }
            r.clear();
            r.resize(data.len(), 0.0);
            r
        });
        if matches!(self.state, State::Regranting { .. }) {
            // The allreduce starts once the new grant is in.
            self.feedback_key = feedback;
            if let State::Regranting { pending, .. } = &mut self.state {
                *pending = Some(Pending {
                    len: data.len(),
                    residual,
                });
            }
            return Ok(());
        }
        let op = self.allreduce_op(now, &g, data.len(), residual);
        self.feedback_key = feedback;
        self.run(now, op);
        Ok(())
    }

    /// The state of an allreduce of `len` elements under grant `g`.
    fn allreduce_op(
        &self,
        now: Instant,
        g: &Grant,
        len: usize,
        residual: Option<Vec<f32>>,
    ) -> Allreduce {
        let opts = allreduce::Options {
            dither_seed: self.config.stochastic_rounding,
            skip_zeros: self.config.skip_zeros,
        };
        Allreduce::new(self.codec, g, self.seq_base, len, opts, residual, now)
    }

    /// Runs an allreduce of `len` elements under grant `g`.
    fn begin(&mut self, now: Instant, g: &Grant, len: usize, residual: Option<Vec<f32>>) {
        let op = self.allreduce_op(now, g, len, residual);
        self.run(now, op);
    }

    /// Makes `op` the running allreduce.
    fn run(&mut self, now: Instant, op: Allreduce) {
        self.state = State::Running(Box::new(op));
        self.finish_if_done(now);
    }

    /// Forgets the error-feedback residual of `key` (or of every key).
    pub fn clear_feedback(&mut self, key: Option<u64>) {
        match key {
            Some(k) => {
                self.residuals.remove(&k);
            }
            None => self.residuals.clear(),
        }
    }

    /// Sends a leave and stops. Any running allreduce is abandoned.
    pub fn close(&mut self) {
        self.state = match self.state {
            State::Ready | State::Running(_) | State::Regranting { .. } if self.grant.is_some() => {
                State::Closing {
                    sent: 0,
                    next: self.last_sent,
                }
            }
            State::Failed(_) => return,
            _ => State::Closed,
        };
    }

    fn finish_if_done(&mut self, now: Instant) {
        if let State::Running(op) = &mut self.state {
            if op.is_done() {
                let total = op.total();
                let stats = op.stats.clone();
                let elapsed = now.saturating_duration_since(op.started);
                if let (Some(key), Some(r)) = (self.feedback_key.take(), op.residual.take()) {
                    // A residual of clamped non-finite input would only carry garbage.
                    if stats.nonfinite_chunks == 0 {
                        self.residuals.insert(key, r);
                    }
                }
                self.seq_base += total;
                self.state = if op.regrant {
                    State::Regranting {
                        since: now,
                        next: now,
                        pending: None,
                    }
                } else {
                    State::Ready
                };
                self.events
                    .push_back(Event::AllreduceDone { stats, elapsed });
            }
        }
    }

    fn control(&self) -> Option<Control> {
        Some(Control {
            job: self.config.job,
            rank: self.config.rank,
            token: self.grant?.token,
        })
    }

    /// Takes one datagram from the aggregator. `data` is the running allreduce's buffer
    /// (any slice when none runs).
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8], data: &mut [f32]) {
        if let Err(reason) = self.take_datagram(now, datagram, data) {
            self.dropped.add(reason);
        }
    }

    /// [`Worker::handle_datagram`]: why the datagram changed nothing, if it did not.
    fn take_datagram(
        &mut self,
        now: Instant,
        datagram: &[u8],
        data: &mut [f32],
    ) -> Result<(), DropReason> {
        let msg = wire::decode(datagram).map_err(|_| DropReason::Malformed)?;
        let len = datagram.len() as u64;
        let job = match &msg {
            Message::Grant(g) => g.job,
            Message::Result(h, _) => h.job,
            Message::Heartbeat(c) | Message::Leave(c) => c.job,
            Message::Error(e) => e.job,
            Message::Join(_) | Message::Contribution(..) | Message::Regrant(_) => {
                return Err(DropReason::WrongDirection)
            }
        };
        if job != self.config.job {
            return Err(DropReason::OtherJob);
        }
        match msg {
            Message::Grant(g) => {
                if g.nonce != self.config.nonce {
                    return Err(DropReason::BadNonce);
                }
                // The aggregator grants the chunk every rank asked for and at most the
                // smallest window asked: anything else is broken, and a window beyond
                // ours would size this rank's ring by it.
                if g.rank != self.config.rank
                    || g.world != self.config.world
                    || g.codec != self.config.codec
                    || g.chunk_elems != self.config.chunk_elems
                    || g.window == 0
                    || g.window > self.config.window
                    // A group this rank did not ask for, or another than its job's.
                    || (g.group.is_some() && !self.config.groups)
                    || self.grant.is_some_and(|old| old.group != g.group)
                {
                    return Err(DropReason::GrantMismatch);
                }
                self.last_heard = now;
                match &mut self.state {
                    State::Joining { .. } => {
                        self.grant = Some(g);
                        self.cwnd = Cwnd::new(g.window);
                        self.state = State::Ready;
                        self.events.push_back(Event::Joined(g));
                    }
                    State::Regranting { pending, .. }
                        if self.grant.is_some_and(|old| old.token != g.token)
                            && !self.old_tokens.contains(&g.token) =>
                    {
                        // The new grant (a late copy of an old one has an old token).
                        let pending = pending.take();
                        if let Some(old) = self.grant.replace(g) {
                            if self.old_tokens.len() == OLD_TOKENS {
                                self.old_tokens.pop_front();
                            }
                            self.old_tokens.push_back(old.token);
                        }
                        self.cwnd.set_max(g.window);
                        match pending {
                            Some(p) => self.begin(now, &g, p.len, p.residual),
                            None => self.state = State::Ready,
                        }
                    }
                    // A retransmitted grant: the aggregator is alive, nothing changes.
                    _ => return Err(DropReason::Unexpected),
                }
            }
            Message::Result(h, payload) => {
                let Some(g) = self.grant else {
                    return Err(DropReason::BadToken);
                };
                if h.token != g.token {
                    return Err(DropReason::BadToken);
                }
                if h.codec != self.codec.id() {
                    return Err(DropReason::Unexpected);
                }
                self.last_heard = now;
                let State::Running(op) = &mut self.state else {
                    return Err(DropReason::Unexpected);
                };
                op.stats.packets_received += 1;
                op.stats.bytes_received += len;
                let outcome = op.handle_result(now, &h, payload, data, &self.rtt);
                if let ResultOutcome::Accepted(sample) = outcome {
                    if let Some(rtt) = sample {
                        self.rtt.sample(rtt);
                    }
                    if self.config.congestion_control {
                        let marked = h.flags & wire::FLAG_MARK != 0;
                        self.cwnd.on_result(h.seq, marked, op.next_seq());
                    }
                    op.regrant |= h.flags & wire::FLAG_REGRANT != 0;
                }
                if let Some(lost) = op.take_loss() {
                    if self.config.congestion_control {
                        self.cwnd.on_loss(lost, op.next_seq());
                    }
                }
                self.finish_if_done(now);
                if matches!(outcome, ResultOutcome::Ignored | ResultOutcome::Duplicate) {
                    return Err(DropReason::Unexpected);
                }
            }
            Message::Heartbeat(c) => {
                if Some(c) != self.control() {
                    return Err(DropReason::BadToken);
                }
                self.last_heard = now;
                if let State::Running(op) = &mut self.state {
                    op.stats.packets_received += 1;
                    op.stats.bytes_received += len;
                }
            }
            Message::Error(e) => {
                if e.nonce != self.config.nonce {
                    return Err(DropReason::BadNonce);
                }
                if matches!(e.code, ErrorCode::RankOutOfRange | ErrorCode::UnknownJob)
                    && !matches!(self.state, State::Joining { .. })
                {
                    // Not about this rank's membership: ignore rather than trust it.
                    return Err(DropReason::Unexpected);
                }
                let err = match self.state {
                    State::Joining { .. } => WorkerError::Refused {
                        code: e.code,
                        text: e.text,
                    },
                    _ => WorkerError::Aborted {
                        code: e.code,
                        rank: (e.rank != u16::MAX).then_some(e.rank),
                        text: e.text,
                    },
                };
                self.fail(err);
            }
            Message::Leave(c) => {
                if Some(c) != self.control() {
                    return Err(DropReason::BadToken);
                }
                // The aggregator's echo: the leave arrived.
                if !matches!(self.state, State::Closing { .. }) {
                    return Err(DropReason::Unexpected);
                }
                self.state = State::Closed;
            }
            Message::Join(_) | Message::Contribution(..) | Message::Regrant(_) => {
                return Err(DropReason::WrongDirection)
            }
        }
        Ok(())
    }

    /// Writes the next datagram to send into `buf` (cleared first); false when nothing
    /// is due now.
    pub fn poll_transmit(&mut self, now: Instant, data: &[f32], buf: &mut Vec<u8>) -> bool {
        buf.clear();
        self.poll_transmit_append(now, data, buf)
    }

    /// Like [`Worker::poll_transmit`], but appends the datagram to `buf`, so that a
    /// driver can encode a whole batch into one arena.
    pub fn poll_transmit_append(&mut self, now: Instant, data: &[f32], buf: &mut Vec<u8>) -> bool {
        self.poll_transmit_parts(now, data, buf, false).is_some()
    }

    /// Like [`Worker::poll_transmit_append`], but a contribution's payload does not
    /// follow its header in `buf`: only the header is appended, and either
    /// [`Tail::Data`] names the elements of `data` whose bytes follow it (f32, whose
    /// encoding was a plain copy of every element), or [`Tail::Encoded`] the bytes of
    /// [`Worker::payload`] that do, for a driver that sends them from there
    /// (scatter-gather). Those bytes stay until a later packet of the same slot is
    /// encoded, which waits for this one's result: a driver that sends what it queued
    /// before it hands the worker any message never sends overwritten bytes.
    pub fn poll_transmit_head(
        &mut self,
        now: Instant,
        data: &[f32],
        buf: &mut Vec<u8>,
    ) -> Option<Tail> {
        self.poll_transmit_parts(now, data, buf, true)
    }

    fn poll_transmit_parts(
        &mut self,
        now: Instant,
        data: &[f32],
        buf: &mut Vec<u8>,
        by_ref: bool,
    ) -> Option<Tail> {
        let start = buf.len();
        let control = self.control();
        let sent = match &mut self.state {
            State::Joining { next_join, .. } => {
                if *next_join > now {
                    return None;
                }
                *next_join = now + self.config.join_interval;
                wire::encode_join(&self.join_msg(), buf);
                self.idle_packets += 1;
                true
            }
            State::Running(op) => {
                let window = u64::from(self.grant.map_or(1, |g| g.window)).min(self.cwnd.window());
                if let Some(tail) = op.poll_transmit(
                    now,
                    window,
                    &self.rtt,
                    data,
                    buf,
                    by_ref.then_some(&mut self.payloads),
                ) {
                    self.last_sent = now;
                    return Some(tail);
                } else if self.heartbeat_due {
                    self.heartbeat_due = false;
                    control.is_some_and(|c| {
                        wire::encode_heartbeat(&c, buf);
                        op.stats.packets_sent += 1;
                        op.stats.bytes_sent += (buf.len() - start) as u64;
                        true
                    })
                } else {
                    false
                }
            }
            State::Regranting { next, .. } if *next <= now => {
                *next = now + self.rtt.rto(1).min(self.config.join_interval);
                self.idle_packets += 1;
                control.is_some_and(|c| {
                    wire::encode_regrant(&c, buf);
                    true
                })
            }
            State::Ready | State::Regranting { .. } if self.heartbeat_due => {
                self.heartbeat_due = false;
                self.idle_packets += 1;
                self.control().is_some_and(|c| {
                    wire::encode_heartbeat(&c, buf);
                    true
                })
            }
            State::Closing { sent, next } if *next <= now && *sent < LEAVE_TRIES => {
                *sent += 1;
                *next = now + LEAVE_INTERVAL;
                self.idle_packets += 1;
                self.control().is_some_and(|c| {
                    wire::encode_leave(&c, buf);
                    true
                })
            }
            _ => false,
        };
        if sent {
            self.last_sent = now;
        }
        sent.then_some(Tail::InBuf)
    }

    fn join_msg(&self) -> Join {
        let mut join = Join {
            job: self.config.job,
            rank: self.config.rank,
            world: self.config.world,
            codec: self.config.codec,
            chunk_elems: self.config.chunk_elems,
            window: self.config.window,
            secret: self.config.secret.clone(),
            groups: self.config.groups,
            nonce: self.config.nonce,
            completed: self.config.completed,
            proof: None,
        };
        if let Some(key) = &self.config.admission_key {
            join.prove(key);
        }
        join
    }

    /// When [`Worker::handle_timeout`] should be called next.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let hb = self.config.heartbeat_interval;
        let quiet = (self.last_sent + hb).min((self.last_heard + hb).max(self.last_sent + hb / 2));
        let silent = self.last_heard + self.config.aggregator_timeout;
        match &mut self.state {
            State::Joining { since, next_join } => {
                Some((*next_join).min(*since + self.config.join_timeout))
            }
            State::Ready => Some(quiet.min(silent)),
            State::Regranting { since, next, .. } => Some(
                quiet
                    .min(silent)
                    .min(*next)
                    .min(*since + self.config.progress_timeout),
            ),
            State::Running(op) => {
                let t = quiet
                    .min(silent)
                    .min(op.last_progress + self.config.progress_timeout);
                Some(op.poll_timeout().map_or(t, |r| r.min(t)))
            }
            State::Closing { next, .. } => Some(*next),
            State::Failed(_) | State::Closed => None,
        }
    }

    /// Handles every deadline that has passed: join retries and timeout, heartbeats,
    /// retransmissions, a silent aggregator.
    pub fn handle_timeout(&mut self, now: Instant) {
        let hb = self.config.heartbeat_interval;
        match &mut self.state {
            State::Joining { since, .. } => {
                if now >= *since + self.config.join_timeout {
                    let t = self.config.join_timeout;
                    self.fail(WorkerError::JoinTimeout(t));
                }
                return;
            }
            State::Running(op) => {
                if now.saturating_duration_since(op.last_progress) >= self.config.progress_timeout {
                    let t = self.config.progress_timeout;
                    return self.fail(WorkerError::Stalled(t));
                }
                op.handle_timeout(now);
                if let Some(lost) = op.take_loss() {
                    if self.config.congestion_control {
                        self.cwnd.on_loss(lost, op.next_seq());
                    }
                }
            }
            State::Regranting { since, .. } => {
                // Every rank must reach the boundary; one that never does stalls the job.
                if now.saturating_duration_since(*since) >= self.config.progress_timeout {
                    let t = self.config.progress_timeout;
                    return self.fail(WorkerError::Stalled(t));
                }
            }
            State::Ready => {}
            State::Closing { sent, next } => {
                // No echo after the last try: the aggregator will time the rank out.
                if *sent >= LEAVE_TRIES && *next <= now {
                    self.state = State::Closed;
                }
                return;
            }
            _ => return,
        }
        if now.saturating_duration_since(self.last_heard) >= self.config.aggregator_timeout {
            let t = self.config.aggregator_timeout;
            return self.fail(WorkerError::AggregatorSilent(t));
        }
        // Keep the aggregator hearing from this rank, and ask it to answer when it has
        // been quiet (a heartbeat is always echoed).
        if now.saturating_duration_since(self.last_sent) >= hb
            || now.saturating_duration_since(self.last_heard) >= hb
                && now.saturating_duration_since(self.last_sent) >= hb / 2
        {
            self.heartbeat_due = true;
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests;
