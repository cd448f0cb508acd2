//! The aggregator as a state machine: jobs, slot pools, the control plane.
//!
//! Feed it datagrams with [`Aggregator::handle_datagram`] and the passage of time with
//! [`Aggregator::handle_timeout`]; then drain, in this order, [`Aggregator::poll_transmit`]
//! (datagrams to send, written into the caller's buffer), [`Aggregator::poll_event`]
//! (jobs starting and ending, for logs) and [`Aggregator::poll_timeout`] (when to call
//! `handle_timeout` next). It never reads a clock and never touches a socket: `A` is
//! whatever the driver uses to address a worker (a `SocketAddr`, a connection id, an
//! index in the simulator).
//!
//! A result is sent to every rank straight from the slot's kept copy, so completing a
//! chunk allocates nothing and encodes the result once per rank into the caller's buffer.
//!
//! With [`AggregatorConfig::slot_memory`], slot memory is a budget shared by the jobs
//! present, in max-min fair shares ([`budget`]) that follow jobs as they come and go;
//! pools change size at allreduce boundaries every rank agrees on (`regrant.rs`).

pub mod budget;
mod job;
mod regrant;
mod slots;
mod stats;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

pub use budget::MIN_SLOTS;
pub use slots::{kept_bytes, slot_bytes};
pub use stats::{DropReason, Stats};

use crate::codec;
use crate::wire::{
    self, Control, DataHeader, ErrorCode, ErrorMsg, Grant, Join, Message, DATA_HEADER_LEN,
    FLAG_FROM_COPY, FLAG_LAST, FLAG_MARK, FLAG_NONFINITE, FLAG_PROBE, FLAG_REGRANT, FLAG_RETX,
    MAX_DATAGRAM,
};
use job::Job;
use slots::{Outcome, Sent};

/// What a rank sent for a packet, in words, for an abort that names both sides.
fn describe(s: &Sent, aligned: bool) -> String {
    let mut t = format!("rank {} sent {} elements", s.rank, s.count);
    if !aligned && s.scale_exp != wire::NO_EXPONENT {
        t += &format!(" at exponent {}", s.scale_exp);
    }
    if s.last {
        t += ", the last of its tensor";
    }
    t
}

/// Settings of an aggregator.
#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    /// The most slots one job may hold (its window `S`); a join asking for more gets
    /// this many.
    pub max_window: u32,
    /// The most jobs at once; a join for one more is refused with `NoCapacity`.
    pub max_jobs: usize,
    /// The largest world size accepted.
    pub max_world: u16,
    /// A rank not heard from for this long aborts its job (every other rank is told).
    pub silence_timeout: Duration,
    /// How long an aborted job's reason is kept, to answer ranks that missed the abort.
    pub tombstone_ttl: Duration,
    /// The most aborted jobs' reasons kept at once; beyond, the oldest is forgotten
    /// first. Jobs come and go faster than `tombstone_ttl` only when someone starts
    /// and breaks jobs on purpose, and without a bound each would cost memory for the
    /// whole TTL.
    pub max_tombstones: usize,
    /// Seeds the session tokens. Drivers pass fresh randomness; tests a fixed value.
    pub seed: u64,
    /// Slot memory budget in bytes, shared by all jobs in max-min fair shares (see
    /// [`budget`] and [`slot_bytes`] for what a slot costs); `None`: every job gets
    /// the window it asks for, up to `max_window`.
    pub slot_memory: Option<usize>,
    /// The most slot memory one job may hold, in bytes: a job's window is capped at
    /// as many slots as fit (at least one). With `slot_memory` at `max_jobs` times this,
    /// jobs never wait for one another's memory, so a few joins asking for the largest
    /// windows cannot keep every later job out. `None`: no cap beyond `max_window`.
    pub max_job_memory: Option<usize>,
    /// This state machine's shard of its aggregator, and the number of shards, which
    /// every grant announces (see [`Grant::shards`]). One shard: 0 of 1. `new` keeps
    /// them in range (1 to `MAX_SHARDS` shards, the shard below the count).
    pub shard: u16,
    /// See `shard`.
    pub shards: u16,
    /// The aggregator-wide admission key: with it, a join that does not prove the key
    /// ([`Join::proves`]) creates nothing and is answered with
    /// [`ErrorCode::NotAdmitted`]. `None`: anyone who can reach the aggregator may
    /// create a job (job secrets still guard jobs that exist).
    pub admission_key: Option<Vec<u8>>,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        Self {
            max_window: 1024,
            max_jobs: 64,
            max_world: 1024,
            silence_timeout: Duration::from_secs(3),
            tombstone_ttl: Duration::from_secs(30),
            max_tombstones: 1024,
            seed: 0x1a66_0000_0000_0001,
            slot_memory: None,
            max_job_memory: None,
            shard: 0,
            shards: 1,
            admission_key: None,
        }
    }
}

/// Something that happened to a job, for the driver's logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Every rank joined; the job has its slots.
    JobStarted {
        /// The job.
        job: u32,
        /// Its world size.
        world: u16,
        /// Slots granted.
        window: u32,
        /// Its codec's name.
        codec: &'static str,
    },
    /// The job was aborted; its ranks were told why.
    JobAborted {
        /// The job.
        job: u32,
        /// Why.
        code: ErrorCode,
        /// In words.
        text: String,
    },
    /// The job's pool changed size (or was confirmed) at an allreduce boundary, under
    /// the slot memory budget.
    Regranted {
        /// The job.
        job: u32,
        /// Its new window.
        window: u32,
    },
    /// Every rank left; the job's slots are free.
    JobEnded {
        /// The job.
        job: u32,
        /// Its counters.
        stats: Box<Stats>,
    },
}

/// Who a queued result goes to.
#[derive(Debug, Clone, Copy)]
enum Dest {
    /// Every live rank, starting from this one.
    All(u16),
    /// One rank.
    Rank(u16),
}

/// A datagram waiting for `poll_transmit`.
#[derive(Debug)]
enum Outgoing<A> {
    /// A completed chunk, encoded from the slot at send time.
    Result { job: u32, seq: u64, dest: Dest },
    /// A control message.
    Control { to: A, msg: Message<'static> },
}

/// A result's payload that [`Aggregator::poll_transmit_head`] left in its slot: the
/// datagram's bytes after the header, found again by [`Aggregator::body`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Body {
    job: u32,
    seq: u64,
    len: usize,
}

impl Body {
    /// Bytes of the payload.
    pub fn len(&self) -> usize {
        self.len
    }

    /// An empty payload (a result of a chunk every rank skipped).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// An aborted job, remembered so that ranks that missed the news hear it.
#[derive(Debug)]
struct Tombstone<A> {
    error: ErrorMsg,
    /// Its ranks' addresses and join nonces: the answer to each carries its own.
    members: Vec<(A, u64)>,
    expires: Instant,
}

/// The driver's map from group numbers to addresses, given with
/// [`Aggregator::offer_groups`].
struct Groups<A> {
    /// Group numbers run from 0 to below this.
    count: u32,
    addr: Box<dyn Fn(u32) -> A + Send + Sync>,
    /// Where the search for a free number starts: after the last one handed out, so
    /// that an ended job's number is not handed out again at once (its ranks may
    /// still be members of the group for a while).
    next: u32,
}

impl<A> std::fmt::Debug for Groups<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups")
            .field("count", &self.count)
            .finish()
    }
}

/// The aggregator state machine. See the module documentation for the call order.
#[derive(Debug)]
pub struct Aggregator<A> {
    config: AggregatorConfig,
    jobs: BTreeMap<u32, Job<A>>,
    tombstones: BTreeMap<u32, Tombstone<A>>,
    outbox: VecDeque<Outgoing<A>>,
    events: VecDeque<Event>,
    stats: Stats,
    rng: SmallRng,
    next_check: Option<Instant>,
    /// The driver says the aggregator is falling behind: mark every result.
    backlogged: bool,
    /// Jobs that got all their ranks so far: orders waiting jobs.
    arrivals: u64,
    /// Where results can go once for all ranks, if the driver offers groups.
    groups: Option<Groups<A>>,
    /// Jobs created so far: orders forming jobs for eviction, oldest first.
    born: u64,
    /// Shutting down ([`Aggregator::drain`]): completed chunks are still answered,
    /// no chunk completes any more.
    draining: bool,
}

impl<A: Clone + Eq + std::fmt::Debug> Aggregator<A> {
    /// An aggregator with no jobs.
    pub fn new(mut config: AggregatorConfig) -> Self {
        let rng = SmallRng::seed_from_u64(config.seed);
        // Grants must decode: 1 to MAX_SHARDS shards, this one among them.
        config.shards = config.shards.clamp(1, crate::wire::MAX_SHARDS);
        config.shard = config.shard.min(config.shards - 1);
        Self {
            config,
            jobs: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            rng,
            next_check: None,
            backlogged: false,
            arrivals: 0,
            groups: None,
            born: 0,
            draining: false,
        }
    }

    /// Offers jobs that start from now on a group to send their results to: one
    /// datagram per result instead of one per rank, as a switch multicasts. A job
    /// gets one when every rank asked for it ([`Join::groups`]); its grants then name
    /// the group ([`Grant::group`]), a number below `count` that no other job holds,
    /// which `addr` turns into the address to send to (over UDP on loopback, a
    /// multicast group on the aggregator's port, which every rank joins before it
    /// sends). Answers to one rank (results from the kept copy, held answers) and
    /// control messages still go to the rank's own address. Where every number is
    /// held, a job's results go to each rank as without groups. Numbers are handed
    /// out in turn, so an ended job's comes back only after the others.
    pub fn offer_groups(&mut self, count: u32, addr: impl Fn(u32) -> A + Send + Sync + 'static) {
        self.groups = Some(Groups {
            count,
            addr: Box::new(addr),
            next: 0,
        });
    }

    /// A group number no job holds, the first at or after the last one handed out,
    /// if groups are offered and one is free; it counts as handed out.
    fn take_group(&mut self) -> Option<u32> {
        let held: std::collections::BTreeSet<u32> =
            self.jobs.values().filter_map(|j| j.group).collect();
        let groups = self.groups.as_mut()?;
        let (count, next) = (groups.count, groups.next);
        let free = (next..count)
            .chain(0..next.min(count))
            .find(|g| !held.contains(g))?;
        groups.next = free.wrapping_add(1) % count.max(1);
        Some(free)
    }

    /// The group the job `id` sends its results to, if any.
    pub fn job_group(&self, id: u32) -> Option<u32> {
        self.jobs.get(&id)?.group
    }

    /// Tells the aggregator whether it is falling behind (for a socket driver: its
    /// receive queue keeps filling every batch). While it is, every chunk that
    /// completes carries a congestion mark to its ranks, which halve their windows.
    pub fn set_backlogged(&mut self, backlogged: bool) {
        self.backlogged = backlogged;
    }

    /// Process-wide counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// A job's counters, while it exists.
    pub fn job_stats(&self, job: u32) -> Option<&Stats> {
        self.jobs.get(&job).map(|j| &j.stats)
    }

    /// Ids of the jobs present (forming or running).
    pub fn jobs(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.jobs.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The slots granted to `job` (its pool size), once all its ranks joined.
    pub fn job_slots(&self, job: u32) -> Option<u32> {
        self.jobs.get(&job)?.pool.as_ref().map(|p| p.slots())
    }

    /// The slot memory budget, if any.
    pub fn slot_budget(&self) -> Option<usize> {
        self.config.slot_memory
    }

    /// Bytes of slot memory held by running jobs.
    pub fn slot_memory(&self) -> usize {
        self.jobs
            .values()
            .filter_map(|j| j.pool.as_ref())
            .map(|p| p.memory_bytes())
            .sum()
    }

    fn drop_packet(&mut self, job: Option<u32>, reason: DropReason) {
        self.stats.drop(reason);
        if let Some(j) = job.and_then(|id| self.jobs.get_mut(&id)) {
            j.stats.drop(reason);
        }
    }

    fn send(&mut self, to: A, msg: Message<'static>) {
        self.outbox.push_back(Outgoing::Control { to, msg });
    }

    fn refuse(&mut self, to: A, join: &Join, code: ErrorCode, reason: DropReason, text: String) {
        self.stats.drop(reason);
        let msg = Message::Error(ErrorMsg {
            job: join.job,
            rank: join.rank,
            code,
            nonce: join.nonce,
            text,
        });
        self.send(to, msg);
    }

    /// Takes one datagram from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: A, datagram: &[u8]) {
        self.stats.packets_received += 1;
        self.stats.bytes_received += datagram.len() as u64;
        if self.next_check.is_none() {
            self.next_check = Some(now + self.check_interval());
        }
        let msg = match wire::decode(datagram) {
            Ok(m) => m,
            Err(_) => return self.drop_packet(None, DropReason::Malformed),
        };
        let len = datagram.len() as u64;
        // Contributions count themselves where their job is looked up anyway.
        let control = match &msg {
            Message::Join(j) => Some(j.job),
            Message::Heartbeat(c) | Message::Leave(c) | Message::Regrant(c) => Some(c.job),
            _ => None,
        };
        if let Some(job) = control.and_then(|j| self.jobs.get_mut(&j)) {
            job.stats.packets_received += 1;
            job.stats.bytes_received += len;
        }
        match msg {
            Message::Join(j) => self.handle_join(now, from, j),
            Message::Contribution(h, payload) => {
                self.handle_contribution(now, from, &h, payload, len)
            }
            Message::Heartbeat(c) => {
                if self.check_member(now, &from, &c).is_some() {
                    self.send(from, Message::Heartbeat(c));
                }
            }
            Message::Leave(c) => self.handle_leave(now, from, &c),
            Message::Regrant(c) => self.handle_regrant(now, from, &c),
            Message::Grant(_) | Message::Result(..) | Message::Error(_) => {
                self.drop_packet(None, DropReason::WrongDirection)
            }
        }
    }

    fn handle_join(&mut self, now: Instant, from: A, join: Join) {
        if let Some(key) = &self.config.admission_key {
            if !join.proves(key) {
                let text = "this aggregator admits only joins that prove its admission key \
                            (--admission-key)"
                    .to_string();
                return self.refuse(
                    from,
                    &join,
                    ErrorCode::NotAdmitted,
                    DropReason::NotAdmitted,
                    text,
                );
            }
        }
        let Some(codec) = codec::lookup(join.codec) else {
            // decode() only admits known codecs.
            return self.drop_packet(None, DropReason::Malformed);
        };
        let payload = codec::payload_bytes(codec, usize::from(join.chunk_elems));
        if join.world > self.config.max_world.min(codec.max_world()) {
            let text = format!(
                "world size {} is above this aggregator's limit for {} ({})",
                join.world,
                codec.name(),
                self.config.max_world.min(codec.max_world())
            );
            return self.refuse(
                from,
                &join,
                ErrorCode::NoCapacity,
                DropReason::NoCapacity,
                text,
            );
        }
        if DATA_HEADER_LEN + payload > MAX_DATAGRAM {
            let text = format!(
                "chunks of {} elements do not fit a datagram",
                join.chunk_elems
            );
            return self.refuse(
                from,
                &join,
                ErrorCode::NoCapacity,
                DropReason::NoCapacity,
                text,
            );
        }
        // An address is a member of at most one forming job: its join for another
        // forgets it there, so one source holds one forming job at most.
        self.forget_forming_member(&from, join.job);
        if !self.jobs.contains_key(&join.job) {
            if self.jobs.len() >= self.config.max_jobs && !self.evict_forming() {
                let text = format!("the aggregator holds {} jobs already", self.jobs.len());
                return self.refuse(
                    from,
                    &join,
                    ErrorCode::NoCapacity,
                    DropReason::NoCapacity,
                    text,
                );
            }
            // A new job with the id of an aborted one starts afresh.
            self.tombstones.remove(&join.job);
            let token = self.rng.random::<u64>();
            let mut job = Job::new(&join, codec, token);
            job.born = self.born;
            self.born += 1;
            self.jobs.insert(join.job, job);
        }
        let Some(job) = self.jobs.get_mut(&join.job) else {
            return;
        };
        if let Err(code) = job.check_join(&join, &from) {
            let (reason, text) = match code {
                ErrorCode::BadSecret => (DropReason::BadSecret, "wrong job secret".to_string()),
                ErrorCode::RankTaken => (
                    DropReason::RankTaken,
                    format!("rank {} of job {} is held by another address", join.rank, join.job),
                ),
                _ => (
                    DropReason::ParamMismatch,
                    format!(
                        "job {} runs world {} codec {} chunk {}; the join asked for world {} codec {} chunk {}",
                        job.id,
                        job.world,
                        job.codec.name(),
                        job.chunk_elems,
                        join.world,
                        codec.name(),
                        join.chunk_elems
                    ),
                ),
            };
            job.stats.drop(reason);
            return self.refuse(from, &join, code, reason, text);
        }
        let completed = job.admit(&join, from.clone(), now);
        if completed {
            let id = job.id;
            self.job_complete(id);
        } else if let Some(pool) = &job.pool {
            // A retransmitted join from a running job's rank: its grant was lost.
            let g = grant(&self.config, job, join.rank, pool.slots());
            self.send(from, Message::Grant(g));
        }
    }

    /// Forgets `from` in every forming job (not all ranks joined) but `except`, and
    /// forming jobs left with no rank.
    fn forget_forming_member(&mut self, from: &A, except: u32) {
        let mut emptied = Vec::new();
        for job in self.jobs.values_mut() {
            if job.id == except || job.complete() {
                continue;
            }
            for m in job.members.iter_mut() {
                if m.as_ref().is_some_and(|m| m.addr == *from) {
                    *m = None;
                }
            }
            if job.joined() == 0 {
                emptied.push(job.id);
            }
        }
        for id in emptied {
            self.jobs.remove(&id);
        }
    }

    /// Makes room for a new job by forgetting the oldest forming one (its ranks,
    /// still joining, create it again with their next join); false if every job
    /// present has all its ranks. Forming jobs cost a join each and can be made by
    /// anyone, so they never keep out a job that can run.
    fn evict_forming(&mut self) -> bool {
        let oldest = self
            .jobs
            .values()
            .filter(|j| !j.complete())
            .min_by_key(|j| j.born)
            .map(|j| j.id);
        let Some(id) = oldest else {
            return false;
        };
        self.jobs.remove(&id);
        self.stats.pending_evicted += 1;
        true
    }

    /// Validates a control message from a member; refreshes its liveness.
    fn check_member(&mut self, now: Instant, from: &A, c: &Control) -> Option<()> {
        let reason = match self.jobs.get_mut(&c.job) {
            None => {
                self.answer_tombstone(c.job, from);
                DropReason::UnknownJob
            }
            // The previous token stays good for control messages: a rank that has not
            // yet got its new grant still sends heartbeats, leaves and regrants with it.
            Some(job) if job.token != c.token && job.prev_token != Some(c.token) => {
                DropReason::BadToken
            }
            Some(job) => match job.members.get_mut(usize::from(c.rank)) {
                None => DropReason::RankOutOfRange,
                Some(Some(m)) if m.addr == *from => {
                    m.last_seen = now;
                    return Some(());
                }
                Some(_) => DropReason::NotMember,
            },
        };
        self.drop_packet(Some(c.job), reason);
        None
    }

    fn handle_leave(&mut self, now: Instant, from: A, c: &Control) {
        if self.check_member(now, &from, c).is_none() {
            return;
        }
        let Some(job) = self.jobs.get_mut(&c.job) else {
            return;
        };
        if let Some(Some(m)) = job.members.get_mut(usize::from(c.rank)) {
            m.left = true;
        }
        // Echo it: the rank stops resending its leave.
        self.outbox.push_back(Outgoing::Control {
            to: from,
            msg: Message::Leave(*c),
        });
        if job.members.iter().flatten().all(|m| m.left) {
            if let Some(job) = self.jobs.remove(&c.job) {
                self.events.push_back(Event::JobEnded {
                    job: job.id,
                    stats: Box::new(job.stats),
                });
                self.rebalance();
            }
        }
    }

    /// Answers a packet for a job that no longer exists with the reason it was aborted,
    /// if the sender was one of its ranks.
    fn answer_tombstone(&mut self, job: u32, from: &A) {
        if let Some(t) = self.tombstones.get(&job) {
            if let Some(&(_, nonce)) = t.members.iter().find(|(a, _)| a == from) {
                let msg = Message::Error(ErrorMsg {
                    nonce,
                    ..t.error.clone()
                });
                self.send(from.clone(), msg);
            }
        }
    }

    fn handle_contribution(
        &mut self,
        now: Instant,
        from: A,
        h: &DataHeader,
        payload: &[u8],
        len: u64,
    ) {
        let Some(job) = self.jobs.get_mut(&h.job) else {
            self.answer_tombstone(h.job, &from);
            return self.drop_packet(None, DropReason::UnknownJob);
        };
        job.stats.packets_received += 1;
        job.stats.bytes_received += len;
        let reason = 'check: {
            if job.token != h.token {
                // A packet of the pool before the last re-grant, late: harmless.
                if job.prev_token == Some(h.token) {
                    break 'check DropReason::Stale;
                }
                break 'check DropReason::BadToken;
            }
            let Some(member) = job.members.get_mut(usize::from(h.rank)) else {
                break 'check DropReason::RankOutOfRange;
            };
            match member {
                Some(m) if m.addr == from => m.last_seen = now,
                _ => break 'check DropReason::NotMember,
            }
            let Some(pool) = job.pool.as_mut() else {
                break 'check DropReason::NotRunning;
            };
            if h.codec != job.codec.id() {
                break 'check DropReason::CodecMismatch;
            }
            if h.count > job.chunk_elems {
                break 'check DropReason::CountTooLarge;
            }
            let s = u64::from(pool.slots());
            if u64::from(h.slot) >= s
                || u64::from(h.slot) != h.seq % s
                || u64::from(h.version) != (h.seq / s) % 2
            {
                break 'check DropReason::SlotOutOfRange;
            }
            let outcome = if h.flags & FLAG_PROBE != 0 {
                pool.probe(h.rank, h)
            } else if self.draining {
                if pool.result(h.seq).is_none() {
                    break 'check DropReason::Draining;
                }
                Outcome::AnswerCopy
            } else if self.backlogged {
                let marked = DataHeader {
                    flags: h.flags | FLAG_MARK,
                    ..*h
                };
                pool.contribute(h.rank, &marked, payload)
            } else {
                pool.contribute(h.rank, h, payload)
            };
            match outcome {
                Outcome::Added | Outcome::Completed => {
                    job.stats.contributions += 1;
                    self.stats.contributions += 1;
                    if outcome == Outcome::Completed {
                        job.stats.chunks_completed += 1;
                        self.stats.chunks_completed += 1;
                        self.outbox.push_back(Outgoing::Result {
                            job: h.job,
                            seq: h.seq,
                            dest: Dest::All(0),
                        });
                    } else if let Some(rank) = job.left_rank() {
                        // A chunk that needs a rank that has left can never complete.
                        self.abort_left(now, h.job, rank);
                    }
                    return;
                }
                Outcome::AnswerCopy => {
                    job.stats.copies_answered += 1;
                    self.stats.copies_answered += 1;
                    self.outbox.push_back(Outgoing::Result {
                        job: h.job,
                        seq: h.seq,
                        dest: Dest::Rank(h.rank),
                    });
                    return;
                }
                Outcome::Held | Outcome::Duplicate => {
                    if let Some(rank) = job.left_rank() {
                        // Waiting for a rank that has left: never completes. Say so
                        // now rather than hold the rank until its progress timeout.
                        self.abort_left(now, h.job, rank);
                        return;
                    }
                    // The rank's contribution is in and waits for others: say so, so
                    // that its next retransmission is a header-only probe.
                    job.stats.probes_held += 1;
                    self.stats.probes_held += 1;
                    let answer = DataHeader {
                        rank: job.world,
                        flags: FLAG_PROBE,
                        ..*h
                    };
                    let msg = Message::Result(answer, &[]);
                    self.outbox.push_back(Outgoing::Control { to: from, msg });
                    if outcome == Outcome::Held {
                        return;
                    }
                    DropReason::Duplicate
                }
                Outcome::Missing => DropReason::ProbeMissing,
                Outcome::Stale => DropReason::Stale,
                Outcome::Ahead => DropReason::Ahead,
                Outcome::Inconsistent(earlier) => {
                    // Honest ranks agree on every packet's length, scale and end unless
                    // their tensors differ: no allreduce of this job can be right. Both
                    // sides are named; neither is blamed, as either may be the odd one.
                    let aligned = job.codec.aligns_exponents();
                    let this = Sent {
                        rank: h.rank,
                        count: h.count,
                        scale_exp: h.scale_exp,
                        last: h.flags & FLAG_LAST != 0,
                    };
                    let text = format!(
                        "ranks {} and {} disagree on packet {} of job {}: {}, {}; do all \
                         ranks reduce tensors of the same length?",
                        earlier.rank,
                        h.rank,
                        h.seq,
                        h.job,
                        describe(&earlier, aligned),
                        describe(&this, aligned),
                    );
                    self.drop_packet(Some(h.job), DropReason::Inconsistent);
                    self.abort(now, h.job, ErrorCode::Inconsistent, u16::MAX, text);
                    return;
                }
            }
        };
        self.drop_packet(Some(h.job), reason);
    }

    /// Ends a job whose rank `rank` has left while a chunk still needs it.
    fn abort_left(&mut self, now: Instant, id: u32, rank: u16) {
        let text = format!("rank {rank} left job {id} before it finished");
        self.abort(now, id, ErrorCode::PeerLeft, rank, text);
    }

    /// Ends a job: every rank that joined is told why; the slots are freed.
    fn abort(&mut self, now: Instant, id: u32, code: ErrorCode, rank: u16, text: String) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        let error = ErrorMsg {
            job: id,
            rank,
            code,
            nonce: 0,
            text: text.clone(),
        };
        let members: Vec<(A, u64)> = job.live_members().map(|(a, n)| (a.clone(), n)).collect();
        for (to, nonce) in &members {
            let e = ErrorMsg {
                nonce: *nonce,
                ..error.clone()
            };
            self.send(to.clone(), Message::Error(e));
        }
        self.tombstones.remove(&id);
        if self.tombstones.len() >= self.config.max_tombstones.max(1) {
            // Every TTL is the same: the first to expire is the oldest.
            let oldest = self.tombstones.iter().min_by_key(|(_, t)| t.expires);
            if let Some(&oldest) = oldest.map(|(id, _)| id) {
                self.tombstones.remove(&oldest);
            }
        }
        self.tombstones.insert(
            id,
            Tombstone {
                error,
                members,
                expires: now + self.config.tombstone_ttl,
            },
        );
        self.events.push_back(Event::JobAborted {
            job: id,
            code,
            text,
        });
        self.rebalance();
    }

    /// Starts a graceful shutdown: from now on no chunk completes (contributions to
    /// open chunks are dropped as `draining`), while every completed chunk is still
    /// answered to a rank that missed its result. A driver that keeps serving for a
    /// few retransmission timeouts before [`Aggregator::shutdown`] thus leaves every
    /// rank with the same results, so ranks that move to a failover aggregator agree
    /// on how many allreduces they completed.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Aborts every job with [`ErrorCode::Shutdown`], telling every rank.
    pub fn shutdown(&mut self, now: Instant) {
        let mut ids = self.jobs();
        ids.sort_unstable();
        for id in ids {
            let text = "the aggregator is shutting down".to_string();
            self.abort(now, id, ErrorCode::Shutdown, u16::MAX, text);
        }
    }

    fn check_interval(&self) -> Duration {
        (self.config.silence_timeout / 8).max(Duration::from_millis(1))
    }

    /// When [`Aggregator::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_check
    }

    /// Finds silent ranks (aborting their jobs) and forgets old tombstones.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.next_check {
            Some(t) if t <= now => {}
            _ => return,
        }
        self.next_check = Some(now + self.check_interval());
        let deadline = now.checked_sub(self.config.silence_timeout);
        let mut silent = Vec::new();
        if let Some(deadline) = deadline {
            for job in self.jobs.values_mut() {
                if let Some(rank) = job.silent_rank(deadline) {
                    if job.running() {
                        silent.push((job.id, rank));
                    } else {
                        // A forming job forgets a rank that stopped trying to join.
                        job.members[usize::from(rank)] = None;
                    }
                }
            }
        }
        self.jobs.retain(|_, j| j.running() || j.joined() > 0);
        for (id, rank) in silent {
            let text = format!(
                "rank {rank} of job {id} sent nothing for {:.1} s",
                self.config.silence_timeout.as_secs_f64()
            );
            self.abort(now, id, ErrorCode::PeerSilent, rank, text);
        }
        self.tombstones.retain(|_, t| t.expires > now);
        // A waiting job may have lost a rank (it no longer claims a share).
        self.rebalance();
        if self.jobs.is_empty() && self.tombstones.is_empty() {
            self.next_check = None;
        }
    }

    /// Writes the next datagram to send into `buf` (cleared first) and returns its
    /// destination, or `None` when nothing is left to send.
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<A> {
        buf.clear();
        self.poll_transmit_append(buf)
    }

    /// Like [`Aggregator::poll_transmit`], but appends the datagram to `buf`, so that a
    /// driver can encode a whole batch into one arena.
    pub fn poll_transmit_append(&mut self, buf: &mut Vec<u8>) -> Option<A> {
        let (to, body) = self.poll_transmit_head(buf)?;
        if let Some(b) = body {
            buf.extend_from_slice(self.body(b));
        }
        Some(to)
    }

    /// Like [`Aggregator::poll_transmit_append`], but a result's payload is not copied:
    /// only the header is appended to `buf`, and the datagram is that header followed
    /// by [`Aggregator::body`] of the returned [`Body`]. A driver can so send one kept
    /// result to every rank straight from the slot (scatter-gather), where a copy per
    /// rank cost as much as the sum itself. Neither this call nor any other send call
    /// touches a pool or a job, so a body stays what it was (the bytes and the length
    /// its header announced) until the next input: a datagram, a timeout, a shutdown.
    pub fn poll_transmit_head(&mut self, buf: &mut Vec<u8>) -> Option<(A, Option<Body>)> {
        let start = buf.len();
        loop {
            buf.truncate(start);
            let sent = match self.outbox.front()? {
                Outgoing::Control { .. } => match self.outbox.pop_front() {
                    Some(Outgoing::Control { to, msg }) => {
                        msg.encode(buf);
                        Some((to, None))
                    }
                    _ => None,
                },
                &Outgoing::Result { job, seq, dest } => match self.group_of(job, dest) {
                    Some(to) => {
                        // Once, to the group that every rank joined.
                        self.outbox.pop_front();
                        let j = self.jobs.get_mut(&job);
                        let body = j.and_then(|j| encode_result_head(j, seq, false, buf));
                        body.map(|body| (to, Some(body)))
                    }
                    None => {
                        let (rank, single) = match dest {
                            Dest::Rank(r) => (r, true),
                            Dest::All(r) => (r, false),
                        };
                        let world = self.jobs.get(&job).map_or(0, |j| j.world);
                        if single || rank + 1 >= world {
                            self.outbox.pop_front();
                        } else if let Some(Outgoing::Result {
                            dest: Dest::All(r), ..
                        }) = self.outbox.front_mut()
                        {
                            *r += 1;
                        }
                        let sent = self.encode_rank_result_head(job, seq, rank, single, buf);
                        sent.map(|(to, body)| (to, Some(body)))
                    }
                },
            };
            if let Some((to, body)) = sent {
                self.stats.packets_sent += 1;
                self.stats.bytes_sent += (buf.len() - start + body.map_or(0, |b| b.len)) as u64;
                return Some((to, body));
            }
        }
    }

    /// The payload of a result whose header [`Aggregator::poll_transmit_head`] wrote:
    /// the slot's kept copy (empty if the job or the result is gone, which cannot
    /// happen between that call and this one, as neither changes the state machine).
    pub fn body(&self, b: Body) -> &[u8] {
        self.jobs
            .get(&b.job)
            .and_then(|j| j.pool.as_ref())
            .and_then(|p| p.result(b.seq))
            .map_or(&[][..], |(_, payload)| payload)
    }

    /// Where a result of job `id` for `dest` goes once for all ranks: the job's
    /// group's address, for a result not yet sent to any rank, if the job has one.
    fn group_of(&self, id: u32, dest: Dest) -> Option<A> {
        if !matches!(dest, Dest::All(0)) {
            return None;
        }
        let group = self.jobs.get(&id)?.group?;
        Some((self.groups.as_ref()?.addr)(group))
    }

    /// Encodes the header of the result of `seq` for `rank`, if the job, the rank and
    /// the result are all still there; the payload stays in the slot.
    fn encode_rank_result_head(
        &mut self,
        job: u32,
        seq: u64,
        rank: u16,
        from_copy: bool,
        buf: &mut Vec<u8>,
    ) -> Option<(A, Body)> {
        let job = self.jobs.get_mut(&job)?;
        let member = job.members.get(usize::from(rank))?.as_ref()?;
        if member.left {
            return None;
        }
        let to = member.addr.clone();
        Some((to, encode_result_head(job, seq, from_copy, buf)?))
    }

    /// The next job event, for logs.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

/// Encodes the header of the result of `seq` of `job` (the same bytes for every
/// rank), if the result is still there; the payload stays in the slot.
fn encode_result_head<A>(
    job: &mut Job<A>,
    seq: u64,
    from_copy: bool,
    buf: &mut Vec<u8>,
) -> Option<Body> {
    let (meta, payload) = job.pool.as_ref()?.result(seq)?;
    let body = Body {
        job: job.id,
        seq,
        len: payload.len(),
    };
    let mut flags = if from_copy { FLAG_FROM_COPY } else { 0 };
    if meta.marked {
        flags |= FLAG_MARK;
        job.stats.marks += 1;
    }
    if meta.retx {
        flags |= FLAG_RETX;
    }
    if meta.regrant {
        flags |= FLAG_REGRANT;
    }
    if meta.nonfinite {
        flags |= FLAG_NONFINITE;
    }
    let s = u64::from(job.pool.as_ref()?.slots());
    let h = DataHeader {
        job: job.id,
        rank: job.world,
        codec: job.codec.id(),
        flags,
        token: job.token,
        seq,
        slot: (seq % s) as u32,
        version: ((seq / s) % 2) as u8,
        scale_exp: meta.scale_exp,
        next_exp: meta.exp_max,
        count: meta.count,
    };
    let start = buf.len();
    wire::encode_result(&h, &[], buf);
    job.stats.packets_sent += 1;
    job.stats.bytes_sent += (buf.len() - start + body.len) as u64;
    Some(body)
}

fn grant<A: Clone + Eq>(config: &AggregatorConfig, job: &Job<A>, rank: u16, window: u32) -> Grant {
    Grant {
        job: job.id,
        rank,
        world: job.world,
        codec: job.codec.id(),
        chunk_elems: job.chunk_elems,
        window,
        token: job.token,
        nonce: job.nonce(rank),
        shard: config.shard,
        shards: config.shards,
        group: job.group,
    }
}

#[cfg(test)]
mod slot_tests;
#[cfg(test)]
mod tests;
