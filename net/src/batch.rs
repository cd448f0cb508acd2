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
            // Extend the run while the next datagram has the same destination and size,
            // follows in the arena, and the run fits one GSO send.
            let mut j = i + 1;
            let mut end = off + len;
            while j < self.order.len() && j - i < max_segments {
                let (t2, o2, l2) = self.index[self.order[j]];
                if t2 != to || o2 != end || l2 > len || end + l2 - off > GSO_BYTES {
                    break;
                }
                end += l2;
                j += 1;
                if l2 < len {
                    // A shorter datagram may only end a run.
                    break;
                }
            }
            let segment = (j - i > 1).then_some(len);
            if let Err(e) = ep.send(to, &self.arena[off..end], segment) {
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
