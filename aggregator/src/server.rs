//! The server loop: one front end, one thread, the state machine in the middle.
//!
//! The loop ([`Server::turn`]): receive a batch, hand every message to the state
//! machine, fire due timers, then drain every message the state machine wants to send
//! into the front end. The loop is the same for every transport; a [`Front`] (an
//! [`inagg_net::Transport`]) is the layer under it:
//!
//! - [`UdpFront`]: receives up to 32 `recvmmsg` buffers (GRO-coalesced, 128 KiB) per
//!   call, and collects sends in a `SendBatch`, which groups them by destination and
//!   sends each run as one GSO message, many per `sendmmsg`. A result's header is
//!   encoded into the batch's arena and its payload goes to the kernel from the slot's
//!   kept copy, the same bytes for every rank: nothing is allocated or copied per
//!   datagram.
//! - [`MemFront`]: a socket of the in-memory network, for tests.
//! - [`QuicFront`]: a [`QuicListener`], whose connections deliver messages tagged with
//!   the peer's address, as a socket would; answers go back on the peer's stream or as
//!   datagrams.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use inagg_net::mem::{MemNet, MemSocket};
use inagg_net::{
    group, Head, Outbox, Transport, Udp, UdpEndpoint, Undeliverable, DEFAULT_SOCKET_BUFFER,
};
use inagg_proto::aggregator::{Aggregator, AggregatorConfig, Body, Event, Stats};
use inagg_quic::{Identity, QuicListener};
use thiserror::Error;
use tracing::{debug, info, info_span, warn};

/// The slot memory budget of a server (one shard of `inagg aggregator --threads`, or
/// its QUIC listener) unless told otherwise (`--slot-memory`): 1 GiB. Without a
/// budget each job got the window it asked for, up to `max_window` (1024) slots of up
/// to 655 KB (65,460 elements of i8, the most one datagram carries with its
/// exponents), so one
/// unauthenticated one-rank join could claim 670 MB and 64 of them 43 GB.
pub const DEFAULT_SLOT_MEMORY: usize = 1 << 30;

/// The most slot memory one job holds on a server unless told otherwise (`inagg
/// aggregator --max-job-memory`): [`DEFAULT_SLOT_MEMORY`] over the default 64 jobs, 16
/// MiB. So the default budget holds every job the default job limit admits, each at
/// its cap, and no job waits for another's memory (with the budget alone, two joins
/// asking for 1024 slots of the widest chunks took it all, and every later job waited
/// for them to leave). Above what jobs ask for at the default windows on loopback (2
/// MiB for 16 slots of f32's 16,256-element chunks, 6 MiB for f16's 32,512, 9.8 MiB
/// for i8's 18 of 57,344); a window of 1024 slots of 8192-element f32 chunks is capped
/// at 255.
pub const DEFAULT_MAX_JOB_MEMORY: usize =
    DEFAULT_SLOT_MEMORY / inagg_proto::aggregator::DEFAULT_MAX_JOBS;

/// Yields before a UDP server loop sleeps in `poll(2)` when no datagram is waiting,
/// unless told otherwise (`inagg aggregator --yields-before-sleep`): 64, adapting
/// within that (see [`UdpEndpoint::set_yields_before_sleep`]).
///
/// An aggregator that sleeps as soon as its queue runs dry must be woken by the next
/// contribution: the sending rank pays for the wakeup inside its `sendmmsg` (an
/// inter-processor interrupt, dear in a virtual machine), and the aggregator a context
/// switch. Where the ranks outnumber the cores it sleeps hundreds of times per
/// allreduce, and those wakeups are a large part of the ranks' time in `sendmmsg`.
/// Yielding instead lets the ranks run and finds their datagrams there, which made
/// allreduces faster for every codec measured (docs/performance.md, "Yielding before
/// sleeping"). On a host of its own a yield returns at once, so the spin is a busy
/// poll of some tens of microseconds per wait, and where waits keep ending in sleep it
/// settles at a few yields.
pub const DEFAULT_YIELDS_BEFORE_SLEEP: u32 = 64;

/// How long a stopping server keeps answering retransmissions of completed chunks
/// before it tells every rank it shuts down ([`Aggregator::drain`]): a few of the
/// workers' retransmission timeouts (their initial and their least one).
pub const DRAIN: Duration = Duration::from_millis(300);

/// How long a stopped server keeps answering its jobs' ranks with the shutdown error
/// after it first sent it: a rank whose copy was lost hears it again on its next
/// retransmission, instead of waiting for its silence timeout.
pub const FAREWELL: Duration = Duration::from_millis(200);

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
    /// Over UDP, times the loop yields the CPU, looking at the socket after each,
    /// before it sleeps ([`DEFAULT_YIELDS_BEFORE_SLEEP`]; 0 sleeps at once). Not used
    /// by [`Server::bind_quic`]: quinn drives its socket.
    pub yields_before_sleep: u32,
    /// Over UDP bound to an IPv4 loopback address, send each result of a job whose
    /// ranks all asked for it once, to a multicast group they joined, instead of once
    /// per rank ([`inagg_net::group`]; on by default). Not used by
    /// [`Server::bind_quic`]: a QUIC connection is one peer's.
    pub multicast: bool,
    /// Over UDP, send ECN-capable datagrams (ECT(0)) and take a contribution that
    /// arrives marked CE (congestion experienced on the path) as marked, as the
    /// protocol's own congestion flag: its result carries the mark to every rank (on
    /// by default).
    pub ecn: bool,
    /// Serve as a rack aggregator under a parent (docs/protocol.md 8.5): over UDP,
    /// every job joins the parent as one rack of its upper level.
    pub parent: Option<ParentConfig>,
}

/// Where a rack aggregator's parent is, and which rack it is
/// ([`inagg_proto::aggregator::Aggregator::set_parent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParentConfig {
    /// The parent aggregator's UDP address.
    pub addr: SocketAddr,
    /// This rack's index, below `racks`.
    pub rack: u16,
    /// The number of racks under the parent.
    pub racks: u16,
}

impl ServerConfig {
    /// Defaults, listening on `listen`, with session tokens seeded from the operating
    /// system's randomness (the state machine's default seed is fixed, for tests and
    /// the simulator, and tokens that repeat from run to run could be guessed), a slot
    /// memory budget of [`DEFAULT_SLOT_MEMORY`], a cap per job of
    /// [`DEFAULT_MAX_JOB_MEMORY`] (the state machine's defaults have neither) and
    /// [`DEFAULT_YIELDS_BEFORE_SLEEP`].
    pub fn new(listen: SocketAddr) -> Self {
        use rand::{Rng, SeedableRng};
        let protocol = AggregatorConfig {
            seed: rand::rngs::StdRng::from_os_rng().random(),
            slot_memory: Some(DEFAULT_SLOT_MEMORY),
            max_job_memory: Some(DEFAULT_MAX_JOB_MEMORY),
            ..AggregatorConfig::default()
        };
        Self {
            listen,
            socket_buffer: DEFAULT_SOCKET_BUFFER,
            protocol,
            poll_interval: Duration::from_millis(50),
            yields_before_sleep: DEFAULT_YIELDS_BEFORE_SLEEP,
            multicast: true,
            ecn: true,
            parent: None,
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
    /// A sharded server's shard could not have its port ([`crate::ShardedServer`]).
    #[error("{shards} shards: shard {shard} needs UDP port {port}")]
    ShardPort {
        /// Shards asked for.
        shards: u16,
        /// The shard.
        shard: u16,
        /// Its port.
        port: u16,
        /// Why binding it failed.
        #[source]
        source: Box<ServerError>,
    },
    /// A rack outside the number of racks ([`ParentConfig`]).
    #[error("rack {rack} is not below the number of racks, {racks}")]
    BadRack {
        /// The rack.
        rack: u16,
        /// The number of racks.
        racks: u16,
    },
    /// A sharded server on a given port found no room for its shards above it.
    #[error("{shards} shards: no room above port {port}")]
    NoRoomAbove {
        /// Shards asked for.
        shards: u16,
        /// The first shard's port.
        port: u16,
    },
    /// A sharded server on port 0 found no run of free ports.
    #[error("{shards} shards: found no run of {shards} free UDP ports in {attempts} tries")]
    NoPortRun {
        /// Shards asked for.
        shards: u16,
        /// Runs tried.
        attempts: usize,
    },
    /// A server loop panicked ([`crate::run_together`]).
    #[error("a server loop panicked")]
    Panicked,
    /// The QUIC endpoint could not start.
    #[error("cannot serve QUIC on {addr}")]
    Quic {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: inagg_quic::Error,
    },
}

/// A transport the server loop runs over: any [`Transport`] of the aggregator's
/// result bodies whose errors the server can report. UDP ([`UdpFront`]), the
/// in-memory network ([`MemFront`]) and QUIC ([`QuicFront`]) are fronts.
pub trait Front: Transport<Body, Error: Into<ServerError>> {}

impl<T: Transport<Body, Error: Into<ServerError>>> Front for T {}

/// The UDP front: batched receive and GSO sends, each result sent from its slot.
pub type UdpFront = Udp<Body>;

/// The in-memory front ([`inagg_net::mem`]): the same loop as over UDP, without
/// sockets, for tests.
pub type MemFront = MemSocket;

/// The QUIC front.
pub type QuicFront = QuicListener;

/// The state machine as a transport drains it: a result's head is written into the
/// transport's buffer and its payload named by a [`Body`] in the slot's kept copy.
struct Sending<'a>(&'a mut Aggregator<SocketAddr>);

impl Outbox for Sending<'_> {
    type Body = Body;

    fn poll_head(&mut self, buf: &mut Vec<u8>) -> Option<Head<Body>> {
        self.0
            .poll_transmit_head(buf)
            .map(|(to, body)| (to, body.map(|b| (b, b.len()))))
    }

    fn body(&self, body: Body) -> &[u8] {
        self.0.body(body)
    }
}

/// Warns when the counts of refused replies or port-0 datagrams double: a firewall
/// refusing every reply is seen at once, and a forged source now and then does not
/// flood the log.
#[derive(Debug, Default)]
struct DropWarnings {
    /// The counts at the last warning.
    warned: Undeliverable,
}

impl DropWarnings {
    fn check(&mut self, now: Undeliverable) {
        if doubled(now.refused, &mut self.warned.refused) {
            warn!(
                refused = now.refused,
                "the kernel refused replies (no route, a forbidden address or a firewall): \
                 dropped; forged source addresses, or this host cannot reach its workers"
            );
        }
        if doubled(now.from_port_zero, &mut self.warned.from_port_zero) {
            warn!(
                datagrams = now.from_port_zero,
                "datagrams from port 0 (forged or broken senders, no reply can reach them): dropped"
            );
        }
    }
}

/// Whether `count` has reached twice `at_last` (or its first 1), which it then becomes.
fn doubled(count: u64, at_last: &mut u64) -> bool {
    let due = count > 0 && count >= at_last.saturating_mul(2);
    if due {
        *at_last = count;
    }
    due
}

/// Full receive batches in a row after which the aggregator counts as falling behind
/// and marks the results it completes (about 8 x 32 GRO buffers of datagrams taken
/// without the queue running dry: [`Front::backlog_batches`], which counts whole
/// batches however many `recvmmsg` calls took them).
const BACKLOG_STREAK: usize = 8;

/// Datagrams drained from the state machine before a flush.
const SEND_BATCH: usize = 256;

/// A bound aggregator, ready to run: over UDP by default, over QUIC from
/// [`Server::bind_quic`].
#[derive(Debug)]
pub struct Server<F: Front = UdpFront> {
    config: ServerConfig,
    front: F,
    agg: Aggregator<SocketAddr>,
    warnings: DropWarnings,
}

impl Server<QuicFront> {
    /// Binds a QUIC endpoint at `config.listen`, authenticated by `identity`.
    pub fn bind_quic(config: ServerConfig, identity: &Identity) -> Result<Self, ServerError> {
        let listener =
            QuicListener::bind(config.listen, identity).map_err(|source| ServerError::Quic {
                addr: config.listen,
                source,
            })?;
        crate::memory::return_freed_pools();
        let agg = Aggregator::new(config.protocol.clone());
        Ok(Self {
            config,
            front: listener,
            agg,
            warnings: DropWarnings::default(),
        })
    }
}

impl Server<MemFront> {
    /// Binds a socket of the in-memory network `net` at `config.listen`.
    pub fn bind_memory(config: ServerConfig, net: &MemNet) -> Result<Self, ServerError> {
        let socket = net
            .bind(config.listen)
            .map_err(|source| ServerError::Bind {
                addr: config.listen,
                source,
            })?;
        let agg = Aggregator::new(config.protocol.clone());
        Ok(Self {
            config,
            front: socket,
            agg,
            warnings: DropWarnings::default(),
        })
    }
}

impl Server<UdpFront> {
    /// Binds the socket.
    pub fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        let mut endpoint =
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
        endpoint.set_yields_before_sleep(config.yields_before_sleep);
        if config.ecn {
            endpoint.on_congestion_experienced(inagg_proto::wire::mark_contribution);
        }
        if let Err(e) = endpoint.set_ecn_capable(config.ecn) {
            warn!(error = %e, "cannot mark datagrams ECN-capable; sending without ECN");
        }
        crate::memory::return_freed_pools();
        #[cfg(target_os = "linux")]
        if config.parent.is_some() {
            if let Err(e) = endpoint.allow_fragments() {
                warn!(error = %e, "cannot let partial sums above the path's MTU be fragmented");
            }
        }
        let mut agg = Aggregator::new(config.protocol.clone());
        if let Some(p) = config.parent {
            if !agg.set_parent(p.addr, p.rack, p.racks) {
                return Err(ServerError::BadRack {
                    rack: p.rack,
                    racks: p.racks,
                });
            }
        }
        if config.multicast {
            offer_groups(&endpoint, &mut agg)?;
        }
        Ok(Self {
            config,
            // Replies go to source addresses off the network, which may be forged or
            // unreachable: drop those, serve on.
            front: Udp::new(endpoint, SEND_BATCH).with_drop_refused(),
            agg,
            warnings: DropWarnings::default(),
        })
    }
}

/// Offers the state machine result groups if the socket is bound where groups reach
/// (an IPv4 loopback address: [`group::group_source`]) and takes the multicast
/// options; a socket elsewhere sends every result to each rank.
fn offer_groups(endpoint: &UdpEndpoint, agg: &mut Aggregator<SocketAddr>) -> io::Result<()> {
    let local = endpoint.local_addr()?;
    let Some(iface) = group::group_source(&local) else {
        return Ok(());
    };
    if let Err(e) = endpoint.send_to_groups_from(iface) {
        warn!(error = %e, "cannot send to multicast groups: every result goes to each rank");
        return Ok(());
    }
    let port = local.port();
    agg.offer_groups(group::GROUPS, move |g| {
        // Every number the state machine hands out is below GROUPS, so has an address;
        // the wildcard (which a send refuses, and the batch drops) cannot be reached.
        let a = group::group_addr(g, port);
        SocketAddr::V4(a.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)))
    });
    Ok(())
}

impl<F: Front> Server<F> {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.front.local_addr()
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
        let span = info_span!("aggregator", addr = %self.local_addr()?);
        let _enter = span.enter();
        info!(front = self.front.describe(), "serving");
        while !stop.load(Ordering::Relaxed) {
            self.turn(self.config.poll_interval, true)?;
            self.log_events();
            let now = Instant::now();
            if now.saturating_duration_since(observed) >= every {
                observe(&self.agg);
                observed = now;
            }
        }
        info!("shutting down");
        // Serve retransmissions of completed chunks for a while, completing none:
        // every rank then holds the same results when it is told.
        self.agg.drain();
        self.serve_for(DRAIN)?;
        self.agg.shutdown(Instant::now());
        self.send()?;
        self.log_events();
        // The jobs are tombstones now, which answer their ranks with the error.
        self.serve_for(FAREWELL)?;
        self.front.close();
        observe(&self.agg);
        let stats = self.agg.stats().clone();
        info!(
            received = stats.packets_received,
            sent = stats.packets_sent,
            dropped = stats.dropped_total(),
            front = self.front.describe(),
            "stopped"
        );
        Ok(stats)
    }

    /// One turn of the loop, the same for every front: waits up to `most` (less where
    /// a timer is due sooner) for datagrams and feeds them in, notes a backlog, runs
    /// the timers that are due (unless `timers` is false: a stopping server's), and
    /// sends what is due.
    fn turn(&mut self, most: Duration, timers: bool) -> Result<(), ServerError> {
        let now = Instant::now();
        let wait = match self.agg.poll_timeout() {
            Some(t) if timers => t.saturating_duration_since(now).min(most),
            _ => most,
        };
        let agg = &mut self.agg;
        self.front
            .recv(wait, |from, d| agg.handle_datagram(now, from, d))
            .map_err(Into::into)?;
        self.agg
            .set_backlogged(self.front.backlog_batches() >= BACKLOG_STREAK);
        let now = Instant::now();
        if timers && self.agg.poll_timeout().is_some_and(|t| t <= now) {
            self.agg.handle_timeout(now);
        }
        self.send()
    }

    /// Sends everything the state machine has to send.
    fn send(&mut self) -> Result<(), ServerError> {
        let sent = self
            .front
            .send(&mut Sending(&mut self.agg))
            .map_err(Into::into)?;
        if sent > 0 {
            self.warnings.check(self.front.undeliverable());
        }
        Ok(())
    }

    /// Receives and answers for `time`, running no timers: the stopping server's
    /// drain and farewell.
    fn serve_for(&mut self, time: Duration) -> Result<(), ServerError> {
        let end = Instant::now() + time;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            self.turn(left.min(self.config.poll_interval), false)?;
        }
    }

    fn log_events(&mut self) {
        while let Some(ev) = self.agg.poll_event() {
            let job = match &ev {
                Event::JobStarted { job, .. }
                | Event::JobAborted { job, .. }
                | Event::Regranted { job, .. }
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
                Event::Regranted { window, .. } => info!(window, "job re-granted"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_server_seeds_its_tokens_afresh() {
        let at = SocketAddr::from(([127, 0, 0, 1], 0));
        let seeds: Vec<u64> = (0..3)
            .map(|_| ServerConfig::new(at).protocol.seed)
            .collect();
        assert!(seeds.iter().all(|s| *s != AggregatorConfig::default().seed));
        assert!(seeds[0] != seeds[1] || seeds[1] != seeds[2], "{seeds:?}");
    }

    #[test]
    fn a_udp_server_spins_as_configured() {
        let mut config = ServerConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        assert_eq!(config.yields_before_sleep, DEFAULT_YIELDS_BEFORE_SLEEP);
        for yields in [0, 7] {
            config.yields_before_sleep = yields;
            let server = Server::bind(config.clone()).expect("bind");
            assert_eq!(server.front.endpoint().yields_before_sleep(), yields);
        }
    }
}
