//! inagg-net: the platform details of UDP, kept out of the protocol and the drivers,
//! as quinn keeps them in quinn-udp (which this crate uses directly, at the version quinn uses).
//!
//! - [`UdpEndpoint::bind`] opens a non-blocking socket with large buffers (a fast
//!   sender otherwise loses thousands of datagrams to the 208 KB default).
//! - [`UdpEndpoint::recv`] takes up to 32 buffers per system call (`recvmmsg`), each
//!   possibly holding several datagrams coalesced by GRO, offering as many as make
//!   about 128 KiB at the size the last call saw, so that what it took is still in
//!   cache when the caller reads it; it waits with `poll(2)` when nothing is there.
//! - [`SendBatch`] collects outgoing datagrams in one arena and sends runs of equal-size
//!   datagrams to the same destination as one GSO message each, within the kernel's 64
//!   KB limit per message, and up to 64 messages per system call (`sendmmsg`). A
//!   datagram may end in a body kept elsewhere (an aggregator's result in its slot),
//!   sent from where it lies (scatter-gather) rather than copied for every rank.
//!
//! - [`group`]: an aggregator on loopback sends each result once, to a multicast
//!   group its job's ranks have joined ([`UdpEndpoint::join_group`]).
//! - [`mem`]: an in-memory network with seeded faults, on which the real server and
//!   worker driver run without sockets.
//!
//! - [`Transport`]: the one seam the aggregator's server loop and the worker's
//!   driver loop run over; [`Udp`] and [`mem::MemSocket`] implement it here, QUIC in
//!   `inagg-quic`. A state machine is drained through [`Outbox`].
//!
//! Nothing here allocates per datagram.

#![warn(missing_docs)]

mod batch;
mod endpoint;
pub mod group;
pub mod mem;
#[cfg(target_os = "linux")]
mod scatter;
mod transport;

pub use batch::{NoBody, SendBatch};
pub use endpoint::{bind_socket, UdpEndpoint, DEFAULT_SOCKET_BUFFER};
pub use transport::{send_each, Head, Outbox, Transport, Udp, Undeliverable};

/// Bytes of IP and UDP headers in front of each datagram to or from `addr`: what a
/// datagram costs on the wire beyond its payload.
pub fn header_overhead(addr: &std::net::SocketAddr) -> u64 {
    match addr {
        std::net::SocketAddr::V4(_) => 20 + 8,
        std::net::SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some() => 20 + 8,
        std::net::SocketAddr::V6(_) => 40 + 8,
    }
}
