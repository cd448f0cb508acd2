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

use crate::codec::{self, Alignment, Codec, MAX_BLOCKS};
use crate::wire::{DataHeader, NO_EXPONENT};

const EMPTY: u64 = u64::MAX;

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
    /// exponents ([`codec::EXPONENT_BLOCK`]).
    pub align: [Alignment; MAX_BLOCKS],
    /// The packet ends its allreduce (`FLAG_LAST`; all ranks must agree).
    pub last: bool,
    /// All ranks are in; the result is in the version's result buffer.
    pub complete: bool,
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
    /// ranks' for the same packet: their tensors differ.
    Inconsistent,
    /// A probe: this rank's contribution is in, the chunk waits for other ranks.
    Held,
    /// A probe for a contribution this pool does not hold.
    Missing,
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
/// ([`Codec::result_is_lanes`]).
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
    world: u16,
    words: usize,
    meta: Vec<SlotMeta>,
    bitmaps: Vec<u64>,
    acc: Vec<u32>,
    results: Vec<u8>,
}

impl SlotPool {
    pub fn new(slots: u32, chunk: usize, codec: &'static dyn Codec, world: u16) -> Self {
        let versions = 2 * slots as usize;
        let kept = kept_bytes(codec, chunk);
        let words = usize::from(world).div_ceil(64);
        let empty = SlotMeta {
            seq: EMPTY,
            contributors: 0,
            count: 0,
            exp_max: NO_EXPONENT,
            scale_exp: NO_EXPONENT,
            align: [Alignment::EMPTY; MAX_BLOCKS],
            last: false,
            complete: false,
            marked: false,
            nonfinite: false,
            retx: false,
            regrant: false,
        };
        Self {
            regrant: false,
            regrant_announced: false,
            slots,
            chunk,
            kept,
            codec,
            in_lanes: kept == 0,
            world,
            words,
            meta: vec![empty; versions],
            bitmaps: vec![0; versions * words],
            acc: vec![0; versions * chunk],
            results: vec![0; versions * kept],
        }
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

    /// Adds a contribution whose header the caller has validated (rank below world,
    /// slot and version matching `seq`, count at most the chunk size, payload length
    /// matching count).
    pub fn contribute(
        &mut self,
        codec: &dyn Codec,
        rank: u16,
        h: &DataHeader,
        payload: &[u8],
    ) -> Outcome {
        let i = self.index(h.slot, h.version);
        let meta = self.meta[i];
        let bits = &mut self.bitmaps[i * self.words..(i + 1) * self.words];
        let (word, bit) = (usize::from(rank) / 64, 1u64 << (rank % 64));
        let lanes = &mut self.acc[i * self.chunk..i * self.chunk + usize::from(h.count)];
        let marked = h.flags & crate::wire::FLAG_MARK != 0;
        let retx = h.flags & crate::wire::FLAG_RETX != 0;
        let nonfinite = h.flags & crate::wire::FLAG_NONFINITE != 0;
        let last = h.flags & crate::wire::FLAG_LAST != 0;
        if meta.seq == h.seq {
            if meta.complete {
                return Outcome::AnswerCopy;
            }
            if bits[word] & bit != 0 {
                return Outcome::Duplicate;
            }
            let aligned = codec.aligns_exponents();
            if meta.count != h.count
                || (!aligned && meta.scale_exp != h.scale_exp)
                || meta.last != last
            {
                return Outcome::Inconsistent;
            }
            bits[word] |= bit;
            let m = &mut self.meta[i];
            codec::sum_blocks(codec, lanes, self.world, &mut m.align, h.scale_exp, payload);
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
            codec::sum_blocks(codec, lanes, self.world, &mut align, h.scale_exp, payload);
            self.meta[i] = SlotMeta {
                seq: h.seq,
                contributors: 1,
                count: h.count,
                exp_max: h.next_exp,
                scale_exp: h.scale_exp,
                align,
                last,
                complete: false,
                marked,
                retx,
                nonfinite,
                regrant: false,
            };
        } else {
            return Outcome::Stale;
        }
        if self.meta[i].contributors == self.world {
            if !self.in_lanes {
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
            self.meta[i].complete = true;
            self.meta[i].regrant = self.regrant;
            self.regrant_announced |= self.regrant;
            Outcome::Completed
        } else {
            Outcome::Added
        }
    }

    /// Answers a probe (a header without payload) from `rank` for the chunk `h` names:
    /// [`Outcome::AnswerCopy`] if complete, [`Outcome::Held`] if the rank's
    /// contribution waits for others, [`Outcome::Missing`] otherwise. Changes nothing.
    pub fn probe(&self, rank: u16, h: &DataHeader) -> Outcome {
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
        let (word, bit) = (usize::from(rank) / 64, 1u64 << (rank % 64));
        if self.bitmaps[i * self.words + word] & bit != 0 {
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
}
