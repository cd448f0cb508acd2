//! Counters the aggregator keeps: what it received, what it sent, and every packet it
//! dropped, by reason.

use std::fmt;

/// Why the aggregator dropped (or refused) a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The datagram did not decode.
    Malformed,
    /// A message only workers receive (grant, result, error) sent to the aggregator.
    WrongDirection,
    /// No such job.
    UnknownJob,
    /// The session token is not the job's.
    BadToken,
    /// The rank is not below the job's world size.
    RankOutOfRange,
    /// The sender's address is not the one that joined as that rank.
    NotMember,
    /// The codec differs from the job's.
    CodecMismatch,
    /// Slot beyond the pool, or slot and version that do not match the sequence number.
    SlotOutOfRange,
    /// More elements than the job's chunk size.
    CountTooLarge,
    /// A chunk the slot has moved past.
    Stale,
    /// A chunk two generations ahead of an open one.
    Ahead,
    /// A rank's second contribution to the same chunk.
    Duplicate,
    /// Count or scale differ from the other ranks' for the same chunk.
    Inconsistent,
    /// A join with the wrong secret.
    BadSecret,
    /// A join whose world size, codec or chunk size differ from the job's.
    ParamMismatch,
    /// A join the aggregator has no room for.
    NoCapacity,
    /// A join for a rank another address holds.
    RankTaken,
    /// A data packet for a job whose ranks have not all joined.
    NotRunning,
    /// A probe for a contribution the aggregator does not hold (the rank then resends
    /// its payload).
    ProbeMissing,
    /// A join without a valid proof of the aggregator's admission key.
    NotAdmitted,
    /// A job whose ranks re-joined after a failover from different points.
    Diverged,
    /// A contribution to an open chunk while the aggregator shuts down.
    Draining,
    /// A partial sum for a job of ranks, or a rank's contribution for a job of racks
    /// (docs/protocol.md 8.5).
    LevelMismatch,
}

impl DropReason {
    /// Every reason, in a fixed order (the index of [`Stats::dropped`]).
    pub const ALL: [DropReason; 23] = [
        DropReason::Malformed,
        DropReason::WrongDirection,
        DropReason::UnknownJob,
        DropReason::BadToken,
        DropReason::RankOutOfRange,
        DropReason::NotMember,
        DropReason::CodecMismatch,
        DropReason::SlotOutOfRange,
        DropReason::CountTooLarge,
        DropReason::Stale,
        DropReason::Ahead,
        DropReason::Duplicate,
        DropReason::Inconsistent,
        DropReason::BadSecret,
        DropReason::ParamMismatch,
        DropReason::NoCapacity,
        DropReason::RankTaken,
        DropReason::NotRunning,
        DropReason::ProbeMissing,
        DropReason::NotAdmitted,
        DropReason::Diverged,
        DropReason::Draining,
        DropReason::LevelMismatch,
    ];

    /// A short snake_case name, for logs and metrics labels.
    pub fn name(self) -> &'static str {
        use DropReason::*;
        match self {
            Malformed => "malformed",
            WrongDirection => "wrong_direction",
            UnknownJob => "unknown_job",
            BadToken => "bad_token",
            RankOutOfRange => "rank_out_of_range",
            NotMember => "not_member",
            CodecMismatch => "codec_mismatch",
            SlotOutOfRange => "slot_out_of_range",
            CountTooLarge => "count_too_large",
            Stale => "stale",
            Ahead => "ahead",
            Duplicate => "duplicate",
            Inconsistent => "inconsistent",
            BadSecret => "bad_secret",
            ParamMismatch => "param_mismatch",
            NoCapacity => "no_capacity",
            RankTaken => "rank_taken",
            NotRunning => "not_running",
            ProbeMissing => "probe_missing",
            NotAdmitted => "not_admitted",
            Diverged => "diverged",
            Draining => "draining",
            LevelMismatch => "level_mismatch",
        }
    }

    fn index(self) -> usize {
        // ALL lists every variant once, so the search always succeeds.
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Counters, for the whole aggregator or for one job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams handed to the aggregator.
    pub packets_received: u64,
    /// Bytes of those datagrams.
    pub bytes_received: u64,
    /// Datagrams the aggregator produced.
    pub packets_sent: u64,
    /// Bytes of those datagrams.
    pub bytes_sent: u64,
    /// Contributions added to a slot.
    pub contributions: u64,
    /// Chunks completed (all ranks in).
    pub chunks_completed: u64,
    /// Retransmitted contributions answered from a kept copy.
    pub copies_answered: u64,
    /// Probes and duplicate contributions answered "held" (the rank's contribution
    /// waits for others).
    pub probes_held: u64,
    /// Results sent with a congestion mark.
    pub marks: u64,
    /// Jobs still forming (not every rank joined) forgotten to make room for a new
    /// one when the aggregator held `max_jobs`.
    pub pending_evicted: u64,
    /// Dropped packets, indexed like [`DropReason::ALL`].
    pub dropped: [u64; DropReason::ALL.len()],
}

impl Stats {
    /// Counts one dropped packet.
    pub fn drop(&mut self, reason: DropReason) {
        self.dropped[reason.index()] += 1;
    }

    /// Packets dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()]
    }

    /// Packets dropped for any reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}
