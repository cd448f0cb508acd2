"""DDP with the inagg communication hook, through scripts/torch_ddp.py: replicas end
identical, the loss goes down, and f32 through inagg matches DDP's own allreduce."""

import json
import os
import signal
import subprocess
import sys
import time

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
