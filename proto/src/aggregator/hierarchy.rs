//! Aggregators in two levels (docs/protocol.md 8.5): a rack aggregator serves a
//! block of each job's ranks and joins the same job at its parent as one member of
//! the upper level.
//!
//! Its ranks see no difference: they join the rack aggregator as they would a flat
//! one and get the same grants and results. The rack sums their contributions to a
//! chunk, sends the sum up unrounded as a partial sum ([`Message::Partial`]), and
//! sends the parent's result down as the chunk's result, keeping it to answer
//! retransmissions. It keeps no timers of its own for the chunks: a rank whose timer
//! runs out while its chunk waits for the parent retransmits, and the rack then sends
//! the partial sum up again (the parent answers a partial it already holds from its
//! copy, or says it holds it). Its job's pool follows the parent's grant.
//!
//! The parent takes a rack's join ([`Join::job_world`]) as a member of a job whose
//! members are racks, adds their partial sums (`codec::partial`) and stores the
//! result for the job's whole world, as a flat aggregator summing every rank would.

use std::ops::Range;

use super::job::Upper;
use super::*;

/// Where a rack aggregator's parent is, and which rack it is.
#[derive(Debug, Clone)]
pub(super) struct Parent<A> {
    pub addr: A,
    pub rack: u16,
    pub racks: u16,
}

/// The block of a job of `world` ranks that rack `rack` of `racks` serves: ranks
/// `rack * world / racks` up to `(rack + 1) * world / racks` (rounded down), so that
/// every rank has one rack and the blocks differ by one rank at most.
pub fn rack_ranks(world: u16, rack: u16, racks: u16) -> Range<u16> {
    let (w, r, n) = (u32::from(world), u32::from(rack), u32::from(racks.max(1)));
    // Cannot truncate: each bound is at most `world`.
    (r * w / n) as u16..((r + 1) * w / n) as u16
}

impl<A: Clone + Eq + std::fmt::Debug> Aggregator<A> {
    /// Makes this aggregator rack `rack` of `racks` under the parent at `addr`: every
    /// job it serves from now on takes rack `rack`'s block of ranks ([`rack_ranks`])
    /// and joins the same job at the parent. Its jobs' pools follow the parent's
    /// grants, so it keeps no slot memory budget of its own. Returns false, changing
    /// nothing, for a rack outside `0..racks`.
    pub fn set_parent(&mut self, addr: A, rack: u16, racks: u16) -> bool {
        if rack >= racks {
            return false;
        }
        self.parent = Some(Parent { addr, rack, racks });
        self.config.slot_memory = None;
        self.config.max_job_memory = None;
        true
    }

    /// The parent's address, if this is a rack aggregator.
    pub fn parent(&self) -> Option<&A> {
        self.parent.as_ref().map(|p| &p.addr)
    }

    /// Every rank of rack job `id` has joined: join the job at the parent (again,
    /// until the grant comes, from the timer).
    pub(super) fn join_parent(&mut self, now: Instant, id: u32) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let rng = &mut self.rng;
        let upper = job.upper.get_or_insert_with(|| Upper {
            nonce: rng.random::<u64>(),
            grant: None,
            last_heard: now,
            last_sent: now,
        });
        upper.last_sent = now;
        let nonce = upper.nonce;
        let completed = job.members.iter().flatten().map(|m| m.completed).max();
        let Some(p) = &self.parent else {
            return;
        };
        let mut join = Join {
            job: id,
            rank: p.rack,
            world: p.racks,
            codec: job.codec.id(),
            chunk_elems: job.chunk_elems,
            window: job.want,
            secret: job.secret.clone(),
            groups: false,
            nonce,
            completed: completed.unwrap_or(0),
            proof: None,
            job_world: Some(job.world),
        };
        // A cluster's aggregators share one admission key: the rack proves it upward
        // as its ranks proved it here.
        if let Some(key) = &self.config.admission_key {
            join.prove(key);
        }
        let to = p.addr.clone();
        self.send(to, Message::Join(join));
    }

    /// Tells the parent that this rack is done with job `job` (it ended or was
    /// aborted here), if it had joined there.
    pub(super) fn leave_parent(&mut self, job: &Job<A>) {
        let (Some(p), Some(upper)) = (&self.parent, &job.upper) else {
            return;
        };
        let Some((token, _)) = upper.grant else {
            return;
        };
        let c = Control {
            job: job.id,
            rank: p.rack,
            token,
        };
        let to = p.addr.clone();
        self.send(to, Message::Leave(c));
    }

    /// Whether `from` is the parent.
    pub(super) fn is_parent(&self, from: &A) -> bool {
        self.parent.as_ref().is_some_and(|p| p.addr == *from)
    }

    /// A message from the parent: a grant, a result, an error, an echo.
    pub(super) fn handle_parent(&mut self, now: Instant, msg: Message<'_>) {
        let id = match &msg {
            Message::Grant(g) => g.job,
            Message::Result(h, _) => h.job,
            Message::Error(e) => e.job,
            Message::Heartbeat(c) | Message::Leave(c) => c.job,
            _ => return self.drop_packet(None, DropReason::WrongDirection),
        };
        let Some(upper) = self.jobs.get(&id).and_then(|j| j.upper) else {
            // The echo of the leave this rack sent as the job ended here is expected.
            if matches!(msg, Message::Leave(_)) {
                return;
            }
            return self.drop_packet(None, DropReason::UnknownJob);
        };
        let token_ok = |t: u64| upper.grant.is_some_and(|(token, _)| token == t);
        match msg {
            Message::Grant(g) if g.nonce == upper.nonce => self.parent_grant(now, &g),
            Message::Result(h, payload) if token_ok(h.token) => {
                let Some(job) = self.jobs.get_mut(&id) else {
                    return;
                };
                if let Some(u) = job.upper.as_mut() {
                    u.last_heard = now;
                }
                if h.flags & FLAG_PROBE != 0 {
                    // The parent holds the partial sum and waits for other racks.
                    return;
                }
                if h.codec != job.codec.id() {
                    return self.drop_packet(Some(id), DropReason::CodecMismatch);
                }
                let Some(pool) = job.pool.as_mut() else {
                    return self.drop_packet(Some(id), DropReason::NotRunning);
                };
                if !pool.put_result(&h, payload) {
                    // A second copy, or one that does not fit the chunk.
                    return self.drop_packet(Some(id), DropReason::Duplicate);
                }
                job.stats.chunks_completed += 1;
                self.stats.chunks_completed += 1;
                self.outbox.push_back(Outgoing::Result {
                    job: id,
                    seq: h.seq,
                    dest: Dest::All(0),
                });
            }
            Message::Error(e) if e.nonce == upper.nonce => {
                let text = format!("the parent aggregator ended job {id}: {}", e.text);
                self.abort(now, id, e.code, e.rank, text);
            }
            Message::Heartbeat(c) | Message::Leave(c) if token_ok(c.token) => {
                self.heard_parent(now, id)
            }
            _ => self.drop_packet(Some(id), DropReason::BadToken),
        }
    }

    fn heard_parent(&mut self, now: Instant, id: u32) {
        if let Some(u) = self.jobs.get_mut(&id).and_then(|j| j.upper.as_mut()) {
            u.last_heard = now;
        }
    }

    /// The parent's grant for a rack job: the job starts with the parent's window (a
    /// lost grant's copy changes nothing). A rack follows no re-sizing: a grant with
    /// another window for a running job aborts it.
    fn parent_grant(&mut self, now: Instant, g: &Grant) {
        let Some(job) = self.jobs.get_mut(&g.job) else {
            return;
        };
        let Some(upper) = job.upper.as_mut() else {
            return;
        };
        upper.last_heard = now;
        let window = g.window.min(self.config.max_window).max(1);
        match upper.grant {
            Some((_, w)) if w == g.window => {
                upper.grant = Some((g.token, g.window));
            }
            Some(_) => {
                let text = format!(
                    "the parent aggregator re-sized job {}'s pool, which a rack aggregator \
                     does not follow",
                    g.job
                );
                self.abort(now, g.job, ErrorCode::ParentLost, u16::MAX, text);
            }
            None => {
                upper.grant = Some((g.token, g.window));
                self.start(g.job, window);
            }
        }
    }

    /// Rack jobs: joins resent until the parent's grant comes, heartbeats to the
    /// parent, and a parent silent for the silence timeout after its grant aborts the
    /// job.
    pub(super) fn parent_timers(&mut self, now: Instant) {
        let Some(p) = self.parent.clone() else {
            return;
        };
        let silence = self.config.silence_timeout;
        let beat = silence / 4;
        let mut lost = Vec::new();
        let mut rejoin = Vec::new();
        let mut beats = Vec::new();
        for job in self.jobs.values_mut() {
            let Some(u) = job.upper.as_mut() else {
                continue;
            };
            // Before its grant, the parent waits for the other racks and says nothing:
            // the ranks' join timeout bounds that wait.
            if u.grant.is_some() && now.saturating_duration_since(u.last_heard) > silence {
                lost.push(job.id);
                continue;
            }
            if now.saturating_duration_since(u.last_sent) < beat {
                continue;
            }
            match u.grant {
                None => rejoin.push(job.id),
                Some((token, _)) => {
                    u.last_sent = now;
                    beats.push(Control {
                        job: job.id,
                        rank: p.rack,
                        token,
                    });
                }
            }
        }
        for id in rejoin {
            self.join_parent(now, id);
        }
        for c in beats {
            self.send(p.addr.clone(), Message::Heartbeat(c));
        }
        for id in lost {
            let text = format!(
                "the parent aggregator of job {id} sent nothing for {:.1} s",
                silence.as_secs_f64()
            );
            self.abort(now, id, ErrorCode::ParentLost, u16::MAX, text);
        }
    }

    /// Encodes rack job `id`'s partial sum of chunk `seq` for the parent into `buf`,
    /// if the chunk still waits for the parent's result; `resend` when a rank's
    /// retransmission asked for it again.
    pub(super) fn encode_partial(
        &mut self,
        id: u32,
        seq: u64,
        resend: bool,
        buf: &mut Vec<u8>,
    ) -> Option<A> {
        let p = self.parent.as_ref()?;
        let job = self.jobs.get_mut(&id)?;
        let (token, window) = job.upper.as_ref()?.grant?;
        let pool = job.pool.as_mut()?;
        let start = buf.len();
        buf.resize(start + DATA_HEADER_LEN, 0);
        let Some(meta) = pool.partial(seq, buf) else {
            buf.truncate(start);
            return None;
        };
        let bit = |on: bool, flag: u8| if on { flag } else { 0 };
        let flags = bit(meta.last, FLAG_LAST)
            | bit(meta.marked, FLAG_MARK)
            | bit(meta.retx || resend, FLAG_RETX)
            | bit(meta.nonfinite, FLAG_NONFINITE);
        let s = u64::from(window.max(1));
        let h = DataHeader {
            job: id,
            rank: p.rack,
            codec: job.codec.id(),
            flags,
            token,
            seq,
            slot: (seq % s) as u32,
            version: ((seq / s) % 2) as u8,
            scale_exp: if job.codec.aligns_exponents() {
                meta.align[0].top
            } else {
                meta.scale_exp
            },
            next_exp: meta.exp_max,
            count: meta.count,
        };
        let mut head = [0u8; DATA_HEADER_LEN];
        wire::write_partial_header(&h, &mut head);
        buf[start..start + DATA_HEADER_LEN].copy_from_slice(&head);
        job.stats.packets_sent += 1;
        job.stats.bytes_sent += (buf.len() - start) as u64;
        Some(p.addr.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rack_blocks_cover_every_rank_once() {
        for world in 1..40u16 {
            for racks in 1..=world.min(9) {
                let mut next = 0;
                for rack in 0..racks {
                    let r = rack_ranks(world, rack, racks);
                    assert_eq!(r.start, next, "world {world} racks {racks}");
                    assert!(r.len() >= usize::from(world / racks), "{r:?}");
                    assert!(r.len() <= usize::from(world.div_ceil(racks)), "{r:?}");
                    next = r.end;
                }
                assert_eq!(next, world);
            }
        }
        assert_eq!(rack_ranks(4, 1, 2), 2..4);
    }
}
