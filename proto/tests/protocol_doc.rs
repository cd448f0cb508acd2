//! `docs/protocol.md` against today's code: every `vector:NAME` and `values:NAME`
//! block of the specification is made again, by the encoders and by two worker state
//! machines and an aggregator run against each other in memory
//! (`proto/examples/protocol_vectors.rs`), and must hold exactly those bytes and
//! values. A changed encoder, header, codec, numbering or schedule fails here, naming
//! the block; the document is then brought up to date with
//! `cargo run -p inagg-proto --example protocol_vectors -- --write docs/protocol.md`
//! and its prose reviewed with the diff.

#[allow(dead_code)]
#[path = "../examples/protocol_vectors.rs"]
mod vectors;

use inagg_proto::codec::CodecId;
use inagg_proto::wire::{self, Message};
use vectors::Body;

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md");
    std::fs::read_to_string(path).expect("docs/protocol.md reads")
}

/// The document's blocks, parsed, with their info strings (`text vector:join`).
fn doc_bodies() -> Vec<(String, Body)> {
    vectors::doc_blocks(&doc())
        .into_iter()
        .map(|(name, values, text)| {
            let kind = if values { "values" } else { "vector" };
            let info = format!("text {kind}:{name}");
            let body = vectors::parse_body(values, &text)
                .unwrap_or_else(|e| panic!("block {info} of docs/protocol.md: {e}"));
            (info, body)
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// What differs between the document's block and the code's, if anything.
fn difference(doc: &Body, code: &Body) -> Option<String> {
    match (doc, code) {
        (Body::Vector(d), Body::Vector(c)) => {
            if d.len() != c.len() {
                return Some(format!(
                    "{} datagrams in the doc, {} made",
                    d.len(),
                    c.len()
                ));
            }
            for (i, (x, y)) in d.iter().zip(c).enumerate() {
                if (&x.from, &x.to) != (&y.from, &y.to) {
                    return Some(format!(
                        "datagram {}: {} -> {} in the doc, {} -> {} made",
                        i + 1,
                        x.from,
                        x.to,
                        y.from,
                        y.to
                    ));
                }
                if x.bytes != y.bytes {
                    let at = x.bytes.iter().zip(&y.bytes).position(|(a, b)| a != b);
                    return Some(format!(
                        "datagram {} ({}): {} bytes in the doc, {} made, first difference at byte {}",
                        i + 1,
                        vectors::describe(&y.bytes, y.from == "agg"),
                        x.bytes.len(),
                        y.bytes.len(),
                        at.unwrap_or(x.bytes.len().min(y.bytes.len()))
                    ));
                }
            }
            None
        }
        (Body::Values(d), Body::Values(c)) => {
            if d.len() != c.len() {
                return Some(format!("{} lines in the doc, {} made", d.len(), c.len()));
            }
            for (x, y) in d.iter().zip(c) {
                if x.label != y.label || bits(&x.values) != bits(&y.values) {
                    return Some(format!(
                        "{}: {:?} in the doc, {}: {:?} made",
                        x.label, x.values, y.label, y.values
                    ));
                }
            }
            None
        }
        _ => Some("a block of another kind".to_string()),
    }
}

#[test]
fn every_block_of_the_specification_is_what_the_code_makes() {
    let doc = doc_bodies();
    let made = vectors::all();
    assert!(made.len() > 20, "the generator makes {} blocks", made.len());
    let mut problems = Vec::new();
    for b in &made {
        let info = b.info();
        match doc.iter().find(|(i, _)| *i == info) {
            None => problems.push(format!("missing from the doc: ```{info}")),
            Some((_, body)) => {
                if let Some(d) = difference(body, &b.body) {
                    problems.push(format!("```{info} differs: {d}"));
                }
            }
        }
    }
    for (info, _) in &doc {
        if !made.iter().any(|b| b.info() == *info) {
            problems.push(format!("```{info} in the doc is made by nothing"));
        }
        if doc.iter().filter(|(i, _)| i == info).count() > 1 {
            problems.push(format!("```{info} appears more than once"));
        }
    }
    problems.dedup();
    assert!(
        problems.is_empty(),
        "docs/protocol.md and the code differ (regenerate with `cargo run -p inagg-proto \
         --example protocol_vectors -- --write docs/protocol.md` and review the prose):\n{}",
        problems.join("\n")
    );
}

/// The one-datagram vectors cover every message kind, and each decodes to the kind
/// its name says.
#[test]
fn the_message_vectors_cover_every_kind() {
    let mut kinds = Vec::new();
    for b in vectors::all() {
        let Body::Vector(ds) = &b.body else { continue };
        if b.name.starts_with("codec-") || b.name.starts_with("allreduce-") {
            continue;
        }
        assert_eq!(ds.len(), 1, "{}", b.name);
        let kind = match wire::decode(&ds[0].bytes) {
            Ok(Message::Join(_)) => "join",
            Ok(Message::Grant(_)) => "grant",
            Ok(Message::Contribution(..)) => "contribution",
            Ok(Message::Result(..)) => "result",
            Ok(Message::Partial(..)) => "partial",
            Ok(Message::Leave(_)) => "leave",
            Ok(Message::Heartbeat(_)) => "heartbeat",
            Ok(Message::Error(_)) => "error",
            Ok(Message::Regrant(_)) => "regrant",
            Err(e) => panic!("{} does not decode: {e}", b.name),
        };
        assert!(b.name.starts_with(kind), "{} decodes as a {kind}", b.name);
        kinds.push(kind);
    }
    for k in [
        "join",
        "grant",
        "contribution",
        "result",
        "leave",
        "heartbeat",
        "error",
        "regrant",
        "partial",
    ] {
        assert!(kinds.contains(&k), "no vector of a {k}");
    }
    // The proven join proves the key, and only that key.
    let proven = vectors::all()
        .into_iter()
        .find(|b| b.name == "join-proven")
        .expect("a proven join");
    let Body::Vector(ds) = &proven.body else {
        panic!("a vector")
    };
    let Ok(Message::Join(j)) = wire::decode(&ds[0].bytes) else {
        panic!("a join")
    };
    assert!(j.proves(vectors::ADMISSION_KEY));
    assert!(!j.proves(b"another admission key, 32 bytes!"));
}

/// The runs' datagrams all decode, every rank's result is the sum within the codec's
/// own error (checked against a float64 sum, not against the code), and the f32 sums,
/// of values whose sums are exact, are exact.
#[test]
fn the_two_rank_runs_sum_their_tensors() {
    for spec in vectors::run_specs() {
        let (datagrams, values) = vectors::run(&spec);
        assert!(!datagrams.is_empty(), "{}", spec.name);
        for d in &datagrams {
            assert!(
                wire::decode(&d.bytes).is_ok(),
                "{}: a datagram does not decode",
                spec.name
            );
        }
        for (k, call) in spec.calls.iter().enumerate() {
            let sum = &values
                .iter()
                .find(|v| v.label == format!("call {} sum", k + 1))
                .expect("a sum")
                .values;
            assert_eq!(sum.len(), call[0].len(), "{}", spec.name);
            let chunk = usize::from(spec.chunk);
            for (j, start) in (0..sum.len()).step_by(chunk).enumerate() {
                let end = (start + chunk).min(sum.len());
                // The largest magnitude of the chunk over both ranks: its exponent
                // bounds every fixed-point step.
                let top = call
                    .iter()
                    .flat_map(|v| &v[start..end])
                    .fold(0f64, |m, x| m.max(f64::from(x.abs())));
                let rows = call[0][start..end]
                    .iter()
                    .zip(&call[1][start..end])
                    .zip(&sum[start..end]);
                for (i, ((a, b), got)) in (start..).zip(rows) {
                    let exact = f64::from(*a) + f64::from(*b);
                    let err = (f64::from(*got) - exact).abs();
                    let bound = match spec.codec {
                        CodecId::F32 => 0.0,
                        // i32 at N = 2: steps of 2^(e + 1 - 30), one per rank.
                        CodecId::I32 => 2.0 * top * 2f64.powi(-29),
                        // i8 at N = 2: at most a step of 2^(e + 1 - 7) per rank (the
                        // clamp, or stochastic rounding), and half a step of the
                        // result, which is twice as coarse: 3 * 2^(e - 6) in all,
                        // below 4 * top * 2^-6.
                        _ => 4.0 * top * 2f64.powi(-6),
                    };
                    assert!(
                        err <= bound,
                        "{} call {} chunk {j} element {i}: {got} for {exact} (error {err} > {bound})",
                        spec.name,
                        k + 1,
                    );
                }
            }
        }
    }
}
