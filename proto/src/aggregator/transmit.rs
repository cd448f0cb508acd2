//! What the aggregator sends: datagrams drained into the caller's buffer, results
//! straight from their slots' kept copies (scatter-gather), to each rank or its
//! multicast group.

use super::*;

impl<A: Clone + Eq + std::fmt::Debug> Aggregator<A> {
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
                &Outgoing::Partial { job, seq, resend } => {
                    self.outbox.pop_front();
                    self.encode_partial(job, seq, resend, buf)
                        .map(|to| (to, None))
                }
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
    pub(super) fn group_of(&self, id: u32, dest: Dest) -> Option<A> {
        if !matches!(dest, Dest::All(0)) {
            return None;
        }
        let group = self.jobs.get(&id)?.group?;
        Some((self.groups.as_ref()?.addr)(group))
    }

    /// Encodes the header of the result of `seq` for `rank`, if the job, the rank and
    /// the result are all still there; the payload stays in the slot.
    pub(super) fn encode_rank_result_head(
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
}

/// Encodes the header of the result of `seq` of `job` (the same bytes for every
/// rank), if the result is still there; the payload stays in the slot.
pub(super) fn encode_result_head<A>(
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
