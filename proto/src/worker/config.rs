//! A worker's settings: its job and rank, codec, chunk and window, timeouts, and the
//! knobs of its allreduces; [`WorkerConfig::validate`] says what cannot work.

use std::time::Duration;

use super::ConfigError;
use crate::codec::{self, Codec, CodecId};
use crate::wire::{self, MAX_SECRET_LEN};

/// How long every rank has to join unless told otherwise
/// ([`WorkerConfig::join_timeout`]).
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a worker waits on a silent aggregator unless told otherwise
/// ([`WorkerConfig::aggregator_timeout`]).
pub const DEFAULT_AGGREGATOR_TIMEOUT: Duration = Duration::from_secs(10);

/// The queue rule's target unless told otherwise ([`WorkerConfig::queue_target`];
/// docs/protocol.md, 6.10 says how it was chosen).
pub const DEFAULT_QUEUE_TARGET: u32 = 24;

/// Settings of one worker (one rank of one job).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The job id, shared by all ranks.
    pub job: u32,
    /// This worker's rank, below `world`.
    pub rank: u16,
    /// The number of ranks.
    pub world: u16,
    /// The codec every rank uses.
    pub codec: CodecId,
    /// Elements per chunk (per packet).
    pub chunk_elems: u16,
    /// Slots to ask for (the window); the aggregator may grant fewer.
    pub window: u32,
    /// Run AIMD on the window from congestion marks and losses (on by default).
    pub congestion_control: bool,
    /// With congestion control, the packets of this rank's own that may wait in
    /// queues on the path before the window halves: the queue rule
    /// ([`Cwnd`](super::Cwnd)); `None` turns it off.
    pub queue_target: Option<u32>,
    /// With congestion control, how long the smallest RTT may stand before the rank
    /// holds its window at the smallest for a moment to see the path empty: the
    /// dip rule ([`Cwnd`](super::Cwnd)); `None` turns it off. Rank 0 alone runs
    /// the rule: its dip holds every rank's packets back, so rank 0's setting is
    /// the job's, and the other ranks' is not used.
    pub dip_interval: Option<Duration>,
    /// With congestion control, how long the queue rule and the dip rule stand
    /// aside after a loss burst, while loss-based flows keep the queue overflowing:
    /// the overflow rule ([`Cwnd`](super::Cwnd)); `None` turns it off.
    pub overflow_hold: Option<Duration>,
    /// With congestion control, the pacing rule: the rank sends at most this many
    /// times the rate at which its results came back over about the last second
    /// ([`Pacer`](super::Pacer)), at least 1; `None` turns it off.
    pub pacing_gain: Option<f64>,
    /// The job's shared secret, at most 64 bytes.
    pub secret: Vec<u8>,
    /// How often to resend a join until the grant arrives.
    pub join_interval: Duration,
    /// Give up joining after this long (every rank must join within it).
    pub join_timeout: Duration,
    /// Send a heartbeat when the link has been quiet this long.
    pub heartbeat_interval: Duration,
    /// Fail when nothing at all came from the aggregator for this long.
    pub aggregator_timeout: Duration,
    /// Fail an allreduce in which no result arrived for this long (a peer that is
    /// alive but never calls allreduce). Long enough for any honest straggler.
    pub progress_timeout: Duration,
    /// Retransmission timeout before the first RTT sample.
    pub initial_rto: Duration,
    /// Lower bound of the retransmission timeout.
    pub min_rto: Duration,
    /// Upper bound of the retransmission timeout (after backoff).
    pub max_rto: Duration,
    /// Stochastic rounding, with this seed (unbiased; every rank and retransmission
    /// draws from its own reproducible stream). `None`: round to nearest.
    pub stochastic_rounding: Option<u64>,
    /// Chunks that are zero on every rank travel as headers only.
    pub skip_zeros: bool,
    /// Ask for results sent to a group ([`Join::groups`](crate::wire::Join::groups)): the driver can join the
    /// group a grant names ([`Grant::group`](crate::wire::Grant::group)) before the first allreduce. Off by
    /// default; the UDP driver turns it on toward a loopback aggregator.
    pub groups: bool,
    /// This session's join nonce ([`Join::nonce`](crate::wire::Join::nonce)): grants and errors without it are
    /// dropped. Drivers draw it from the operating system's randomness; a guessable
    /// nonce lets anyone who can send from the aggregator's address fail the rank.
    pub nonce: u64,
    /// Allreduces this rank completed in the job before this session ([`Join::completed`](crate::wire::Join::completed)):
    /// 0, or after a failover the count from the session before.
    pub completed: u64,
    /// The aggregator's admission key, if it has one: every join proves it
    /// ([`Join::prove`](crate::wire::Join::prove)).
    pub admission_key: Option<Vec<u8>>,
}

/// Whether `gain` can be a pacing gain ([`WorkerConfig::pacing_gain`]): at least 1
/// (below, a rank would send ever slower) and finite.
pub fn is_pacing_gain(gain: f64) -> bool {
    gain >= 1.0 && gain.is_finite()
}

impl WorkerConfig {
    /// Checks that these settings can work; returns the codec they name.
    pub fn validate(&self) -> Result<&'static dyn Codec, ConfigError> {
        let codec = codec::lookup(self.codec).ok_or(ConfigError::Codec(self.codec))?;
        if self.world == 0 || self.rank >= self.world {
            return Err(ConfigError::Rank {
                rank: self.rank,
                world: self.world,
            });
        }
        if self.world > codec.max_world() {
            return Err(ConfigError::World {
                codec: codec.name(),
                max: codec.max_world(),
            });
        }
        if let Some(g) = self.pacing_gain.filter(|&g| !is_pacing_gain(g)) {
            return Err(ConfigError::PacingGain(g.to_string()));
        }
        if self.secret.len() > MAX_SECRET_LEN {
            return Err(ConfigError::Secret);
        }
        if self.chunk_elems == 0
            || self.window == 0
            || wire::DATA_HEADER_LEN + codec::payload_bytes(codec, usize::from(self.chunk_elems))
                > wire::MAX_DATAGRAM
        {
            return Err(ConfigError::Size);
        }
        Ok(codec)
    }

    /// Defaults for everything but the job's identity.
    pub fn new(job: u32, rank: u16, world: u16, codec: CodecId) -> Self {
        Self {
            job,
            rank,
            world,
            codec,
            chunk_elems: 256,
            window: 256,
            congestion_control: true,
            queue_target: Some(DEFAULT_QUEUE_TARGET),
            dip_interval: Some(super::DEFAULT_DIP_INTERVAL),
            overflow_hold: Some(super::DEFAULT_OVERFLOW_HOLD),
            pacing_gain: Some(super::PACING_GAIN),
            secret: Vec::new(),
            join_interval: Duration::from_millis(200),
            join_timeout: DEFAULT_JOIN_TIMEOUT,
            heartbeat_interval: Duration::from_millis(500),
            aggregator_timeout: DEFAULT_AGGREGATOR_TIMEOUT,
            progress_timeout: Duration::from_secs(60),
            // Loopback RTTs are tens of microseconds, but a busy host deschedules a
            // process for milliseconds: the floor keeps retransmissions for real
            // losses (a lower one set off many spurious ones where ranks share cores;
            // docs/performance.md, "Retransmission timeout floor").
            initial_rto: Duration::from_millis(100),
            min_rto: Duration::from_millis(20),
            max_rto: Duration::from_secs(1),
            stochastic_rounding: None,
            skip_zeros: false,
            groups: false,
            nonce: 0,
            completed: 0,
            admission_key: None,
        }
    }
}
