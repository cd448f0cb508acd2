#!/usr/bin/env python3
"""How an allreduce shares a bottleneck with TCP: each scenario runs in its own
scripts/netlab.sh cluster whose aggregator link is shaped to --link-rate (the shared
bottleneck; every other link at the same rate), with K bulk TCP flows (iperf3) and the
short-flow probe (`inagg tcp-probe`, 1 KiB round trips every 10 ms) toward the
aggregator's namespace:

  idle        the flows and the probe alone;
  inagg       an `inagg bench` job of N ranks beside them (congestion control on);
  inagg-nocc  the same job with --no-congestion-control (windows held at the grant);
  gloo        Gloo's ring of N ranks in inagg's place, rank 0 in the aggregator's
              namespace so that the ring crosses the bottleneck once.

Every flow is measured the same way, at the bottleneck: a packet socket in the
aggregator's namespace counts the bytes (IP packets with their Ethernet header) that
arrive through the shaped link from each source address, in 100 ms buckets. The
window is the job's: from the first to the last bucket in which the job's hosts
delivered more than 1% of the link's capacity (the idle scenario: its whole sleep
but the first second). A flow's rate is its bytes in the window over the window's
length, so the rates of all flows add up to at most the link rate. Each inagg rank
sends from a host of its own and counts as one flow; Gloo's ring, whose one hop into
the aggregator's namespace crosses the bottleneck, counts as one flow. Jain's index
is taken over all of them; the probe's p50 and p99 over its round trips sent within
the window.

Writes OUT/sharing.csv (one row per flow), OUT/sharing-summary.csv (per scenario:
Jain's index, the probe's p50 and p99, the job's allreduce time, marks, dips,
overflows and smallest window, the TCP flows' congestion control) and OUT/sharing-SCENARIO.png; prints the summary. Needs root (namespaces) and
iperf3.

  scripts/sharing.py [--workers 4] [--elements 16777216] [--codec f32]
      [--link-rate 1gbit] [--tcp-bulk 2] [--tcp-congestion cubic] [--iters 20]
      [--scenarios idle,inagg,inagg-nocc,gloo] [--out inagg-out/sharing]
      [--inagg-bin target/release/inagg] [--inagg-flags '--queue-target 8']
"""
import argparse
import csv
import shlex
import signal
import socket
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = "/usr/bin/python3"
SCENARIOS = ("idle", "inagg", "inagg-nocc", "gloo")
BUCKET_S = 0.1


def args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--elements", type=int, default=16777216)
    p.add_argument("--codec", default="f32")
    p.add_argument("--link-rate", default="1gbit")
    p.add_argument("--tcp-bulk", type=int, default=2)
    p.add_argument("--tcp-congestion", default="",
                   help="TCP congestion control in every namespace (default: the kernel's)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--idle-seconds", type=float, default=8.0)
    p.add_argument("--out", default="inagg-out/sharing")
    p.add_argument("--inagg-bin", default=str(ROOT / "target/release/inagg"))
    p.add_argument("--inagg-flags", default="",
                   help="more flags for the inagg scenarios' `inagg bench`, as one string "
                        "(--inagg-flags='--queue-target 8')")
    p.add_argument("--inside", help=argparse.SUPPRESS)
    p.add_argument("--meter", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.workers < 2 or a.tcp_bulk < 1 or a.iters < 1:
        p.error("--workers must be at least 2, --tcp-bulk and --iters at least 1")
    for s in a.scenarios.split(","):
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s} ({', '.join(SCENARIOS)})")
    return a


def meter(iface, path):
    """Counts the bytes arriving on `iface` from each IPv4 source, in BUCKET_S
    buckets, until SIGTERM or SIGINT; writes {"t0", "bucket_s", "bytes": {src:
    [per bucket]}} to `path`. Says "metering" on stdout once the socket is bound."""
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((iface, 0))
    s.settimeout(0.2)
    head = bytearray(34)
    counts = {}
    t0 = time.time()
    print("metering", flush=True)
    while not stop:
        try:
            # MSG_TRUNC: the packet's whole length, though only its headers are read.
            n, addr = s.recvfrom_into(head, len(head), socket.MSG_TRUNC)
        except (socket.timeout, InterruptedError):
            continue
        if addr[2] == socket.PACKET_OUTGOING or head[12:14] != b"\x08\x00":
            continue
        src = socket.inet_ntoa(bytes(head[26:30]))
        i = int((time.time() - t0) / BUCKET_S)
        b = counts.setdefault(src, [])
        if len(b) <= i:
            b.extend([0] * (i + 1 - len(b)))
        b[i] += n
    Path(path).write_text(json.dumps({"t0": t0, "bucket_s": BUCKET_S, "bytes": counts}))


def inside(a, out):
    """Runs one scenario's job inside the cluster with the meter on the aggregator's
    link; writes out/job.json and out/meter.json."""
    dev = os.environ["INAGG_NETLAB_WORKER_DEV"]
    lab = dev[:-1]  # the lab's id: worker devices are ID + "w" + r
    agg_ns = os.environ["INAGG_NETLAB_AGG_NETNS"]
    m = subprocess.Popen(
        ["ip", "netns", "exec", agg_ns, PY, __file__, "--meter", lab + "a", "--out",
         str(out / "meter.json")], stdout=subprocess.PIPE, text=True)
    if m.stdout.readline().strip() != "metering":
        sys.exit("sharing: the packet meter did not start")
    job = {"scenario": a.inside, "started": time.time()}
    if a.inside == "idle":
        time.sleep(a.idle_seconds)
    elif a.inside in ("inagg", "inagg-nocc"):
        cc = ["--no-congestion-control"] if a.inside == "inagg-nocc" else []
        r = subprocess.run(
            [a.inagg_bin, "bench", "--workers", str(a.workers), "--elements",
             str(a.elements), "--codec", a.codec, "--iters", str(a.iters), "--json"] + cc
            + shlex.split(a.inagg_flags),
            check=True, capture_output=True, text=True)
        row = json.loads(r.stdout.strip().splitlines()[-1])
        for k in ("median_s", "within_bound", "marks", "congestion_window_min", "window",
                  "retransmissions", "dips", "overflows"):
            job[k] = row.get(k)
    else:
        n = a.workers
        port = 29500 + os.getpid() % 400
        procs = []
        for r in range(n - 1, -1, -1):
            ns, ifname = ((agg_ns, lab + "a") if r == 0 else
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
    job["ended"] = time.time()
    m.send_signal(signal.SIGTERM)
    if m.wait(timeout=30):
        sys.exit("sharing: the packet meter failed")
    (out / "job.json").write_text(json.dumps(job))


def window(m, job, link_bps):
    """The job's window in buckets [first, last] (see the module's doc)."""
    n = max((len(b) for b in m["bytes"].values()), default=0)
    if job["scenario"] == "idle":
        return min(int(1 / m["bucket_s"]), n - 1), n - 1
    floor = 0.01 * link_bps / 8 * m["bucket_s"]
    busy = [i for i in range(n)
            if sum(b[i] for src, b in m["bytes"].items()
                   if is_job(src) and i < len(b)) > floor]
    if not busy:
        sys.exit("sharing: the job's hosts delivered nothing through the bottleneck")
    return busy[0], busy[-1]


def is_job(src):
    """The job's hosts: the workers, 198.18.0.10 and up (the aggregator's host,
    198.18.0.1, is where the meter counts, so nothing arrives from it)."""
    return src.startswith("198.18.0.")


def delivered(m, src, first, last):
    b = m["bytes"].get(src, [])
    return sum(b[first:last + 1])


def percentile(xs, q):
    """The nearest rank, as `inagg tcp-probe` takes it."""
    xs = sorted(xs)
    if not xs:
        return None
    return xs[min(max(math.ceil(q * len(xs)), 1), len(xs)) - 1]


def jain(xs):
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if xs and any(xs) else None


def rate_bps(rate):
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}
    for u, f in units.items():
        if rate.endswith(u):
            return float(rate[:-len(u)]) * f
    return float(rate)


def main():
    a = args()
    out = Path(a.out)
    if a.meter:
        meter(a.meter, out)
        return
    if a.inside:
        inside(a, out)
        return
    link_bps = rate_bps(a.link_rate)
    flows, summary = [], []
    for scenario in a.scenarios.split(","):
        where = out / scenario
        where.mkdir(parents=True, exist_ok=True)
        print(f"sharing: {scenario} at {a.link_rate}", file=sys.stderr)
        cmd = [str(ROOT / "scripts/netlab.sh"), "--workers", str(a.workers), "--link-rate",
               a.link_rate, "--aggregator-link-rate", a.link_rate, "--tcp-bulk",
               str(a.tcp_bulk), "--tcp-probe", "--cross-out", str(where)] + (
               ["--tcp-congestion", a.tcp_congestion] if a.tcp_congestion else []) + ["--",
               PY, __file__, "--inside", scenario, "--out", str(where)] + [
               f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
               if k in ("workers", "elements", "codec", "iters", "idle_seconds", "inagg_bin",
                        "inagg_flags")]
        subprocess.run(cmd, check=True, env={**os.environ, "INAGG_BIN": a.inagg_bin})
        job = json.loads((where / "job.json").read_text())
        m = json.loads((where / "meter.json").read_text())
        first, last = window(m, job, link_bps)
        secs = (last + 1 - first) * m["bucket_s"]
        bps = lambda src: 8 * delivered(m, src, first, last) / secs
        rows = [("tcp", k, bps(f"198.18.1.{10 + k}")) for k in range(a.tcp_bulk)]
        if scenario.startswith("inagg"):
            rows += [(scenario, r, bps(f"198.18.0.{10 + r}")) for r in range(a.workers)]
        if scenario == "gloo":
            rows.append(("gloo", 0, sum(bps(s) for s in m["bytes"] if is_job(s))))
        probe = json.loads((where / "probe.json").read_text())
        cc = json.loads((where / "bulk-0.json").read_text()).get("end", {}).get(
            "sender_tcp_congestion", "")
        t_first, t_last = m["t0"] + first * m["bucket_s"], m["t0"] + (last + 1) * m["bucket_s"]
        rtts = [ms for sent, ms in probe.get("samples", []) if t_first <= sent < t_last]
        for kind, i, b in rows:
            flows.append({"scenario": scenario, "flow": f"{kind} {i}", "mbit_s": b / 1e6})
        summary.append({
            "scenario": scenario, "link_rate": a.link_rate, "workers": a.workers,
            "tcp_congestion": cc,
            "codec": a.codec if scenario.startswith("inagg") else "",
            "window_s": secs,
            "jain": jain([b for _, _, b in rows]),
            "total_mbit_s": sum(b for _, _, b in rows) / 1e6,
            "probe_p50_ms": percentile(rtts, 0.5), "probe_p99_ms": percentile(rtts, 0.99),
            "probe_requests": len(rtts),
            "allreduce_median_s": job.get("median_s"),
            "marks": job.get("marks"),
            "congestion_window_min": job.get("congestion_window_min"),
            "retransmissions": job.get("retransmissions"),
            "dips": job.get("dips"),
            "overflows": job.get("overflows"),
        })
        plot(where.parent / f"sharing-{scenario}.png", scenario, a, rows, summary[-1])
    for name, data in (("sharing.csv", flows), ("sharing-summary.csv", summary)):
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0]))
            w.writeheader()
            w.writerows(data)
    print(f"{'scenario':<11} {'jain':>6} {'Mbit/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'allreduce s':>11} {'marks':>6} {'window':>6} {'dips':>5} {'ovf':>5}")
    dash = lambda v, f: "-" if v is None else format(v, f)
    for s in summary:
        print(f"{s['scenario']:<11} {dash(s['jain'], '.3f'):>6} {s['total_mbit_s']:>7.0f} "
              f"{dash(s['probe_p50_ms'], '.2f'):>7} {dash(s['probe_p99_ms'], '.2f'):>7} "
              f"{dash(s['allreduce_median_s'], '.3f'):>11} {dash(s['marks'], 'd'):>6} "
              f"{dash(s['congestion_window_min'], 'd'):>6} {dash(s['dips'], 'd'):>5} "
              f"{dash(s['overflows'], 'd'):>5}")
    print(f"wrote {out / 'sharing.csv'}, {out / 'sharing-summary.csv'} and the plots")


def plot(path, scenario, a, rows, s):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar([f"{k} {i}" for k, i, _ in rows], [b / 1e6 for _, _, b in rows],
           color=["tab:gray" if k == "tcp" else "tab:blue" for k, _, _ in rows])
    ax.axhline(a_link_mbit(a) / len(rows), color="tab:red", linestyle="--",
               label="fair share")
    ax.legend()
    ax.set_ylabel("Mbit/s delivered through the bottleneck")
    j = jain([b for _, _, b in rows])
    p50, p99 = s["probe_p50_ms"] or 0.0, s["probe_p99_ms"] or 0.0
    ax.set_title(f"{scenario} on a {a.link_rate} bottleneck: Jain {j:.2f}, "
                 f"probe p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def a_link_mbit(a):
    return rate_bps(a.link_rate) / 1e6


if __name__ == "__main__":
    main()
