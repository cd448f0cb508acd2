#!/usr/bin/python3
"""The Python binding's overhead against the Rust library, in one run: the same
one-rank allreduce (world 1, so no peer's timing enters) through `inagg worker`
(Rust) and through `inagg.Worker.allreduce` (Python, numpy and torch buffers), on
the same aggregator, alternating, medians of every size.

    cargo build --release && /usr/bin/python3 scripts/binding_overhead.py
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import inagg

ROOT = Path(__file__).resolve().parent.parent
BIN = str(ROOT / "target/release/inagg")


def iters(n):
    """Timed calls per size: many for small tensors, whose medians need them."""
    return 300 if n <= 65536 else 30


def rust(addr, job, n):
    out = subprocess.run(
        [BIN, "worker", "--aggregator", addr, "--job", str(job), "--rank", "0", "--world", "1",
         "--elements", str(n), "--iters", str(iters(n)), "--warmup", "10", "--no-check", "--json"],
        capture_output=True, text=True, check=True, timeout=600,
    )
    return statistics.median(json.loads(out.stdout)["times_s"])


def python(addr, job, n, kind):
    with inagg.Worker(addr, job, 0, 1, "f32") as w:
        buf = np.ones(n, dtype=np.float32) if kind == "numpy" else torch.ones(n)
        times = []
        for i in range(iters(n) + 10):
            t0 = time.perf_counter()
            w.allreduce(buf)
            if i >= 10:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def main():
    agg = subprocess.Popen([BIN, "aggregator", "--listen", "127.0.0.1:0"],
                           stdout=subprocess.PIPE, text=True)
    addr = agg.stdout.readline().split()[2]
    job = 1
    print(f"{'elements':>10} {'rust ms':>9} {'numpy ms':>9} {'torch ms':>9} {'numpy/rust':>10} {'torch/rust':>10}")
    try:
        for n in (1024, 65536, 1 << 20, 1 << 24):
            r = rust(addr, job, n)
            p = python(addr, job + 1, n, "numpy")
            t = python(addr, job + 2, n, "torch")
            job += 3
            print(f"{n:>10} {r * 1e3:>9.3f} {p * 1e3:>9.3f} {t * 1e3:>9.3f} {p / r:>10.3f} {t / r:>10.3f}")
    finally:
        agg.terminate()
        agg.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
