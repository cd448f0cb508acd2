#!/usr/bin/env bash
# What failover costs and how fast a job resumes, on this machine.
#   scripts/failover.sh [--rounds R] [--elements E] [--workers N] [--codecs C,...]
# 1. Cost: R alternating rounds of `inagg bench` without and with
#    `--failover-standby` (each rank keeps a copy of every allreduce's input); prints
#    each round's median allreduce time and the median ratio with its spread.
# 2. Resume: N `inagg worker` ranks (i32) on aggregator A with `--failover B`; A is
#    killed (SIGKILL, then in a second run SIGTERM) mid-run; prints each rank's
#    time from the failure to its grant on B (`failovers[].resume_s`).
# Builds the release binary first. Prints the CPU model and core count.
set -euo pipefail
ROUNDS=3
ELEMENTS=16777216
WORKERS=4
CODECS=i32,f32
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --elements) ELEMENTS="$2"; shift 2 ;;
        --workers) WORKERS="$2"; shift 2 ;;
        --codecs) CODECS="$2"; shift 2 ;;
        *) echo "unknown flag $1" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=target/release/inagg
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
tmp="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT

echo "== cost: $ROUNDS alternating rounds, $WORKERS workers, $ELEMENTS elements"
for r in $(seq 1 "$ROUNDS"); do
    for mode in plain standby; do
        extra=()
        [ "$mode" = standby ] && extra=(--failover-standby)
        "$BIN" bench --workers "$WORKERS" --elements "$ELEMENTS" --codec "$CODECS" \
            --iters 5 --json "${extra[@]}" >"$tmp/$mode-$r.json"
    done
done
/usr/bin/python3 - "$tmp" "$ROUNDS" <<'EOF'
import json, statistics, sys
tmp, rounds = sys.argv[1], int(sys.argv[2])
rows = {}
for r in range(1, rounds + 1):
    for mode in ("plain", "standby"):
        for line in open(f"{tmp}/{mode}-{r}.json"):
            row = json.loads(line)
            rows.setdefault(row["codec"], {}).setdefault(mode, []).append(row["median_s"])
for codec, m in rows.items():
    ratios = [s / p for p, s in zip(m["plain"], m["standby"])]
    print(f"{codec}: plain {' '.join(f'{1e3*x:.1f}' for x in m['plain'])} ms, "
          f"with failover {' '.join(f'{1e3*x:.1f}' for x in m['standby'])} ms; "
          f"ratio median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
EOF

start_agg() {
    "$BIN" aggregator --listen 127.0.0.1:0 >"$tmp/$1.out" 2>/dev/null &
    echo $! >"$tmp/$1.pid"
    for _ in $(seq 100); do
        grep -q "listening on" "$tmp/$1.out" 2>/dev/null && break
        sleep 0.05
    done
    sed -n 's/^listening on //p' "$tmp/$1.out"
}

echo "== resume: $WORKERS ranks of i32, 4 Mi elements, the first aggregator killed mid-run"
for sig in KILL TERM; do
    a="$(start_agg a)"
    b="$(start_agg b)"
    pids=()
    for rank in $(seq 0 $((WORKERS - 1))); do
        "$BIN" worker --aggregator "$a" --failover "$b" --job 9 --rank "$rank" \
            --world "$WORKERS" --codec i32 --elements 4194304 --iters 200 --no-check \
            --json >"$tmp/rank-$rank.json" &
        pids+=($!)
    done
    sleep 2
    kill -"$sig" "$(cat "$tmp/a.pid")"
    for p in "${pids[@]}"; do wait "$p"; done
    /usr/bin/python3 - "$tmp" "$WORKERS" "$sig" <<'EOF'
import json, sys
tmp, n, sig = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for r in range(n):
    rep = json.loads(open(f"{tmp}/rank-{r}.json").read().strip().splitlines()[-1])
    f = rep["failovers"]
    took = ", ".join(f"{1e3 * x['resume_s']:.0f} ms ({x['cause']})" for x in f) or "no failover"
    print(f"SIG{sig}: rank {r}: {rep['allreduces']} allreduces, checksum {rep['result_checksum']}, resumed after {took}")
EOF
    kill "$(cat "$tmp/b.pid")" 2>/dev/null || true
    wait 2>/dev/null || true
done
