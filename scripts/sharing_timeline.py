#!/usr/bin/env python3
"""The flows and the short-flow probe over time, for scenarios that
`scripts/sharing.py` ran: one panel per scenario directory (OUT/SCENARIO, where
sharing.py leaves meter.json and probe.json), each with the Mbit/s that the TCP flows
and the job delivered through the bottleneck in 100 ms buckets, and beside them the
probe's round trips.

  scripts/sharing_timeline.py --out timeline.png DIR [DIR ...] [--title TITLE ...]

A stretch in which the TCP flows hold most of the link and the probe waits longer
is one in which they keep a queue standing; see docs/performance.md, "Dipping with
BBR".
"""
import argparse
import json
import sys
from pathlib import Path


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
    job = rate(lambda s: s.startswith("198.18.0."))
    probe = [(sent - t0, ms) for sent, ms in p.get("samples", [])]
    return [i * bucket for i in range(n)], tcp, job, probe


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="sharing.py's OUT/SCENARIO directories")
    ap.add_argument("--title", action="append", default=[],
                    help="a panel's title, in the order of the directories")
    ap.add_argument("--out", required=True, help="the PNG to write")
    a = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(a.dirs), 1, figsize=(9, 3.2 * len(a.dirs)), squeeze=False)
    runs = [load(d) for d in a.dirs]
    # One scale for the probe in every panel, so that the panels compare.
    top = max((y for *_, probe in runs for _, y in probe), default=1) * 1.1
    for k, ((t, tcp, job, probe), d, ax) in enumerate(zip(runs, a.dirs, axes[:, 0])):
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
