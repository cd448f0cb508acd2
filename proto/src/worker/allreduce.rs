//! One allreduce in flight: which packets are out, which results are in, and the
//! exponent lookahead of block-scaled codecs.
//!
//! An allreduce of `n` chunks is a stream of packets numbered `0..n + W` from the
//! job's sequence base, where `W` is the lookahead: the window `S` (or `n`, if smaller)
//! for block-scaled codecs, 0 for float codecs. Packet `q` carries the data of chunk
//! `q - W` (when `q >= W`) and the exponent of chunk `q` (when `q < n`). Its result
//! brings the sum of chunk `q - W` and the maximum exponent of chunk `q` over the ranks,
//! just in time to quantize chunk `q`, which packet `q + W` carries. The first `W`
//! packets carry exponents only: that is the priming window. For float codecs packet
//! `q` is simply chunk `q`.
//!
//! A block-scaled codec that aligns exponents in the aggregator (`i8`,
//! [`crate::codec::Codec::aligns_exponents`]) needs no shared exponent, so it has no
//! lookahead either, unless zero skipping asks for one: each packet carries its chunk
//! quantized at this rank's own exponent, read just before, and its result the sum's.
//!
//! Packet `q` may be sent once packet `q - S` and every packet before it have their
//! results (the window: at most `S` packets without a result, `q` included), which
//! is what lets the aggregator reuse slot versions safely: packet `q` uses slot
//! `q mod S`, version `(q / S) mod 2`, which packet `q - 2S` used last. With a
//! lookahead, also once packet `q - W` has its result, whose exponent it needs
//! (docs/protocol.md, "The window rule").

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use super::rtt::RttEstimator;
use crate::codec::{self, Codec};
use crate::wire::{
    DataHeader, Grant, FLAG_LAST, FLAG_NONFINITE, FLAG_PROBE, FLAG_RETX, NO_EXPONENT,
};

/// Counters of one allreduce.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllreduceStats {
    /// Elements reduced.
    pub elements: usize,
    /// Datagrams sent (contributions, retransmissions, heartbeats).
    pub packets_sent: u64,
    /// Bytes of those datagrams (inagg headers included).
    pub bytes_sent: u64,
    /// Datagrams received that belonged to this job.
    pub packets_received: u64,
    /// Bytes of those.
    pub bytes_received: u64,
    /// Contributions sent again after a timeout (probes included).
    pub retransmissions: u64,
    /// Bytes of those retransmissions (counted in `bytes_sent` too).
    pub retransmitted_bytes: u64,
    /// Retransmissions sent as header-only probes, the aggregator having said it holds
    /// the contribution.
    pub probes: u64,
    /// Retransmissions sent because later packets' results came first, not on a timeout.
    pub fast_retransmissions: u64,
    /// Results that arrived for a packet already complete.
    pub duplicate_results: u64,
    /// Results that carried a congestion mark.
    pub marks: u64,
    /// Dips the congestion control began (docs/protocol.md, 6.10).
    pub dips: u64,
    /// Times the pacing rule held a send back until its timer (docs/protocol.md,
    /// 6.10): 0 where pacing is off (loopback, QUIC).
    pub pacing_holds: u64,
    /// Loss bursts that began or restarted the overflow rule's hold (docs/protocol.md,
    /// 6.10).
    pub overflows: u64,
    /// Results of chunks in which some rank's tensor held a NaN or an infinity that a
    /// block-scaled codec cannot carry: the allreduce is an error on every rank.
    pub nonfinite_chunks: u64,
}

/// What an allreduce does beyond the plain protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Options {
    /// Stochastic rounding, seeded: the key of packet `seq` derives from it.
    pub dither_seed: Option<u64>,
    /// Chunks that are zero on every rank travel without payload.
    pub skip_zeros: bool,
}

/// Results this many packets later than a packet without one are put down to
/// reordering; more, to loss.
const REORDER_DISTANCE: u64 = 3;

/// The per-packet state, in a ring indexed by `q mod S`.
#[derive(Debug, Clone, Copy)]
struct Packet {
    /// First transmission.
    sent_at: Option<Instant>,
    /// Latest transmission.
    last_at: Option<Instant>,
    tx: u32,
    done: bool,
    /// The aggregator said it holds this contribution: the next retransmission is a
    /// probe without payload.
    held: bool,
    /// Retransmissions since the aggregator was last heard about this packet: the
    /// exponent of the timeout's backoff.
    backoff: u32,
    /// The aggregator said at least once that it held this contribution: a delay of
    /// this packet is a peer's loss, not this rank's.
    was_held: bool,
}

/// How a datagram that a `poll_transmit` call appended ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// The buffer holds the whole datagram.
    InBuf,
    /// The datagram goes on with elements `.0` of the tensor, as their little-endian
    /// bytes: the payload of an f32 contribution, left where it is so that the driver
    /// can send it without a copy.
    Data(std::ops::Range<usize>),
    /// The datagram goes on with bytes `.0` of the worker's payload buffer
    /// ([`crate::worker::Worker::payload`]): an encoded payload, written where it
    /// stays until it is sent, so that the driver sends it from there. Encoding after
    /// the head instead zeroed the payload's bytes first (the buffer grew for each
    /// datagram), CPU spent for nothing (docs/performance.md, "No copies on the way
    /// out").
    Encoded(std::ops::Range<usize>),
}

/// What became of a result handed to [`Allreduce::handle_result`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResultOutcome {
    /// Written into the caller's buffer; carries an RTT sample if the packet was sent once.
    Accepted(Option<std::time::Duration>),
    /// A result already received.
    Duplicate,
    /// The aggregator holds this rank's contribution and waits for other ranks.
    Held,
    /// Not a packet of this allreduce, or inconsistent with it.
    Ignored,
}

/// The state of one allreduce.
#[derive(Debug)]
pub(crate) struct Allreduce {
    codec: &'static dyn Codec,
    world: u16,
    chunk: usize,
    len: usize,
    /// Chunks.
    n: u64,
    /// Lookahead distance `W`.
    lookahead: u64,
    /// Slots `S` (the largest window).
    slots: u64,
    /// First sequence number.
    base: u64,
    /// Packets below this one all have their results.
    oldest: u64,
    /// The next packet never sent.
    next: u64,
    ring: Vec<Packet>,
    /// Exponent of each of this rank's chunks (block-scaled codecs); for codecs that
    /// align exponents, of each exponent block of each chunk, `blocks` per chunk
    /// ([`codec::EXPONENT_BLOCK`]).
    e_local: Vec<i8>,
    /// Exponent blocks per chunk in `e_local`.
    blocks: usize,
    /// The chunks whose exponents `e_local` holds already.
    e_known: Vec<bool>,
    /// This rank's chunks that hold a NaN or an infinity (block-scaled codecs only):
    /// they go out flagged `FLAG_NONFINITE`.
    nonfinite: Vec<bool>,
    /// Maximum exponent over the ranks, from the results.
    e_max: Vec<i8>,
    /// Retransmission deadlines: (deadline, packet, tx count when armed).
    timers: BinaryHeap<Reverse<(Instant, u64, u32)>>,
    /// Packets due for retransmission.
    due: Vec<u64>,
    /// Job, rank, codec and token of every contribution.
    template: DataHeader,
    /// Options of this allreduce.
    opts: Options,
    /// Error feedback: this rank's quantization residual, filled as chunks are sent.
    pub residual: Option<Vec<f32>>,
    /// Scratch for the residual: a chunk decoded back from its wire form.
    scratch: Vec<f32>,
    pub started: Instant,
    /// When the last new result arrived (or the start).
    pub last_progress: Instant,
    pub stats: AllreduceStats,
    /// The lowest sequence number found lost since the last `take_loss`, for the
    /// congestion window: results that needed a retransmission of this rank's own
    /// (sent more than once, never held by the aggregator for a peer).
    lost: Option<u64>,
    /// A result said the aggregator is re-sizing the job's pool: ask for the new grant
    /// before the next allreduce.
    pub regrant: bool,
}

impl Allreduce {
    pub fn new(
        codec: &'static dyn Codec,
        grant: &Grant,
        base: u64,
        len: usize,
        opts: Options,
        residual: Option<Vec<f32>>,
        now: Instant,
    ) -> Self {
        let (world, chunk, slots) = (grant.world, usize::from(grant.chunk_elems), grant.window);
        let template = DataHeader {
            job: grant.job,
            rank: grant.rank,
            codec: codec.id(),
            flags: 0,
            token: grant.token,
            seq: 0,
            slot: 0,
            version: 0,
            scale_exp: NO_EXPONENT,
            next_exp: NO_EXPONENT,
            count: 0,
        };
        // An empty tensor is one empty chunk, not none: its packet, flagged last like
        // any allreduce's, tells a rank that reduces [] from one whose tensor has
        // data (the counts differ), where sending nothing let the first rank's next
        // tensor be summed with the other's current one.
        let n = len.div_ceil(chunk).max(1) as u64;
        let slots = u64::from(slots.max(1));
        // Block exponents travel one window ahead for block-scaled codecs (the shared
        // scale) and, with zero skipping, for every codec (an all-zero chunk has none).
        // A codec that aligns exponents in the aggregator needs none shared.
        let shared = codec.block_scaled() && !codec.aligns_exponents();
        let lookahead = if shared || opts.skip_zeros {
            slots.min(n)
        } else {
            0
        };
        let per_chunk = if lookahead > 0 || codec.block_scaled() {
            n as usize
        } else {
            0
        };
        Self {
            codec,
            world,
            chunk,
            len,
            n,
            lookahead,
            slots,
            base,
            oldest: 0,
            next: 0,
            ring: vec![
                Packet {
                    sent_at: None,
                    last_at: None,
                    tx: 0,
                    done: false,
                    held: false,
                    backoff: 0,
                    was_held: false,
                };
                slots as usize
            ],
            e_local: vec![NO_EXPONENT; per_chunk * codec::exponent_blocks(codec, chunk)],
            blocks: codec::exponent_blocks(codec, chunk),
            e_known: vec![false; per_chunk],
            nonfinite: vec![false; per_chunk],
            e_max: vec![NO_EXPONENT; if lookahead > 0 { n as usize } else { 0 }],
            timers: BinaryHeap::new(),
            due: Vec::new(),
            template,
            opts,
            scratch: if residual.is_some() {
                vec![0.0; chunk]
            } else {
                Vec::new()
            },
            residual,
            started: now,
            last_progress: now,
            stats: AllreduceStats {
                elements: len,
                ..AllreduceStats::default()
            },
            lost: None,
            regrant: false,
        }
    }

    /// Packets in the whole allreduce.
    pub fn total(&self) -> u64 {
        self.n + self.lookahead
    }

    pub fn is_done(&self) -> bool {
        self.oldest == self.total()
    }

    /// The element range of chunk `j`.
    fn chunk_range(&self, j: u64) -> std::ops::Range<usize> {
        let start = j as usize * self.chunk;
        start..(start + self.chunk).min(self.len)
    }

    /// The chunk whose data packet `q` carries, if any.
    fn data_chunk(&self, q: u64) -> Option<u64> {
        q.checked_sub(self.lookahead)
    }

    /// Chunk `j` is zero on every rank and travels without payload.
    fn skipped(&self, j: u64) -> bool {
        self.opts.skip_zeros && self.e_max[j as usize] == NO_EXPONENT
    }

    /// The elements packet `q` carries on the wire.
    fn data_range(&self, q: u64) -> std::ops::Range<usize> {
        match self.data_chunk(q) {
            Some(j) if !(self.lookahead > 0 && self.skipped(j)) => self.chunk_range(j),
            _ => 0..0,
        }
    }

    /// The block exponent packet `q`'s data is quantized with: the ranks' shared one,
    /// or, for a codec that aligns exponents, this rank's own, read from the chunk now,
    /// just before it is quantized (so that the chunk is in cache for that), unless the
    /// lookahead or an earlier transmission already did.
    fn scale_exp(&mut self, q: u64, data: &[f32]) -> i8 {
        if let Some(j) = self.data_chunk(q) {
            if self.codec.aligns_exponents() && !self.data_range(q).is_empty() {
                self.local_exponent(j as usize, data);
            }
        }
        self.sent_scale_exp(q)
    }

    /// The block exponent of packet `q`'s data as sent ([`Allreduce::scale_exp`]).
    fn sent_scale_exp(&self, q: u64) -> i8 {
        match self.data_chunk(q) {
            Some(j) if self.codec.aligns_exponents() => {
                if self.data_range(q).is_empty() {
                    NO_EXPONENT
                } else {
                    self.e_local[j as usize * self.blocks]
                }
            }
            Some(j) if self.lookahead > 0 => self.e_max[j as usize],
            _ => NO_EXPONENT,
        }
    }

    /// The exponent of this rank's chunk `j`. Non-finite values count as the largest;
    /// for block-scaled codecs they also mark the chunk, whose data then goes out
    /// flagged so that every rank's allreduce ends in the same error.
    /// For a codec that aligns exponents, of its first exponent block, having read
    /// every block's ([`Allreduce::block_exponents`]).
    fn local_exponent(&mut self, j: usize, data: &[f32]) -> i8 {
        let base = j * self.blocks;
        if !self.e_known[j] {
            self.e_known[j] = true;
            let range = self.chunk_range(j as u64);
            let k = codec::exponent_blocks(self.codec, range.len());
            let mut exps = [Ok(NO_EXPONENT); codec::MAX_BLOCKS];
            codec::block_exponents_of(&data[range], &mut exps[..k]);
            for (b, e) in exps[..k].iter().enumerate() {
                let e = match *e {
                    Ok(e) => e,
                    Err(codec::NonFinite) => {
                        self.nonfinite[j] |= self.codec.block_scaled();
                        codec::MAX_EXPONENT
                    }
                };
                self.e_local[base + b] = e;
            }
        }
        self.e_local[base]
    }

    /// The largest exponent of this rank's chunk `j` over its exponent blocks: what the
    /// lookahead carries (`next_exp`), for the shared scale and for zero skipping, which
    /// must not take a chunk whose first block alone is zero for an all-zero one.
    fn chunk_exponent(&mut self, j: usize, data: &[f32]) -> i8 {
        self.local_exponent(j, data);
        self.local_exponents(j)
            .iter()
            .copied()
            .max()
            .unwrap_or(NO_EXPONENT)
    }

    /// This rank's exponents of chunk `j`, one per exponent block, as
    /// [`Allreduce::local_exponent`] read them.
    fn local_exponents(&self, j: usize) -> &[i8] {
        let base = j * self.blocks;
        let k = codec::exponent_blocks(self.codec, self.chunk_range(j as u64).len());
        &self.e_local[base..base + k]
    }

    /// The exponents of packet `q`'s blocks as sent, one per exponent block of its
    /// data: the first is [`Allreduce::sent_scale_exp`]. Empty without data.
    fn block_exponents(&self, q: u64) -> &[i8] {
        match self.data_chunk(q) {
            Some(j) if self.codec.aligns_exponents() && !self.data_range(q).is_empty() => {
                self.local_exponents(j as usize)
            }
            _ => &[],
        }
    }

    /// Quantizes `src`, the data of packet `q` (sequence number `seq`), into `out` at
    /// `scale_exp` (for codecs that align exponents, at its blocks' own
    /// ([`Allreduce::block_exponents`]), the later ones written after the data:
    /// [`codec::payload_bytes`]); with `back`, decodes that payload again into it, for
    /// the residual.
    fn encode_payload(
        &self,
        (q, seq): (u64, u64),
        scale_exp: i8,
        src: &[f32],
        out: &mut [u8],
        back: Option<&mut [f32]>,
    ) {
        let exps = self.block_exponents(q);
        let dither = self.dither(seq);
        let w = self.codec.wire_bytes();
        let k = exps.len().max(1);
        let mut back = back;
        for b in 0..k {
            let e = exps.get(b).copied().unwrap_or(scale_exp);
            let mut scale = self.codec.scale(self.world, e);
            // Each block its own random stream: the streams count from each slice's
            // first element.
            scale.dither = dither.map(|d| d ^ (b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let r = codec::block_range(b, src.len(), k);
            let bytes = r.start * w..r.end * w;
            self.codec
                .encode(&src[r.clone()], scale, &mut out[bytes.clone()]);
            if let Some(t) = back.as_deref_mut() {
                self.codec.decode(&out[bytes], scale, &mut t[r]);
            }
            if b > 0 {
                out[src.len() * w + b - 1] = e as u8;
            }
        }
    }

    /// The random stream of packet `seq` for stochastic rounding.
    fn dither(&self, seq: u64) -> Option<u64> {
        self.opts.dither_seed.map(|s| {
            s ^ seq.wrapping_mul(0xd6e8_feb8_6659_fd93) ^ (u64::from(self.template.rank) << 48)
        })
    }

    /// Appends the next packet to send (a retransmission first, then a new one within
    /// `window`) to `buf`, header then payload; `None` when nothing is due. With
    /// `payloads`, the payload does not follow the header in `buf`: one that is a byte
    /// copy of `data` (see [`crate::codec::WorkerCodec::wire_is_native_f32`]) is left there,
    /// and [`Tail::Data`] says which elements follow the header; any other goes into
    /// `payloads`, at a place of its own per slot, which it only grows, and
    /// [`Tail::Encoded`] says where. (A slot's place is free again by the time its
    /// next packet is encoded: that packet waits for this one's result.)
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        window: u64,
        rtt: &RttEstimator,
        data: &[f32],
        buf: &mut Vec<u8>,
        payloads: Option<&mut Vec<u8>>,
    ) -> Option<Tail> {
        let q = loop {
            match self.due.pop() {
                Some(q) if q >= self.oldest && !self.ring[(q % self.slots) as usize].done => {
                    self.stats.retransmissions += 1;
                    if self.ring[(q % self.slots) as usize].held {
                        self.probe(now, q, rtt, buf);
                        return Some(Tail::InBuf);
                    }
                    break q;
                }
                Some(_) => continue,
                None => {}
            }
            // Packet q's data needs the exponent from packet q - W's result.
            let mut window = window.clamp(1, self.slots);
            if self.lookahead > 0 {
                window = window.min(self.lookahead);
            }
            if self.next < self.total() && self.next < self.oldest + window {
                self.next += 1;
                break self.next - 1;
            }
            return None;
        };
        let range = self.data_range(q);
        let count = range.len();
        let next_exp = if self.lookahead > 0 && q < self.n {
            self.chunk_exponent(q as usize, data)
        } else {
            NO_EXPONENT
        };
        let scale_exp = self.scale_exp(q, data);
        let seq = self.base + q;
        let first = {
            let p = &self.ring[(q % self.slots) as usize];
            p.tx == 0 || p.done
        };
        let h = DataHeader {
            seq,
            slot: (seq % self.slots) as u32,
            version: ((seq / self.slots) % 2) as u8,
            scale_exp,
            next_exp,
            // At most `chunk` elements, and chunks fit a u16.
            count: count as u16,
            flags: self.template.flags
                | if first { 0 } else { FLAG_RETX }
                | match self.data_chunk(q) {
                    Some(j) if self.nonfinite.get(j as usize) == Some(&true) => FLAG_NONFINITE,
                    _ => 0,
                }
                | if q + 1 == self.total() { FLAG_LAST } else { 0 },
            ..self.template
        };
        let start = buf.len();
        crate::wire::encode_contribution(&h, &[], buf);
        let body = buf.len();
        let payload = codec::payload_bytes(self.codec, count);
        let has_data = self.data_chunk(q).is_some();
        // Error feedback on a first transmission: the payload decoded back, to see what
        // this rank's contribution lost to quantization (a skipped chunk loses nothing).
        let feedback = first && has_data && self.residual.is_some();
        let mut scratch = std::mem::take(&mut self.scratch);
        let tail =
            if payloads.is_some() && self.codec.wire_is_native_f32() && self.residual.is_none() {
                // The payload is the tensor's bytes: the driver sends them from there.
                Tail::Data(range.clone())
            } else {
                let (out, tail) = if let Some(payloads) = payloads {
                    let stride = codec::payload_bytes(self.codec, self.chunk);
                    let at = (q % self.slots) as usize * stride;
                    if payloads.len() < at + stride {
                        // Once for the first allreduce: the places are kept across them.
                        payloads.resize((self.slots as usize * stride).max(at + stride), 0);
                    }
                    (
                        &mut payloads[at..at + payload],
                        Tail::Encoded(at..at + payload),
                    )
                } else {
                    buf.resize(body + payload, 0);
                    (&mut buf[body..], Tail::InBuf)
                };
                let back = feedback.then(|| &mut scratch[..range.len()]);
                self.encode_payload((q, seq), scale_exp, &data[range.clone()], out, back);
                tail
            };
        if let (true, Some(res)) = (feedback, self.residual.as_mut()) {
            let t = &scratch[..range.len()];
            for ((r, x), y) in res[range.clone()]
                .iter_mut()
                .zip(&data[range])
                .zip(t.iter())
            {
                *r = x - y;
            }
        }
        self.scratch = scratch;
        let p = &mut self.ring[(q % self.slots) as usize];
        if first {
            *p = Packet {
                sent_at: Some(now),
                last_at: None,
                tx: 0,
                done: false,
                held: false,
                backoff: 0,
                was_held: false,
            };
        }
        p.tx += 1;
        p.backoff += 1;
        p.last_at = Some(now);
        let tx = p.tx;
        self.timers.push(Reverse((now + rtt.rto(p.backoff), q, tx)));
        let bytes = (body - start + payload) as u64;
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += bytes;
        if !first {
            self.stats.retransmitted_bytes += bytes;
        }
        Some(tail)
    }

    /// The next sequence number this allreduce will send.
    pub fn next_seq(&self) -> u64 {
        self.base + self.next
    }

    /// The lowest packet found lost since the last call, as a sequence number.
    pub fn take_loss(&mut self) -> Option<u64> {
        self.lost.take()
    }

    fn note_loss(&mut self, q: u64) {
        let seq = self.base + q;
        self.lost = Some(self.lost.map_or(seq, |l| l.min(seq)));
    }

    /// Fast retransmission: the result of packet `q` (first sent at `sent`) arrived,
    /// so every packet sent before it and more than [`REORDER_DISTANCE`] packets
    /// earlier that still has no result was most likely lost, its contribution or its
    /// result. All ranks send in the same order, so they all see the gap and resend at
    /// once: one round trip instead of a timeout.
    fn fast_retransmit(&mut self, q: u64, sent: Option<Instant>) {
        let Some(sent) = sent else {
            return;
        };
        let limit = q.saturating_sub(REORDER_DISTANCE);
        let before = self.due.len();
        for p in self.oldest..limit {
            let pk = &self.ring[(p % self.slots) as usize];
            if !pk.done && pk.last_at.is_some_and(|t| t <= sent) && !self.due.contains(&p) {
                self.due.push(p);
                self.stats.fast_retransmissions += 1;
            }
        }
        if self.due.len() > before {
            // Oldest last, so that `pop` retransmits it first.
            self.due.sort_unstable_by(|a, b| b.cmp(a));
        }
    }

    /// Appends a probe for packet `q`, whose contribution the aggregator said it holds:
    /// the header alone. If the answer does not come, the next retransmission carries
    /// the payload again.
    fn probe(&mut self, now: Instant, q: u64, rtt: &RttEstimator, buf: &mut Vec<u8>) {
        let seq = self.base + q;
        let h = DataHeader {
            seq,
            slot: (seq % self.slots) as u32,
            version: ((seq / self.slots) % 2) as u8,
            scale_exp: self.sent_scale_exp(q),
            next_exp: NO_EXPONENT,
            count: self.data_range(q).len() as u16,
            flags: self.template.flags | FLAG_PROBE | FLAG_RETX,
            ..self.template
        };
        let start = buf.len();
        crate::wire::encode_contribution(&h, &[], buf);
        let p = &mut self.ring[(q % self.slots) as usize];
        p.held = false;
        p.tx += 1;
        p.backoff += 1;
        p.last_at = Some(now);
        let tx = p.tx;
        self.timers.push(Reverse((now + rtt.rto(p.backoff), q, tx)));
        let len = (buf.len() - start) as u64;
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += len;
        self.stats.retransmitted_bytes += len;
        self.stats.probes += 1;
    }

    /// The earliest retransmission deadline.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(Reverse((t, q, tx))) = self.timers.peek().copied() {
            if self.is_live(q, tx) {
                return Some(t);
            }
            self.timers.pop();
        }
        None
    }

    fn is_live(&self, q: u64, tx: u32) -> bool {
        if q < self.oldest {
            return false;
        }
        let p = &self.ring[(q % self.slots) as usize];
        !p.done && p.tx == tx
    }

    /// Moves every packet whose deadline has passed to the retransmission list.
    ///
    /// A packet whose deadline passes while results still come in is not taken for
    /// lost yet: as TCP restarts its timer on every acknowledgement of new data, its
    /// deadline moves to a timeout after the latest result. Results of packets sent
    /// before it mean it waits in a queue behind them (one that grew after its
    /// deadline was set); results of packets sent after it would have marked it lost
    /// already ([`REORDER_DISTANCE`]). When results stop, the timeout runs out.
    pub fn handle_timeout(&mut self, now: Instant, rtt: &RttEstimator) {
        while let Some(Reverse((t, q, tx))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            if !self.is_live(q, tx) {
                continue;
            }
            let backoff = self.ring[(q % self.slots) as usize].backoff;
            let resume = self.last_progress + rtt.rto(backoff);
            if resume > now {
                self.timers.push(Reverse((resume, q, tx)));
            } else {
                self.due.push(q);
            }
        }
        // Oldest last, so that `pop` retransmits it first.
        self.due.sort_unstable_by(|a, b| b.cmp(a));
        self.due.dedup();
    }

    /// Takes a result: decodes its sum into `data` and keeps its exponent.
    pub fn handle_result(
        &mut self,
        now: Instant,
        h: &DataHeader,
        payload: &[u8],
        data: &mut [f32],
        rtt: &RttEstimator,
    ) -> ResultOutcome {
        let Some(q) = h.seq.checked_sub(self.base) else {
            return ResultOutcome::Ignored;
        };
        if q >= self.next {
            return ResultOutcome::Ignored;
        }
        if q < self.oldest || self.ring[(q % self.slots) as usize].done {
            self.stats.duplicate_results += 1;
            return ResultOutcome::Duplicate;
        }
        if h.flags & FLAG_PROBE != 0 {
            // The aggregator is there and holds the contribution: probe again after a
            // base timeout rather than the backed-off one, so that a result lost on the
            // way back, once the last rank is in, costs one timeout.
            let p = &mut self.ring[(q % self.slots) as usize];
            p.held = true;
            p.was_held = true;
            if p.backoff > 1 {
                p.backoff = 1;
                self.timers.push(Reverse((now + rtt.rto(1), q, p.tx)));
            }
            return ResultOutcome::Held;
        }
        let range = self.data_range(q);
        // The aggregator names the exponent of an aligned sum, block by block, at least
        // this rank's own (the largest over the ranks, and none only where every rank's
        // block was zero); a shared one is known.
        let count = range.len();
        if usize::from(h.count) != count
            || payload.len() != codec::payload_bytes(self.codec, count)
            || data.len() != self.len
        {
            return ResultOutcome::Ignored;
        }
        let got = codec::block_exponents(self.codec, count, h.scale_exp, payload);
        let exponent_fits = if self.codec.aligns_exponents() {
            let sent = self.block_exponents(q);
            sent.is_empty()
                || got
                    .as_slice()
                    .iter()
                    .zip(sent)
                    .all(|(&r, &own)| own == NO_EXPONENT || (r != NO_EXPONENT && r >= own))
        } else {
            h.scale_exp == self.sent_scale_exp(q)
        };
        if !exponent_fits {
            return ResultOutcome::Ignored;
        }
        if range.is_empty() {
            if let Some(j) = self.data_chunk(q) {
                // A chunk that was zero on every rank.
                let all = self.chunk_range(j);
                data[all].fill(0.0);
            }
        } else {
            // Out of cache by the end of the allreduce anyway: not read first.
            let around = std::mem::size_of_val(data) >= codec::stream::STREAM_MIN_BYTES;
            let out = &mut data[range];
            let w = self.codec.wire_bytes();
            let k = got.as_slice().len();
            for (b, &e) in got.as_slice().iter().enumerate() {
                let scale = self.codec.result_scale(self.world, e);
                let r = codec::block_range(b, count, k);
                let src = &payload[r.start * w..r.end * w];
                if around {
                    self.codec.decode_around_cache(src, scale, &mut out[r]);
                } else {
                    self.codec.decode(src, scale, &mut out[r]);
                }
            }
        }
        if self.lookahead > 0 && q < self.n {
            self.e_max[q as usize] = h.next_exp;
        }
        if h.flags & crate::wire::FLAG_MARK != 0 {
            self.stats.marks += 1;
        }
        if h.flags & FLAG_NONFINITE != 0 {
            self.stats.nonfinite_chunks += 1;
        }
        self.last_progress = now;
        let p = &mut self.ring[(q % self.slots) as usize];
        p.done = true;
        // A result with neither flag was summed from every rank's first transmission
        // and sent once: this rank's retransmissions, if any, were not needed.
        let original = h.flags & (FLAG_RETX | crate::wire::FLAG_FROM_COPY) == 0;
        let sample = match p.sent_at {
            Some(t) if original => Some(now.saturating_duration_since(t)),
            _ => None,
        };
        let sent = p.sent_at;
        // Sent more than once, never held by the aggregator, and answered from a
        // retransmission: this rank's contribution or its result was lost on the way.
        if p.tx > 1 && !p.was_held && !original {
            self.note_loss(q);
        }
        while self.oldest < self.next && self.ring[(self.oldest % self.slots) as usize].done {
            self.oldest += 1;
        }
        self.fast_retransmit(q, sent);
        ResultOutcome::Accepted(sample)
    }
}
