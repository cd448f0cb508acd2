#!/usr/bin/env python3
"""The flows and the short-flow probe over time, for scenarios that
`scripts/sharing.py` ran: one panel per scenario directory (OUT/SCENARIO, where
sharing.py leaves meter.json and probe.json), each with the Mbit/s that the TCP flows
and the job delivered through the bottleneck in 100 ms buckets, and beside them the
probe's round trips. With --slowest N, it also prints the probe's N slowest round
trips within the job's window, each beside the rates of the flows and of the job in
its bucket and in the buckets before and after: whether a slow round trip came as
the job began an allreduce (its rate low before), or in a stretch the flows held.

  scripts/sharing_timeline.py [--out timeline.png] [--slowest N] DIR [DIR ...]
      [--title TITLE ...]

A stretch in which the TCP flows hold most of the link and the probe waits longer
is one in which they keep a queue standing; see docs/performance.md, "Dipping with
BBR".
"""
import argparse
import heapq
import json
import sys
from collections import namedtuple
from pathlib import Path

from sharing import is_job, window

# One scenario's run: bucket start times (s since the meter started), the TCP flows'
# and the job's Mbit/s per bucket, the probe's (sent, ms), and the meter's counts.
Run = namedtuple("Run", "t tcp job probe meter")


def load(d):
    d = Path(d)
    try:
        m = json.loads((d / "meter.json").read_text())
        p = json.loads((d / "probe.json").read_text())
        t0, bucket, counted = m["t0"], m["bucket_s"], m["bytes"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"sharing_timeline: {d}: {e!r}")
    n = max((len(b) for b in counted.values()), default=0)

    def rate(pick):
        return [sum(b[i] for src, b in counted.items() if pick(src) and i < len(b))
                * 8 / bucket / 1e6 for i in range(n)]

    tcp = rate(lambda s: s.startswith("198.18.1."))
    job = rate(is_job)
    probe = [(sent - t0, ms) for sent, ms in p.get("samples", [])]
    return Run([i * bucket for i in range(n)], tcp, job, probe, m)


def slowest(d, run, k):
    """Prints the k slowest probe round trips within the job's window (sharing.py's:
    the link's rate taken as the fullest bucket's), each with the flows' and the
    job's rates in the bucket before it, its own and the one after."""
    try:
        job = json.loads((Path(d) / "job.json").read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"sharing_timeline: {d}: {e!r}")
    bucket = run.meter["bucket_s"]
    full = max((a + b for a, b in zip(run.tcp, run.job)), default=0.0)
    first, last = window(run.meter, job, full * 1e6)
    lo, hi = first * bucket, (last + 1) * bucket
    inside = [(s, ms) for s, ms in run.probe if lo <= s < hi]
    worst = sorted(heapq.nlargest(k, inside, key=lambda x: x[1]))
    print(f"{d}: {len(inside)} probe round trips in the job's window "
          f"({lo:.1f}-{hi:.1f} s since the meter started); the {len(worst)} slowest:")
    print(f"  {'s in it':>9} {'ms':>6}   {'TCP Mbit/s before, in, after':<32}the job's")

    def around(rates, i):
        return " ".join(f"{rates[j]:5.0f}" if 0 <= j < len(rates) else "    -"
                        for j in (i - 1, i, i + 1))

    for s, ms in worst:
        i = int(s / bucket)
        print(f"  {s - lo:9.2f} {ms:6.1f}   {around(run.tcp, i):<32}{around(run.job, i)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="sharing.py's OUT/SCENARIO directories")
    ap.add_argument("--title", action="append", default=[],
                    help="a panel's title, in the order of the directories")
    ap.add_argument("--out", help="the PNG to write")
    ap.add_argument("--slowest", type=int, metavar="N",
                    help="print the probe's N slowest round trips in the job's window")
    a = ap.parse_args()
    if a.out is None and a.slowest is None:
        ap.error("give --out PNG, --slowest N, or both")
    if a.slowest is not None and a.slowest < 1:
        ap.error("--slowest must be at least 1")
    runs = [load(d) for d in a.dirs]
    if a.slowest is not None:
        for d, run in zip(a.dirs, runs):
            slowest(d, run, a.slowest)
    if a.out is None:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(a.dirs), 1, figsize=(9, 3.2 * len(a.dirs)), squeeze=False)
    # One scale for the probe in every panel, so that the panels compare.
    top = max((y for run in runs for _, y in run.probe), default=1) * 1.1
    for k, ((t, tcp, job, probe, _), d, ax) in enumerate(zip(runs, a.dirs, axes[:, 0])):
        ax.plot(t, tcp, color="grey", lw=0.8, label="TCP flows, Mbit/s")
        ax.plot(t, job, color="tab:blue", lw=0.8, label="the job, Mbit/s")
        ax.set_ylabel("Mbit/s through the bottleneck")
        ax.set_ylim(0, max(max(tcp, default=1), max(job, default=1)) * 1.1)
        right = ax.twinx()
        right.scatter([x for x, _ in probe], [y for _, y in probe], s=1.5, color="tab:red",
                      label="probe round trip, ms")
        right.set_ylabel("probe round trip, ms")
        right.set_ylim(0, top)
        ax.set_title(a.title[k] if k < len(a.title) else str(d))
        if k == 0:
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = right.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8, markerscale=4)
    axes[-1, 0].set_xlabel("seconds since the meter started")
    fig.tight_layout()
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
