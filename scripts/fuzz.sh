#!/usr/bin/env bash
# Fuzzes the packet decoder and the aggregator and worker state machines with cargo-fuzz
# (libFuzzer) for DURATION seconds each (default 60), on the stable toolchain, then
# minimizes the grown corpus in place.
#   scripts/fuzz.sh 600
#   scripts/fuzz.sh --fresh 120   # after a wire change: drop the corpus, grow it anew
# The corpus lives in fuzz/corpus/<target>/ (committed, replayed by CI with the seeds
# and regressions in proto/tests/fuzz_corpus.rs), seeded from fuzz/seeds/<target>/
# (scripts/fuzz-seeds.sh). Crashes land in fuzz/artifacts/<target>/; copy each into
# fuzz/regressions/<target>/ and CI replays it. Exits non-zero if the fuzz build
# fails, a target crashes, or libFuzzer stops for any other reason.
set -euo pipefail
fresh=0
if [ "${1:-}" = "--fresh" ]; then
    fresh=1
    shift
fi
DURATION="${1:-60}"
case "$DURATION" in
'' | *[!0-9]*) echo "fuzz: DURATION must be whole seconds, not '$DURATION'" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/../fuzz"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
targets=(decode aggregator worker)
# -s none: no sanitizer, so that stable Rust builds it; overflow checks stay on.
if ! cargo fuzz build -s none --release; then
    echo "fuzz: the fuzz targets do not build" >&2
    exit 1
fi
total=0
for target in "${targets[@]}"; do
    if [ "$fresh" = 1 ]; then
        rm -rf "corpus/$target"
    fi
    mkdir -p "corpus/$target"
    log="$(mktemp)"
    status=0
    # Reads the seeds too, but writes what it finds only to the corpus.
    cargo fuzz run -s none --release "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$DURATION" -print_final_stats=1 -max_len=4096 >"$log" 2>&1 || status=$?
    grep -E "^#[0-9]+ +DONE" "$log" || true
    if [ "$status" != 0 ]; then
        tail -40 "$log" >&2
        echo "fuzz: $target stopped with status $status; a crash is in fuzz/artifacts/$target" >&2
        exit 1
    fi
    runs="$(awk '/stat::number_of_executed_units/ { n = $2 } END { print n + 0 }' "$log")"
    if [ "$runs" = 0 ]; then
        tail -40 "$log" >&2
        echo "fuzz: $target ran no input" >&2
        exit 1
    fi
    echo "fuzz: $target: $runs inputs in ${DURATION} s, no crash"
    total="$(awk -v a="$total" -v b="$runs" 'BEGIN { print a + b }')"
    # Keep only the inputs that add coverage.
    before="$(ls "corpus/$target" | wc -l)"
    if ! cargo fuzz cmin -s none --release "$target" "corpus/$target" -- -max_len=4096 >"$log" 2>&1; then
        tail -20 "$log" >&2
        echo "fuzz: minimizing $target's corpus failed" >&2
        exit 1
    fi
    echo "fuzz: $target: corpus minimized from $before to $(ls "corpus/$target" | wc -l) inputs"
    rm -f "$log"
done
echo "fuzz: $total inputs in all"
