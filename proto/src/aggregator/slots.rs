//! A job's slot pool: `S` slots of `K` lanes, each in two versions, with a bitmap of
//! the ranks that contributed to each version.
//!
//! Packet `seq` uses slot `seq mod S`, version `(seq / S) mod 2`. A version remembers
//! which `seq` it holds: a contribution for that `seq` adds to it (once per rank), one
//! for a later `seq` of the same slot and version restarts it (only once it has
//! completed: every rank must have moved past it), and one for an earlier `seq` is a
//! stale duplicate. A completed version keeps its result for retransmissions.
//!
//! What one slot costs ([`slot_bytes`]), the unit of the slot memory budget: both
//! versions, each with `K` accumulator lanes of 4 bytes, the kept result of `K`
//! elements in the codec's wire form (with its exponent blocks' bytes,
//! `codec::payload_bytes`), and a bitmap of `ceil(N / 64)` words of ranks.
//! Where the wire form of a sum is its lanes (f32 and i32), the lanes are the kept
//! result: a version's lanes are only written again when a later chunk restarts it,
//! and from then on its old result is never asked for (every rank got it before
//! sending that chunk). Those codecs keep no copy, and store none per chunk.
//! The per-version bookkeeping ([`SlotMeta`], a few bytes) is left out, as a switch
//! keeps it in registers beside its SRAM.
//!
//! Where the codec sums a chunk's contributions all at once ([`AggregatorCodec::sum_store_all`]:
//! `i8` up to four ranks), a version's lanes hold the contributions before the last
//! as they came, each with its exponent, and the last sums them all and stores the
//! result in one pass, without lanes. Summing contribution by contribution reads and
//! writes the lanes once per rank, and a window's lanes do not stay in the cache, so
//! that summing was a large part of the aggregator's time; one pass cut the
//! aggregator's time and the allreduce's (docs/performance.md, "Summing a chunk at
//! once"). Where an exponent block's exponents spread too far for that
//! (`sum_store_all` says `None`), the block is summed in turn as before, from the held
//! contributions in the order they came, so the result is the same bit for bit. A
//! switch cannot hold packets; the slot memory is the same (plus one block's lanes per
//! pool for such a block).

use crate::codec::{self, Alignment, Codec, MAX_AT_ONCE, MAX_BLOCKS};
use crate::wire::{DataHeader, NO_EXPONENT};

const EMPTY: u64 = u64::MAX;

/// Where a pool's job sits in a hierarchy of aggregators (docs/protocol.md 8.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// Its ranks contribute, and it stores each chunk's result.
    Flat,
    /// A rack aggregator's: its members are a block of the job's ranks. A chunk they
    /// are all in is a partial sum for the parent ([`SlotPool::partial`]), and its
    /// result comes from the parent ([`SlotPool::put_result`]).
    Rack,
    /// A parent's: its members are rack aggregators, whose contributions are partial
    /// sums (`codec::partial`).
    Top,
}

/// The bookkeeping of one version of one slot.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotMeta {
    /// The packet this version holds, or `EMPTY`.
    pub seq: u64,
    /// Ranks that contributed so far.
    pub contributors: u16,
    /// Elements in the chunk (all ranks must agree).
    pub count: u16,
    /// Maximum of the ranks' lookahead exponents.
    pub exp_max: i8,
    /// The block exponent the chunk was quantized with (all ranks must agree), or, for
    /// codecs that align exponents ([`Codec::aligns_exponents`]), the result's first
    /// exponent block's (the header's), set when the chunk completes.
    pub scale_exp: i8,
    /// The exponents of the lanes, one per exponent block, for codecs that align
    /// exponents ([`codec::EXPONENT_BLOCK`]); where the version holds its
    /// contributions until the last ([`SlotPool::held`]), empty until it completes.
    pub align: [Alignment; MAX_BLOCKS],
    /// The packet ends its allreduce (`FLAG_LAST`; all ranks must agree).
    pub last: bool,
    /// All ranks are in; the result is in the version's result buffer.
    pub complete: bool,
    /// A rack's chunk that every member is in: its lanes are the partial sum, and it
    /// waits for the parent's result ([`Level::Rack`]).
    pub awaiting: bool,
    /// A contribution carried a congestion mark.
    pub marked: bool,
    /// A contribution held a NaN or an infinity (`FLAG_NONFINITE`).
    pub nonfinite: bool,
    /// Some contribution was a retransmission.
    pub retx: bool,
    /// The pool was being re-granted when the chunk completed: its result says so to
    /// every rank (fixed at completion, so answers from the copy say the same).
    pub regrant: bool,
}

/// What a contribution did to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Added; the chunk still waits for other ranks.
    Added,
    /// Added, and it was the last rank: the result is ready for everyone.
    Completed,
    /// This rank had already contributed to this chunk: ignored.
    Duplicate,
    /// The chunk is complete: answer this rank from the kept copy.
    AnswerCopy,
    /// The slot has moved on to a later chunk: dropped.
    Stale,
    /// A chunk two generations ahead of one still open: no honest rank sends it.
    Ahead,
    /// Element count, scale or end of allreduce (`FLAG_LAST`) differ from the other
    /// ranks' for the same packet: their tensors differ. Says what the ranks already
    /// in sent.
    Inconsistent(Sent),
    /// A probe: this rank's contribution is in, the chunk waits for other ranks.
    Held,
    /// A probe for a contribution this pool does not hold.
    Missing,
    /// Added, and it was the last of a rack's members: the partial sum is ready for
    /// the parent ([`Level::Rack`]).
    Summed,
    /// A contribution or probe for a rack's chunk that waits for the parent's result:
    /// the rank's timer ran out, so the partial sum or the result may have been lost.
    Awaiting,
}

/// What a rank sent for one packet, as far as all ranks must agree on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sent {
    /// The rank (for a chunk's first contributions: the lowest that is in).
    pub rank: u16,
    /// Elements.
    pub count: u16,
    /// Its block exponent, for codecs that share one.
    pub scale_exp: i8,
    /// The last packet of its allreduce (`FLAG_LAST`).
    pub last: bool,
}

/// Bytes one slot holds for chunks of `chunk` elements whose kept result takes `kept`
/// bytes ([`kept_bytes`]) and a world of `world` ranks: two versions of accumulator
/// lanes, kept result and rank bitmap. `SlotPool::memory_bytes` is this times the
/// slots.
pub fn slot_bytes(chunk: usize, kept: usize, world: u16) -> usize {
    2 * (chunk * 4 + kept + 8 * usize::from(world).div_ceil(64))
}

/// Bytes of the result a slot keeps for a chunk of `chunk` elements of `codec`: its
/// payload ([`codec::payload_bytes`]), or 0 where the lanes are the result
/// ([`codec::AggregatorCodec::result_is_lanes`]).
pub fn kept_bytes(codec: &dyn Codec, chunk: usize) -> usize {
    if codec.result_is_lanes() {
        0
    } else {
        codec::payload_bytes(codec, chunk)
    }
}

/// The slot memory of one job.
#[derive(Debug)]
pub(crate) struct SlotPool {
    /// The lowest sequence number whose chunk has not completed. An honest rank sends
    /// packet `q` only once it has the results of every packet below `q - S + 1`, all
    /// of which completed, so no honest packet reaches `next + S`; one at `next + 2S`
    /// or beyond is refused as [`Outcome::Ahead`], whatever its value, so that no
    /// single datagram can claim a version that honest chunks still need.
    next: u64,
    /// Chunks that complete from now on carry [`SlotMeta::regrant`].
    pub regrant: bool,
    /// Some chunk completed with `regrant` set: the ranks know of the re-grant.
    pub regrant_announced: bool,
    slots: u32,
    chunk: usize,
    /// Bytes of one version's kept result ([`kept_bytes`]).
    kept: usize,
    codec: &'static dyn Codec,
    /// Results are read from the lanes; `results` is empty.
    in_lanes: bool,
    /// The job's world size: what the codec sums for.
    world: u16,
    /// The contributors a chunk needs: `world` but in a hierarchy.
    members: u16,
    level: Level,
    /// A partial sum's lanes, unpacked or before packing.
    scratch: Vec<u8>,
    words: usize,
    meta: Vec<SlotMeta>,
    bitmaps: Vec<u64>,
    acc: Vec<u32>,
    results: Vec<u8>,
    /// Where a version holds the contributions before the last: every `stride` bytes of
    /// its lanes, a payload and then the header's exponent (module docs); `None` where
    /// it sums them in turn.
    held: Option<usize>,
    /// Lanes for an exponent block summed in turn after all ([`SlotPool::finish_held`]):
    /// one block's, 32 KiB, beside the slot memory.
    spill: Vec<u32>,
}

impl SlotPool {
    /// A pool of `slots` slots whose stream continues at sequence number `start` (0 for
    /// a new job; after a re-grant, the first packet of the next allreduce).
    pub fn new(
        slots: u32,
        chunk: usize,
        codec: &'static dyn Codec,
        world: u16,
        start: u64,
    ) -> Self {
        let versions = 2 * slots as usize;
        let kept = kept_bytes(codec, chunk);
        let words = usize::from(world).div_ceil(64);
        // What a version's lanes hold of contributions before the last.
        let stride = codec::payload_bytes(codec, chunk) + 1;
        let held = (kept > 0
            && codec.sums_all_at_once(world)
            && usize::from(world.saturating_sub(1)) * stride <= chunk * 4)
            .then_some(stride);
        let empty = SlotMeta {
            seq: EMPTY,
            contributors: 0,
            count: 0,
            exp_max: NO_EXPONENT,
            scale_exp: NO_EXPONENT,
            align: [Alignment::EMPTY; MAX_BLOCKS],
            last: false,
            complete: false,
            awaiting: false,
            marked: false,
            nonfinite: false,
            retx: false,
            regrant: false,
        };
        Self {
            next: start,
            regrant: false,
            regrant_announced: false,
            slots,
            chunk,
            kept,
            codec,
            in_lanes: kept == 0,
            world,
            members: world,
            level: Level::Flat,
            scratch: Vec::new(),
            words,
            meta: vec![empty; versions],
            bitmaps: vec![0; versions * words],
            acc: vec![0; versions * chunk],
            results: vec![0; versions * kept],
            spill: vec![
                0;
                if held.is_some() {
                    chunk.min(codec::EXPONENT_BLOCK)
                } else {
                    0
                }
            ],
            held,
        }
    }

    /// The same pool at another level of a hierarchy, whose chunks need `members`
    /// contributors (numbered from 0): a rack's ranks or a parent's racks. Such a pool
    /// sums in turn.
    pub fn at_level(mut self, level: Level, members: u16) -> Self {
        self.level = level;
        self.members = members.max(1);
        self.words = usize::from(self.members).div_ceil(64);
        self.bitmaps = vec![0; self.meta.len() * self.words];
        if level != Level::Flat {
            self.held = None;
            self.spill = Vec::new();
        }
        self
    }

    /// Whether versions hold contributions until the last ([`SlotPool::held`]).
    #[cfg(test)]
    pub fn holds(&self) -> bool {
        self.held.is_some()
    }

    /// Sums in turn from now on, as every codec but `i8` does (tests compare the two).
    #[cfg(test)]
    pub fn sum_in_turn(mut self) -> Self {
        self.held = None;
        self
    }

    /// Adds contribution number `k` (from 0, in the order they came) of version `i`:
    /// holds it in the lanes ([`SlotPool::held`]) unless it is the last, which
    /// [`SlotPool::finish_held`] sums with the others; or adds it to the lanes.
    fn add(
        &mut self,
        i: usize,
        k: u16,
        h: &DataHeader,
        payload: &[u8],
        at: &mut [Alignment; MAX_BLOCKS],
    ) {
        let version = &mut self.acc[i * self.chunk..(i + 1) * self.chunk];
        match self.held {
            Some(stride) if k + 1 < self.world => {
                let bytes: &mut [u8] = bytemuck::cast_slice_mut(version);
                let held = &mut bytes[usize::from(k) * stride..(usize::from(k) + 1) * stride];
                let (data, first) = held.split_at_mut(stride - 1);
                let n = payload.len().min(data.len());
                data[..n].copy_from_slice(&payload[..n]);
                first[0] = h.scale_exp as u8;
            }
            Some(_) => {}
            None if self.level == Level::Top => {
                let lanes = &mut version[..usize::from(h.count)];
                let scratch = &mut self.scratch;
                codec::partial::add(self.codec, lanes, self.world, at, payload, scratch);
            }
            None => {
                let lanes = &mut version[..usize::from(h.count)];
                codec::sum_blocks(self.codec, lanes, self.world, at, h.scale_exp, payload);
            }
        }
    }

    /// Sums the contributions version `i` holds and the last one (`h`, `payload`) into
    /// its result, block by block: all at once ([`AggregatorCodec::sum_store_all`]), or, for a
    /// block whose exponents spread too far, in turn in the order they came, as the
    /// lanes would have. Returns the blocks' alignments.
    fn finish_held(
        &mut self,
        i: usize,
        stride: usize,
        h: &DataHeader,
        payload: &[u8],
    ) -> [Alignment; MAX_BLOCKS] {
        let codec = self.codec;
        let n = usize::from(h.count);
        let w = codec.wire_bytes();
        let len = codec::payload_bytes(codec, n);
        // The caller checked every payload's length against its count (`wire::decode`):
        // a shorter one would leave part of the result unwritten.
        debug_assert_eq!(payload.len(), len, "payload of {n} elements");
        let ranks = usize::from(self.world).clamp(1, MAX_AT_ONCE);
        let bytes: &[u8] = bytemuck::cast_slice(&self.acc[i * self.chunk..(i + 1) * self.chunk]);
        let mut payloads: [&[u8]; MAX_AT_ONCE] = [&[]; MAX_AT_ONCE];
        let mut exps = [codec::block_exponents(codec, n, h.scale_exp, payload); MAX_AT_ONCE];
        for k in 0..ranks - 1 {
            let held = &bytes[k * stride..(k + 1) * stride];
            payloads[k] = &held[..len.min(stride - 1)];
            exps[k] = codec::block_exponents(codec, n, held[stride - 1] as i8, payloads[k]);
        }
        payloads[ranks - 1] = payload;
        let base = i * self.kept;
        let out = &mut self.results[base..base + len.min(self.kept)];
        let spill = &mut self.spill;
        let world = self.world;
        codec::store_each_block(codec, n, out, |b, r, o| {
            let e: [i8; MAX_AT_ONCE] = std::array::from_fn(|k| exps[k].as_slice()[b]);
            let p: [&[u8]; MAX_AT_ONCE] =
                std::array::from_fn(|k| payloads[k].get(r.start * w..r.end * w).unwrap_or(&[]));
            codec
                .sum_store_all(world, &e[..ranks], &p[..ranks], o)
                .unwrap_or_else(|| {
                    // At most one block (a one-block chunk is at most 8192 elements).
                    spill.clear();
                    spill.resize(r.len(), 0);
                    let mut at = Alignment::EMPTY;
                    for k in 0..ranks {
                        codec.sum_at(spill, world, &mut at, e[k], p[k]);
                    }
                    codec.store_at(spill, world, at, o);
                    at
                })
        })
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Bytes of slot memory this pool holds.
    pub fn memory_bytes(&self) -> usize {
        self.acc.len() * 4 + self.results.len() + self.bitmaps.len() * 8
    }

    fn index(&self, slot: u32, version: u8) -> usize {
        slot as usize * 2 + usize::from(version)
    }

    /// The index of the version that packet `seq` uses.
    fn index_of(&self, seq: u64) -> usize {
        let s = u64::from(self.slots);
        self.index((seq % s) as u32, ((seq / s) % 2) as u8)
    }

    /// The lowest sequence number whose chunk has not completed.
    pub fn next_open(&self) -> u64 {
        self.next
    }

    /// Whether `seq` lies two generations or more beyond the oldest open chunk, where
    /// no honest rank sends (see [`SlotPool::next`]). No arithmetic wraps.
    fn too_far_ahead(&self, seq: u64) -> bool {
        seq >= self.next && seq - self.next >= 2 * u64::from(self.slots)
    }

    /// Moves `next` past every completed chunk; at most `2S` steps, as a version is
    /// only reused two generations later.
    fn advance(&mut self) {
        for _ in 0..2 * self.slots {
            let m = &self.meta[self.index_of(self.next)];
            if m.seq != self.next || !m.complete {
                break;
            }
            self.next += 1;
        }
    }

    /// Adds a contribution whose header the caller has validated (rank below world,
    /// slot and version matching `seq`, count at most the chunk size, payload length
    /// matching count).
    pub fn contribute(&mut self, rank: u16, h: &DataHeader, payload: &[u8]) -> Outcome {
        if self.too_far_ahead(h.seq) {
            return Outcome::Ahead;
        }
        let codec = self.codec;
        let i = self.index(h.slot, h.version);
        let meta = self.meta[i];
        let bits = &mut self.bitmaps[i * self.words..(i + 1) * self.words];
        let (word, bit) = (usize::from(rank) / 64, 1u64 << (rank % 64));
        let marked = h.flags & crate::wire::FLAG_MARK != 0;
        let retx = h.flags & crate::wire::FLAG_RETX != 0;
        let nonfinite = h.flags & crate::wire::FLAG_NONFINITE != 0;
        let last = h.flags & crate::wire::FLAG_LAST != 0;
        if meta.seq == h.seq {
            if meta.complete {
                return Outcome::AnswerCopy;
            }
            if meta.awaiting {
                return Outcome::Awaiting;
            }
            if bits[word] & bit != 0 {
                return Outcome::Duplicate;
            }
            let aligned = codec.aligns_exponents();
            if meta.count != h.count
                || (!aligned && meta.scale_exp != h.scale_exp)
                || meta.last != last
            {
                let first = bits
                    .iter()
                    .enumerate()
                    .find(|(_, w)| **w != 0)
                    .map_or(0, |(k, w)| k * 64 + w.trailing_zeros() as usize);
                return Outcome::Inconsistent(Sent {
                    // Cannot truncate: a bit is set only for ranks below the world size.
                    rank: first as u16,
                    count: meta.count,
                    scale_exp: meta.scale_exp,
                    last: meta.last,
                });
            }
            bits[word] |= bit;
            let mut align = meta.align;
            self.add(i, meta.contributors, h, payload, &mut align);
            let m = &mut self.meta[i];
            m.align = align;
            m.contributors += 1;
            m.exp_max = m.exp_max.max(h.next_exp);
            m.marked |= marked;
            m.retx |= retx;
            m.nonfinite |= nonfinite;
        } else if meta.seq == EMPTY || meta.seq < h.seq {
            if meta.seq != EMPTY && !meta.complete {
                return Outcome::Ahead;
            }
            bits.fill(0);
            bits[word] |= bit;
            let mut align = [Alignment::EMPTY; MAX_BLOCKS];
            self.add(i, 0, h, payload, &mut align);
            self.meta[i] = SlotMeta {
                seq: h.seq,
                contributors: 1,
                count: h.count,
                exp_max: h.next_exp,
                scale_exp: h.scale_exp,
                align,
                last,
                complete: false,
                awaiting: false,
                marked,
                retx,
                nonfinite,
                regrant: false,
            };
        } else {
            return Outcome::Stale;
        }
        if self.meta[i].contributors == self.members {
            if self.level == Level::Rack {
                self.meta[i].awaiting = true;
                return Outcome::Summed;
            }
            if let Some(stride) = self.held {
                let align = self.finish_held(i, stride, h, payload);
                self.meta[i].align = align;
                self.meta[i].scale_exp = align[0].top;
            } else if !self.in_lanes {
                let n = usize::from(h.count);
                let base = i * self.kept;
                let top = codec::store_blocks(
                    codec,
                    &self.acc[i * self.chunk..i * self.chunk + n],
                    self.world,
                    &self.meta[i].align,
                    &mut self.results[base..base + codec::payload_bytes(codec, n)],
                );
                if codec.aligns_exponents() {
                    self.meta[i].scale_exp = top;
                }
            }
            self.complete(i);
            Outcome::Completed
        } else {
            Outcome::Added
        }
    }

    /// Answers a probe (a header without payload) from `rank` for the chunk `h` names:
    /// [`Outcome::AnswerCopy`] if complete, [`Outcome::Held`] if the rank's
    /// contribution waits for others, [`Outcome::Missing`] otherwise. Changes nothing.
    pub fn probe(&self, rank: u16, h: &DataHeader) -> Outcome {
        if self.too_far_ahead(h.seq) {
            return Outcome::Ahead;
        }
        let i = self.index(h.slot, h.version);
        let meta = self.meta[i];
        if meta.seq != h.seq {
            return if meta.seq != EMPTY && meta.seq > h.seq {
                Outcome::Stale
            } else {
                Outcome::Missing
            };
        }
        if meta.complete {
            return Outcome::AnswerCopy;
        }
        if meta.awaiting {
            return Outcome::Awaiting;
        }
        let (word, bit) = (usize::from(rank) / 64, 1u64 << (rank % 64));
        if self
            .bitmaps
            .get(i * self.words + word)
            .is_some_and(|w| w & bit != 0)
        {
            Outcome::Held
        } else {
            Outcome::Missing
        }
    }

    /// The completed result held for `seq`, if the slot still holds it.
    pub fn result(&self, seq: u64) -> Option<(SlotMeta, &[u8])> {
        let slot = (seq % u64::from(self.slots)) as u32;
        let version = ((seq / u64::from(self.slots)) % 2) as u8;
        let i = self.index(slot, version);
        let meta = self.meta[i];
        if meta.seq != seq || !meta.complete {
            return None;
        }
        let n = usize::from(meta.count);
        let bytes = if self.in_lanes {
            bytemuck::cast_slice(&self.acc[i * self.chunk..i * self.chunk + n])
        } else {
            let base = i * self.kept;
            &self.results[base..base + self.kept.min(codec::payload_bytes(self.codec, n))]
        };
        Some((meta, bytes))
    }

    /// A rack's partial sum of the chunk `seq`, while it waits for the parent's result:
    /// appends its payload (`codec::partial::encode`) to `out` and returns the
    /// chunk's bookkeeping.
    pub fn partial(&mut self, seq: u64, out: &mut Vec<u8>) -> Option<SlotMeta> {
        let i = self.index_of(seq);
        let meta = self.meta[i];
        if meta.seq != seq || !meta.awaiting {
            return None;
        }
        let lanes = &self.acc[i * self.chunk..i * self.chunk + usize::from(meta.count)];
        let scratch = &mut self.scratch;
        codec::partial::encode(self.codec, lanes, self.world, &meta.align, scratch, out);
        Some(meta)
    }

    /// A rack's chunk `seq` gets its result from the parent (`h`, `payload`, checked
    /// by `wire::decode`): kept like a result this pool had stored, and the chunk is
    /// complete. False, changing nothing, if the chunk does not wait for one or the
    /// result does not fit it.
    pub fn put_result(&mut self, h: &DataHeader, payload: &[u8]) -> bool {
        let i = self.index_of(h.seq);
        let meta = self.meta[i];
        let n = usize::from(meta.count);
        let len = codec::payload_bytes(self.codec, n);
        if meta.seq != h.seq || !meta.awaiting || h.count != meta.count || payload.len() != len {
            return false;
        }
        if self.in_lanes {
            let lanes = &mut self.acc[i * self.chunk..i * self.chunk + n];
            for (l, b) in lanes.iter_mut().zip(payload.chunks_exact(4)) {
                *l = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        } else {
            let base = i * self.kept;
            let Some(out) = self.results.get_mut(base..base + len) else {
                return false;
            };
            out.copy_from_slice(payload);
        }
        let flag = |f: u8| h.flags & f != 0;
        let m = &mut self.meta[i];
        m.scale_exp = h.scale_exp;
        m.exp_max = h.next_exp;
        m.marked |= flag(crate::wire::FLAG_MARK);
        m.retx |= flag(crate::wire::FLAG_RETX);
        m.nonfinite |= flag(crate::wire::FLAG_NONFINITE);
        m.awaiting = false;
        self.complete(i);
        true
    }

    /// Version `i` holds its chunk's result: it says whether the pool is being
    /// re-granted, and the pool moves past every completed chunk.
    fn complete(&mut self, i: usize) {
        self.meta[i].complete = true;
        self.meta[i].regrant = self.regrant;
        self.regrant_announced |= self.regrant;
        self.advance();
    }
}
