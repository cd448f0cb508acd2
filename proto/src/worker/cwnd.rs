//! The congestion window: additive increase, multiplicative decrease on congestion
//! marks, loss bursts and a standing queue, as PANAMA's workers do with ECN.
//!
//! Marks come in results, and every rank of a job receives the same results, so the
//! ranks' windows move together on marks. The window halves at most once per window
//! of packets: a decrease only counts for a packet sent after the previous one took
//! effect.
//!
//! Losses count as congestion only in bursts: when more than a fifth of a window's
//! packets were lost on this rank's own path (a retransmission was needed and the
//! aggregator had not been holding the contribution for a slow peer). A queue that
//! overflows drops runs of datagrams; a lossy link drops a few here and there, and
//! halving the window for those (as TCP Reno does) collapsed throughput here: under
//! light random loss the window sat near its minimum (docs/performance.md,
//! "Congestion control").
//!
//! Most bottlenecks neither mark nor drop until their queue is full, so a window
//! that waits for loss keeps a drop-tail queue full and every short flow crossing it
//! waits behind that queue. The queue rule bounds how much of that queue is this
//! rank's own, as TCP Vegas does. By Little's law, the packets a rank has waiting in
//! queues are its rate (`w / rtt`) times the queueing delay (`rtt - base`):
//! `w * (rtt - base) / rtt`. Each round (a window's worth of results, at least
//! [`MIN_ROUND`]) without a loss burst takes its smallest RTT, so that one late
//! result (a descheduled process, a straggling rank) does not count, and the base is
//! the smallest of the last [`BASE_ROUNDS`] such rounds: the path's own RTT, which a rank sees at the start of
//! an allreduce when no one else keeps a queue standing. When more than the target's
//! packets wait, the window halves. A base that is too low (the path grew longer)
//! overstates the rank's queue, but the rule never halves a window of the target's
//! worth or less. The bound is on this rank's part of the queue, not on the queue:
//! beside flows that keep a queue standing whatever this job does (TCP on a drop-tail
//! link) the rank keeps its target's worth waiting, and with it a share of the link,
//! where a rule on the queue's delay would yield all of it (docs/protocol.md, 6.10;
//! docs/performance.md, "Sharing a link with TCP", has what it gives and where it
//! falls short).
//!
//! The dip rule keeps the flows beside the job from taking the job's queue for
//! their path. TCP BBR takes a path's delay as the smallest RTT it saw in its min-RTT
//! window ([`DEFAULT_DIP_INTERVAL`]), and when that has not fallen for a window it
//! holds 4 packets in flight for a short drain ([`DIP_TIME`]) to see the path empty
//! (PROBE_RTT); a queue the job keeps standing through that drain becomes part of
//! BBR's estimate, and BBR keeps that much more in
//! flight, a standing queue of its own. So a rank does what BBR does: when its
//! smallest RTT has not fallen for the dip interval, its window dips to the
//! smallest for [`DIP_TIME`]. A BBR flow that drains lowers the rank's RTT and so
//! restarts its interval, and a rank that dips lowers a BBR flow's: the flows and
//! the ranks come to empty the queue together, and each sees the path's own delay. Until they
//! are in step, a rank also joins a drain it sees: when the median of the last
//! [`JOIN_RECENT`] rounds' smallest RTTs falls below [`JOIN_FALL`] of the median of
//! the [`JOIN_ROUNDS`] rounds before, within one allreduce and by at least
//! [`JOIN_MIN_FALL`], others are draining the queue, and the rank dips with them (at
//! least [`JOIN_REST`] after its last dip began). Medians, because the window's own
//! saw moves one round's smallest RTT by 30-50% from the next, where a drain lowers
//! most of the rounds it spans. The worker gives the rule to rank 0 alone: a
//! result needs every rank, so one rank's dip holds the whole job's packets back,
//! and the others' dips would only hold it back again at other moments.
//!
//! Both rules yield to flows that wait for loss, and such flows (TCP CUBIC or Reno
//! on a drop-tail link) take whatever is yielded: they fill the queue until it
//! overflows, whatever the job does, so its own part of that queue and its dips
//! only give them the link. A loss burst shows such a queue. So the overflow rule:
//! for [`DEFAULT_OVERFLOW_HOLD`] after a loss burst, the queue rule halves no window
//! and no dip begins, and the window follows losses alone, as theirs do. Flows that
//! keep their queue short (BBR beside a deep buffer, a job alone within its grant)
//! overflow nothing, and the delay rules keep their queue short too.
//!
//! The window bounds what a rank keeps in flight, not how fast it sends: when others
//! drain the queue, results come back faster and the rank's whole window stands in
//! the queue through the drain. The pacing rule ([`Pacer`], `pacer.rs`, kept here
//! with the window's other rules) holds the rank to a little more than its recent
//! rate, so that the queue empties while others drain it; rank 0's dips and joins
//! still show BBR flows the drains they miss.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::pacer::Pacer;

/// AIMD state of one worker, kept across allreduces.
#[derive(Debug, Clone)]
pub struct Cwnd {
    w: f64,
    max: f64,
    /// Packets (sequence numbers) below this were sent before the last decrease.
    recover_from: u64,
    /// Decreases so far.
    pub decreases: u64,
    /// Results and losses in the current round (a window's worth of results).
    round_results: u64,
    round_losses: u64,
    /// The first packet whose result opened the current round.
    round_first: u64,
    /// The smallest RTT of the current round.
    round_min_rtt: Option<Duration>,
    /// The packets of this rank's own that may wait in queues before the window
    /// halves (`None`: no queue rule).
    queue_target: Option<u32>,
    /// Rounds without a loss burst that had an RTT sample, so far.
    judged: u64,
    /// The candidates for the smallest round minimum of the last [`BASE_ROUNDS`] such
    /// rounds, as (round, minimum): each smaller than every one after it, the
    /// smallest first (a monotonic queue, so the base costs no scan).
    recent_mins: VecDeque<(u64, Duration)>,
    /// The dip rule (`None`: off).
    dip: Option<Dip>,
    /// How long the delay rules stand aside after a loss burst (`None`: they never
    /// do), and when the last burst was seen.
    overflow_hold: Option<Duration>,
    last_burst: Option<Instant>,
    /// Loss bursts that set the delay rules aside (or kept them aside) so far.
    pub overflows: u64,
    /// Pacing (`None`: off).
    pacer: Option<Pacer>,
    /// Results and losses of the rounds in the current block (at least
    /// [`LOSS_BLOCK`] results), lossy blocks in a row, and when the last of a run of
    /// [`LOSSY_BLOCKS`] ended.
    block_results: u64,
    block_losses: u64,
    lossy_blocks: u32,
    last_lossy: Option<Instant>,
}

/// The dip rule's state: the smallest RTT since it last fell or since the last
/// dip, and the dip under way.
#[derive(Debug, Clone)]
struct Dip {
    /// How long the smallest RTT may stand before the rank dips.
    interval: Duration,
    /// The smallest RTT, and when it was seen (or the last dip ended).
    min_rtt: Option<(Duration, Instant)>,
    /// A dip under way: when it ends at the earliest, and the first packet sent
    /// during it (it ends with a result of a packet sent while the window was small).
    until: Option<(Instant, u64)>,
    /// The smallest RTT seen during the dip under way, and when.
    dipped_min: Option<(Duration, Instant)>,
    /// The smallest RTTs of the last [`JOIN_ROUNDS`] + [`JOIN_RECENT`] rounds of this
    /// allreduce, oldest first.
    last_round_mins: VecDeque<Duration>,
    /// Rounds of this allreduce left out so far (up to [`JOIN_SKIP`]).
    refill_rounds: usize,
    /// When the last dip began.
    last_dip: Option<Instant>,
    /// Dips so far.
    count: u64,
}

/// Rounds whose median smallest RTT is below this fraction of the median of the
/// [`JOIN_ROUNDS`] rounds before show others draining the queue.
pub const JOIN_FALL: f64 = 0.75;

/// The least fall, in time, that shows others draining: a drain empties a queue of
/// milliseconds, where a busy host's scheduling moves a short path's RTT by tens of
/// microseconds to a fraction of a millisecond (on loopback, say).
pub const JOIN_MIN_FALL: Duration = Duration::from_millis(1);

/// The rounds a fall is measured against: about a cycle of the window's own saw
/// (halving and growing back), whose median its low rounds do not move.
pub const JOIN_ROUNDS: usize = 8;

/// The latest rounds whose median is compared with the rounds before: few enough
/// that a drain ([`DIP_TIME`] long) fills most of them while it lasts, more than the
/// saw's low rounds that fall among them.
pub const JOIN_RECENT: usize = 4;

/// The first rounds of an allreduce, left out of the comparison: they refill the
/// queue that the gap before the allreduce emptied.
pub const JOIN_SKIP: usize = 2;

/// The `(n/2 + 1)`-th smallest of `n` values.
fn median(xs: &mut [Duration]) -> Duration {
    xs.sort_unstable();
    xs[xs.len() / 2]
}

/// The least time from a dip's start to a join (half the interval where that is
/// shorter). Flows whose drains fall out of step with the rank's dips, a second or two
/// after them, are joined, and the rank's next dips fall with theirs. The rank's own
/// dip, whose rounds are low, is over by then and does not read as a fall.
pub const JOIN_REST: Duration = Duration::from_secs(1);

/// How long a dip holds the window at its smallest: as long as BBR's drain, so that
/// a dip overlaps the flows' own.
pub const DIP_TIME: Duration = Duration::from_millis(200);

/// The longest a dip lasts while its RTT keeps falling.
pub const MAX_DIP_TIME: Duration = Duration::from_millis(500);

/// How long the smallest RTT may stand before a rank dips unless told otherwise:
/// BBR's min-RTT filter window, so that the ranks and BBR flows keep in step.
pub const DEFAULT_DIP_INTERVAL: Duration = Duration::from_secs(10);

/// How long the queue and dip rules stand aside after a loss burst unless told
/// otherwise: longer than the cycle in which loss-based flows fill a deep queue again
/// after they back off, so that they stay aside while such flows run.
pub const DEFAULT_OVERFLOW_HOLD: Duration = Duration::from_secs(30);

/// Results per block (whole rounds, at least this many) over which the pacing rule
/// judges the path's losses.
pub const LOSS_BLOCK: u64 = 1024;

/// A block with more than one loss per this many results is lossy: a queue kept
/// full drops that steadily, where a path that drops only now and then does not.
pub const LOSSY_SHARE: u64 = 256;

/// Lossy blocks in a row that set pacing aside for the overflow hold.
pub const LOSSY_BLOCKS: u32 = 2;

/// The fewest results over which a loss burst or a standing queue is judged.
pub const MIN_ROUND: u64 = 64;

/// The smallest window: enough packets in flight to keep the stream going.
const MIN_WINDOW: f64 = 2.0;

/// The rounds over which the queue rule takes its base RTT: long enough that a queue
/// other flows keep standing does not become part of the base while it grows (many
/// seconds of a rank's sending at the rates inagg runs at), short enough that a path
/// that changed is learned again.
pub const BASE_ROUNDS: usize = 4096;

impl Cwnd {
    /// A window that starts at `max` (the slots granted) and never exceeds it, with
    /// the queue rule off.
    pub fn new(max: u32) -> Self {
        let max = f64::from(max.max(1));
        Self {
            w: max,
            max,
            recover_from: 0,
            decreases: 0,
            round_results: 0,
            round_losses: 0,
            round_first: 0,
            round_min_rtt: None,
            queue_target: None,
            judged: 0,
            recent_mins: VecDeque::new(),
            dip: None,
            overflow_hold: None,
            last_burst: None,
            overflows: 0,
            pacer: None,
            block_results: 0,
            block_losses: 0,
            lossy_blocks: 0,
            last_lossy: None,
        }
    }

    /// The same window with pacing at `gain` times the rate of results (`None`: off).
    pub fn with_pacing(mut self, gain: Option<f64>) -> Self {
        self.pacer = gain.map(Pacer::new);
        self
    }

    /// Whether pacing lets a packet go out at `now`: always with pacing off, and while
    /// it stands aside (see [`Cwnd::pacing_aside`]).
    pub fn may_send(&mut self, now: Instant) -> bool {
        self.pacing_aside(now) || self.pacer.as_mut().is_none_or(|p| p.may_send(now))
    }

    /// Whether pacing stands aside at `now`: while the overflow rule holds, and for
    /// the overflow hold after [`LOSSY_BLOCKS`] lossy blocks in a row. A queue that
    /// drops steadily is kept full by flows that wait for loss (TCP CUBIC), which
    /// send in bursts: paced packets find it full more often than theirs and the job
    /// loses its share, so beside such flows the ranks send as their windows allow.
    pub fn pacing_aside(&self, now: Instant) -> bool {
        self.overflowing(now)
            || matches!((self.overflow_hold, self.last_lossy),
                (Some(hold), Some(at)) if now.saturating_duration_since(at) < hold)
    }

    /// Times pacing held a send back until its timer since the allreduce began (0 with
    /// pacing off).
    pub fn pacing_holds(&self) -> u64 {
        self.pacer.as_ref().map_or(0, |p| p.holds)
    }

    /// A packet went out.
    pub fn on_sent(&mut self) {
        if let Some(p) = &mut self.pacer {
            p.on_sent();
        }
    }

    /// When pacing lets a held-back packet go out.
    pub fn pacing_timer(&self) -> Option<Instant> {
        self.pacer.as_ref().and_then(Pacer::held_until)
    }

    /// The pacing timer fired.
    pub fn on_pacing_timer(&mut self) {
        if let Some(p) = &mut self.pacer {
            p.release();
        }
    }

    /// The same window with the overflow rule holding the delay rules aside for
    /// `hold` after a loss burst (`None`: off).
    pub fn with_overflow_hold(mut self, hold: Option<Duration>) -> Self {
        self.overflow_hold = hold;
        self
    }

    /// Whether a loss burst less than the overflow hold ago sets the queue and dip
    /// rules aside at `now`.
    pub fn overflowing(&self, now: Instant) -> bool {
        match (self.overflow_hold, self.last_burst) {
            (Some(hold), Some(at)) => now.saturating_duration_since(at) < hold,
            _ => false,
        }
    }

    /// The same window with the dip rule at `interval` (`None`: off).
    pub fn with_dip_interval(mut self, interval: Option<Duration>) -> Self {
        self.dip = interval.map(|interval| Dip {
            interval,
            min_rtt: None,
            until: None,
            dipped_min: None,
            last_round_mins: VecDeque::new(),
            refill_rounds: 0,
            last_dip: None,
            count: 0,
        });
        self
    }

    /// An allreduce begins at `now`: its first rounds find the queue as the gap
    /// between allreduces left it, not as others drained it. An interval that ran out
    /// while the rank sent nothing starts over from the allreduce's first RTT, as
    /// BBR skips its drain when it restarts from idle: the rank's part of the queue
    /// is empty then.
    pub fn on_allreduce(&mut self, now: Instant) {
        if let Some(p) = &mut self.pacer {
            p.restart_sample();
            p.holds = 0;
        }
        if let Some(d) = &mut self.dip {
            d.last_round_mins.clear();
            d.refill_rounds = 0;
            if d.min_rtt
                .is_some_and(|(_, at)| now.saturating_duration_since(at) >= d.interval)
            {
                d.min_rtt = None;
            }
        }
    }

    /// Dips begun so far (0 with the dip rule off).
    pub fn dips(&self) -> u64 {
        self.dip.as_ref().map_or(0, |d| d.count)
    }

    /// The window the AIMD rules hold, which a dip leaves as it is.
    pub fn aimd_window(&self) -> u64 {
        self.w.floor().max(1.0) as u64
    }

    /// Whether a dip holds the window at its smallest now.
    pub fn dipping(&self) -> bool {
        self.dip.as_ref().is_some_and(|d| d.until.is_some())
    }

    /// The same window with the queue rule at `target` packets (`None`: off).
    pub fn with_queue_target(mut self, target: Option<u32>) -> Self {
        self.queue_target = target;
        self
    }

    /// The grant changed to `max` slots (a re-grant): the window never exceeds it, and a
    /// window that sat at the old grant (not held back by congestion) moves to the new.
    pub fn set_max(&mut self, max: u32) {
        let max = f64::from(max.max(1));
        if self.w >= self.max {
            self.w = max;
        }
        self.max = max;
        self.w = self.w.min(max);
    }

    /// Packets allowed in flight.
    pub fn window(&self) -> u64 {
        let w = if self.dipping() {
            self.w.min(MIN_WINDOW)
        } else {
            self.w
        };
        w.floor().max(1.0) as u64
    }

    /// A result for packet `seq`, with its RTT where it was sent once: a mark halves
    /// the window, an unmarked result grows it by one packet per window; the end of a
    /// round judges its losses and its queue, and the dip rule runs. `next` is the
    /// next sequence number to be sent; `now` is when the result arrived.
    pub fn on_result(
        &mut self,
        seq: u64,
        marked: bool,
        rtt: Option<Duration>,
        next: u64,
        now: Instant,
    ) {
        let overflowing = self.overflowing(now);
        if let Some(d) = &mut self.dip {
            d.on_result(seq, rtt, next, now, overflowing);
        }
        let dipping = self.dipping();
        if let Some(p) = &mut self.pacer {
            if dipping {
                p.restart_sample();
            } else {
                p.on_result(now);
            }
        }
        if marked {
            self.decrease(seq, next);
        } else {
            self.w = (self.w + 1.0 / self.w).min(self.max);
        }
        if let Some(r) = rtt {
            self.round_min_rtt = Some(self.round_min_rtt.map_or(r, |m| m.min(r)));
        }
        if self.round_results == 0 {
            self.round_first = seq;
        }
        self.round_results += 1;
        // Rounds of at least MIN_ROUND results: in a round of two, one loss would be
        // a "burst", and a small window could never grow out of it.
        if self.round_results >= self.aimd_window().max(MIN_ROUND) {
            if let (Some(d), Some(min)) = (&mut self.dip, self.round_min_rtt) {
                d.on_round(min, next, now, overflowing);
            }
            // More than a fifth of the round lost: a burst, a queue overflowing.
            if self.round_losses * 5 > self.round_results {
                self.decrease(seq, next);
                if self.overflow_hold.is_some() {
                    self.overflows += 1;
                    self.last_burst = Some(now);
                }
            } else {
                self.judge_queue(seq, next, overflowing);
            }
            self.judge_block(now);
            self.round_results = 0;
            self.round_losses = 0;
            self.round_min_rtt = None;
        }
    }

    /// Packet `seq` was lost (a timeout or a gap behind later results); counted
    /// toward the round's loss burst.
    pub fn on_loss(&mut self, _seq: u64, _next: u64) {
        self.round_losses += 1;
    }

    /// The end of a round adds it to the current block; a full block (at least
    /// [`LOSS_BLOCK`] results) is judged lossy or not for the pacing rule.
    fn judge_block(&mut self, now: Instant) {
        self.block_results += self.round_results;
        self.block_losses += self.round_losses;
        if self.block_results < LOSS_BLOCK {
            return;
        }
        if self.block_losses * LOSSY_SHARE > self.block_results {
            self.lossy_blocks += 1;
            if self.lossy_blocks >= LOSSY_BLOCKS {
                self.last_lossy = Some(now);
            }
        } else {
            self.lossy_blocks = 0;
        }
        self.block_results = 0;
        self.block_losses = 0;
    }

    /// The queue rule at the end of a round (see the module's doc); the base is kept
    /// while the overflow rule sets the rule aside.
    fn judge_queue(&mut self, seq: u64, next: u64, overflowing: bool) {
        let Some(min) = self.round_min_rtt else {
            return;
        };
        let round = self.judged;
        self.judged += 1;
        while self.recent_mins.back().is_some_and(|&(_, m)| m >= min) {
            self.recent_mins.pop_back();
        }
        self.recent_mins.push_back((round, min));
        while self
            .recent_mins
            .front()
            .is_some_and(|&(r, _)| r + BASE_ROUNDS as u64 <= round)
        {
            self.recent_mins.pop_front();
        }
        let Some(target) = self.queue_target.filter(|_| !overflowing) else {
            return;
        };
        // A round that began with packets sent before the last decrease does not
        // show what the decrease did.
        if self.round_first < self.recover_from {
            return;
        }
        let base = self.recent_mins.front().map_or(min, |&(_, m)| m);
        if min.is_zero() {
            return;
        }
        let queued = self.w * min.saturating_sub(base).as_secs_f64() / min.as_secs_f64();
        if queued > f64::from(target) {
            self.decrease(seq, next);
        }
    }

    /// Halves the window unless `seq` was sent before the last decrease.
    fn decrease(&mut self, seq: u64, next: u64) {
        if seq < self.recover_from {
            return;
        }
        self.w = (self.w / 2.0).max(MIN_WINDOW.min(self.max));
        self.recover_from = next;
        self.decreases += 1;
    }
}

impl Dip {
    /// A result with its RTT sample, if any: a smaller RTT restarts the interval; an
    /// interval run out starts a dip. A dip ends with the first result, after
    /// [`DIP_TIME`], of a packet sent during it, once its RTT has not fallen for half
    /// a [`DIP_TIME`]: while it falls, others are draining too (a BBR flow whose
    /// own interval ran out as the rank's dip began), and the rank stays dipped
    /// with them, up to [`MAX_DIP_TIME`]. No dip begins while `overflowing`.
    fn on_result(
        &mut self,
        seq: u64,
        rtt: Option<Duration>,
        next: u64,
        now: Instant,
        overflowing: bool,
    ) {
        if let Some((until, first)) = self.until {
            if let Some(r) = rtt.filter(|_| seq >= first) {
                if self.dipped_min.is_none_or(|(m, _)| r < m) {
                    self.dipped_min = Some((r, now));
                }
            }
            let began = until - DIP_TIME;
            let settled = self
                .dipped_min
                .is_none_or(|(_, at)| now.saturating_duration_since(at) >= DIP_TIME / 2);
            if seq >= first
                && now >= until
                && (settled || now.saturating_duration_since(began) >= MAX_DIP_TIME)
            {
                self.until = None;
                self.min_rtt = self.dipped_min.take().map(|(m, _)| (m, now));
            }
            return;
        }
        let Some(r) = rtt else {
            return;
        };
        match self.min_rtt {
            Some((m, _)) if r >= m => {}
            _ => self.min_rtt = Some((r, now)),
        }
        if let Some((_, at)) = self.min_rtt {
            if now.saturating_duration_since(at) >= self.interval && !overflowing {
                self.start(next, now);
            }
        }
    }

    /// The end of a round whose smallest RTT was `min`: a sharp fall of the last
    /// rounds' median below the median of the rounds before starts a dip. The
    /// window's own saw cannot: its low rounds are few among either. One round's blip
    /// (a busy host) cannot either; a drain lasts many rounds. No dip begins while
    /// `overflowing`.
    fn on_round(&mut self, min: Duration, next: u64, now: Instant, overflowing: bool) {
        if self.refill_rounds < JOIN_SKIP {
            self.refill_rounds += 1;
            return;
        }
        if self.last_round_mins.len() == JOIN_RECENT + JOIN_ROUNDS {
            self.last_round_mins.pop_front();
        }
        self.last_round_mins.push_back(min);
        let fell = self.last_round_mins.len() == JOIN_RECENT + JOIN_ROUNDS && {
            let rounds = self.last_round_mins.make_contiguous();
            let (mut before, mut recent) =
                ([Duration::ZERO; JOIN_ROUNDS], [Duration::ZERO; JOIN_RECENT]);
            before.copy_from_slice(&rounds[..JOIN_ROUNDS]);
            recent.copy_from_slice(&rounds[JOIN_ROUNDS..]);
            let (b, r) = (median(&mut before), median(&mut recent));
            r.as_secs_f64() < JOIN_FALL * b.as_secs_f64() && b.saturating_sub(r) >= JOIN_MIN_FALL
        };
        let rested = self
            .last_dip
            .is_none_or(|at| now.saturating_duration_since(at) >= JOIN_REST.min(self.interval / 2));
        if fell && rested && self.until.is_none() && !overflowing {
            self.start(next, now);
        }
    }

    fn start(&mut self, next: u64, now: Instant) {
        self.until = Some((now + DIP_TIME, next));
        self.dipped_min = None;
        self.last_dip = Some(now);
        self.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock for rules that take none: the dip rule is off in these tests.
    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn steady_losses_set_pacing_aside_for_the_hold_and_one_lossy_block_does_not() {
        let t0 = now();
        let us = Duration::from_micros(500);
        let hold = Duration::from_secs(30);
        let mut c = Cwnd::new(64)
            .with_overflow_hold(Some(hold))
            .with_pacing(Some(1.25));
        let mut seq = 0u64;
        // Results every 500 us, and a loss after each 100 of them while `lossy`.
        let mut run = |c: &mut Cwnd, blocks: u64, lossy: bool| {
            for _ in 0..blocks * LOSS_BLOCK {
                if lossy && seq % 100 == 0 {
                    c.on_loss(seq, seq + 64);
                }
                c.on_result(
                    seq,
                    false,
                    Some(Duration::from_millis(5)),
                    seq + 64,
                    t0 + us * seq as u32,
                );
                seq += 1;
            }
            t0 + us * seq as u32
        };
        // Paced (after a second of results): a burst, then held back.
        let t = run(&mut c, 3, false);
        let mut sent = 0;
        while sent < 100 && c.may_send(t) {
            c.on_sent();
            sent += 1;
        }
        assert!(sent < 100, "never held back");
        // One lossy block: still paced.
        run(&mut c, 1, true);
        let t = run(&mut c, 1, false);
        assert!(!c.pacing_aside(t));
        // Two in a row: aside for the hold.
        let t = run(&mut c, 2, true);
        assert!(c.pacing_aside(t));
        assert!((0..1000).all(|_| c.may_send(t)), "held back while aside");
        assert!(c.pacing_aside(t + hold - Duration::from_millis(1)));
        assert!(!c.pacing_aside(t + hold));
    }

    #[test]
    fn halves_once_per_window_and_grows_back_by_one_per_window() {
        let mut c = Cwnd::new(64);
        assert_eq!(c.window(), 64);
        c.on_result(10, true, None, 74, now());
        assert_eq!(c.window(), 32);
        // Marks on packets sent before the decrease do not count again.
        for seq in 11..74 {
            c.on_result(seq, true, None, 80, now());
        }
        assert_eq!((c.window(), c.decreases), (32, 1));
        // A window's worth of unmarked results (and one) grows it by one.
        for seq in 80..113 {
            c.on_result(seq, false, None, 120, now());
        }
        assert_eq!(c.window(), 33);
        for seq in 120..100_000 {
            c.on_result(seq, false, None, seq + 64, now());
        }
        assert_eq!(c.window(), 64, "capped at the grant");
        for i in 0..20 {
            c.on_result(
                200_000 + 1000 * i,
                true,
                None,
                200_000 + 1000 * i + 1,
                now(),
            );
        }
        assert_eq!(c.window(), 2, "never below the minimum");
    }

    #[test]
    fn a_new_grant_caps_the_window_and_an_unconstrained_one_follows_it() {
        let mut c = Cwnd::new(64);
        c.set_max(16);
        assert_eq!(c.window(), 16);
        c.set_max(48);
        assert_eq!(
            c.window(),
            48,
            "not held back by congestion: it follows the grant"
        );
        c.on_result(0, true, None, 10, now());
        assert_eq!(c.window(), 24);
        c.set_max(64);
        assert_eq!(c.window(), 24, "after a mark it grows by AIMD");
        c.set_max(8);
        assert_eq!(c.window(), 8);
    }

    #[test]
    fn isolated_losses_leave_the_window_and_a_burst_halves_it() {
        let mut c = Cwnd::new(64);
        // Six losses in each of many rounds of 64: 10%, a lossy link.
        for round in 0..50u64 {
            for _ in 0..6 {
                c.on_loss(round * 64, round * 64 + 64);
            }
            for seq in round * 64..round * 64 + 64 {
                c.on_result(seq, false, None, seq + 64, now());
            }
        }
        assert_eq!((c.window(), c.decreases), (64, 0));
        // Twenty losses in one round of 64: a queue overflowing.
        for _ in 0..20 {
            c.on_loss(5000, 5064);
        }
        for seq in 5000..5064 {
            c.on_result(seq, false, None, seq + 64, now());
        }
        assert_eq!(c.decreases, 1);
        assert!(c.window() <= 33, "{}", c.window());
    }

    /// Feeds `rounds` rounds of results, in order, each with the RTT `rtt(window)` of
    /// the window it was sent with; returns the next sequence number.
    fn rounds(c: &mut Cwnd, mut seq: u64, rounds: u64, rtt: impl Fn(u64) -> Duration) -> u64 {
        for _ in 0..rounds * MIN_ROUND {
            let w = c.window();
            c.on_result(seq, false, Some(rtt(w)), seq + w, now());
            seq += 1;
        }
        seq
    }

    const MS: Duration = Duration::from_millis(1);

    /// This rank's packets in the queue when `rtt` is what a round saw against the
    /// path's `base` (Little's law).
    fn own(w: u64, rtt: Duration, base: Duration) -> f64 {
        w as f64 * (rtt - base).as_secs_f64() / rtt.as_secs_f64()
    }

    #[test]
    fn a_queue_of_its_own_shrinks_to_the_target() {
        let mut c = Cwnd::new(64).with_queue_target(Some(8));
        // The path: a base RTT, plus a quarter of it per packet in flight beyond 8.
        let path = |w: u64| MS + MS * (w.saturating_sub(8) as u32) / 4;
        // The first results of an allreduce find the queue empty.
        let mut seq = rounds(&mut c, 0, 1, |_| MS);
        seq = rounds(&mut c, seq, 20, path);
        assert!(c.decreases >= 2, "{c:?}");
        // From here on the window saws between the path's own packets and a little
        // over the target (it grows by a round's results before a round judges it).
        let mut windows = Vec::new();
        for _ in 0..40 {
            seq = rounds(&mut c, seq, 1, path);
            windows.push(c.window());
        }
        let (lo, hi) = (windows.iter().min(), windows.iter().max());
        let mean = windows.iter().map(|&w| own(w, path(w), MS)).sum::<f64>() / 40.0;
        assert!(
            lo >= Some(&7),
            "the path's own packets stay in flight: {windows:?}"
        );
        assert!(hi <= Some(&24), "{windows:?}");
        assert!(mean <= 8.0, "{mean} packets queued: {windows:?}");
    }

    #[test]
    fn beside_a_queue_kept_by_others_it_keeps_its_own_share_of_it() {
        let mut c = Cwnd::new(64).with_queue_target(Some(8));
        // Someone else's standing queue, ten times the base, from the second round on, whatever
        // this window: the window falls to about the target's worth, not below ...
        let mut seq = rounds(&mut c, 0, 1, |_| MS);
        let mut windows = Vec::new();
        for _ in 0..BASE_ROUNDS - 1 {
            seq = rounds(&mut c, seq, 1, |_| 11 * MS);
            windows.push(c.window());
        }
        let lo = *windows.iter().min().expect("windows");
        assert!((4..=12).contains(&lo), "{windows:?}");
        let tail = &windows[windows.len() / 2..];
        let mean = tail.iter().map(|&w| own(w, 11 * MS, MS)).sum::<f64>() / tail.len() as f64;
        assert!((4.0..=14.0).contains(&mean), "{mean}: {windows:?}");
        // ... and once the empty queue's round leaves the base, the standing queue is
        // part of the path: the window grows back to the grant.
        seq = rounds(&mut c, seq, 200, |_| 11 * MS);
        assert_eq!(c.window(), 64, "{c:?}");
        // A queue of this job's own on top of it still counts.
        let d = c.decreases;
        rounds(&mut c, seq, 4, |w| 11 * MS + MS * (w as u32) / 4);
        assert!(c.decreases > d, "{c:?}");
    }

    #[test]
    fn late_results_alone_and_no_target_leave_the_window() {
        // One result in 16 late by twenty times the base (a descheduled process): the round's
        // minimum is the path's.
        let mut c = Cwnd::new(64).with_queue_target(Some(8));
        for seq in 0..50 * MIN_ROUND {
            let late = seq % 16 == 5;
            c.on_result(
                seq,
                false,
                Some(if late { 21 * MS } else { MS }),
                seq + 64,
                now(),
            );
        }
        assert_eq!((c.window(), c.decreases), (64, 0));
        // Without a target, a queue alone changes nothing.
        let mut c = Cwnd::new(64);
        rounds(&mut c, 0, 50, |w| MS * w as u32);
        assert_eq!((c.window(), c.decreases), (64, 0));
    }

    /// Feeds results a millisecond apart from `from` for `ms` milliseconds, each with
    /// the RTT `rtt(t)` at `t` milliseconds since `t0`; returns the windows after each
    /// result.
    fn timed(
        c: &mut Cwnd,
        t0: Instant,
        from: u64,
        ms: u64,
        rtt: impl Fn(u64) -> Duration,
    ) -> Vec<u64> {
        (from..from + ms)
            .map(|t| {
                let w = c.window();
                c.on_result(t, false, Some(rtt(t)), t + w, t0 + MS * t as u32);
                c.window()
            })
            .collect()
    }

    #[test]
    fn after_a_loss_burst_the_queue_and_dip_rules_stand_aside_for_the_hold() {
        let t0 = Instant::now();
        let run = |hold: Option<Duration>| {
            let mut c = Cwnd::new(64)
                .with_queue_target(Some(8))
                .with_dip_interval(Some(Duration::from_secs(10)))
                .with_overflow_hold(hold);
            // A round on the empty path, then others fill a drop-tail queue to ten
            // times the path's delay, and it overflows: a round loses a third.
            timed(&mut c, t0, 0, 64, |_| MS);
            for _ in 0..24 {
                c.on_loss(64, 128);
            }
            let mut w = timed(&mut c, t0, 64, 64, |_| 11 * MS);
            assert_eq!((c.window(), c.decreases), (32, 1), "{c:?}");
            // The queue stands for the next 40 s, whatever the rank does.
            w.extend(timed(&mut c, t0, 128, 40_000, |_| 11 * MS));
            (c, w)
        };
        let (c, w) = run(Some(Duration::from_secs(30)));
        assert_eq!(c.overflows, 1);
        // For 30 s after the burst (the round ending at result 127) the window follows
        // losses alone: it grows back to the grant and never dips, although the rank's
        // own queue (its whole window, against the first round's base) is far over the
        // target and its smallest RTT stood for longer than the dip interval ...
        let aside = &w[..30_000];
        assert!(aside.iter().all(|&w| w >= 32), "{c:?}");
        assert_eq!(aside.last(), Some(&64));
        // ... then both rules are back: the queue rule halves the window, and the
        // interval, long run out, starts a dip at once.
        let back = &w[30_064..];
        assert!(c.decreases >= 3, "{c:?}");
        assert!(back.contains(&2), "{c:?}");
        assert!(c.dips() >= 1);
        // Without the rule the queue rule keeps the window near the target, and the
        // rank dips every interval.
        let (c, w) = run(None);
        assert_eq!(c.overflows, 0);
        assert!(w[1_000..30_000].iter().all(|&w| w < 32), "{c:?}");
        assert!(c.dips() >= 3, "{c:?}");
    }

    #[test]
    fn a_drain_is_seen_through_the_windows_saw() {
        let t0 = Instant::now();
        // Rounds of MIN_ROUND results, one a millisecond. The saw: every third round's
        // smallest RTT is `low`, the others' `high`. A drain over `drain_at` takes 30% off
        // every round, so its rounds stay above the saw's low rounds before it
        // (0.7 * high > low) but most of them are well below the rounds' median.
        let (low, high, drain_at) = (5.0, 8.0, 5_000..5_250);
        let saw = |drain: bool| {
            let drain_at = drain_at.clone();
            move |t: u64| {
                let ms = if (t / MIN_ROUND) % 3 == 2 { low } else { high };
                let f = if drain && drain_at.contains(&t) {
                    0.7
                } else {
                    1.0
                };
                Duration::from_secs_f64(ms * f / 1e3)
            }
        };
        let mut c = Cwnd::new(64).with_dip_interval(Some(Duration::from_secs(10)));
        let w = timed(&mut c, t0, 0, 6_000, saw(true));
        let joined = w.iter().position(|&w| w == 2);
        assert!(
            joined.is_some_and(|t| (5_000..5_000 + 4 * MIN_ROUND as usize).contains(&t)),
            "{joined:?}"
        );
        assert_eq!(c.dips(), 1);
        // The saw alone is no drain.
        let mut c = Cwnd::new(64).with_dip_interval(Some(Duration::from_secs(10)));
        let w = timed(&mut c, t0, 0, 6_000, saw(false));
        assert!(w.iter().all(|&w| w == 64), "{c:?}");
    }

    #[test]
    fn a_drain_soon_after_a_dip_is_joined_and_a_fall_during_the_rest_is_not() {
        let t0 = Instant::now();
        let drain_at = |from: u64| {
            move |t: u64| {
                if (from..from + 300).contains(&t) {
                    2 * MS
                } else {
                    5 * MS
                }
            }
        };
        // The rank dips on its timer at 10 s; flows out of step with it drain 1.5 s
        // later, and the rank joins them.
        let mut c = Cwnd::new(64).with_dip_interval(Some(Duration::from_secs(10)));
        let w = timed(&mut c, t0, 0, 12_000, drain_at(11_500));
        assert_eq!(w[10_000], 2, "the timer's dip");
        let joined = (11_000..12_000u64).find(|&t| w[t as usize] == 2);
        assert!(
            joined.is_some_and(|t| (11_500 + MIN_ROUND..11_500 + 3 * MIN_ROUND).contains(&t)),
            "the second round that fell: {joined:?}"
        );
        assert_eq!(c.dips(), 2);
        // A fall half a second after the dip began is not joined.
        let mut c = Cwnd::new(64).with_dip_interval(Some(Duration::from_secs(10)));
        let w = timed(&mut c, t0, 0, 12_000, drain_at(10_300));
        assert!(w[10_500..].iter().all(|&w| w == 64), "{c:?}");
        assert_eq!(c.dips(), 1);
    }

    #[test]
    fn the_dip_rule_dips_when_the_smallest_rtt_stands_and_joins_others_dips() {
        let t0 = Instant::now();
        let mut c = Cwnd::new(64).with_dip_interval(Some(Duration::from_secs(10)));
        // A steady RTT: after the interval the window sits at the smallest for
        // DIP_TIME, then comes back whole.
        let w = timed(&mut c, t0, 0, 10_500, |_| 5 * MS);
        assert!(w[..10_000].iter().all(|&w| w == 64), "{:?}", &w[..10]);
        assert!(
            w[10_000..10_200].iter().all(|&w| w == 2),
            "{:?}",
            &w[10_000..10_010]
        );
        assert!(
            w[10_200..].iter().all(|&w| w == 64),
            "{:?}",
            &w[10_190..10_210]
        );
        // Another flow drains 3 s later: the rank joins it, and its next dip comes
        // 10 s after that, with the other flow's next, not 10 s after its own.
        let w = timed(&mut c, t0, 10_500, 14_000, |t| {
            if (13_200..13_400).contains(&t) {
                2 * MS
            } else {
                5 * MS
            }
        });
        let began: Vec<u64> = (10_501..24_500u64)
            .zip(w.windows(2))
            .filter(|&(_, w)| w[0] != 2 && w[1] == 2)
            .map(|(t, _)| t)
            .collect();
        assert_eq!(began.len(), 2, "{began:?}");
        assert!(
            (13_200 + MIN_ROUND..13_200 + 3 * MIN_ROUND).contains(&began[0]),
            "joined the drain: {began:?}"
        );
        assert!(
            (23_200..23_700).contains(&began[1]),
            "not at 20,200 ms: {began:?}"
        );
        // Half an interval after that dip, a fall below the rounds before (others
        // draining) starts one at the end of the round that saw it.
        let w = timed(&mut c, t0, 24_500, 6_000, |t| {
            if t >= 29_000 {
                2 * MS
            } else {
                5 * MS
            }
        });
        let joined = (24_500..30_500u64).zip(&w).find(|&(_, &w)| w == 2);
        assert!(
            joined.is_some_and(|(t, _)| (29_000 + MIN_ROUND..29_000 + 3 * MIN_ROUND).contains(&t)),
            "the second round that fell: {joined:?}"
        );
        // A fall in one round alone is a busy host, not a drain.
        let mut c = Cwnd::new(64).with_dip_interval(Some(Duration::from_secs(10)));
        let w = timed(&mut c, t0, 0, 2_000, |t| {
            // Exactly one round: rounds of 64 results, one a millisecond, from 0.
            if (16 * MIN_ROUND..17 * MIN_ROUND).contains(&t) {
                2 * MS
            } else {
                5 * MS
            }
        });
        assert!(w.iter().all(|&w| w == 64), "{c:?}");
        // A fall of a fraction of a millisecond is a busy host, not a drain.
        let mut c = Cwnd::new(64).with_dip_interval(Some(Duration::from_secs(10)));
        let w = timed(&mut c, t0, 0, 2_000, |t| {
            if t >= 1_000 {
                Duration::from_micros(100)
            } else {
                Duration::from_micros(600)
            }
        });
        assert!(w.iter().all(|&w| w == 64), "{c:?}");
        // The first results of an allreduce find the queue as the gap before it left
        // it: their fall is not a drain.
        for allreduce in [true, false] {
            let mut c = Cwnd::new(64).with_dip_interval(Some(Duration::from_secs(10)));
            timed(&mut c, t0, 0, 6_000, |_| 5 * MS);
            if allreduce {
                c.on_allreduce(t0 + 6_000 * MS);
            }
            let w = timed(&mut c, t0, 6_000, 1_000, |_| 2 * MS);
            assert_eq!(w.iter().all(|&w| w == 64), allreduce, "{c:?}");
        }
        // An allreduce after more than an interval without sending takes its first
        // RTT as the smallest instead of dipping at once.
        let mut c = Cwnd::new(64).with_dip_interval(Some(Duration::from_secs(10)));
        timed(&mut c, t0, 0, 1_000, |_| 5 * MS);
        c.on_allreduce(t0 + 20_000 * MS);
        assert!(timed(&mut c, t0, 20_000, 1_000, |_| 6 * MS)
            .iter()
            .all(|&w| w == 64));
        // Off, the window never dips.
        let mut c = Cwnd::new(64);
        assert!(timed(&mut c, t0, 0, 25_000, |_| 5 * MS)
            .iter()
            .all(|&w| w == 64));
    }
}
