#!/usr/bin/env bash
# Writes the fuzzers' seeds (fuzz/seeds/<target>/) from today's encoders
# (inagg_proto::fuzzing::seeds), replacing the old ones. Run it whenever the wire
# changes; proto/tests/fuzz_corpus.rs fails until the committed seeds are today's.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet -p inagg-proto --example fuzz_seeds -- fuzz/seeds
