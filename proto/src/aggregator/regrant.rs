//! Starting jobs and re-sizing their pools under a slot memory budget.
//!
//! Without a budget (`AggregatorConfig::slot_memory` is `None`) a job gets the window
//! it asks for, up to `max_window`, when its last rank joins, and keeps it.
//!
//! With a budget, shares are recomputed ([`super::budget::fair_shares`]) whenever the
//! set of jobs changes (a job gets all its ranks, ends, is aborted) and whenever a pool
//! changes size, and applied thus:
//!
//! - A job above its share shrinks at its next allreduce boundary. A job below it
//!   grows there, as far as free memory allows; its growth is reserved at once so that
//!   nobody else takes it. Memory a shrinking job gives back counts as held until it
//!   has switched.
//! - A job whose ranks have all joined starts when memory for at least its minimal
//!   share is free (first come, first served), with its share or what is free if less,
//!   and grows later. Until then it waits: its ranks keep resending their joins and
//!   fail with `JoinTimeout` if that lasts longer than their join timeout. Waiting is
//!   bounded by the running jobs' next allreduce boundary, when they shrink to make
//!   room, unless they sit idle. A job whose minimal share cannot fit beside the
//!   minimal shares of the jobs present is refused at once (`NoCapacity`): waiting
//!   would not help until a job leaves, which may be never.
//!
//! # Re-sizing a pool without losing anything in flight
//!
//! Packet `seq` lives in slot `seq mod S`, version `(seq / S) mod 2`: changing `S`
//! in the middle of a stream would send packets of one chunk to different slots. So a
//! pool changes only at an allreduce boundary that every rank agrees on, found thus:
//!
//! 1. Once a re-grant is decided, the pool flags every chunk that completes
//!    (`FLAG_REGRANT` on its result). The flag is fixed when the chunk completes,
//!    and answers from the kept copy repeat it, so every rank sees the same flagged
//!    results: every rank needs every result of an allreduce to finish it.
//! 2. A rank that received a flagged result in an allreduce sends a `Regrant` (with
//!    the token in use) when that allreduce ends, and waits for its new grant before
//!    starting the next one; it resends the request until the grant comes.
//! 3. When every rank has asked, every rank has all results of that allreduce: no rank
//!    needs the old pool any more, for retransmissions or otherwise. The aggregator
//!    frees it, allocates the new one (empty) with a new token and sends every rank a
//!    grant; sequence numbers run on, and the new pool takes them from any start. (If
//!    the share moved back meanwhile, the pool stays and only the token changes.)
//!    Late packets with the old token are dropped as stale; a rank whose grant was
//!    lost asks again with the old token and is answered with the new grant.
//!
//! So one job never holds two pools, the budget is never exceeded, and the cost of a
//! re-grant is one round trip plus the ranks' skew at that boundary. A job that stops
//! calling allreduce without leaving keeps its pool until it runs again. A parent's job
//! whose members are rack aggregators keeps the pool it started with: racks follow
//! no re-grant (docs/protocol.md 8.5).

use std::time::Instant;

use super::budget::fair_shares;
use super::control::grant;
use super::slots::Level;
use super::{Aggregator, DropReason, Event, DATA_HEADER_LEN, MAX_DATAGRAM};
use crate::wire::{Control, ErrorCode, ErrorMsg, Message};

impl<A: Clone + Eq + std::fmt::Debug> Aggregator<A> {
    /// The last rank of job `id` joined: start it, make it wait, or refuse it.
    pub(super) fn job_complete(&mut self, now: Instant, id: u32) {
        let max_window = self.config.max_window;
        let arrival = self.arrivals;
        self.arrivals += 1;
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if let Some(((low, lc), (high, hc))) = job.diverged() {
            let text = format!(
                "ranks re-joined job {id} from different points after their aggregator \
                 failed: rank {low} had completed {lc} allreduces, rank {high} {hc}; \
                 resuming would mix two allreduces"
            );
            return self.refuse_job(id, ErrorCode::Diverged, DropReason::Diverged, text);
        }
        let memory_cap = self.config.max_job_memory.map_or(u32::MAX, |m| {
            (m / job.slot_bytes().max(1)).min(u32::MAX as usize) as u32
        });
        job.want = job
            .requested_window()
            .min(max_window)
            .min(memory_cap)
            .max(1);
        job.arrival = arrival;
        if self.parent.is_some() {
            // A partial sum takes up to 32 bits per element, whatever the codec, and a
            // width byte per 128 for the fixed-point ones (`partial::max_bytes`).
            let fits = |chunk: usize| {
                DATA_HEADER_LEN + crate::codec::partial::max_bytes(job.codec, chunk) <= MAX_DATAGRAM
            };
            let chunk = usize::from(job.chunk_elems);
            if !fits(chunk) {
                // Never more than 4 bytes an element fit, and every codec fits 16,256
                // (127 groups of 128): at most 111 steps.
                let bound = (MAX_DATAGRAM - DATA_HEADER_LEN) / crate::codec::PARTIAL_LANE_BYTES;
                let most = (1..chunk.min(bound + 1))
                    .rev()
                    .find(|&n| fits(n))
                    .unwrap_or(0);
                let text = format!(
                    "a rack aggregator sends each chunk's sum up in lanes of up to 4 bytes: \
                     chunks of {chunk} {} elements do not fit a datagram (at most {most})",
                    job.codec.name()
                );
                return self.refuse_job(id, ErrorCode::NoCapacity, DropReason::NoCapacity, text);
            }
            // A rack's pool follows the parent's grant.
            return self.join_parent(now, id);
        }
        let Some(budget) = self.config.slot_memory else {
            let window = job.want;
            return self.start(id, window);
        };
        let demand = job.demand();
        let others: Vec<usize> = self
            .jobs
            .values()
            .filter(|j| j.id != id && j.complete())
            .map(|j| j.demand().min_bytes())
            .collect();
        let need: usize = others.iter().sum::<usize>() + demand.min_bytes();
        if need > budget {
            let text = if others.is_empty() {
                format!(
                    "slot memory: job {id} needs at least {} slots of {} bytes ({} bytes), more than the aggregator's budget of {budget} bytes",
                    demand.min_slots(),
                    demand.slot_bytes,
                    demand.min_bytes()
                )
            } else {
                format!(
                    "slot memory: job {id} needs at least {} slots of {} bytes ({} bytes), but the budget of {budget} bytes holds the minimal shares of {} other job(s) ({} bytes); retry when a job has ended",
                    demand.min_slots(),
                    demand.slot_bytes,
                    demand.min_bytes(),
                    others.len(),
                    others.iter().sum::<usize>()
                )
            };
            return self.refuse_job(id, ErrorCode::NoCapacity, DropReason::NoCapacity, text);
        }
        self.rebalance();
    }

    /// Refuses a job whose ranks have all joined: each is told why; the job is forgotten
    /// (a later join starts it afresh).
    fn refuse_job(&mut self, id: u32, code: ErrorCode, reason: DropReason, text: String) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        for (rank, m) in job.members.iter().enumerate() {
            if let Some(m) = m {
                self.stats.drop(reason);
                let msg = Message::Error(ErrorMsg {
                    job: id,
                    // Cannot truncate: ranks are below the world size, a u16.
                    rank: rank as u16,
                    code,
                    nonce: m.nonce,
                    text: text.clone(),
                });
                self.send(m.addr.clone(), msg);
            }
        }
        self.events.push_back(Event::JobAborted {
            job: id,
            code,
            text,
        });
    }

    /// Gives job `id` a pool of `window` slots and every rank its grant.
    pub(super) fn start(&mut self, id: u32, window: u32) {
        let asks = self.jobs.get(&id).is_some_and(|j| j.all_take_groups());
        let group = if asks { self.take_group() } else { None };
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        job.group = group;
        job.pool = Some(job.new_pool(window, 0));
        self.events.push_back(Event::JobStarted {
            job: id,
            world: job.world,
            window,
            codec: job.codec.name(),
        });
        self.grant_all(id);
    }

    /// Sends every live rank of job `id` the job's grant.
    fn grant_all(&mut self, id: u32) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let window = job.slots();
        let grants: Vec<(A, _)> = job
            .members
            .iter()
            .enumerate()
            .filter_map(|(r, m)| {
                let m = m.as_ref().filter(|m| !m.left)?;
                Some((m.addr.clone(), grant(&self.config, job, r as u16, window)))
            })
            .collect();
        for (to, g) in grants {
            self.send(to, Message::Grant(g));
        }
    }

    /// Recomputes every job's share of the budget and acts on it: shrinks are decided,
    /// waiting jobs start where memory is free, growth is reserved where it is. See the
    /// module documentation.
    pub(super) fn rebalance(&mut self) {
        let Some(budget) = self.config.slot_memory else {
            return;
        };
        let mut ids: Vec<u32> = self
            .jobs
            .values()
            .filter(|j| j.complete())
            .map(|j| j.id)
            .collect();
        ids.sort_by_key(|id| self.jobs.get(id).map_or(0, |j| j.arrival));
        let demands: Vec<_> = ids
            .iter()
            .filter_map(|id| self.jobs.get(id).map(|j| j.demand()))
            .collect();
        let shares = fair_shares(budget, &demands);
        // Shrinks are decided at once; growth is released, to be reserved again below.
        // A job of racks keeps the pool it started with: racks follow no re-grant.
        for (id, &share) in ids.iter().zip(&shares) {
            if let Some(job) = self.jobs.get_mut(id) {
                if job.running() && job.level != Level::Top {
                    job.next = (share < job.slots()).then_some(share);
                }
            }
        }
        let mut held: usize = self.jobs.values().map(|j| j.held_bytes()).sum();
        // Waiting jobs, first come first served.
        for (id, &share) in ids.iter().zip(&shares) {
            let Some(job) = self.jobs.get(id).filter(|j| !j.running()) else {
                continue;
            };
            let (cost, min) = (job.slot_bytes().max(1), job.demand().min_slots());
            let free = (budget.saturating_sub(held) / cost).min(u32::MAX as usize) as u32;
            if free < min {
                break;
            }
            let window = share.min(free);
            held += window as usize * cost;
            self.start(*id, window);
        }
        // Growth, as far as free memory goes.
        for (id, &share) in ids.iter().zip(&shares) {
            let Some(job) = self
                .jobs
                .get_mut(id)
                .filter(|j| j.running() && j.level != Level::Top)
            else {
                continue;
            };
            let (cost, slots) = (job.slot_bytes().max(1), job.slots());
            if share > slots {
                let free = (budget.saturating_sub(held) / cost).min(u32::MAX as usize) as u32;
                let grow = share.min(slots.saturating_add(free));
                if grow > slots {
                    job.next = Some(grow);
                    held += (grow - slots) as usize * cost;
                }
            }
        }
        for job in self.jobs.values_mut() {
            let change = job.next.is_some();
            if let Some(pool) = job.pool.as_mut() {
                // Once announced, the re-grant happens (perhaps to the same size): the
                // ranks are already on their way to ask for it.
                pool.regrant = change || pool.regrant_announced;
            }
        }
    }

    /// A rank asks for its job's new grant between two allreduces.
    pub(super) fn handle_regrant(&mut self, now: Instant, from: A, c: &Control) {
        if self.check_member(now, &from, c).is_none() {
            return;
        }
        let Some(job) = self.jobs.get_mut(&c.job) else {
            return;
        };
        let Some(pool) = job.pool.as_ref() else {
            return self.drop_packet(Some(c.job), DropReason::NotRunning);
        };
        let window = pool.slots();
        if c.token != job.token || !pool.regrant_announced {
            // Its grant was lost (it asks with the old token), or nothing changes:
            // the grant in force.
            let g = grant(&self.config, job, c.rank, window);
            return self.send(from, Message::Grant(g));
        }
        if let Some(rank) = job.left_rank() {
            return self.abort_left(now, c.job, rank);
        }
        if let Some(r) = job.regrant_ready.get_mut(usize::from(c.rank)) {
            *r = true;
        }
        if job.regrant_ready.iter().all(|r| *r) {
            self.switch(c.job);
        }
    }

    /// Every rank of job `id` asked for its re-grant: the pool moves to its new size
    /// (a new pool and token), and every rank gets its grant.
    fn switch(&mut self, id: u32) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let Some(old) = job.pool.as_mut() else {
            return;
        };
        let window = job.next.take().unwrap_or(old.slots());
        job.regrant_ready.fill(false);
        // A new token even for the same window: a rank takes only a grant with a token
        // it has not used, so a late copy of an old grant is never taken for this one.
        job.prev_token = Some(job.token);
        job.token = rand::Rng::random(&mut self.rng);
        if window == old.slots() {
            // Nothing to change after all (the share moved back): every rank is past
            // every chunk of the pool, which stays as it is.
            old.regrant = false;
            old.regrant_announced = false;
        } else {
            // The stream runs on from the first packet of the next allreduce.
            let start = old.next_open();
            job.pool = Some(job.new_pool(window, start));
        }
        self.events.push_back(Event::Regranted { job: id, window });
        self.grant_all(id);
        self.rebalance();
    }
}
