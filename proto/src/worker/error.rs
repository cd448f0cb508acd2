//! Why a worker's settings cannot work ([`ConfigError`]) and why its job or an
//! allreduce failed ([`WorkerError`]).

use std::time::Duration;

use thiserror::Error;

use crate::codec::{self, CodecId};
use crate::wire::{ErrorCode, MAX_SECRET_LEN};

/// A setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// Rank not below world size, or world size 0.
    #[error("rank {rank} is not below the world size {world}")]
    Rank {
        /// The rank asked for.
        rank: u16,
        /// The world size.
        world: u16,
    },
    /// Unknown codec id.
    #[error("unknown codec {0:?}")]
    Codec(CodecId),
    /// Secret too long.
    #[error("the job secret is longer than {MAX_SECRET_LEN} bytes")]
    Secret,
    /// A pacing gain below 1 (the rank would send ever slower) or not a number.
    #[error("the pacing gain must be at least 1, got {0}")]
    PacingGain(String),
    /// Chunk size or window of zero, or a chunk that does not fit a datagram.
    #[error("chunk size and window must be positive and a chunk must fit a datagram")]
    Size,
    /// World size beyond what the codec can sum without overflow.
    #[error("codec {codec} supports at most {max} ranks")]
    World {
        /// The codec's name.
        codec: &'static str,
        /// Its limit.
        max: u16,
    },
}

/// Why a worker's job or allreduce failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WorkerError {
    /// No grant in time.
    #[error(
        "no grant within {0:?}: the aggregator is unreachable, not every rank joined, or its slot memory is still held by other jobs"
    )]
    JoinTimeout(Duration),
    /// The aggregator refused the join.
    #[error("the aggregator refused to admit this rank: {text}")]
    Refused {
        /// What kind of refusal.
        code: ErrorCode,
        /// The aggregator's words.
        text: String,
    },
    /// The aggregator aborted the job.
    #[error("job aborted by the aggregator: {text}")]
    Aborted {
        /// Why.
        code: ErrorCode,
        /// The rank the abort is about, if any.
        rank: Option<u16>,
        /// The aggregator's words.
        text: String,
    },
    /// No result arrived for too long while the aggregator was alive: some rank does
    /// not take part in the allreduce (or called it with another length).
    #[error("no progress for {0:?}: some rank is not taking part in this allreduce")]
    Stalled(Duration),
    /// Nothing came from the aggregator for too long.
    #[error("nothing heard from the aggregator for {0:?}: it is down or unreachable")]
    AggregatorSilent(Duration),
    /// The input holds a value the codec cannot carry.
    #[error(transparent)]
    NonFinite(#[from] codec::NonFinite),
    /// An allreduce was started before the job was granted or while another ran.
    #[error("the worker is not ready for an allreduce ({0})")]
    NotReady(&'static str),
    /// The worker already failed or closed.
    #[error("the worker is closed")]
    Closed,
}
