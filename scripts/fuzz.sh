#!/usr/bin/env bash
# Fuzzes the packet decoder and the aggregator and worker state machines with cargo-fuzz
# (libFuzzer) for DURATION seconds each (default 60), on the stable toolchain.
#   scripts/fuzz.sh 600
# The corpus grows in fuzz/corpus/<target>/ (not committed), starting from
# fuzz/seeds/<target>/. Crashes land in fuzz/artifacts/<target>/; copy each into
# fuzz/regressions/<target>/ and CI replays it with the seeds
# (proto/tests/fuzz_corpus.rs).
set -euo pipefail
DURATION="${1:-60}"
cd "$(dirname "$0")/../fuzz"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
total=0
for target in decode aggregator worker; do
    mkdir -p "corpus/$target"
    cp -n seeds/"$target"/* "corpus/$target/" 2>/dev/null || true
    log="$(mktemp)"
    # -s none: no sanitizer, so that stable Rust builds it; overflow checks stay on.
    cargo fuzz run -s none --release "$target" "corpus/$target" -- \
        -max_total_time="$DURATION" -print_final_stats=1 -max_len=4096 >"$log" 2>&1 || true
    grep -E "^#[0-9]+ +DONE|ERROR|panicked" "$log" || true
    if grep -q "ERROR: libFuzzer\|panicked" "$log"; then
        tail -40 "$log" >&2
        echo "fuzz: $target crashed; see fuzz/artifacts/$target" >&2
        exit 1
    fi
    runs="$(awk '/stat::number_of_executed_units/ { n = $2 } END { print n + 0 }' "$log")"
    echo "fuzz: $target: $runs inputs in ${DURATION} s, no crash"
    total="$(awk -v a="$total" -v b="$runs" 'BEGIN { print a + b }')"
    rm -f "$log"
done
echo "fuzz: $total inputs in all"
