"""DDP with the inagg communication hook, through scripts/torch_ddp.py: replicas end
identical, the loss goes down, and f32 through inagg matches DDP's own allreduce."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from conftest import ROOT, Aggregator, inagg_bin


def test_ddp_with_the_hook_on_two_processes(aggregator):
    env = dict(os.environ, INAGG_AGGREGATOR=aggregator.addr, INAGG_BIN=inagg_bin())
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts/torch_ddp.py"), "--workers", "2", "--steps", "12",
         "--codecs", "f32,i8", "--json", "--job", "500"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    rows = {row["codec"]: row for row in rows}
    assert set(rows) == {"gloo", "f32", "i8"}
    for codec, row in rows.items():
        assert row["replicas_identical"], row
        assert row["final_loss"] < row["first_loss"], row
    assert rows["f32"]["max_param_diff_vs_gloo"] < 1e-5, rows["f32"]
    # i8 puts about a quarter of f32's bytes on the wire.
    assert rows["i8"]["bytes_per_step"] < 0.35 * rows["f32"]["bytes_per_step"]


def _jobs(metrics_addr):
    body = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith("inagg_jobs "):
            return float(line.split()[1])
    return 0.0


def test_ddp_survives_a_killed_aggregator_through_its_failover_address():
    """Issue 25: the first aggregator is SIGKILLed mid-training; every rank moves the
    job to INAGG_FAILOVER, redoes the interrupted bucket there, and training ends with
    identical replicas."""
    a = _AggregatorWithMetrics()
    b = Aggregator()
    try:
        env = dict(os.environ, INAGG_AGGREGATOR=a.addr, INAGG_FAILOVER=b.addr,
                   INAGG_BIN=inagg_bin())
        env.pop("RANK", None)
        env.pop("WORLD_SIZE", None)
        p = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts/torch_ddp.py"), "--workers", "2",
             "--steps", "200", "--codecs", "i32", "--json", "--job", "510"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        # Kill A once the i32 job runs on it (Gloo trains first).
        deadline = time.time() + 240
        while time.time() < deadline and _jobs(a.metrics) < 1 and p.poll() is None:
            time.sleep(0.1)
        assert _jobs(a.metrics) >= 1, "the job never started on the first aggregator"
        time.sleep(0.5)
        a.proc.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err
        rows = {row["codec"]: row for row in map(json.loads, filter(str.strip, out.splitlines()))}
        assert rows["i32"]["replicas_identical"], rows["i32"]
        assert rows["i32"]["failovers"] == 1, rows["i32"]
        assert rows["i32"]["final_loss"] < rows["i32"]["first_loss"], rows["i32"]
    finally:
        a.stop()
        b.stop()


class _AggregatorWithMetrics(Aggregator):
    """An aggregator that also serves metrics; `metrics` is their host:port."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [inagg_bin(), "aggregator", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )
        line = self.proc.stdout.readline().strip()
        assert line.startswith("listening on "), f"aggregator said {line!r}"
        self.addr = line.split()[2]
        m = self.proc.stderr.readline().strip()
        assert m.startswith("metrics on http://"), f"aggregator said {m!r}"
        self.metrics = m[len("metrics on http://"):].removesuffix("/metrics")
