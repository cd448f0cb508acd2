//! Golden bytes pin the format; exhaustive corruption and proptest show that decoding
//! never panics.

use super::*;
use proptest::prelude::*;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn header() -> DataHeader {
    DataHeader {
        job: 0x0102_0304,
        rank: 3,
        codec: CodecId::I32,
        flags: FLAG_MARK,
        token: 0x1122_3344_5566_7788,
        seq: 0x0000_0001_0000_0002,
        slot: 2,
        version: 1,
        scale_exp: -7,
        next_exp: 5,
        count: 2,
    }
}

/// One of every message, with the bytes each must encode to.
fn golden() -> Vec<(Message<'static>, &'static str)> {
    static PAYLOAD: [u8; 8] = [1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
    let join = Join {
        job: 7,
        rank: 1,
        world: 4,
        codec: CodecId::F32,
        chunk_elems: 256,
        window: 128,
        secret: b"s3".to_vec(),
        groups: false,
        nonce: 0x0807_0605_0403_0201,
        completed: 3,
        proof: None,
        job_world: None,
    };
    let grant = Grant {
        job: 7,
        rank: 1,
        world: 4,
        codec: CodecId::I32,
        chunk_elems: 256,
        window: 64,
        token: 0xdead_beef,
        nonce: 0x0807_0605_0403_0201,
        shard: 1,
        shards: 2,
        group: None,
    };
    vec![
        (
            Message::Join(join.clone()),
            "49410501 07000000 0100 0400 01 00 0001 80000000 0102030405060708 0300000000000000 02 7333",
        ),
        (
            Message::Join(Join {
                groups: true,
                ..join
            }),
            "49410501 07000000 0100 0400 01 01 0001 80000000 0102030405060708 0300000000000000 02 7333",
        ),
        (
            Message::Grant(grant),
            "49410502 07000000 0100 0400 02 00 0001 40000000 efbeadde00000000 0102030405060708 0100 0200",
        ),
        (
            Message::Grant(Grant {
                group: Some(0x0102),
                ..grant
            }),
            "49410502 07000000 0100 0400 02 01 0001 40000000 efbeadde00000000 0102030405060708 0100 0200 02010000",
        ),
        (
            Message::Contribution(header(), &PAYLOAD),
            "49410503 04030201 0300 02 01 8877665544332211 0200000001000000 02000000 \
             01 f9 05 00 0200 0000 01000000ffffffff",
        ),
        (
            Message::Result(header(), &PAYLOAD),
            "49410504 04030201 0300 02 01 8877665544332211 0200000001000000 02000000 \
             01 f9 05 00 0200 0000 01000000ffffffff",
        ),
        (
            Message::Leave(Control {
                job: 9,
                rank: 2,
                token: 5,
            }),
            "49410505 09000000 0200 0500000000000000",
        ),
        (
            Message::Heartbeat(Control {
                job: 9,
                rank: 2,
                token: 5,
            }),
            "49410506 09000000 0200 0500000000000000",
        ),
        (
            Message::Error(ErrorMsg {
                job: 9,
                rank: 1,
                code: ErrorCode::PeerSilent,
                nonce: 0x11,
                text: "gone".into(),
            }),
            "49410507 09000000 0100 06 1100000000000000 0400 676f6e65",
        ),
        (
            Message::Regrant(Control {
                job: 9,
                rank: 2,
                token: 5,
            }),
            "49410508 09000000 0200 0500000000000000",
        ),
    ]
}

#[test]
fn golden_bytes() {
    for (msg, want) in golden() {
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        let want: String = want.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        assert_eq!(hex(&buf), want, "{msg:?}");
        assert_eq!(decode(&buf).as_ref(), Ok(&msg));
    }
}

#[test]
fn data_header_is_forty_bytes() {
    let mut buf = Vec::new();
    encode_contribution(&header(), &[], &mut Vec::new());
    let h = DataHeader {
        count: 0,
        ..header()
    };
    encode_contribution(&h, &[], &mut buf);
    assert_eq!(buf.len(), DATA_HEADER_LEN);
    let mut fixed = [0u8; DATA_HEADER_LEN];
    write_data_header(true, &h, &mut fixed);
    assert_eq!(&fixed[..], &buf[..]);
}

#[test]
fn an_i8_chunk_of_several_exponent_blocks_carries_their_exponents_after_its_data() {
    // 8,193 elements: two blocks, so one exponent byte after the data.
    let h = DataHeader {
        codec: CodecId::I8,
        flags: 0,
        count: 8193,
        ..header()
    };
    let mut payload = vec![7u8; 8193];
    payload.push(-9i8 as u8);
    let mut buf = Vec::new();
    encode_contribution(&h, &payload, &mut buf);
    match decode(&buf) {
        Ok(Message::Contribution(got, p)) => {
            assert_eq!(got, h);
            assert_eq!(p, &payload[..]);
        }
        other => panic!("{other:?}"),
    }
    // Without the exponent, or with one too many, it is no contribution.
    for len in [8193, 8195] {
        payload.resize(len, 0);
        let mut buf = Vec::new();
        encode_contribution(&h, &payload, &mut buf);
        assert!(decode(&buf).is_err(), "{len} bytes decoded");
    }
}

#[test]
fn every_truncation_and_byte_corruption_decodes_or_errs() {
    for (msg, _) in golden() {
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        for len in 0..buf.len() {
            assert!(decode(&buf[..len]).is_err(), "truncated to {len}: {msg:?}");
        }
        let mut extended = buf.clone();
        extended.push(0);
        assert_eq!(decode(&extended), Err(DecodeError::Trailing));
        for i in 0..buf.len() {
            for v in 0..=255u8 {
                let mut b = buf.clone();
                b[i] = v;
                // Either an error or a message that encodes back to the same bytes.
                if let Ok(m) = decode(&b) {
                    let mut again = Vec::new();
                    m.encode(&mut again);
                    assert_eq!(again, b, "byte {i} = {v}");
                }
            }
        }
    }
}

#[test]
fn rejects_what_it_must() {
    let mut buf = Vec::new();
    encode_contribution(&header(), &[0; 8], &mut buf);
    let mut b = buf.clone();
    b[2] = 1;
    assert_eq!(decode(&b), Err(DecodeError::Version(1)));
    let mut b = buf.clone();
    b[0] = b'X';
    assert_eq!(decode(&b), Err(DecodeError::BadMagic));
    let mut b = buf.clone();
    b[3] = 99;
    assert_eq!(decode(&b), Err(DecodeError::Kind(99)));
    let mut b = buf.clone();
    b[10] = 200;
    assert_eq!(decode(&b), Err(DecodeError::Codec(200)));
    assert_eq!(decode(&[]), Err(DecodeError::BadMagic));
    let small = Grant {
        job: 1,
        rank: 0,
        world: 1,
        codec: CodecId::F32,
        chunk_elems: 8,
        window: 4,
        token: 9,
        nonce: 0,
        shard: 0,
        shards: 1,
        group: None,
    };
    // A shard outside the count, no shards at all, or more than a worker would join.
    for (shard, shards) in [(2u16, 2u16), (0, 0), (0, MAX_SHARDS + 1)] {
        let mut b = Vec::new();
        encode_grant(
            &Grant {
                shard,
                shards,
                ..small
            },
            &mut b,
        );
        assert_eq!(decode(&b), Err(DecodeError::Field("shard")));
    }
    // Flag bits of joins and grants that mean nothing yet.
    let mut join = Vec::new();
    encode_join(
        &Join {
            job: 1,
            rank: 0,
            world: 1,
            codec: CodecId::F32,
            chunk_elems: 8,
            window: 4,
            secret: Vec::new(),
            groups: true,
            nonce: 1,
            completed: 0,
            proof: None,
            job_world: None,
        },
        &mut join,
    );
    let mut grant = Vec::new();
    encode_grant(
        &Grant {
            group: Some(3),
            ..small
        },
        &mut grant,
    );
    // Joins use bits 0 (groups), 1 (proven) and 2 (rack), grants bit 0.
    for (b, first) in [(&join, 3), (&grant, 1)] {
        assert!(decode(b).is_ok());
        for bit in first..8 {
            let mut b = b.clone();
            b[13] |= 1 << bit;
            assert_eq!(decode(&b), Err(DecodeError::Field("flags")), "bit {bit}");
        }
    }
    // A join flagged as proven must carry its proof, one flagged as a rack's its
    // job's world.
    for flag in [JOIN_PROVEN, JOIN_RACK] {
        let mut b = join.clone();
        b[13] |= flag;
        assert_eq!(decode(&b), Err(DecodeError::Truncated));
    }
    // A grant flagged for a group must carry it.
    let mut b = grant.clone();
    b.truncate(b.len() - 4);
    assert_eq!(decode(&b), Err(DecodeError::Truncated));
    assert!(decode(&vec![0u8; MAX_DATAGRAM + 1]).is_err());
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_preamble_never_panic(
        kind in 0u8..10,
        rest in proptest::collection::vec(any::<u8>(), 0..120),
    ) {
        let mut b = vec![MAGIC[0], MAGIC[1], VERSION, kind];
        b.extend_from_slice(&rest);
        if let Ok(m) = decode(&b) {
            let mut again = Vec::new();
            m.encode(&mut again);
            prop_assert_eq!(again, b);
        }
    }

    #[test]
    fn data_round_trips(job: u32, rank: u16, token: u64, seq: u64, slot: u32, version in 0u8..2,
                        count in 0u16..64, flags in 0u8..4) {
        let h = DataHeader { job, rank, codec: CodecId::F32, flags, token, seq, slot, version,
                             scale_exp: NO_EXPONENT, next_exp: 3, count };
        let payload = vec![7u8; usize::from(count) * 4];
        let mut buf = Vec::new();
        encode_result(&h, &payload, &mut buf);
        prop_assert_eq!(decode(&buf), Ok(Message::Result(h, &payload[..])));
    }
}

#[test]
fn marking_sets_the_flag_of_contributions_only() {
    let unmarked = DataHeader {
        flags: 0,
        ..header()
    };
    let mut c = Vec::new();
    encode_contribution(&unmarked, &[0; 8], &mut c);
    assert!(mark_contribution(&mut c));
    let Ok(Message::Contribution(h, _)) = decode(&c) else {
        panic!("marked contribution does not decode")
    };
    assert_eq!(h.flags & FLAG_MARK, FLAG_MARK);
    let mut r = Vec::new();
    encode_result(&unmarked, &[0; 8], &mut r);
    let before = r.clone();
    assert!(!mark_contribution(&mut r));
    assert_eq!(r, before);
    assert!(!mark_contribution(&mut [0x49, 0x41, 1]));
    // A result is marked by mark_result, and a contribution is not.
    assert!(mark_result(&mut r));
    let Ok(Message::Result(h, _)) = decode(&r) else {
        panic!("marked result does not decode")
    };
    assert_eq!(h.flags & FLAG_MARK, FLAG_MARK);
    let mut c = Vec::new();
    encode_contribution(&unmarked, &[0; 8], &mut c);
    let before = c.clone();
    assert!(!mark_result(&mut c));
    assert_eq!(c, before);
}

/// The admission proof covers every field of the join: a join proven under one key
/// proves nothing under another, nor once any field changed.
#[test]
fn admission_proofs_bind_the_key_and_every_field() {
    let mut j = Join {
        job: 3,
        rank: 1,
        world: 2,
        codec: CodecId::I32,
        chunk_elems: 64,
        window: 8,
        secret: b"s".to_vec(),
        groups: false,
        nonce: 77,
        completed: 0,
        proof: None,
        job_world: None,
    };
    assert!(!j.proves(b"key one, sixteen"));
    j.prove(b"key one, sixteen");
    assert!(j.proves(b"key one, sixteen"));
    assert!(!j.proves(b"key two, sixteen"));
    let mut b = Vec::new();
    encode_join(&j, &mut b);
    let Ok(Message::Join(back)) = decode(&b) else {
        panic!("a proven join decodes")
    };
    assert!(back.proves(b"key one, sixteen"));
    // A relay may drop the ask for groups.
    assert!(Join {
        groups: true,
        ..j.clone()
    }
    .proves(b"key one, sixteen"));
    for changed in [
        Join {
            job: 4,
            ..j.clone()
        },
        Join {
            rank: 0,
            ..j.clone()
        },
        Join {
            nonce: 78,
            ..j.clone()
        },
        Join {
            completed: 1,
            ..j.clone()
        },
        Join {
            secret: b"t".to_vec(),
            ..j.clone()
        },
        Join {
            window: 9,
            ..j.clone()
        },
    ] {
        assert!(!changed.proves(b"key one, sixteen"), "{changed:?}");
    }
}

/// A partial sum (kind 9) of an i8 chunk of two exponent blocks: it round-trips, its
/// length follows its heads and groups, and heads and groups that no rack writes are
/// refused.
#[test]
fn partial_sums_decode_by_their_heads() {
    let i8c = codec::lookup(CodecId::I8).expect("i8");
    let count = codec::EXPONENT_BLOCK + 100;
    // Block 0: groups of 128 alternately in -300..-172 and in 0..4; block 1 in 92..192.
    let lanes: Vec<u32> = (0..count)
        .map(|i| match i {
            _ if i >= codec::EXPONENT_BLOCK => (i - codec::EXPONENT_BLOCK) as i32 + 92,
            _ if (i / 128) % 2 == 0 => (i % 128) as i32 - 300,
            _ => (i % 4) as i32,
        } as u32)
        .collect();
    let mut at = [codec::Alignment::EMPTY; codec::MAX_BLOCKS];
    for (a, (unit, top)) in at.iter_mut().zip([(-3i8, -1i8), (5, 7)]) {
        *a = codec::Alignment {
            first: false,
            unit,
            top,
            wide: true,
        };
    }
    let mut payload = Vec::new();
    codec::partial::encode(i8c, &lanes, 4, &at, &mut Vec::new(), &mut payload);
    // Two heads with their widest groups, then each group of 128 lanes, zigzag-coded,
    // at its fewest bits: block 0's alternately at 10 (1 + 160 bytes) and 3 (1 + 48
    // bytes), block 1's one group of 100 lanes (padded to 128) at 9.
    assert_eq!(&payload[..6], &[10, -3i8 as u8, -1i8 as u8, 9, 5, 7]);
    assert_eq!(
        (payload[6], payload[6 + 161], payload[6 + 210]),
        (10, 3, 10)
    );
    assert_eq!(payload.len(), 6 + 32 * (161 + 49) + 1 + 16 * 9);
    let h = DataHeader {
        codec: CodecId::I8,
        count: count as u16,
        ..header()
    };
    let mut bytes = Vec::new();
    encode_partial(&h, &payload, &mut bytes);
    match decode(&bytes) {
        Ok(Message::Partial(d, p)) => assert_eq!((d, p), (h, &payload[..])),
        other => panic!("{other:?}"),
    }
    let at_head = DATA_HEADER_LEN;
    // A head narrower than its groups, a width of 33, a unit above the top, one
    // exponent missing of two, groups wider than their head, a head wider than its
    // widest group.
    for (offset, value) in [
        (0, 0u8),
        (3, 33),
        (1, 0),
        (5, 0x80),
        (6, 11),
        (6 + 161, 11),
        (0, 11),
    ] {
        let mut bad = bytes.clone();
        bad[at_head + offset] = value;
        assert!(decode(&bad).is_err(), "head byte {offset} = {value:#x}");
    }
    assert_eq!(
        decode(&bytes[..bytes.len() - 1]),
        Err(DecodeError::Truncated)
    );
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(decode(&long), Err(DecodeError::Trailing));
    // The float codecs' lanes go up whole: 32 bits, nothing else.
    let f = DataHeader {
        codec: CodecId::F16,
        count: 2,
        ..header()
    };
    let mut ok = Vec::new();
    encode_partial(&f, &[32, 0x80, 0x80, 0, 0, 0, 0, 0, 0, 0, 0], &mut ok);
    assert!(matches!(decode(&ok), Ok(Message::Partial(..))));
    let mut narrow = Vec::new();
    encode_partial(&f, &[16, 0x80, 0x80, 0, 0, 0, 0], &mut narrow);
    assert!(decode(&narrow).is_err());
}

/// A rack aggregator's join carries the job's world after the secret, and the
/// admission proof covers it.
#[test]
fn a_racks_join_carries_the_jobs_world_under_its_proof() {
    let mut j = Join {
        job: 9,
        rank: 1,
        world: 2,
        codec: CodecId::I8,
        chunk_elems: 256,
        window: 64,
        secret: b"s".to_vec(),
        groups: false,
        nonce: 7,
        completed: 0,
        proof: None,
        job_world: Some(4),
    };
    j.prove(b"key");
    let mut bytes = Vec::new();
    encode_join(&j, &mut bytes);
    match decode(&bytes) {
        Ok(Message::Join(d)) => {
            assert_eq!(d, j);
            assert!(d.proves(b"key"));
            let other = Join {
                job_world: Some(5),
                ..d
            };
            assert!(!other.proves(b"key"), "the proof covers job_world");
        }
        other => panic!("{other:?}"),
    }
    // A world of zero ranks is refused.
    let off = 4 + 4 + 2 + 2 + 1 + 1 + 2 + 4 + 8 + 8 + 1 + 1;
    let mut zero = bytes.clone();
    zero[off..off + 2].copy_from_slice(&[0, 0]);
    assert_eq!(decode(&zero), Err(DecodeError::Field("job_world")));
}
