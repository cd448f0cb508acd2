"""Fixtures: the inagg binary and a running aggregator on 127.0.0.1."""

import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def inagg_bin():
    if os.environ.get("INAGG_BIN"):
        return os.environ["INAGG_BIN"]
    for cand in (ROOT / "target/release/inagg", ROOT / "target/debug/inagg"):
        if cand.exists():
            return str(cand)
    pytest.fail("no inagg binary: build it (cargo build) or set INAGG_BIN")


class Aggregator:
    """`inagg aggregator` on an ephemeral port; with `metrics=True` it serves its
    counters too (`metric`)."""

    def __init__(self, *extra, metrics=False):
        args = [inagg_bin(), "aggregator", "--listen", "127.0.0.1:0", *extra]
        if metrics:
            args += ["--metrics", "127.0.0.1:0"]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            stderr=subprocess.PIPE if metrics else None,
        )
        line = self.proc.stdout.readline().strip()
        assert line.startswith("listening on "), f"aggregator said {line!r}"
        self.addr = line.split()[2]
        self.metrics = None
        if metrics:
            m = self.proc.stderr.readline().strip()
            assert m.startswith("metrics on http://"), f"aggregator said {m!r}"
            self.metrics = m[len("metrics on http://"):].removesuffix("/metrics")
            # Keep draining its log, so that a full pipe never blocks it.
            threading.Thread(
                target=shutil.copyfileobj, args=(self.proc.stderr, sys.stderr), daemon=True
            ).start()

    def metric(self, name, job=None):
        """The value of the series `name` (of `job`, for per-job series), or None
        while the aggregator does not publish it."""
        body = urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5).read()
        want = name if job is None else f'{name}{{job="{job}"}}'
        for line in body.decode().splitlines():
            if line.split(" ")[0] == want:
                return float(line.split()[-1])
        return None

    def wait_for(self, what, cond, timeout=30.0):
        """Polls `cond()` until it is true; fails after `timeout` seconds (a hang guard,
        not a speed requirement)."""
        deadline = time.monotonic() + timeout
        while not cond():
            assert self.proc.poll() is None, "the aggregator died"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def aggregator():
    a = Aggregator("--silence-timeout-ms", "1500")
    yield a
    assert a.proc.poll() is None, "the aggregator died"
    a.stop()
