//! `inagg relay`: a UDP relay between workers and an aggregator that drops,
//! duplicates, reorders and delays datagrams in both directions, seeded. It injects
//! faults into real sockets for tests and benchmarks (this kernel has no netem).
//!
//! Each worker address gets its own upstream socket, so the aggregator sees one
//! address per worker, as it would without the relay. The fault decisions come from
//! [`Faults`], a pure function of the seed and the order in which datagrams arrive.
//!
//! With `--rate-mbit`, each direction is a link of that rate with a queue in front;
//! with `--mark-above BYTES`, a datagram that joins a queue holding more than BYTES
//! leaves marked CE (ECN's congestion experienced), as a marking switch's would:
//! this kernel has no marking qdisc, so this is how the real path's ECN is tested.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{self, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::args::FaultArgs;

/// Flags of `inagg relay`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address the workers send to (port 0: any free port; the address is printed).
    #[arg(long)]
    pub listen: SocketAddr,
    /// The aggregator.
    #[arg(long)]
    pub upstream: SocketAddr,
    #[command(flatten)]
    pub faults: FaultArgs,
    /// Seed of the fault decisions.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// What the relay did, for its exit line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    pub received: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub reordered: u64,
}

/// The seeded fault model: for each datagram, when its copies leave.
#[derive(Debug)]
pub struct Faults {
    cfg: FaultArgs,
    rng: SmallRng,
    pub stats: FaultStats,
}

impl Faults {
    pub fn new(cfg: FaultArgs, seed: u64) -> Self {
        Self {
            cfg,
            rng: SmallRng::seed_from_u64(seed),
            stats: FaultStats::default(),
        }
    }

    /// Departure times of the copies of a datagram that arrived at `now`: none (lost),
    /// one, or two (duplicated).
    pub fn plan(&mut self, now: Instant) -> [Option<Instant>; 2] {
        self.stats.received += 1;
        // Draw every decision, so that one fault's rate does not shift another's stream.
        let (lost, dup, reorder) = (
            self.rng.random_bool(self.cfg.loss),
            self.rng.random_bool(self.cfg.dup),
            self.rng.random_bool(self.cfg.reorder),
        );
        if lost {
            self.stats.dropped += 1;
            return [None, None];
        }
        let mut at = now + Duration::from_secs_f64(self.cfg.delay_ms / 1e3);
        if reorder {
            self.stats.reordered += 1;
            at += Duration::from_secs_f64(self.cfg.reorder_ms / 1e3);
        }
        if dup {
            self.stats.duplicated += 1;
            [Some(at), Some(at)]
        } else {
            [Some(at), None]
        }
    }
}

/// Where a held datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dest {
    /// From the aggregator back to this worker address, through the front socket.
    Worker(SocketAddr),
    /// To the aggregator, through worker `i`'s upstream socket.
    Upstream(usize),
}

impl Dest {
    /// The direction's index: 0 toward the aggregator, 1 back to the workers.
    fn direction(self) -> usize {
        match self {
            Dest::Upstream(_) => 0,
            Dest::Worker(_) => 1,
        }
    }
}

/// A datagram held until it is due: (departure, arrival order, destination, marked
/// CE, bytes).
type Held = Reverse<(Instant, u64, Dest, bool, Vec<u8>)>;

/// The ECN field's codepoint CE, in the IP header's TOS byte.
const TOS_CE: u32 = 0b11;

/// The most worker addresses the relay keeps sockets for; datagrams from more are
/// dropped (a flood must not exhaust file descriptors).
const MAX_CLIENTS: usize = 1024;
/// The most datagrams held for delay or reordering at once.
const MAX_HELD: usize = 200_000;

struct Relay {
    front: UdpSocket,
    upstream: SocketAddr,
    clients: Vec<(SocketAddr, UdpSocket)>,
    by_addr: HashMap<SocketAddr, usize>,
    held: BinaryHeap<Held>,
    order: u64,
    faults: Faults,
    overflow: u64,
    /// Bits per second of each direction's link, if limited.
    rate_bps: Option<f64>,
    mark_above: Option<usize>,
    /// Per direction: when its link is free again, and the bytes held for it.
    free_at: [Instant; 2],
    queued: [usize; 2],
    marked: u64,
}

fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Large buffers, as the aggregator's: the relay must not add losses of its own.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// `datagram`, or, if it is a join asking for results by multicast, the same join
/// without the ask: the relay forwards datagrams between addresses, so results sent to
/// a group would pass it by (to a group on the aggregator's port, which ranks that
/// know only the relay's port never join), and its faults would not touch them.
fn unicast_only(datagram: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    use inagg_proto::wire::{self, Message};
    if !wire::is_join(datagram) {
        // Only joins ask; the rest passes without being decoded.
        return datagram.into();
    }
    match wire::decode(datagram) {
        Ok(Message::Join(mut j)) if j.groups => {
            j.groups = false;
            let mut b = Vec::with_capacity(datagram.len());
            wire::encode_join(&j, &mut b);
            b.into()
        }
        _ => datagram.into(),
    }
}

impl Relay {
    fn client(&mut self, addr: SocketAddr) -> Option<usize> {
        if let Some(i) = self.by_addr.get(&addr) {
            return Some(*i);
        }
        if self.clients.len() >= MAX_CLIENTS {
            return None;
        }
        let local: SocketAddr = if self.upstream.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = bind(local).ok()?;
        self.clients.push((addr, sock));
        self.by_addr.insert(addr, self.clients.len() - 1);
        Some(self.clients.len() - 1)
    }

    fn hold(&mut self, now: Instant, dest: Dest, datagram: &[u8]) {
        let dir = dest.direction();
        for mut at in self.faults.plan(now).into_iter().flatten() {
            if self.held.len() >= MAX_HELD {
                self.overflow += 1;
                continue;
            }
            if let Some(bps) = self.rate_bps {
                // Behind what the link still has to send, then its own time on it.
                at = at.max(self.free_at[dir]);
                self.free_at[dir] = at + Duration::from_secs_f64(datagram.len() as f64 * 8.0 / bps);
            }
            let marked = self.mark_above.is_some_and(|m| self.queued[dir] > m);
            self.marked += u64::from(marked);
            self.queued[dir] += datagram.len();
            self.order += 1;
            self.held
                .push(Reverse((at, self.order, dest, marked, datagram.to_vec())));
        }
    }

    /// Reads what is waiting on every socket (a bounded amount per call).
    fn receive(&mut self, buf: &mut [u8]) {
        let now = Instant::now();
        for _ in 0..256 {
            match self.front.recv_from(buf) {
                Ok((n, from)) => {
                    if let Some(i) = self.client(from) {
                        let d = unicast_only(&buf[..n]);
                        self.hold(now, Dest::Upstream(i), &d);
                    }
                }
                Err(_) => break,
            }
        }
        for i in 0..self.clients.len() {
            for _ in 0..256 {
                match self.clients[i].1.recv_from(buf) {
                    // Only the aggregator's datagrams go back to the worker.
                    Ok((n, from)) if from == self.upstream => {
                        let to = self.clients[i].0;
                        self.hold(now, Dest::Worker(to), &buf[..n]);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
    }

    /// Sends every held datagram that is due; returns when the next one is.
    fn send_due(&mut self) -> Option<Instant> {
        let now = Instant::now();
        while let Some(Reverse((at, ..))) = self.held.peek() {
            if *at > now {
                return Some(*at);
            }
            let Some(Reverse((_, _, dest, marked, d))) = self.held.pop() else {
                break;
            };
            self.queued[dest.direction()] -= d.len();
            let (socket, to) = match dest {
                Dest::Worker(to) => (&self.front, to),
                Dest::Upstream(i) => (&self.clients[i].1, self.upstream),
            };
            if marked {
                let _ = socket2::SockRef::from(socket).set_tos(TOS_CE);
            }
            // A full socket buffer loses the datagram, as a full link would.
            let _ = socket.send_to(&d, to);
            if marked {
                let _ = socket2::SockRef::from(socket).set_tos(0);
            }
        }
        None
    }

    fn wait(&self, timeout: Duration) {
        let mut fds: Vec<libc::pollfd> = std::iter::once(&self.front)
            .chain(self.clients.iter().map(|(_, s)| s))
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = timeout.as_millis().clamp(0, 100) as libc::c_int;
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd for the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    }
}

pub fn run(a: &Args) -> Result<()> {
    a.faults.validate()?;
    let front = bind(a.listen).with_context(|| format!("binding {}", a.listen))?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    println!("relaying on {} to {}", front.local_addr()?, a.upstream);
    io::stdout().flush()?;
    let mut relay = Relay {
        front,
        upstream: a.upstream,
        clients: Vec::new(),
        by_addr: HashMap::new(),
        held: BinaryHeap::new(),
        order: 0,
        faults: Faults::new(a.faults, a.seed),
        overflow: 0,
        rate_bps: a.faults.rate_mbit.map(|r| r * 1e6),
        mark_above: a.faults.mark_above,
        free_at: [Instant::now(); 2],
        queued: [0; 2],
        marked: 0,
    };
    let mut buf = vec![0u8; 1 << 16];
    while !stop.load(Ordering::Relaxed) {
        relay.receive(&mut buf);
        let next = relay.send_due();
        let timeout = next.map_or(Duration::from_millis(100), |t| {
            t.saturating_duration_since(Instant::now())
        });
        if !timeout.is_zero() {
            relay.wait(timeout);
        }
    }
    let s = relay.faults.stats;
    eprintln!(
        "relay stopped: {} datagrams in, {} dropped, {} duplicated, {} reordered, {} marked CE, {} over the hold limit, {} worker addresses",
        s.received,
        s.dropped,
        s.duplicated,
        s.reordered,
        relay.marked,
        relay.overflow,
        relay.clients.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(loss: f64, dup: f64, reorder: f64) -> Faults {
        Faults::new(
            FaultArgs {
                loss,
                dup,
                reorder,
                delay_ms: 1.0,
                reorder_ms: 5.0,
                ..FaultArgs::default()
            },
            7,
        )
    }

    #[test]
    fn rates_follow_the_flags_and_the_seed_fixes_the_plan() {
        let now = Instant::now();
        let mut f = faults(0.05, 0.02, 0.1);
        let plans: Vec<_> = (0..100_000).map(|_| f.plan(now)).collect();
        let s = f.stats;
        assert_eq!(s.received, 100_000);
        let near = |x: u64, p: f64| (x as f64 - p * 1e5).abs() < 0.15 * p * 1e5;
        assert!(near(s.dropped, 0.05), "{s:?}");
        assert!(near(s.duplicated, 0.02 * 0.95), "{s:?}");
        assert!(near(s.reordered, 0.1 * 0.95), "{s:?}");
        let lost = plans.iter().filter(|p| p[0].is_none()).count() as u64;
        assert_eq!(lost, s.dropped);
        for p in plans.iter().filter_map(|p| p[0]) {
            let d = p - now;
            assert!(d == Duration::from_millis(1) || d == Duration::from_millis(6));
        }
        let mut again = faults(0.05, 0.02, 0.1);
        assert!(plans.iter().all(|p| *p == again.plan(now)));
    }

    #[test]
    fn a_clean_relay_changes_nothing() {
        let now = Instant::now();
        let mut f = Faults::new(FaultArgs::default(), 1);
        assert!(FaultArgs::default().is_clean());
        for _ in 0..1000 {
            assert_eq!(f.plan(now), [Some(now), None]);
        }
    }

    #[test]
    fn joins_through_the_relay_ask_for_no_group() {
        let join = |groups| {
            let mut b = Vec::new();
            inagg_proto::wire::encode_join(
                &inagg_proto::wire::Join {
                    job: 3,
                    rank: 1,
                    world: 2,
                    codec: inagg_proto::codec::CodecId::I8,
                    chunk_elems: 64,
                    window: 8,
                    secret: b"s".to_vec(),
                    groups,
                    nonce: 1,
                    completed: 0,
                    proof: None,
                    job_world: None,
                },
                &mut b,
            );
            b
        };
        assert_eq!(unicast_only(&join(true)).as_ref(), &join(false)[..]);
        assert_eq!(unicast_only(&join(false)).as_ref(), &join(false)[..]);
        // Anything else passes as it is, even bytes that are no inagg message.
        assert_eq!(unicast_only(b"not inagg").as_ref(), b"not inagg");
    }

    #[test]
    fn bad_probabilities_are_refused() {
        let bad = FaultArgs {
            loss: 1.0,
            ..FaultArgs::default()
        };
        assert!(bad.validate().is_err());
        let bad = FaultArgs {
            dup: -0.1,
            ..FaultArgs::default()
        };
        assert!(bad.validate().is_err());
    }
}
