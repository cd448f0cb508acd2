//! The aggregator's data plane: a contribution checked against its job and summed
//! into its slot; a completed chunk queued for every rank.

use super::*;

impl<A: Clone + Eq + std::fmt::Debug> Aggregator<A> {
    pub(super) fn handle_contribution(
        &mut self,
        now: Instant,
        from: A,
        h: &DataHeader,
        payload: &[u8],
        len: u64,
        partial: bool,
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
            if partial != (job.level == Level::Top) {
                break 'check DropReason::LevelMismatch;
            }
            let member = job.member_index(h.rank);
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
                pool.probe(member, h)
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
                pool.contribute(member, &marked, payload)
            } else {
                pool.contribute(member, h, payload)
            };
            match outcome {
                Outcome::Summed => {
                    job.stats.contributions += 1;
                    self.stats.contributions += 1;
                    self.outbox.push_back(Outgoing::Partial {
                        job: h.job,
                        seq: h.seq,
                        resend: false,
                    });
                    return;
                }
                Outcome::Awaiting => {
                    // The rank timed out waiting: the partial sum or the parent's
                    // result may be lost. Up again; the rank hears that it is held.
                    self.outbox.push_back(Outgoing::Partial {
                        job: h.job,
                        seq: h.seq,
                        resend: true,
                    });
                    job.stats.probes_held += 1;
                    self.stats.probes_held += 1;
                    let msg = held_answer(h, job.world);
                    self.outbox.push_back(Outgoing::Control { to: from, msg });
                    return;
                }
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
                    let msg = held_answer(h, job.world);
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
                    let earlier = Sent {
                        rank: earlier.rank + job.ranks.start,
                        ..earlier
                    };
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
}

/// The held answer to a contribution or probe `h` of a job of `world` members: "your
/// contribution is in, the chunk waits" (docs/protocol.md 6.9).
fn held_answer(h: &DataHeader, world: u16) -> Message<'static> {
    let answer = DataHeader {
        rank: world,
        flags: FLAG_PROBE,
        ..*h
    };
    Message::Result(answer, &[])
}

/// What a rank sent for a packet, in words, for an abort that names both sides.
pub(super) fn describe(s: &Sent, aligned: bool) -> String {
    let mut t = format!("rank {} sent {} elements", s.rank, s.count);
    if !aligned && s.scale_exp != wire::NO_EXPONENT {
        t += &format!(" at exponent {}", s.scale_exp);
    }
    if s.last {
        t += ", the last of its tensor";
    }
    t
}
