//! The loop that runs the worker state machine over a [`Link`]: send what is due, wait
//! for messages or the next deadline, feed them in, repeat until the event the caller
//! waits for ([`Session::turn`], one loop body for joining, allreduces, heartbeats
//! and leaving). The link is an `inagg_net::Transport` (a UDP socket with GSO
//! batches, a QUIC connection, or a socket of the in-memory network for tests), the
//! same seam the aggregator's server loop runs over; the loop does not know which.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use inagg_net::mem::MemSocket;
use inagg_net::{header_overhead, Head, Outbox, Transport as NetTransport, Udp, UdpEndpoint};
use inagg_proto::wire::{Grant, DATA_HEADER_LEN};
use inagg_proto::worker::{Event, Tail, Worker, WorkerError};
use inagg_quic::QuicLink;

use crate::{Error, Options, Transport};

/// Where a queued datagram's payload lies.
#[derive(Debug, Clone, Copy)]
enum Body {
    /// Elements `.0..1` of the tensor, as their bytes (f32, [`Tail::Data`]).
    Tensor(usize, usize),
    /// Bytes `.0..1` of the worker's payloads ([`Tail::Encoded`]).
    Encoded(usize, usize),
}

/// How messages reach the aggregator: one of the transports the driver loop runs
/// over. One per session, made once and never moved in a loop: the size difference
/// between the variants costs nothing.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Link {
    Udp(Udp<Body>),
    Quic(Box<QuicLink>),
    Memory(MemSocket),
}

impl NetTransport<Body> for Link {
    type Error = Error;

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Link::Udp(t) => t.local_addr(),
            Link::Quic(t) => t.local_addr(),
            Link::Memory(t) => Ok(t.local_addr()),
        }
    }

    fn recv(&mut self, wait: Duration, f: impl FnMut(SocketAddr, &[u8])) -> Result<usize, Error> {
        Ok(match self {
            Link::Udp(t) => t.recv(wait, f)?,
            Link::Quic(t) => NetTransport::<Body>::recv(&mut **t, wait, f)?,
            Link::Memory(t) => t.recv(wait, f)?,
        })
    }

    fn send(&mut self, out: &mut impl Outbox<Body = Body>) -> Result<usize, Error> {
        Ok(match self {
            Link::Udp(t) => t.send(out)?,
            Link::Quic(t) => NetTransport::send(&mut **t, out)?,
            Link::Memory(t) => t.send(out)?,
        })
    }

    fn close(&mut self) {
        match self {
            Link::Udp(t) => NetTransport::<Body>::close(t),
            Link::Quic(t) => NetTransport::<Body>::close(&mut **t),
            Link::Memory(t) => NetTransport::<Body>::close(t),
        }
    }

    fn describe(&self) -> String {
        match self {
            Link::Udp(t) => t.describe(),
            Link::Quic(t) => NetTransport::<Body>::describe(&**t),
            Link::Memory(t) => NetTransport::<Body>::describe(t),
        }
    }
}

/// The state machine as a transport drains it, with the tensor its contributions
/// come from: over UDP a contribution's payload is sent from where it lies (the
/// tensor for f32, the worker's encoded payloads otherwise).
struct Sending<'a> {
    worker: &'a mut Worker,
    data: &'a [f32],
    now: Instant,
    to: SocketAddr,
}

impl Outbox for Sending<'_> {
    type Body = Body;

    fn poll_head(&mut self, buf: &mut Vec<u8>) -> Option<Head<Body>> {
        let to = self.to;
        let tail = self.worker.poll_transmit_head(self.now, self.data, buf)?;
        Some(match tail {
            Tail::InBuf => (to, None),
            Tail::Data(r) => {
                let bytes = r.len() * std::mem::size_of::<f32>();
                (to, Some((Body::Tensor(r.start, r.end), bytes)))
            }
            Tail::Encoded(r) => (to, Some((Body::Encoded(r.start, r.end), r.len()))),
        })
    }

    fn body(&self, body: Body) -> &[u8] {
        match body {
            // The little-endian bytes of the elements: the f32 codec's wire form.
            Body::Tensor(a, b) => self.data.get(a..b).map_or(&[][..], bytemuck::cast_slice),
            Body::Encoded(a, b) => self.worker.payload(a..b),
        }
    }

    /// Encodes straight into `buf`, where the head-and-body default would copy.
    fn poll_whole(&mut self, buf: &mut Vec<u8>) -> Option<SocketAddr> {
        self.worker
            .poll_transmit_append(self.now, self.data, buf)
            .then_some(self.to)
    }
}

/// A socket error as the worker reports it: a refusal (ICMP port unreachable on the
/// connected socket) names the aggregator that is not there.
fn link_error(e: Error, aggregator: SocketAddr) -> Error {
    match e {
        Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Error::Refused(aggregator)
        }
        e => e,
    }
}

/// Datagrams encoded before a flush.
const SEND_BATCH: usize = 64;
/// The retransmission timeout's floor on a QUIC stream.
const STREAM_MIN_RTO: Duration = Duration::from_secs(1);

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
    /// Dips the congestion control began: moments at the smallest window so that
    /// the path's queue empties (docs/protocol.md, 6.10).
    pub dips: u64,
    /// Times the pacing rule held a send back until its timer (docs/protocol.md,
    /// 6.10): 0 where pacing is off (toward a loopback aggregator, and over QUIC).
    pub pacing_holds: u64,
    /// Loss bursts that set the congestion control's queue and dip rules aside, as
    /// flows that wait for loss keep the queue overflowing (docs/protocol.md, 6.10).
    pub overflows: u64,
    /// The congestion window (packets in flight) as the allreduce ended: the grant's
    /// window unless congestion control shrank it (the smallest over stripes).
    pub congestion_window: u64,
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
        self.dips += o.dips;
        self.pacing_holds += o.pacing_holds;
        self.overflows += o.overflows;
        self.congestion_window = self.congestion_window.min(o.congestion_window);
    }
}

/// A link and a worker state machine.
#[derive(Debug)]
pub(crate) struct Session {
    link: Link,
    aggregator: SocketAddr,
    worker: Worker,
    /// A failure seen by the heartbeat thread, reported by the next call.
    failed: Option<WorkerError>,
}

impl Session {
    /// A session with the aggregator at `aggregator` (over QUIC: connected, the
    /// aggregator's certificate checked).
    pub fn new(opts: &Options, aggregator: SocketAddr) -> Result<Self, Error> {
        // Check the settings before touching the network.
        let mut config = opts.protocol.clone();
        config.validate()?;
        // A fresh nonce per session, which the aggregator's grants and errors echo: one
        // that could be guessed would let a forged error from the aggregator's address
        // fail this rank.
        config.nonce = {
            use rand::{Rng, SeedableRng};
            rand::rngs::StdRng::from_os_rng().random()
        };
        config.groups = opts.multicast
            && matches!(opts.transport, Transport::Udp)
            && inagg_net::group::groups_reach(&aggregator)
            && inagg_net::group::loopback_groups_work();
        let bind = opts.bind.unwrap_or_else(|| match aggregator {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        });
        let link = match &opts.transport {
            Transport::Udp => {
                let mut endpoint = UdpEndpoint::bind(bind, opts.socket_buffer)?;
                endpoint.set_yields_before_sleep(opts.yields_before_sleep);
                if opts.ecn {
                    endpoint.on_congestion_experienced(inagg_proto::wire::mark_result);
                }
                endpoint.set_ecn_capable(opts.ecn)?;
                // Its one peer: a closed port fails the rank at once ("connection
                // refused") instead of after the join timeout.
                endpoint.connect(aggregator)?;
                Link::Udp(Udp::new(endpoint, SEND_BATCH))
            }
            Transport::Quic(q) => {
                let link = QuicLink::connect(q, aggregator, bind)?;
                // QUIC paces its packets and runs its own congestion controller under
                // inagg's window. The pacing rule on top would take its rate from
                // results that QUIC holds back, and each would hold the other down
                // (docs/performance.md, "Pacing").
                config.pacing_gain = None;
                if q.mode == inagg_quic::Mode::Stream {
                    // A stream loses nothing while the connection lives: a timeout
                    // means queueing behind the stream, not loss, and a resend only
                    // adds bytes (UDP's floor set off many spurious ones here;
                    // docs/performance.md, "Retransmission timeout floor").
                    // Keep the timer, for a stalled peer, but far above queueing.
                    config.min_rto = config.min_rto.max(STREAM_MIN_RTO);
                    config.initial_rto = config.initial_rto.max(STREAM_MIN_RTO);
                    config.max_rto = config.max_rto.max(STREAM_MIN_RTO);
                }
                if q.mode == inagg_quic::Mode::Datagram {
                    // A chunk must fit in one datagram on every path, and every rank
                    // must ask for the same chunk: size it for the datagram QUIC
                    // always carries, not for what path MTU discovery has found yet.
                    let per = inagg_proto::codec::lookup(config.codec)
                        .map_or(4, |c| c.wire_bytes())
                        .max(1);
                    let fit =
                        inagg_quic::MIN_DATAGRAM.saturating_sub(DATA_HEADER_LEN) / per / 8 * 8;
                    let fit = u16::try_from(fit).unwrap_or(u16::MAX);
                    config.chunk_elems = config.chunk_elems.min(fit.max(8));
                }
                Link::Quic(Box::new(link))
            }
            Transport::Memory(net) => Link::Memory(net.bind(bind)?),
        };
        let worker = Worker::new(config, Instant::now())?;
        Ok(Self {
            link,
            aggregator,
            worker,
            failed: None,
        })
    }

    /// Datagrams from the aggregator's address that the state machine dropped, by
    /// reason.
    pub fn dropped(&self) -> inagg_proto::worker::Dropped {
        self.worker.dropped().clone()
    }

    /// The job's grant: there is one once `join` has returned.
    pub fn grant(&self) -> Result<Grant, Error> {
        self.worker
            .grant()
            .copied()
            .ok_or(Error::Protocol(WorkerError::NotReady("no grant")))
    }

    /// Joins the job; then, if the grant names a result group, the group, before
    /// any contribution goes out (the first result needs every rank's). A rank that
    /// cannot join it leaves the job at once, so that the others are told instead of
    /// waiting for its silence.
    pub fn join(&mut self) -> Result<(), Error> {
        let ev = self.drive(&mut [], |ev| matches!(ev, Event::Joined(_)))?;
        let (Event::Joined(g), Link::Udp(udp)) = (ev, &mut self.link) else {
            return Ok(());
        };
        let Some(group) = g.group else {
            return Ok(());
        };
        let port = self.aggregator.port();
        let joined = match inagg_net::group::group_addr(group, port) {
            Some(addr) => udp
                .endpoint_mut()
                .join_group(addr, std::net::Ipv4Addr::LOCALHOST)
                .map_err(|source| Error::Group {
                    group: addr,
                    source,
                }),
            // Only a broken aggregator names a number with no address.
            None => Err(Error::GroupOutOfRange(group)),
        };
        if joined.is_err() {
            self.leave();
        }
        joined
    }

    pub fn allreduce(
        &mut self,
        data: &mut [f32],
        feedback: Option<u64>,
    ) -> Result<AllreduceReport, Error> {
        let g = self.grant()?;
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
            Event::AllreduceDone { stats, .. } if stats.nonfinite_chunks > 0 => {
                // Every rank ends this allreduce so; the job goes on.
                Err(WorkerError::NonFinite(inagg_proto::codec::NonFinite).into())
            }
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
                    dips: stats.dips,
                    pacing_holds: stats.pacing_holds,
                    overflows: stats.overflows,
                    congestion_window: self.worker.congestion_window(),
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
        let mut ok = self.flush(&mut []).is_ok();
        while ok && !self.worker.is_finished() && Instant::now() < deadline {
            ok = self.turn(&mut [], MAX_WAIT).is_ok();
        }
        NetTransport::<Body>::close(&mut self.link);
    }

    /// One turn without waiting: used by the heartbeat thread between calls.
    pub fn service(&mut self) {
        if self.worker.is_finished() {
            return;
        }
        let _ = self.turn(&mut [], Duration::ZERO);
        while let Some(ev) = self.worker.poll_event() {
            if let Event::Failed(e) = ev {
                self.failed = Some(e);
            }
        }
    }

    fn flush(&mut self, data: &mut [f32]) -> Result<(), Error> {
        let mut out = Sending {
            worker: &mut self.worker,
            data,
            now: Instant::now(),
            to: self.aggregator,
        };
        self.link
            .send(&mut out)
            .map_err(|e| link_error(e, self.aggregator))?;
        Ok(())
    }

    /// One turn of the loop, the same for every link and every caller: waits up to
    /// `most` (less where a timer is due sooner) for what the aggregator sends and
    /// feeds it in, runs the timers that are due, and sends what is due.
    fn turn(&mut self, data: &mut [f32], most: Duration) -> Result<(), Error> {
        let now = Instant::now();
        let wait = self
            .worker
            .poll_timeout()
            .map_or(most, |t| t.saturating_duration_since(now).min(most));
        let (worker, aggregator) = (&mut self.worker, self.aggregator);
        self.link
            .recv(wait, |from, d| {
                // Only the aggregator's datagrams reach the state machine.
                if from == aggregator {
                    worker.handle_datagram(Instant::now(), d, data);
                }
            })
            .map_err(|e| link_error(e, aggregator))?;
        let now = Instant::now();
        if self.worker.poll_timeout().is_some_and(|t| t <= now) {
            self.worker.handle_timeout(now);
        }
        self.flush(data)
    }

    /// Runs the loop until `want` matches an event (returned) or the worker fails.
    fn drive(&mut self, data: &mut [f32], want: impl Fn(&Event) -> bool) -> Result<Event, Error> {
        self.flush(data)?;
        loop {
            while let Some(ev) = self.worker.poll_event() {
                if let Event::Failed(e) = ev {
                    self.failed = Some(e.clone());
                    return Err(e.into());
                }
                if want(&ev) {
                    return Ok(ev);
                }
            }
            self.turn(data, MAX_WAIT)?;
        }
    }
}
