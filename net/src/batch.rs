//! Outgoing datagrams, collected and sent in as few system calls as GSO allows.

use std::io::{self, IoSlice};
use std::net::SocketAddr;

use crate::{Outbox, UdpEndpoint};

/// The kernel refuses a GSO send of more than 64 KB in all.
const GSO_BYTES: usize = 65_000;

/// A batch whose datagrams are all whole in the arena: it has no bodies kept elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBody {}

/// One queued datagram: `len` bytes at `off` in the arena, then, if `body` is set,
/// `body_len` bytes that the caller's resolver hands back at flush.
#[derive(Debug, Clone, Copy)]
struct Queued<B> {
    to: SocketAddr,
    off: usize,
    len: usize,
    body: Option<B>,
    body_len: usize,
}

impl<B> Queued<B> {
    fn size(&self) -> usize {
        self.len + self.body_len
    }
}

/// Datagrams waiting to be sent: one arena of bytes and an index of (destination,
/// offset, length, body). A datagram may end in a body of type `B`: a handle to bytes
/// kept elsewhere (an aggregator's result in its slot, sent to every rank), found at
/// flush time and sent from where they are, without a copy. Reused across batches;
/// allocation-free once warm.
#[derive(Debug)]
pub struct SendBatch<B = NoBody> {
    arena: Vec<u8>,
    index: Vec<Queued<B>>,
    order: Vec<usize>,
    /// Where a destination's datagrams are gathered where scatter-gather sends are
    /// not available (outside Linux).
    #[cfg_attr(target_os = "linux", allow(dead_code))]
    gather: Vec<u8>,
    /// Datagrams sent so far.
    pub datagrams: u64,
    /// System calls made for them.
    pub calls: u64,
    /// Datagrams not sent because their body was not the length queued (a resolver
    /// that lost track of it; inside a GSO run it would shift every later datagram).
    pub dropped: u64,
    /// Datagrams not sent because the kernel refused their destination (with
    /// [`SendBatch::set_drop_refused`]).
    pub refused: u64,
    drop_refused: bool,
}

impl<B> Default for SendBatch<B> {
    fn default() -> Self {
        Self {
            arena: Vec::new(),
            index: Vec::new(),
            order: Vec::new(),
            gather: Vec::new(),
            datagrams: 0,
            calls: 0,
            dropped: 0,
            refused: 0,
            drop_refused: false,
        }
    }
}

impl<B: Copy> SendBatch<B> {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a destination the kernel will not send to (no route, port 0, a
    /// firewall's refusal) drops its datagrams, counted in [`SendBatch::refused`],
    /// rather than failing the flush. For a server, whose destinations are whoever
    /// wrote to it: one forged source address must not stop it. A client, which sends
    /// to the one address it was given, wants the error (off by default).
    pub fn set_drop_refused(&mut self, on: bool) {
        self.drop_refused = on;
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes queued in the arena (bodies kept elsewhere not counted).
    pub fn bytes(&self) -> usize {
        self.arena.len()
    }

    /// Queues one datagram.
    pub fn push(&mut self, to: SocketAddr, datagram: &[u8]) {
        let off = self.arena.len();
        self.arena.extend_from_slice(datagram);
        self.index.push(Queued {
            to,
            off,
            len: datagram.len(),
            body: None,
            body_len: 0,
        });
    }

    /// Queues a datagram written by `write` straight into the arena (no copy).
    /// `write` appends to the vector it is given and returns the destination, or `None`
    /// to queue nothing.
    pub fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>) -> Option<SocketAddr>) -> bool {
        self.push_head_with(|buf| write(buf).map(|to| (to, None)))
    }

    /// Queues a datagram whose head `write` appends to the arena and whose rest, if
    /// any, is a body of `len` bytes that the resolver given to
    /// [`SendBatch::flush_with`] returns. `write` returns the destination and the
    /// body, or `None` to queue nothing.
    pub fn push_head_with(
        &mut self,
        write: impl FnOnce(&mut Vec<u8>) -> Option<(SocketAddr, Option<(B, usize)>)>,
    ) -> bool {
        let off = self.arena.len();
        match write(&mut self.arena) {
            Some((to, body)) if self.arena.len() > off => {
                self.index.push(Queued {
                    to,
                    off,
                    len: self.arena.len() - off,
                    body: body.map(|(b, _)| b),
                    body_len: body.map_or(0, |(_, l)| l),
                });
                true
            }
            _ => {
                self.arena.truncate(off);
                false
            }
        }
    }

    /// The send-drain loop of every UDP sender, written once: queues what `out` has
    /// (a head in the arena, and where its body lies), up to `max` datagrams, sends
    /// them with their bodies found in `out`, and repeats until `out` has nothing
    /// more. Returns the datagrams sent.
    pub fn drain<O: Outbox<Body = B> + ?Sized>(
        &mut self,
        ep: &UdpEndpoint,
        max: usize,
        out: &mut O,
    ) -> io::Result<usize> {
        let mut sent = 0;
        loop {
            while self.len() < max && self.push_head_with(|buf| out.poll_head(buf)) {}
            if self.is_empty() {
                return Ok(sent);
            }
            sent += self.len();
            let out = &*out;
            self.flush_with(ep, |b| out.body(b))?;
        }
    }

    /// Sends everything queued, each body as `resolve` returns it (it must return
    /// the length given when the datagram was queued): datagrams to the same
    /// destination go out together, runs of equal size as one GSO send, and up to 64
    /// runs per system call (`sendmmsg`). Order is kept per destination.
    ///
    /// A datagram's head and body go to the kernel as they lie (scatter-gather), so a
    /// run whose datagrams lie apart costs no copy. An aggregator queues each result
    /// for every rank in turn: no two datagrams to one rank follow each other in the
    /// arena, and sending them as they lay made one system call (and the kernel one
    /// packet) per datagram (docs/performance.md, "Batched sends"); gathering them into
    /// one buffer fixed that at the cost of a copy, and scatter-gather removes the copy.
    pub fn flush_with<'r>(
        &mut self,
        ep: &UdpEndpoint,
        resolve: impl Fn(B) -> &'r [u8],
    ) -> io::Result<()> {
        self.order.clear();
        // A body must be the length its head announced: drop any that is not.
        for (i, q) in self.index.iter().enumerate() {
            match q.body {
                Some(b) if resolve(b).len() != q.body_len => self.dropped += 1,
                _ => self.order.push(i),
            }
        }
        let index = &self.index;
        // Stable: keeps each destination's datagrams in the order they were queued.
        self.order.sort_by_key(|&i| index[i].to);
        let result = self.send_ordered(ep, &resolve);
        self.arena.clear();
        self.index.clear();
        result
    }

    /// The run of datagrams that starts at `order[i]`: the end of the run, exclusive,
    /// and the segment size if it holds more than one datagram (a size the kernel
    /// takes: two segments fit in `GSO_BYTES`, so one fits a u16; and at most
    /// `max_size`, what the path's MTU lets through in a run).
    fn run(&self, i: usize, max_segments: usize, max_size: usize) -> (usize, Option<u16>) {
        let first = self.index[self.order[i]];
        let size = first.size();
        // Extend the run while the next datagram has the same destination and size
        // and the run fits one GSO send.
        let mut j = i + 1;
        let mut bytes = size;
        let segment = u16::try_from(size).ok().filter(|_| size <= max_size);
        while j < self.order.len() && j - i < max_segments && segment.is_some() {
            let q = self.index[self.order[j]];
            let s = q.size();
            if q.to != first.to || s > size || bytes + s > GSO_BYTES {
                break;
            }
            bytes += s;
            j += 1;
            if s < size {
                // A shorter datagram may only end a run.
                break;
            }
        }
        (j, segment.filter(|_| j - i > 1))
    }

    #[cfg(target_os = "linux")]
    fn send_ordered<'r>(
        &mut self,
        ep: &UdpEndpoint,
        resolve: &impl Fn(B) -> &'r [u8],
    ) -> io::Result<()> {
        use crate::scatter::{send_mmsg, Msg, Sent, MAX_IOVS, MAX_MSGS, MAX_SEGMENTS};
        let mut i = 0;
        while i < self.order.len() {
            // Build up to MAX_MSGS messages from the runs starting at `i`.
            let max_segments = ep.max_gso_segments().clamp(1, MAX_SEGMENTS);
            let mut iovs: [IoSlice<'_>; MAX_IOVS] = [IoSlice::new(&[]); MAX_IOVS];
            let mut msgs = [Msg {
                to: SocketAddr::from(([0, 0, 0, 0], 0)),
                iov_start: 0,
                iov_len: 0,
                segment: None,
                datagrams: 0,
            }; MAX_MSGS];
            let (mut n_iov, mut n_msg, mut k) = (0, 0, i);
            while k < self.order.len() && n_msg < MAX_MSGS {
                let (end, segment) = self.run(k, max_segments, ep.gso_size_limit());
                if n_iov + 2 * (end - k) > MAX_IOVS {
                    break;
                }
                let start = n_iov;
                // The arena bytes the last buffer covers, while it is a head: a head
                // right after it in the arena extends it (a worker's packets lie in a
                // row, so one buffer carries a whole run).
                let mut open: Option<(usize, usize)> = None;
                for &q in &self.order[k..end] {
                    let q = self.index[q];
                    match open {
                        Some((from, to)) if to == q.off => {
                            iovs[n_iov - 1] = IoSlice::new(&self.arena[from..q.off + q.len]);
                            open = Some((from, q.off + q.len));
                        }
                        _ => {
                            iovs[n_iov] = IoSlice::new(&self.arena[q.off..q.off + q.len]);
                            n_iov += 1;
                            open = Some((q.off, q.off + q.len));
                        }
                    }
                    if let Some(b) = q.body {
                        // Checked against `body_len` in `flush_with`.
                        iovs[n_iov] = IoSlice::new(resolve(b));
                        n_iov += 1;
                        open = None;
                    }
                }
                msgs[n_msg] = Msg {
                    to: self.index[self.order[k]].to,
                    iov_start: start,
                    iov_len: n_iov - start,
                    segment,
                    datagrams: end - k,
                };
                n_msg += 1;
                k = end;
            }
            // A run takes at most 2 x MAX_SEGMENTS buffers of the MAX_IOVS: never none.
            debug_assert!(n_msg > 0);
            let mut m = 0;
            while m < n_msg {
                match send_mmsg(ep, &msgs[m..n_msg], &iovs[..n_iov], self.drop_refused)? {
                    Sent::Some(n) => {
                        self.calls += 1;
                        for msg in &msgs[m..m + n] {
                            self.datagrams += msg.datagrams as u64;
                            i += msg.datagrams;
                        }
                        m += n;
                    }
                    Sent::GsoRefused => {
                        // Rebuild from the refused message on, one datagram each.
                        ep.refuse_gso();
                        break;
                    }
                    Sent::GsoTooLarge(segment) => {
                        // Rebuild from that message on, its datagrams one by one.
                        ep.limit_gso_size(usize::from(segment));
                        break;
                    }
                    Sent::Refused => {
                        // Its datagrams share one destination: drop them all.
                        self.refused += msgs[m].datagrams as u64;
                        i += msgs[m].datagrams;
                        m += 1;
                    }
                }
            }
        }
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    fn send_ordered<'r>(
        &mut self,
        ep: &UdpEndpoint,
        resolve: &impl Fn(B) -> &'r [u8],
    ) -> io::Result<()> {
        let max_segments = ep.max_gso_segments().max(1);
        let mut i = 0;
        while i < self.order.len() {
            let (j, segment) = self.run(i, max_segments, ep.gso_size_limit());
            self.gather.clear();
            for &k in &self.order[i..j] {
                let q = self.index[k];
                self.gather
                    .extend_from_slice(&self.arena[q.off..q.off + q.len]);
                if let Some(b) = q.body {
                    self.gather.extend_from_slice(resolve(b));
                }
            }
            match ep.send(
                self.index[self.order[i]].to,
                &self.gather,
                segment.map(usize::from),
            ) {
                Ok(()) => {
                    self.datagrams += (j - i) as u64;
                    self.calls += 1;
                }
                Err(e) if self.drop_refused && crate::endpoint::refused_destination(&e) => {
                    self.refused += (j - i) as u64;
                }
                Err(e) => return Err(e),
            }
            i = j;
        }
        Ok(())
    }
}

impl SendBatch<NoBody> {
    /// Sends everything queued (see [`SendBatch::flush_with`]).
    pub fn flush(&mut self, ep: &UdpEndpoint) -> io::Result<()> {
        self.flush_with(ep, |b| match b {})
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
        if cfg!(target_os = "linux") && sender.max_gso_segments() >= 7 {
            // One GSO message per destination, both in one sendmmsg.
            assert_eq!(batch.calls, 1);
        }
    }

    #[test]
    fn bodies_kept_elsewhere_follow_their_heads() {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        let sender = UdpEndpoint::bind(local, 1 << 20).expect("bind");
        let mut eps: Vec<UdpEndpoint> = (0..3)
            .map(|_| UdpEndpoint::bind(local, 1 << 20).expect("bind"))
            .collect();
        let addrs: Vec<SocketAddr> = eps.iter().map(|e| e.local_addr().expect("addr")).collect();
        // Kept payloads, as an aggregator's slots hold results: body k is `store[k]`.
        let store: Vec<Vec<u8>> = (0..5u8).map(|k| vec![200 + k; 900]).collect();
        let mut batch: SendBatch<usize> = SendBatch::new();
        for (k, body) in store.iter().enumerate() {
            for (r, to) in addrs.iter().enumerate() {
                // Every destination gets every body after its own head; the last
                // destination also gets a datagram that is all head.
                batch.push_head_with(|buf| {
                    buf.extend_from_slice(&[r as u8, k as u8]);
                    Some((*to, Some((k, body.len()))))
                });
                if r == 2 && k == 2 {
                    batch.push(*to, &[9; 902]);
                }
            }
        }
        // The arena holds the heads only.
        assert_eq!(batch.bytes(), 5 * 3 * 2 + 902);
        batch.flush_with(&sender, |k| &store[k]).expect("flush");
        for (r, ep) in eps.iter_mut().enumerate() {
            let mut want: Vec<Vec<u8>> = (0..5u8)
                .map(|k| [&[r as u8, k][..], &store[usize::from(k)]].concat())
                .collect();
            if r == 2 {
                want.insert(3, vec![9; 902]);
            }
            assert_eq!(take(ep, want.len()), want, "destination {r}");
        }
        assert_eq!(batch.datagrams, 16);
        assert!(batch.is_empty());
        if cfg!(target_os = "linux") && sender.max_gso_segments() >= 6 {
            assert_eq!(batch.calls, 1, "three GSO messages in one sendmmsg");
        }
    }

    #[test]
    fn a_body_of_the_wrong_length_is_dropped_alone() {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        let sender = UdpEndpoint::bind(local, 1 << 20).expect("bind");
        let mut to = UdpEndpoint::bind(local, 1 << 20).expect("bind");
        let addr = to.local_addr().expect("addr");
        let store: Vec<Vec<u8>> = vec![vec![1; 500], vec![2; 499], vec![3; 500]];
        let mut batch: SendBatch<usize> = SendBatch::new();
        for k in 0..3 {
            // Body 1 announces 500 bytes but resolves to 499: inside this GSO run it
            // would shift body 2's datagram.
            batch.push_head_with(|buf| {
                buf.push(k as u8);
                Some((addr, Some((k, 500))))
            });
        }
        batch.flush_with(&sender, |k| &store[k]).expect("flush");
        let want = vec![
            [&[0u8][..], &store[0]].concat(),
            [&[2u8][..], &store[2]].concat(),
        ];
        assert_eq!((batch.datagrams, batch.dropped), (2, 1));
        assert_eq!(take(&mut to, 2), want);
    }

    #[test]
    fn a_destination_the_kernel_refuses_is_dropped_and_the_rest_go_out() {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        let sender = UdpEndpoint::bind(local, 1 << 20).expect("bind");
        // Port 0: `sendto` fails with EINVAL. A lone datagram, then a run of three
        // (one GSO message where the kernel has GSO), among good ones.
        let bad = SocketAddr::from(([127, 0, 0, 1], 0));
        let fill = |batch: &mut SendBatch, good: SocketAddr| {
            batch.push(good, b"one");
            batch.push(bad, b"lost");
            batch.push(good, b"two");
            for _ in 0..3 {
                batch.push(bad, &[7; 100]);
            }
            batch.push(good, b"three");
        };
        // A client wants the error.
        let client_to = UdpEndpoint::bind(local, 1 << 20).expect("bind");
        let mut batch = SendBatch::new();
        fill(&mut batch, client_to.local_addr().expect("addr"));
        let err = batch.flush(&sender).expect_err("port 0 is refused");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
        // A server drops what it cannot send and sends the rest.
        let mut to = UdpEndpoint::bind(local, 1 << 20).expect("bind");
        let mut batch = SendBatch::new();
        batch.set_drop_refused(true);
        fill(&mut batch, to.local_addr().expect("addr"));
        batch.flush(&sender).expect("flush drops the refused");
        assert_eq!((batch.datagrams, batch.refused), (3, 4));
        assert!(batch.is_empty());
        let mut got = take(&mut to, 3);
        got.sort();
        assert_eq!(
            got,
            vec![b"one".to_vec(), b"three".to_vec(), b"two".to_vec()]
        );
    }

    #[test]
    fn an_ipv4_destination_is_reached_from_a_dual_stack_socket() {
        let Ok(sender) = UdpEndpoint::bind(SocketAddr::from(([0u16; 8], 0)), 1 << 20) else {
            eprintln!("skipped: no IPv6 on this host");
            return;
        };
        let mut to =
            UdpEndpoint::bind(SocketAddr::from(([127, 0, 0, 1], 0)), 1 << 20).expect("bind");
        let mut batch = SendBatch::new();
        batch.push(to.local_addr().expect("addr"), b"four");
        batch.flush(&sender).expect("flush");
        assert_eq!(take(&mut to, 1), vec![b"four".to_vec()]);
    }
}
