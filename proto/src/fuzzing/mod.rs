//! Harnesses that turn arbitrary bytes into inputs for the decoder, the aggregator
//! and the worker, shared by the cargo-fuzz targets (`fuzz/`) and the property tests that run in CI.
//!
//! Each harness panics only when an invariant breaks; a fuzzer reports that panic as
//! a crash, and the input that caused it becomes a regression test.

use std::time::{Duration, Instant};

use crate::aggregator::{Aggregator, AggregatorConfig};
use crate::codec::{self, CodecId};
use crate::wire::{self, Control, DataHeader, Join, Message};

pub mod seeds;

/// Decodes `data` as a datagram; a message that decodes must encode back to the same
/// bytes (decoding accepts only canonical encodings of every field it reads), and a
/// partial sum's payload is added to lanes as a parent adds it
/// (`codec::partial::add`), which must not panic. Returns the message kind, or 0 for
/// an error, so that the work cannot be optimized away.
pub fn decode(data: &[u8]) -> u8 {
    match wire::decode(data) {
        Ok(m) => {
            let mut again = Vec::with_capacity(data.len());
            m.encode(&mut again);
            assert_eq!(
                again, data,
                "decode accepted a non-canonical encoding: {m:?}"
            );
            if let Message::Partial(h, payload) = &m {
                if let Some(c) = codec::lookup(h.codec) {
                    let mut lanes = vec![0u32; usize::from(h.count)];
                    let mut at = [codec::Alignment::EMPTY; codec::MAX_BLOCKS];
                    codec::partial::add(c, &mut lanes, 4, &mut at, payload, &mut Vec::new());
                }
            }
            data[3]
        }
        Err(_) => 0,
    }
}

/// Reads bytes off the fuzzer's input, with zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn take(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

const WORLD: u16 = 3;
/// Addresses 0..3 are the job's ranks, 3 and 4 strangers.
const ADDRESSES: u8 = 5;
const JOB: u32 = 77;
const SECRET: &[u8] = b"fuzz";
/// The most datagrams one step may make the aggregator send (a loop guard).
const MAX_OUT: usize = 10_000;
/// Group numbers the aggregator may hand out (fewer than the jobs it holds, so that
/// some jobs find none free), and the address of group 0.
const GROUPS: u32 = 2;
const GROUP_BASE: u8 = 200;

/// The aggregator harness's codecs and chunk sizes, picked by its input's first byte:
/// i8 also in chunks of two exponent blocks and a bit, whose payloads end in the later
/// blocks' exponents (`codec::payload_bytes`).
const AGGREGATOR_CODECS: [(CodecId, u16); 5] = [
    (CodecId::I32, 16),
    (CodecId::F32, 16),
    (CodecId::I8, 16),
    (CodecId::F16, 16),
    (CodecId::I8, 2 * codec::EXPONENT_BLOCK as u16 + 8),
];

/// The worker harness's codecs, picked by its input's first byte (chunks of 16).
const WORKER_CODECS: [CodecId; 4] = [CodecId::I32, CodecId::F32, CodecId::I8, CodecId::F16];
const WORKER_CHUNK: u16 = 16;

/// Drives an aggregator with a running job of three ranks (started again whenever an
/// input ends it) through the operations that `data` encodes: raw datagrams,
/// well-formed contributions with fuzzed fields (right or wrong token, rank, slot,
/// count, exponents, flags), control messages (regrants included), and the passing
/// of time. The aggregator has a slot memory budget of 12 of the job's slots, so
/// joins of other jobs make it wait, refuse and re-grant.
/// Checks after every step that everything the aggregator sends decodes and goes to
/// an address that spoke to it, and that its slot memory stays within the budget.
/// Returns the datagrams it sent.
pub fn aggregator(data: &[u8]) -> u64 {
    let mut input = Bytes(data);
    let first = input.u8();
    let (codec, chunk) = AGGREGATOR_CODECS[usize::from(first & 0x7f) % AGGREGATOR_CODECS.len()];
    // Its top bit: ranks ask for groups, which the aggregator offers.
    let groups = first & 0x80 != 0;
    let known = codec::lookup(codec);
    let width = known.map_or(4, |c| c.wire_bytes());
    let kept = known.map_or(4 * 16, |c| {
        crate::aggregator::kept_bytes(c, usize::from(chunk))
    });
    let limit = 12 * crate::aggregator::slot_bytes(usize::from(chunk), kept, WORLD);
    let config = AggregatorConfig {
        max_window: 8,
        max_jobs: 4,
        silence_timeout: Duration::from_secs(3),
        slot_memory: Some(limit),
        ..AggregatorConfig::default()
    };
    let mut agg = Aggregator::<u8>::new(config);
    agg.offer_groups(GROUPS, |g| GROUP_BASE + g as u8);
    let mut now = Instant::now();
    let mut sent = 0u64;
    let mut buf = Vec::new();
    let join = |rank: u16| Join {
        job: JOB,
        rank,
        world: WORLD,
        codec,
        chunk_elems: chunk,
        window: 4,
        secret: SECRET.to_vec(),
        groups,
        nonce: u64::from(rank) + 1,
        completed: 0,
        proof: None,
        job_world: None,
    };
    let mut token = 0u64;
    // Every rank joins from its own address.
    let join_all = |agg: &mut Aggregator<u8>, now: Instant, buf: &mut Vec<u8>| {
        for rank in 0..WORLD {
            buf.clear();
            wire::encode_join(&join(rank), buf);
            agg.handle_datagram(now, rank as u8, buf);
        }
    };
    join_all(&mut agg, now, &mut buf);
    let mut drain = |agg: &mut Aggregator<u8>, token: &mut u64| {
        let mut out = Vec::new();
        for _ in 0..MAX_OUT {
            let Some(to) = agg.poll_transmit(&mut out) else {
                return;
            };
            sent += 1;
            assert!(
                to < ADDRESSES || (GROUP_BASE..GROUP_BASE + GROUPS as u8).contains(&to),
                "sent to an address nobody used: {to}"
            );
            match wire::decode(&out) {
                Ok(Message::Grant(g)) => *token = g.token,
                Ok(_) => {}
                Err(e) => panic!("the aggregator sent an undecodable datagram: {e}"),
            }
        }
        panic!("the aggregator sent more than {MAX_OUT} datagrams for one input");
    };
    drain(&mut agg, &mut token);

    while !input.is_empty() {
        let op = input.u8();
        let from = input.u8() % ADDRESSES;
        buf.clear();
        match op % 5 {
            0 => {
                let len = usize::from(input.u16()) % 200;
                let bytes = input.take(len);
                agg.handle_datagram(now, from, &bytes);
            }
            1 | 2 => {
                let rank = u16::from(input.u8() % 4);
                let seq = u64::from(input.u8() % 24);
                let slots = 4u64;
                let count = if chunk > 16 {
                    // Whole, one short, just past one block, one block, a few.
                    [chunk, chunk - 1, 8193, 8192, 5][usize::from(input.u8() % 5)]
                } else {
                    u16::from(input.u8() % 18)
                };
                let flags = input.u8() & (0x0f | wire::FLAG_LAST);
                let skew = input.u8();
                let h = DataHeader {
                    job: if skew & 0x80 != 0 { JOB + 1 } else { JOB },
                    rank,
                    codec,
                    flags,
                    token: if skew & 0x40 != 0 { !token } else { token },
                    seq,
                    slot: ((seq % slots) as u32) ^ u32::from(skew & 0x20 != 0),
                    version: ((seq / slots) % 2) as u8,
                    // Every exponent the wire carries, NO_EXPONENT and the extremes
                    // included (aligned i8 sums shift by them).
                    scale_exp: input.u8() as i8,
                    next_exp: input.u8() as i8,
                    count,
                };
                let n = usize::from(count) * width;
                let mut payload = input.take(n.min(64));
                // Long payloads repeat their fuzzed start; the exponents after the
                // data (multi-block i8 chunks) are fuzzed bytes of their own.
                let start = payload.clone();
                payload.extend(start.iter().cycle().take(n - payload.len()));
                payload.resize(n, 0);
                let extra = known.map_or(0, |c| codec::payload_bytes(c, usize::from(count)) - n);
                let mut trailer = input.take(extra);
                trailer.resize(extra, 0);
                payload.extend(trailer);
                if flags & wire::FLAG_PROBE != 0 {
                    payload.clear();
                }
                wire::encode_contribution(&h, &payload, &mut buf);
                // A rank's packet comes from its own address unless the fuzzer says not.
                let from = if skew & 0x10 != 0 { from } else { rank as u8 };
                agg.handle_datagram(now, from, &buf);
            }
            3 => {
                let rank = u16::from(input.u8() % 4);
                let c = Control {
                    job: JOB,
                    rank,
                    token,
                };
                match input.u8() % 4 {
                    0 => wire::encode_heartbeat(&c, &mut buf),
                    1 => wire::encode_leave(&c, &mut buf),
                    2 => wire::encode_regrant(&c, &mut buf),
                    _ => {
                        let mut j = join(rank);
                        j.job = JOB + u32::from(input.u8() % 3);
                        if input.u8() % 2 == 0 {
                            j.secret = b"wrong".to_vec();
                        }
                        wire::encode_join(&j, &mut buf);
                    }
                }
                agg.handle_datagram(now, from, &buf);
            }
            _ => {
                now += Duration::from_millis(u64::from(input.u16()));
                agg.handle_timeout(now);
            }
        }
        drain(&mut agg, &mut token);
        if !agg.jobs().contains(&JOB) {
            // Aborted (a fuzzed contribution that disagrees with another rank's ends
            // the job, as does a leave): start it again, so that the rest of the
            // input meets a live job rather than only its tombstone.
            join_all(&mut agg, now, &mut buf);
            drain(&mut agg, &mut token);
        }
        assert!(
            agg.slot_memory() <= limit,
            "slot memory {} above {limit}",
            agg.slot_memory()
        );
    }
    sent
}

/// The nonce of the worker that [`worker`] drives.
const NONCE: u64 = 0x5eed_0001;

/// Drives a worker (rank 1 of 3 of job 77) through the operations that `data`
/// encodes: raw datagrams, grants, results, errors and echoes with fuzzed fields
/// (right or wrong nonce and token, sequence numbers near and far, counts, exponents,
/// flags), allreduces started, a close, and the passing of time. Checks after every
/// step that everything the worker sends decodes, that it sends a bounded number of
/// datagrams, and that it never takes a grant beyond the window it asked for; its
/// own counters of dropped datagrams must add up. Returns the datagrams it sent.
pub fn worker(data: &[u8]) -> u64 {
    use crate::worker::{Event, Worker, WorkerConfig};
    let mut input = Bytes(data);
    let codec = WORKER_CODECS[usize::from(input.u8()) % WORKER_CODECS.len()];
    let chunk = WORKER_CHUNK;
    let mut cfg = WorkerConfig::new(JOB, 1, WORLD, codec);
    cfg.chunk_elems = chunk;
    cfg.window = 4;
    cfg.nonce = NONCE;
    cfg.join_timeout = Duration::from_secs(5);
    cfg.aggregator_timeout = Duration::from_secs(5);
    cfg.progress_timeout = Duration::from_secs(10);
    let Some(known) = codec::lookup(codec) else {
        return 0;
    };
    let mut now = Instant::now();
    let Ok(mut w) = Worker::new(cfg.clone(), now) else {
        return 0;
    };
    let mut tensor: Vec<f32> = Vec::new();
    let mut buf = Vec::new();
    let mut sent = 0u64;
    let mut handled = 0u64;
    // Bounded by the input: every step consumes at least one byte.
    while !input.is_empty() {
        let op = input.u8();
        let token = w.grant().map_or(0, |g| g.token);
        let datagram: Option<Vec<u8>> = match op % 8 {
            0 => {
                let n = usize::from(input.u8());
                Some(input.take(n))
            }
            1 => {
                let f = input.u8();
                let g = wire::Grant {
                    job: if f & 1 != 0 { JOB + 1 } else { JOB },
                    rank: 1,
                    world: WORLD,
                    codec,
                    chunk_elems: if f & 2 != 0 { chunk * 2 } else { chunk },
                    window: u32::from(input.u8() % 8).max(1),
                    token: if f & 4 != 0 {
                        u64::from(input.u8())
                    } else {
                        42 + u64::from(f >> 6)
                    },
                    nonce: if f & 8 != 0 { NONCE ^ 1 } else { NONCE },
                    shard: 0,
                    shards: 1,
                    group: (f & 16 != 0).then_some(3),
                };
                let mut b = Vec::new();
                wire::encode_grant(&g, &mut b);
                Some(b)
            }
            2 => {
                let f = input.u8();
                let s = u64::from(w.grant().map_or(4, |g| g.window).max(1));
                let seq = match f & 3 {
                    0 => u64::from(input.u8() % 16),
                    1 => u64::from(input.u16()),
                    2 => u64::MAX - u64::from(input.u8()),
                    _ => u64::from(input.u8()) * s,
                };
                let count = input.u16() % (chunk + 2);
                let h = DataHeader {
                    job: JOB,
                    rank: WORLD,
                    codec,
                    flags: input.u8() & 0x7f,
                    token: if f & 4 != 0 { token ^ 1 } else { token },
                    seq,
                    slot: (seq % s) as u32,
                    version: ((seq / s) % 2) as u8,
                    scale_exp: if known.block_scaled() {
                        (input.u8() % 40) as i8 - 20
                    } else {
                        wire::NO_EXPONENT
                    },
                    next_exp: if f & 8 != 0 {
                        (input.u8() % 40) as i8 - 20
                    } else {
                        wire::NO_EXPONENT
                    },
                    count,
                };
                let len = if h.flags & wire::FLAG_PROBE != 0 {
                    0
                } else {
                    codec::payload_bytes(known, usize::from(count))
                };
                let payload = input.take(len);
                let mut payload = payload;
                payload.resize(len, 0);
                let mut b = Vec::new();
                wire::encode_result(&h, &payload, &mut b);
                Some(b)
            }
            3 => {
                let f = input.u8();
                let e = wire::ErrorMsg {
                    job: JOB,
                    rank: u16::from(f >> 4) % (WORLD + 1),
                    code: if f & 1 != 0 {
                        wire::ErrorCode::PeerSilent
                    } else {
                        wire::ErrorCode::UnknownJob
                    },
                    nonce: if f & 2 != 0 { NONCE } else { u64::from(f) },
                    text: "fuzz".into(),
                };
                let mut b = Vec::new();
                wire::encode_error(&e, &mut b);
                Some(b)
            }
            4 => {
                let f = input.u8();
                let c = Control {
                    job: JOB,
                    rank: 1,
                    token: if f & 1 != 0 { token } else { u64::from(f) },
                };
                let mut b = Vec::new();
                if f & 2 != 0 {
                    wire::encode_heartbeat(&c, &mut b);
                } else {
                    wire::encode_leave(&c, &mut b);
                }
                Some(b)
            }
            5 => {
                now += Duration::from_millis(u64::from(input.u16()));
                if w.poll_timeout().is_some_and(|t| t <= now) {
                    w.handle_timeout(now);
                }
                None
            }
            6 => {
                if w.is_ready() {
                    let n = usize::from(input.u8() % 64);
                    tensor = (0..n)
                        .map(|i| f32::from(input.u8()) - 128.0 + i as f32)
                        .collect();
                    let _ = w.start_allreduce(now, &mut tensor, None);
                }
                None
            }
            _ => {
                if op & 0x80 != 0 {
                    w.close();
                }
                None
            }
        };
        if let Some(d) = datagram {
            w.handle_datagram(now, &d, &mut tensor);
            handled += 1;
        }
        let dropped = w.dropped().total();
        assert!(dropped <= handled, "{dropped} drops of {handled} datagrams");
        if let Some(g) = w.grant() {
            assert!(
                g.window <= cfg.window,
                "took a grant beyond its window: {g:?}"
            );
            assert_eq!(g.nonce, NONCE, "took a grant without its nonce");
        }
        let mut step = 0;
        while w.poll_transmit(now, &tensor, &mut buf) {
            assert!(buf.len() <= wire::MAX_DATAGRAM);
            if let Err(e) = wire::decode(&buf) {
                panic!("the worker sent an undecodable datagram ({e}): {buf:?}");
            }
            sent += 1;
            step += 1;
            assert!(step <= MAX_OUT, "the worker keeps sending");
        }
        while let Some(ev) = w.poll_event() {
            if let Event::Failed(_) = ev {
                assert!(w.is_finished(), "failed but not finished");
            }
        }
    }
    sent
}

#[cfg(test)]
mod tests {
    /// The worker harness reaches a running allreduce: a valid grant, an allreduce of
    /// 40 elements (three chunks of 16), its contributions sent.
    #[test]
    fn the_worker_harness_reaches_an_allreduce() {
        let mut flow = vec![1u8, 1, 0, 4, 6, 40];
        flow.extend([128; 40]);
        flow.extend([5, 10, 0]);
        // The grant comes before the first join goes out; then three contributions
        // (f32: no lookahead).
        assert_eq!(super::worker(&flow), 3);
    }
}
