//! An in-memory datagram network: sockets with addresses, blocking receives with a
//! deadline, and seeded loss, duplication and reordering. The real aggregator server
//! and worker driver run over it as they run over UDP (`Server::bind_memory`, the
//! worker's `Transport::Memory`), so that their loops, heartbeats, retransmissions
//! and shutdown are tested without sockets.
//!
//! Datagrams to an address nobody holds vanish, as over UDP. The fault decisions come
//! from one seeded generator in the order datagrams are sent; with several threads
//! sending, that order (and so which datagram a fault hits) depends on scheduling.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{send_each, Outbox, Transport};

/// The faults a [`MemNet`] injects, each a probability per datagram.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemFaults {
    /// The datagram is dropped.
    pub loss: f64,
    /// The datagram arrives twice.
    pub duplicate: f64,
    /// The datagram is held back until the next one to the same address has gone out.
    pub reorder: f64,
    /// Seed of the fault decisions.
    pub seed: u64,
}

/// An in-memory network; clones are handles to the same network.
#[derive(Debug, Clone)]
pub struct MemNet {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    arrived: Condvar,
}

#[derive(Debug)]
struct State {
    faults: MemFaults,
    rng: u64,
    /// Each bound address's queue of (sender, datagram).
    queues: HashMap<SocketAddr, VecDeque<(SocketAddr, Vec<u8>)>>,
    /// A datagram held back for reordering, per destination.
    held: HashMap<SocketAddr, (SocketAddr, Vec<u8>)>,
    next_port: u16,
}

impl State {
    /// A uniform draw in `[0, 1)` (splitmix64).
    fn draw(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn deliver(&mut self, to: SocketAddr, from: SocketAddr, d: Vec<u8>) {
        if let Some(q) = self.queues.get_mut(&to) {
            q.push_back((from, d));
        }
    }
}

/// The address block of the network's sockets.
const NET: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

impl MemNet {
    /// A network with `faults`.
    pub fn new(faults: MemFaults) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    faults,
                    rng: faults.seed,
                    queues: HashMap::new(),
                    held: HashMap::new(),
                    next_port: 1024,
                }),
                arrived: Condvar::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds a socket at `addr`, or with port 0 at a free one (every IP is taken as
    /// given; `0.0.0.0`, `::` and `127.0.0.1` mean the network's own block). Fails
    /// with `AddrInUse` where a socket holds the address.
    pub fn bind(&self, addr: SocketAddr) -> io::Result<MemSocket> {
        let mut s = self.lock();
        let ip = if addr.ip().is_unspecified() || addr.ip().is_loopback() {
            NET.into()
        } else {
            addr.ip()
        };
        let addr = if addr.port() == 0 {
            let mut found = None;
            for _ in 0..u16::MAX {
                let port = s.next_port;
                s.next_port = s.next_port.checked_add(1).unwrap_or(1024);
                let a = SocketAddr::new(ip, port);
                if !s.queues.contains_key(&a) {
                    found = Some(a);
                    break;
                }
            }
            found.ok_or_else(|| io::Error::new(io::ErrorKind::AddrNotAvailable, "no free port"))?
        } else {
            SocketAddr::new(ip, addr.port())
        };
        if s.queues.contains_key(&addr) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{addr} is taken"),
            ));
        }
        s.queues.insert(addr, VecDeque::new());
        Ok(MemSocket {
            net: self.clone(),
            addr,
            buf: Vec::new(),
        })
    }
}

/// A socket of a [`MemNet`]; its address is free again when it is dropped.
#[derive(Debug)]
pub struct MemSocket {
    net: MemNet,
    addr: SocketAddr,
    /// Where [`Transport::send`] writes each datagram.
    buf: Vec<u8>,
}

impl MemSocket {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends one datagram to `to`, through the network's faults.
    pub fn send_to(&self, to: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        let mut s = self.net.lock();
        let faults = s.faults;
        if faults.loss > 0.0 && s.draw() < faults.loss {
            return Ok(());
        }
        let copies = if faults.duplicate > 0.0 && s.draw() < faults.duplicate {
            2
        } else {
            1
        };
        let hold = faults.reorder > 0.0 && s.draw() < faults.reorder;
        let released = s.held.remove(&to);
        for _ in 0..copies {
            if hold && !s.held.contains_key(&to) {
                s.held.insert(to, (self.addr, datagram.to_vec()));
            } else {
                s.deliver(to, self.addr, datagram.to_vec());
            }
        }
        // What was held goes out after this one: it has been overtaken.
        if let Some((from, d)) = released {
            s.deliver(to, from, d);
        }
        drop(s);
        self.net.shared.arrived.notify_all();
        Ok(())
    }

    /// Hands every datagram waiting for this socket to `f(from, datagram)`, waiting up
    /// to `wait` for one if none is; returns how many it handed over.
    pub fn recv(
        &mut self,
        wait: Duration,
        mut f: impl FnMut(SocketAddr, &[u8]),
    ) -> io::Result<usize> {
        let deadline = Instant::now().checked_add(wait);
        let mut s = self.net.lock();
        loop {
            let taken: Vec<_> = s
                .queues
                .get_mut(&self.addr)
                .map(|q| q.drain(..).collect())
                .unwrap_or_default();
            if !taken.is_empty() {
                drop(s);
                for (from, d) in &taken {
                    f(*from, d);
                }
                return Ok(taken.len());
            }
            let now = Instant::now();
            let left = match deadline {
                Some(d) if d > now => d - now,
                Some(_) => return Ok(0),
                None => Duration::from_secs(3600),
            };
            s = self
                .net
                .shared
                .arrived
                .wait_timeout(s, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

impl<B: Copy> Transport<B> for MemSocket {
    type Error = io::Error;

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    fn recv(
        &mut self,
        wait: Duration,
        f: impl FnMut(SocketAddr, &[u8]),
    ) -> Result<usize, io::Error> {
        MemSocket::recv(self, wait, f)
    }

    fn send(&mut self, out: &mut impl Outbox<Body = B>) -> Result<usize, io::Error> {
        let mut buf = std::mem::take(&mut self.buf);
        let sent = send_each(out, &mut buf, |to, d| self.send_to(to, d));
        self.buf = buf;
        sent
    }

    fn describe(&self) -> String {
        "in memory".to_string()
    }
}

impl Drop for MemSocket {
    fn drop(&mut self) {
        let mut s = self.net.lock();
        s.queues.remove(&self.addr);
        s.held.remove(&self.addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 0))
    }

    #[test]
    fn datagrams_arrive_in_order_and_vanish_where_nobody_listens() {
        let net = MemNet::new(MemFaults::default());
        let a = net.bind(any()).expect("a");
        let mut b = net.bind(any()).expect("b");
        assert_ne!(a.local_addr(), b.local_addr());
        for i in 0..5u8 {
            a.send_to(b.local_addr(), &[i]).expect("send");
        }
        let mut got = Vec::new();
        let n = b
            .recv(Duration::from_millis(10), |from, d| {
                assert_eq!(from, a.local_addr());
                got.push(d[0]);
            })
            .expect("recv");
        assert_eq!((n, got), (5, vec![0, 1, 2, 3, 4]));
        let gone = b.local_addr();
        drop(b);
        a.send_to(gone, b"lost").expect("a send to nobody succeeds");
        let taken = net.bind(gone).expect("the address is free again");
        assert_eq!(taken.local_addr(), gone);
        assert!(net.bind(gone).is_err(), "bound twice");
    }

    #[test]
    fn a_receive_waits_for_its_deadline_or_a_datagram() {
        let net = MemNet::new(MemFaults::default());
        let a = net.bind(any()).expect("a");
        let mut b = net.bind(any()).expect("b");
        let start = Instant::now();
        assert_eq!(
            b.recv(Duration::from_millis(20), |_, _| {}).expect("recv"),
            0
        );
        assert!(start.elapsed() >= Duration::from_millis(20));
        let to = b.local_addr();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(10));
                a.send_to(to, b"late").expect("send");
            });
            assert_eq!(b.recv(Duration::from_secs(30), |_, _| {}).expect("recv"), 1);
        });
    }

    #[test]
    fn faults_lose_duplicate_and_reorder_as_seeded() {
        let run = || {
            let net = MemNet::new(MemFaults {
                loss: 0.1,
                duplicate: 0.1,
                reorder: 0.1,
                seed: 3,
            });
            let a = net.bind(any()).expect("a");
            let mut b = net.bind(any()).expect("b");
            for i in 0..1000u16 {
                a.send_to(b.local_addr(), &i.to_le_bytes()).expect("send");
            }
            let mut got = Vec::new();
            b.recv(Duration::ZERO, |_, d| {
                got.push(u16::from_le_bytes([d[0], d[1]]))
            })
            .expect("recv");
            got
        };
        let got = run();
        assert_eq!(got, run(), "the same seed, the same faults");
        let mut unique = got.clone();
        unique.sort_unstable();
        let dups = unique.len();
        unique.dedup();
        let (lost, dup) = (1000 - unique.len(), dups - unique.len());
        let reordered = got.windows(2).filter(|w| w[1] < w[0]).count();
        for (what, n) in [
            ("lost", lost),
            ("duplicated", dup),
            ("reordered", reordered),
        ] {
            assert!((40..200).contains(&n), "{what}: {n} of 1000");
        }
    }
}
