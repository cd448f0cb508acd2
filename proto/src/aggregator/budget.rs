//! Slot memory as a budget: how many slots each job gets when the aggregator has a
//! fixed amount of slot memory (`AggregatorConfig::slot_memory`), as a switch has a
//! fixed SRAM.
//!
//! Shares are max-min fair in bytes: a job that asks for less than an equal split
//! keeps what it asked for, and what it leaves is split among the others, up to what
//! each asks for. A slot of one job may cost more than a slot of another (wider chunks,
//! more ranks; see `slots::slot_bytes`), so equal shares are equal bytes, not equal
//! slots. Every job is owed at least its minimal share, [`MIN_SLOTS`] slots (or what it
//! asked for, if less): a job whose minimal share does not fit beside the minimal
//! shares of the jobs present is refused.
//!
//! This module only computes shares; `regrant.rs` applies them to running jobs.

/// The fewest slots a job runs with (unless it asks for fewer): a window of four
/// packets keeps a stream moving, if slowly.
pub const MIN_SLOTS: u32 = 4;

/// One job's claim on the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    /// Bytes one of its slots costs.
    pub slot_bytes: usize,
    /// Slots it asks for (its window, capped by the aggregator's largest window).
    pub want: u32,
}

impl Demand {
    /// Its minimal share in slots.
    pub fn min_slots(&self) -> u32 {
        self.want.min(MIN_SLOTS)
    }

    /// Its minimal share in bytes.
    pub fn min_bytes(&self) -> usize {
        self.min_slots() as usize * self.slot_bytes
    }

    fn bytes(&self, slots: u32) -> usize {
        slots as usize * self.slot_bytes
    }

    /// Its share at water level `level` bytes: the level, but within its minimum and
    /// what it asks for.
    fn at_level(&self, level: usize) -> usize {
        level.clamp(self.min_bytes(), self.bytes(self.want))
    }
}

/// Max-min fair shares of `budget` bytes, in slots, one per demand. Each share lies
/// between the job's minimal share and what it wants; if even the minimal shares do
/// not fit, those are returned (the caller refuses jobs before that happens).
pub fn fair_shares(budget: usize, demands: &[Demand]) -> Vec<u32> {
    let total = |level: usize| -> usize { demands.iter().map(|d| d.at_level(level)).sum() };
    // The highest water level whose shares fit: a binary search over bytes (the total
    // only grows with the level), at most 64 rounds.
    let (mut lo, mut hi) = (
        0usize,
        demands.iter().map(|d| d.bytes(d.want)).max().unwrap_or(0),
    );
    if total(hi) <= budget {
        lo = hi;
    }
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if total(mid) <= budget {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let mut slots: Vec<u32> = demands
        .iter()
        .map(|d| {
            let s = d.at_level(lo) / d.slot_bytes.max(1);
            // Cannot truncate: at most `want`.
            s as u32
        })
        .collect();
    // Whole slots leave some bytes over: give one more slot to the jobs with the
    // smallest shares first, where it fits.
    let used: usize = demands.iter().zip(&slots).map(|(d, s)| d.bytes(*s)).sum();
    let mut left = budget.saturating_sub(used);
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by_key(|&i| (demands[i].bytes(slots[i]), i));
    for i in order {
        let d = demands[i];
        if slots[i] < d.want && d.slot_bytes <= left {
            slots[i] += 1;
            left -= d.slot_bytes;
        }
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(slot_bytes: usize, want: u32) -> Demand {
        Demand { slot_bytes, want }
    }

    #[test]
    fn equal_jobs_split_evenly() {
        assert_eq!(fair_shares(4800, &[d(100, 64); 3]), vec![16, 16, 16]);
        assert_eq!(fair_shares(4800, &[d(100, 64)]), vec![48]);
        assert_eq!(fair_shares(1 << 30, &[d(100, 64); 3]), vec![64, 64, 64]);
    }

    #[test]
    fn a_job_asking_for_less_keeps_it_and_the_rest_is_split() {
        assert_eq!(
            fair_shares(4800, &[d(100, 6), d(100, 64), d(100, 64)]),
            vec![6, 21, 21]
        );
    }

    #[test]
    fn shares_are_fair_in_bytes() {
        // A slot of the second job costs four of the first.
        assert_eq!(fair_shares(8000, &[d(100, 64), d(400, 64)]), vec![40, 10]);
    }

    #[test]
    fn minimal_shares_come_first() {
        // The level alone would give the dear job less than a slot.
        let s = fair_shares(2000, &[d(10, 1000), d(300, 64)]);
        assert_eq!(s[1], MIN_SLOTS);
        assert!(s[0] as usize * 10 + s[1] as usize * 300 <= 2000, "{s:?}");
    }

    #[test]
    fn leftover_bytes_become_slots() {
        // 1400 bytes over three jobs: 466 each is 4 slots of 100; 200 bytes remain.
        let s = fair_shares(1400, &[d(100, 64); 3]);
        assert_eq!(s.iter().sum::<u32>(), 14, "{s:?}");
        assert!(s.iter().all(|x| (4..=5).contains(x)), "{s:?}");
    }
}
