//! The aggregator's control plane: joins and grants, refusals, leaves, aborts and
//! the tombstones that answer for ended jobs, silence timers, drain and shutdown.

use super::*;

impl<A: Clone + Eq + std::fmt::Debug> Aggregator<A> {
    pub(super) fn refuse(
        &mut self,
        to: A,
        join: &Join,
        code: ErrorCode,
        reason: DropReason,
        text: String,
    ) {
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

    pub(super) fn handle_join(&mut self, now: Instant, from: A, join: Join) {
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
            if join.job_world.is_some() && self.parent.is_some() {
                let text = "this is a rack aggregator: it takes ranks, not racks (two levels \
                            at most)"
                    .to_string();
                return self.refuse(
                    from,
                    &join,
                    ErrorCode::ParamMismatch,
                    DropReason::ParamMismatch,
                    text,
                );
            }
            // A new job with the id of an aborted one starts afresh.
            self.tombstones.remove(&join.job);
            let token = self.rng.random::<u64>();
            let mut job = Job::new(&join, codec, token);
            if let Some(p) = &self.parent {
                job.level = super::slots::Level::Rack;
                job.ranks = super::hierarchy::rack_ranks(join.world, p.rack, p.racks);
            }
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
                ErrorCode::RankOutOfRange => (
                    DropReason::RankOutOfRange,
                    format!(
                        "rank {} of job {} belongs to another rack: this rack aggregator \
                         serves ranks {} to {}",
                        join.rank,
                        join.job,
                        job.ranks.start,
                        job.ranks.end.saturating_sub(1)
                    ),
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
            self.job_complete(now, id);
        } else if let Some(pool) = &job.pool {
            // A retransmitted join from a running job's rank: its grant was lost.
            let g = grant(&self.config, job, join.rank, pool.slots());
            self.send(from, Message::Grant(g));
        }
    }

    /// Forgets `from` in every forming job (not all ranks joined) but `except`, and
    /// forming jobs left with no rank.
    pub(super) fn forget_forming_member(&mut self, from: &A, except: u32) {
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
    pub(super) fn evict_forming(&mut self) -> bool {
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
    pub(super) fn check_member(&mut self, now: Instant, from: &A, c: &Control) -> Option<()> {
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

    pub(super) fn handle_leave(&mut self, now: Instant, from: A, c: &Control) {
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
                self.leave_parent(&job);
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
    pub(super) fn answer_tombstone(&mut self, job: u32, from: &A) {
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

    /// What a job's members are, in words: ranks, or a parent's racks.
    pub(super) fn member_word(&self, id: u32) -> &'static str {
        match self.jobs.get(&id) {
            Some(j) if j.level == super::slots::Level::Top => "rack",
            _ => "rank",
        }
    }

    /// Ends a job whose rank `rank` has left while a chunk still needs it.
    pub(super) fn abort_left(&mut self, now: Instant, id: u32, rank: u16) {
        let member = self.member_word(id);
        let text = format!("{member} {rank} left job {id} before it finished");
        self.abort(now, id, ErrorCode::PeerLeft, rank, text);
    }

    /// Ends a job: every rank that joined is told why; the slots are freed.
    pub(super) fn abort(
        &mut self,
        now: Instant,
        id: u32,
        code: ErrorCode,
        rank: u16,
        text: String,
    ) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        // The parent's other racks hear of it from the parent.
        self.leave_parent(&job);
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

    pub(super) fn check_interval(&self) -> Duration {
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
        self.parent_timers(now);
        for (id, rank) in silent {
            let text = format!(
                "{} {rank} of job {id} sent nothing for {:.1} s",
                self.member_word(id),
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
}

pub(super) fn grant<A: Clone + Eq>(
    config: &AggregatorConfig,
    job: &Job<A>,
    rank: u16,
    window: u32,
) -> Grant {
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
