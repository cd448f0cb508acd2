//! A UDP socket with batched receive.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[cfg(not(target_os = "linux"))]
use quinn::udp::Transmit;
use quinn::udp::{RecvMeta, UdpSockRef, UdpSocketState, BATCH_SIZE};
use socket2::{Domain, Protocol, Socket, Type};

/// Socket buffer size to ask for: the kernel caps it at `net.core.rmem_max`
/// (4 MiB on the machines inagg is developed on) and reports double.
pub const DEFAULT_SOCKET_BUFFER: usize = 4 << 20;

/// The largest datagram a receive buffer holds, GRO segments included.
const RECV_BUF: usize = 64 * 1024;

/// A bound, non-blocking UDP socket with receive buffers for one batch.
#[derive(Debug)]
pub struct UdpEndpoint {
    socket: UdpSocket,
    state: UdpSocketState,
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    last_full: bool,
    /// Bound to an IPv6 address: IPv4 peers are reached as mapped addresses.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    v6: bool,
    /// The kernel refused a GSO send (a device without segmentation offload).
    gso_refused: AtomicBool,
}

/// A blocking UDP socket bound to `addr` with send and receive buffers of `buffer`
/// bytes asked for (best effort: a smaller buffer still works, only less well under
/// bursts); bound to the IPv6 wildcard, it takes IPv4 peers too. What
/// [`UdpEndpoint::bind`] and the QUIC transport both build on.
pub fn bind_socket(addr: SocketAddr, buffer: usize) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

impl UdpEndpoint {
    /// Binds to `addr` with send and receive buffers of `buffer` bytes.
    pub fn bind(addr: SocketAddr, buffer: usize) -> io::Result<Self> {
        let socket = bind_socket(addr, buffer)?;
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        let v6 = socket.local_addr()?.is_ipv6();
        let n = BATCH_SIZE;
        Ok(Self {
            socket,
            state,
            bufs: vec![vec![0u8; RECV_BUF]; n],
            meta: vec![RecvMeta::default(); n],
            last_full: false,
            v6,
            gso_refused: AtomicBool::new(false),
        })
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The receive buffer the kernel granted, in bytes.
    pub fn recv_buffer_size(&self) -> io::Result<usize> {
        socket2::SockRef::from(&self.socket).recv_buffer_size()
    }

    /// Whether the last receive filled every buffer of the batch: more was waiting.
    /// A run of such receives means the reader is falling behind.
    pub fn last_batch_full(&self) -> bool {
        self.last_full
    }

    /// The most datagrams one send may carry (1 without GSO).
    pub fn max_gso_segments(&self) -> usize {
        if self.gso_refused.load(Ordering::Relaxed) {
            1
        } else {
            self.state.max_gso_segments()
        }
    }

    /// Sends no more GSO runs: the kernel refused one.
    #[cfg(target_os = "linux")]
    pub(crate) fn refuse_gso(&self) {
        self.gso_refused.store(true, Ordering::Relaxed);
    }

    #[cfg(target_os = "linux")]
    pub(crate) fn is_v6(&self) -> bool {
        self.v6
    }

    #[cfg(target_os = "linux")]
    pub(crate) fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// Waits until the socket buffer has room or `timeout` passes.
    #[cfg(target_os = "linux")]
    pub(crate) fn wait_writable(&self, timeout: Duration) -> io::Result<bool> {
        self.wait(libc::POLLOUT, timeout)
    }

    /// Receives what is there, waiting up to `timeout` if nothing is; calls `f` for
    /// every datagram. Returns the number of datagrams handed to `f` (0 on timeout).
    pub fn recv(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(SocketAddr, &[u8]),
    ) -> io::Result<usize> {
        let mut n = self.try_recv(&mut f)?;
        if n == 0 && !timeout.is_zero() && self.wait(libc::POLLIN, timeout)? {
            n = self.try_recv(&mut f)?;
        }
        Ok(n)
    }

    fn try_recv(&mut self, f: &mut impl FnMut(SocketAddr, &[u8])) -> io::Result<usize> {
        // One IoSliceMut per buffer, on the stack: no allocation per batch.
        let mut bufs = self.bufs.iter_mut();
        let got = {
            let mut slices: [IoSliceMut<'_>; BATCH_SIZE] = std::array::from_fn(|_| {
                IoSliceMut::new(bufs.next().map_or(&mut [][..], |b| &mut b[..]))
            });
            match self
                .state
                .recv(UdpSockRef::from(&self.socket), &mut slices, &mut self.meta)
            {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                // A previous send to an unreachable port (ICMP): nothing to read.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(0),
                Err(e) => return Err(e),
            }
        };
        self.last_full = got == BATCH_SIZE;
        let mut count = 0;
        for (m, buf) in self.meta[..got].iter().zip(&self.bufs) {
            let stride = m.stride.max(1);
            for d in buf[..m.len.min(buf.len())].chunks(stride) {
                f(m.addr, d);
                count += 1;
            }
        }
        Ok(count)
    }

    /// Waits until the socket is ready for `events` or `timeout` passes.
    fn wait(&self, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events,
            revents: 0,
        };
        // Round up so that a sub-millisecond timeout still waits.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and the count is 1.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        match r {
            -1 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
            0 => Ok(false),
            _ => Ok(true),
        }
    }

    /// Sends `contents` (one datagram, or several of `segment` bytes each) to `to`,
    /// waiting for room in the socket buffer if it is full.
    #[cfg(not(target_os = "linux"))]
    pub(crate) fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        let t = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        for _ in 0..1000 {
            match self.state.try_send(UdpSockRef::from(&self.socket), &t) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(libc::POLLOUT, Duration::from_millis(10))?;
                }
                // A peer that went away: UDP carries on; the protocol notices silence.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "socket send buffer stayed full",
        ))
    }
}
