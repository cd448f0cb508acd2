//! The worker alone: its failure paths, every one ending in an error, never a wait;
//! and the datagrams it sends.

use std::time::Duration;

use crate::aggregator::AggregatorConfig;
use crate::codec::CodecId;
use crate::sim::{Sim, SimConfig, SimError};
use crate::wire::ErrorCode;
use crate::worker::{ConfigError, DropReason, Tail, Worker, WorkerConfig, WorkerError};

fn configs(world: u16) -> Vec<WorkerConfig> {
    (0..world)
        .map(|r| WorkerConfig::new(1, r, world, CodecId::I32))
        .collect()
}

#[test]
fn bad_configurations_are_refused() {
    let now = std::time::Instant::now();
    let mut c = WorkerConfig::new(1, 2, 2, CodecId::F32);
    assert!(matches!(
        Worker::new(c.clone(), now),
        Err(ConfigError::Rank { .. })
    ));
    c.rank = 0;
    c.codec = CodecId(77);
    assert_eq!(
        Worker::new(c.clone(), now).err(),
        Some(ConfigError::Codec(CodecId(77)))
    );
    c.codec = CodecId::F32;
    c.secret = vec![0; 65];
    assert_eq!(Worker::new(c.clone(), now).err(), Some(ConfigError::Secret));
    c.secret.clear();
    c.chunk_elems = 0;
    assert_eq!(Worker::new(c, now).err(), Some(ConfigError::Size));
}

#[test]
fn a_missing_rank_makes_the_others_time_out_joining() {
    let mut cfgs = configs(3);
    for c in &mut cfgs {
        c.join_timeout = Duration::from_secs(2);
    }
    cfgs.pop();
    // Two of three ranks exist: the job never starts.
    let mut cfgs2 = cfgs.clone();
    for c in &mut cfgs2 {
        c.world = 3;
    }
    let mut sim = Sim::new(SimConfig::lossless(1), AggregatorConfig::default(), cfgs2);
    match sim.join() {
        Err(SimError::Worker {
            error: WorkerError::JoinTimeout(t),
            ..
        }) => {
            assert_eq!(t, Duration::from_secs(2))
        }
        r => panic!("expected a join timeout, got {r:?}"),
    }
    assert!(sim.elapsed() <= Duration::from_secs(3));
}

#[test]
fn a_wrong_secret_is_refused() {
    let mut cfgs = configs(2);
    cfgs[0].secret = b"right".to_vec();
    cfgs[1].secret = b"wrong".to_vec();
    let mut sim = Sim::new(SimConfig::lossless(1), AggregatorConfig::default(), cfgs);
    match sim.join() {
        Err(SimError::Worker {
            index: 1,
            error: WorkerError::Refused { code, .. },
        }) => {
            assert_eq!(code, ErrorCode::BadSecret)
        }
        r => panic!("expected a refusal, got {r:?}"),
    }
}

#[test]
fn a_rank_that_goes_silent_mid_allreduce_aborts_the_others() {
    let mut sim = Sim::new(SimConfig::lossy(4), AggregatorConfig::default(), configs(3));
    sim.join().expect("join");
    let data = vec![1.0f32; 5000];
    // Ranks 0 and 1 start; rank 2 crashed.
    sim.kill_worker(2);
    let res = sim.allreduce_some(vec![Some(data.clone()), Some(data), None]);
    match res {
        Err(SimError::Worker {
            error: WorkerError::Aborted { code, rank, .. },
            ..
        }) => {
            assert_eq!(code, ErrorCode::PeerSilent);
            assert_eq!(rank, Some(2));
        }
        r => panic!("expected an abort, got {r:?}"),
    }
    assert!(
        sim.elapsed() < Duration::from_secs(5),
        "{:?}",
        sim.elapsed()
    );
}

#[test]
fn a_rank_that_leaves_mid_job_aborts_the_others() {
    let mut sim = Sim::new(
        SimConfig::lossless(4),
        AggregatorConfig::default(),
        configs(2),
    );
    sim.allreduce(vec![vec![1.0; 10], vec![2.0; 10]])
        .expect("first allreduce");
    sim.worker_mut(1).close();
    let res = sim.allreduce_some(vec![Some(vec![1.0; 10]), None]);
    match res {
        Err(SimError::Worker {
            index: 0,
            error: WorkerError::Aborted { code, rank, .. },
        }) => {
            assert_eq!((code, rank), (ErrorCode::PeerLeft, Some(1)));
        }
        r => panic!("expected an abort, got {r:?}"),
    }
}

#[test]
fn a_dead_aggregator_is_noticed() {
    let mut cfgs = configs(2);
    for c in &mut cfgs {
        c.aggregator_timeout = Duration::from_secs(2);
    }
    let mut cfg = SimConfig::lossless(1);
    cfg.loss = 0.0;
    let mut sim = Sim::new(cfg, AggregatorConfig::default(), cfgs);
    sim.join().expect("join");
    sim.kill_aggregator();
    match sim.allreduce(vec![vec![1.0; 10], vec![2.0; 10]]) {
        Err(SimError::Worker {
            error: WorkerError::AggregatorSilent(_),
            ..
        }) => {}
        r => panic!("expected a silent aggregator, got {r:?}"),
    }
    assert!(
        sim.elapsed() < Duration::from_secs(3),
        "{:?}",
        sim.elapsed()
    );
}

#[test]
fn a_peer_that_never_calls_allreduce_is_a_stall_not_a_hang() {
    let mut cfgs = configs(2);
    for c in &mut cfgs {
        c.progress_timeout = Duration::from_secs(4);
    }
    let mut sim = Sim::new(SimConfig::lossless(1), AggregatorConfig::default(), cfgs);
    match sim.allreduce_some(vec![Some(vec![1.0; 1000]), None]) {
        Err(SimError::Worker {
            index: 0,
            error: WorkerError::Stalled(t),
        }) => {
            assert_eq!(t, Duration::from_secs(4))
        }
        r => panic!("expected a stall, got {r:?}"),
    }
    assert!(
        sim.elapsed() < Duration::from_secs(5),
        "{:?}",
        sim.elapsed()
    );
}

#[test]
fn a_grant_beyond_what_the_rank_asked_for_is_ignored() {
    use crate::wire::{self, Grant};
    let now = std::time::Instant::now();
    let mut cfg = WorkerConfig::new(1, 0, 2, CodecId::I32);
    cfg.window = 16;
    let mut w = Worker::new(cfg, now).expect("worker");
    let honest = Grant {
        job: 1,
        rank: 0,
        world: 2,
        codec: CodecId::I32,
        chunk_elems: 256,
        window: 16,
        token: 42,
        nonce: 0,
        shard: 0,
        shards: 1,
        group: None,
    };
    let forged = [
        // A window of u32::MAX would have sized the rank's ring by it.
        Grant {
            window: u32::MAX,
            ..honest
        },
        Grant {
            window: 17,
            ..honest
        },
        Grant {
            window: 0,
            ..honest
        },
        Grant {
            chunk_elems: 512,
            ..honest
        },
        // A result group this rank did not ask for.
        Grant {
            group: Some(3),
            ..honest
        },
    ];
    for g in forged {
        let mut b = Vec::new();
        wire::encode_grant(&g, &mut b);
        w.handle_datagram(now, &b, &mut []);
        assert!(w.grant().is_none(), "took {g:?}");
    }
    // A smaller window than asked is what a shared aggregator grants.
    let mut b = Vec::new();
    wire::encode_grant(
        &Grant {
            window: 4,
            ..honest
        },
        &mut b,
    );
    w.handle_datagram(now, &b, &mut []);
    assert_eq!(w.grant().map(|g| g.window), Some(4));
}

#[test]
fn a_rank_that_asks_for_groups_says_so_and_takes_its_group() {
    use crate::wire::{self, Grant};
    let now = std::time::Instant::now();
    let mut cfg = WorkerConfig::new(1, 0, 2, CodecId::I32);
    cfg.groups = true;
    let mut w = Worker::new(cfg.clone(), now).expect("worker");
    let mut b = Vec::new();
    w.poll_transmit(now, &[], &mut b);
    let Ok(wire::Message::Join(j)) = wire::decode(&b) else {
        panic!("expected a join");
    };
    assert!(j.groups, "the join asks for groups");
    let grant = Grant {
        job: 1,
        rank: 0,
        world: 2,
        codec: CodecId::I32,
        chunk_elems: cfg.chunk_elems,
        window: cfg.window,
        token: 42,
        nonce: 0,
        shard: 0,
        shards: 1,
        group: Some(7),
    };
    b.clear();
    wire::encode_grant(&grant, &mut b);
    w.handle_datagram(now, &b, &mut []);
    assert_eq!(w.grant().and_then(|g| g.group), Some(7));
}

#[test]
fn a_leave_is_resent_until_echoed_and_given_up_after_three_tries() {
    use crate::wire::{self, Grant, Message};
    let t0 = std::time::Instant::now();
    let grant = Grant {
        job: 1,
        rank: 0,
        world: 2,
        codec: CodecId::I32,
        chunk_elems: 256,
        window: 8,
        token: 42,
        nonce: 0,
        shard: 0,
        shards: 1,
        group: None,
    };
    let joined = |now| {
        let mut w = Worker::new(WorkerConfig::new(1, 0, 2, CodecId::I32), now).expect("worker");
        let mut b = Vec::new();
        wire::encode_grant(&grant, &mut b);
        w.handle_datagram(now, &b, &mut []);
        w
    };
    let leaves = |w: &mut Worker, now| {
        let mut n = 0;
        let mut buf = Vec::new();
        while w.poll_transmit(now, &[], &mut buf) {
            if matches!(wire::decode(&buf), Ok(Message::Leave(_))) {
                n += 1;
            }
        }
        n
    };
    // Echoed after the second try: closed, nothing more sent.
    let mut w = joined(t0);
    w.close();
    assert_eq!(leaves(&mut w, t0), 1);
    let t1 = t0 + Duration::from_millis(100);
    w.handle_timeout(t1);
    assert_eq!(leaves(&mut w, t1), 1, "no echo: the leave goes again");
    let mut echo = Vec::new();
    wire::encode_leave(
        &wire::Control {
            job: 1,
            rank: 0,
            token: 42,
        },
        &mut echo,
    );
    w.handle_datagram(t1, &echo, &mut []);
    assert!(w.is_finished());
    // Never echoed: three tries, then closed all the same.
    let mut w = joined(t0);
    w.close();
    let mut sent = 0;
    for i in 0..10u64 {
        let t = t0 + Duration::from_millis(100 * i);
        w.handle_timeout(t);
        sent += leaves(&mut w, t);
    }
    assert_eq!(sent, 3);
    assert!(w.is_finished());
}

#[test]
fn non_finite_input_to_a_block_scaled_codec_fails_the_allreduce_on_every_rank_and_the_job_goes_on()
{
    for (seed, bad) in [(3, f32::NAN), (4, f32::INFINITY), (5, f32::NEG_INFINITY)] {
        let mut sim = Sim::new(
            SimConfig::lossy(seed),
            AggregatorConfig::default(),
            configs(3),
        );
        let mut inputs = vec![vec![1.0f32; 5000]; 3];
        inputs[1][4321] = bad;
        match sim.allreduce(inputs) {
            Err(SimError::Worker {
                error: WorkerError::NonFinite(_),
                ..
            }) => {}
            other => panic!("{bad}: {other:?}"),
        }
        // Every rank saw the flagged chunk, not only the one whose input it was.
        for i in 0..3 {
            let st = sim.last_stats(i).expect("finished");
            assert!(st.nonfinite_chunks > 0, "{bad}: rank {i} {st:?}");
        }
        // The job goes on: the next allreduce is exact.
        let out = sim
            .allreduce(vec![vec![1.0; 5000], vec![2.0; 5000], vec![3.0; 5000]])
            .expect("allreduce after the error");
        assert!(out.iter().all(|o| o.iter().all(|x| *x == 6.0)), "{bad}");
        assert!((0..3).all(|i| sim.last_stats(i).is_some_and(|s| s.nonfinite_chunks == 0)));
    }
}

/// A rank that reduces an empty tensor while another reduces one with data fails as
/// any length mismatch does, at once; when every rank's tensor is empty the result
/// is empty and the job goes on. Before, the empty allreduce sent nothing and ended
/// at once, so its rank's next tensor met the other rank's current one.
#[test]
fn an_empty_tensor_against_one_with_data_is_a_length_mismatch() {
    for codec in [CodecId::F32, CodecId::F16, CodecId::I8] {
        let cfgs = (0..2).map(|r| WorkerConfig::new(1, r, 2, codec)).collect();
        let mut sim = Sim::new(SimConfig::lossy(9), AggregatorConfig::default(), cfgs);
        let out = sim
            .allreduce(vec![Vec::new(), Vec::new()])
            .expect("every rank empty");
        assert!(out.iter().all(Vec::is_empty), "{codec:?}");
        let out = sim
            .allreduce(vec![vec![1.0; 100], vec![2.0; 100]])
            .expect("the job goes on");
        assert!(out.iter().all(|o| o.iter().all(|x| *x == 3.0)), "{codec:?}");
        match sim.allreduce(vec![Vec::new(), vec![1.0; 100]]) {
            Err(SimError::Worker {
                error:
                    WorkerError::Aborted {
                        code: ErrorCode::Inconsistent,
                        ..
                    },
                ..
            }) => {}
            other => panic!("{codec:?}: {other:?}"),
        }
    }
}

#[test]
fn an_f32_payload_can_stay_in_the_tensor_and_other_codecs_are_encoded() {
    let t0 = std::time::Instant::now();
    let data: Vec<f32> = (0..10).map(|i| i as f32 * 1.5 - 4.0).collect();
    // Two workers in the same state; one sends whole datagrams, one heads and tails.
    let started = |codec| {
        let grant = crate::wire::Grant {
            job: 1,
            rank: 0,
            world: 2,
            codec,
            chunk_elems: 4,
            window: 8,
            token: 42,
            nonce: 0,
            shard: 0,
            shards: 1,
            group: None,
        };
        let mut cfg = WorkerConfig::new(1, 0, 2, codec);
        cfg.chunk_elems = 4;
        let mut w = Worker::new(cfg, t0).expect("worker");
        let mut b = Vec::new();
        crate::wire::encode_grant(&grant, &mut b);
        w.handle_datagram(t0, &b, &mut []);
        let mut d = data.clone();
        w.start_allreduce(t0, &mut d, None).expect("start");
        w
    };
    for codec in [CodecId::F32, CodecId::I32, CodecId::F16] {
        let (mut whole, mut parts) = (started(codec), started(codec));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let (mut n, mut encoded) = (0, 0);
        while whole.poll_transmit(t0, &data, &mut a) {
            b.clear();
            let tail = parts
                .poll_transmit_head(t0, &data, &mut b)
                .expect("the same datagrams");
            match tail {
                Tail::Data(r) => {
                    assert_eq!(codec, CodecId::F32, "only f32 is sent from the tensor");
                    assert_eq!(b.len(), crate::wire::DATA_HEADER_LEN);
                    b.extend(data[r].iter().flat_map(|x| x.to_le_bytes()));
                    n += 1;
                }
                Tail::Encoded(r) => {
                    assert_ne!(codec, CodecId::F32, "f32 is sent from the tensor");
                    assert_eq!(b.len(), crate::wire::DATA_HEADER_LEN);
                    b.extend_from_slice(parts.payload(r));
                    encoded += 1;
                }
                Tail::InBuf => {}
            }
            assert_eq!(a, b, "{codec:?}");
        }
        assert!(parts.poll_transmit_head(t0, &data, &mut b).is_none());
        if codec == CodecId::F32 {
            assert_eq!(n, 3, "every chunk of 10 elements in chunks of 4");
        } else {
            assert_eq!(
                encoded, 3,
                "every chunk's payload left in the worker's payloads"
            );
        }
    }
}

#[test]
fn an_i8_result_is_refused_where_any_blocks_exponent_is_below_the_ranks_own() {
    use crate::wire::{self, Message};
    let t0 = std::time::Instant::now();
    let chunk = 2 * crate::codec::EXPONENT_BLOCK;
    let grant = wire::Grant {
        job: 1,
        rank: 0,
        world: 1,
        codec: CodecId::I8,
        chunk_elems: chunk as u16,
        window: 4,
        token: 42,
        nonce: 0,
        shard: 0,
        shards: 1,
        group: None,
    };
    let mut cfg = WorkerConfig::new(1, 0, 1, CodecId::I8);
    cfg.chunk_elems = chunk as u16;
    cfg.window = 4;
    let mut w = Worker::new(cfg, t0).expect("worker");
    let mut b = Vec::new();
    wire::encode_grant(&grant, &mut b);
    w.handle_datagram(t0, &b, &mut []);
    // One chunk of two blocks, the second 2^-10 of the first.
    let input: Vec<f32> = (0..chunk)
        .map(|i| {
            let x = ((i * 37) % 101) as f32 / 101.0 - 0.5;
            if i < chunk / 2 {
                x
            } else {
                x / 1024.0
            }
        })
        .collect();
    let mut d = input.clone();
    w.start_allreduce(t0, &mut d, None).expect("start");
    assert!(matches!(
        w.poll_event(),
        Some(crate::worker::Event::Joined(_))
    ));
    let mut out = Vec::new();
    assert!(w.poll_transmit(t0, &d, &mut out));
    let Ok(Message::Contribution(h, payload)) = wire::decode(&out) else {
        panic!("not a contribution");
    };
    assert_eq!(
        payload.len(),
        chunk + 1,
        "the second block's exponent follows"
    );
    let own = payload[chunk] as i8;
    assert!(
        own < h.scale_exp,
        "the second block has its own, smaller exponent"
    );
    // With one rank the honest result is the contribution itself. The same with the
    // second block's exponent one below this rank's own is refused, and so is one
    // without that exponent: the tensor stays as it was and the allreduce goes on.
    let mut low = payload.to_vec();
    low[chunk] = (own - 1) as u8;
    for forged in [&low[..], &payload[..chunk]] {
        let mut r = Vec::new();
        wire::encode_result(&h, forged, &mut r);
        w.handle_datagram(t0, &r, &mut d);
        assert_eq!(d, input, "a forged result was decoded");
        assert!(
            w.poll_event().is_none(),
            "a forged result ended the allreduce"
        );
    }
    let mut r = Vec::new();
    wire::encode_result(&h, payload, &mut r);
    w.handle_datagram(t0, &r, &mut d);
    assert!(matches!(
        w.poll_event(),
        Some(crate::worker::Event::AllreduceDone { .. })
    ));
    for (i, (x, y)) in d.iter().zip(&input).enumerate() {
        let step = if i < chunk / 2 {
            2f32.powi(-7)
        } else {
            2f32.powi(-17)
        };
        assert!((x - y).abs() <= step, "element {i}: {x} against {y}");
    }
}

/// Issue 25, finding 2: a grant or an error without this session's join nonce changes
/// nothing (a datagram forged from the aggregator's address cannot fail or re-key the
/// rank), and is counted; with it, an error fails the rank.
#[test]
fn grants_and_errors_without_the_join_nonce_are_dropped_and_counted() {
    use crate::wire::{self, ErrorCode, ErrorMsg, Grant, Message};
    let now = std::time::Instant::now();
    let mut cfg = WorkerConfig::new(1, 0, 2, CodecId::I32);
    cfg.nonce = 0x5eed;
    let mut w = Worker::new(cfg.clone(), now).expect("worker");
    let mut b = Vec::new();
    w.poll_transmit(now, &[], &mut b);
    let Ok(Message::Join(j)) = wire::decode(&b) else {
        panic!("expected a join")
    };
    assert_eq!(j.nonce, 0x5eed);
    let grant = Grant {
        job: 1,
        rank: 0,
        world: 2,
        codec: CodecId::I32,
        chunk_elems: cfg.chunk_elems,
        window: cfg.window,
        token: 42,
        nonce: 0x5eee,
        shard: 0,
        shards: 1,
        group: None,
    };
    let error = |nonce| ErrorMsg {
        job: 1,
        rank: 1,
        code: ErrorCode::PeerSilent,
        nonce,
        text: "forged".into(),
    };
    for m in [
        Message::Grant(grant),
        Message::Error(error(0)),
        Message::Error(error(7)),
    ] {
        b.clear();
        m.encode(&mut b);
        w.handle_datagram(now, &b, &mut []);
    }
    assert!(w.grant().is_none() && w.error().is_none());
    assert_eq!(w.dropped().get(DropReason::BadNonce), 3);
    b.clear();
    wire::encode_grant(
        &Grant {
            nonce: 0x5eed,
            ..grant
        },
        &mut b,
    );
    w.handle_datagram(now, &b, &mut []);
    assert_eq!(w.grant().map(|g| g.token), Some(42));
    b.clear();
    wire::encode_error(&error(0x5eee), &mut b);
    w.handle_datagram(now, &b, &mut []);
    assert!(w.error().is_none(), "a forged abort of a joined rank");
    b.clear();
    wire::encode_error(&error(0x5eed), &mut b);
    w.handle_datagram(now, &b, &mut []);
    assert!(matches!(w.error(), Some(WorkerError::Aborted { .. })));
    assert_eq!(w.dropped().get(DropReason::BadNonce), 4);
    assert_eq!(w.dropped().total(), 4);
}

/// A datagram sent twice is counted as lost only when its result says a
/// retransmission made it (`RETX` or `FROM_COPY`): a result summed from every rank's
/// first transmission means the first one arrived, and the timer fired only because
/// it waited in a queue. Counting it would halve the window for a loss that never
/// happened.
#[test]
fn only_a_result_made_from_a_retransmission_counts_a_loss() {
    use crate::wire::{self, Message, FLAG_FROM_COPY, FLAG_RETX};
    let (chunk, window) = (256usize, 64u32);
    let run = |result_flags: u8| {
        let t0 = std::time::Instant::now();
        let grant = wire::Grant {
            job: 1,
            rank: 0,
            world: 1,
            codec: CodecId::I32,
            chunk_elems: chunk as u16,
            window,
            token: 42,
            nonce: 0,
            shard: 0,
            shards: 1,
            group: None,
        };
        let mut cfg = WorkerConfig::new(1, 0, 1, CodecId::I32);
        cfg.chunk_elems = chunk as u16;
        cfg.window = window;
        let mut w = Worker::new(cfg, t0).expect("worker");
        let mut b = Vec::new();
        wire::encode_grant(&grant, &mut b);
        w.handle_datagram(t0, &b, &mut []);
        let mut d: Vec<f32> = (0..chunk * window as usize).map(|i| i as f32).collect();
        w.start_allreduce(t0, &mut d, None).expect("start");
        let sent = |w: &mut Worker, now, d: &[f32]| {
            let mut firsts = Vec::new();
            let mut out = Vec::new();
            while w.poll_transmit(now, d, &mut out) {
                if let Ok(Message::Contribution(h, p)) = wire::decode(&out) {
                    firsts.push((h, p.to_vec()));
                }
                out.clear();
            }
            firsts
        };
        let firsts = sent(&mut w, t0, &d);
        assert_eq!(firsts.len(), window as usize, "the whole window goes out");
        assert!(firsts.iter().all(|(h, _)| h.flags & FLAG_RETX == 0));
        // No result within the first timeout: every datagram goes again.
        let t1 = t0 + Duration::from_millis(150);
        w.handle_timeout(t1);
        let again = sent(&mut w, t1, &d);
        assert_eq!(again.len(), window as usize, "every datagram went again");
        assert!(again.iter().all(|(h, _)| h.flags & FLAG_RETX != 0));
        // The results come, with one rank the sums of the first transmissions; then
        // those of the datagrams the window had no room for (sent once).
        let answer =
            |w: &mut Worker, d: &mut [f32], sent: &[(wire::DataHeader, Vec<u8>)], flags| {
                for (h, payload) in sent {
                    let mut r = Vec::new();
                    let h = wire::DataHeader {
                        flags: h.flags | flags,
                        ..*h
                    };
                    wire::encode_result(&h, payload, &mut r);
                    w.handle_datagram(t1, &r, d);
                }
            };
        answer(&mut w, &mut d, &firsts, result_flags);
        for _ in 0..4 {
            let rest = sent(&mut w, t1, &d);
            answer(&mut w, &mut d, &rest, 0);
        }
        let events: Vec<_> = std::iter::from_fn(|| w.poll_event()).collect();
        assert!(
            matches!(
                events.last(),
                Some(crate::worker::Event::AllreduceDone { .. })
            ),
            "{events:?} {:?}",
            w.dropped()
        );
        w.congestion_window()
    };
    assert_eq!(run(0), u64::from(window), "no loss happened");
    assert!(
        run(FLAG_RETX) < u64::from(window),
        "a retransmission was needed"
    );
    assert!(run(FLAG_FROM_COPY) < u64::from(window), "a result was lost");
}

#[test]
fn only_rank_0_runs_the_dip_rule() {
    // One rank's dip holds the whole job's packets back, so the others' dips would
    // only hold it back more often: the job dips when rank 0 does.
    let t0 = std::time::Instant::now();
    let ms = Duration::from_millis(1);
    for mut config in configs(4) {
        config.dip_interval = Some(Duration::from_secs(10));
        let mut cwnd = super::congestion_window(&config, 64);
        // 25 s of results at a steady RTT: the smallest RTT stands for two
        // intervals.
        for t in 0..25_000u32 {
            let next = u64::from(t) + cwnd.window();
            cwnd.on_result(u64::from(t), false, Some(5 * ms), next, t0 + ms * t);
        }
        if config.rank == 0 {
            assert_eq!(cwnd.dips(), 2, "rank 0 dips every interval");
        } else {
            assert_eq!(cwnd.dips(), 0, "rank {} never dips", config.rank);
        }
    }
}
