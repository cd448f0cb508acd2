//! The loop that runs the worker state machine over a UDP socket: send what is due in
//! GSO batches, wait for datagrams or the next deadline, feed them in, repeat until the
//! event the caller waits for.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use inagg_net::{header_overhead, SendBatch, UdpEndpoint};
use inagg_proto::wire::Grant;
use inagg_proto::worker::{Event, Worker, WorkerError};

use crate::{Error, Options};

/// Datagrams encoded before a flush.
const SEND_BATCH: usize = 64;
/// The longest single wait, so that a stop request is seen.
const MAX_WAIT: Duration = Duration::from_millis(100);

/// What one allreduce did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllreduceReport {
    /// Wall time from start to the last result.
    pub elapsed: Duration,
    /// Elements summed.
    pub elements: usize,
    /// Datagrams sent.
    pub packets_sent: u64,
    /// Bytes sent on the wire: datagrams plus IP and UDP headers.
    pub bytes_sent: u64,
    /// Datagrams received for this job.
    pub packets_received: u64,
    /// Bytes received on the wire: datagrams plus IP and UDP headers.
    pub bytes_received: u64,
    /// Contributions sent again after a timeout.
    pub retransmissions: u64,
    /// Wire bytes of those retransmissions (counted in `bytes_sent` too).
    pub retransmitted_bytes: u64,
    /// Retransmissions sent as header-only probes (the aggregator held the payload).
    pub probes: u64,
    /// Results received twice.
    pub duplicate_results: u64,
    /// Results that carried a congestion mark.
    pub marks: u64,
}

impl AllreduceReport {
    /// Adds the report of another stripe of the same allreduce: the elapsed time is
    /// the slower one's, counts add up.
    pub fn absorb(&mut self, o: &AllreduceReport) {
        self.elapsed = self.elapsed.max(o.elapsed);
        self.elements += o.elements;
        self.packets_sent += o.packets_sent;
        self.bytes_sent += o.bytes_sent;
        self.packets_received += o.packets_received;
        self.bytes_received += o.bytes_received;
        self.retransmissions += o.retransmissions;
        self.retransmitted_bytes += o.retransmitted_bytes;
        self.probes += o.probes;
        self.duplicate_results += o.duplicate_results;
        self.marks += o.marks;
    }
}

/// A socket and a worker state machine.
#[derive(Debug)]
pub(crate) struct Session {
    endpoint: UdpEndpoint,
    aggregator: SocketAddr,
    worker: Worker,
    batch: SendBatch,
    /// A failure seen by the heartbeat thread, reported by the next call.
    failed: Option<WorkerError>,
}

impl Session {
    /// A session with the aggregator at `aggregator`.
    pub fn new(opts: &Options, aggregator: SocketAddr) -> Result<Self, Error> {
        let worker = Worker::new(opts.protocol.clone(), Instant::now())?;
        let bind = opts.bind.unwrap_or_else(|| match aggregator {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        });
        let endpoint = UdpEndpoint::bind(bind, opts.socket_buffer)?;
        Ok(Self {
            endpoint,
            aggregator,
            worker,
            batch: SendBatch::new(),
            failed: None,
        })
    }

    pub fn grant(&self) -> Grant {
        // `connect` returns only after the grant arrived.
        self.worker.grant().copied().unwrap_or(Grant {
            job: 0,
            rank: 0,
            world: 0,
            codec: self.worker.codec().id(),
            chunk_elems: 0,
            window: 0,
            token: 0,
        })
    }

    pub fn join(&mut self) -> Result<(), Error> {
        self.drive(&mut [], |ev| matches!(ev, Event::Joined(_)))
            .map(|_| ())
    }

    pub fn allreduce(
        &mut self,
        data: &mut [f32],
        feedback: Option<u64>,
    ) -> Result<AllreduceReport, Error> {
        let g = self.grant();
        let _span = tracing::debug_span!(
            "allreduce",
            job = g.job,
            rank = g.rank,
            elements = data.len()
        )
        .entered();
        if let Some(e) = self.failed.clone() {
            return Err(e.into());
        }
        self.worker
            .start_allreduce(Instant::now(), data, feedback)?;
        match self.drive(data, |ev| matches!(ev, Event::AllreduceDone { .. }))? {
            Event::AllreduceDone { stats, elapsed } => {
                let per = header_overhead(&self.aggregator);
                tracing::debug!(
                    ?elapsed,
                    retransmissions = stats.retransmissions,
                    probes = stats.probes,
                    "allreduce done"
                );
                Ok(AllreduceReport {
                    elapsed,
                    elements: stats.elements,
                    packets_sent: stats.packets_sent,
                    bytes_sent: stats.bytes_sent + per * stats.packets_sent,
                    packets_received: stats.packets_received,
                    bytes_received: stats.bytes_received + per * stats.packets_received,
                    retransmissions: stats.retransmissions,
                    retransmitted_bytes: stats.retransmitted_bytes + per * stats.retransmissions,
                    probes: stats.probes,
                    duplicate_results: stats.duplicate_results,
                    marks: stats.marks,
                })
            }
            // `drive` returns only the event asked for, or an error.
            _ => Err(WorkerError::Closed.into()),
        }
    }

    /// Leaves the job: resends the leave until the aggregator echoes it, a few times
    /// at most (then the aggregator notices the silence instead).
    pub fn leave(&mut self) {
        self.worker.close();
        // The state machine gives up after its last try; this bounds the loop anyway.
        let deadline = Instant::now() + Duration::from_secs(1);
        while !self.worker.is_finished() && Instant::now() < deadline {
            if self.flush(&mut []).is_err() {
                return;
            }
            let now = Instant::now();
            let wait = self
                .worker
                .poll_timeout()
                .map_or(MAX_WAIT, |t| t.saturating_duration_since(now).min(MAX_WAIT));
            let (worker, agg) = (&mut self.worker, self.aggregator);
            if self
                .endpoint
                .recv(wait, |from, d| {
                    if from == agg {
                        worker.handle_datagram(Instant::now(), d, &mut []);
                    }
                })
                .is_err()
            {
                return;
            }
            let now = Instant::now();
            if self.worker.poll_timeout().is_some_and(|t| t <= now) {
                self.worker.handle_timeout(now);
            }
        }
    }

    /// One round without waiting: used by the heartbeat thread between calls.
    pub fn service(&mut self) {
        if self.worker.is_finished() {
            return;
        }
        let now = Instant::now();
        let (worker, agg) = (&mut self.worker, self.aggregator);
        let _ = self.endpoint.recv(Duration::ZERO, |from, d| {
            if from == agg {
                worker.handle_datagram(now, d, &mut []);
            }
        });
        if self.worker.poll_timeout().is_some_and(|t| t <= now) {
            self.worker.handle_timeout(now);
        }
        let _ = self.flush(&mut []);
        while let Some(ev) = self.worker.poll_event() {
            if let Event::Failed(e) = ev {
                self.failed = Some(e);
            }
        }
    }

    fn flush(&mut self, data: &mut [f32]) -> std::io::Result<()> {
        let now = Instant::now();
        loop {
            let (worker, agg) = (&mut self.worker, self.aggregator);
            while self.batch.len() < SEND_BATCH
                && self
                    .batch
                    .push_with(|buf| worker.poll_transmit_append(now, data, buf).then_some(agg))
            {
            }
            if self.batch.is_empty() {
                return Ok(());
            }
            self.batch.flush(&self.endpoint)?;
        }
    }

    /// Runs the loop until `want` matches an event (returned) or the worker fails.
    fn drive(&mut self, data: &mut [f32], want: impl Fn(&Event) -> bool) -> Result<Event, Error> {
        loop {
            self.flush(data)?;
            while let Some(ev) = self.worker.poll_event() {
                if let Event::Failed(e) = ev {
                    self.failed = Some(e.clone());
                    return Err(e.into());
                }
                if want(&ev) {
                    return Ok(ev);
                }
            }
            let now = Instant::now();
            let deadline = self.worker.poll_timeout();
            let wait =
                deadline.map_or(MAX_WAIT, |t| t.saturating_duration_since(now).min(MAX_WAIT));
            let (worker, agg) = (&mut self.worker, self.aggregator);
            self.endpoint.recv(wait, |from, d| {
                if from == agg {
                    worker.handle_datagram(Instant::now(), d, data);
                }
            })?;
            let now = Instant::now();
            if self.worker.poll_timeout().is_some_and(|t| t <= now) {
                self.worker.handle_timeout(now);
            }
        }
    }
}
