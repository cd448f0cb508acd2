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
//!
//! This file holds the state machine; `config.rs` its settings, `error.rs` its
//! errors, `allreduce.rs` one allreduce's window, `cwnd.rs`, `pacer.rs` and `rtt.rs`
//! congestion control, pacing and timeouts, `timers.rs` its deadlines, `dropped.rs`
//! the datagrams it drops.

mod allreduce;
mod config;
mod cwnd;
mod dropped;
mod error;
mod pacer;
mod rtt;
mod timers;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

pub use allreduce::{AllreduceStats, Tail};
pub use config::{
    is_pacing_gain, WorkerConfig, DEFAULT_AGGREGATOR_TIMEOUT, DEFAULT_JOIN_TIMEOUT,
    DEFAULT_QUEUE_TARGET,
};
pub use dropped::{DropReason, Dropped};
pub use error::{ConfigError, WorkerError};
pub use pacer::{Pacer, PACING_GAIN};
pub use rtt::RttEstimator;
use timers::{Timer, TimerTable};

use crate::codec::Codec;
use crate::wire::{self, Control, ErrorCode, Grant, Join, Message};
use allreduce::{Allreduce, ResultOutcome};
pub use cwnd::{
    Cwnd, DEFAULT_DIP_INTERVAL, DEFAULT_OVERFLOW_HOLD, DIP_TIME, LOSSY_BLOCKS, LOSSY_SHARE,
    LOSS_BLOCK,
};

/// Tokens of earlier grants remembered, so that a late duplicate of an old grant is
/// never taken for a re-grant.
const OLD_TOKENS: usize = 16;

/// Leaves sent before giving up on the aggregator's echo.
const LEAVE_TRIES: u32 = 3;
/// Time between them.
const LEAVE_INTERVAL: Duration = Duration::from_millis(100);

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

/// A congestion window of `window` slots with the rules `config` asks for; the dip
/// rule at rank 0 alone, whose dips hold every rank back.
fn congestion_window(config: &WorkerConfig, window: u32) -> Cwnd {
    Cwnd::new(window)
        .with_queue_target(config.queue_target)
        .with_dip_interval(config.dip_interval.filter(|_| config.rank == 0))
        .with_overflow_hold(config.overflow_hold)
        .with_pacing(config.pacing_gain)
}

impl Worker {
    /// The congestion window now, as the AIMD rules hold it: packets allowed in
    /// flight, but for a dip under way.
    pub fn congestion_window(&self) -> u64 {
        self.cwnd.aimd_window()
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
            cwnd: congestion_window(&config, config.window),
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
        self.cwnd.on_allreduce(now);
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
                let stats = AllreduceStats {
                    pacing_holds: self.cwnd.pacing_holds(),
                    ..op.stats.clone()
                };
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
            Message::Join(_)
            | Message::Contribution(..)
            | Message::Partial(..)
            | Message::Regrant(_) => return Err(DropReason::WrongDirection),
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
                        self.cwnd = congestion_window(&self.config, g.window);
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
                        let (dips, overflows) = (self.cwnd.dips(), self.cwnd.overflows);
                        self.cwnd
                            .on_result(h.seq, marked, sample, op.next_seq(), now);
                        op.stats.dips += self.cwnd.dips() - dips;
                        op.stats.overflows += self.cwnd.overflows - overflows;
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
            Message::Join(_)
            | Message::Contribution(..)
            | Message::Partial(..)
            | Message::Regrant(_) => return Err(DropReason::WrongDirection),
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
                let allowed = !self.config.congestion_control || self.cwnd.may_send(now);
                if let Some(tail) = allowed
                    .then(|| {
                        op.poll_transmit(
                            now,
                            window,
                            &self.rtt,
                            data,
                            buf,
                            by_ref.then_some(&mut self.payloads),
                        )
                    })
                    .flatten()
                {
                    self.cwnd.on_sent();
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
            job_world: None,
        };
        if let Some(key) = &self.config.admission_key {
            join.prove(key);
        }
        join
    }

    /// When [`Worker::handle_timeout`] should be called next.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.timers().next()
    }

    /// Every deadline the state has now ([`Timer`]).
    fn timers(&mut self) -> TimerTable {
        let c = &self.config;
        let mut t = TimerTable::default();
        let hb = c.heartbeat_interval;
        let quiet = (self.last_sent + hb).min((self.last_heard + hb).max(self.last_sent + hb / 2));
        let live = |t: &mut TimerTable| {
            t.set(Timer::Heartbeat, quiet);
            t.set(Timer::Silence, self.last_heard + c.aggregator_timeout);
        };
        match &mut self.state {
            State::Joining { since, next_join } => {
                t.set(Timer::JoinRetry, *next_join);
                t.set(Timer::JoinTimeout, *since + c.join_timeout);
            }
            State::Ready => live(&mut t),
            State::Regranting { since, next, .. } => {
                live(&mut t);
                t.set(Timer::RegrantRetry, *next);
                t.set(Timer::Progress, *since + c.progress_timeout);
            }
            State::Running(op) => {
                live(&mut t);
                t.set(Timer::Progress, op.last_progress + c.progress_timeout);
                if let Some(r) = op.poll_timeout() {
                    t.set(Timer::Retransmit, r);
                }
                if let Some(p) = self.cwnd.pacing_timer() {
                    t.set(Timer::Pace, p);
                }
            }
            State::Closing { next, .. } => t.set(Timer::Leave, *next),
            State::Failed(_) | State::Closed => {}
        }
        t
    }

    /// Handles every deadline that has passed (the worker's timer table): join and
    /// progress timeouts, retransmissions, a silent aggregator, heartbeats, the end of
    /// leaving. Joins and re-grant requests go out from `poll_transmit` when due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due = self.timers();
        for timer in Timer::ALL {
            if !due.expired(timer, now) {
                continue;
            }
            match timer {
                Timer::JoinTimeout => {
                    let t = self.config.join_timeout;
                    return self.fail(WorkerError::JoinTimeout(t));
                }
                // Every rank must reach the next chunk (or the re-grant's boundary);
                // one that never does stalls the job.
                Timer::Progress => {
                    let t = self.config.progress_timeout;
                    return self.fail(WorkerError::Stalled(t));
                }
                Timer::Retransmit => {
                    if let State::Running(op) = &mut self.state {
                        op.handle_timeout(now, &self.rtt);
                        if let Some(lost) = op.take_loss() {
                            if self.config.congestion_control {
                                self.cwnd.on_loss(lost, op.next_seq());
                            }
                        }
                    }
                }
                Timer::Silence => {
                    let t = self.config.aggregator_timeout;
                    return self.fail(WorkerError::AggregatorSilent(t));
                }
                // Keep the aggregator hearing from this rank, and ask it to answer
                // when it has been quiet (a heartbeat is always echoed).
                Timer::Heartbeat => self.heartbeat_due = true,
                Timer::Leave => {
                    // No echo after the last try: the aggregator will time the rank out.
                    if matches!(self.state, State::Closing { sent, .. } if sent >= LEAVE_TRIES) {
                        self.state = State::Closed;
                    }
                }
                Timer::Pace => self.cwnd.on_pacing_timer(),
                Timer::JoinRetry | Timer::RegrantRetry => {}
            }
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests;
