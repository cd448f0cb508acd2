#!/usr/bin/env bash
# The least time N ranks on this machine need just to touch their tensors, per
# allreduce: each rank (a process, as inagg's workers are) reads its f32 tensor R times
# into a small buffer that stays in cache, as an encoder does, and writes it once
# from such a buffer, as a decoder does, each pass asking for the tensor 2 KiB ahead
# as inagg's kernels do; all N at once, on whatever cores there are.
# No network, no sum, no kernel: a floor under any allreduce that reads and writes
# the tensor in place, inagg's or a ring's.
#   scripts/memory-floor.sh [--workers 4] [--elements 16777216] [--reads 1,2]
# Prints, per R, the milliseconds per allreduce (the median of 5 rounds of 20 passes
# each, the set-up subtracted). inagg's passes: f32, f16, bf16 read once (the f32
# payload by the kernel's send copy), i32, i16, i8 twice (the block exponents first);
# every codec writes once (decoding). Needs a C compiler ($CC, else cc).
set -euo pipefail
WORKERS=4
ELEMENTS=16777216
READS=1,2
while [ $# -gt 0 ]; do
    case "$1" in
        --workers | --elements | --reads)
            [ $# -ge 2 ] || { echo "memory-floor: $1 needs a value" >&2; exit 2; }
            case "$1" in
                --workers) WORKERS="$2" ;;
                --elements) ELEMENTS="$2" ;;
                --reads) READS="$2" ;;
            esac
            shift 2 ;;
        *) echo "memory-floor: unknown flag $1" >&2; exit 2 ;;
    esac
done
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || { echo "memory-floor: --workers must be a positive integer" >&2; exit 2; }
[[ "$ELEMENTS" =~ ^[1-9][0-9]*$ ]] || { echo "memory-floor: --elements must be a positive integer" >&2; exit 2; }
[[ "$READS" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "memory-floor: --reads takes counts like 1,2" >&2; exit 2; }
CC=${CC:-cc}
command -v "$CC" >/dev/null || { echo "memory-floor: needs a C compiler ($CC)" >&2; exit 1; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat >"$dir/floor.c" <<'EOF'
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
/* Copies k floats in blocks of 256, first asking for the tensor's side 2 KiB ahead,
   one prefetch per line, as inagg's kernels do (`kernels::prefetch_block`, a read
   prefetch for reads and writes alike): without it a pass is bound by the memory's
   latency, and the floor would lie above what inagg's decoders reach. */
enum { BLOCK = 256, AHEAD = 2048 };
static void copy_ahead(float *dst, const float *src, size_t k, const float *tensor) {
    for (size_t b = 0; b < k; b += BLOCK) {
        size_t m = k - b < BLOCK ? k - b : BLOCK;
        /* Integer arithmetic: the address may lie past the tensor's end, and a
           prefetch of it is a hint that never faults. */
        uintptr_t ahead = (uintptr_t)(tensor + b) + AHEAD;
        for (int l = 0; l < BLOCK * 4 / 64; l++)
            __builtin_prefetch((const void *)(ahead + 64 * (uintptr_t)l), 0, 3);
        memcpy(dst + b, src + b, m * sizeof *src);
    }
}
/* rank ELEMENTS READS ITERS: READS read passes and one write pass, ITERS times. */
int main(int argc, char **argv) {
    if (argc != 4) return 2;
    size_t n = strtoull(argv[1], 0, 10);
    int reads = atoi(argv[2]), iters = atoi(argv[3]);
    enum { CHUNK = 8192 };
    float *t = malloc(n * sizeof *t), hot[CHUNK];
    if (!t) return 1;
    for (size_t i = 0; i < n; i++) t[i] = (float)(i % 1000) - 500.0f;
    for (size_t i = 0; i < CHUNK; i++) hot[i] = (float)i;
    volatile float sink = 0;
    for (int it = 0; it < iters; it++) {
        for (int r = 0; r < reads; r++)
            for (size_t c = 0; c < n; c += CHUNK) {
                size_t k = n - c < CHUNK ? n - c : CHUNK;
                copy_ahead(hot, t + c, k, t + c);
                sink += hot[k / 2];
            }
        for (size_t c = 0; c < n; c += CHUNK) {
            size_t k = n - c < CHUNK ? n - c : CHUNK;
            hot[0] = (float)it;
            copy_ahead(t + c, hot, k, t + c);
        }
    }
    /* The tensor's stores must happen: tell the compiler it is read. */
    __asm__ volatile("" : : "r"(t) : "memory");
    free(t);
    return sink == 12345.0f;
}
EOF
"$CC" -O2 -o "$dir/floor" "$dir/floor.c"
# Wall time of WORKERS ranks doing ITERS allreduces' passes each, all at once.
wall() {
    local start end r pids=()
    start=$(date +%s%N)
    for ((r = 0; r < WORKERS; r++)); do
        "$dir/floor" "$ELEMENTS" "$1" "$2" &
        pids+=("$!")
    done
    for r in "${pids[@]}"; do
        wait "$r" || { echo "memory-floor: a rank failed (out of memory?)" >&2; exit 1; }
    done
    end=$(date +%s%N)
    echo $(((end - start) / 1000))
}
echo "memory-floor: $WORKERS ranks, $ELEMENTS f32 elements each, $(nproc) cores"
IFS=, read -ra reads <<<"$READS"
for r in "${reads[@]}"; do
    runs=()
    for _ in 1 2 3 4 5; do
        # Twenty-one allreduces less one: the set-up (allocation, first touch) cancels.
        a=$(wall "$r" 1)
        b=$(wall "$r" 21)
        runs+=("$(((b - a) / 20))")
    done
    median=$(printf '%s\n' "${runs[@]}" | sort -n | sed -n 3p)
    [ "$median" -ge 0 ] || median=0 # Below what process start-up noise lets it see.
    printf 'reads %s + write 1: %d.%03d ms per allreduce\n' "$r" $((median / 1000)) $((median % 1000))
done
