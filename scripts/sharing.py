#!/usr/bin/env python3
"""How an allreduce shares a bottleneck with TCP: each scenario runs in its own
scripts/netlab.sh cluster whose aggregator link is shaped to --link-rate (the shared
bottleneck; every other link at the same rate), with K bulk TCP flows (iperf3) and the
short-flow probe (`inagg tcp-probe`, 1 KiB round trips every 10 ms) toward the
aggregator's namespace:

  idle   the flows and the probe alone;
  inagg  an `inagg bench` job of N ranks beside them: each rank's contributions cross
         the bottleneck, so inagg counts as N flows, each at its rank's bytes sent per
         allreduce over the allreduce's median time;
  gloo   Gloo's ring of N ranks in inagg's place, rank 0 in the aggregator's namespace
         so that the ring crosses the bottleneck once: one flow, at the ring's bytes
         per rank (2 (N-1)/N of the tensor) per allreduce over its median time.

A TCP flow's rate is the mean of iperf3's one-second intervals while the job ran (the
first interval and those after the job's end left out). Jain's index is taken over
every flow crossing the bottleneck toward the aggregator. Writes OUT/sharing.csv (one
row per flow), OUT/sharing-summary.csv (per scenario: Jain's index, the probe's p50 and
p99) and OUT/sharing-SCENARIO.png; prints the summary. Needs root (namespaces) and
iperf3.

  scripts/sharing.py [--workers 4] [--elements 16777216] [--codec f32]
      [--link-rate 1gbit] [--tcp-bulk 2] [--iters 20] [--scenarios idle,inagg,gloo]
      [--out inagg-out/sharing] [--inagg-bin target/release/inagg]
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = "/usr/bin/python3"


def args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--elements", type=int, default=16777216)
    p.add_argument("--codec", default="f32")
    p.add_argument("--link-rate", default="1gbit")
    p.add_argument("--tcp-bulk", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--scenarios", default="idle,inagg,gloo")
    p.add_argument("--idle-seconds", type=float, default=8.0)
    p.add_argument("--out", default="inagg-out/sharing")
    p.add_argument("--inagg-bin", default=str(ROOT / "target/release/inagg"))
    p.add_argument("--inside", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.workers < 2 or a.tcp_bulk < 1 or a.iters < 1:
        p.error("--workers must be at least 2, --tcp-bulk and --iters at least 1")
    for s in a.scenarios.split(","):
        if s not in ("idle", "inagg", "gloo"):
            p.error(f"unknown scenario {s} (idle, inagg, gloo)")
    return a


def inside(a, out):
    """Runs one scenario's job inside the cluster; writes out/job.json."""
    job = {"scenario": a.inside, "started": time.time()}
    if a.inside == "idle":
        time.sleep(a.idle_seconds)
    elif a.inside == "inagg":
        r = subprocess.run(
            [a.inagg_bin, "bench", "--workers", str(a.workers), "--elements",
             str(a.elements), "--codec", a.codec, "--iters", str(a.iters), "--json"],
            check=True, capture_output=True, text=True)
        row = json.loads(r.stdout.strip().splitlines()[-1])
        job["median_s"] = row["median_s"]
        job["within_bound"] = row.get("within_bound")
        job["rank_bps"] = 8 * row["bytes_sent_per_worker"] / row["median_s"]
    else:
        n = a.workers
        dev = os.environ["INAGG_NETLAB_WORKER_DEV"]
        lab = dev[:-1]  # the lab's id: worker devices are ID + "w" + r
        port = 29500 + os.getpid() % 400
        procs = []
        for r in range(n - 1, -1, -1):
            ns, ifname = ((os.environ["INAGG_NETLAB_AGG_NETNS"], lab + "a") if r == 0 else
                          (os.environ["INAGG_NETLAB_WORKER_NETNS"] + str(r), dev + str(r)))
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={ifname}", PY,
                 str(ROOT / "scripts/peers/gloo_allreduce.py"), "--rank", str(r),
                 "--world", str(n), "--master", f"198.18.0.1:{port}", "--elements",
                 str(a.elements), "--iters", str(a.iters), "--warmup", "1"],
                stdout=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=900)[0] for p in procs]
        if any(p.returncode for p in procs):
            sys.exit("sharing: a Gloo rank failed")
        row = json.loads([o for o in outs if o.strip()][0].strip().splitlines()[-1])
        job["median_s"] = row["median_s"]
        job["ring_bps"] = 8 * 4 * a.elements * 2 * (n - 1) / n / row["median_s"]
    job["ended"] = time.time()
    (out / "job.json").write_text(json.dumps(job))


def flow_bps(path, started, ended):
    """Mean of iperf3's interval rates within [started, ended] (wall clock)."""
    d = json.loads(path.read_text())
    t0 = d["start"]["timestamp"]["timesecs"]
    rates = [i["sum"]["bits_per_second"] for i in d["intervals"][1:]
             if t0 + i["sum"]["start"] >= started and t0 + i["sum"]["end"] <= ended + 0.5]
    if not rates:
        rates = [d["end"]["sum_sent"]["bits_per_second"]]
    return statistics.mean(rates)


def jain(xs):
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if xs and any(xs) else None


def main():
    a = args()
    out = Path(a.out)
    if a.inside:
        inside(a, out)
        return
    flows, summary = [], []
    for scenario in a.scenarios.split(","):
        where = out / scenario
        where.mkdir(parents=True, exist_ok=True)
        print(f"sharing: {scenario} at {a.link_rate}", file=sys.stderr)
        cmd = [str(ROOT / "scripts/netlab.sh"), "--workers", str(a.workers), "--link-rate",
               a.link_rate, "--aggregator-link-rate", a.link_rate, "--tcp-bulk",
               str(a.tcp_bulk), "--tcp-probe", "--cross-out", str(where), "--",
               PY, __file__, "--inside", scenario, "--out", str(where)] + [
               f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
               if k in ("workers", "elements", "codec", "iters", "idle_seconds", "inagg_bin")]
        subprocess.run(cmd, check=True, env={**os.environ, "INAGG_BIN": a.inagg_bin})
        job = json.loads((where / "job.json").read_text())
        rows = [("tcp", k, flow_bps(where / f"bulk-{k}.json", job["started"], job["ended"]))
                for k in range(a.tcp_bulk)]
        if scenario == "inagg":
            rows += [("inagg", r, job["rank_bps"]) for r in range(a.workers)]
        if scenario == "gloo":
            rows.append(("gloo", 0, job["ring_bps"]))
        probe = json.loads((where / "probe.json").read_text())
        for kind, i, bps in rows:
            flows.append({"scenario": scenario, "flow": f"{kind} {i}", "mbit_s": bps / 1e6})
        summary.append({
            "scenario": scenario, "link_rate": a.link_rate, "workers": a.workers,
            "codec": a.codec if scenario == "inagg" else "",
            "jain": jain([b for _, _, b in rows]),
            "probe_p50_ms": probe["p50_ms"], "probe_p99_ms": probe["p99_ms"],
            "probe_requests": probe["requests"],
            "allreduce_median_s": job.get("median_s"),
        })
        plot(where.parent / f"sharing-{scenario}.png", scenario, a, rows, probe)
    for name, data in (("sharing.csv", flows), ("sharing-summary.csv", summary)):
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0]))
            w.writeheader()
            w.writerows(data)
    print(f"{'scenario':<8} {'jain':>6} {'p50 ms':>8} {'p99 ms':>8} {'allreduce s':>12}")
    for s in summary:
        j = "-" if s["jain"] is None else f"{s['jain']:.3f}"
        m = "-" if s["allreduce_median_s"] is None else f"{s['allreduce_median_s']:.3f}"
        print(f"{s['scenario']:<8} {j:>6} {s['probe_p50_ms']:>8.2f} {s['probe_p99_ms']:>8.2f} {m:>12}")
    print(f"wrote {out / 'sharing.csv'}, {out / 'sharing-summary.csv'} and the plots")


def plot(path, scenario, a, rows, probe):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar([f"{k} {i}" for k, i, _ in rows], [b / 1e6 for _, _, b in rows],
           color=["tab:gray" if k == "tcp" else "tab:blue" for k, _, _ in rows])
    ax.set_ylabel("Mbit/s toward the aggregator")
    j = jain([b for _, _, b in rows])
    ax.set_title(f"{scenario} on a {a.link_rate} bottleneck: Jain {j:.2f}, "
                 f"probe p50 {probe['p50_ms']:.1f} ms, p99 {probe['p99_ms']:.1f} ms")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
