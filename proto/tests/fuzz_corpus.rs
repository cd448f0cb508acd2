//! The fuzz harnesses in CI: a fixed corpus (every file under `fuzz/seeds/` and
//! `fuzz/regressions/`) and a bounded proptest run over arbitrary inputs. The long runs
//! are `scripts/fuzz.sh DURATION` (cargo-fuzz, libFuzzer).

use std::path::Path;

use inagg_proto::fuzzing;
use proptest::prelude::*;

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .map(|e| {
            let data = std::fs::read(e.path()).expect("read corpus file");
            (e.path().display().to_string(), data)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn the_fixed_corpus_and_every_regression_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for target in ["decode", "aggregator", "worker"] {
        for sub in ["seeds", "regressions"] {
            for (name, data) in files(&root.join(sub).join(target)) {
                let r = std::panic::catch_unwind(|| match target {
                    "decode" => u64::from(fuzzing::decode(&data)),
                    "worker" => fuzzing::worker(&data),
                    _ => fuzzing::aggregator(&data),
                });
                assert!(r.is_ok(), "{name} crashes the {target} harness");
                n += 1;
            }
        }
    }
    assert!(n >= 10, "the fixed corpus is missing ({n} files)");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_datagrams_decode_or_fail_cleanly(data in proptest::collection::vec(any::<u8>(), 0..200)) {
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
