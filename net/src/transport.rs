//! The one seam between a protocol state machine and the wire. The aggregator's
//! server loop and the worker's driver loop are each written once, against
//! [`Transport`]; UDP ([`Udp`]), the in-memory network ([`crate::mem::MemSocket`]) and
//! QUIC (in `inagg-quic`) implement it.
//!
//! A loop turn is the same on both sides: `recv` hands the state machine what
//! arrived (waiting up to the next timer), the timers run, and `send` drains the
//! state machine, seen through [`Outbox`], until it has nothing more to send.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::{SendBatch, UdpEndpoint};

/// A queued datagram's destination and, where it goes on in a body kept elsewhere,
/// that body's handle and length.
pub type Head<B> = (SocketAddr, Option<(B, usize)>);

/// A state machine's outgoing datagrams, as a transport drains them. A datagram is a
/// head written into a buffer, and possibly a body that lies elsewhere (an
/// aggregator's result in its slot, a worker's tensor) and is named by a `Body`
/// handle, so that a transport with scatter-gather sends it from where it lies.
pub trait Outbox {
    /// Where a datagram's body lies: a handle that [`Outbox::body`] resolves.
    type Body: Copy;

    /// Appends the next datagram's head to `buf`; returns its destination and, when
    /// the datagram goes on in a body kept elsewhere, the body and its length. `None`:
    /// nothing more to send now.
    fn poll_head(&mut self, buf: &mut Vec<u8>) -> Option<Head<Self::Body>>;

    /// The bytes of a body returned by [`Outbox::poll_head`]. They stay what they were
    /// until the state machine is handed its next input.
    fn body(&self, body: Self::Body) -> &[u8];

    /// Appends the next whole datagram to `buf` (head, then body): what a transport
    /// without scatter-gather sends. Returns its destination.
    fn poll_whole(&mut self, buf: &mut Vec<u8>) -> Option<SocketAddr> {
        let (to, body) = self.poll_head(buf)?;
        if let Some((b, _)) = body {
            buf.extend_from_slice(self.body(b));
        }
        Some(to)
    }
}

/// Datagrams a transport did not deliver for reasons on the far side: what a server
/// warns about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Undeliverable {
    /// Replies the kernel refused (no route, a forbidden address, a firewall).
    pub refused: u64,
    /// Datagrams received from port 0 (forged or broken senders), dropped.
    pub from_port_zero: u64,
}

/// How datagrams reach peers: what the server and driver loops run over. `B` is the
/// sender's body handle ([`Outbox::Body`]).
pub trait Transport<B: Copy>: fmt::Debug {
    /// What a failing receive or send reports.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The bound address.
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// Hands what arrived to `f(from, datagram)`, waiting up to `wait` if nothing did;
    /// returns the number of datagrams.
    fn recv(
        &mut self,
        wait: Duration,
        f: impl FnMut(SocketAddr, &[u8]),
    ) -> Result<usize, Self::Error>;

    /// Sends everything `out` has to send now; returns the number of datagrams.
    fn send(&mut self, out: &mut impl Outbox<Body = B>) -> Result<usize, Self::Error>;

    /// Whole receive batches taken in a row, each receive finding more waiting, since
    /// the queue was last found empty: how far the loop is falling behind.
    fn backlog_batches(&self) -> usize {
        0
    }

    /// What could not be delivered so far.
    fn undeliverable(&self) -> Undeliverable {
        Undeliverable::default()
    }

    /// Called once when the loop ends, after the last send.
    fn close(&mut self) {}

    /// A line for the log: what this transport is and what it did.
    fn describe(&self) -> String;
}

/// Drains `out` one whole datagram at a time into `buf`, handing each to `send`: the
/// send loop of a transport without scatter-gather (the in-memory network, QUIC).
pub fn send_each<O: Outbox + ?Sized, E>(
    out: &mut O,
    buf: &mut Vec<u8>,
    mut send: impl FnMut(SocketAddr, &[u8]) -> Result<(), E>,
) -> Result<usize, E> {
    let mut sent = 0;
    loop {
        buf.clear();
        let Some(to) = out.poll_whole(buf) else {
            return Ok(sent);
        };
        send(to, buf)?;
        sent += 1;
    }
}

/// UDP: batched receive ([`UdpEndpoint::recv`]) and GSO sends of up to a batch of
/// datagrams at a time, bodies sent from where they lie ([`SendBatch`]).
#[derive(Debug)]
pub struct Udp<B> {
    endpoint: UdpEndpoint,
    batch: SendBatch<B>,
    max_batch: usize,
}

impl<B: Copy> Udp<B> {
    /// A transport over `endpoint` that queues up to `max_batch` datagrams per
    /// system-call round.
    pub fn new(endpoint: UdpEndpoint, max_batch: usize) -> Self {
        Self {
            endpoint,
            batch: SendBatch::new(),
            max_batch: max_batch.max(1),
        }
    }

    /// Drops datagrams to destinations the kernel refuses instead of failing
    /// ([`SendBatch::set_drop_refused`]): what a server wants.
    pub fn with_drop_refused(mut self) -> Self {
        self.batch.set_drop_refused(true);
        self
    }

    /// The socket.
    pub fn endpoint(&self) -> &UdpEndpoint {
        &self.endpoint
    }

    /// The socket, to join groups and set options on.
    pub fn endpoint_mut(&mut self) -> &mut UdpEndpoint {
        &mut self.endpoint
    }
}

impl<B: Copy + fmt::Debug> Transport<B> for Udp<B> {
    type Error = io::Error;

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    fn recv(
        &mut self,
        wait: Duration,
        f: impl FnMut(SocketAddr, &[u8]),
    ) -> Result<usize, io::Error> {
        self.endpoint.recv(wait, f)
    }

    fn send(&mut self, out: &mut impl Outbox<Body = B>) -> Result<usize, io::Error> {
        self.batch.drain(&self.endpoint, self.max_batch, out)
    }

    fn backlog_batches(&self) -> usize {
        self.endpoint.backlog_batches()
    }

    fn undeliverable(&self) -> Undeliverable {
        Undeliverable {
            refused: self.batch.refused,
            from_port_zero: self.endpoint.from_port_zero(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "udp, gso {} segments, {} sends for {} datagrams, {} refused by the kernel, \
             {} from port 0 dropped",
            self.endpoint.max_gso_segments(),
            self.batch.calls,
            self.batch.datagrams,
            self.batch.refused,
            self.endpoint.from_port_zero()
        )
    }
}
