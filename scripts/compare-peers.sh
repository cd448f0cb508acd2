#!/usr/bin/env bash
# Allreduce (f32 SUM) with PyTorch's Gloo backend, with MPI over TCP, and with
# `inagg bench` for each codec, at the same worker counts and tensor sizes, medians
# after warm-ups; writes OUT/peers.csv and OUT/peers.png and prints each system's
# ATE/s with its ratio to Gloo.
#   scripts/compare-peers.sh [--workers 2,4] [--elements 4194304,16777216,67108864]
#       [--codecs f32,f16,bf16,i32,i16,i8] [--iters 5] [--out DIR] [--link-rate RATE]
#       [--aggregator-threads T] [--rounds R]
# --link-rate runs the same comparison inside scripts/netlab.sh's emulated cluster
# (MPI's daemons start in the worker namespaces through scripts/peers/netns-rsh) and
# adds, for inagg, the fraction of the line-rate bound reached. --aggregator-threads
# runs inagg's aggregator as T shards (`inagg aggregator --threads T`); default 1.
# --rounds R repeats the whole comparison R times, the systems in turn within each
# round, and reports per system the median over rounds of its ratio to Gloo in the
# same round, with the spread (min-max), and the machine's CPU model and cores
# (OUT/peers-summary.csv); default 1. With several worker counts it also plots each
# system's median ATE/s and ratio to Gloo against N (OUT/ate_vs_workers.png,
# OUT/ratio_vs_workers.png).
# INAGG_BIN=PATH uses that inagg binary instead of building this tree.
# Installs Debian's python3-torch, openmpi-bin and python3-mpi4py if missing; uses
# Debian's interpreter, /usr/bin/python3.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=2,4
ELEMENTS=4194304,16777216,67108864
CODECS=f32,f16,bf16,i32,i16,i8
ITERS=5
OUT=inagg-out/peers
RATE=""
AGG_THREADS=1
ROUNDS=1
while [ $# -gt 0 ]; do
    case "$1" in
        --workers) WORKERS="$2"; shift 2 ;;
        --elements) ELEMENTS="$2"; shift 2 ;;
        --codecs) CODECS="$2"; shift 2 ;;
        --iters) ITERS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --link-rate) RATE="$2"; shift 2 ;;
        --aggregator-threads) AGG_THREADS="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        *) echo "compare-peers: unknown flag $1" >&2; exit 2 ;;
    esac
done
if ! [[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]]; then
    echo "compare-peers: --rounds must be a positive whole number, not $ROUNDS" >&2
    exit 2
fi
PY=/usr/bin/python3
if ! "$PY" -c "import torch, mpi4py" 2>/dev/null || ! command -v mpirun >/dev/null; then
    echo "compare-peers: installing python3-torch, openmpi-bin, python3-mpi4py" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3-torch openmpi-bin python3-mpi4py >/dev/null
fi
# INAGG_BIN: an inagg binary to compare instead of this tree's release build (to
# alternate two builds in the same minutes).
if [ -n "${INAGG_BIN:-}" ]; then
    BIN="$INAGG_BIN"
else
    cargo build --release --quiet
    BIN="$PWD/target/release/inagg"
fi
mkdir -p "$OUT"
results="$OUT/results.jsonl"
: >"$results"
IFS=, read -r -a worker_list <<<"$WORKERS"
IFS=, read -r -a size_list <<<"$ELEMENTS"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

# Gloo: one process per rank; in netlab, rank r in worker r's namespace.
gloo() { # workers elements
    local n="$1" e="$2" pids=() r master port=$((29500 + RANDOM % 400))
    if [ -n "$RATE" ]; then master="198.18.0.10:$port"; else master="127.0.0.1:$port"; fi
    for ((r = n - 1; r >= 0; r--)); do
        local prefix=()
        if [ -n "$RATE" ]; then
            prefix=(ip netns exec "${INAGG_NETLAB_WORKER_NETNS}${r}"
                env "GLOO_SOCKET_IFNAME=${INAGG_NETLAB_WORKER_DEV}${r}")
        fi
        "${prefix[@]}" "$PY" scripts/peers/gloo_allreduce.py --rank "$r" --world "$n" \
            --master "$master" --elements "$e" --iters "$ITERS" --warmup 1 >>"$results" &
        pids+=("$!")
    done
    for p in "${pids[@]}"; do wait "$p" || echo "compare-peers: a Gloo rank failed (N=$n, E=$e)" >&2; done
}

# MPI over TCP; in netlab, mpirun runs in the aggregator's namespace (unlimited link
# to the bridge) and starts rank r's daemon in worker r's namespace through
# scripts/peers/netns-rsh, its remote shell, so every rank sends over its own link.
# Its daemons talk to mpirun directly (routed=direct): through the default tree of
# daemons, mpirun sometimes found no route to a daemon in the lab.
mpi() { # workers elements
    local n="$1" e="$2" where=(--oversubscribe --mca btl_tcp_if_include lo) prefix=() r hosts=()
    if [ -n "$RATE" ]; then
        for ((r = 0; r < n; r++)); do hosts+=("198.18.0.$((10 + r)):1"); done
        prefix=(ip netns exec "$INAGG_NETLAB_AGG_NETNS")
        where=(--host "$(IFS=,; echo "${hosts[*]}")" --mca plm_rsh_agent "$PWD/scripts/peers/netns-rsh"
            --mca btl_tcp_if_include 198.18.0.0/15 --mca oob_tcp_if_include 198.18.0.0/15
            --mca routed direct)
    fi
    # Open MPI prints its errors as banners, to standard output too: only the JSON
    # line of a run that succeeded is a measurement.
    local log
    log=$(mktemp)
    if "${prefix[@]}" mpirun -np "$n" "${where[@]}" --mca btl tcp,self --mca pml ob1 \
        "$PY" "$PWD/scripts/peers/mpi_allreduce.py" --elements "$e" \
        --iters "$ITERS" --warmup 1 >"$log" 2>&1; then
        grep '^{' "$log" >>"$results" ||
            last_words "$log" "MPI printed no measurement (N=$n, E=$e)"
    else
        last_words "$log" "MPI run failed (N=$n, E=$e), left out of the report"
    fi
    rm -f "$log"
}

last_words() { # log why: says why on stderr, then the log's last 20 lines
    echo "compare-peers: $2; its last words:" >&2
    tail -n 20 "$1" | sed 's/^/  mpi: /' >&2
}

inagg() { # workers elements
    "$BIN" bench --workers "$1" --elements "$2" --codec "$CODECS" --iters "$ITERS" \
        --warmup 1 --aggregator-threads "$AGG_THREADS" --json >>"$results"
}

measure() {
    local round
    for ((round = 1; round <= ROUNDS; round++)); do
        echo "{\"round\": $round}" >>"$results"
        for n in "${worker_list[@]}"; do
            for e in "${size_list[@]}"; do
                echo "compare-peers: round $round of $ROUNDS, N=$n, $e elements" >&2
                gloo "$n" "$e"
                mpi "$n" "$e"
                inagg "$n" "$e"
            done
        done
    done
}

if [ -n "$RATE" ]; then
    max=0
    for n in "${worker_list[@]}"; do [ "$n" -gt "$max" ] && max="$n"; done
    # Run this very script's measuring part inside the cluster.
    export -f gloo mpi inagg measure last_words
    export PY BIN ITERS CODECS RATE AGG_THREADS ROUNDS results
    export WORKERS_LIST="${worker_list[*]}" SIZES_LIST="${size_list[*]}"
    scripts/netlab.sh --workers "$max" --link-rate "$RATE" -- bash -c '
        set -euo pipefail
        read -r -a worker_list <<<"$WORKERS_LIST"
        read -r -a size_list <<<"$SIZES_LIST"
        measure'
    network="$RATE links"
else
    measure
    network="loopback"
fi
"$BIN" peers-report --input "$results" --out "$OUT" --network "$network"
