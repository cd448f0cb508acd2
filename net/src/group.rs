//! Result groups over UDP: an aggregator sends each result once, to a multicast group
//! that every rank of the job has joined, instead of once per rank, as a switch
//! multicasts; the kernel hands each member a reference to the same buffer.
//!
//! Only on loopback, where the host itself is the network: a worker asks for a group
//! ([`groups_reach`]) when its aggregator is an IPv4 loopback address, and an
//! aggregator bound to such an address ([`group_source`]) offers groups and sends
//! with the loopback interface as the multicast source, so no group datagram leaves
//! the host. On a real network multicast needs routers and switches set up for it,
//! and results go to each rank as before.
//!
//! Any process on the host may join a group and read what is sent to it, where
//! loopback unicast takes a packet capture (root): on a host shared with users who
//! must not see a job's gradients, run the aggregator with `--no-multicast` (or use
//! QUIC). Forged results are refused as before: a worker takes datagrams only from
//! its aggregator's address, with the job's token.
//!
//! Group `g` of the aggregator listening on port `p` is `239.255.(g >> 8).(g & 255):p`
//! (IPv4 Local Scope, RFC 2365): the port keeps aggregators on one host apart, the
//! number the jobs of one aggregator, which hands out at most [`GROUPS`] at once.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// The group numbers an aggregator may hand out at once.
pub const GROUPS: u32 = 1 << 16;

/// The address of group `group` of the aggregator on port `port`, if the number is
/// below [`GROUPS`].
pub fn group_addr(group: u32, port: u16) -> Option<SocketAddrV4> {
    let g = u16::try_from(group).ok()?;
    let [hi, lo] = g.to_be_bytes();
    Some(SocketAddrV4::new(Ipv4Addr::new(239, 255, hi, lo), port))
}

/// Whether results from the aggregator at `aggregator` can come to a group: it is an
/// IPv4 loopback address (then the rank and the aggregator share the host). Not an
/// IPv4-mapped IPv6 one: group datagrams arrive from the plain IPv4 address, which a
/// worker would not take for its aggregator's.
pub fn groups_reach(aggregator: &SocketAddr) -> bool {
    matches!(aggregator, SocketAddr::V4(a) if a.ip().is_loopback())
}

/// Whether this host lets a socket join a multicast group on the loopback interface
/// (tried once per process, on a socket of its own): a worker asks for a group only
/// where it can then join the one its grant names.
pub fn loopback_groups_work() -> bool {
    static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORKS.get_or_init(|| {
        let try_join = || -> std::io::Result<()> {
            let probe = group_addr(GROUPS - 1, 0).ok_or(std::io::ErrorKind::InvalidInput)?;
            let s = std::net::UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
            s.join_multicast_v4(probe.ip(), &Ipv4Addr::LOCALHOST)
        };
        try_join().is_ok()
    })
}

/// The interface address an aggregator bound to `local` sends group datagrams from:
/// its own address if that is an IPv4 loopback one; `None` (no groups) otherwise.
///
/// Not for the wildcard: its ranks' group sockets bind the group's address on the
/// aggregator's port, which Linux refuses while a socket holds the wildcard on that
/// port without `SO_REUSEADDR` (and with it, any local user could bind the loopback
/// address on the port and take the aggregator's traffic).
pub fn group_source(local: &SocketAddr) -> Option<Ipv4Addr> {
    match local {
        SocketAddr::V4(a) if a.ip().is_loopback() => Some(*a.ip()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_map_to_local_scope_addresses_on_the_aggregators_port() {
        assert_eq!(
            group_addr(0, 7000),
            Some("239.255.0.0:7000".parse().expect("addr"))
        );
        assert_eq!(
            group_addr(0x1234, 7001),
            Some("239.255.18.52:7001".parse().expect("addr"))
        );
        assert_eq!(
            group_addr(GROUPS - 1, 1).map(|a| *a.ip()),
            Some(Ipv4Addr::new(239, 255, 255, 255))
        );
        assert_eq!(group_addr(GROUPS, 1), None);
    }

    #[test]
    fn only_loopback_reaches_groups() {
        for (a, want) in [
            ("127.0.0.1:9", true),
            ("127.0.0.2:9", true),
            ("[::ffff:127.0.0.1]:9", false),
            ("10.0.0.1:9", false),
            ("[::1]:9", false),
        ] {
            let a: SocketAddr = a.parse().expect("addr");
            assert_eq!(groups_reach(&a), want, "{a}");
        }
        for (a, want) in [
            ("127.0.0.1:9", Some(Ipv4Addr::LOCALHOST)),
            ("127.0.0.3:9", Some(Ipv4Addr::new(127, 0, 0, 3))),
            ("0.0.0.0:9", None),
            ("198.18.0.10:9", None),
            ("[::]:9", None),
        ] {
            let a: SocketAddr = a.parse().expect("addr");
            assert_eq!(group_source(&a), want, "{a}");
        }
    }
}
