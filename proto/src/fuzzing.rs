//! Harnesses that turn arbitrary bytes into inputs for the decoder and the aggregator,
//! shared by the cargo-fuzz targets (`fuzz/`) and the property tests that run in CI.
//!
//! Each harness panics only when an invariant breaks; a fuzzer reports that panic as
//! a crash, and the input that caused it becomes a regression test.

use std::time::{Duration, Instant};

use crate::aggregator::{Aggregator, AggregatorConfig};
use crate::codec::{self, CodecId};
use crate::wire::{self, Control, DataHeader, Join, Message};

/// Decodes `data` as a datagram; a message that decodes must encode back to the same
/// bytes (decoding accepts only canonical encodings). Returns the message kind, or
/// 0 for an error, so that the work cannot be optimized away.
pub fn decode(data: &[u8]) -> u8 {
    match wire::decode(data) {
        Ok(m) => {
            let mut again = Vec::with_capacity(data.len());
            m.encode(&mut again);
            assert_eq!(
                again, data,
                "decode accepted a non-canonical encoding: {m:?}"
            );
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
    // The codec, and its chunk: i8 also in chunks of two exponent blocks and a bit,
    // whose payloads end in the later blocks' exponents (`codec::payload_bytes`).
    let codecs = [
        (CodecId::I32, 16u16),
        (CodecId::F32, 16),
        (CodecId::I8, 16),
        (CodecId::F16, 16),
        (CodecId::I8, 2 * codec::EXPONENT_BLOCK as u16 + 8),
    ];
    let first = input.u8();
    let (codec, chunk) = codecs[usize::from(first & 0x7f) % codecs.len()];
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
