//! The fuzzers' seed corpus, made from today's encoders: every message kind and codec
//! for the decoder (and datagrams it must reject, named `reject-*`), and for the
//! aggregator and worker harnesses, inputs in their grammar that run whole
//! allreduces, retransmissions, probes, aborts, re-grants and strangers.
//!
//! `fuzz/seeds/<target>/<name>` holds exactly these bytes: `scripts/fuzz-seeds.sh`
//! writes them, and `proto/tests/fuzz_corpus.rs` fails when the files differ from
//! what this module makes (after a change of the wire, for example) or when a seed no
//! longer reaches what it was made for ([`Seed::reaches`]).

use super::{AGGREGATOR_CODECS, JOB, SECRET, WORKER_CHUNK, WORKER_CODECS, WORLD};
use crate::codec::{self, CodecId};
use crate::wire::{self, Control, DataHeader, ErrorCode, ErrorMsg, Grant, Join};

/// Which harness a seed feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// [`super::decode`]: one datagram.
    Decode,
    /// [`super::aggregator`]: an operation stream.
    Aggregator,
    /// [`super::worker`]: an operation stream.
    Worker,
}

impl Target {
    /// Every target, in the order of their directories.
    pub const ALL: [Target; 3] = [Target::Decode, Target::Aggregator, Target::Worker];

    /// The target's name: its cargo-fuzz target and its directory under `fuzz/seeds`.
    pub fn name(self) -> &'static str {
        match self {
            Target::Decode => "decode",
            Target::Aggregator => "aggregator",
            Target::Worker => "worker",
        }
    }
}

/// One seed: its harness, its file name and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// The fuzz target it seeds.
    pub target: Target,
    /// Its file name in the target's seed folder.
    pub name: String,
    /// Its bytes.
    pub data: Vec<u8>,
}

impl Seed {
    /// Whether this seed is a datagram the decoder must reject.
    pub fn must_be_rejected(&self) -> bool {
        self.target == Target::Decode && self.name.starts_with("reject-")
    }

    /// Whether the seed still gets where it was made to go, run through its harness:
    /// a datagram decodes (or, for `reject-*`, is rejected); an aggregator input makes
    /// the aggregator send more than the job's first grants; a worker input makes the
    /// worker send more than its join. A seed that fails this tests nothing.
    pub fn reaches(&self) -> bool {
        reaches(self.target, &self.name, &self.data)
    }
}

/// [`Seed::reaches`] for any input of `target` (a grown corpus's too); `name` says
/// whether a datagram must be rejected.
pub fn reaches(target: Target, name: &str, data: &[u8]) -> bool {
    match target {
        Target::Decode => {
            let decoded = super::decode(data) != 0;
            decoded != name.starts_with("reject-")
        }
        Target::Aggregator => super::aggregator(data) > u64::from(WORLD),
        Target::Worker => super::worker(data) > 1,
    }
}

/// Every seed, for every target.
pub fn all() -> Vec<Seed> {
    let mut out = Vec::new();
    let mut add = |target, name: String, data| {
        out.push(Seed { target, name, data });
    };
    for (name, data) in datagrams() {
        add(Target::Decode, name, data);
    }
    for (name, data) in aggregator_inputs() {
        add(Target::Aggregator, name, data);
    }
    for (name, data) in worker_inputs() {
        add(Target::Worker, name, data);
    }
    out
}

fn codec_name(id: CodecId) -> &'static str {
    codec::lookup(id).map_or("unknown", |c| c.name())
}

/// `n` bytes of a pattern: payloads whose values are neither zero nor all alike.
fn pattern(n: usize, salt: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(37).wrapping_add(salt))
        .collect()
}

fn join(rank: u16) -> Join {
    Join {
        job: JOB,
        rank,
        world: WORLD,
        codec: CodecId::I8,
        chunk_elems: 256,
        window: 64,
        secret: SECRET.to_vec(),
        groups: false,
        nonce: 0x1234_5678_9abc_def0,
        completed: 0,
        proof: None,
        job_world: None,
    }
}

fn grant() -> Grant {
    Grant {
        job: JOB,
        rank: 1,
        world: WORLD,
        codec: CodecId::F16,
        chunk_elems: 256,
        window: 32,
        token: 0xfeed_beef,
        nonce: 0x1234_5678_9abc_def0,
        shard: 0,
        shards: 1,
        group: None,
    }
}

fn header(codec: CodecId, count: u16, flags: u8) -> DataHeader {
    let scaled = codec::lookup(codec).is_some_and(|c| c.block_scaled());
    DataHeader {
        job: JOB,
        rank: 2,
        codec,
        flags,
        token: 0xfeed_beef,
        seq: 1_000_005,
        slot: 5,
        version: 1,
        scale_exp: if scaled { -7 } else { wire::NO_EXPONENT },
        next_exp: if scaled { -6 } else { wire::NO_EXPONENT },
        count,
    }
}

/// A contribution (or result) of `count` elements with a patterned payload.
fn data(codec: CodecId, count: u16, flags: u8, result: bool) -> Vec<u8> {
    let h = header(codec, count, flags);
    let len = if flags & wire::FLAG_PROBE != 0 {
        0
    } else {
        codec::lookup(codec).map_or(0, |c| codec::payload_bytes(c, usize::from(count)))
    };
    let payload = pattern(len, count as u8);
    let mut b = Vec::new();
    if result {
        wire::encode_result(&h, &payload, &mut b);
    } else {
        wire::encode_contribution(&h, &payload, &mut b);
    }
    b
}

/// Datagrams of every kind and codec, and `reject-*` ones the decoder must refuse.
fn datagrams() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut joins = vec![("join".to_string(), join(0))];
    let mut j = join(1);
    j.groups = true;
    joins.push(("join-groups".into(), j));
    let mut j = join(2);
    j.prove(b"a fuzz admission key, 32 bytes!!");
    joins.push(("join-proven".into(), j));
    let mut j = join(2);
    j.secret.clear();
    j.completed = 7;
    joins.push(("join-failover-no-secret".into(), j));
    let mut j = join(0);
    j.secret = vec![b's'; wire::MAX_SECRET_LEN];
    j.groups = true;
    j.prove(b"another key");
    joins.push(("join-longest-secret".into(), j));
    let mut j = join(1);
    j.job_world = Some(64);
    j.prove(b"a fuzz admission key, 32 bytes!!");
    joins.push(("join-rack-proven".into(), j));
    for (name, j) in joins {
        let mut b = Vec::new();
        wire::encode_join(&j, &mut b);
        out.push((name, b));
    }
    let mut grants = vec![("grant".to_string(), grant())];
    let mut g = grant();
    g.group = Some(3);
    grants.push(("grant-group".into(), g));
    let mut g = grant();
    g.shard = 3;
    g.shards = wire::MAX_SHARDS;
    grants.push(("grant-shards".into(), g));
    for (name, g) in grants {
        let mut b = Vec::new();
        wire::encode_grant(&g, &mut b);
        out.push((name, b));
    }
    for c in codec::ALL {
        let (id, name) = (c.id(), c.name());
        out.push((format!("contribution-{name}"), data(id, 256, 0, false)));
        out.push((
            format!("contribution-{name}-last-retx"),
            data(id, 77, wire::FLAG_LAST | wire::FLAG_RETX, false),
        ));
        out.push((
            format!("contribution-{name}-probe"),
            data(id, 256, wire::FLAG_PROBE, false),
        ));
        out.push((format!("result-{name}"), data(id, 256, 0, true)));
        out.push((
            format!("result-{name}-copy-regrant-mark"),
            data(
                id,
                3,
                wire::FLAG_FROM_COPY | wire::FLAG_REGRANT | wire::FLAG_MARK,
                true,
            ),
        ));
    }
    // An i8 chunk of more than one exponent block: the later blocks' exponents
    // follow the data.
    let long = codec::EXPONENT_BLOCK as u16 * 2 + 3;
    out.push((
        "contribution-i8-three-blocks".into(),
        data(CodecId::I8, long, 0, false),
    ));
    out.push((
        "result-i8-three-blocks".into(),
        data(CodecId::I8, long, wire::FLAG_NONFINITE, true),
    ));
    // Partial sums of a rack aggregator: f32 lanes whole, i32 and a two-block i8
    // chunk packed.
    for (id, count) in [
        (CodecId::F32, 64u16),
        (CodecId::I32, 77),
        (CodecId::I8, long),
    ] {
        let c = codec::lookup(id).expect("a known codec");
        let lanes: Vec<u32> = (0..u32::from(count))
            .map(|i| i.wrapping_mul(2_654_435_761) >> 20)
            .collect();
        let mut at = [codec::Alignment::EMPTY; codec::MAX_BLOCKS];
        if c.aligns_exponents() {
            for (b, a) in at.iter_mut().enumerate() {
                *a = codec::Alignment {
                    first: false,
                    unit: -(b as i8) - 3,
                    top: -(b as i8),
                    wide: true,
                };
            }
        }
        let mut payload = Vec::new();
        codec::partial::encode(c, &lanes, 64, &at, &mut Vec::new(), &mut payload);
        let mut b = Vec::new();
        wire::encode_partial(&header(id, count, wire::FLAG_RETX), &payload, &mut b);
        out.push((format!("partial-{}", c.name()), b));
    }
    let c = Control {
        job: JOB,
        rank: 2,
        token: 0xfeed_beef,
    };
    type Encode = fn(&Control, &mut Vec<u8>);
    let controls: [(&str, Encode); 3] = [
        ("leave", |c, b| wire::encode_leave(c, b)),
        ("heartbeat", |c, b| wire::encode_heartbeat(c, b)),
        ("regrant", |c, b| wire::encode_regrant(c, b)),
    ];
    for (name, encode) in controls {
        let mut b = Vec::new();
        encode(&c, &mut b);
        out.push((name.into(), b));
    }
    for code in 1..=u8::MAX {
        let Some(code) = ErrorCode::from_u8(code) else {
            continue;
        };
        let e = ErrorMsg {
            job: JOB,
            rank: 1,
            code,
            nonce: 0x1234_5678_9abc_def0,
            text: format!("{code:?}: a message for the rank"),
        };
        let mut b = Vec::new();
        wire::encode_error(&e, &mut b);
        out.push((format!("error-{code:?}").to_lowercase(), b));
    }
    out.extend(rejected(&out));
    out
}

/// Datagrams the decoder must refuse, each made from a valid one of `valid`.
fn rejected(valid: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let find = |name: &str| {
        valid
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.clone())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    let mut b = find("join");
    b[0] = b'X';
    out.push(("reject-bad-magic".to_string(), b));
    let mut b = find("join");
    b[2] = wire::VERSION - 1;
    out.push(("reject-previous-version".into(), b));
    let mut b = find("result-f16");
    b[3] = 99;
    out.push(("reject-unknown-kind".into(), b));
    let mut b = find("contribution-i8");
    b.truncate(b.len() - 1);
    out.push(("reject-truncated-payload".into(), b));
    let mut b = find("contribution-f32");
    b.truncate(wire::DATA_HEADER_LEN - 1);
    out.push(("reject-truncated-header".into(), b));
    let mut b = find("heartbeat");
    b.push(0);
    out.push(("reject-trailing-byte".into(), b));
    let mut b = find("join-proven");
    b.truncate(b.len() - 1);
    out.push(("reject-short-proof".into(), b));
    out
}

/// An input for [`super::aggregator`], written in its grammar.
struct AggregatorInput {
    bytes: Vec<u8>,
    codec: CodecId,
    chunk: u16,
}

impl AggregatorInput {
    /// Input for codec and chunk `AGGREGATOR_CODECS[which]`, whose ranks ask for
    /// groups if `groups`.
    fn new(which: u8, groups: bool) -> Self {
        let (codec, chunk) = AGGREGATOR_CODECS[usize::from(which) % AGGREGATOR_CODECS.len()];
        Self {
            bytes: vec![which | if groups { 0x80 } else { 0 }],
            codec,
            chunk,
        }
    }

    /// Rank `rank`'s contribution to packet `seq`: the whole chunk, or `short`
    /// elements fewer (chunks of 16 only), with `flags` and the harness's `skew` bits
    /// (wrong job, token, slot; another address).
    fn contribute(&mut self, rank: u8, seq: u8, short: u8, flags: u8, skew: u8) -> &mut Self {
        let scaled = codec::lookup(self.codec).is_some_and(|c| c.block_scaled());
        let count = if self.chunk > 16 {
            self.bytes.extend([1, 3, rank, seq, 0]);
            self.chunk
        } else {
            self.bytes.extend([1, 3, rank, seq, 16 - short]);
            u16::from(16 - short)
        };
        let exp = if scaled { 0 } else { wire::NO_EXPONENT as u8 };
        self.bytes.extend([flags, skew, exp, exp]);
        let known = codec::lookup(self.codec);
        let n = usize::from(count) * known.map_or(4, |c| c.wire_bytes());
        self.bytes
            .extend(pattern(n.min(64), rank.wrapping_add(seq)));
        let extra = known.map_or(0, |c| codec::payload_bytes(c, usize::from(count)) - n);
        // The later blocks' exponents, as the first block's.
        self.bytes.extend(std::iter::repeat_n(exp, extra));
        self
    }

    /// Every rank's contributions to packets `seqs`, the last flagged as the end of
    /// the allreduce.
    fn allreduce(&mut self, seqs: std::ops::Range<u8>) -> &mut Self {
        let last = seqs.end.saturating_sub(1);
        for seq in seqs {
            for rank in 0..WORLD as u8 {
                let flags = if seq == last { wire::FLAG_LAST } else { 0 };
                self.contribute(rank, seq, 0, flags, 0);
            }
        }
        self
    }

    /// A control message from rank `rank`: 0 heartbeat, 1 leave, 2 regrant.
    fn control(&mut self, rank: u8, kind: u8) -> &mut Self {
        self.bytes.extend([3, rank, rank, kind]);
        self
    }

    /// A join from `from` for job `JOB + job` (0..3), with the right secret or not.
    fn join(&mut self, from: u8, rank: u8, job: u8, right_secret: bool) -> &mut Self {
        self.bytes
            .extend([3, from, rank, 3, job, u8::from(!right_secret)]);
        self
    }

    /// A raw datagram (shorter than 200 bytes) from `from`.
    fn raw(&mut self, from: u8, datagram: &[u8]) -> &mut Self {
        let len = datagram.len() as u16;
        self.bytes.extend([0, from]);
        self.bytes.extend(len.to_le_bytes());
        self.bytes.extend(datagram);
        self
    }

    /// Time passes: `ms` milliseconds.
    fn wait(&mut self, ms: u16) -> &mut Self {
        self.bytes.extend([4, 0]);
        self.bytes.extend(ms.to_le_bytes());
        self
    }

    fn done(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }
}

fn aggregator_inputs() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (which, &(codec, chunk)) in (0u8..).zip(AGGREGATOR_CODECS.iter()) {
        let name = format!("allreduces-{}-{chunk}", codec_name(codec));
        // Two allreduces of seven chunks through a window of four slots.
        let input = AggregatorInput::new(which, false)
            .allreduce(0..7)
            .wait(5)
            .allreduce(7..14)
            .done();
        out.push((name.clone(), input));
        let input = AggregatorInput::new(which, true)
            .allreduce(0..3)
            .wait(5)
            .done();
        out.push((format!("{name}-groups"), input));
    }
    let f32 = 1;
    let i8 = 2;
    let mut a = AggregatorInput::new(f32, false);
    a.allreduce(0..2).contribute(0, 0, 0, wire::FLAG_RETX, 0);
    a.contribute(1, 1, 0, wire::FLAG_LAST | wire::FLAG_RETX, 0);
    out.push(("retransmissions-answered-from-copies".into(), a.done()));
    let mut a = AggregatorInput::new(i8, false);
    a.contribute(0, 0, 0, 0, 0)
        .contribute(0, 0, 0, wire::FLAG_PROBE, 0);
    a.wait(100)
        .contribute(1, 0, 0, 0, 0)
        .contribute(2, 0, 0, 0, 0);
    out.push(("probe-held-then-answered".into(), a.done()));
    let mut a = AggregatorInput::new(f32, false);
    a.contribute(0, 0, 0, 0, 0).contribute(1, 0, 5, 0, 0);
    a.allreduce(0..2);
    out.push(("inconsistent-lengths-abort-and-rejoin".into(), a.done()));
    let mut a = AggregatorInput::new(i8, false);
    a.contribute(0, 0, 0, 0, 0)
        .contribute(1, 0, 0, wire::FLAG_LAST, 0);
    out.push(("inconsistent-last-flag".into(), a.done()));
    let mut a = AggregatorInput::new(f32, false);
    a.contribute(0, 0, 0, 0, 0).contribute(1, 0, 0, 0, 0);
    a.wait(2000).wait(2000).allreduce(0..1);
    out.push(("silent-rank-aborts".into(), a.done()));
    let mut a = AggregatorInput::new(f32, false);
    a.allreduce(0..1).control(0, 0).control(1, 2).control(2, 1);
    a.allreduce(0..1);
    out.push(("heartbeat-regrant-leave".into(), a.done()));
    let mut a = AggregatorInput::new(i8, false);
    a.join(3, 0, 1, true)
        .join(4, 1, 1, true)
        .join(3, 0, 0, false);
    a.join(4, 2, 2, false)
        .allreduce(0..2)
        .join(3, 2, 1, true)
        .wait(10);
    out.push(("strangers-join-other-jobs".into(), a.done()));
    let mut stranger = join(0);
    stranger.job = JOB + 5;
    stranger.world = 1;
    stranger.codec = CodecId::I8;
    stranger.chunk_elems = 16;
    let mut b = Vec::new();
    wire::encode_join(&stranger, &mut b);
    let mut a = AggregatorInput::new(i8, false);
    a.allreduce(0..1).raw(3, &b);
    a.raw(3, &[b'I', b'A', wire::VERSION, 3, 0]).raw(4, b"junk");
    out.push(("raw-datagrams-beside-a-job".into(), a.done()));
    let mut a = AggregatorInput::new(f32, false);
    // Wrong job, wrong token, wrong slot, another address, far ahead.
    for skew in [0x80, 0x40, 0x20, 0x10 | 4] {
        a.contribute(0, 0, 0, 0, skew);
    }
    a.contribute(0, 23, 0, 0, 0).allreduce(0..1);
    out.push(("skewed-contributions".into(), a.done()));
    let mut a = AggregatorInput::new(i8, false);
    a.contribute(0, 0, 0, wire::FLAG_NONFINITE, 0)
        .contribute(1, 0, 0, wire::FLAG_MARK, 0)
        .contribute(2, 0, 0, 0, 0);
    out.push(("nonfinite-and-marked".into(), a.done()));
    out
}

/// An input for [`super::worker`], written in its grammar.
struct WorkerInput {
    bytes: Vec<u8>,
    codec: CodecId,
}

impl WorkerInput {
    fn new(which: u8) -> Self {
        Self {
            bytes: vec![which],
            codec: WORKER_CODECS[usize::from(which) % WORKER_CODECS.len()],
        }
    }

    /// A grant of a window of four, with the join's nonce if `nonce`.
    fn grant(&mut self, nonce: bool) -> &mut Self {
        self.bytes.extend([1, if nonce { 0 } else { 8 }, 4]);
        self
    }

    /// Starts an allreduce of `n` (below 64) elements.
    fn allreduce(&mut self, n: u8) -> &mut Self {
        self.bytes.extend([6, n]);
        self.bytes.extend(pattern(usize::from(n), n));
        self
    }

    /// The result of packet `seq` (below 16), `count` elements, with `flags`.
    fn result(&mut self, seq: u8, count: u16, flags: u8) -> &mut Self {
        let Some(known) = codec::lookup(self.codec) else {
            return self;
        };
        self.bytes.extend([2, 0, seq]);
        self.bytes.extend(count.to_le_bytes());
        self.bytes.push(flags);
        if known.block_scaled() {
            self.bytes.push(20); // exponent 0
        }
        if flags & wire::FLAG_PROBE == 0 {
            let len = codec::payload_bytes(known, usize::from(count));
            self.bytes.extend(pattern(len, seq));
        }
        self
    }

    /// Results for the packets of an allreduce of `n` elements from `first`.
    fn results(&mut self, first: u8, n: u16) -> &mut Self {
        let chunks = n.div_ceil(WORKER_CHUNK);
        for k in 0..chunks {
            let count = (n - k * WORKER_CHUNK).min(WORKER_CHUNK);
            let flags = if k + 1 == chunks { wire::FLAG_LAST } else { 0 };
            self.result(first + k as u8, count, flags);
        }
        self
    }

    /// An error for the worker's job, with its join's nonce or a forged one.
    fn error(&mut self, nonce: bool) -> &mut Self {
        self.bytes.extend([3, 0x11 | if nonce { 2 } else { 0 }]);
        self
    }

    fn wait(&mut self, ms: u16) -> &mut Self {
        self.bytes.push(5);
        self.bytes.extend(ms.to_le_bytes());
        self
    }

    fn done(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }
}

fn worker_inputs() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (which, &codec) in (0u8..).zip(WORKER_CODECS.iter()) {
        // Two allreduces: 40 elements (three packets), then 20 (two).
        let input = WorkerInput::new(which)
            .grant(true)
            .allreduce(40)
            .results(0, 40)
            .wait(1)
            .allreduce(20)
            .results(3, 20)
            .done();
        out.push((format!("allreduces-{}", codec_name(codec)), input));
    }
    let (f32, i8) = (1, 2);
    let mut w = WorkerInput::new(i8);
    w.grant(true).allreduce(40).wait(300).wait(300).wait(600);
    w.result(0, 16, wire::FLAG_PROBE).wait(600).results(0, 40);
    out.push(("retransmissions-and-probes".into(), w.done()));
    let mut w = WorkerInput::new(f32);
    w.grant(false).grant(true).allreduce(30).error(false);
    w.results(0, 30);
    out.push(("forged-grant-and-error-dropped".into(), w.done()));
    let mut w = WorkerInput::new(f32);
    w.grant(true).allreduce(30).result(0, 16, 0).error(true);
    out.push(("error-with-nonce-fails".into(), w.done()));
    let mut w = WorkerInput::new(f32);
    w.grant(true)
        .allreduce(16)
        .result(0, 16, wire::FLAG_LAST | wire::FLAG_REGRANT)
        .wait(1)
        .grant(true)
        .allreduce(16);
    out.push(("regrant-flag-asks-for-a-grant".into(), w.done()));
    let mut w = WorkerInput::new(f32);
    w.grant(true)
        .allreduce(20)
        .result(0, 16, 0)
        .result(0, 16, 0);
    w.result(1, 3, wire::FLAG_LAST)
        .result(1, 4, wire::FLAG_LAST);
    out.push(("duplicate-and-wrong-count-results".into(), w.done()));
    let mut w = WorkerInput::new(f32);
    w.grant(true).allreduce(20).results(0, 20);
    w.bytes.extend([4, 3, 0x87, 4, 1]);
    out.push(("close-and-echoes".into(), w.done()));
    let mut w = WorkerInput::new(f32);
    w.grant(true).allreduce(10);
    for ms in [300, 600, 1200, 2400, 2400] {
        w.wait(ms);
    }
    out.push(("silent-aggregator".into(), w.done()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names are unique per target (they are file names) and safe on every system.
    #[test]
    fn seed_names_are_unique_file_names() {
        let seeds = all();
        for t in Target::ALL {
            let mut names: Vec<_> = seeds
                .iter()
                .filter(|s| s.target == t)
                .map(|s| &s.name)
                .collect();
            let n = names.len();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), n, "{t:?}: duplicate seed names");
            assert!(n >= 10, "{t:?}: {n} seeds");
        }
        for s in &seeds {
            assert!(
                s.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{}",
                s.name
            );
        }
    }

    /// Every seed reaches what it was made for, and every message kind and codec is
    /// among the datagrams the decoder accepts.
    #[test]
    fn every_seed_reaches_its_purpose() {
        let seeds = all();
        let lost: Vec<_> = seeds
            .iter()
            .filter(|s| !s.reaches())
            .map(|s| format!("{} {}", s.target.name(), s.name))
            .collect();
        assert!(lost.is_empty(), "seeds that miss their purpose: {lost:?}");
        let accepted: Vec<_> = seeds
            .iter()
            .filter(|s| s.target == Target::Decode && !s.must_be_rejected())
            .filter_map(|s| wire::decode(&s.data).ok())
            .collect();
        for kind in 1..=9u8 {
            assert!(
                seeds.iter().any(|s| s.target == Target::Decode
                    && !s.must_be_rejected()
                    && s.data[3] == kind),
                "no seed of message kind {kind}"
            );
        }
        assert!(accepted.len() > 40, "{} datagrams", accepted.len());
    }
}
