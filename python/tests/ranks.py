"""Functions the tests run in spawned processes (importable by the children)."""

import os
import time

import numpy as np


def inputs(rank, n, codec_index):
    rng = np.random.default_rng(1000 * codec_index + rank)
    return (rng.standard_normal(n) * 0.01).astype(np.float32)


def every_codec(addr, rank, world, codecs, n, out):
    """Per codec: one job; sums a numpy array, then a torch tensor of the same values."""
    import torch

    import inagg

    results = {}
    for i, codec in enumerate(codecs):
        with inagg.Worker(addr, 100 + i, rank, world, codec, join_timeout=60.0) as w:
            a = inputs(rank, n, i)
            stats = w.allreduce(a)
            assert stats["elements"] == n
            t = torch.from_numpy(inputs(rank, n, i).copy())
            w.allreduce(t)
            results[codec] = (a, t.numpy().copy())
    out.put((rank, results))


def dies_after_joining(addr):
    import inagg

    w = inagg.Worker(addr, 300, 1, 2, "f32", join_timeout=30.0)
    w.allreduce(np.zeros(1000, dtype=np.float32))
    os._exit(0)  # no leave: the aggregator sees silence


def survivor(addr, out):
    import inagg

    w = inagg.Worker(addr, 300, 0, 2, "f32", join_timeout=30.0)
    w.allreduce(np.zeros(1000, dtype=np.float32))
    t0 = time.monotonic()
    try:
        for _ in range(10_000):
            w.allreduce(np.ones(1 << 18, dtype=np.float32))
        out.put(("no error", time.monotonic() - t0))
    except Exception as e:  # report the class and message to the test
        out.put((type(e).__name__ + ": " + str(e), time.monotonic() - t0))
