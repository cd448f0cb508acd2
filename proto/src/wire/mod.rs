//! The wire format: every message of the protocol, encoded and decoded.
//!
//! All integers are little-endian (the byte order of every machine inagg runs on, so
//! payload lanes are copied, not swapped). Every datagram starts with a four-byte
//! preamble: the magic `b"IA"`, the protocol [`VERSION`] and the message kind.
//!
//! | kind | message | body after the preamble |
//! |---|---|---|
//! | 1 | [`Join`] | job u32, rank u16, world u16, codec u8, flags u8 ([`JOIN_GROUPS`], [`JOIN_PROVEN`], [`JOIN_RACK`]), chunk_elems u16, window u32, nonce u64, completed u64, secret_len u8, secret, then job_world u16 if [`JOIN_RACK`], then the 16-byte admission proof if flagged |
//! | 2 | [`Grant`] | job u32, rank u16, world u16, codec u8, flags u8 ([`GRANT_GROUP`]), chunk_elems u16, window u32, token u64, nonce u64, shard u16, shards u16, then group u32 if flagged |
//! | 3 | contribution | [`DataHeader`] (40 bytes), then `count` elements in the codec's wire form, then one exponent byte per exponent block after the first (`codec::payload_bytes`: i8 chunks of more than 8,192 elements) |
//! | 4 | result | [`DataHeader`] (40 bytes), then the same layout as a contribution's |
//! | 5 | [`Control`] leave | job u32, rank u16, token u64 |
//! | 6 | [`Control`] heartbeat | job u32, rank u16, token u64 |
//! | 7 | [`ErrorMsg`] | job u32, rank u16, code u8, nonce u64, msg_len u16, UTF-8 message |
//! | 8 | [`Control`] regrant | job u32, rank u16, token u64 |
//! | 9 | partial sum | [`DataHeader`] (40 bytes), then one 3-byte head per exponent block (width u8, unit i8, top i8), then each block's 32-bit lanes: whole for the float codecs, zigzag-coded and bit-packed in groups of 128 (a width byte each) for the fixed-point ones (`codec::partial`) |
//!
//! Data packets have a 40-byte header, a multiple of 4 so that payload lanes stay
//! aligned in the caller's buffers.
//!
//! Every message that changes a rank's state is bound to that rank's session: results,
//! heartbeat and leave echoes carry the job's session token (from the grant), and the
//! grant and errors, which may come before any token, carry the `nonce` the rank chose
//! at random for its join. A worker drops either with another value, so a datagram
//! forged from the aggregator's address without those values changes nothing.
//!
//! [`decode`] validates everything: magic, version, kind, exact lengths, enum values,
//! reserved bits and ranges. It never panics, whatever the input; it borrows the payload
//! from the input instead of copying it.

use bytes::{Buf, BufMut};
use thiserror::Error;

use crate::codec::{self, CodecId};

/// The two bytes every inagg datagram starts with.
pub const MAGIC: [u8; 2] = *b"IA";
/// The protocol version this crate speaks. Version 5: a fixed-point partial sum's lanes
/// go up zigzag-coded in groups of 128, each packed at its own width
/// (`codec::partial`). Version 4: joins carry a nonce that grants
/// and errors echo, the count of allreduces the rank completed (failover re-joins),
/// and an optional admission proof. Version 3: an `i8` chunk of more than
/// 8,192 elements has an exponent per 8 Ki-element block, its first block's in
/// `scale_exp` and the others' after the data (`codec::EXPONENT_BLOCK`). Version 2: an
/// `i8` contribution's `scale_exp` is the rank's own block exponent, which the
/// aggregator aligns, and an `i8` result's is the sum's (version 1 shared one
/// exponent through the lookahead).
pub const VERSION: u8 = 5;
/// Bytes before the payload of a contribution or a result.
pub const DATA_HEADER_LEN: usize = 40;
/// The longest job secret a join may carry.
pub const MAX_SECRET_LEN: usize = 64;

/// The most shards a grant may announce (`inagg aggregator --threads` allows as many):
/// a worker joins every one, so a grant claiming thousands is refused as malformed.
pub const MAX_SHARDS: u16 = 256;
/// The longest error message text.
pub const MAX_ERROR_TEXT: usize = 512;
/// The exponent value that means "no exponent": an all-zero block, or a packet that
/// carries no lookahead.
pub use crate::codec::NO_EXPONENT;
/// The largest datagram inagg ever sends or accepts (the IPv4 UDP limit).
pub const MAX_DATAGRAM: usize = 65_507;

/// Flag bit on a data packet: the path or the aggregator saw congestion.
pub const FLAG_MARK: u8 = 0x01;
/// Flag bit on a result: answered from the kept copy (a retransmission's answer).
pub const FLAG_FROM_COPY: u8 = 0x02;
/// Flag bit on a data packet that carries no payload, whatever `count` says. On a
/// contribution it is a probe, sent instead of a retransmission once the aggregator
/// said it holds this rank's contribution: "is my chunk still waiting?". On a result it
/// is that answer: "your contribution is in, other ranks' are not". A rank that waits
/// for a slow peer thus resends 40-byte headers, not its whole window.
pub const FLAG_PROBE: u8 = 0x04;
/// Flag bit on a contribution: a retransmission. On a result: some rank's contribution
/// to this chunk was a retransmission, so the time to the result says nothing of the
/// path (Karn's rule, for the whole group): workers take no RTT sample from it.
pub const FLAG_RETX: u8 = 0x08;
/// Flag bit on a result: the aggregator is re-sizing this job's slot pool (a share of
/// its slot memory budget changed). The flag is fixed when the chunk completes, so
/// every rank sees the same flagged results; a rank that got one in an allreduce asks
/// for its new grant ([`Message::Regrant`]) before it starts the next.
pub const FLAG_REGRANT: u8 = 0x10;
/// Flag bit on a contribution: this rank's chunk held a NaN or an infinity, which a
/// block-scaled codec cannot carry (its payload is clamped and means nothing). On a
/// result: some rank's contribution to the chunk did. The aggregator ORs it in, so
/// every rank sees it and ends that allreduce with the same error, while the job
/// itself goes on.
pub const FLAG_NONFINITE: u8 = 0x20;
/// Flag bit on a contribution: the last packet of this rank's allreduce. Ranks must
/// agree on it, as on every chunk's length, or their tensors differ in length: the
/// aggregator checks (the flag is part of what all contributions to a chunk must
/// share) and aborts the job with [`ErrorCode::Inconsistent`]. Without it, a rank
/// whose tensor ends on a chunk boundary before the others' would start its next
/// allreduce on packet numbers the others still use, and its next tensor would be
/// summed with their current one.
pub const FLAG_LAST: u8 = 0x40;
/// Flag bit on a join: the rank can take its job's results from a group address
/// (multicast), which its grant would name ([`Join::groups`]).
pub const JOIN_GROUPS: u8 = 0x01;
/// Flag bit on a join: an admission proof ([`Join::proof`]) follows the secret.
pub const JOIN_PROVEN: u8 = 0x02;
/// Flag bit on a join: the joining member is a rack aggregator, one rank of the job's
/// upper level, whose contributions are partial sums ([`Message::Partial`]) of the
/// job's ranks below it; the job's world size follows the secret ([`Join::job_world`]).
pub const JOIN_RACK: u8 = 0x04;
/// Bytes of a join's admission proof: HMAC-SHA256, truncated.
pub const ADMISSION_PROOF_LEN: usize = 16;
/// Flag bit on a grant: the job's results go to a group, whose number follows the
/// grant's other fields ([`Grant::group`]).
pub const GRANT_GROUP: u8 = 0x01;
const DATA_FLAGS: u8 =
    FLAG_MARK | FLAG_FROM_COPY | FLAG_PROBE | FLAG_RETX | FLAG_REGRANT | FLAG_NONFINITE | FLAG_LAST;

/// The kind byte of each message.
mod kind {
    pub const JOIN: u8 = 1;
    pub const GRANT: u8 = 2;
    pub const CONTRIBUTION: u8 = 3;
    pub const RESULT: u8 = 4;
    pub const LEAVE: u8 = 5;
    pub const HEARTBEAT: u8 = 6;
    pub const ERROR: u8 = 7;
    pub const REGRANT: u8 = 8;
    pub const PARTIAL: u8 = 9;
}

/// Why a datagram could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Shorter than its header or than its lengths say.
    #[error("truncated datagram")]
    Truncated,
    /// Longer than its header says.
    #[error("trailing bytes after the message")]
    Trailing,
    /// Does not start with the magic bytes.
    #[error("not an inagg datagram")]
    BadMagic,
    /// Another protocol version.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// An unknown message kind.
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// An unknown codec id.
    #[error("unknown codec {0}")]
    Codec(u8),
    /// A field outside its range, or a reserved bit set.
    #[error("invalid field {0}")]
    Field(&'static str),
}

/// A worker asks to join a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    /// The job the worker belongs to.
    pub job: u32,
    /// The worker's rank in `0..world`.
    pub rank: u16,
    /// The number of ranks in the job.
    pub world: u16,
    /// The codec every rank of the job uses.
    pub codec: CodecId,
    /// Elements per chunk (one slot, one packet).
    pub chunk_elems: u16,
    /// Slots the worker would like (its window).
    pub window: u32,
    /// The job's shared secret (at most [`MAX_SECRET_LEN`] bytes).
    pub secret: Vec<u8>,
    /// The rank can take results sent to a group ([`JOIN_GROUPS`]): the aggregator
    /// may then send each result once, to a group every rank has joined, instead of
    /// once per rank, as a switch multicasts. A job's results go to a group only when
    /// every rank asked.
    pub groups: bool,
    /// A number the rank drew at random for this session: the aggregator echoes it in
    /// the rank's grants and errors ([`Grant::nonce`], [`ErrorMsg::nonce`]), and the
    /// rank takes none without it.
    pub nonce: u64,
    /// Allreduces this rank completed in this job before this join: 0 for a job's
    /// first session; on a re-join after its aggregator failed (failover), how far the
    /// rank got. The aggregator starts the job only if every rank says the same.
    pub completed: u64,
    /// HMAC-SHA256 of the join's bytes before it (with [`JOIN_PROVEN`] set and
    /// [`JOIN_GROUPS`] clear: a relay may drop the ask for groups, `inagg relay` does)
    /// under the aggregator's admission key, truncated to [`ADMISSION_PROOF_LEN`]
    /// bytes ([`Join::prove`]): an aggregator with a key takes no join without it.
    pub proof: Option<[u8; ADMISSION_PROOF_LEN]>,
    /// Set ([`JOIN_RACK`]) where the member is a rack aggregator joining its parent:
    /// the world size of the job's ranks, which they quantize with and whose sum the
    /// parent stores. `rank` and `world` are then the rack's index and the number of
    /// racks. `None` for a rank.
    pub job_world: Option<u16>,
}

impl Join {
    /// The admission proof of this join under `key`.
    fn proof_under(&self, key: &[u8]) -> [u8; ADMISSION_PROOF_LEN] {
        let mut bytes = Vec::with_capacity(64);
        let unsigned = Join {
            proof: Some([0; ADMISSION_PROOF_LEN]),
            groups: false,
            ..self.clone()
        };
        encode_join(&unsigned, &mut bytes);
        bytes.truncate(bytes.len() - ADMISSION_PROOF_LEN);
        let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), &bytes);
        let mut out = [0; ADMISSION_PROOF_LEN];
        out.copy_from_slice(&tag.as_ref()[..ADMISSION_PROOF_LEN]);
        out
    }

    /// Adds the proof that the sender holds the admission `key`.
    pub fn prove(&mut self, key: &[u8]) {
        self.proof = Some(self.proof_under(key));
    }

    /// Whether the join carries a valid proof under `key` (compared in constant time).
    pub fn proves(&self, key: &[u8]) -> bool {
        let Some(got) = self.proof else {
            return false;
        };
        let want = self.proof_under(key);
        got.iter().zip(&want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// The aggregator admits a rank to a job whose ranks have all joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The job.
    pub job: u32,
    /// The rank this grant is addressed to.
    pub rank: u16,
    /// The number of ranks.
    pub world: u16,
    /// The job's codec.
    pub codec: CodecId,
    /// Elements per chunk.
    pub chunk_elems: u16,
    /// Slots granted: the job's pool size `S`.
    pub window: u32,
    /// Carried by every later packet of this job; packets with another token are dropped.
    pub token: u64,
    /// The nonce of the rank's join ([`Join::nonce`]): a rank takes no grant without it.
    pub nonce: u64,
    /// Which shard of its aggregator answered (0-based). An aggregator of several
    /// cores runs one shard per core, shard `k` on UDP port `base + k`: independent
    /// aggregators whose joins the worker makes in turn, striping every tensor over
    /// them (see `shards`).
    pub shard: u16,
    /// How many shards the aggregator runs (1: one). Both fields follow the token.
    pub shards: u16,
    /// The group the job's results go to, once each, if every rank asked for groups
    /// ([`Join::groups`]) and the aggregator offers them: a number the transport maps
    /// to an address (over UDP on loopback, a multicast group on the aggregator's
    /// port). `None`: results go to each rank's own address.
    pub group: Option<u32>,
}

/// The header of a contribution (worker to aggregator) or a result (back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    /// The job.
    pub job: u32,
    /// The sender's rank (contributions); the world size (results).
    pub rank: u16,
    /// The codec of the payload.
    pub codec: CodecId,
    /// [`FLAG_MARK`], [`FLAG_FROM_COPY`], [`FLAG_PROBE`], [`FLAG_RETX`], [`FLAG_REGRANT`],
    /// [`FLAG_NONFINITE`], [`FLAG_LAST`].
    pub flags: u8,
    /// The job's session token.
    pub token: u64,
    /// The packet's sequence number in the job's stream: it runs on across
    /// allreduces, so a packet from an earlier allreduce is never taken for a current one.
    pub seq: u64,
    /// `seq mod S`.
    pub slot: u32,
    /// `(seq / S) mod 2`.
    pub version: u8,
    /// The block exponent the payload was quantized with ([`NO_EXPONENT`] for float
    /// codecs): shared by the ranks, or, for a codec that aligns exponents
    /// ([`crate::codec::Codec::aligns_exponents`]), the rank's own in a contribution and
    /// the sum's in a result.
    pub scale_exp: i8,
    /// Lookahead: the exponent of a later block (contribution), or the maximum over the
    /// ranks (result). [`NO_EXPONENT`] when none.
    pub next_exp: i8,
    /// Elements in the payload (0 for a packet that carries only an exponent).
    pub count: u16,
}

/// Leave, heartbeat or regrant: a rank's control message without a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    /// The job.
    pub job: u32,
    /// The rank.
    pub rank: u16,
    /// The job's session token.
    pub token: u64,
}

/// What went wrong, in an [`ErrorMsg`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorCode {
    /// The job is not known to this aggregator.
    UnknownJob = 1,
    /// The join's secret does not match the job's.
    BadSecret = 2,
    /// The rank is not below the world size.
    RankOutOfRange = 3,
    /// World size, codec or chunk size differ from the job's.
    ParamMismatch = 4,
    /// Another address holds this rank.
    RankTaken = 5,
    /// A rank went silent; the job was aborted. The message's rank names it.
    PeerSilent = 6,
    /// A rank left; the job was aborted. The message's rank names it.
    PeerLeft = 7,
    /// The aggregator is shutting down.
    Shutdown = 8,
    /// The aggregator cannot take the job (too many jobs, no slot memory).
    NoCapacity = 9,
    /// The job's ranks disagree on a tensor (length or scale): the job was aborted.
    Inconsistent = 10,
    /// The join does not prove the aggregator's admission key ([`Join::proof`]).
    NotAdmitted = 11,
    /// Ranks re-joining after a failover disagree on how many allreduces they
    /// completed ([`Join::completed`]): the job cannot resume consistently.
    Diverged = 12,
    /// The rank's rack aggregator lost its parent, the job's upper level (silent for
    /// the silence timeout): the job was aborted.
    ParentLost = 13,
}

impl ErrorCode {
    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        use ErrorCode::*;
        Some(match v {
            1 => UnknownJob,
            2 => BadSecret,
            3 => RankOutOfRange,
            4 => ParamMismatch,
            5 => RankTaken,
            6 => PeerSilent,
            7 => PeerLeft,
            8 => Shutdown,
            9 => NoCapacity,
            10 => Inconsistent,
            11 => NotAdmitted,
            12 => Diverged,
            13 => ParentLost,
            _ => return None,
        })
    }
}

/// An error the aggregator reports to a rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    /// The job concerned.
    pub job: u32,
    /// The rank the error is about (the silent one, the one out of range), or `u16::MAX`.
    pub rank: u16,
    /// What went wrong.
    pub code: ErrorCode,
    /// The nonce of the addressed rank's join ([`Join::nonce`]): a rank takes no error
    /// without it.
    pub nonce: u64,
    /// Words for people, at most [`MAX_ERROR_TEXT`] bytes.
    pub text: String,
}

/// A decoded datagram. Payloads borrow from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// Worker to aggregator.
    Join(Join),
    /// Aggregator to worker.
    Grant(Grant),
    /// Worker to aggregator: a chunk.
    Contribution(DataHeader, &'a [u8]),
    /// Aggregator to worker: a summed chunk.
    Result(DataHeader, &'a [u8]),
    /// Rack aggregator to its parent: the sum of its ranks' contributions to a chunk,
    /// unrounded, as one contribution of the upper level. The payload is one 3-byte
    /// head per exponent block (width, unit, top), then the blocks' lanes: for the
    /// fixed-point codecs in groups, each its width and its lanes packed at it
    /// (`codec::partial`). [`partial_bytes`] checks its length.
    Partial(DataHeader, &'a [u8]),
    /// Worker to aggregator: the rank is done with the job.
    Leave(Control),
    /// Both ways: the sender is alive (the aggregator echoes it).
    Heartbeat(Control),
    /// Aggregator to worker.
    Error(ErrorMsg),
    /// Worker to aggregator, between two allreduces, after results flagged
    /// [`FLAG_REGRANT`]: "send me the job's new grant". Carries the token in use; the
    /// answer is a [`Grant`] once every rank has asked.
    Regrant(Control),
}

fn preamble(out: &mut impl BufMut, kind: u8) {
    out.put_slice(&MAGIC);
    out.put_u8(VERSION);
    out.put_u8(kind);
}

/// Whether `datagram` says it is a join (its preamble; nothing else is checked).
pub fn is_join(datagram: &[u8]) -> bool {
    datagram.len() >= 4 && datagram[..2] == MAGIC && datagram[3] == kind::JOIN
}

/// Appends a join to `out`.
pub fn encode_join(j: &Join, out: &mut impl BufMut) {
    debug_assert!(j.secret.len() <= MAX_SECRET_LEN);
    let secret = &j.secret[..j.secret.len().min(MAX_SECRET_LEN)];
    preamble(out, kind::JOIN);
    out.put_u32_le(j.job);
    out.put_u16_le(j.rank);
    out.put_u16_le(j.world);
    out.put_u8(j.codec.0);
    let flags = if j.groups { JOIN_GROUPS } else { 0 }
        | if j.proof.is_some() { JOIN_PROVEN } else { 0 }
        | if j.job_world.is_some() { JOIN_RACK } else { 0 };
    out.put_u8(flags);
    out.put_u16_le(j.chunk_elems);
    out.put_u32_le(j.window);
    out.put_u64_le(j.nonce);
    out.put_u64_le(j.completed);
    // Cannot truncate: the length is capped at MAX_SECRET_LEN above.
    out.put_u8(secret.len() as u8);
    out.put_slice(secret);
    if let Some(w) = j.job_world {
        out.put_u16_le(w);
    }
    if let Some(p) = &j.proof {
        out.put_slice(p);
    }
}

/// Appends a grant to `out`.
pub fn encode_grant(g: &Grant, out: &mut impl BufMut) {
    preamble(out, kind::GRANT);
    out.put_u32_le(g.job);
    out.put_u16_le(g.rank);
    out.put_u16_le(g.world);
    out.put_u8(g.codec.0);
    out.put_u8(if g.group.is_some() { GRANT_GROUP } else { 0 });
    out.put_u16_le(g.chunk_elems);
    out.put_u32_le(g.window);
    out.put_u64_le(g.token);
    out.put_u64_le(g.nonce);
    out.put_u16_le(g.shard);
    out.put_u16_le(g.shards);
    if let Some(group) = g.group {
        out.put_u32_le(group);
    }
}

fn encode_data(kind: u8, h: &DataHeader, payload: &[u8], out: &mut impl BufMut) {
    preamble(out, kind);
    out.put_u32_le(h.job);
    out.put_u16_le(h.rank);
    out.put_u8(h.codec.0);
    out.put_u8(h.flags);
    out.put_u64_le(h.token);
    out.put_u64_le(h.seq);
    out.put_u32_le(h.slot);
    out.put_u8(h.version);
    out.put_i8(h.scale_exp);
    out.put_i8(h.next_exp);
    out.put_u8(0);
    out.put_u16_le(h.count);
    out.put_u16_le(0);
    out.put_slice(payload);
}

/// Appends a contribution to `out`. `payload` holds `h.count` elements in the codec's
/// wire form.
pub fn encode_contribution(h: &DataHeader, payload: &[u8], out: &mut impl BufMut) {
    encode_data(kind::CONTRIBUTION, h, payload, out)
}

/// Appends a partial sum to `out`: `payload` is its heads and packed lanes
/// ([`Message::Partial`]).
pub fn encode_partial(h: &DataHeader, payload: &[u8], out: &mut impl BufMut) {
    encode_data(kind::PARTIAL, h, payload, out)
}

/// Bytes of the head of each exponent block of a partial sum: width, unit, top.
pub const PARTIAL_HEAD: usize = codec::partial::HEAD_BYTES;

/// The length of a partial sum's payload of `count` elements of `codec` that
/// `payload` starts with, if its heads and groups are all there and valid: each
/// head's width at most 32 (exactly 32 for the codecs that sum in f32); for codecs
/// that align exponents, `unit <= top`, both `NO_EXPONENT` or neither; for the
/// others, both `NO_EXPONENT`; for the fixed-point codecs, each head the width of its
/// block's widest group ([`codec::partial::block_bytes`]).
pub fn partial_bytes(codec: &dyn codec::Codec, count: usize, payload: &[u8]) -> Option<usize> {
    let blocks = codec::exponent_blocks(codec, count);
    let heads = payload.get(..blocks * PARTIAL_HEAD)?;
    let mut len = heads.len();
    let (max, float) = (codec::partial::MAX_WIDTH, !codec.block_scaled());
    for (b, head) in heads.chunks_exact(PARTIAL_HEAD).enumerate() {
        let width = head[0];
        if width > max || (float && width != max) {
            return None;
        }
        let (unit, top) = (head[1] as i8, head[2] as i8);
        let valid = if codec.aligns_exponents() {
            (unit == NO_EXPONENT) == (top == NO_EXPONENT) && unit <= top
        } else {
            unit == NO_EXPONENT && top == NO_EXPONENT
        };
        if !valid {
            return None;
        }
        let n = codec::block_range(b, count, blocks).len();
        len += codec::partial::block_bytes(n, width, !float, payload.get(len..)?)?;
    }
    Some(len)
}

/// Sets the congestion mark on an encoded contribution in place, as a switch on the
/// path would (ECN); returns false, changing nothing, for any other datagram.
pub fn mark_contribution(datagram: &mut [u8]) -> bool {
    mark_data(datagram, kind::CONTRIBUTION)
}

/// Sets the congestion mark on an encoded result in place: what a worker does with a
/// result that arrived marked CE at the IP layer, so that it counts as a mark the
/// aggregator set; returns false, changing nothing, for any other datagram.
pub fn mark_result(datagram: &mut [u8]) -> bool {
    mark_data(datagram, kind::RESULT)
}

fn mark_data(datagram: &mut [u8], of: u8) -> bool {
    // Magic, version, kind, job, rank and codec come before the flags byte.
    const FLAGS: usize = 11;
    let ours = datagram.len() >= DATA_HEADER_LEN && datagram[..2] == MAGIC && datagram[3] == of;
    if ours {
        datagram[FLAGS] |= FLAG_MARK;
    }
    ours
}

/// Appends a result to `out`.
pub fn encode_result(h: &DataHeader, payload: &[u8], out: &mut impl BufMut) {
    encode_data(kind::RESULT, h, payload, out)
}

/// Writes the header of a data packet into the first [`DATA_HEADER_LEN`] bytes of
/// `out`, so that a caller can encode the payload in place right after it.
pub fn write_data_header(contribution: bool, h: &DataHeader, out: &mut [u8; DATA_HEADER_LEN]) {
    let k = if contribution {
        kind::CONTRIBUTION
    } else {
        kind::RESULT
    };
    let mut w = &mut out[..];
    encode_data(k, h, &[], &mut w);
}

/// Writes the header of a partial sum ([`Message::Partial`]) into `out`, so that a
/// rack aggregator can encode the heads and lanes right after it.
pub fn write_partial_header(h: &DataHeader, out: &mut [u8; DATA_HEADER_LEN]) {
    let mut w = &mut out[..];
    encode_data(kind::PARTIAL, h, &[], &mut w);
}

fn encode_control(kind: u8, c: &Control, out: &mut impl BufMut) {
    preamble(out, kind);
    out.put_u32_le(c.job);
    out.put_u16_le(c.rank);
    out.put_u64_le(c.token);
}

/// Appends a leave to `out`.
pub fn encode_leave(c: &Control, out: &mut impl BufMut) {
    encode_control(kind::LEAVE, c, out)
}

/// Appends a heartbeat to `out`.
pub fn encode_heartbeat(c: &Control, out: &mut impl BufMut) {
    encode_control(kind::HEARTBEAT, c, out)
}

/// Appends a regrant request to `out`.
pub fn encode_regrant(c: &Control, out: &mut impl BufMut) {
    encode_control(kind::REGRANT, c, out)
}

/// Appends an error to `out`; text beyond [`MAX_ERROR_TEXT`] bytes is cut at a
/// character boundary.
pub fn encode_error(e: &ErrorMsg, out: &mut impl BufMut) {
    let mut end = e.text.len().min(MAX_ERROR_TEXT);
    while !e.text.is_char_boundary(end) {
        end -= 1;
    }
    preamble(out, kind::ERROR);
    out.put_u32_le(e.job);
    out.put_u16_le(e.rank);
    out.put_u8(e.code as u8);
    out.put_u64_le(e.nonce);
    // Cannot truncate: end <= MAX_ERROR_TEXT < u16::MAX.
    out.put_u16_le(end as u16);
    out.put_slice(&e.text.as_bytes()[..end]);
}

impl Message<'_> {
    /// Appends this message to `out`.
    pub fn encode(&self, out: &mut impl BufMut) {
        match self {
            Message::Join(j) => encode_join(j, out),
            Message::Grant(g) => encode_grant(g, out),
            Message::Contribution(h, p) => encode_contribution(h, p, out),
            Message::Result(h, p) => encode_result(h, p, out),
            Message::Partial(h, p) => encode_partial(h, p, out),
            Message::Leave(c) => encode_leave(c, out),
            Message::Heartbeat(c) => encode_heartbeat(c, out),
            Message::Error(e) => encode_error(e, out),
            Message::Regrant(c) => encode_regrant(c, out),
        }
    }
}

/// A bounds-checked reader over a datagram.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.0.remaining() < n {
            Err(DecodeError::Truncated)
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn i8(&mut self) -> Result<i8, DecodeError> {
        self.need(1)?;
        Ok(self.0.get_i8())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.0.get_u16_le())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.0.get_u32_le())
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.0.get_u64_le())
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        self.need(n)?;
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn zero(&mut self, what: &'static str) -> Result<(), DecodeError> {
        if self.u8()? != 0 {
            return Err(DecodeError::Field(what));
        }
        Ok(())
    }
    fn codec(&mut self) -> Result<CodecId, DecodeError> {
        let id = self.u8()?;
        codec::lookup(CodecId(id))
            .map(|c| c.id())
            .ok_or(DecodeError::Codec(id))
    }
    fn end(self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing)
        }
    }
}

fn check_exponent(e: i8, what: &'static str) -> Result<i8, DecodeError> {
    if e == NO_EXPONENT || (crate::codec::MIN_EXPONENT..=crate::codec::MAX_EXPONENT).contains(&e) {
        Ok(e)
    } else {
        Err(DecodeError::Field(what))
    }
}

fn decode_data<'a>(
    r: &mut Reader<'a>,
    partial: bool,
) -> Result<(DataHeader, &'a [u8]), DecodeError> {
    let job = r.u32()?;
    let rank = r.u16()?;
    let codec = r.codec()?;
    let flags = r.u8()?;
    if flags & !DATA_FLAGS != 0 {
        return Err(DecodeError::Field("flags"));
    }
    let token = r.u64()?;
    let seq = r.u64()?;
    let slot = r.u32()?;
    let version = r.u8()?;
    if version > 1 {
        return Err(DecodeError::Field("version"));
    }
    let scale_exp = check_exponent(r.i8()?, "scale_exp")?;
    let next_exp = check_exponent(r.i8()?, "next_exp")?;
    r.zero("reserved")?;
    let count = r.u16()?;
    if r.u16()? != 0 {
        return Err(DecodeError::Field("reserved"));
    }
    // The codec was validated above, so the lookup cannot fail; stay total anyway.
    let len = match codec::lookup(codec) {
        _ if flags & FLAG_PROBE != 0 => 0,
        Some(c) if partial => {
            partial_bytes(c, usize::from(count), r.0).ok_or(DecodeError::Field("partial"))?
        }
        Some(c) => codec::payload_bytes(c, usize::from(count)),
        None => usize::from(count) * 4,
    };
    let payload = r.bytes(len)?;
    let h = DataHeader {
        job,
        rank,
        codec,
        flags,
        token,
        seq,
        slot,
        version,
        scale_exp,
        next_exp,
        count,
    };
    Ok((h, payload))
}

fn decode_control(r: &mut Reader<'_>) -> Result<Control, DecodeError> {
    Ok(Control {
        job: r.u32()?,
        rank: r.u16()?,
        token: r.u64()?,
    })
}

/// Decodes one datagram. Never panics; every field is validated.
pub fn decode(datagram: &[u8]) -> Result<Message<'_>, DecodeError> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(DecodeError::Trailing);
    }
    let mut r = Reader(datagram);
    if r.bytes(2).map_err(|_| DecodeError::BadMagic)? != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let msg = match r.u8()? {
        kind::JOIN => {
            let job = r.u32()?;
            let rank = r.u16()?;
            let world = r.u16()?;
            let codec = r.codec()?;
            let flags = r.u8()?;
            if flags & !(JOIN_GROUPS | JOIN_PROVEN | JOIN_RACK) != 0 {
                return Err(DecodeError::Field("flags"));
            }
            let chunk_elems = r.u16()?;
            let window = r.u32()?;
            let nonce = r.u64()?;
            let completed = r.u64()?;
            let len = usize::from(r.u8()?);
            if len > MAX_SECRET_LEN {
                return Err(DecodeError::Field("secret_len"));
            }
            let secret = r.bytes(len)?.to_vec();
            let job_world = if flags & JOIN_RACK != 0 {
                match r.u16()? {
                    0 => return Err(DecodeError::Field("job_world")),
                    w => Some(w),
                }
            } else {
                None
            };
            let proof = if flags & JOIN_PROVEN != 0 {
                let mut p = [0; ADMISSION_PROOF_LEN];
                p.copy_from_slice(r.bytes(ADMISSION_PROOF_LEN)?);
                Some(p)
            } else {
                None
            };
            if world == 0 || rank >= world {
                return Err(DecodeError::Field("rank"));
            }
            if chunk_elems == 0 || window == 0 {
                return Err(DecodeError::Field("chunk_elems"));
            }
            Message::Join(Join {
                job,
                rank,
                world,
                codec,
                chunk_elems,
                window,
                secret,
                groups: flags & JOIN_GROUPS != 0,
                nonce,
                completed,
                proof,
                job_world,
            })
        }
        kind::GRANT => {
            let (job, rank, world, codec) = (r.u32()?, r.u16()?, r.u16()?, r.codec()?);
            let flags = r.u8()?;
            if flags & !GRANT_GROUP != 0 {
                return Err(DecodeError::Field("flags"));
            }
            let g = Grant {
                job,
                rank,
                world,
                codec,
                chunk_elems: r.u16()?,
                window: r.u32()?,
                token: r.u64()?,
                nonce: r.u64()?,
                shard: r.u16()?,
                shards: r.u16()?,
                group: if flags & GRANT_GROUP != 0 {
                    Some(r.u32()?)
                } else {
                    None
                },
            };
            if g.world == 0 || g.rank >= g.world || g.chunk_elems == 0 || g.window == 0 {
                return Err(DecodeError::Field("grant"));
            }
            if g.shards == 0 || g.shards > MAX_SHARDS || g.shard >= g.shards {
                return Err(DecodeError::Field("shard"));
            }
            Message::Grant(g)
        }
        kind::CONTRIBUTION => {
            let (h, p) = decode_data(&mut r, false)?;
            Message::Contribution(h, p)
        }
        kind::RESULT => {
            let (h, p) = decode_data(&mut r, false)?;
            Message::Result(h, p)
        }
        kind::PARTIAL => {
            let (h, p) = decode_data(&mut r, true)?;
            Message::Partial(h, p)
        }
        kind::LEAVE => Message::Leave(decode_control(&mut r)?),
        kind::HEARTBEAT => Message::Heartbeat(decode_control(&mut r)?),
        kind::REGRANT => Message::Regrant(decode_control(&mut r)?),
        kind::ERROR => {
            let job = r.u32()?;
            let rank = r.u16()?;
            let code = r.u8()?;
            let code = ErrorCode::from_u8(code).ok_or(DecodeError::Field("code"))?;
            let nonce = r.u64()?;
            let len = usize::from(r.u16()?);
            if len > MAX_ERROR_TEXT {
                return Err(DecodeError::Field("text_len"));
            }
            let text = std::str::from_utf8(r.bytes(len)?)
                .map_err(|_| DecodeError::Field("text"))?
                .to_owned();
            Message::Error(ErrorMsg {
                job,
                rank,
                code,
                nonce,
                text,
            })
        }
        other => return Err(DecodeError::Kind(other)),
    };
    r.end()?;
    Ok(msg)
}

#[cfg(test)]
mod tests;
