"""The Python module against a real aggregator process: every codec across four
processes with numpy arrays and torch tensors, and every error path raising the
exception that names its cause, never hanging."""

import multiprocessing as mp
import threading
import time

import numpy as np
import pytest
import torch

import inagg
import ranks
from conftest import Aggregator

CODECS = ["f32", "f16", "bf16", "i32", "i16", "i8"]
# Largest error relative to the largest exact sum (4 ranks).
TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 1.6e-2, "i32": 1e-6, "i16": 2e-3, "i8": 0.1}


def in_threads(rank, n, timeout=60):
    """Runs `rank(r)` for r in 0..n on threads of this process; fails if one hangs."""
    ts = [threading.Thread(target=rank, args=(r,)) for r in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=timeout)
        assert not t.is_alive()


def two_ranks_sum(aggregator, job, codec, n, options):
    """Ranks 0 and 1 of `job`, each with `options(r)` as its Worker's keywords,
    allreduce n elements of r + 1; returns each rank's result."""
    results = {}

    def rank(r):
        with inagg.Worker(
            aggregator.addr, job, r, 2, codec, join_timeout=20.0, **options(r)
        ) as w:
            a = np.full(n, r + 1, dtype=np.float32)
            w.allreduce(a)
            results[r] = a

    in_threads(rank, 2)
    return results


def test_module_lists_its_codecs():
    assert sorted(inagg.codecs()) == sorted(CODECS)


def test_every_codec_sums_numpy_and_torch_across_four_processes(aggregator):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    n, world = 50_000, 4
    procs = [ctx.Process(target=ranks.every_codec, args=(aggregator.addr, r, world, CODECS, n, out))
             for r in range(world)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for i, codec in enumerate(CODECS):
        exact = sum(ranks.inputs(r, n, i).astype(np.float64) for r in range(world))
        peak = np.abs(exact).max()
        for r in range(world):
            for kind, res in zip(("numpy", "torch"), got[r][codec]):
                err = np.abs(res - exact).max()
                assert err <= TOLERANCE[codec] * peak, f"{codec} {kind} rank {r}: {err} vs {peak}"
                # Every rank receives the same result.
                assert np.array_equal(res, got[0][codec][0 if kind == "numpy" else 1])


def test_both_ranks_in_threads_of_one_process_need_the_gil_released(aggregator):
    # Each call blocks until the other rank takes part: this finishes only because
    # Worker() and allreduce() release the GIL.
    results = {}

    def rank(r):
        with inagg.Worker(aggregator.addr, 7, r, 2, "i32", join_timeout=20.0) as w:
            a = np.full(100_000, r + 1, dtype=np.float32)
            results[r] = (w.allreduce(a), a)

    in_threads(rank, 2)
    for r in range(2):
        stats, a = results[r]
        assert np.all(a == 3.0)
        assert stats["bytes_sent"] > 4 * 100_000 and stats["elapsed_s"] > 0


def test_yields_before_sleep_is_taken_and_checked(aggregator):
    # One rank sleeps at once, the other spins long: both get the sum.
    results = two_ranks_sum(
        aggregator, 8, "f32", 50_000, lambda r: {"yields_before_sleep": [0, 1000][r]}
    )
    for r in range(2):
        assert np.all(results[r] == 3.0)
    with pytest.raises(OverflowError):
        inagg.Worker(aggregator.addr, 8, 0, 1, yields_before_sleep=-1)


def test_ranks_that_take_results_by_multicast_or_not_share_a_job(aggregator):
    # A job's results go to a multicast group only when every rank asks (the
    # default on loopback); here one does not, so each gets its own, the same sums.
    results = two_ranks_sum(aggregator, 9, "i8", 70_000, lambda r: {"multicast": r == 0})
    for r in range(2):
        assert np.allclose(results[r], 3.0, rtol=0.05)
    assert np.array_equal(results[0], results[1])


def test_a_sharded_aggregator_is_striped_over_from_its_first_address():
    # `inagg aggregator --threads 3`: the workers are given the first shard only.
    agg = Aggregator("--threads", "3")
    try:
        results = {}

        def rank(r):
            with inagg.Worker(agg.addr, 9, r, 2, "i32", join_timeout=20.0) as w:
                a = np.arange(300_000, dtype=np.float32) * (r + 1)
                results[r] = (w.stripes, w.allreduce(a), a)

        in_threads(rank, 2)
        want = np.arange(300_000, dtype=np.float64) * 3
        for r in range(2):
            stripes, stats, a = results[r]
            assert stripes == 3
            assert np.max(np.abs(a - want)) <= 1e-6 * np.max(want)
            assert stats["bytes_sent"] > 4 * 300_000
        assert np.array_equal(results[0][2], results[1][2])
    finally:
        agg.stop()


def test_a_bad_address_raises(aggregator):
    with pytest.raises(ValueError, match="HOST:PORT"):
        inagg.Worker("not an address", 1, 0, 1)
    # Nobody listens there: refused at once, not after the join timeout.
    with pytest.raises(ConnectionRefusedError, match="connection refused"):
        inagg.Worker("127.0.0.1:9", 1, 0, 1, join_timeout=20.0)
    with pytest.raises(ValueError, match="codec"):
        inagg.Worker(aggregator.addr, 1, 0, 1, "f64")
    with pytest.raises(ValueError, match="quic"):
        inagg.Worker(aggregator.addr, 1, 0, 1, transport="quic")


def test_a_wrong_secret_is_refused_and_the_job_goes_on(aggregator):
    done = {}

    def rank0():
        with inagg.Worker(aggregator.addr, 11, 0, 2, "f32", secret="right", join_timeout=20.0) as w:
            a = np.ones(1000, dtype=np.float32)
            w.allreduce(a)
            done[0] = a

    t = threading.Thread(target=rank0)
    t.start()
    # The first rank to join sets the job's secret: give rank 0 time to be first.
    time.sleep(1.0)
    with pytest.raises(inagg.RefusedError, match="secret"):
        inagg.Worker(aggregator.addr, 11, 1, 2, "f32", secret="wrong", join_timeout=5.0)
    with inagg.Worker(aggregator.addr, 11, 1, 2, "f32", secret="right", join_timeout=20.0) as w:
        b = np.ones(1000, dtype=np.float32)
        w.allreduce(b)
    t.join(timeout=30)
    assert np.all(done[0] == 2.0) and np.all(b == 2.0)


def test_a_dead_peer_raises_aborted_not_a_hang(aggregator):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    victim = ctx.Process(target=ranks.dies_after_joining, args=(aggregator.addr,))
    alive = ctx.Process(target=ranks.survivor, args=(aggregator.addr, out))
    alive.start()
    victim.start()
    what, seconds = out.get(timeout=60)
    alive.join(timeout=30)
    victim.join(timeout=30)
    assert what.startswith("AbortedError") and "rank 1" in what, what
    assert seconds < 15


def test_bad_buffers_and_a_closed_worker_raise(aggregator):
    w = inagg.Worker(aggregator.addr, 21, 0, 1, "f32")
    with pytest.raises(TypeError, match="float32"):
        w.allreduce(np.zeros(10, dtype=np.float64))
    with pytest.raises(TypeError, match="float32"):
        w.allreduce(torch.zeros(10, dtype=torch.float16))
    with pytest.raises(TypeError):
        w.allreduce([1.0, 2.0])
    with pytest.raises(ValueError, match="contiguous"):
        w.allreduce(np.zeros((10, 10), dtype=np.float32)[:, 1])
    with pytest.raises(ValueError, match="contiguous"):
        w.allreduce(torch.zeros(10, 10).t())
    ro = np.zeros(10, dtype=np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        w.allreduce(ro)
    with pytest.raises(ValueError, match="grad"):
        w.allreduce(torch.zeros(10, requires_grad=True))
    # A 2-D array and a world of one: the sum is the input.
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    w.allreduce(a)
    assert a[2, 3] == 11.0
    # Error feedback by key, and non-finite input to a block-scaled codec.
    w.close()
    assert w.closed
    with pytest.raises(inagg.ClosedError):
        w.allreduce(np.zeros(10, dtype=np.float32))
    with inagg.Worker(aggregator.addr, 22, 0, 1, "i8") as w8:
        w8.allreduce(np.ones(100, dtype=np.float32), key=3)
        with pytest.raises(ValueError, match="NaN"):
            w8.allreduce(np.full(100, np.nan, dtype=np.float32))


def test_quic_transport_with_fingerprint_and_ca(tmp_path):
    import subprocess

    from conftest import inagg_bin

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    p = subprocess.Popen(
        [inagg_bin(), "aggregator", "--quic", "127.0.0.1:0", "--cert", str(cert), "--key", str(key)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    try:
        words = p.stdout.readline().split()  # quic on ADDR sha256 FP certificate FILE
        assert words[:2] == ["quic", "on"], words
        addr, fp = words[2], words[4]
        with inagg.Worker(addr, 1, 0, 1, "i8", transport="quic", fingerprint=fp) as w:
            a = np.ones(10_000, dtype=np.float32)
            w.allreduce(a)
            assert np.allclose(a, 1.0, atol=0.02)
        with inagg.Worker(addr, 2, 0, 1, "f32", transport="quic", ca=str(cert)) as w:
            t = torch.full((5000,), 2.0)
            w.allreduce(t)
            assert torch.all(t == 2.0)
        wrong = ("0" if fp[0] != "0" else "1") + fp[1:]
        with pytest.raises(inagg.ConnectError, match="fingerprint"):
            inagg.Worker(addr, 3, 0, 1, transport="quic", fingerprint=wrong)
    finally:
        p.terminate()
        p.wait(timeout=10)


def test_an_unaligned_buffer_is_refused(aggregator):
    w = inagg.Worker(aggregator.addr, 61, 0, 1)
    try:
        raw = bytearray(4 * 1000 + 1)
        odd = np.frombuffer(raw, dtype="<f4", offset=1)
        with pytest.raises(ValueError, match="aligned"):
            w.allreduce(odd)
        ok = np.frombuffer(raw, dtype="<f4", count=1000)
        ok[:] = 1.5
        w.allreduce(ok)
        assert np.all(ok == 1.5)
    finally:
        w.close()


def test_addresses_take_host_names(aggregator):
    port = aggregator.addr.rsplit(":", 1)[1]
    w = inagg.Worker(f"localhost:{port}", 62, 0, 1)
    try:
        a = np.arange(10, dtype=np.float32)
        w.allreduce(a)
        assert np.array_equal(a, np.arange(10, dtype=np.float32))
    finally:
        w.close()
