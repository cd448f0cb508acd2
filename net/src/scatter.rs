//! `sendmmsg(2)` with scatter-gather and UDP GSO: many datagrams, each gathered from
//! several buffers (a header in the batch's arena, a payload kept elsewhere), to many
//! destinations, in one system call. Linux only; elsewhere [`crate::SendBatch`]
//! gathers into one buffer and sends through quinn-udp.

use std::io::{self, IoSlice};
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::endpoint::refused_destination;
use crate::UdpEndpoint;

/// Messages (GSO runs) per system call.
pub(crate) const MAX_MSGS: usize = 64;
/// Datagrams per GSO message: the kernel's `UDP_MAX_SEGMENTS`.
pub(crate) const MAX_SEGMENTS: usize = 64;
/// Buffers per system call, over all its messages: room for at least one GSO run of
/// `MAX_SEGMENTS` datagrams of a header and a payload each.
pub(crate) const MAX_IOVS: usize = 512;
const _: () = assert!(MAX_IOVS >= 2 * MAX_SEGMENTS);

/// `CMSG_SPACE(sizeof(u16))` rounded up, in u64s for alignment.
const CMSG_WORDS: usize = 4;

/// One message being built: its destination, its buffers (a range of the iovec
/// array) and its GSO segment size.
#[derive(Clone, Copy)]
pub(crate) struct Msg {
    pub to: SocketAddr,
    pub iov_start: usize,
    pub iov_len: usize,
    pub segment: Option<u16>,
    /// Datagrams it carries.
    pub datagrams: usize,
}

/// The outcome of [`send_mmsg`].
pub(crate) enum Sent {
    /// Messages sent (all of them when equal to the count given).
    Some(usize),
    /// The kernel refused GSO for the first message (a device without segmentation
    /// offload): send that message's datagrams one by one from now on.
    GsoRefused,
    /// The first message's segments are larger than the path's MTU, which GSO needs
    /// them within (`EMSGSIZE`), though the socket may fragment a datagram that size:
    /// send datagrams of that size one by one from now on.
    GsoTooLarge(u16),
    /// The kernel refused the first message's destination (see
    /// [`crate::endpoint::refused_destination`]); nothing of this call was sent.
    Refused,
}

/// Sends `msgs`, whose buffers are `iovs[m.iov_start..][..m.iov_len]`, in one call,
/// waiting for room in the socket buffer if it is full. Returns how many messages
/// went out (at least one, or an error). With `drop_refused`, a destination the
/// kernel refuses is reported as [`Sent::Refused`] rather than as an error.
pub(crate) fn send_mmsg(
    ep: &UdpEndpoint,
    msgs: &[Msg],
    iovs: &[IoSlice<'_>],
    drop_refused: bool,
) -> io::Result<Sent> {
    debug_assert!(msgs.len() <= MAX_MSGS);
    let v6 = ep.is_v6();
    // SAFETY: all-zero bytes are valid values of these plain C structs.
    let mut hdrs: [libc::mmsghdr; MAX_MSGS] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut addrs: [libc::sockaddr_storage; MAX_MSGS] = unsafe { zeroed() };
    let mut cmsgs = [[0u64; CMSG_WORDS]; MAX_MSGS];
    for (i, m) in msgs.iter().enumerate() {
        let to = if v6 { to_v6(m.to) } else { m.to };
        let sa = socket2::SockAddr::from(to);
        let len = sa.len() as usize;
        // SAFETY: `sa` holds `len` valid bytes of a socket address, and a
        // sockaddr_storage is large enough for any.
        unsafe {
            std::ptr::copy_nonoverlapping(
                sa.as_ptr().cast::<u8>(),
                (&mut addrs[i] as *mut libc::sockaddr_storage).cast::<u8>(),
                len.min(size_of::<libc::sockaddr_storage>()),
            );
        }
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = sa.len();
        // IoSlice is ABI-compatible with iovec; the kernel only reads through it.
        h.msg_iov = iovs[m.iov_start..].as_ptr() as *mut libc::iovec;
        h.msg_iovlen = m.iov_len as _;
        if let Some(seg) = m.segment {
            let buf = &mut cmsgs[i];
            h.msg_control = buf.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE is a pure computation.
            h.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as _;
            debug_assert!(h.msg_controllen as usize <= CMSG_WORDS * 8);
            // SAFETY: the control buffer is CMSG_SPACE(2) bytes, aligned, and zeroed,
            // so CMSG_FIRSTHDR is non-null and the data fits.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
            }
        }
    }
    let fd = ep.socket().as_raw_fd();
    for _ in 0..1000 {
        // SAFETY: `hdrs[..msgs.len()]` are valid message headers whose pointers
        // (names, iovecs and their buffers, control data) live until the call returns.
        let n = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), msgs.len() as u32, 0) };
        if n > 0 {
            return Ok(Sent::Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match (e.kind(), e.raw_os_error()) {
            (io::ErrorKind::Interrupted, _) => continue,
            (io::ErrorKind::WouldBlock, _) => {
                ep.wait_writable(Duration::from_millis(10))?;
            }
            // An ICMP error from an earlier send to a peer that went away, reported
            // (and cleared) now: nothing of this call was sent; try again.
            // On a connected socket, its peer is gone: the next receive says so.
            (io::ErrorKind::ConnectionRefused, _) => {
                ep.note_refused();
                continue;
            }
            // Also what a GSO run to port 0 gets: receivers drop datagrams from port 0
            // (`UdpEndpoint::from_port_zero`), so no reply goes there.
            (_, Some(libc::EIO | libc::EINVAL)) if msgs[0].segment.is_some() => {
                return Ok(Sent::GsoRefused)
            }
            (_, Some(libc::EMSGSIZE)) if msgs[0].segment.is_some() => {
                return Ok(Sent::GsoTooLarge(msgs[0].segment.unwrap_or(0)))
            }
            _ if drop_refused && refused_destination(&e) => return Ok(Sent::Refused),
            _ => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "socket send buffer stayed full",
    ))
}

/// `to` as an IPv6 socket's peer: IPv4 addresses map into `::ffff:0:0/96`.
fn to_v6(to: SocketAddr) -> SocketAddr {
    match to {
        SocketAddr::V4(a) => SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()),
        v6 => v6,
    }
}
