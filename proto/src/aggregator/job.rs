//! One job as the aggregator sees it: its parameters, its members and, once every rank
//! has joined, its slot pool.

use std::time::Instant;

use super::slots::SlotPool;
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
}

/// A job: created by its first join, running once all ranks have joined.
#[derive(Debug)]
pub(crate) struct Job<A> {
    pub id: u32,
    pub world: u16,
    pub codec: &'static dyn Codec,
    pub chunk_elems: u16,
    pub secret: Vec<u8>,
    pub token: u64,
    pub members: Vec<Option<Member<A>>>,
    /// Allocated when the last rank joins.
    pub pool: Option<SlotPool>,
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
            codec,
            chunk_elems: join.chunk_elems,
            secret: join.secret.clone(),
            token,
            members: vec![None; usize::from(join.world)],
            pool: None,
            stats: Stats::default(),
        }
    }

    pub fn running(&self) -> bool {
        self.pool.is_some()
    }

    /// Checks a join against the job: the error to answer with, if any.
    pub fn check_join(&self, join: &Join, from: &A) -> Result<(), ErrorCode> {
        if !same_secret(&self.secret, &join.secret) {
            return Err(ErrorCode::BadSecret);
        }
        if join.world != self.world
            || join.codec != self.codec.id()
            || join.chunk_elems != self.chunk_elems
        {
            return Err(ErrorCode::ParamMismatch);
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
        let was_full = self.joined() == usize::from(self.world);
        self.members[usize::from(join.rank)] = Some(Member {
            addr: from,
            last_seen: now,
            window: join.window,
            left: false,
        });
        !was_full && self.joined() == usize::from(self.world)
    }

    pub fn joined(&self) -> usize {
        self.members.iter().filter(|m| m.is_some()).count()
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

    /// Addresses of ranks that joined and have not left.
    pub fn live_addrs(&self) -> impl Iterator<Item = &A> {
        self.members
            .iter()
            .flatten()
            .filter(|m| !m.left)
            .map(|m| &m.addr)
    }
}
