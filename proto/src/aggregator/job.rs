//! One job as the aggregator sees it: its parameters, its members and, once every rank
//! has joined (and, with a slot memory budget, memory is free for it), its slot pool;
//! while its pool is being re-sized, the window it moves to and the ranks that have
//! asked for it.

use std::ops::Range;
use std::time::Instant;

use super::budget::Demand;
use super::slots::{kept_bytes, slot_bytes, Level, SlotPool};
use super::stats::Stats;
use crate::codec::Codec;
use crate::wire::{ErrorCode, Join};

/// A rank that joined.
#[derive(Debug, Clone)]
pub(crate) struct Member<A> {
    /// Where the rank's packets come from and its results go.
    pub addr: A,
    /// When the aggregator last heard from it.
    pub last_seen: Instant,
    /// The window the rank asked for.
    pub window: u32,
    /// It sent a leave.
    pub left: bool,
    /// It can take results sent to a group ([`Join::groups`]).
    pub groups: bool,
    /// The nonce of its join, which its grants and errors carry ([`Join::nonce`]).
    pub nonce: u64,
    /// Allreduces it completed before this join ([`Join::completed`]).
    pub completed: u64,
}

/// A rack aggregator's membership of a job's upper level at its parent
/// (docs/protocol.md 8.5).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Upper {
    /// The nonce of its join at the parent.
    pub nonce: u64,
    /// The parent's grant: its session token and window. `None` until it comes.
    pub grant: Option<(u64, u32)>,
    /// When the parent was last heard from (or the join first sent).
    pub last_heard: Instant,
    /// When this rack last sent the parent anything.
    pub last_sent: Instant,
}

/// A job: created by its first join, running once all ranks have joined.
#[derive(Debug)]
pub(crate) struct Job<A> {
    pub id: u32,
    /// Its members' number: the job's ranks, a parent's racks.
    pub world: u16,
    /// The world size the job's ranks quantize with, which the codec sums for: `world`
    /// but at a parent, whose members are racks ([`Join::job_world`]).
    pub sum_world: u16,
    /// The ranks that join here: all of them, or a rack's block.
    pub ranks: Range<u16>,
    pub level: Level,
    /// A rack's membership at its parent.
    pub upper: Option<Upper>,
    pub codec: &'static dyn Codec,
    pub chunk_elems: u16,
    pub secret: Vec<u8>,
    pub token: u64,
    /// The token of the pool before the last re-grant: its late packets are stale, not
    /// forged, and a rank whose new grant was lost asks again with it.
    pub prev_token: Option<u64>,
    pub members: Vec<Option<Member<A>>>,
    /// Allocated when the last rank joins (with a budget: once memory is free for it).
    pub pool: Option<SlotPool>,
    /// Slots it asks for: the smallest window its ranks asked for, capped by the
    /// aggregator's largest window. Set when the last rank joins.
    pub want: u32,
    /// The order in which jobs got all their ranks: waiting jobs start first come,
    /// first served.
    pub arrival: u64,
    /// The window its pool moves to at the next re-grant (with a budget), if it changes.
    /// Memory is counted for the larger of this and the pool until then.
    pub next: Option<u32>,
    /// Ranks that asked for the re-grant announced by flagged results: once every rank
    /// has, none needs the old pool any more.
    pub regrant_ready: Vec<bool>,
    /// The group its results go to, once each, instead of to every rank: chosen when
    /// it starts, if the driver offers groups and every rank asked for them.
    pub group: Option<u32>,
    /// The order of creation among the aggregator's jobs (oldest forming job first
    /// to go when the job table is full).
    pub born: u64,
    pub stats: Stats,
}

/// Compares secrets in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<A: Clone + Eq> Job<A> {
    pub fn new(join: &Join, codec: &'static dyn Codec, token: u64) -> Self {
        Self {
            id: join.job,
            world: join.world,
            sum_world: join.job_world.unwrap_or(join.world),
            ranks: 0..join.world,
            level: if join.job_world.is_some() {
                Level::Top
            } else {
                Level::Flat
            },
            upper: None,
            codec,
            chunk_elems: join.chunk_elems,
            secret: join.secret.clone(),
            token,
            prev_token: None,
            members: vec![None; usize::from(join.world)],
            pool: None,
            want: 1,
            arrival: 0,
            next: None,
            regrant_ready: vec![false; usize::from(join.world)],
            group: None,
            born: 0,
            stats: Stats::default(),
        }
    }

    pub fn running(&self) -> bool {
        self.pool.is_some()
    }

    /// Every rank has joined (the job runs, or waits for slot memory).
    pub fn complete(&self) -> bool {
        self.joined() == self.ranks.len()
    }

    /// A pool of `slots` slots for this job's level, its stream starting at `start`.
    pub fn new_pool(&self, slots: u32, start: u64) -> SlotPool {
        let pool = SlotPool::new(
            slots,
            usize::from(self.chunk_elems),
            self.codec,
            self.sum_world,
            start,
        );
        match self.level {
            Level::Flat => pool,
            // Cannot truncate: a block of ranks below a u16 world.
            level => pool.at_level(level, self.ranks.len() as u16),
        }
    }

    /// The index among the pool's members of rank `rank` (a member of this job).
    pub fn member_index(&self, rank: u16) -> u16 {
        rank.saturating_sub(self.ranks.start)
    }

    /// Bytes one slot of this job costs.
    pub fn slot_bytes(&self) -> usize {
        slot_bytes(
            usize::from(self.chunk_elems),
            kept_bytes(self.codec, usize::from(self.chunk_elems)),
            self.world,
        )
    }

    /// Its claim on a slot memory budget.
    pub fn demand(&self) -> Demand {
        Demand {
            slot_bytes: self.slot_bytes(),
            want: self.want,
        }
    }

    /// Slots of its pool now (0 while it waits).
    pub fn slots(&self) -> u32 {
        self.pool.as_ref().map_or(0, |p| p.slots())
    }

    /// Bytes of the budget it holds: its pool, or the pool it grows to at its next
    /// re-grant if larger.
    pub fn held_bytes(&self) -> usize {
        self.slots().max(self.next.unwrap_or(0)) as usize * self.slot_bytes()
    }

    /// Checks a join against the job: the error to answer with, if any.
    pub fn check_join(&self, join: &Join, from: &A) -> Result<(), ErrorCode> {
        if !same_secret(&self.secret, &join.secret) {
            return Err(ErrorCode::BadSecret);
        }
        if join.world != self.world
            || join.codec != self.codec.id()
            || join.chunk_elems != self.chunk_elems
            || join.job_world.is_some() != (self.level == Level::Top)
            || join.job_world.is_some_and(|w| w != self.sum_world)
        {
            return Err(ErrorCode::ParamMismatch);
        }
        if !self.ranks.contains(&join.rank) {
            return Err(ErrorCode::RankOutOfRange);
        }
        match &self.members[usize::from(join.rank)] {
            // A rank that restarted on another address may take its place again only
            // once the aggregator has forgotten the old one (silence timeout).
            Some(m) if m.addr != *from => Err(ErrorCode::RankTaken),
            _ => Ok(()),
        }
    }

    /// Records the joining rank. Returns true when this join completed the job.
    pub fn admit(&mut self, join: &Join, from: A, now: Instant) -> bool {
        let was_full = self.complete();
        self.members[usize::from(join.rank)] = Some(Member {
            addr: from,
            last_seen: now,
            window: join.window,
            left: false,
            groups: join.groups,
            nonce: join.nonce,
            completed: join.completed,
        });
        !was_full && self.complete()
    }

    pub fn joined(&self) -> usize {
        self.members.iter().filter(|m| m.is_some()).count()
    }

    /// Every rank joined and can take results sent to a group.
    pub fn all_take_groups(&self) -> bool {
        self.members
            .iter()
            .all(|m| m.as_ref().is_some_and(|m| m.groups))
    }

    /// The smallest window any rank asked for.
    pub fn requested_window(&self) -> u32 {
        self.members
            .iter()
            .flatten()
            .map(|m| m.window)
            .min()
            .unwrap_or(1)
    }

    /// The first rank (not yet left) silent since before `deadline`.
    pub fn silent_rank(&self, deadline: Instant) -> Option<u16> {
        self.members
            .iter()
            .position(|m| {
                m.as_ref()
                    .is_some_and(|m| !m.left && m.last_seen < deadline)
            })
            .map(|r| r as u16)
    }

    /// The first rank that left, if any.
    pub fn left_rank(&self) -> Option<u16> {
        self.members
            .iter()
            .position(|m| m.as_ref().is_some_and(|m| m.left))
            .map(|r| r as u16)
    }

    /// Addresses and join nonces of ranks that joined and have not left.
    pub fn live_members(&self) -> impl Iterator<Item = (&A, u64)> {
        self.members
            .iter()
            .flatten()
            .filter(|m| !m.left)
            .map(|m| (&m.addr, m.nonce))
    }

    /// The nonce of rank `rank`'s join (0 if it has not joined).
    pub fn nonce(&self, rank: u16) -> u64 {
        self.members
            .get(usize::from(rank))
            .and_then(|m| m.as_ref())
            .map_or(0, |m| m.nonce)
    }

    /// Two ranks that reported different counts of completed allreduces when they
    /// joined, with their counts: (rank, completed) of the lowest count and of the
    /// highest, if they differ.
    pub fn diverged(&self) -> Option<((u16, u64), (u16, u64))> {
        let counts = self
            .members
            .iter()
            .enumerate()
            .filter_map(|(r, m)| Some((r as u16, m.as_ref()?.completed)));
        let low = counts.clone().min_by_key(|c| c.1)?;
        let high = counts.max_by_key(|c| c.1)?;
        (low.1 != high.1).then_some((low, high))
    }
}
