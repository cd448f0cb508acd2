#!/usr/bin/python3
"""Flat against hierarchical aggregation in the lab's racks: run inside
`scripts/netlab.sh --racks R`, it runs `inagg bench` with the aggregator at the spine
(flat) and with a rack aggregator per rack under it (`--racks R`), in alternating
rounds, and counts each rack uplink's bytes (both directions) around every run.

    scripts/netlab.sh --workers 4 --racks 2 --link-rate 1gbit --uplink-rate 1gbit -- \\
        /usr/bin/python3 scripts/racks.py --workers 4 --codec f32,i8 --rounds 3 [--out DIR]

Writes OUT/racks.csv (one row per run: mode, codec, round, ATE/s, the uplinks' bytes
up and down per allreduce, the result's checksum) and prints, per codec, the medians
of each mode, hierarchical over flat as the median of the rounds' ratios with their
spread, the uplinks' bytes up as a ratio, and, for the fixed-point codecs, whether
every run's checksum is the same. Bytes per allreduce are each run's counted
uplink bytes (joins, warm-up and barriers included) over its allreduces, averaged
over the racks.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--codec", default="f32,i8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--elements", type=int, default=16777216)
    p.add_argument("--inagg-bin", default=str(ROOT / "target/release/inagg"))
    p.add_argument("--out", default="inagg-out/racks")
    return p.parse_args()


def lab():
    """The lab's racks, bridge namespace and uplink device prefix (netlab.sh's)."""
    env = os.environ
    try:
        racks = int(env["INAGG_NETLAB_RACKS"])
        return racks, env["INAGG_NETLAB_BRIDGE_NETNS"], env["INAGG_NETLAB_UPLINK_DEV"]
    except (KeyError, ValueError):
        sys.exit("racks.py: run me inside scripts/netlab.sh --racks R")


def uplink_bytes(ns, dev, racks):
    """Per rack, the bytes its uplink carried up (rx at its spine end) and down (tx)."""
    out = []
    for k in range(racks):
        j = subprocess.run(["ip", "-n", ns, "-j", "-s", "link", "show", "dev", f"{dev}{k}"],
                           check=True, capture_output=True, text=True).stdout
        s = json.loads(j)[0]["stats64"]
        out.append((s["rx"]["bytes"], s["tx"]["bytes"]))
    return out


def bench(a, codec, racks):
    cmd = [a.inagg_bin, "bench", "--workers", str(a.workers),
           "--elements", str(a.elements), "--codec", codec, "--iters", str(a.iters),
           "--warmup", str(a.warmup), "--json"]
    if racks:
        cmd += ["--racks", str(racks)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"racks.py: {' '.join(cmd)} failed:\n{p.stderr.strip()}")
    out = p.stdout
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    if len(rows) != 1:
        sys.exit(f"racks.py: expected one row from {' '.join(cmd)}, got {out!r}")
    return rows[0]


def main():
    a = args()
    racks, ns, dev = lab()
    if racks < 1:
        sys.exit("racks.py: the lab has no racks (netlab.sh --racks R)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for rnd in range(a.rounds):
        for codec in a.codec.split(","):
            # Alternate which mode goes first, so that drift does not favour one.
            modes = [("flat", 0), ("hierarchical", racks)]
            if rnd % 2:
                modes.reverse()
            for mode, r in modes:
                before = uplink_bytes(ns, dev, racks)
                row = bench(a, codec, r)
                after = uplink_bytes(ns, dev, racks)
                calls = a.iters + a.warmup
                up = statistics.mean((x[0] - y[0]) / calls for x, y in zip(after, before))
                down = statistics.mean((x[1] - y[1]) / calls for x, y in zip(after, before))
                run = {"mode": mode, "codec": codec, "round": rnd,
                       "ate_per_s": row["ate_per_s"], "median_s": row["median_s"],
                       "uplink_up_bytes": round(up), "uplink_down_bytes": round(down),
                       "line_rate_fraction": row.get("line_rate_fraction"),
                       "retransmissions": row["retransmissions"],
                       "result_checksum": row["result_checksum"],
                       "ok": row["within_bound"] and row["ranks_identical"]}
                runs.append(run)
                print(f"racks.py: round {rnd} {codec} {mode}: {run['ate_per_s']:.4g} ATE/s, "
                      f"uplink {up / 1e6:.1f} MB up, {down / 1e6:.1f} MB down per allreduce",
                      file=sys.stderr)
    with open(out / "racks.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(runs[0]))
        w.writeheader()
        w.writerows(runs)
    print(f"{'codec':6} {'mode':13} {'ATE/s':>10} {'up MB':>8} {'down MB':>8}  "
          f"{'hier/flat ATE/s (spread)':>26} {'up bytes':>10} {'same bits':>9}")
    for codec in a.codec.split(","):
        by = {m: [r for r in runs if r["codec"] == codec and r["mode"] == m]
              for m in ("flat", "hierarchical")}
        ratios = [h["ate_per_s"] / f["ate_per_s"]
                  for f, h in zip(by["flat"], by["hierarchical"])]
        up_ratio = statistics.median(h["uplink_up_bytes"] / f["uplink_up_bytes"]
                                     for f, h in zip(by["flat"], by["hierarchical"]))
        # Fixed-point results are the flat run's bit for bit; float sums depend on the
        # order they were added in.
        same = (str(len({r["result_checksum"] for r in by["flat"] + by["hierarchical"]}) == 1)
                if codec in ("i32", "i16", "i8") else "-")
        for m in ("flat", "hierarchical"):
            rs = by[m]
            print(f"{codec:6} {m:13} {statistics.median(r['ate_per_s'] for r in rs):>10.4g} "
                  f"{statistics.median(r['uplink_up_bytes'] for r in rs) / 1e6:>8.1f} "
                  f"{statistics.median(r['uplink_down_bytes'] for r in rs) / 1e6:>8.1f}", end="")
            if m == "hierarchical":
                print(f"  {statistics.median(ratios):>8.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
                      f"{up_ratio:>17.2f} {same:>9}")
            else:
                print()
    print(f"wrote {out / 'racks.csv'}")


if __name__ == "__main__":
    main()
