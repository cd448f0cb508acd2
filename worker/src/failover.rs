//! Failover: a job outlives its aggregator.
//!
//! With [`Options::failover`] (`inagg worker --failover ADDR[,ADDR...]`, Python
//! `failover=[...]`, the DDP hook's `INAGG_FAILOVER`), a rank whose aggregator fails
//! — refuses the connection (ICMP port unreachable: the process is gone), goes silent
//! for `aggregator_timeout`, or shuts down (`Shutdown`) — while joining or in an
//! allreduce, leaves it and joins the same job (id, rank, world, codec, chunk, secret,
//! key) at the next address of the list, and redoes the interrupted allreduce from its
//! input. A failure noticed between allreduces (by the heartbeat thread) is acted on at
//! the next call. Every rank lists the same addresses in the same order, so all meet
//! at the same one; the new aggregator starts the job once every rank has joined.
//!
//! Each join says how many allreduces the rank completed ([`Join::completed`]). A rank
//! may have received the last result of an allreduce that another rank never got
//! before the crash; the two would then redo different allreduces. The new aggregator
//! refuses such a job ([`ErrorCode::Diverged`], naming both ranks and counts), so the
//! ranks fail with a clear error instead of summing two different allreduces.
//!
//! What it costs: one copy of the tensor, kept while an allreduce runs (the allreduce
//! writes results over its input as they come), and one memory copy of the tensor per
//! allreduce; nothing without a failover address. Error feedback starts afresh on the
//! new aggregator (the residuals were the old session's).
//!
//! [`Join::completed`]: inagg_proto::wire::Join::completed
//! [`ErrorCode::Diverged`]: inagg_proto::wire::ErrorCode::Diverged

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use inagg_proto::wire::ErrorCode;
use inagg_proto::worker::WorkerError;

use crate::{AllreduceReport, Error, Options, Stripe, Worker};

/// One failover: where the job went, and how long the rank took from noticing the
/// failure to its grant there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    /// The aggregator that failed.
    pub from: SocketAddr,
    /// The aggregator the job moved to.
    pub to: SocketAddr,
    /// What the rank saw of the failure.
    pub cause: String,
    /// From the failure to the new grant (every rank must re-join first).
    pub resumed_after: Duration,
}

/// Whether `e` says the aggregator itself is gone, so that the job may move on.
fn aggregator_lost(e: &Error) -> bool {
    matches!(
        e,
        Error::Refused(_)
            | Error::Protocol(WorkerError::AggregatorSilent(_))
            | Error::Protocol(WorkerError::Aborted {
                code: ErrorCode::Shutdown,
                ..
            })
            | Error::Protocol(WorkerError::Refused {
                code: ErrorCode::Shutdown,
                ..
            })
    )
}

/// A rank's sessions, and what it needs to move them to another aggregator.
#[derive(Debug)]
pub(crate) struct Rank {
    /// One session per aggregator (or shard) the job is striped over.
    pub stripes: Vec<Stripe>,
    /// The settings, with the aggregator in use.
    opts: Options,
    /// The next address of `opts.failover` to move to.
    next: usize,
    /// Allreduces completed, over every aggregator.
    completed: u64,
    /// The input of the running allreduce, kept to redo it elsewhere.
    saved: Vec<f32>,
    /// The failovers so far.
    pub failovers: Vec<Failover>,
}

impl Rank {
    /// Joins the job at `opts.aggregator` (and the aggregators and shards it
    /// stripes over), moving on down `opts.failover` while an aggregator is lost.
    pub fn connect(opts: Options) -> Result<Self, Error> {
        let mut rank = Self {
            stripes: Vec::new(),
            opts,
            next: 0,
            completed: 0,
            saved: Vec::new(),
            failovers: Vec::new(),
        };
        let since = Instant::now();
        if let Err(e) = rank.join() {
            rank.move_on(e, since)?;
        }
        Ok(rank)
    }

    /// Joins at the current address; on failure leaves what was joined.
    fn join(&mut self) -> Result<(), Error> {
        self.opts.protocol.completed = self.completed;
        let mut stripes = Vec::new();
        let joined = Worker::join_all(&self.opts, &mut stripes);
        if joined.is_err() {
            for s in &stripes {
                s.shutdown();
            }
            stripes.clear();
        }
        self.stripes = stripes;
        joined
    }

    /// Whether an address is left to move to.
    fn can_move(&self) -> bool {
        self.next < self.opts.failover.len()
    }

    /// After `e`, moves the job to the next failover addresses until one grants it;
    /// returns `e` (or the last address's error) where none is left or the error is
    /// not the aggregator's loss.
    fn move_on(&mut self, mut e: Error, since: Instant) -> Result<(), Error> {
        // Bounded: each pass consumes one address.
        while aggregator_lost(&e) && self.can_move() {
            for s in &self.stripes {
                s.shutdown();
            }
            self.stripes.clear();
            let from = self.opts.aggregator;
            let to = self.opts.failover[self.next];
            self.next += 1;
            tracing::warn!(%from, %to, error = %e, "aggregator lost: moving the job");
            self.opts.aggregator = to;
            // The job moves as a whole to one aggregator (and its shards).
            self.opts.stripes.clear();
            match self.join() {
                Ok(()) => {
                    self.failovers.push(Failover {
                        from,
                        to,
                        cause: e.to_string(),
                        resumed_after: since.elapsed(),
                    });
                    return Ok(());
                }
                Err(next) => e = next,
            }
        }
        Err(e)
    }

    /// Sums `data` with the other ranks' buffers; where the aggregator is lost, moves
    /// the job and redoes the allreduce there from the kept input.
    pub fn allreduce(
        &mut self,
        data: &mut [f32],
        key: Option<u64>,
    ) -> Result<AllreduceReport, Error> {
        let keep = self.can_move();
        if keep {
            self.saved.clear();
            self.saved.extend_from_slice(data);
        }
        // Bounded: each failed pass moves to the next address or returns.
        loop {
            match Worker::striped(&self.stripes, data, key) {
                Ok(r) => {
                    self.completed += 1;
                    return Ok(r);
                }
                Err(e) if keep && aggregator_lost(&e) && self.can_move() => {
                    let since = Instant::now();
                    data.copy_from_slice(&self.saved);
                    self.move_on(e, since)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Leaves the job everywhere and stops the heartbeat threads.
    pub fn shutdown(&mut self) {
        for s in &self.stripes {
            s.shutdown();
        }
    }
}
