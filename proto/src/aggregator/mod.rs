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
//!
//! This file holds the types and the entry points; the work is in `control.rs` (joins,
//! grants, leaves, aborts, tombstones, timers, shutdown), `data.rs` (contributions
//! summed into slots), `transmit.rs` (what goes out, and to whom), `slots.rs` (a job's
//! slot pool) and `job.rs` (a job's members).

pub mod budget;
mod control;
mod data;
mod hierarchy;
mod job;
mod regrant;
mod slots;
mod stats;
mod transmit;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

pub use budget::MIN_SLOTS;
pub use hierarchy::rack_ranks;
pub use slots::{kept_bytes, slot_bytes};
pub use stats::{DropReason, Stats};

use crate::codec;
use crate::wire::{
    self, Control, DataHeader, ErrorCode, ErrorMsg, Grant, Join, Message, DATA_HEADER_LEN,
    FLAG_FROM_COPY, FLAG_LAST, FLAG_MARK, FLAG_NONFINITE, FLAG_PROBE, FLAG_REGRANT, FLAG_RETX,
    MAX_DATAGRAM,
};
use job::Job;
use slots::{Level, Outcome, Sent};

/// The most jobs an aggregator holds at once unless told otherwise
/// ([`AggregatorConfig::max_jobs`]).
pub const DEFAULT_MAX_JOBS: usize = 64;

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
            max_jobs: DEFAULT_MAX_JOBS,
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
    /// A rack's partial sum of a chunk, to the parent, encoded from the slot at send
    /// time; `resend` when a rank's retransmission asked for it again.
    Partial { job: u32, seq: u64, resend: bool },
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
    /// The parent, where this is a rack aggregator ([`Aggregator::set_parent`]).
    parent: Option<hierarchy::Parent<A>>,
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
            parent: None,
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
        if self.is_parent(&from) {
            return self.handle_parent(now, msg);
        }
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
                self.handle_contribution(now, from, &h, payload, len, false)
            }
            Message::Partial(h, payload) => {
                self.handle_contribution(now, from, &h, payload, len, true)
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

    /// The next job event, for logs.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod slot_tests;
#[cfg(test)]
mod tests;
