//! The fuzz harnesses in CI: the seeds (`fuzz/seeds/`), which must be exactly what
//! today's encoders make and must each reach what they were made for; the corpus the
//! fuzzers grew and `scripts/fuzz.sh` minimized (`fuzz/corpus/`); every regression
//! (`fuzz/regressions/`); and bounded proptest runs over arbitrary and mutated
//! inputs. The long runs are `scripts/fuzz.sh DURATION` (cargo-fuzz, libFuzzer).

use std::path::{Path, PathBuf};

use inagg_proto::fuzzing::{self, seeds, seeds::Target};
use inagg_proto::wire;
use proptest::prelude::*;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir` as (name, bytes), sorted; `None` if the directory is missing.
fn files(dir: &Path) -> Option<Vec<(String, Vec<u8>)>> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut out: Vec<_> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .map(|e| {
            let data = std::fs::read(e.path()).expect("read corpus file");
            (e.file_name().to_string_lossy().into_owned(), data)
        })
        .collect();
    out.sort();
    Some(out)
}

fn run(target: Target, data: &[u8]) -> u64 {
    match target {
        Target::Decode => u64::from(fuzzing::decode(data)),
        Target::Aggregator => fuzzing::aggregator(data),
        Target::Worker => fuzzing::worker(data),
    }
}

/// Runs `data` through `target`'s harness; a panic is the input's name in the failure.
fn replay(target: Target, name: &str, data: &[u8]) -> u64 {
    match std::panic::catch_unwind(|| run(target, data)) {
        Ok(n) => n,
        Err(_) => panic!("{name} crashes the {} harness", target.name()),
    }
}

#[test]
fn the_seeds_are_todays_and_each_reaches_its_purpose() {
    let all = seeds::all();
    for target in Target::ALL {
        let dir = fuzz_dir().join("seeds").join(target.name());
        let on_disk = files(&dir).unwrap_or_else(|| panic!("{} is missing", dir.display()));
        let mut made: Vec<_> = all
            .iter()
            .filter(|s| s.target == target)
            .map(|s| (s.name.clone(), s.data.clone()))
            .collect();
        made.sort();
        let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        let (disk_names, made_names) = (names(&on_disk), names(&made));
        let missing: Vec<_> = made_names
            .iter()
            .filter(|n| !disk_names.contains(n))
            .collect();
        let stale: Vec<_> = disk_names
            .iter()
            .filter(|n| !made_names.contains(n))
            .collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "{}: not the seeds today's encoders make ({} missing, first {:?}; {} stale, first {:?}); \
             run scripts/fuzz-seeds.sh",
            dir.display(),
            missing.len(),
            missing.first(),
            stale.len(),
            stale.first(),
        );
        for ((name, disk), (_, now)) in on_disk.iter().zip(&made) {
            assert!(
                disk == now,
                "{}/{name} differs from what today's encoders make; run scripts/fuzz-seeds.sh",
                dir.display()
            );
            replay(target, name, disk);
            assert!(
                seeds::reaches(target, name, disk),
                "{}/{name} no longer reaches what it was made for",
                dir.display()
            );
        }
    }
}

/// The grown corpus replays without a crash, and is not stale: most of its datagrams
/// carry today's magic and version, so that they reach the message parsers (a corpus
/// grown on another wire version stops at the version byte).
#[test]
fn the_kept_corpus_and_every_regression_replay() {
    for target in Target::ALL {
        let dir = fuzz_dir().join("corpus").join(target.name());
        let corpus = files(&dir).unwrap_or_else(|| panic!("{} is missing", dir.display()));
        assert!(
            corpus.len() >= 10,
            "{}: {} inputs; grow it with scripts/fuzz.sh",
            dir.display(),
            corpus.len()
        );
        for (name, data) in &corpus {
            replay(target, name, data);
        }
        if target == Target::Decode {
            let today = corpus
                .iter()
                .filter(|(_, d)| d.starts_with(&wire::MAGIC) && d.get(2) == Some(&wire::VERSION))
                .count();
            assert!(
                today * 4 >= corpus.len() * 3,
                "{}: only {today} of {} inputs are of wire version {}; regrow it \
                 (scripts/fuzz.sh --fresh)",
                dir.display(),
                corpus.len(),
                wire::VERSION
            );
        }
        // Regressions exist only for targets that once crashed.
        let dir = fuzz_dir().join("regressions").join(target.name());
        for (name, data) in files(&dir).unwrap_or_default() {
            replay(target, &name, &data);
        }
    }
}

fn decode_seeds() -> Vec<Vec<u8>> {
    seeds::all()
        .into_iter()
        .filter(|s| s.target == Target::Decode)
        .map(|s| s.data)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_datagrams_decode_or_fail_cleanly(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        fuzzing::decode(&data);
    }

    /// Past the magic bytes and the version, into every message kind's parser.
    #[test]
    fn arbitrary_bodies_under_a_valid_header_decode_or_fail_cleanly(
        kind in 0u8..10,
        body in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut data = wire::MAGIC.to_vec();
        data.extend([wire::VERSION, kind]);
        data.extend(body);
        fuzzing::decode(&data);
    }

    /// Valid datagrams with a few bytes changed, cut or lengthened.
    #[test]
    fn mutated_datagrams_decode_or_fail_cleanly(
        which in any::<prop::sample::Index>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        extend in 0usize..3,
    ) {
        let seeds = decode_seeds();
        let mut data = which.get(&seeds).clone();
        for (at, byte) in edits {
            let i = at.index(data.len());
            data[i] = byte;
        }
        if extend == 0 {
            data.truncate(cut.index(data.len() + 1));
        } else {
            data.extend(std::iter::repeat_n(0x5a, extend));
        }
        fuzzing::decode(&data);
    }

    #[test]
    fn arbitrary_datagrams_and_clock_steps_never_break_a_worker(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
        fuzzing::worker(&data);
    }

    #[test]
    fn arbitrary_packet_sequences_never_break_the_aggregator(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
        fuzzing::aggregator(&data);
    }
}
