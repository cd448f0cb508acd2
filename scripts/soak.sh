#!/usr/bin/env bash
# Soak: one aggregator, a relay that drops 1% and duplicates and reorders 0.5% of
# datagrams, and three jobs allreducing continuously for DURATION seconds (default
# 600). Prints allreduces done, errors, and the aggregator's RSS at the start (after
# a 10 s warm-up) and a second before the end; exits non-zero on any error or RSS growth >= 5%.
#   scripts/soak.sh 600
set -euo pipefail
DURATION="${1:-600}"
LOSS="${SOAK_LOSS:-0.01}"
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN="$PWD/target/release/inagg"
dir="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

# Starts a server in the background and sets LINE to the first line it prints (its
# address); the rest of its output is read on and dropped.
start() { # name, command...
    local name="$1" fd
    shift
    mkfifo "$dir/$name.fifo"
    "$@" >"$dir/$name.fifo" 2>"$dir/$name.err" &
    pids+=("$!")
    exec {fd}<"$dir/$name.fifo"
    read -r -t 30 LINE <&"$fd"
    cat <&"$fd" >/dev/null &
    pids+=("$!")
}

start aggregator "$BIN" aggregator --listen 127.0.0.1:0
agg_pid="${pids[0]}"
agg="${LINE#listening on }"
start relay "$BIN" relay --listen 127.0.0.1:0 --upstream "$agg" \
    --loss "$LOSS" --dup 0.005 --reorder 0.005 --seed 7
relay="$(echo "$LINE" | awk '{print $3}')"
echo "soak: aggregator $agg (pid $agg_pid), relay $relay, loss $LOSS, $DURATION s"

# job: id codec world elements
jobs=("1 i32 3 262144" "2 i32 2 65536" "3 f16 2 131072")
wpids=()
for j in "${jobs[@]}"; do
    read -r id codec world elements <<<"$j"
    for ((r = 0; r < world; r++)); do
        "$BIN" worker --aggregator "$relay" --job "$id" --rank "$r" --world "$world" \
            --codec "$codec" --elements "$elements" --iters 100000000 --warmup 1 \
            --duration-s "$DURATION" --json >"$dir/w$id.$r.json" 2>"$dir/w$id.$r.err" &
        wpids+=("$!")
    done
done

rss() { awk '/^VmRSS/ {print $2}' "/proc/$agg_pid/status"; }
# Both samples while every job runs: after a 10 s warm-up, and a second before the end.
warm=$((DURATION > 20 ? 10 : DURATION / 3))
sleep "$warm"
rss_start="$(rss)"
sleep $((DURATION - warm - 1))
rss_end="$(rss)"
errors=0
for p in "${wpids[@]}"; do
    wait "$p" || errors=$((errors + 1))
done
total=0
for j in "${jobs[@]}"; do
    read -r id codec world elements <<<"$j"
    n="$(grep -o '"allreduces":[0-9]*' "$dir/w$id.0.json" | cut -d: -f2 || true)"
    retx="$(grep -ho '"retransmissions":[0-9]*' "$dir"/w$id.*.json | cut -d: -f2 | awk '{ s += $1 } END { print s + 0 }')"
    echo "soak: job $id ($codec, $world ranks, $elements elements): ${n:-0} allreduces, ${retx:-0} retransmissions"
    total=$((total + ${n:-0}))
done
for f in "$dir"/w*.err; do
    if [ -s "$f" ]; then echo "soak: $(basename "$f"): $(tail -2 "$f")"; fi
done
growth="$(awk -v a="$rss_start" -v b="$rss_end" 'BEGIN { printf "%.2f", (b - a) * 100 / a }')"
echo "soak: $total allreduces, $errors errors, aggregator RSS ${rss_start} kB -> ${rss_end} kB (${growth}%)"
kill -TERM "$agg_pid" 2>/dev/null || true
sleep 0.5
tail -1 "$dir/aggregator.err" || true
if [ "$errors" -gt 0 ] || awk -v g="$growth" 'BEGIN { exit !(g >= 5) }'; then
    exit 1
fi
