"""DDP with the inagg communication hook, through scripts/torch_ddp.py: replicas end
identical, the loss goes down, and f32 through inagg matches DDP's own allreduce."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

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


def test_ddp_survives_a_killed_aggregator_through_its_failover_address():
    """Issue 25: the first aggregator is SIGKILLed mid-training; every rank moves the
    job to INAGG_FAILOVER, redoes the interrupted bucket there, and training ends with
    identical replicas."""
    a = Aggregator(metrics=True)
    b = Aggregator()
    p = None
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
        # Kill A once the i32 job trains on it (Gloo trains first): once A has summed
        # some of its chunks. The deadline only guards against a hang.
        def summing():
            return (a.metric("inagg_job_chunks_completed_total", job=510) or 0) >= 1

        deadline = time.monotonic() + 240
        while not summing() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert summing(), "the job never summed a chunk on the first aggregator"
        assert p.poll() is None, "training ended before the kill"
        a.proc.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err
        rows = {row["codec"]: row for row in map(json.loads, filter(str.strip, out.splitlines()))}
        assert rows["i32"]["replicas_identical"], rows["i32"]
        assert rows["i32"]["failovers"] == 1, rows["i32"]
        assert rows["i32"]["final_loss"] < rows["i32"]["first_loss"], rows["i32"]
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.communicate()
        a.stop()
        b.stop()


class _Bucket:
    """What the hook reads of a DDP GradBucket: its flat tensor and its index."""

    def __init__(self, tensor, index=0):
        self._tensor = tensor
        self._index = index

    def buffer(self):
        return self._tensor

    def index(self):
        return self._index


def _hook_means(addr, job, codec, calls, make, **state_options):
    """Two ranks, each an InaggState in a thread of this process, pass `make()` (the
    same values on both) through allreduce_hook `calls` times, one bucket; returns
    rank 0's means, one row per call, after checking that both ranks got the same."""
    import threading

    import torch

    import inagg.torch as itorch

    rows, errors = {}, []

    def rank(r):
        try:
            with itorch.InaggState(codec=codec, aggregator=addr, job=job, rank=r,
                                   world_size=2, join_timeout=20.0, **state_options) as state:
                out = []
                for _ in range(calls):
                    fut = itorch.allreduce_hook(state, _Bucket(torch.from_numpy(make())))
                    out.append(fut.wait().numpy().copy())
                assert state.allreduces == calls
                rows[r] = np.stack(out)
        except BaseException as e:  # the test fails with it below
            errors.append(e)

    ts = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
        assert not t.is_alive(), "a rank hangs"
    assert not errors, errors
    assert rows[0].tobytes() == rows[1].tobytes(), "the ranks got different means"
    return rows[0]


def _between_steps(step, n=8192):
    """1.0 at even indices (a block exponent of 0 in every block), 0.3 of the codec's
    rounding step `step` there at odd ones; returns the maker and the odd value."""
    odd = float(np.float32(0.3 * step))

    def make():
        a = np.full(n, odd, dtype=np.float32)
        a[::2] = 1.0
        return a

    return make, odd


# The i8 step next to 1.0 (2^(1 - 7)): the hook's default error feedback (block-scaled
# codecs) carries what each call rounds away into the next; without it, 0.3 step is
# lost on every call.
@pytest.mark.parametrize("feedback", [None, False])
def test_the_hooks_error_feedback_carries_the_residual(aggregator, feedback):
    step, calls = 2.0**-6, 16
    make, odd = _between_steps(step)
    means = _hook_means(aggregator.addr, 520 + (feedback is None), "i8", calls, make,
                        error_feedback=feedback)
    assert np.all(means[:, ::2] == 1.0)
    # The sum of the means so far against that of the inputs, after every call.
    off = np.cumsum(means[:, 1::2].astype(np.float64), axis=0) - odd * np.arange(1, calls + 1)[:, None]
    if feedback is None:
        assert np.all(np.abs(off) <= step / 2 * 1.01), np.abs(off).max() / step
    else:
        assert np.all(np.abs(off[-1] + 0.3 * calls * step) < 0.01 * step), off[-1] / step


# i32 at two ranks sums its integers exactly: stochastic rounding (without error
# feedback) leaves the mean over calls and elements unbiased, where rounding to
# nearest loses 0.3 step (2^-29 next to 1.0) every time.
@pytest.mark.parametrize("seed", [None, 11])
def test_the_hook_rounds_stochastically_when_asked(aggregator, seed):
    step, calls = 2.0**-29, 8
    make, odd = _between_steps(step, 16_384)
    means = _hook_means(aggregator.addr, 530 + (seed is not None), "i32", calls, make,
                        error_feedback=False, stochastic_rounding=seed)
    assert np.all(means[:, ::2] == 1.0)
    small = means[:, 1::2].astype(np.float64)
    if seed is None:
        assert np.all(np.abs(small - (odd - 0.3 * step)) < 0.01 * step)
    else:
        # 65,536 means of two ranks' roundings: standard deviation 0.0013 step.
        assert abs(small.mean() - odd) < 0.02 * step, (small.mean() - odd) / step
        assert np.mean(small.min(axis=0) != small.max(axis=0)) > 0.8


def _ddp_rows(args, env_extra=None, timeout=300):
    """Runs scripts/torch_ddp.py with `args` (and --json); returns its rows by codec
    and the completed process."""
    env = dict(os.environ, INAGG_BIN=inagg_bin(), **(env_extra or {}))
    for k in ("RANK", "WORLD_SIZE", "INAGG_FAILOVER"):
        env.pop(k, None)
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts/torch_ddp.py"), "--inagg-bin", inagg_bin(),
         *args, "--json"],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    return {row["codec"]: row for row in rows}, r


def _check_accuracy_fields(row, steps, target):
    """eval_accuracy: [wall_s, step, accuracy] points from before training to the
    last step, rising in wall time; time_to_accuracy_s: the first point's wall time
    at or above the target, else None."""
    pts = row["eval_accuracy"]
    assert pts, row
    assert all(len(p) == 3 for p in pts), pts
    walls, steps_at, accs = zip(*pts)
    assert walls[0] == 0 and steps_at[0] == 0, pts
    assert all(b > a for a, b in zip(walls, walls[1:])), pts
    assert all(b > a for a, b in zip(steps_at, steps_at[1:])), pts
    assert steps_at[-1] == steps, pts
    assert all(0 <= a <= 1 for a in accs), pts
    assert row["accuracy"] == accs[-1], row
    assert walls[-1] == pytest.approx(row["train_wall_s"]), row
    assert row["target_accuracy"] == pytest.approx(target), row
    reached = [w for w, _s, a in pts if a >= target]
    if reached:
        assert row["time_to_accuracy_s"] == pytest.approx(reached[0]), row
    else:
        assert row["time_to_accuracy_s"] is None, row


def test_ddp_reports_held_out_accuracy_and_time_to_accuracy(aggregator, tmp_path):
    """--eval-every, --target-accuracy and --out on loopback: accuracy points every K
    steps, the wall time to the target (or None), the CSV and the accuracy plot."""
    steps, target = 12, 0.2
    rows, r = _ddp_rows(
        ["--workers", "2", "--steps", str(steps), "--codecs", "f32,i8", "--job", "540",
         "--eval-every", "4", "--target-accuracy", str(target), "--out", str(tmp_path)],
        {"INAGG_AGGREGATOR": aggregator.addr},
    )
    assert set(rows) == {"gloo", "f32", "i8"}
    for row in rows.values():
        # Every field the rows had before stays.
        for k in ("workers", "steps", "first_loss", "final_loss", "accuracy", "step_s",
                  "bytes_per_step", "parameters", "replicas_identical", "failovers",
                  "max_param_diff_vs_gloo"):
            assert k in row, (k, row)
        assert row["replicas_identical"], row
        assert row["link_rate_bps"] is None, row
        assert row["eval_every"] == 4, row
        assert [p[1] for p in row["eval_accuracy"]] == [0, 4, 8, 12], row
        _check_accuracy_fields(row, steps, target)
    # The untrained model guesses (10 classes); 12 steps make it better.
    assert rows["f32"]["eval_accuracy"][-1][2] > rows["f32"]["eval_accuracy"][0][2]
    assert "evaluation time excluded" in r.stderr
    with open(tmp_path / "torch_ddp.csv") as f:
        table = list(__import__("csv").DictReader(f))
    assert [t["codec"] for t in table] == ["gloo", "f32", "i8"]
    assert all(t["link_rate_bps"] == "" for t in table)
    png = tmp_path / "accuracy_vs_time.png"
    assert png.exists(), "no plot: is matplotlib installed (python3-matplotlib)?\n" + r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One rate (loopback): no plot against the link rate.
    assert not (tmp_path / "step_time_vs_link_rate.png").exists()


def test_ddp_trains_on_debians_fashion_mnist(aggregator):
    """--data fashion-mnist: the model takes the images' 784 pixels, Gloo's and the
    hook's replicas agree, and training beats the untrained model on held-out images."""
    assert Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").exists(), (
        "apt install dataset-fashion-mnist")
    hidden = 64
    rows, _ = _ddp_rows(
        ["--workers", "2", "--steps", "20", "--codecs", "f32", "--job", "580",
         "--eval-every", "10", "--data", "fashion-mnist", "--hidden", str(hidden)],
        {"INAGG_AGGREGATOR": aggregator.addr},
    )
    assert set(rows) == {"gloo", "f32"}
    for row in rows.values():
        assert row["replicas_identical"], row
        assert row["parameters"] == 784 * hidden + hidden + hidden * hidden + hidden \
            + hidden * 10 + 10, row
        first, last = row["eval_accuracy"][0][2], row["eval_accuracy"][-1][2]
        # Ten classes: the untrained model guesses; 20 steps of 256 images learn.
        assert last > max(first, 0.3), row["eval_accuracy"]


def _namespaces_work():
    """Whether `ip netns add` works here (root or CAP_NET_ADMIN, and iproute2)."""
    name = f"inagg-probe-{os.getpid()}"
    try:
        ok = subprocess.run(["ip", "netns", "add", name], capture_output=True,
                            timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    if ok:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    import shutil

    return ok and shutil.which("tc") is not None


def test_ddp_trains_on_shaped_links_in_netlab(tmp_path):
    """--link-rate 200mbit: Gloo and the hook in scripts/netlab.sh's namespaces, each
    rank on its own 200 Mbit/s link; the rows say the rate, and Gloo's step takes at
    least the time its bytes need on that link."""
    if not _namespaces_work():
        pytest.skip("needs root (or CAP_NET_ADMIN) and iproute2 (ip, tc) to create "
                    "network namespaces for scripts/netlab.sh")
    steps = 8
    rows, r = _ddp_rows(
        ["--workers", "2", "--steps", str(steps), "--codecs", "f32,i8", "--eval-every", "4",
         "--model-parameters", "200k", "--link-rate", "200mbit", "--out", str(tmp_path)],
        timeout=400,
    )
    assert set(rows) == {"gloo", "f32", "i8"}
    for row in rows.values():
        assert row["link_rate_bps"] == 200e6, row
        assert row["replicas_identical"], row
        assert 190_000 < row["parameters"] < 210_000, row
        _check_accuracy_fields(row, steps, rows["f32"]["accuracy"] - 0.005)
    assert rows["f32"]["max_param_diff_vs_gloo"] < 1e-5, rows["f32"]
    assert rows["f32"]["time_to_accuracy_s"] is not None
    assert rows["i8"]["bytes_per_step"] < 0.35 * rows["f32"]["bytes_per_step"]
    # The ring's bytes through a 200 Mbit/s token bucket (256 KB burst): at least half
    # of bytes / rate per step, where loopback would take far less.
    gloo = rows["gloo"]
    assert gloo["step_s"] > 0.5 * gloo["bytes_per_step"] * 8 / 200e6, gloo
    assert (tmp_path / "torch_ddp.csv").exists()
    assert (tmp_path / "accuracy_vs_time.png").exists(), r.stderr


def test_link_rate_without_privileges_fails_at_once_and_says_why():
    """Without the right to create namespaces, --link-rate stops before training and
    names what it needs."""
    import shutil

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the script as an unprivileged user")
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env", "HOME=/tmp",
         sys.executable, str(ROOT / "scripts/torch_ddp.py"), "--workers", "2",
         "--link-rate", "200mbit"],
        capture_output=True, text=True, timeout=120,
    )
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip("the unprivileged user cannot import the script's modules: " + r.stderr)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "root (or CAP_NET_ADMIN)" in r.stderr and "`ip`" in r.stderr, r.stderr
    assert not r.stdout.strip(), r.stdout
