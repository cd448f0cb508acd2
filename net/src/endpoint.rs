//! A UDP socket with batched receive.

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[cfg(not(target_os = "linux"))]
use quinn_udp::Transmit;
use quinn_udp::{EcnCodepoint, RecvMeta, UdpSockRef, UdpSocketState, BATCH_SIZE};
use socket2::{Domain, Protocol, Socket, Type};

/// Socket buffer size to ask for: the kernel caps it at `net.core.rmem_max`
/// (4 MiB on the machines inagg is developed on) and reports double.
pub const DEFAULT_SOCKET_BUFFER: usize = 4 << 20;

/// The largest datagram a receive buffer holds, GRO segments included.
const RECV_BUF: usize = 64 * 1024;

/// Bytes one `recvmmsg` call aims to take. What a call receives is read back at once
/// (summed, decoded), so it should still be in the core's L2 cache then: 32 buffers
/// of 32 KiB datagrams (1 MiB, plus the slots or tensor they go to) were not, and
/// taking them a few at a time made allreduces on loopback faster; smaller and larger
/// targets were no better (docs/performance.md, "Receive batch size"). The count of
/// buffers follows the mean size of what the last call took: 32 for datagrams of 4 KiB
/// and less, 3 for 32 KiB ones, 2 for loopback's 63.5 KiB ones and for 64 KiB GRO
/// batches. A target, not a limit: the first call, and one after small datagrams,
/// offers all 32 buffers whatever comes.
const RECV_BYTES_PER_CALL: usize = 128 * 1024;

/// A bound, non-blocking UDP socket with receive buffers for one batch.
#[derive(Debug)]
pub struct UdpEndpoint {
    socket: UdpSocket,
    state: UdpSocketState,
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    /// Buffers to offer the next `recvmmsg` call: [`RECV_BYTES_PER_CALL`] over the
    /// size of the datagrams (or GRO batches) the last call took.
    per_call: usize,
    /// Buffers taken by the full calls since the last call that was not (it found
    /// the queue empty).
    full_run: usize,
    /// Yields before sleeping in `poll(2)` ([`UdpEndpoint::set_yields_before_sleep`]).
    yields: u32,
    /// Yields the next wait may spend: grows while spins find data, halves when not.
    spin: u32,
    /// Bound to an IPv6 address: IPv4 peers are reached as mapped addresses.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    v6: bool,
    /// The kernel refused a GSO send (a device without segmentation offload).
    gso_refused: AtomicBool,
    /// The largest datagram that goes in GSO runs: below the size of a run the kernel
    /// found larger than the path's MTU.
    gso_size_limit: std::sync::atomic::AtomicUsize,
    /// Datagrams dropped on receipt because they came from port 0.
    from_port_zero: u64,
    /// What a CE-marked datagram goes through before it is handed on
    /// ([`UdpEndpoint::on_congestion_experienced`]).
    on_ce: Option<fn(&mut [u8]) -> bool>,
    /// Socket buffer size asked for, for a group socket too.
    buffer: usize,
    /// The group socket that results sent to a multicast group arrive on
    /// ([`UdpEndpoint::join_group`]), received and waited on with the main one.
    group: Option<GroupSocket>,
    /// Connected to one peer ([`UdpEndpoint::connect`]): a refusal (ICMP port
    /// unreachable) is reported as [`io::ErrorKind::ConnectionRefused`] instead of
    /// being ignored.
    connected: bool,
    /// A refusal seen on the connected socket (by a send or a receive), reported by
    /// the next receive that finds nothing queued: the kernel reports the pending
    /// error before the datagrams that arrived before it (the peer's last words, such
    /// as a shutdown notice), so those are read first.
    refused: AtomicBool,
}

/// A socket bound to a multicast group's address and port, a member of the group.
#[derive(Debug)]
struct GroupSocket {
    socket: UdpSocket,
    state: UdpSocketState,
    addr: SocketAddrV4,
}

/// Whether a send failed because of where it was going, not because of the socket: no
/// route to the destination (`ENETUNREACH`, `EHOSTUNREACH`), an address or port the
/// kernel will not send to (`EINVAL`: port 0; `EADDRNOTAVAIL`, `EAFNOSUPPORT`), or a
/// firewall's or broadcast refusal (`EPERM`, `EACCES`). A server answering whoever
/// wrote to it drops that datagram and serves on: the address came off the network
/// and may be forged.
pub(crate) fn refused_destination(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EINVAL
                | libc::ENETUNREACH
                | libc::EHOSTUNREACH
                | libc::EADDRNOTAVAIL
                | libc::EAFNOSUPPORT
                | libc::EPERM
                | libc::EACCES
        )
    )
}

/// A blocking UDP socket bound to `addr` with send and receive buffers of `buffer`
/// bytes asked for (best effort: a smaller buffer still works, only less well under
/// bursts); bound to the IPv6 wildcard, it takes IPv4 peers too. What
/// [`UdpEndpoint::bind`] and the QUIC transport both build on.
pub fn bind_socket(addr: SocketAddr, buffer: usize) -> io::Result<UdpSocket> {
    let socket = unbound_socket(addr, buffer)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A UDP socket for `addr`'s family with buffers of `buffer` bytes asked for (an IPv6
/// one taking IPv4 peers too), not yet bound: [`bind_socket`]'s, and a group
/// socket's, which must share its address before it binds.
fn unbound_socket(addr: SocketAddr, buffer: usize) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    Ok(socket)
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
            per_call: n,
            full_run: 0,
            yields: 0,
            spin: 0,
            v6,
            gso_refused: AtomicBool::new(false),
            gso_size_limit: std::sync::atomic::AtomicUsize::new(usize::MAX),
            from_port_zero: 0,
            on_ce: None,
            buffer,
            group: None,
            connected: false,
            refused: AtomicBool::new(false),
        })
    }

    /// Connects the socket to `peer`, its only peer from now on: datagrams from
    /// elsewhere are no longer received, and when nothing listens at `peer` (ICMP port
    /// unreachable) the next send or receive fails with
    /// [`io::ErrorKind::ConnectionRefused`], where an unconnected socket would wait in
    /// silence. Sends may still name `peer` as their destination.
    pub fn connect(&mut self, peer: SocketAddr) -> io::Result<()> {
        let peer = match (self.v6, peer) {
            (true, SocketAddr::V4(a)) => SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()),
            _ => peer,
        };
        self.socket.connect(peer)?;
        self.connected = true;
        Ok(())
    }

    /// Notes a refusal that a send met, on a connected socket, for the next receive
    /// to report; false on an unconnected one, where refusals mean nothing.
    pub(crate) fn note_refused(&self) -> bool {
        if self.connected {
            self.refused.store(true, Ordering::Relaxed);
        }
        self.connected
    }

    /// Joins the multicast group `group` on the interface of `iface` (the loopback
    /// address, for an aggregator on this host), so that what is sent to it arrives
    /// here too: [`recv`](Self::recv) takes from both sockets and waits on both. The
    /// group socket is bound to the group's address and port (shared with the other
    /// members, `SO_REUSEADDR`), takes only this group (`IP_MULTICAST_ALL` off) and
    /// has GRO on, as the main one. One group at a time: joining another leaves the
    /// first.
    pub fn join_group(&mut self, group: SocketAddrV4, iface: Ipv4Addr) -> io::Result<()> {
        if !group.ip().is_multicast() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{group} is not a multicast address"),
            ));
        }
        let socket = unbound_socket(SocketAddr::V4(group), self.buffer)?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::V4(group).into())?;
        socket.join_multicast_v4(group.ip(), &iface)?;
        #[cfg(target_os = "linux")]
        socket.set_multicast_all_v4(false)?;
        let socket: UdpSocket = socket.into();
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        self.group = Some(GroupSocket {
            socket,
            state,
            addr: group,
        });
        Ok(())
    }

    /// The group joined by [`join_group`](Self::join_group), if any.
    pub fn group(&self) -> Option<SocketAddrV4> {
        self.group.as_ref().map(|g| g.addr)
    }

    /// Makes the socket able to send to multicast groups of this host: from the
    /// interface of `iface` (the loopback address), looped back to the members here,
    /// one hop at most. And it takes no group's datagrams itself (`IP_MULTICAST_ALL`
    /// off), which a socket bound to the wildcard on the port of its ranks' groups
    /// would otherwise receive: its own results.
    pub fn send_to_groups_from(&self, iface: Ipv4Addr) -> io::Result<()> {
        let s = socket2::SockRef::from(&self.socket);
        s.set_multicast_if_v4(&iface)?;
        s.set_multicast_loop_v4(true)?;
        s.set_multicast_ttl_v4(1)?;
        #[cfg(target_os = "linux")]
        s.set_multicast_all_v4(false)?;
        Ok(())
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The receive buffer the kernel granted, in bytes.
    pub fn recv_buffer_size(&self) -> io::Result<usize> {
        socket2::SockRef::from(&self.socket).recv_buffer_size()
    }

    /// Whole batches ([`BATCH_SIZE`] datagrams or GRO batches) that receives have
    /// taken in a row without finding the queue empty: every call came back full,
    /// so more was waiting each time. Growing means the reader is falling behind.
    pub fn backlog_batches(&self) -> usize {
        self.full_run / BATCH_SIZE
    }

    /// Datagrams dropped on receipt because they came from port 0: no reply can
    /// reach that port (a send to it fails), so the sender is forged or broken.
    pub fn from_port_zero(&self) -> u64 {
        self.from_port_zero
    }

    /// Marks every datagram this socket sends ECN-capable (ECT(0)), so that a router
    /// or switch on the path may mark it CE instead of dropping it (RFC 3168); `false`
    /// sends them not ECN-capable again (the default).
    pub fn set_ecn_capable(&self, on: bool) -> io::Result<()> {
        let tos: u32 = if on { 0b10 } else { 0 };
        let s = socket2::SockRef::from(&self.socket);
        if self.v6 {
            s.set_tclass_v6(tos)?;
            // IPv4 peers of a dual-stack socket: the IPv4 header's field.
            let _ = s.set_tos(tos);
            Ok(())
        } else {
            s.set_tos(tos)
        }
    }

    /// Lets the kernel fragment datagrams larger than the path's MTU, as a plain UDP
    /// socket does: quinn-udp asks for path MTU discovery, under which such a send
    /// fails (`EMSGSIZE`). A rack aggregator's partial sums are up to four bytes per
    /// element, and may so exceed the MTU its ranks sized their chunks for.
    #[cfg(target_os = "linux")]
    pub fn allow_fragments(&self) -> io::Result<()> {
        fn set(fd: std::os::fd::RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
            // SAFETY: `fd` is this endpoint's open socket, and the option's value is a
            // live `c_int` whose size is passed with it.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    level,
                    name,
                    std::ptr::from_ref(&value).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        }
        let fd = self.socket.as_raw_fd();
        let v4 = set(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        );
        if self.v6 {
            // IPv4 peers of a dual-stack socket take the IPv4 option, if it applies.
            let _ = v4;
            set(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_DONT,
            )
        } else {
            v4
        }
    }

    /// Hands every datagram received with CE (congestion experienced) to `mark`
    /// first, which may rewrite it in place (the protocol's own congestion flag, say)
    /// and says whether it did; the datagram then goes on as any other.
    pub fn on_congestion_experienced(&mut self, mark: fn(&mut [u8]) -> bool) {
        self.on_ce = Some(mark);
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

    /// The largest datagram that may go in a GSO run.
    pub(crate) fn gso_size_limit(&self) -> usize {
        self.gso_size_limit.load(Ordering::Relaxed)
    }

    /// Sends datagrams of `size` bytes and more one by one from now on: a GSO run of
    /// them was larger than the path's MTU.
    #[cfg(target_os = "linux")]
    pub(crate) fn limit_gso_size(&self, size: usize) {
        self.gso_size_limit
            .fetch_min(size.saturating_sub(1), Ordering::Relaxed);
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

    /// Before [`recv`](Self::recv) sleeps in `poll(2)`, give the CPU away
    /// (`sched_yield`) up to `yields` times, looking at the socket after each (0, the
    /// default: sleep at once).
    ///
    /// Sleeping costs the sender a wakeup (an inter-processor interrupt, dear in a
    /// virtual machine) and the receiver a context switch. A receiver on a host it
    /// shares with its peers, more processes than cores (a worker waiting for results
    /// beside the aggregator and other ranks, or the aggregator waiting for their
    /// contributions), loses less by yielding: the others run meanwhile, and when it is
    /// back their datagrams are usually there. Where nothing else wants the CPU, a
    /// yield returns at once and the whole spin costs some microseconds per wait; it
    /// stops at the receive's `timeout` (give or take one yield, which on a busy CPU
    /// may last a scheduler slice).
    ///
    /// The spin adapts within `yields`: a spin that finds data doubles the next one, a
    /// spin that ends in sleep or at the timeout halves it, and each wait adds one, so
    /// where spins keep missing (a rank waiting on slower ranks' quantizing, or an idle
    /// aggregator) they settle at two yields and cost little.
    pub fn set_yields_before_sleep(&mut self, yields: u32) {
        self.yields = yields;
        self.spin = yields;
    }

    /// The most yields before sleeping, as set by
    /// [`set_yields_before_sleep`](Self::set_yields_before_sleep).
    pub fn yields_before_sleep(&self) -> u32 {
        self.yields
    }

    /// Receives what is there, waiting up to `timeout` if nothing is; calls `f` for
    /// every datagram. Returns the number of datagrams handed to `f` (0 on timeout).
    pub fn recv(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(SocketAddr, &[u8]),
    ) -> io::Result<usize> {
        let mut n = self.try_recv(&mut f)?;
        if n > 0 || timeout.is_zero() {
            return Ok(n);
        }
        let mut left = timeout;
        if self.yields > 0 {
            // A timeout too long to add up means no deadline for the spin.
            let end = Instant::now().checked_add(timeout);
            for _ in 0..self.spin {
                std::thread::yield_now();
                n = self.try_recv(&mut f)?;
                if n > 0 {
                    self.spin = self.spin.saturating_mul(2).min(self.yields);
                    return Ok(n);
                }
                if end.is_some_and(|e| Instant::now() >= e) {
                    // A spin that outlasts the wait is a miss too: it must shrink, or
                    // a loop whose waits are all shorter than its spin never sleeps
                    // again (an idle aggregator at a large spin kept a core busy).
                    break;
                }
            }
            self.spin /= 2;
            left = end.map_or(timeout, |e| e.saturating_duration_since(Instant::now()));
        }
        if !left.is_zero() && self.wait(libc::POLLIN, left)? {
            n = self.try_recv(&mut f)?;
        }
        self.spin = (self.spin + 1).min(self.yields);
        Ok(n)
    }

    /// One `recvmmsg` call of `per_call` buffers on each socket (the group's after
    /// the main one's); hands every datagram to `f`.
    fn try_recv(&mut self, f: &mut impl FnMut(SocketAddr, &[u8])) -> io::Result<usize> {
        let mut n = self.try_recv_on(false, f)?;
        if self.group.is_some() {
            n += self.try_recv_on(true, f)?;
        }
        if n == 0 && self.refused.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::ConnectionRefused.into());
        }
        Ok(n)
    }

    /// One `recvmmsg` call of `per_call` buffers on the main socket or the group's;
    /// hands every datagram to `f`.
    fn try_recv_on(
        &mut self,
        group: bool,
        f: &mut impl FnMut(SocketAddr, &[u8]),
    ) -> io::Result<usize> {
        let want = self.per_call.clamp(1, BATCH_SIZE);
        let got = match self.recv_call(group, want) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            // A previous send to an unreachable port (ICMP), reported (and cleared)
            // now: nothing to read on an unconnected socket; on a connected one its
            // peer is gone, which `try_recv` says once what is queued has been read.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                if !self.note_refused() {
                    return Ok(0);
                }
                match self.recv_call(group, want) {
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionRefused
                        ) =>
                    {
                        0
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let mut count = 0;
        let mut bytes = 0;
        for (m, buf) in self.meta[..got].iter().zip(&mut self.bufs) {
            let len = m.len.min(buf.len());
            bytes += len;
            if m.addr.port() == 0 {
                self.from_port_zero += len.div_ceil(m.stride.max(1)) as u64;
                continue;
            }
            // A GRO batch holds datagrams of one ECN codepoint only.
            let mark = self.on_ce.filter(|_| m.ecn == Some(EcnCodepoint::Ce));
            for d in buf[..len].chunks_mut(m.stride.max(1)) {
                if let Some(mark) = mark {
                    mark(d);
                }
                f(m.addr, d);
                count += 1;
            }
        }
        if let Some(mean) = bytes.checked_div(got) {
            self.per_call = (RECV_BYTES_PER_CALL / mean.max(1)).clamp(1, BATCH_SIZE);
        }
        if got == want {
            self.full_run = self.full_run.saturating_add(got);
        } else {
            self.full_run = 0;
        }
        Ok(count)
    }

    /// One `recvmmsg` call on the main socket or the group's into the first `want`
    /// buffers; returns how many it filled.
    fn recv_call(&mut self, group: bool, want: usize) -> io::Result<usize> {
        let (socket, state) = match (&self.group, group) {
            (Some(g), true) => (&g.socket, &g.state),
            _ => (&self.socket, &self.state),
        };
        // One IoSliceMut per buffer, on the stack: no allocation per call.
        let mut bufs = self.bufs.iter_mut();
        let mut slices: [IoSliceMut<'_>; BATCH_SIZE] = std::array::from_fn(|_| {
            IoSliceMut::new(bufs.next().map_or(&mut [][..], |b| &mut b[..]))
        });
        let want = want.min(BATCH_SIZE);
        state.recv(
            UdpSockRef::from(socket),
            &mut slices[..want],
            &mut self.meta,
        )
    }

    /// Waits until the socket (or, for reading, the group socket) is ready for
    /// `events` or `timeout` passes.
    fn wait(&self, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
        let pfd = |fd| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let mut pfds = [pfd(self.socket.as_raw_fd()), pfd(-1)];
        let mut n = 1;
        if let (Some(g), true) = (&self.group, events == libc::POLLIN) {
            pfds[1] = pfd(g.socket.as_raw_fd());
            n = 2;
        }
        // Round up so that a sub-millisecond timeout still waits.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `pfds` holds `n` valid pollfds for the duration of the call.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), n, ms) };
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
                // A connected socket's only peer is gone: the next receive says so.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    if !self.note_refused() {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "socket send buffer stayed full",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `n` datagrams of `len` bytes, numbered in their first byte, and waits
    /// (bounded) until the receiver's queue holds them.
    fn queue(to: &UdpEndpoint, n: usize, len: usize) {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind sender");
        let dst = to.local_addr().expect("addr");
        for i in 0..n {
            let mut d = vec![0u8; len];
            d[0] = i as u8;
            s.send_to(&d, dst).expect("send");
        }
        // Loopback delivers within the send call unless the kernel deferred its
        // receive work to ksoftirqd (a loaded machine): then give it time.
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end
            && !to
                .wait(libc::POLLIN, Duration::from_millis(10))
                .expect("poll")
        {}
        std::thread::sleep(Duration::from_millis(50));
    }

    /// Receives once (without waiting); returns the datagrams' first bytes.
    fn once(ep: &mut UdpEndpoint) -> Vec<u8> {
        let mut got = Vec::new();
        ep.recv(Duration::ZERO, |_, d| got.push(d[0]))
            .expect("recv");
        got
    }

    #[test]
    fn datagrams_from_port_zero_are_dropped_and_counted() {
        // Only a raw socket sends from port 0, and only with CAP_NET_RAW.
        let raw = match Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("skipped: no raw socket to send from port 0 ({e})");
                return;
            }
        };
        let mut ep =
            UdpEndpoint::bind("127.0.0.1:0".parse().expect("addr"), 1 << 20).expect("bind");
        let to = ep.local_addr().expect("addr");
        for first in [1u8, 2] {
            // The UDP header by hand: source port 0, no checksum (allowed over IPv4).
            let payload = [first; 16];
            let mut d = Vec::new();
            d.extend_from_slice(&0u16.to_be_bytes());
            d.extend_from_slice(&to.port().to_be_bytes());
            d.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
            d.extend_from_slice(&0u16.to_be_bytes());
            d.extend_from_slice(&payload);
            raw.send_to(&d, &to.into()).expect("raw send");
        }
        queue(&ep, 1, 16);
        let mut got = Vec::new();
        let end = Instant::now() + Duration::from_secs(2);
        while (got.is_empty() || ep.from_port_zero() < 2) && Instant::now() < end {
            ep.recv(Duration::from_millis(50), |from, d| {
                got.push((from.port(), d[0]))
            })
            .expect("recv");
        }
        assert_eq!(got.len(), 1, "only the ordinary datagram: {got:?}");
        assert_ne!(got[0].0, 0);
        assert_eq!(ep.from_port_zero(), 2);
    }

    #[test]
    fn small_datagrams_come_a_batch_at_a_time() {
        let mut ep =
            UdpEndpoint::bind("127.0.0.1:0".parse().expect("addr"), 1 << 20).expect("bind");
        queue(&ep, BATCH_SIZE + 5, 100);
        let first = once(&mut ep);
        assert_eq!(first, (0..BATCH_SIZE as u8).collect::<Vec<_>>());
        assert_eq!(ep.backlog_batches(), 1, "a whole batch taken, more waiting");
        let rest = once(&mut ep);
        assert_eq!(
            rest,
            (BATCH_SIZE as u8..BATCH_SIZE as u8 + 5).collect::<Vec<_>>()
        );
        assert_eq!(ep.backlog_batches(), 0, "the queue was found empty");
        assert!(once(&mut ep).is_empty());
    }

    #[test]
    fn large_datagrams_come_a_few_at_a_time_in_order_and_count_as_a_backlog_per_batch() {
        let len = 32 * 1024;
        let per_call = RECV_BYTES_PER_CALL / len;
        let mut ep =
            UdpEndpoint::bind("127.0.0.1:0".parse().expect("addr"), 8 << 20).expect("bind");
        // Only what the kernel's buffer holds (it may cap the size asked for).
        let room = ep.recv_buffer_size().expect("size") / (2 * (len + 1024));
        let n = (2 * BATCH_SIZE + 3 * per_call).min(room);
        assert!(
            n > 2 * BATCH_SIZE,
            "receive buffer too small to test: {room} datagrams"
        );
        queue(&ep, n, len);
        // The first call knows no sizes yet and offers every buffer.
        let mut order = once(&mut ep);
        assert_eq!(order.len(), BATCH_SIZE);
        assert_eq!(ep.backlog_batches(), 1);
        let mut most_backlog = 1;
        let end = Instant::now() + Duration::from_secs(2);
        while order.len() < n && Instant::now() < end {
            let got = once(&mut ep);
            // Then no more than the per-call byte budget's worth at a time.
            assert!(got.len() <= per_call, "{} in one call", got.len());
            order.extend(got);
            most_backlog = most_backlog.max(ep.backlog_batches());
        }
        assert_eq!(order, (0..n).map(|i| i as u8).collect::<Vec<_>>());
        // The run of full calls counted its batches across calls of a few buffers.
        assert_eq!(most_backlog, 2);
        assert!(once(&mut ep).is_empty());
        assert_eq!(ep.backlog_batches(), 0, "the queue was found empty");
    }

    #[test]
    fn a_group_member_receives_what_is_sent_to_the_group_and_to_itself() {
        let ep = |a: &str| UdpEndpoint::bind(a.parse().expect("addr"), 1 << 20).expect("bind");
        let sender = ep("127.0.0.1:0");
        sender
            .send_to_groups_from(Ipv4Addr::LOCALHOST)
            .expect("multicast options");
        let port = sender.local_addr().expect("addr").port();
        let group = crate::group::group_addr(7, port).expect("group");
        let mut members = [ep("0.0.0.0:0"), ep("127.0.0.1:0")];
        for m in &mut members {
            m.join_group(group, Ipv4Addr::LOCALHOST).expect("join");
            assert_eq!(m.group(), Some(group));
        }
        // A member of another group on the same port takes none of it.
        let mut stranger = ep("0.0.0.0:0");
        stranger
            .join_group(
                crate::group::group_addr(8, port).expect("group"),
                Ipv4Addr::LOCALHOST,
            )
            .expect("join another");
        let plain = UdpSocket::bind("127.0.0.1:0").expect("bind");
        // One datagram to the group from the sender's socket, and one to each
        // member's own address.
        sender
            .socket
            .send_to(&[1; 8], group)
            .expect("send to group");
        for m in &members {
            plain
                .send_to(&[2; 8], m.local_addr().expect("addr"))
                .expect("send");
        }
        for m in &mut members {
            let mut got = Vec::new();
            let end = Instant::now() + Duration::from_secs(2);
            while got.len() < 2 && Instant::now() < end {
                m.recv(Duration::from_millis(50), |from, d| got.push((from, d[0])))
                    .expect("recv");
            }
            got.sort_by_key(|g| g.1);
            assert_eq!(got.len(), 2, "{got:?}");
            assert_eq!(got[0], (sender.local_addr().expect("addr"), 1));
            assert_eq!(got[1].1, 2);
        }
        assert!(once(&mut stranger).is_empty());
        let not_a_group = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        assert!(members[0]
            .join_group(not_a_group, Ipv4Addr::LOCALHOST)
            .is_err());
    }

    #[test]
    fn a_yielding_receive_takes_what_arrives_meanwhile() {
        let mut ep =
            UdpEndpoint::bind("127.0.0.1:0".parse().expect("addr"), 1 << 20).expect("bind");
        ep.set_yields_before_sleep(16);
        let to = ep.local_addr().expect("addr");
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            let s = UdpSocket::bind("127.0.0.1:0").expect("bind sender");
            s.send_to(&[7; 10], to).expect("send");
        });
        let mut got = Vec::new();
        let end = Instant::now() + Duration::from_secs(2);
        while got.is_empty() && Instant::now() < end {
            ep.recv(Duration::from_millis(500), |_, d| got.push(d.to_vec()))
                .expect("recv");
        }
        sender.join().expect("sender");
        assert_eq!(got, vec![vec![7u8; 10]]);
    }

    #[test]
    fn a_yielding_receive_ends_at_its_timeout() {
        let mut ep =
            UdpEndpoint::bind("127.0.0.1:0".parse().expect("addr"), 1 << 20).expect("bind");
        // Billions of yields would take minutes: the timeout must end the spin.
        ep.set_yields_before_sleep(u32::MAX);
        let start = Instant::now();
        let n = ep.recv(Duration::from_millis(20), |_, _| {}).expect("recv");
        assert_eq!(n, 0);
        // A bound against hanging, not a speed check: the receive's timeout, give or
        // take a yield.
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        // The spin that ran into the timeout counts as a miss: halved (then one added
        // for the wait), so that waits shorter than the spin do not keep it at full
        // length forever.
        assert_eq!(ep.spin, u32::MAX / 2 + 1);
        for _ in 0..40 {
            ep.recv(Duration::from_millis(1), |_, _| {}).expect("recv");
        }
        assert!(ep.spin <= 2, "the spin stayed at {}", ep.spin);
    }
}
