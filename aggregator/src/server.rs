//! The UDP front end: one socket, one thread, the state machine in the middle.
//!
//! The loop: receive a batch (up to 32 `recvmmsg` buffers, GRO-coalesced), hand every
//! datagram to the state machine, fire due timers, then drain every datagram the state
//! machine wants to send into a [`SendBatch`], which groups them by destination and
//! sends each run with one GSO call. Results are encoded straight into the batch's
//! arena from the slots' kept copies: nothing is allocated per datagram.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use inagg_net::{SendBatch, UdpEndpoint, DEFAULT_SOCKET_BUFFER};
use inagg_proto::aggregator::{Aggregator, AggregatorConfig, Event, Stats};
use thiserror::Error;
use tracing::{debug, info, info_span, warn};

/// Settings of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Socket buffer size to ask the kernel for.
    pub socket_buffer: usize,
    /// The protocol's settings.
    pub protocol: AggregatorConfig,
    /// The longest the loop waits before looking at the stop flag again.
    pub poll_interval: Duration,
}

impl ServerConfig {
    /// Defaults, listening on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            socket_buffer: DEFAULT_SOCKET_BUFFER,
            protocol: AggregatorConfig::default(),
            poll_interval: Duration::from_millis(50),
        }
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, Error)]
pub enum ServerError {
    /// Binding the socket failed.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The socket failed while serving.
    #[error("socket error")]
    Io(#[from] io::Error),
}

/// Full receive batches in a row after which the aggregator counts as falling behind
/// and marks the results it completes (about 8 x 32 GRO buffers of datagrams waiting).
const BACKLOG_STREAK: u32 = 8;

/// Datagrams drained from the state machine before a flush.
const SEND_BATCH: usize = 256;

/// A bound aggregator, ready to run.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    endpoint: UdpEndpoint,
    agg: Aggregator<SocketAddr>,
}

impl Server {
    /// Binds the socket.
    pub fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        let endpoint =
            UdpEndpoint::bind(config.listen, config.socket_buffer).map_err(|source| {
                ServerError::Bind {
                    addr: config.listen,
                    source,
                }
            })?;
        if let Ok(n) = endpoint.recv_buffer_size() {
            if n < config.socket_buffer {
                warn!(
                    granted = n,
                    asked = config.socket_buffer,
                    "small socket receive buffer: raise net.core.rmem_max"
                );
            }
        }
        let agg = Aggregator::new(config.protocol.clone());
        Ok(Self {
            config,
            endpoint,
            agg,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Serves until `stop` is set; then aborts every job (telling its ranks) and returns
    /// the counters. Network input never ends the loop; only a socket error does.
    pub fn run(self, stop: &AtomicBool) -> Result<Stats, ServerError> {
        self.run_observed(stop, Duration::MAX, |_| {})
    }

    /// [`Server::run`], calling `observe` with the state machine (its counters, jobs
    /// and slots) about every `every`, and once at the end: how metrics exporters see
    /// the aggregator without sharing its state.
    pub fn run_observed(
        mut self,
        stop: &AtomicBool,
        every: Duration,
        mut observe: impl FnMut(&Aggregator<SocketAddr>),
    ) -> Result<Stats, ServerError> {
        let mut observed = Instant::now();
        let mut streak = 0u32;
        let span = info_span!("aggregator", addr = %self.local_addr()?);
        let _enter = span.enter();
        info!(gso = self.endpoint.max_gso_segments(), "serving");
        let mut batch = SendBatch::new();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let wait = match self.agg.poll_timeout() {
                Some(t) => t
                    .saturating_duration_since(now)
                    .min(self.config.poll_interval),
                None => self.config.poll_interval,
            };
            let agg = &mut self.agg;
            let got = self
                .endpoint
                .recv(wait, |from, d| agg.handle_datagram(now, from, d))?;
            streak = if self.endpoint.last_batch_full() {
                streak.saturating_add(1)
            } else {
                0
            };
            self.agg.set_backlogged(streak >= BACKLOG_STREAK);
            let now = Instant::now();
            if self.agg.poll_timeout().is_some_and(|t| t <= now) {
                self.agg.handle_timeout(now);
            }
            self.flush(&mut batch)?;
            self.log_events();
            if now.saturating_duration_since(observed) >= every {
                observe(&self.agg);
                observed = now;
            }
            if got == 0 {
                continue;
            }
        }
        info!("shutting down");
        self.agg.shutdown(Instant::now());
        self.flush(&mut batch)?;
        self.log_events();
        observe(&self.agg);
        let stats = self.agg.stats().clone();
        info!(
            received = stats.packets_received,
            sent = stats.packets_sent,
            dropped = stats.dropped_total(),
            gso_calls = batch.calls,
            "stopped"
        );
        Ok(stats)
    }

    fn flush(&mut self, batch: &mut SendBatch) -> Result<(), ServerError> {
        loop {
            let agg = &mut self.agg;
            while batch.len() < SEND_BATCH && batch.push_with(|buf| agg.poll_transmit_append(buf)) {
            }
            if batch.is_empty() {
                return Ok(());
            }
            batch.flush(&self.endpoint)?;
        }
    }

    fn log_events(&mut self) {
        while let Some(ev) = self.agg.poll_event() {
            let job = match &ev {
                Event::JobStarted { job, .. }
                | Event::JobAborted { job, .. }
                | Event::JobEnded { job, .. } => *job,
            };
            // A span per job: `RUST_LOG=inagg_aggregator[job{job=7}]=debug` follows one.
            let _job = info_span!("job", job).entered();
            match ev {
                Event::JobStarted {
                    world,
                    window,
                    codec,
                    ..
                } => info!(world, window, codec, "job started"),
                Event::JobAborted { code, text, .. } => warn!(?code, "job aborted: {text}"),
                Event::JobEnded { stats, .. } => debug!(
                    chunks = stats.chunks_completed,
                    copies = stats.copies_answered,
                    dropped = stats.dropped_total(),
                    "job ended"
                ),
            }
        }
    }
}
