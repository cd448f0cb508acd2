"""Fixtures: the inagg binary and a running aggregator on 127.0.0.1."""

import os
import subprocess
import sys
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
    def __init__(self, *extra):
        self.proc = subprocess.Popen(
            [inagg_bin(), "aggregator", "--listen", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )
        line = self.proc.stdout.readline().strip()
        assert line.startswith("listening on "), f"aggregator said {line!r}"
        self.addr = line.split()[2]

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
