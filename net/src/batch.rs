//! Outgoing datagrams, collected and sent in as few system calls as GSO allows.

use std::io;
use std::net::SocketAddr;

use crate::UdpEndpoint;

/// The kernel refuses a GSO send of more than 64 KB in all.
const GSO_BYTES: usize = 65_000;

/// Datagrams waiting to be sent: one arena of bytes and an index of (destination,
/// offset, length). Reused across batches; allocation-free once warm.
#[derive(Debug, Default)]
pub struct SendBatch {
    arena: Vec<u8>,
    index: Vec<(SocketAddr, usize, usize)>,
    order: Vec<usize>,
    /// Where a destination's datagrams are gathered when they do not follow each other
    /// in the arena (an aggregator queues each result for every rank in turn).
    gather: Vec<u8>,
    /// Datagrams sent so far.
    pub datagrams: u64,
    /// System calls made for them.
    pub calls: u64,
}

impl SendBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.arena.len()
    }

    /// Queues one datagram.
    pub fn push(&mut self, to: SocketAddr, datagram: &[u8]) {
        let off = self.arena.len();
        self.arena.extend_from_slice(datagram);
        self.index.push((to, off, datagram.len()));
    }

    /// Queues a datagram written by `write` straight into the arena (no copy).
    /// `write` appends to the vector it is given and returns the destination, or `None`
    /// to queue nothing.
    pub fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>) -> Option<SocketAddr>) -> bool {
        let off = self.arena.len();
        match write(&mut self.arena) {
            Some(to) if self.arena.len() > off => {
                self.index.push((to, off, self.arena.len() - off));
                true
            }
            _ => {
                self.arena.truncate(off);
                false
            }
        }
    }

    /// Sends everything queued: datagrams to the same destination go out together,
    /// runs of equal size as one GSO send. Order is kept per destination.
    ///
    /// A run whose datagrams lie apart in the arena is first gathered into one buffer:
    /// an aggregator queues each result for every rank in turn, so no two datagrams to
    /// one rank ever follow each other, and without gathering it made one system call
    /// (and the kernel one packet) per datagram (`strace -c`: 32,792 `sendmsg` for
    /// 32,792 results of 8 KiB). The copy costs less than the calls it saves.
    pub fn flush(&mut self, ep: &UdpEndpoint) -> io::Result<()> {
        let max_segments = ep.max_gso_segments().max(1);
        self.order.clear();
        self.order.extend(0..self.index.len());
        let index = &self.index;
        // Stable: keeps each destination's datagrams in the order they were queued.
        self.order.sort_by_key(|&i| index[i].0);
        let mut i = 0;
        let mut result = Ok(());
        while i < self.order.len() {
            let (to, off, len) = self.index[self.order[i]];
            // Extend the run while the next datagram has the same destination and size
            // and the run fits one GSO send.
            let mut j = i + 1;
            let mut bytes = len;
            let mut contiguous = true;
            while j < self.order.len() && j - i < max_segments {
                let (t2, o2, l2) = self.index[self.order[j]];
                if t2 != to || l2 > len || bytes + l2 > GSO_BYTES {
                    break;
                }
                contiguous &= o2 == off + bytes;
                bytes += l2;
                j += 1;
                if l2 < len {
                    // A shorter datagram may only end a run.
                    break;
                }
            }
            let segment = (j - i > 1).then_some(len);
            let contents = if contiguous {
                &self.arena[off..off + bytes]
            } else {
                self.gather.clear();
                for &k in &self.order[i..j] {
                    let (_, o, l) = self.index[k];
                    self.gather.extend_from_slice(&self.arena[o..o + l]);
                }
                &self.gather[..]
            };
            if let Err(e) = ep.send(to, contents, segment) {
                result = Err(e);
                break;
            }
            self.datagrams += (j - i) as u64;
            self.calls += 1;
            i = j;
        }
        self.arena.clear();
        self.index.clear();
        result
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// Receives until `n` datagrams came or two seconds passed.
    fn take(ep: &mut UdpEndpoint, n: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let end = Instant::now() + Duration::from_secs(2);
        while got.len() < n && Instant::now() < end {
            ep.recv(Duration::from_millis(50), |_, d| got.push(d.to_vec()))
                .expect("recv");
        }
        got
    }

    #[test]
    fn interleaved_destinations_go_out_in_order_and_in_few_sends() {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        let sender = UdpEndpoint::bind(local, 1 << 20).expect("bind");
        let mut b = UdpEndpoint::bind(local, 1 << 20).expect("bind");
        let mut c = UdpEndpoint::bind(local, 1 << 20).expect("bind");
        let (to_b, to_c) = (b.local_addr().expect("b"), c.local_addr().expect("c"));
        // As an aggregator queues results: each datagram for every destination in
        // turn, so no two for one destination are neighbours in the arena.
        let mut batch = SendBatch::new();
        for i in 0..6u8 {
            batch.push(to_b, &[i; 1000]);
            batch.push(to_c, &[100 + i; 1000]);
        }
        batch.push(to_b, &[6; 400]); // A shorter one ends b's run.
        batch.flush(&sender).expect("flush");
        let want_b: Vec<Vec<u8>> = (0..6u8)
            .map(|i| vec![i; 1000])
            .chain([vec![6; 400]])
            .collect();
        let want_c: Vec<Vec<u8>> = (0..6u8).map(|i| vec![100 + i; 1000]).collect();
        assert_eq!(take(&mut b, 7), want_b);
        assert_eq!(take(&mut c, 6), want_c);
        assert_eq!(batch.datagrams, 13);
        if sender.max_gso_segments() >= 7 {
            // One GSO send per destination.
            assert_eq!(batch.calls, 2);
        }
    }
}
