//! What a worker drops, by reason: every datagram from the aggregator's address that
//! changed nothing is counted under one of these, so that a rank under attack, or
//! talking to a broken aggregator, can say what it saw.

use std::fmt;

/// Why a worker dropped a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The datagram did not decode.
    Malformed,
    /// A message only aggregators receive (join, contribution, regrant).
    WrongDirection,
    /// For another job.
    OtherJob,
    /// A result or echo whose session token is not this rank's (or came before its
    /// grant).
    BadToken,
    /// A grant or error without this session's join nonce: forged, or meant for an
    /// earlier session of the same address.
    BadNonce,
    /// A grant whose job, rank, world, codec, chunk, window or group differ from what
    /// the rank asked for.
    GrantMismatch,
    /// A valid message that fits no state of the rank: a grant when none is awaited, a
    /// result when no allreduce runs or that is not one of its packets, a duplicate
    /// result, a leave echo when not leaving, an error that is not about its
    /// membership once joined.
    Unexpected,
}

impl DropReason {
    /// Every reason, in a fixed order (the index of [`Dropped`]).
    pub const ALL: [DropReason; 7] = [
        DropReason::Malformed,
        DropReason::WrongDirection,
        DropReason::OtherJob,
        DropReason::BadToken,
        DropReason::BadNonce,
        DropReason::GrantMismatch,
        DropReason::Unexpected,
    ];

    /// A short snake_case name, for logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::WrongDirection => "wrong_direction",
            DropReason::OtherJob => "other_job",
            DropReason::BadToken => "bad_token",
            DropReason::BadNonce => "bad_nonce",
            DropReason::GrantMismatch => "grant_mismatch",
            DropReason::Unexpected => "unexpected",
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

/// Datagrams a worker dropped, by reason, over its whole session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dropped([u64; DropReason::ALL.len()]);

impl Dropped {
    /// Counts one.
    pub fn add(&mut self, reason: DropReason) {
        self.0[reason.index()] += 1;
    }

    /// Adds another worker's counts (the sessions of one striped rank).
    pub fn absorb(&mut self, other: &Dropped) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a += b;
        }
    }

    /// Datagrams dropped for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason.index()]
    }

    /// Datagrams dropped for any reason.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Every reason with its count, in [`DropReason::ALL`]'s order.
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.get(*r)))
    }
}
