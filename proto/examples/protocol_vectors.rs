//! The test vectors of `docs/protocol.md`, made by today's encoders and state machines:
//! one datagram of every message kind, the wire form of every codec, and whole jobs of
//! two ranks (join, allreduces, leave) run in memory against one aggregator, at one
//! fixed instant, with fixed join nonces and the aggregator's fixed default seed.
//!
//! ```sh
//! # print every block
//! cargo run -p inagg-proto --example protocol_vectors
//! # rewrite the blocks of the document in place (then review the diff)
//! cargo run -p inagg-proto --example protocol_vectors -- --write docs/protocol.md
//! ```
//!
//! A block is a fenced code block whose info string is `text vector:NAME` (datagrams)
//! or `text values:NAME` (the tensors of a run). `--write` replaces the body of every
//! such block with what the code makes now. `proto/tests/protocol_doc.rs` includes
//! this file and fails while the document and the code differ.

use std::collections::BTreeSet;
use std::time::Instant;

use inagg_proto::aggregator::{Aggregator, AggregatorConfig};
use inagg_proto::codec::{self, Alignment, CodecId, Scale, MAX_BLOCKS};
use inagg_proto::wire::{
    self, Control, DataHeader, ErrorCode, ErrorMsg, Grant, Join, Message, FLAG_FROM_COPY,
    FLAG_LAST, FLAG_MARK, FLAG_NONFINITE, FLAG_PROBE, FLAG_REGRANT, FLAG_RETX, NO_EXPONENT,
};
use inagg_proto::worker::{Event, Worker, WorkerConfig};

/// The job of every vector.
pub const JOB: u32 = 7;
/// Its secret.
pub const SECRET: &[u8] = b"s3cret";
/// The join nonces of ranks 0 and 1 (drawn from the operating system in real traffic).
pub const NONCES: [u64; 2] = [0x1111_2222_3333_4444, 0x5555_6666_7777_8888];
/// The admission key of the proven join.
pub const ADMISSION_KEY: &[u8] = b"example admission key, 32 bytes!";
/// The session token of the stand-alone vectors (the runs use the aggregator's).
pub const TOKEN: u64 = 0x0123_4567_89ab_cdef;
/// The input of the codec vectors: `max |x| = 2.5`, block exponent 1.
pub const CODEC_INPUT: [f32; 8] = [0.75, -0.3, 0.1, -1.5, 0.001, 0.0, 2.5, -2.0];
/// The world size the codec vectors are scaled for.
pub const CODEC_WORLD: u16 = 2;
/// The dither key of the stochastic codec vector.
pub const CODEC_DITHER: u64 = 3;

/// One datagram of a block: who sent it to whom (both empty in a one-datagram block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    pub from: String,
    pub to: String,
    pub bytes: Vec<u8>,
}

/// One line of a `values:` block: a label (`call 1 r0`, `call 1 sum`) and its tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Values {
    pub label: String,
    pub values: Vec<f32>,
}

/// What a block holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// `vector:NAME`: datagrams.
    Vector(Vec<Datagram>),
    /// `values:NAME`: tensors.
    Values(Vec<Values>),
}

/// A named block of the document.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub name: String,
    pub body: Body,
    /// For a bare payload (the codec vectors): the bytes per element, by which its hex
    /// is grouped. `None`: datagrams, grouped by their fields.
    pub element: Option<usize>,
}

impl Block {
    fn single(name: &str, bytes: Vec<u8>) -> Self {
        Self {
            name: name.to_string(),
            body: Body::Vector(vec![Datagram {
                from: String::new(),
                to: String::new(),
                bytes,
            }]),
            element: None,
        }
    }

    /// The info string of the block's fence.
    pub fn info(&self) -> String {
        match self.body {
            Body::Vector(_) => format!("text vector:{}", self.name),
            Body::Values(_) => format!("text values:{}", self.name),
        }
    }
}

/// Every block, in the document's order.
pub fn all() -> Vec<Block> {
    let mut out = messages();
    out.extend(codecs());
    out.extend(runs());
    out
}

// ---------------------------------------------------------------------------------
// One datagram of every message kind.

fn join(rank: u16) -> Join {
    Join {
        job: JOB,
        rank,
        world: 2,
        codec: CodecId::I8,
        chunk_elems: 4,
        window: 2,
        secret: SECRET.to_vec(),
        groups: false,
        nonce: NONCES[usize::from(rank)],
        completed: 0,
        proof: None,
        job_world: None,
    }
}

fn grant() -> Grant {
    Grant {
        job: JOB,
        rank: 1,
        world: 2,
        codec: CodecId::I8,
        chunk_elems: 4,
        window: 2,
        token: TOKEN,
        nonce: NONCES[1],
        shard: 0,
        shards: 1,
        group: None,
    }
}

/// Chunk 2 of rank 1's tensor `[0.5, -0.5, 0.125, 0.99]` in i8 (block exponent -1):
/// packet 5 of the job's stream in a pool of 2 slots, the last of its allreduce.
fn contribution() -> (DataHeader, Vec<u8>) {
    let x = [0.5f32, -0.5, 0.125, 0.99];
    let c = codec::lookup(CodecId::I8).expect("i8 is a codec");
    let e = codec::block_exponent(&x).expect("finite");
    let mut payload = vec![0u8; x.len()];
    c.encode(&x, c.scale(2, e), &mut payload);
    let h = DataHeader {
        job: JOB,
        rank: 1,
        codec: CodecId::I8,
        flags: FLAG_LAST,
        token: TOKEN,
        seq: 5,
        slot: 1,
        version: 0,
        scale_exp: e,
        next_exp: NO_EXPONENT,
        count: 4,
    };
    (h, payload)
}

fn control() -> Control {
    Control {
        job: JOB,
        rank: 1,
        token: TOKEN,
    }
}

fn messages() -> Vec<Block> {
    let enc = |m: &Message<'_>| {
        let mut b = Vec::new();
        m.encode(&mut b);
        b
    };
    let mut proven = Join {
        groups: true,
        completed: 3,
        ..join(1)
    };
    proven.prove(ADMISSION_KEY);
    let (h, payload) = contribution();
    let probe = DataHeader {
        flags: FLAG_LAST | FLAG_PROBE | FLAG_RETX,
        ..h
    };
    let held = DataHeader {
        rank: 2,
        flags: FLAG_PROBE,
        ..probe
    };
    // The result of that chunk and rank 0's [0.25, 0.25, 0.25, 0.25] (block exponent
    // -2), summed and stored by the codec as the aggregator does.
    let c = codec::lookup(CodecId::I8).expect("i8 is a codec");
    let r0 = [0.25f32; 4];
    let e0 = codec::block_exponent(&r0).expect("finite");
    let mut p0 = vec![0u8; r0.len()];
    c.encode(&r0, c.scale(2, e0), &mut p0);
    let mut lanes = [0u32; 4];
    let mut at = [Alignment::EMPTY; MAX_BLOCKS];
    codec::sum_blocks(c, &mut lanes, 2, &mut at, e0, &p0);
    codec::sum_blocks(c, &mut lanes, 2, &mut at, h.scale_exp, &payload);
    let mut sum = vec![0u8; 4];
    let top = codec::store_blocks(c, &lanes, 2, &at, &mut sum);
    let result = DataHeader {
        rank: 2,
        flags: 0,
        scale_exp: top,
        ..h
    };
    // The same two contributions as rack 0 of 2 of a job of four ranks would send them
    // up: summed for a world of 4 (as the ranks would have quantized), unrounded.
    let (mut lanes4, mut at4) = ([0u32; 4], [Alignment::EMPTY; MAX_BLOCKS]);
    codec::sum_blocks(c, &mut lanes4, 4, &mut at4, e0, &p0);
    codec::sum_blocks(c, &mut lanes4, 4, &mut at4, h.scale_exp, &payload);
    let mut partial = Vec::new();
    codec::partial::encode(c, &lanes4, 4, &at4, &mut Vec::new(), &mut partial);
    let partial_header = DataHeader {
        rank: 0,
        flags: FLAG_LAST,
        scale_exp: at4[0].top,
        ..h
    };
    let rack_join = Join {
        rank: 0,
        world: 2,
        nonce: NONCES[0],
        job_world: Some(4),
        ..join(0)
    };
    vec![
        Block::single("join", enc(&Message::Join(join(1)))),
        Block::single("join-proven", enc(&Message::Join(proven))),
        Block::single("join-rack", enc(&Message::Join(rack_join))),
        Block::single("grant", enc(&Message::Grant(grant()))),
        Block::single(
            "grant-group",
            enc(&Message::Grant(Grant {
                shard: 1,
                shards: 2,
                group: Some(5),
                ..grant()
            })),
        ),
        Block::single("contribution", enc(&Message::Contribution(h, &payload))),
        Block::single(
            "contribution-probe",
            enc(&Message::Contribution(probe, &[])),
        ),
        Block::single("result", enc(&Message::Result(result, &sum))),
        Block::single("result-held", enc(&Message::Result(held, &[]))),
        Block::single("partial", enc(&Message::Partial(partial_header, &partial))),
        Block::single("leave", enc(&Message::Leave(control()))),
        Block::single("heartbeat", enc(&Message::Heartbeat(control()))),
        Block::single(
            "error",
            enc(&Message::Error(ErrorMsg {
                job: JOB,
                rank: 0,
                code: ErrorCode::PeerSilent,
                nonce: NONCES[1],
                text: "rank 0 of job 7 sent nothing for 3.0 s".to_string(),
            })),
        ),
        Block::single("regrant", enc(&Message::Regrant(control()))),
    ]
}

// ---------------------------------------------------------------------------------
// Every codec's wire form of one input.

fn codecs() -> Vec<Block> {
    let mut out = Vec::new();
    let e = codec::block_exponent(&CODEC_INPUT).expect("finite");
    for (name, id, dither) in [
        ("codec-f32", CodecId::F32, None),
        ("codec-f16", CodecId::F16, None),
        ("codec-bf16", CodecId::BF16, None),
        ("codec-i32", CodecId::I32, None),
        ("codec-i16", CodecId::I16, None),
        ("codec-i8", CodecId::I8, None),
        ("codec-f16-stochastic", CodecId::F16, Some(CODEC_DITHER)),
        ("codec-bf16-stochastic", CodecId::BF16, Some(CODEC_DITHER)),
        ("codec-i8-stochastic", CodecId::I8, Some(CODEC_DITHER)),
    ] {
        let c = codec::lookup(id).expect("a codec");
        let scale = Scale {
            dither,
            ..c.scale(CODEC_WORLD, e)
        };
        let mut bytes = vec![0u8; CODEC_INPUT.len() * c.wire_bytes()];
        c.encode(&CODEC_INPUT, scale, &mut bytes);
        out.push(Block {
            element: Some(c.wire_bytes()),
            ..Block::single(name, bytes)
        });
    }
    out
}

// ---------------------------------------------------------------------------------
// Whole jobs of two ranks.

/// A job of two ranks in memory: its settings and the tensors of each allreduce.
#[derive(Debug, Clone)]
pub struct Run {
    pub name: &'static str,
    pub codec: CodecId,
    pub chunk: u16,
    pub window: u32,
    pub stochastic: Option<u64>,
    /// Per allreduce, rank 0's and rank 1's tensors.
    pub calls: Vec<[Vec<f32>; 2]>,
}

/// The fixed-point runs' tensors: chunks (of 4) of different magnitudes.
fn fixed_inputs() -> [Vec<f32>; 2] {
    [
        vec![0.5, -0.25, 0.75, 1.0, 3.0, -2.5, 0.1, 0.2, 0.01, -0.02],
        vec![0.125, 0.3, -0.6, 0.9, -1.0, 0.5, 0.05, -0.4, 0.03, 0.04],
    ]
}

/// The runs of the document.
pub fn run_specs() -> Vec<Run> {
    vec![
        Run {
            name: "allreduce-f32",
            codec: CodecId::F32,
            chunk: 4,
            window: 2,
            stochastic: None,
            calls: vec![
                // `inagg worker`'s barrier, then the tensor.
                [vec![0.0], vec![0.0]],
                [
                    vec![0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0],
                    vec![-1.0, 0.25, 2.0, -3.0, 10.0, 0.0, 1.0, 100.0, -0.125, 7.0],
                ],
            ],
        },
        Run {
            name: "allreduce-i32",
            codec: CodecId::I32,
            chunk: 4,
            window: 2,
            stochastic: None,
            calls: vec![fixed_inputs()],
        },
        Run {
            name: "allreduce-i8",
            codec: CodecId::I8,
            chunk: 4,
            window: 2,
            stochastic: None,
            calls: vec![fixed_inputs()],
        },
        Run {
            name: "allreduce-i8-stochastic",
            codec: CodecId::I8,
            chunk: 4,
            window: 2,
            stochastic: Some(1),
            calls: vec![[vec![0.3, -0.7, 0.1, 0.9], vec![0.2, 0.6, -0.05, -0.45]]],
        },
    ]
}

fn runs() -> Vec<Block> {
    let mut out = Vec::new();
    for spec in run_specs() {
        let (datagrams, values) = run(&spec);
        out.push(Block {
            name: spec.name.to_string(),
            body: Body::Vector(datagrams),
            element: None,
        });
        out.push(Block {
            name: spec.name.to_string(),
            body: Body::Values(values),
            element: None,
        });
    }
    out
}

/// The worker settings of rank `rank` of a run.
pub fn worker_config(spec: &Run, rank: u16) -> WorkerConfig {
    let mut c = WorkerConfig::new(JOB, rank, 2, spec.codec);
    c.chunk_elems = spec.chunk;
    c.window = spec.window;
    c.secret = SECRET.to_vec();
    c.nonce = NONCES[usize::from(rank)];
    c.stochastic_rounding = spec.stochastic;
    c
}

/// Runs a job: both ranks join, allreduce every call's tensors and leave; returns every
/// datagram in the order sent, and per call each rank's input and the sum (which both
/// ranks must hold bit for bit).
///
/// The schedule, in rounds until nobody sends: rank 0 sends everything it has due,
/// then rank 1; the aggregator takes those datagrams in that order; it sends
/// everything it has, which the ranks take in that order. All at one instant, so no
/// timer ever fires (no heartbeat, no retransmission).
pub fn run(spec: &Run) -> (Vec<Datagram>, Vec<Values>) {
    let now = Instant::now();
    let mut agg = Aggregator::<usize>::new(AggregatorConfig::default());
    let mut workers: Vec<Worker> = (0..2)
        .map(|r| Worker::new(worker_config(spec, r), now).expect("valid settings"))
        .collect();
    let mut log = Vec::new();
    let mut values = Vec::new();
    let mut bufs = vec![Vec::new(), Vec::new()];
    pump(now, &mut agg, &mut workers, &mut bufs, &mut log);
    for w in &mut workers {
        wait_for(w, |e| matches!(e, Event::Joined(_)));
    }
    for (k, call) in spec.calls.iter().enumerate() {
        bufs = call.to_vec();
        for (w, b) in workers.iter_mut().zip(bufs.iter_mut()) {
            w.start_allreduce(now, b, None).expect("ready");
        }
        pump(now, &mut agg, &mut workers, &mut bufs, &mut log);
        for w in &mut workers {
            wait_for(w, |e| matches!(e, Event::AllreduceDone { .. }));
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&bufs[0]),
            bits(&bufs[1]),
            "{}: ranks differ",
            spec.name
        );
        for (r, input) in call.iter().enumerate() {
            values.push(Values {
                label: format!("call {} r{r}", k + 1),
                values: input.clone(),
            });
        }
        values.push(Values {
            label: format!("call {} sum", k + 1),
            values: bufs[0].clone(),
        });
    }
    for w in &mut workers {
        w.close();
    }
    pump(now, &mut agg, &mut workers, &mut bufs, &mut log);
    assert!(
        workers
            .iter()
            .all(|w| w.is_finished() && w.error().is_none()),
        "{}: the ranks did not leave cleanly",
        spec.name
    );
    (log, values)
}

/// Takes worker events until one matches `want`; panics on a failure or none.
fn wait_for(w: &mut Worker, want: impl Fn(&Event) -> bool) {
    while let Some(e) = w.poll_event() {
        if let Event::Failed(err) = &e {
            panic!("worker failed: {err}");
        }
        if want(&e) {
            return;
        }
    }
    panic!("the event did not come");
}

/// Delivers datagrams both ways, in rounds, until nobody sends (see [`run`]).
fn pump(
    now: Instant,
    agg: &mut Aggregator<usize>,
    workers: &mut [Worker],
    bufs: &mut [Vec<f32>],
    log: &mut Vec<Datagram>,
) {
    let mut buf = Vec::new();
    for _ in 0..1000 {
        let mut up = Vec::new();
        for (r, w) in workers.iter_mut().enumerate() {
            while w.poll_transmit(now, &bufs[r], &mut buf) {
                up.push((r, buf.clone()));
            }
        }
        for (r, d) in &up {
            log.push(Datagram {
                from: format!("r{r}"),
                to: "agg".to_string(),
                bytes: d.clone(),
            });
            agg.handle_datagram(now, *r, d);
        }
        let mut down = Vec::new();
        while let Some(to) = agg.poll_transmit(&mut buf) {
            down.push((to, buf.clone()));
        }
        for (to, d) in &down {
            log.push(Datagram {
                from: "agg".to_string(),
                to: format!("r{to}"),
                bytes: d.clone(),
            });
            workers[*to].handle_datagram(now, d, &mut bufs[*to]);
        }
        if up.is_empty() && down.is_empty() {
            return;
        }
    }
    panic!("the job never went quiet");
}

// ---------------------------------------------------------------------------------
// Rendering and parsing blocks.

fn exp(e: i8) -> String {
    if e == NO_EXPONENT {
        "none".to_string()
    } else {
        e.to_string()
    }
}

fn flag_names(flags: u8) -> String {
    let names = [
        (FLAG_MARK, "MARK"),
        (FLAG_FROM_COPY, "FROM_COPY"),
        (FLAG_PROBE, "PROBE"),
        (FLAG_RETX, "RETX"),
        (FLAG_REGRANT, "REGRANT"),
        (FLAG_NONFINITE, "NONFINITE"),
        (FLAG_LAST, "LAST"),
    ];
    let set: Vec<&str> = names
        .iter()
        .filter(|(f, _)| flags & f != 0)
        .map(|(_, n)| *n)
        .collect();
    if set.is_empty() {
        String::new()
    } else {
        format!(" {}", set.join("|"))
    }
}

/// A few words on a datagram, for the header line of a run's datagram.
pub fn describe(bytes: &[u8], from_aggregator: bool) -> String {
    let data = |what: &str, h: &DataHeader| {
        format!(
            "{what} seq {} slot {} v{} count {} exp {} next {}{}",
            h.seq,
            h.slot,
            h.version,
            h.count,
            exp(h.scale_exp),
            exp(h.next_exp),
            flag_names(h.flags)
        )
    };
    match wire::decode(bytes) {
        Ok(Message::Join(j)) => format!("join rank {} window {}", j.rank, j.window),
        Ok(Message::Grant(g)) => format!("grant rank {} window {}", g.rank, g.window),
        Ok(Message::Contribution(h, _)) => data("contribution", &h),
        Ok(Message::Result(h, _)) => data("result", &h),
        Ok(Message::Partial(h, _)) => data("partial sum", &h),
        Ok(Message::Leave(_)) if from_aggregator => "leave (echo)".to_string(),
        Ok(Message::Leave(_)) => "leave".to_string(),
        Ok(Message::Heartbeat(_)) if from_aggregator => "heartbeat (echo)".to_string(),
        Ok(Message::Heartbeat(_)) => "heartbeat".to_string(),
        Ok(Message::Regrant(_)) => "regrant".to_string(),
        Ok(Message::Error(e)) => format!("error {:?}", e.code),
        Err(e) => format!("undecodable: {e}"),
    }
}

/// The field widths of a datagram's header, then of its payload's elements: each
/// group of hex digits in the document is one field (or one element).
fn layout(b: &[u8]) -> (Vec<usize>, Vec<usize>) {
    let kind = b.get(3).copied().unwrap_or(0);
    let head = match kind {
        1 => {
            let len = usize::from(b.get(36).copied().unwrap_or(0));
            let mut w = vec![4, 4, 2, 2, 1, 1, 2, 4, 8, 8, 1];
            if len > 0 {
                w.push(len);
            }
            // A rack's join: the job's world follows the secret.
            if b.get(13).is_some_and(|f| f & wire::JOIN_RACK != 0) {
                w.push(2);
            }
            w
        }
        // A grant's group, if flagged, ends its first line.
        2 if b.len() >= 44 => vec![4, 4, 2, 2, 1, 1, 2, 4, 8, 8, 2, 2, 4],
        2 => vec![4, 4, 2, 2, 1, 1, 2, 4, 8, 8, 2, 2],
        3 | 4 | 9 => vec![4, 4, 2, 1, 1, 8, 8, 4, 1, 1, 1, 1, 2, 2],
        5 | 6 | 8 => vec![4, 4, 2, 8],
        7 => vec![4, 4, 2, 1, 8, 2],
        _ => Vec::new(),
    };
    let used: usize = head.iter().sum();
    if used > b.len() {
        return (Vec::new(), vec![4; b.len().div_ceil(4)]);
    }
    let rest = b.len() - used;
    let per = match kind {
        3 | 4 => codec::lookup(CodecId(b[10])).map_or(1, |c| c.wire_bytes()),
        _ => 1,
    };
    let count = match kind {
        3 | 4 => usize::from(u16::from_le_bytes([b[36], b[37]])),
        _ => 0,
    };
    let mut tail = Vec::new();
    let mut left = rest;
    if matches!(kind, 3 | 4) {
        for _ in 0..count {
            if left < per {
                break;
            }
            tail.push(per);
            left -= per;
        }
    }
    if kind == 7 && left > 0 {
        // An error's text: one group.
        tail.push(left);
    } else {
        tail.extend(std::iter::repeat_n(1, left));
    }
    (head, tail)
}

fn hex_groups(b: &[u8], widths: &[usize]) -> Vec<String> {
    let mut at = 0;
    widths
        .iter()
        .map(|w| {
            let end = (at + w).min(b.len());
            let s: String = b[at..end].iter().map(|x| format!("{x:02x}")).collect();
            at = end;
            s
        })
        .collect()
}

/// The hex lines of one datagram: the header's fields on the first line, the payload's
/// elements (and a join's proof, an error's text) below, at most 16 groups a line.
pub fn hex_lines(b: &[u8]) -> Vec<String> {
    let (head, tail) = layout(b);
    let head_len: usize = head.iter().sum();
    let mut lines = Vec::new();
    // A join's proof follows its secret: a line of its own.
    let proven = b.get(3) == Some(&1) && b.len() == head_len + wire::ADMISSION_PROOF_LEN;
    if !head.is_empty() {
        lines.push(hex_groups(&b[..head_len], &head).join(" "));
    }
    let rest = &b[head_len..];
    let tail = if proven {
        vec![wire::ADMISSION_PROOF_LEN]
    } else {
        tail
    };
    let groups = hex_groups(rest, &tail);
    for line in groups.chunks(16) {
        lines.push(line.join(" "));
    }
    lines
}

/// The body of a block as the document holds it (without the fences).
pub fn render(block: &Block) -> String {
    let mut s = String::new();
    match (&block.body, block.element) {
        (Body::Vector(ds), Some(w)) => {
            let w = w.max(1);
            for d in ds {
                let groups: Vec<usize> = vec![w; d.bytes.len().div_ceil(w)];
                for line in hex_groups(&d.bytes, &groups).chunks(16) {
                    s += &format!("{}\n", line.join(" "));
                }
            }
        }
        (Body::Vector(ds), None) => {
            for d in ds {
                let indent = if d.from.is_empty() {
                    ""
                } else {
                    let note = describe(&d.bytes, d.from == "agg");
                    s += &format!("{} -> {}  {note}\n", d.from, d.to);
                    "    "
                };
                for line in hex_lines(&d.bytes) {
                    s += &format!("{indent}{line}\n");
                }
            }
        }
        (Body::Values(vs), _) => {
            for v in vs {
                let list: Vec<String> = v.values.iter().map(|x| format!("{x:?}")).collect();
                s += &format!("{}: {}\n", v.label, list.join(", "));
            }
        }
    }
    s
}

/// The block with its fences.
pub fn fenced(block: &Block) -> String {
    format!("```{}\n{}```\n", block.info(), render(block))
}

/// Parses a block's body as the document holds it. In a `vector:` block, a line with
/// `->` starts a datagram (`FROM -> TO  words`); the hex digits of the lines below it,
/// spaces ignored, are its bytes. Without any such line the whole block is one
/// datagram. In a `values:` block, each line is `LABEL: v, v, ...`.
pub fn parse_body(values: bool, text: &str) -> Result<Body, String> {
    if values {
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (label, list) = line
                .split_once(':')
                .ok_or_else(|| format!("no ':' in {line:?}"))?;
            let values = list
                .split(',')
                .map(|v| v.trim().parse::<f32>().map_err(|e| format!("{v:?}: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            out.push(Values {
                label: label.trim().to_string(),
                values,
            });
        }
        return Ok(Body::Values(out));
    }
    let mut out: Vec<Datagram> = Vec::new();
    let mut hex = String::new();
    let flush = |out: &mut Vec<Datagram>, hex: &mut String| -> Result<(), String> {
        if hex.len() % 2 != 0 {
            return Err(format!("an odd number of hex digits: {hex}"));
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|e| e.to_string()))
            .collect::<Result<Vec<u8>, _>>()?;
        let announced = matches!(out.last(), Some(d) if d.bytes.is_empty());
        if let (true, Some(d)) = (announced, out.last_mut()) {
            d.bytes = bytes;
        } else if !bytes.is_empty() {
            out.push(Datagram {
                from: String::new(),
                to: String::new(),
                bytes,
            });
        }
        hex.clear();
        Ok(())
    };
    for line in text.lines() {
        if let Some((from, rest)) = line.split_once("->") {
            flush(&mut out, &mut hex)?;
            let to = rest.split_whitespace().next().unwrap_or("");
            out.push(Datagram {
                from: from.trim().to_string(),
                to: to.to_string(),
                bytes: Vec::new(),
            });
            continue;
        }
        for c in line.chars().filter(|c| !c.is_whitespace()) {
            if !c.is_ascii_hexdigit() {
                return Err(format!("not a hex digit: {c:?} in {line:?}"));
            }
            hex.push(c.to_ascii_lowercase());
        }
    }
    flush(&mut out, &mut hex)?;
    Ok(Body::Vector(out))
}

/// The blocks of a document, in order: (name, is a `values:` block, body text).
pub fn doc_blocks(doc: &str) -> Vec<(String, bool, String)> {
    let mut out = Vec::new();
    let mut open: Option<(String, bool, String)> = None;
    for line in doc.lines() {
        match &mut open {
            Some((name, values, body)) => {
                if line.trim_start().starts_with("```") {
                    out.push((std::mem::take(name), *values, std::mem::take(body)));
                    open = None;
                } else {
                    body.push_str(line);
                    body.push('\n');
                }
            }
            None => {
                let info = line.trim_start().strip_prefix("```text ");
                if let Some(name) = info.and_then(|i| i.trim().strip_prefix("vector:")) {
                    open = Some((name.to_string(), false, String::new()));
                } else if let Some(name) = info.and_then(|i| i.trim().strip_prefix("values:")) {
                    open = Some((name.to_string(), true, String::new()));
                }
            }
        }
    }
    out
}

/// `doc` with the body of every block replaced by what the code makes now; also the
/// names of blocks the code makes that the document lacks.
pub fn rewrite(doc: &str, blocks: &[Block]) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut seen = BTreeSet::new();
    let mut skipping = false;
    for line in doc.lines() {
        if skipping {
            if line.trim_start().starts_with("```") {
                skipping = false;
                out.push_str(line);
                out.push('\n');
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
        let info = line.trim_start().strip_prefix("```");
        if let Some(b) = info.and_then(|i| blocks.iter().find(|b| b.info() == i.trim())) {
            out.push_str(&render(b));
            seen.insert(b.info());
            skipping = true;
        }
    }
    let missing = blocks
        .iter()
        .filter(|b| !seen.contains(&b.info()))
        .map(Block::info)
        .collect();
    (out, missing)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let blocks = all();
    match args.as_slice() {
        [] => {
            for b in &blocks {
                println!("{}", fenced(b));
            }
        }
        [flag, path] if flag == "--write" => {
            let doc = std::fs::read_to_string(path).expect("the document reads");
            let (new, missing) = rewrite(&doc, &blocks);
            // What was written reads back as what the code makes.
            for (name, values, text) in doc_blocks(&new) {
                let body = parse_body(values, &text).expect("a written block parses");
                let made = blocks.iter().find(|b| b.name == name && b.body == body);
                assert!(made.is_some(), "block {name} does not read back");
            }
            std::fs::write(path, new).expect("the document writes");
            if !missing.is_empty() {
                eprintln!("blocks missing from {path}, add them by hand:");
                for m in missing {
                    eprintln!("    ```{m}");
                }
                std::process::exit(1);
            }
            println!("{path}: {} blocks written", blocks.len());
        }
        _ => {
            eprintln!("usage: protocol_vectors [--write DOC]");
            std::process::exit(2);
        }
    }
}
