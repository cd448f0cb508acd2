//! The worker's timers by name, as quinn-proto keeps a connection's: each is a
//! deadline (or none) that the state derives, [`TimerTable::next`] is what
//! `Worker::poll_timeout` returns, and `Worker::handle_timeout` handles the expired
//! ones in [`Timer::ALL`]'s order.

use std::time::Instant;

/// One of the worker's deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// Joining: no grant within the join timeout ends the session.
    JoinTimeout,
    /// An allreduce (or a re-grant) that made no progress within the progress
    /// timeout ends the session: another rank is gone.
    Progress,
    /// A contribution's retransmission timeout.
    Retransmit,
    /// Nothing heard from the aggregator within the silence timeout ends the session.
    Silence,
    /// A heartbeat is due: nothing sent for a heartbeat interval, or nothing heard
    /// for one and nothing sent for half of one (a heartbeat is always echoed).
    Heartbeat,
    /// Leaving: the next try of the leave, or, after the last, the end of the wait.
    Leave,
    /// Joining: the next join goes out.
    JoinRetry,
    /// Waiting for a re-grant: the next request goes out.
    RegrantRetry,
    /// Pacing lets a held-back contribution go out.
    Pace,
}

impl Timer {
    /// Every timer, in the order expired ones are handled: the ones that end the
    /// session before those that only send.
    pub(crate) const ALL: [Timer; 9] = [
        Timer::JoinTimeout,
        Timer::Progress,
        Timer::Retransmit,
        Timer::Silence,
        Timer::Heartbeat,
        Timer::Leave,
        Timer::JoinRetry,
        Timer::RegrantRetry,
        Timer::Pace,
    ];
}

/// A deadline per [`Timer`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TimerTable {
    at: [Option<Instant>; Timer::ALL.len()],
}

impl TimerTable {
    /// Sets `timer` to fire at `at`.
    pub(crate) fn set(&mut self, timer: Timer, at: Instant) {
        self.at[timer as usize] = Some(at);
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.at.iter().flatten().min().copied()
    }

    /// Whether `timer` is set and its deadline has come.
    pub(crate) fn expired(&self, timer: Timer, now: Instant) -> bool {
        self.at[timer as usize].is_some_and(|t| t <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_earliest_set_timer_is_next_and_only_passed_ones_expire() {
        let t0 = Instant::now();
        let mut table = TimerTable::default();
        assert_eq!(table.next(), None);
        table.set(Timer::Heartbeat, t0 + Duration::from_millis(20));
        table.set(Timer::Silence, t0 + Duration::from_millis(10));
        assert_eq!(table.next(), Some(t0 + Duration::from_millis(10)));
        let now = t0 + Duration::from_millis(15);
        assert!(table.expired(Timer::Silence, now));
        assert!(!table.expired(Timer::Heartbeat, now));
        assert!(!table.expired(Timer::Progress, now));
    }
}
