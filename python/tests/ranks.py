"""Functions the tests run in spawned processes (importable by the children)."""

import os

import numpy as np

# Elements per run of one magnitude in `inputs`: not a multiple of any chunk or
# exponent block, so that blocks mix magnitudes and runs straddle block boundaries.
RUN = 3000


def inputs(rank, n, codec_index):
    """Normal values whose magnitude changes every RUN elements over four decades (the
    same runs on every rank), times a factor per rank: each exponent block has its own
    scale, and the ranks' block exponents differ."""
    runs = np.random.default_rng(1000 * codec_index).uniform(-2.0, 2.0, n // RUN + 1)
    scale = np.repeat(10.0 ** runs, RUN)[:n] * 1e-3 * (1.0 + rank) / 2.0
    rng = np.random.default_rng(1000 * codec_index + rank + 1)
    return (rng.standard_normal(n) * scale).astype(np.float32)


def every_codec(addr, rank, world, codecs, n, out):
    """Per codec: one job; sums a numpy array, then a torch tensor of the same values.
    Reports each codec's two results and the granted chunk size."""
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
            results[codec] = (a, t.numpy().copy(), w.chunk_elements)
    out.put((rank, results))


def dies_after_joining(addr):
    import inagg

    w = inagg.Worker(addr, 300, 1, 2, "f32", join_timeout=30.0)
    w.allreduce(np.zeros(1000, dtype=np.float32))
    os._exit(0)  # no leave: the aggregator sees silence


def survivor(addr, out):
    """Rank 0 of job 300: one allreduce with rank 1, then more until one raises (at
    most 1,000). Reports the error and how many of the later allreduces completed:
    with its peer dead, none may."""
    import inagg

    w = inagg.Worker(addr, 300, 0, 2, "f32", join_timeout=30.0)
    first = np.zeros(1000, dtype=np.float32)
    w.allreduce(first)
    assert np.all(first == 0.0)
    done = 0
    try:
        for _ in range(1_000):
            w.allreduce(np.ones(1 << 18, dtype=np.float32))
            done += 1
        out.put(("no error", done))
    except Exception as e:  # report the class and message to the test
        out.put((type(e).__name__ + ": " + str(e), done))
