//! The one loop that drives QUIC, for both ends: a quinn-proto endpoint and its
//! connections, sans-IO state machines, fed from one UDP socket and polled for what to
//! send, all on the caller's thread. No runtime, no channels: a receive reads the
//! socket, hands each datagram to the endpoint, fires the connections' due timers,
//! hands the protocol messages the connections have assembled to the caller, and sends
//! what the connections then have to send, as the UDP transport does with its own
//! datagrams.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use inagg_net::{SendBatch, UdpEndpoint};
use quinn_proto::{
    ClientConfig, Connection, ConnectionError, ConnectionHandle, DatagramEvent, Dir, Endpoint,
    EndpointConfig, Event, ServerConfig, StreamEvent, StreamId, VarInt,
};
use tracing::debug;

use crate::frames::{self, FrameReader};

/// Frames a stream may have waiting for QUIC's flow control; more are dropped, as UDP
/// would drop them, and the protocol's retransmissions recover. A peer that stops
/// reading its stream holds back its sender through flow control, and an aggregator's
/// replies to it would otherwise pile up without bound while the peer kept sending. An
/// honest peer never comes near: a rank has at most its window of packets in flight
/// (1024 slots at the most), so at most that many results to read, and it reads them
/// as they come.
pub(crate) const STREAM_QUEUE: usize = 2048;

/// The longest one poll waits, whatever it is asked: a wait too long to add to the
/// clock would otherwise have no deadline.
const LONGEST_WAIT: Duration = Duration::from_secs(3600);

/// Socket receive batches a poll takes, at most, before it delivers and sends.
const READS_PER_POLL: usize = 8;

/// The error code a connection is closed with when its peer breaks the framing.
const BAD_FRAME: u32 = 1;

/// One connection and how messages travel on it.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) conn: Connection,
    /// The bidirectional stream messages travel on, once one is open; datagrams
    /// before that, and always in datagram mode.
    pub(crate) stream: Option<StreamId>,
    reader: FrameReader,
    /// Frames (or the unsent rest of one) that flow control has not taken yet.
    pending: VecDeque<Bytes>,
    pub(crate) connected: bool,
    /// Why the connection ended, once it has.
    pub(crate) lost: Option<ConnectionError>,
}

impl Conn {
    fn new(conn: Connection) -> Self {
        Self {
            conn,
            stream: None,
            reader: FrameReader::default(),
            pending: VecDeque::new(),
            connected: false,
            lost: None,
        }
    }

    /// Writes what flow control takes of the waiting frames.
    fn flush_pending(&mut self) {
        let Some(id) = self.stream else { return };
        while let Some(front) = self.pending.front_mut() {
            match self.conn.send_stream(id).write(front) {
                Ok(n) if n == front.len() => {
                    self.pending.pop_front();
                }
                Ok(n) => {
                    front.advance(n);
                    return;
                }
                Err(_) => return,
            }
        }
    }
}

/// How a message handed to [`Driver::send`] fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Written to the stream or queued as a datagram.
    Ok,
    /// The stream already had [`STREAM_QUEUE`] frames waiting: dropped.
    QueueFull,
    /// Larger than the connection's datagrams: dropped.
    TooLarge,
    /// The connection is gone or cannot carry it: dropped.
    Closed,
}

/// A quinn-proto endpoint, its connections and its socket.
#[derive(Debug)]
pub(crate) struct Driver {
    endpoint: Endpoint,
    socket: UdpEndpoint,
    out: SendBatch,
    pub(crate) conns: HashMap<ConnectionHandle, Conn>,
    server: Option<Arc<ServerConfig>>,
    /// Where quinn-proto writes what it sends.
    scratch: Vec<u8>,
    /// Handshakes that failed or were refused.
    pub(crate) failed_handshakes: u64,
    /// Connections accepted.
    pub(crate) accepted: u64,
}

impl Driver {
    /// Drives `socket`: a server when `server` is given (it accepts connections), a
    /// client otherwise.
    pub(crate) fn new(socket: UdpEndpoint, server: Option<Arc<ServerConfig>>) -> Self {
        let endpoint = Endpoint::new(
            Arc::new(EndpointConfig::default()),
            server.clone(),
            true,
            None,
        );
        let mut out = SendBatch::new();
        // A server answers whoever wrote to it: a destination the kernel refuses (a
        // forged address) loses that datagram, not the loop.
        out.set_drop_refused(server.is_some());
        Self {
            endpoint,
            socket,
            out,
            conns: HashMap::new(),
            server,
            scratch: Vec::with_capacity(64 * 1024),
            failed_handshakes: 0,
            accepted: 0,
        }
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Starts a connection to `remote`, checked by `config` against `server_name`.
    pub(crate) fn connect(
        &mut self,
        config: ClientConfig,
        remote: SocketAddr,
        server_name: &str,
    ) -> Result<ConnectionHandle, quinn_proto::ConnectError> {
        let (ch, conn) = self
            .endpoint
            .connect(Instant::now(), config, remote, server_name)?;
        self.conns.insert(ch, Conn::new(conn));
        Ok(ch)
    }

    /// Opens the bidirectional stream of connection `ch` (once it is connected).
    pub(crate) fn open_stream(&mut self, ch: ConnectionHandle) -> bool {
        let Some(c) = self.conns.get_mut(&ch) else {
            return false;
        };
        if c.stream.is_none() {
            c.stream = c.conn.streams().open(Dir::Bi);
        }
        c.stream.is_some()
    }

    /// Sends one message on `ch`: on its stream if it has one, as a datagram
    /// otherwise. Goes out with the next [`flush`](Self::flush).
    pub(crate) fn send(&mut self, ch: ConnectionHandle, msg: &[u8]) -> Sent {
        let Some(c) = self.conns.get_mut(&ch) else {
            return Sent::Closed;
        };
        if c.lost.is_some() {
            return Sent::Closed;
        }
        let Some(id) = c.stream else {
            return match c.conn.datagrams().send(Bytes::copy_from_slice(msg), true) {
                Ok(()) => Sent::Ok,
                Err(quinn_proto::SendDatagramError::TooLarge) => Sent::TooLarge,
                Err(_) => Sent::Closed,
            };
        };
        if !c.pending.is_empty() {
            if c.pending.len() >= STREAM_QUEUE {
                return Sent::QueueFull;
            }
            c.pending.push_back(frames::frame(msg));
            return Sent::Ok;
        }
        // Straight into QUIC's send buffer (its one copy); what flow control does not
        // take waits, whole frames in order.
        let prefix = frames::prefix(msg.len());
        let mut s = c.conn.send_stream(id);
        match s.write(&prefix) {
            Ok(frames::PREFIX) => match s.write(msg) {
                Ok(n) if n == msg.len() => {}
                Ok(n) => c.pending.push_back(Bytes::copy_from_slice(&msg[n..])),
                Err(quinn_proto::WriteError::Blocked) => {
                    c.pending.push_back(Bytes::copy_from_slice(msg))
                }
                Err(_) => return Sent::Closed,
            },
            Ok(n) => {
                let mut rest = BytesMut::with_capacity(frames::PREFIX - n + msg.len());
                rest.extend_from_slice(&prefix[n..]);
                rest.extend_from_slice(msg);
                c.pending.push_back(rest.freeze());
            }
            Err(quinn_proto::WriteError::Blocked) => c.pending.push_back(frames::frame(msg)),
            Err(_) => return Sent::Closed,
        }
        Sent::Ok
    }

    /// The largest datagram connection `ch` can send now, if it takes datagrams.
    pub(crate) fn max_datagram(&mut self, ch: ConnectionHandle) -> Option<usize> {
        self.conns.get_mut(&ch)?.conn.datagrams().max_size()
    }

    /// Hands every message the connections hold to `deliver` (at most about `limit`:
    /// a stream's piece is delivered whole), then, if there were none, waits up to
    /// `wait` for some: reads the socket, fires due timers, and looks again, until a
    /// message comes or the wait is over. Sends what the connections have to send
    /// before it returns. Returns how many messages it delivered.
    pub(crate) fn poll(
        &mut self,
        wait: Duration,
        limit: usize,
        deliver: &mut impl FnMut(ConnectionHandle, SocketAddr, &[u8]),
    ) -> io::Result<usize> {
        let deadline = Instant::now() + wait.min(LONGEST_WAIT);
        loop {
            let now = Instant::now();
            // Whatever is already there, without blocking: a few receive batches, so
            // that acknowledgements and sends follow more than one batch's packets.
            for _ in 0..READS_PER_POLL {
                if self.read_socket(Duration::ZERO)? == 0 {
                    break;
                }
            }
            self.advance(now);
            let n = self.deliver(limit, deliver);
            self.flush()?;
            if n > 0 || now >= deadline {
                return Ok(n);
            }
            let until = self.next_timer().map_or(deadline, |t| t.min(deadline));
            self.read_socket(until.saturating_duration_since(Instant::now()))?;
        }
    }

    /// Reads what the socket has (waiting up to `wait` for the first datagram) into
    /// the endpoint; returns how many datagrams.
    fn read_socket(&mut self, wait: Duration) -> io::Result<usize> {
        let Self {
            endpoint,
            socket,
            conns,
            server,
            scratch,
            out,
            failed_handshakes,
            accepted,
            ..
        } = self;
        socket.recv(wait, |from, datagram| {
            let now = Instant::now();
            scratch.clear();
            let event = endpoint.handle(now, from, None, None, BytesMut::from(datagram), scratch);
            match event {
                Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                    if let Some(c) = conns.get_mut(&ch) {
                        c.conn.handle_event(ev);
                    }
                }
                Some(DatagramEvent::NewConnection(incoming)) => {
                    if server.is_none() {
                        endpoint.ignore(incoming);
                        return;
                    }
                    scratch.clear();
                    match endpoint.accept(incoming, now, scratch, None) {
                        Ok((ch, conn)) => {
                            *accepted += 1;
                            conns.insert(ch, Conn::new(conn));
                        }
                        Err(e) => {
                            *failed_handshakes += 1;
                            debug!(%from, "QUIC connection refused: {}", e.cause);
                            if let Some(t) = e.response {
                                push_transmit(out, &t, scratch);
                            }
                        }
                    }
                }
                Some(DatagramEvent::Response(t)) => push_transmit(out, &t, scratch),
                None => {}
            }
        })
    }

    /// Fires due timers and takes every connection's events.
    fn advance(&mut self, now: Instant) {
        let mut gone = Vec::new();
        for (&ch, c) in &mut self.conns {
            if c.conn.poll_timeout().is_some_and(|t| t <= now) {
                c.conn.handle_timeout(now);
            }
            loop {
                let mut any = false;
                while let Some(ev) = c.conn.poll_endpoint_events() {
                    any = true;
                    if let Some(back) = self.endpoint.handle_event(ch, ev) {
                        c.conn.handle_event(back);
                    }
                }
                while let Some(ev) = c.conn.poll() {
                    any = true;
                    match ev {
                        Event::Connected => c.connected = true,
                        Event::ConnectionLost { reason } => {
                            if c.connected {
                                debug!(peer = %c.conn.remote_address(), "QUIC connection closed: {reason}");
                            } else {
                                self.failed_handshakes += 1;
                                debug!(peer = %c.conn.remote_address(), "QUIC handshake failed: {reason}");
                            }
                            c.lost = Some(reason);
                        }
                        Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                            while let Some(id) = c.conn.streams().accept(Dir::Bi) {
                                // One stream per peer carries its messages both ways:
                                // the first. Later ones are never read, so what a peer
                                // sends on them stops at the connection's flow control.
                                c.stream.get_or_insert(id);
                            }
                        }
                        Event::Stream(StreamEvent::Writable { .. }) => c.flush_pending(),
                        _ => {}
                    }
                }
                if !any {
                    break;
                }
            }
            if c.conn.is_drained() {
                gone.push(ch);
            }
        }
        for ch in gone {
            // A client keeps its lost connection to report why; a server forgets it.
            if self.server.is_some() {
                self.conns.remove(&ch);
            }
        }
    }

    /// Hands the messages the connections hold to `deliver`, about `limit` at most.
    fn deliver(
        &mut self,
        limit: usize,
        deliver: &mut impl FnMut(ConnectionHandle, SocketAddr, &[u8]),
    ) -> usize {
        let mut n = 0;
        for (&ch, c) in &mut self.conns {
            if n >= limit {
                break;
            }
            let from = c.conn.remote_address();
            while n < limit {
                let Some(d) = c.conn.datagrams().recv() else {
                    break;
                };
                deliver(ch, from, &d);
                n += 1;
            }
            let Some(id) = c.stream else { continue };
            let mut stream = c.conn.recv_stream(id);
            let Ok(mut chunks) = stream.read(true) else {
                continue;
            };
            let mut bad = false;
            while n < limit {
                match chunks.next(usize::MAX) {
                    Ok(Some(chunk)) => {
                        match c.reader.push(chunk.bytes, &mut |m| deliver(ch, from, m)) {
                            Ok(k) => n += k,
                            Err(frames::TooLarge) => {
                                bad = true;
                                break;
                            }
                        }
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let _ = chunks.finalize();
            if bad {
                c.conn.close(
                    Instant::now(),
                    VarInt::from_u32(BAD_FRAME),
                    Bytes::from_static(b"frame too large"),
                );
            }
        }
        n
    }

    /// The earliest timer of any connection.
    fn next_timer(&mut self) -> Option<Instant> {
        self.conns
            .values_mut()
            .filter_map(|c| c.conn.poll_timeout())
            .min()
    }

    /// Sends everything the connections have to send.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        let now = Instant::now();
        let segments = self.socket.max_gso_segments().clamp(1, 10);
        for c in self.conns.values_mut() {
            c.flush_pending();
            loop {
                self.scratch.clear();
                let Some(t) = c.conn.poll_transmit(now, segments, &mut self.scratch) else {
                    break;
                };
                push_transmit(&mut self.out, &t, &self.scratch);
            }
        }
        if self.out.is_empty() {
            return Ok(());
        }
        self.out.flush(&self.socket)
    }

    /// Closes every connection with `reason` and sends the closes.
    pub(crate) fn close_all(&mut self, code: u32, reason: &'static [u8]) {
        let now = Instant::now();
        for c in self.conns.values_mut() {
            c.conn
                .close(now, VarInt::from_u32(code), Bytes::from_static(reason));
        }
        let _ = self.flush();
    }
}

/// Queues the datagrams of one quinn-proto transmit (several of one size, with GSO).
fn push_transmit(out: &mut SendBatch, t: &quinn_proto::Transmit, buf: &[u8]) {
    let segment = t.segment_size.unwrap_or(t.size).max(1);
    for d in buf[..t.size].chunks(segment) {
        out.push(t.destination, d);
    }
}
