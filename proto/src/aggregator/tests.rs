//! The aggregator alone, driven packet by packet.

use std::time::{Duration, Instant};

use super::*;
use crate::codec::CodecId;

struct Harness {
    agg: Aggregator<u32>,
    now: Instant,
    token: u64,
}

fn join_msg(job: u32, rank: u16, world: u16, codec: CodecId, secret: &[u8]) -> Vec<u8> {
    join_with_groups(job, rank, world, codec, secret, false)
}

/// [`join_msg`], asking for groups or not.
fn join_with_groups(
    job: u32,
    rank: u16,
    world: u16,
    codec: CodecId,
    secret: &[u8],
    groups: bool,
) -> Vec<u8> {
    let mut b = Vec::new();
    wire::encode_join(
        &Join {
            job,
            rank,
            world,
            codec,
            chunk_elems: 4,
            window: 2,
            secret: secret.to_vec(),
            groups,
            nonce: 1000 + u64::from(rank),
            completed: 0,
            proof: None,
            job_world: None,
        },
        &mut b,
    );
    b
}

/// The header of rank `rank`'s f32 contribution of `count` elements to packet `seq`
/// of job `job`, in a pool of 2 slots.
fn f32_header(job: u32, rank: u16, token: u64, seq: u64, count: u16) -> DataHeader {
    DataHeader {
        job,
        rank,
        codec: CodecId::F32,
        flags: 0,
        token,
        seq,
        slot: (seq % 2) as u32,
        version: ((seq / 2) % 2) as u8,
        scale_exp: wire::NO_EXPONENT,
        next_exp: wire::NO_EXPONENT,
        count,
    }
}

/// A contribution datagram: `h` and `values` as f32 payload.
fn contribution(h: &DataHeader, values: &[f32]) -> Vec<u8> {
    let payload: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut b = Vec::new();
    wire::encode_contribution(h, &payload, &mut b);
    b
}

impl Harness {
    /// A running job 5 of `world` ranks (addresses 100 + rank), f32, chunks of 4, 2 slots.
    fn new(world: u16) -> Self {
        let mut agg = Aggregator::new(AggregatorConfig::default());
        let now = Instant::now();
        for r in 0..world {
            agg.handle_datagram(
                now,
                100 + u32::from(r),
                &join_msg(5, r, world, CodecId::F32, b"k"),
            );
        }
        let mut h = Self { agg, now, token: 0 };
        let out = h.drain();
        assert_eq!(out.len(), usize::from(world));
        match &out[0].1 {
            Message::Grant(g) => h.token = g.token,
            m => panic!("expected a grant, got {m:?}"),
        }
        h
    }

    fn drain(&mut self) -> Vec<(u32, Message<'static>)> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(to) = self.agg.poll_transmit(&mut buf) {
            let msg = match wire::decode(&buf).expect("the aggregator sends valid datagrams") {
                Message::Result(h, p) => {
                    Message::Result(h, Box::leak(p.to_vec().into_boxed_slice()))
                }
                Message::Join(j) => Message::Join(j),
                Message::Grant(g) => Message::Grant(g),
                Message::Contribution(..) | Message::Partial(..) => {
                    panic!("aggregator sent a contribution")
                }
                Message::Leave(c) => Message::Leave(c),
                Message::Heartbeat(c) => Message::Heartbeat(c),
                Message::Error(e) => Message::Error(e),
                Message::Regrant(c) => Message::Regrant(c),
            };
            out.push((to, msg));
        }
        out
    }

    fn header(&self, rank: u16, seq: u64, count: u16) -> DataHeader {
        f32_header(5, rank, self.token, seq, count)
    }

    fn contribute_as(&mut self, from: u32, h: &DataHeader, values: &[f32]) {
        self.agg
            .handle_datagram(self.now, from, &contribution(h, values));
    }

    fn contribute(&mut self, rank: u16, seq: u64, values: &[f32]) {
        let h = self.header(rank, seq, values.len() as u16);
        self.contribute_as(100 + u32::from(rank), &h, values);
    }

    /// Rank `rank` of job 5 leaves, from its own address.
    fn leave(&mut self, rank: u16) {
        let mut b = Vec::new();
        let c = Control {
            job: 5,
            rank,
            token: self.token,
        };
        wire::encode_leave(&c, &mut b);
        self.agg
            .handle_datagram(self.now, 100 + u32::from(rank), &b);
    }
}

fn values(p: &[u8]) -> Vec<f32> {
    p.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn duplicate_contribution_is_never_added_twice() {
    let mut h = Harness::new(2);
    h.contribute(0, 0, &[1.0, 2.0, 3.0, 4.0]);
    h.contribute(0, 0, &[1.0, 2.0, 3.0, 4.0]);
    // The duplicate is answered "held" (no payload), not with a result.
    let out = h.drain();
    assert_eq!(out.len(), 1, "{out:?}");
    let (to, Message::Result(hd, p)) = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(
        (*to, hd.seq, hd.flags & FLAG_PROBE, p.len()),
        (100, 0, FLAG_PROBE, 0)
    );
    assert_eq!(h.agg.stats().dropped(DropReason::Duplicate), 1);
    h.contribute(1, 0, &[10.0, 20.0, 30.0, 40.0]);
    let out = h.drain();
    assert_eq!(out.len(), 2, "a result to each rank");
    for (to, m) in &out {
        let Message::Result(hd, p) = m else {
            panic!("{m:?}")
        };
        assert!([100, 101].contains(to));
        assert_eq!(hd.flags & FLAG_FROM_COPY, 0);
        assert_eq!(values(p), vec![11.0, 22.0, 33.0, 44.0]);
    }
    // A retransmission after completion is answered from the copy, to that rank only,
    // with the same sum.
    h.contribute(1, 0, &[10.0, 20.0, 30.0, 40.0]);
    let out = h.drain();
    assert_eq!(out.len(), 1);
    let (to, Message::Result(hd, p)) = &out[0] else {
        panic!()
    };
    assert_eq!(*to, 101);
    assert_ne!(hd.flags & FLAG_FROM_COPY, 0);
    assert_eq!(values(p), vec![11.0, 22.0, 33.0, 44.0]);
    assert_eq!(h.agg.stats().contributions, 2);
    assert_eq!(h.agg.stats().copies_answered, 1);
}

#[test]
fn results_go_out_as_a_header_and_the_slots_one_payload() {
    let mut h = Harness::new(3);
    for r in 0..3u16 {
        h.contribute(r, 0, &[1.0, 2.0, 3.0, f32::from(r)]);
    }
    let before = h.agg.stats().bytes_sent;
    let mut heads = Vec::new();
    let mut buf = Vec::new();
    while let Some((to, body)) = h.agg.poll_transmit_head(&mut buf) {
        heads.push((to, buf.clone(), body.expect("a result has a body")));
        buf.clear();
    }
    assert_eq!(heads.len(), 3, "one result per rank");
    let mut sent = 0;
    for (to, head, body) in &heads {
        assert_eq!(
            head.len(),
            wire::DATA_HEADER_LEN,
            "only the header is copied"
        );
        let payload = h.agg.body(*body);
        // Every rank's datagram ends in the same kept bytes: no copy per rank.
        assert_eq!(payload.as_ptr(), h.agg.body(heads[0].2).as_ptr());
        assert_eq!(payload.len(), body.len());
        let datagram = [&head[..], payload].concat();
        sent += datagram.len() as u64;
        let Ok(Message::Result(hd, p)) = wire::decode(&datagram) else {
            panic!("not a result")
        };
        assert!([100, 101, 102].contains(to));
        assert_eq!((hd.seq, hd.count), (0, 4));
        assert_eq!(values(p), vec![3.0, 6.0, 9.0, 3.0]);
    }
    assert_eq!(h.agg.stats().bytes_sent - before, sent);
}

#[test]
fn hostile_contributions_are_counted_and_change_nothing() {
    let mut h = Harness::new(2);
    h.contribute(0, 0, &[1.0; 4]);
    let ok = h.header(1, 0, 4);
    let cases: Vec<(u32, DataHeader, DropReason)> = vec![
        (
            101,
            DataHeader { rank: 7, ..ok },
            DropReason::RankOutOfRange,
        ),
        (101, DataHeader { job: 6, ..ok }, DropReason::UnknownJob),
        (
            101,
            DataHeader { slot: 9, ..ok },
            DropReason::SlotOutOfRange,
        ),
        (
            101,
            DataHeader { slot: 1, ..ok },
            DropReason::SlotOutOfRange,
        ),
        (
            101,
            DataHeader { version: 1, ..ok },
            DropReason::SlotOutOfRange,
        ),
        (
            101,
            DataHeader {
                codec: CodecId::I32,
                ..ok
            },
            DropReason::CodecMismatch,
        ),
        (
            101,
            DataHeader {
                token: ok.token ^ 1,
                ..ok
            },
            DropReason::BadToken,
        ),
        (999, ok, DropReason::NotMember),
        (100, ok, DropReason::NotMember),
    ];
    for (from, hd, reason) in &cases {
        let before = h.agg.stats().dropped(*reason);
        let n = usize::from(hd.count);
        h.contribute_as(*from, hd, &vec![1000.0; n]);
        assert_eq!(h.agg.stats().dropped(*reason), before + 1, "{reason}");
        assert!(h.drain().is_empty(), "{reason} produced output");
    }
    let mut big = Vec::new();
    wire::encode_contribution(&DataHeader { count: 5, ..ok }, &[0; 20], &mut big);
    h.agg.handle_datagram(h.now, 101, &big);
    assert_eq!(h.agg.stats().dropped(DropReason::CountTooLarge), 1);
    h.agg.handle_datagram(h.now, 101, b"garbage");
    assert_eq!(h.agg.stats().dropped(DropReason::Malformed), 1);
    // Another protocol version, and a datagram over the UDP limit.
    let mut v2 = Vec::new();
    wire::encode_contribution(&ok, &[0; 16], &mut v2);
    v2[2] = wire::VERSION + 1;
    h.agg.handle_datagram(h.now, 101, &v2);
    let mut huge = Vec::new();
    wire::encode_contribution(&ok, &[0; 16], &mut huge);
    huge.resize(wire::MAX_DATAGRAM + 1, 0);
    h.agg.handle_datagram(h.now, 101, &huge);
    assert_eq!(h.agg.stats().dropped(DropReason::Malformed), 3);
    // The slot is untouched: the honest contribution completes the right sum.
    h.contribute(1, 0, &[2.0; 4]);
    let out = h.drain();
    assert_eq!(out.len(), 2);
    let Message::Result(_, p) = &out[0].1 else {
        panic!()
    };
    assert_eq!(values(p), vec![3.0; 4]);
    assert_eq!(h.agg.stats().contributions, 2);
}

#[test]
fn ranks_that_disagree_on_a_packet_abort_their_job_with_a_clear_error() {
    // Rank 0's packet 0 holds 4 elements; rank 1's differs in count, scale, or in
    // being the last of its tensor (a shorter tensor ending on a chunk boundary).
    let cases = [
        |ok: DataHeader| DataHeader { count: 3, ..ok },
        |ok: DataHeader| DataHeader { scale_exp: 3, ..ok },
        |ok: DataHeader| DataHeader {
            flags: ok.flags | wire::FLAG_LAST,
            ..ok
        },
    ];
    for (i, differ) in cases.into_iter().enumerate() {
        let mut h = Harness::new(2);
        h.contribute(0, 0, &[1.0; 4]);
        h.drain();
        let hd = differ(h.header(1, 0, 4));
        h.contribute_as(101, &hd, &vec![1.0; usize::from(hd.count)]);
        assert_eq!(
            h.agg.stats().dropped(DropReason::Inconsistent),
            1,
            "case {i}"
        );
        let out = h.drain();
        assert_eq!(out.len(), 2, "case {i}: every rank is told: {out:?}");
        for (_, m) in &out {
            let Message::Error(e) = m else {
                panic!("case {i}: {m:?}")
            };
            assert_eq!(
                (e.code, e.rank),
                (ErrorCode::Inconsistent, u16::MAX),
                "case {i}"
            );
            assert!(
                e.text.contains("ranks 0 and 1 disagree"),
                "case {i}: {}",
                e.text
            );
            assert!(e.text.contains("same length"), "case {i}: {}", e.text);
        }
        assert!(h.agg.jobs().is_empty(), "case {i}");
    }
    // Agreeing on the end is fine.
    let mut h = Harness::new(2);
    for r in 0..2 {
        let hd = h.header(r, 0, 4);
        let hd = DataHeader {
            flags: hd.flags | wire::FLAG_LAST,
            ..hd
        };
        h.contribute_as(100 + u32::from(r), &hd, &[1.0; 4]);
    }
    assert!(matches!(
        &h.drain()[..],
        [(_, Message::Result(..)), (_, Message::Result(..))]
    ));
}

#[test]
fn stale_and_ahead_chunks_are_dropped() {
    let mut h = Harness::new(2);
    for seq in 0..4 {
        h.contribute(0, seq, &[1.0; 4]);
        h.contribute(1, seq, &[1.0; 4]);
    }
    h.drain();
    // seq 0 lived in slot 0 version 0, now held by seq 4's predecessor... seq 4 reuses it.
    h.contribute(0, 4, &[1.0; 4]);
    h.contribute(1, 0, &[1.0; 4]);
    assert_eq!(h.agg.stats().dropped(DropReason::Stale), 1);
    // seq 8 would reuse slot 0 version 0 while seq 4 is still open.
    h.contribute(0, 8, &[1.0; 4]);
    assert_eq!(h.agg.stats().dropped(DropReason::Ahead), 1);
    h.contribute(1, 4, &[1.0; 4]);
    let out = h.drain();
    let Message::Result(hd, p) = &out[0].1 else {
        panic!()
    };
    assert_eq!((hd.seq, values(p)), (4, vec![2.0; 4]));
}

#[test]
fn joins_are_checked() {
    let mut agg: Aggregator<u32> = Aggregator::new(AggregatorConfig::default());
    let now = Instant::now();
    agg.handle_datagram(now, 1, &join_msg(1, 0, 2, CodecId::F32, b"right"));
    let refused = |agg: &mut Aggregator<u32>, from, msg: Vec<u8>, code| {
        agg.handle_datagram(now, from, &msg);
        let mut buf = Vec::new();
        assert_eq!(agg.poll_transmit(&mut buf), Some(from));
        match wire::decode(&buf) {
            Ok(Message::Error(e)) => assert_eq!(e.code, code, "{}", e.text),
            m => panic!("expected an error, got {m:?}"),
        }
    };
    refused(
        &mut agg,
        2,
        join_msg(1, 1, 2, CodecId::F32, b"wrong"),
        ErrorCode::BadSecret,
    );
    refused(
        &mut agg,
        2,
        join_msg(1, 1, 3, CodecId::F32, b"right"),
        ErrorCode::ParamMismatch,
    );
    refused(
        &mut agg,
        2,
        join_msg(1, 1, 2, CodecId::I32, b"right"),
        ErrorCode::ParamMismatch,
    );
    refused(
        &mut agg,
        2,
        join_msg(1, 0, 2, CodecId::F32, b"right"),
        ErrorCode::RankTaken,
    );
    assert_eq!(agg.stats().dropped(DropReason::BadSecret), 1);
    assert_eq!(agg.stats().dropped(DropReason::ParamMismatch), 2);
    assert_eq!(agg.stats().dropped(DropReason::RankTaken), 1);
    let mut buf = Vec::new();
    assert_eq!(agg.poll_transmit(&mut buf), None, "no grant to anyone yet");
    agg.handle_datagram(now, 2, &join_msg(1, 1, 2, CodecId::F32, b"right"));
    let mut grants = 0;
    while agg.poll_transmit(&mut buf).is_some() {
        assert!(matches!(wire::decode(&buf), Ok(Message::Grant(_))));
        grants += 1;
    }
    assert_eq!(grants, 2);
}

#[test]
fn a_silent_rank_aborts_its_job_and_stragglers_learn_why() {
    let mut h = Harness::new(3);
    h.contribute(0, 0, &[1.0; 4]);
    h.contribute(1, 0, &[1.0; 4]);
    let later = h.now + Duration::from_secs(2);
    let mut hb = Vec::new();
    for r in 0..2u16 {
        wire::encode_heartbeat(
            &Control {
                job: 5,
                rank: r,
                token: h.token,
            },
            &mut hb,
        );
        h.agg.handle_datagram(later, 100 + u32::from(r), &hb);
        hb.clear();
    }
    assert_eq!(h.drain().len(), 2, "heartbeats are echoed");
    let t = h.now + Duration::from_millis(3500);
    h.agg.handle_timeout(t);
    let out = h.drain();
    assert_eq!(out.len(), 3, "every rank is told");
    for (_, m) in &out {
        let Message::Error(e) = m else {
            panic!("{m:?}")
        };
        assert_eq!((e.code, e.rank), (ErrorCode::PeerSilent, 2));
    }
    assert!(h.agg.jobs().is_empty());
    assert_eq!(h.agg.slot_memory(), 0);
    // A rank that missed the news hears it on its next packet.
    h.now = t;
    h.contribute(0, 1, &[1.0; 4]);
    let out = h.drain();
    assert!(matches!(&out[..], [(100, Message::Error(e))] if e.code == ErrorCode::PeerSilent));
    // A stranger does not.
    let hd = h.header(0, 1, 4);
    h.contribute_as(555, &hd, &[1.0; 4]);
    assert!(h.drain().is_empty());
}

/// `max_job_memory` caps a job's window at the slots that fit in it, budget or not.
#[test]
fn a_job_gets_no_more_slots_than_its_memory_cap_holds() {
    let slot = slot_bytes(4, 0, 1);
    for budget in [None, Some(1000 * slot)] {
        let mut agg = Aggregator::new(AggregatorConfig {
            slot_memory: budget,
            max_job_memory: Some(10 * slot + slot / 2),
            ..AggregatorConfig::default()
        });
        let now = Instant::now();
        agg.handle_datagram(now, 7, &join_window(3, 0, 1, 100));
        let mut buf = Vec::new();
        let mut windows = Vec::new();
        while agg.poll_transmit(&mut buf).is_some() {
            if let Ok(Message::Grant(g)) = wire::decode(&buf) {
                windows.push(g.window);
            }
        }
        assert_eq!(windows, vec![10], "budget {budget:?}");
        assert_eq!(agg.slot_memory(), 10 * slot);
    }
}

/// Aborted jobs' reasons are kept for at most `max_tombstones` jobs, the oldest
/// forgotten first: starting and breaking jobs on purpose cannot grow them for the
/// whole TTL.
#[test]
fn only_the_newest_aborted_jobs_are_remembered() {
    let mut agg = Aggregator::new(AggregatorConfig {
        max_tombstones: 2,
        ..AggregatorConfig::default()
    });
    let t0 = Instant::now();
    // Jobs 10, 11 and 12 of one rank each (addresses 200, 201, 202), one second
    // apart, all silent: each is aborted 3 s after its join.
    for k in 0..3u16 {
        let at = t0 + Duration::from_secs(u64::from(k));
        agg.handle_datagram(
            at,
            200 + u32::from(k),
            &join_msg(10 + u32::from(k), 0, 1, CodecId::F32, b""),
        );
        agg.handle_timeout(at + Duration::from_millis(3500));
    }
    let mut buf = Vec::new();
    while agg.poll_transmit(&mut buf).is_some() {}
    assert!(agg.jobs().is_empty());
    let later = t0 + Duration::from_secs(6);
    let mut answered = Vec::new();
    for k in 0..3u16 {
        let h = f32_header(10 + u32::from(k), 0, 0, 0, 1);
        agg.handle_datagram(later, 200 + u32::from(k), &contribution(&h, &[1.0]));
        while let Some(to) = agg.poll_transmit(&mut buf) {
            if let Ok(Message::Error(e)) = wire::decode(&buf) {
                assert_eq!(e.code, ErrorCode::PeerSilent);
                answered.push((to, e.job));
            }
        }
    }
    assert_eq!(answered, vec![(201, 11), (202, 12)]);
}

#[test]
fn a_rank_waiting_on_a_leaver_hears_at_its_next_probe() {
    // Rank 0's contribution is in before rank 2 leaves; its retransmission (held:
    // it waits for the others) gets the abort at once, not a hold until it times out.
    let mut h = Harness::new(3);
    h.contribute(0, 0, &[1.0; 4]);
    h.drain();
    h.leave(2);
    h.drain();
    h.contribute(0, 0, &[1.0; 4]);
    let out = h.drain();
    assert!(
        out.iter().any(|(to, m)| *to == 100
            && matches!(m, Message::Error(e) if e.code == ErrorCode::PeerLeft && e.rank == 2)),
        "{out:?}"
    );
    assert!(h.agg.jobs().is_empty());
}

#[test]
fn leaving_ends_the_job_and_a_chunk_that_needs_a_leaver_aborts() {
    let mut h = Harness::new(2);
    h.contribute(0, 0, &[1.0; 4]);
    h.contribute(1, 0, &[1.0; 4]);
    h.drain();
    h.leave(1);
    // The leave is echoed, so that the rank stops resending it.
    assert!(
        matches!(&h.drain()[..], [(101, Message::Leave(c))] if c.rank == 1),
        "no echo"
    );
    // Rank 0 can still get the kept copy of a finished chunk...
    h.contribute(0, 0, &[1.0; 4]);
    assert!(matches!(&h.drain()[..], [(100, Message::Result(..))]));
    // ...but a new chunk can never complete.
    h.contribute(0, 1, &[1.0; 4]);
    let out = h.drain();
    assert!(matches!(&out[..], [(100, Message::Error(e))] if e.code == ErrorCode::PeerLeft));
    assert!(h.agg.jobs().is_empty());

    let mut h = Harness::new(2);
    for r in 0..2u16 {
        h.leave(r);
    }
    assert!(h.agg.jobs().is_empty());
    assert!(matches!(h.agg.poll_event(), Some(Event::JobStarted { .. })));
    assert!(matches!(
        h.agg.poll_event(),
        Some(Event::JobEnded { job: 5, .. })
    ));
}

#[test]
fn shutdown_tells_every_rank() {
    let mut h = Harness::new(2);
    h.agg.shutdown(h.now);
    let out = h.drain();
    assert_eq!(out.len(), 2);
    assert!(out
        .iter()
        .all(|(_, m)| matches!(m, Message::Error(e) if e.code == ErrorCode::Shutdown)));
}

#[test]
fn probes_are_answered_without_touching_the_slot() {
    let mut h = Harness::new(2);
    let probe = |h: &mut Harness, rank: u16| {
        let mut hd = h.header(rank, 0, 4);
        hd.flags = FLAG_PROBE;
        let mut b = Vec::new();
        wire::encode_contribution(&hd, &[], &mut b);
        h.agg.handle_datagram(h.now, 100 + u32::from(rank), &b);
        h.drain()
    };
    // A probe for a contribution the aggregator never got: dropped, counted, silent.
    assert!(probe(&mut h, 0).is_empty());
    assert_eq!(h.agg.stats().dropped(DropReason::ProbeMissing), 1);
    h.contribute(0, 0, &[1.0, 2.0, 3.0, 4.0]);
    // Held: answered with a header, the slot unchanged.
    let out = probe(&mut h, 0);
    assert!(
        matches!(&out[..], [(100, Message::Result(hd, p))] if hd.flags == FLAG_PROBE && p.is_empty()),
        "{out:?}"
    );
    assert!(probe(&mut h, 1).is_empty(), "rank 1 has not contributed");
    assert_eq!(h.agg.stats().dropped(DropReason::ProbeMissing), 2);
    h.contribute(1, 0, &[10.0, 20.0, 30.0, 40.0]);
    assert_eq!(h.drain().len(), 2);
    // Complete: a probe gets the kept result, with its payload.
    let out = probe(&mut h, 1);
    let [(101, Message::Result(hd, p))] = &out[..] else {
        panic!("{out:?}")
    };
    assert_ne!(hd.flags & FLAG_FROM_COPY, 0);
    assert_eq!(values(p), vec![11.0, 22.0, 33.0, 44.0]);
    assert_eq!(h.agg.stats().contributions, 2);
}

/// A join for job `job` of `world` ranks (f32, chunks of 4) asking for `window` slots.
fn join_window(job: u32, rank: u16, world: u16, window: u32) -> Vec<u8> {
    let mut b = Vec::new();
    wire::encode_join(
        &Join {
            job,
            rank,
            world,
            codec: CodecId::F32,
            chunk_elems: 4,
            window,
            secret: b"k".to_vec(),
            groups: false,
            nonce: 1000 + u64::from(rank),
            completed: 0,
            proof: None,
            job_world: None,
        },
        &mut b,
    );
    b
}

fn grants(out: &[(u32, Message<'static>)]) -> Vec<(u32, Grant)> {
    out.iter()
        .filter_map(|(to, m)| match m {
            Message::Grant(g) => Some((*to, *g)),
            _ => None,
        })
        .collect()
}

#[test]
fn slot_memory_is_shared_fairly_refused_below_the_minimum_and_regranted_at_a_boundary() {
    // One slot of these jobs: two versions of 4 f32 lanes (which are the kept result)
    // and one bitmap word.
    let slot = slot_bytes(4, kept_bytes(&crate::codec::F32, 4), 2);
    assert_eq!(slot, 48);
    let mut agg = Aggregator::new(AggregatorConfig {
        slot_memory: Some(10 * slot),
        ..AggregatorConfig::default()
    });
    let mut h = Harness {
        agg: Aggregator::new(AggregatorConfig::default()),
        now: Instant::now(),
        token: 0,
    };
    std::mem::swap(&mut h.agg, &mut agg);
    // Job 5 alone: the 8 slots it asks for.
    for r in 0..2 {
        h.agg
            .handle_datagram(h.now, 100 + u32::from(r), &join_window(5, r, 2, 8));
    }
    let g = grants(&h.drain());
    assert_eq!(g.len(), 2);
    assert!(g.iter().all(|(_, g)| g.window == 8));
    h.token = g[0].1.token;
    // Job 6 comes: fair shares are 5 and 5. Job 5 must shrink first; job 6 waits.
    for r in 0..2 {
        h.agg
            .handle_datagram(h.now, 200 + u32::from(r), &join_window(6, r, 2, 8));
    }
    assert!(h.drain().is_empty(), "job 6 must wait for memory");
    assert_eq!(h.agg.job_slots(6), None);
    // Job 7 cannot get its minimal share (4 slots) beside the two: refused.
    for r in 0..2 {
        h.agg
            .handle_datagram(h.now, 300 + u32::from(r), &join_window(7, r, 2, 8));
    }
    let out = h.drain();
    assert_eq!(out.len(), 2, "{out:?}");
    for (to, m) in &out {
        let Message::Error(e) = m else {
            panic!("{m:?}")
        };
        assert!([300, 301].contains(to));
        assert_eq!(e.code, ErrorCode::NoCapacity);
        assert!(
            e.text.contains("slot memory") && e.text.contains("4 slots of 48 bytes"),
            "{}",
            e.text
        );
    }
    assert!(!h.agg.jobs().contains(&7));
    // Job 5's results now say a re-grant is coming; its window is unchanged so far.
    let (seq0, s) = (0u64, 8u64);
    let hdr = |rank: u16, token: u64| DataHeader {
        job: 5,
        token,
        slot: (seq0 % s) as u32,
        version: 0,
        ..h.header(rank, seq0, 4)
    };
    let (h0, h1) = (hdr(0, h.token), hdr(1, h.token));
    h.contribute_as(100, &h0, &[1.0; 4]);
    h.contribute_as(101, &h1, &[2.0; 4]);
    let out = h.drain();
    assert_eq!(out.len(), 2);
    for (_, m) in &out {
        let Message::Result(hd, p) = m else {
            panic!("{m:?}")
        };
        assert_ne!(hd.flags & FLAG_REGRANT, 0, "{hd:?}");
        assert_eq!(values(p), vec![3.0; 4]);
    }
    let regrant = |h: &mut Harness, rank: u16, token: u64| {
        let mut b = Vec::new();
        wire::encode_regrant(
            &Control {
                job: 5,
                rank,
                token,
            },
            &mut b,
        );
        h.agg.handle_datagram(h.now, 100 + u32::from(rank), &b);
    };
    // Rank 0 is at the boundary; rank 1 may still need the old pool: nothing changes.
    let t = h.token;
    regrant(&mut h, 0, t);
    assert!(h.drain().is_empty());
    assert_eq!(h.agg.job_slots(5), Some(8));
    // A retransmission of rank 1 is still answered from the old pool, flag and all.
    h.contribute_as(101, &h1, &[2.0; 4]);
    let out = h.drain();
    assert!(matches!(&out[..], [(101, Message::Result(hd, _))] if hd.flags & FLAG_REGRANT != 0));
    // Rank 1 at the boundary too: job 5 moves to 5 slots with a new token, and job 6
    // starts with the 5 freed.
    let t = h.token;
    regrant(&mut h, 1, t);
    let g = grants(&h.drain());
    let five: Vec<_> = g.iter().filter(|(_, g)| g.job == 5).collect();
    let six: Vec<_> = g.iter().filter(|(_, g)| g.job == 6).collect();
    assert_eq!(five.len(), 2, "{g:?}");
    assert_eq!(six.len(), 2, "{g:?}");
    assert!(five
        .iter()
        .all(|(_, g)| g.window == 5 && g.token != h.token));
    assert!(six.iter().all(|(_, g)| g.window == 5));
    assert_eq!((h.agg.job_slots(5), h.agg.job_slots(6)), (Some(5), Some(5)));
    assert!(h.agg.slot_memory() <= 10 * slot);
    let old = h.token;
    h.token = five[0].1.token;
    // A late packet with the old token is stale, not forged; a rank whose grant was
    // lost asks again with the old token and gets the new grant.
    h.contribute_as(101, &h1, &[2.0; 4]);
    assert_eq!(h.agg.stats().dropped(DropReason::Stale), 1);
    assert_eq!(h.agg.stats().dropped(DropReason::BadToken), 0);
    regrant(&mut h, 1, old);
    let g = grants(&h.drain());
    assert!(
        matches!(&g[..], [(101, g)] if g.window == 5 && g.token == h.token),
        "{g:?}"
    );
    // Job 6 ends: job 5 may grow back to 8 (reserved now, at its next boundary).
    for r in 0..2u16 {
        let mut b = Vec::new();
        let token = six[0].1.token;
        wire::encode_leave(
            &Control {
                job: 6,
                rank: r,
                token,
            },
            &mut b,
        );
        h.agg.handle_datagram(h.now, 200 + u32::from(r), &b);
    }
    h.drain();
    assert!(!h.agg.jobs().contains(&6));
    // The first packet after the boundary: the new pool takes the stream from there.
    let seq = 1u64;
    let hd = |rank: u16| DataHeader {
        job: 5,
        token: h.token,
        slot: (seq % 5) as u32,
        version: ((seq / 5) % 2) as u8,
        ..h.header(rank, seq, 4)
    };
    let (a, b) = (hd(0), hd(1));
    h.contribute_as(100, &a, &[1.0; 4]);
    h.contribute_as(101, &b, &[1.0; 4]);
    let out = h.drain();
    // One result to each rank, both flagged, both the sum.
    let mut to: Vec<u32> = out.iter().map(|(to, _)| *to).collect();
    to.sort_unstable();
    assert_eq!(to, [100, 101], "{out:?}");
    assert!(out.iter().all(|(_, m)| matches!(m,
        Message::Result(hd, p) if hd.flags & FLAG_REGRANT != 0 && values(p) == [2.0; 4])));
    let t = h.token;
    regrant(&mut h, 0, t);
    let t = h.token;
    regrant(&mut h, 1, t);
    let g = grants(&h.drain());
    assert!(
        g.len() == 2 && g.iter().all(|(_, g)| g.window == 8),
        "{g:?}"
    );
    assert_eq!(h.agg.job_slots(5), Some(8));
}

#[test]
fn without_a_budget_no_result_is_flagged_and_nothing_waits() {
    let mut h = Harness::new(2);
    h.contribute(0, 0, &[1.0; 4]);
    h.contribute(1, 0, &[1.0; 4]);
    let out = h.drain();
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out.iter().all(|(_, m)| matches!(m,
        Message::Result(hd, p) if hd.flags & FLAG_REGRANT == 0 && values(p) == [2.0; 4])));
}

/// Every rank must see the same flagged results, or some would switch pools at one
/// boundary and some at the next: a chunk that completed before the re-grant was
/// decided is answered from its copy without the flag, even after.
#[test]
fn a_result_keeps_the_regrant_flag_it_completed_with() {
    let slot = slot_bytes(4, kept_bytes(&crate::codec::F32, 4), 2);
    let mut h = Harness {
        agg: Aggregator::new(AggregatorConfig {
            slot_memory: Some(8 * slot),
            ..AggregatorConfig::default()
        }),
        now: Instant::now(),
        token: 0,
    };
    for r in 0..2 {
        h.agg
            .handle_datagram(h.now, 100 + u32::from(r), &join_window(5, r, 2, 8));
    }
    h.token = grants(&h.drain())[0].1.token;
    let hd = |h: &Harness, rank: u16, seq: u64| DataHeader {
        slot: (seq % 8) as u32,
        version: ((seq / 8) % 2) as u8,
        ..h.header(rank, seq, 4)
    };
    let (a, b) = (hd(&h, 0, 0), hd(&h, 1, 0));
    h.contribute_as(100, &a, &[1.0; 4]);
    h.contribute_as(101, &b, &[1.0; 4]);
    let out = h.drain();
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out
        .iter()
        .all(|(_, m)| matches!(m, Message::Result(hd, _) if hd.flags & FLAG_REGRANT == 0)));
    // Job 6 comes: job 5 is to shrink.
    for r in 0..2 {
        h.agg
            .handle_datagram(h.now, 200 + u32::from(r), &join_window(6, r, 2, 8));
    }
    assert!(h.drain().is_empty());
    // Rank 1 lost its result of chunk 0 and retransmits: the copy says what rank 0 heard.
    h.contribute_as(101, &b, &[1.0; 4]);
    let out = h.drain();
    assert!(
        matches!(&out[..], [(101, Message::Result(hd, _))] if hd.flags & FLAG_REGRANT == 0),
        "{out:?}"
    );
    // The next chunk completes flagged, for both.
    let (a, b) = (hd(&h, 0, 1), hd(&h, 1, 1));
    h.contribute_as(100, &a, &[1.0; 4]);
    h.contribute_as(101, &b, &[1.0; 4]);
    let out = h.drain();
    assert_eq!(out.len(), 2);
    assert!(out
        .iter()
        .all(|(_, m)| matches!(m, Message::Result(hd, _) if hd.flags & FLAG_REGRANT != 0)));
}

/// An aggregator offering `count` groups at addresses 1000 + number, with job `job`
/// of two f32 ranks (addresses 10 * job + rank) joined, each asking for groups or
/// not; returns the grants.
fn groups_harness(
    agg: &mut Aggregator<u32>,
    now: Instant,
    job: u32,
    ask: [bool; 2],
) -> Vec<(u32, Grant)> {
    for (r, a) in ask.into_iter().enumerate() {
        let j = join_with_groups(job, r as u16, 2, CodecId::F32, b"k", a);
        agg.handle_datagram(now, 10 * job + r as u32, &j);
    }
    let mut buf = Vec::new();
    let mut grants = Vec::new();
    while let Some(to) = agg.poll_transmit(&mut buf) {
        match wire::decode(&buf) {
            Ok(Message::Grant(g)) => grants.push((to, g)),
            m => panic!("expected grants, got {m:?}"),
        }
    }
    grants
}

/// Both ranks of [`groups_harness`]'s job `job` contribute `[1, 2]` to its packet 0.
fn contribute_both(agg: &mut Aggregator<u32>, now: Instant, job: u32, token: u64) {
    for r in 0..2u16 {
        let h = f32_header(job, r, token, 0, 2);
        agg.handle_datagram(now, 10 * job + u32::from(r), &contribution(&h, &[1.0, 2.0]));
    }
}

/// Both ranks of [`groups_harness`]'s job `job` leave; the job is gone after.
fn end_job(agg: &mut Aggregator<u32>, now: Instant, job: u32, token: u64) {
    let mut buf = Vec::new();
    for rank in 0..2u16 {
        buf.clear();
        wire::encode_leave(&Control { job, rank, token }, &mut buf);
        agg.handle_datagram(now, 10 * job + u32::from(rank), &buf);
    }
    while agg.poll_transmit(&mut buf).is_some() {}
    assert!(!agg.jobs().contains(&job));
}

#[test]
fn results_go_once_to_the_group_when_every_rank_asked() {
    let now = Instant::now();
    let mut agg = Aggregator::new(AggregatorConfig::default());
    agg.offer_groups(4, |g| 1000 + g);
    let grants = groups_harness(&mut agg, now, 5, [true, true]);
    assert_eq!(grants.len(), 2);
    assert!(grants.iter().all(|(_, g)| g.group == Some(0)), "{grants:?}");
    assert_eq!(agg.job_group(5), Some(0));
    let token = grants[0].1.token;
    contribute_both(&mut agg, now, 5, token);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while let Some(to) = agg.poll_transmit(&mut buf) {
        let Ok(Message::Result(h, p)) = wire::decode(&buf) else {
            panic!("expected a result");
        };
        assert_eq!(h.flags & FLAG_FROM_COPY, 0);
        out.push((to, values(p)));
    }
    assert_eq!(
        out,
        vec![(1000, vec![2.0, 4.0])],
        "one datagram, to the group"
    );
    assert_eq!(agg.stats().packets_sent, 3, "two grants and one result");
    // A rank that missed it asks again: answered to its own address, from the copy.
    let h = f32_header(5, 1, token, 0, 2);
    agg.handle_datagram(now, 51, &contribution(&h, &[1.0, 2.0]));
    let to = agg.poll_transmit(&mut buf);
    assert_eq!(to, Some(51));
    let Ok(Message::Result(h, p)) = wire::decode(&buf) else {
        panic!("expected a result");
    };
    assert_ne!(h.flags & FLAG_FROM_COPY, 0);
    assert_eq!(values(p), vec![2.0, 4.0]);
}

#[test]
fn a_job_gets_no_group_unless_offered_and_asked_by_every_rank() {
    let now = Instant::now();
    // Not offered: ranks that ask get none.
    let mut agg = Aggregator::new(AggregatorConfig::default());
    let grants = groups_harness(&mut agg, now, 5, [true, true]);
    assert_eq!(grants.len(), 2, "{grants:?}");
    assert!(grants.iter().all(|(_, g)| g.group.is_none()), "{grants:?}");
    // Offered, but one rank did not ask: every rank gets its own results.
    let mut agg = Aggregator::new(AggregatorConfig::default());
    agg.offer_groups(4, |g| 1000 + g);
    let grants = groups_harness(&mut agg, now, 5, [true, false]);
    assert_eq!(grants.len(), 2, "{grants:?}");
    assert!(grants.iter().all(|(_, g)| g.group.is_none()), "{grants:?}");
    let token = grants[0].1.token;
    contribute_both(&mut agg, now, 5, token);
    let mut buf = Vec::new();
    let mut to = Vec::new();
    while let Some(a) = agg.poll_transmit(&mut buf) {
        to.push(a);
    }
    assert_eq!(to, vec![50, 51]);
}

#[test]
fn jobs_hold_distinct_groups_and_free_them_when_they_end() {
    let now = Instant::now();
    let mut agg = Aggregator::new(AggregatorConfig::default());
    agg.offer_groups(2, |g| 1000 + g);
    let first = groups_harness(&mut agg, now, 5, [true, true]);
    let second = groups_harness(&mut agg, now, 6, [true, true]);
    assert_eq!(first[0].1.group, Some(0));
    assert_eq!(second[0].1.group, Some(1));
    // Every number is held: the third job's results go to each rank.
    let third = groups_harness(&mut agg, now, 7, [true, true]);
    assert_eq!(third[0].1.group, None);
    // Job 5 ends: its number is free for the next job.
    end_job(&mut agg, now, 5, first[0].1.token);
    let fourth = groups_harness(&mut agg, now, 8, [true, true]);
    assert_eq!(fourth[0].1.group, Some(0));
}

#[test]
fn an_ended_jobs_group_comes_back_only_after_the_others() {
    let now = Instant::now();
    let mut agg = Aggregator::new(AggregatorConfig::default());
    agg.offer_groups(3, |g| 1000 + g);
    let mut got = Vec::new();
    // One job at a time, each ending before the next starts.
    for job in 5..10u32 {
        let grants = groups_harness(&mut agg, now, job, [true, true]);
        got.push(grants[0].1.group);
        end_job(&mut agg, now, job, grants[0].1.token);
    }
    assert_eq!(got, [0, 1, 2, 0, 1].map(Some));
}

/// Issue 25, finding 1: a member's packet two generations or more beyond the oldest
/// open chunk (`next + 2S`), whatever its value, is dropped as `ahead` and changes
/// nothing: the honest chunks of that slot version still complete.
#[test]
fn far_ahead_sequence_numbers_from_a_member_are_dropped_as_ahead() {
    let mut h = Harness::new(2);
    // Packets 0 and 1 complete, so the oldest open chunk is 2, and 2 + 2S = 6.
    for seq in 0..2 {
        for r in 0..2 {
            h.contribute(r, seq, &[1.0; 4]);
        }
    }
    h.drain();
    let before = h.agg.stats().contributions;
    for seq in [6, 7, 1 << 40, u64::MAX - 1, u64::MAX] {
        h.contribute(1, seq, &[9.0; 4]);
        let probe = DataHeader {
            flags: wire::FLAG_PROBE,
            ..h.header(1, seq, 4)
        };
        h.contribute_as(101, &probe, &[]);
    }
    assert_eq!(h.agg.stats().dropped(DropReason::Ahead), 10);
    assert_eq!(h.agg.stats().contributions, before);
    assert!(h.drain().is_empty(), "nothing answers a far-ahead packet");
    // The honest packets of those slot versions complete: 2 to 5, the last S below
    // the limit, and then 6, once 2 has completed.
    for seq in 2..7 {
        for r in 0..2 {
            h.contribute(r, seq, &[1.0; 4]);
        }
        let results = h
            .drain()
            .into_iter()
            .filter(|(_, m)| matches!(m, Message::Result(r, _) if r.seq == seq))
            .count();
        assert_eq!(results, 2, "packet {seq} completes for both ranks");
    }
    assert_eq!(h.agg.jobs(), vec![5]);
}

/// Issue 25, finding 4: with an admission key, a join that does not prove it creates
/// no job (the id cannot be squatted) and is told why; a proven join is admitted.
#[test]
fn with_an_admission_key_unproven_joins_create_nothing() {
    let key = b"sixteen byte key".to_vec();
    let mut agg = Aggregator::<u32>::new(AggregatorConfig {
        admission_key: Some(key.clone()),
        ..AggregatorConfig::default()
    });
    let now = Instant::now();
    let join = |rank: u16, proven: Option<&[u8]>| {
        let mut j = Join {
            job: 5,
            rank,
            world: 2,
            codec: CodecId::F32,
            chunk_elems: 4,
            window: 2,
            secret: Vec::new(),
            groups: false,
            nonce: 9,
            completed: 0,
            proof: None,
            job_world: None,
        };
        if let Some(k) = proven {
            j.prove(k);
        }
        let mut b = Vec::new();
        wire::encode_join(&j, &mut b);
        b
    };
    agg.handle_datagram(now, 100, &join(0, None));
    agg.handle_datagram(now, 100, &join(0, Some(b"another key here")));
    assert!(agg.jobs().is_empty());
    assert_eq!(agg.stats().dropped(DropReason::NotAdmitted), 2);
    let mut buf = Vec::new();
    while agg.poll_transmit(&mut buf).is_some() {
        let Ok(Message::Error(e)) = wire::decode(&buf) else {
            panic!("expected a refusal")
        };
        assert_eq!((e.code, e.nonce), (ErrorCode::NotAdmitted, 9));
    }
    agg.handle_datagram(now, 100, &join(0, Some(&key)));
    agg.handle_datagram(now, 101, &join(1, Some(&key)));
    assert_eq!(agg.job_slots(5), Some(2));
}

/// Issue 25, finding 4: jobs that never get all their ranks cannot keep out one that
/// can run. One address holds one forming job; when the table is full, the oldest
/// forming job makes room.
#[test]
fn forming_jobs_never_keep_out_a_job_that_can_run() {
    let mut agg = Aggregator::<u32>::new(AggregatorConfig {
        max_jobs: 4,
        ..AggregatorConfig::default()
    });
    let now = Instant::now();
    // One address cycling through job ids holds one forming job at most.
    for job in 10..20 {
        agg.handle_datagram(now, 7, &join_window(job, 0, 2, 2));
    }
    assert_eq!(agg.jobs(), vec![19]);
    // Many addresses fill the table with forming jobs.
    for job in 20..30 {
        agg.handle_datagram(now, 1000 + job, &join_window(job, 0, 2, 2));
    }
    assert_eq!(agg.jobs().len(), 4);
    // A real job still starts, and keeps running while strangers keep joining.
    agg.handle_datagram(now, 100, &join_window(5, 0, 2, 2));
    agg.handle_datagram(now, 101, &join_window(5, 1, 2, 2));
    assert_eq!(agg.job_slots(5), Some(2));
    for job in 30..40 {
        agg.handle_datagram(now, 1000 + job, &join_window(job, 0, 2, 2));
    }
    assert_eq!(agg.job_slots(5), Some(2));
    assert!(agg.stats().pending_evicted >= 16);
    // A table full of jobs that can run refuses.
    for job in 40..43 {
        for r in 0..2 {
            agg.handle_datagram(
                now,
                2000 + 2 * job + u32::from(r),
                &join_window(job, r, 2, 2),
            );
        }
    }
    agg.handle_datagram(now, 3000, &join_window(50, 0, 2, 2));
    assert_eq!(agg.stats().dropped(DropReason::NoCapacity), 1);
}

/// Issue 25, finding 9: ranks that re-join after a failover from different points
/// (one completed an allreduce the others did not) are refused, all of them, with a
/// message naming both counts: never a silent mix of two allreduces.
#[test]
fn ranks_that_rejoin_from_different_points_are_refused() {
    let mut agg = Aggregator::<u32>::new(AggregatorConfig::default());
    let now = Instant::now();
    for (rank, completed) in [(0u16, 6u64), (1, 7)] {
        let j = Join {
            job: 5,
            rank,
            world: 2,
            codec: CodecId::I32,
            chunk_elems: 4,
            window: 2,
            secret: Vec::new(),
            groups: false,
            nonce: u64::from(rank),
            completed,
            proof: None,
            job_world: None,
        };
        let mut b = Vec::new();
        wire::encode_join(&j, &mut b);
        agg.handle_datagram(now, 100 + u32::from(rank), &b);
    }
    assert!(agg.jobs().is_empty());
    let mut buf = Vec::new();
    let mut told = 0;
    while let Some(to) = agg.poll_transmit(&mut buf) {
        let Ok(Message::Error(e)) = wire::decode(&buf) else {
            panic!("expected a refusal")
        };
        assert_eq!(e.code, ErrorCode::Diverged);
        assert_eq!(e.nonce, u64::from(to - 100));
        assert!(e.text.contains("rank 0 had completed 6") && e.text.contains("rank 1 7"));
        told += 1;
    }
    assert_eq!(told, 2);
}
