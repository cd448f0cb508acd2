//! The congestion window: additive increase, multiplicative decrease on congestion
//! marks and losses, as PANAMA's workers do with ECN.
//!
//! Marks come in results, and every rank of a job receives the same results, so the
//! ranks' windows move together on marks. The window halves at most once per window
//! of packets: a decrease only counts for a packet sent after the previous one took
//! effect.
//!
//! Losses count as congestion only in bursts: when more than a fifth of a window's
//! packets were lost on this rank's own path (a retransmission was needed and the
//! aggregator had not been holding the contribution for a slow peer). A queue that overflows drops runs of datagrams; a lossy link
//! drops a few here and there, and halving the window for those (as TCP Reno does)
//! collapsed throughput here: under light random loss the window sat near its minimum
//! (docs/performance.md, "Congestion control").

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
}

/// The fewest results over which a loss burst is judged.
const MIN_ROUND: u64 = 64;

/// The smallest window: enough packets in flight to keep the stream going.
const MIN_WINDOW: f64 = 2.0;

impl Cwnd {
    /// A window that starts at `max` (the slots granted) and never exceeds it.
    pub fn new(max: u32) -> Self {
        let max = f64::from(max.max(1));
        Self {
            w: max,
            max,
            recover_from: 0,
            decreases: 0,
            round_results: 0,
            round_losses: 0,
        }
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
        self.w.floor().max(1.0) as u64
    }

    /// A result for packet `seq`: a mark halves the window, an unmarked result grows
    /// it by one packet per window. `next` is the next sequence number to be sent.
    pub fn on_result(&mut self, seq: u64, marked: bool, next: u64) {
        if marked {
            self.decrease(seq, next);
        } else {
            self.w = (self.w + 1.0 / self.w).min(self.max);
        }
        self.round_results += 1;
        // Rounds of at least MIN_ROUND results: in a round of two, one loss would be
        // a "burst", and a small window could never grow out of it.
        if self.round_results >= self.window().max(MIN_ROUND) {
            // More than a fifth of the round lost: a burst, a queue overflowing.
            if self.round_losses * 5 > self.round_results {
                self.decrease(seq, next);
            }
            self.round_results = 0;
            self.round_losses = 0;
        }
    }

    /// Packet `seq` was lost (a timeout or a gap behind later results); counted
    /// toward the round's loss burst.
    pub fn on_loss(&mut self, _seq: u64, _next: u64) {
        self.round_losses += 1;
    }

    fn decrease(&mut self, seq: u64, next: u64) {
        if seq < self.recover_from {
            return;
        }
        self.w = (self.w / 2.0).max(MIN_WINDOW.min(self.max));
        self.recover_from = next;
        self.decreases += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_once_per_window_and_grows_back_by_one_per_window() {
        let mut c = Cwnd::new(64);
        assert_eq!(c.window(), 64);
        c.on_result(10, true, 74);
        assert_eq!(c.window(), 32);
        // Marks on packets sent before the decrease do not count again.
        for seq in 11..74 {
            c.on_result(seq, true, 80);
        }
        assert_eq!((c.window(), c.decreases), (32, 1));
        // A window's worth of unmarked results (and one) grows it by one.
        for seq in 80..113 {
            c.on_result(seq, false, 120);
        }
        assert_eq!(c.window(), 33);
        for seq in 120..100_000 {
            c.on_result(seq, false, seq + 64);
        }
        assert_eq!(c.window(), 64, "capped at the grant");
        for i in 0..20 {
            c.on_result(200_000 + 1000 * i, true, 200_000 + 1000 * i + 1);
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
        c.on_result(0, true, 10);
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
                c.on_result(seq, false, seq + 64);
            }
        }
        assert_eq!((c.window(), c.decreases), (64, 0));
        // Twenty losses in one round of 64: a queue overflowing.
        for _ in 0..20 {
            c.on_loss(5000, 5064);
        }
        for seq in 5000..5064 {
            c.on_result(seq, false, seq + 64);
        }
        assert_eq!(c.decreases, 1);
        assert!(c.window() <= 33, "{}", c.window());
    }
}
