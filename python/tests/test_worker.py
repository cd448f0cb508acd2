"""The Python module against a real aggregator process: every codec across four
processes with numpy arrays and torch tensors, and every error path raising the
exception that names its cause, never hanging."""

import multiprocessing as mp
import threading

import numpy as np
import pytest
import torch

import inagg
import ranks
from conftest import Aggregator

CODECS = ["f32", "f16", "bf16", "i32", "i16", "i8"]

# What each codec does to a sum, from codec/src (the table in lib.rs, fixed.rs,
# half16.rs), for bounds computed here, independently of the library's own:
#
# Float codecs: each rank's value is rounded once to the wire format (to nearest: half
# an ulp, 2^-significand relative; stochastically: up to a whole ulp); the aggregator
# sums in f32 lanes (N - 1 additions, 2^-24 relative each) and rounds the sum to the
# wire format once more. Subnormals of the wire format err by half their spacing.
SIGNIFICAND = {"f32": 24, "f16": 11, "bf16": 8}
UNDERFLOW = {"f32": 2.0**-150, "f16": 2.0**-25, "bf16": 2.0**-134}
# Block-scaled fixed point: a block's values are scaled by 2^shift so that its largest
# magnitude lies below 2^p, rounded to integers (half a step of 2^-shift; a whole one
# at the clamp to 2^p - 1 at the top of the range; stochastically, up to a whole step)
# and summed exactly as integers. i32 shares one exponent per chunk over the ranks and
# keeps ceil(log2 N) bits of headroom (p = 31 - ceil(log2 N)); i16 shares one per chunk
# at full width (p = 15), and i8 quantizes at each rank's own exponent of each
# 8192-element block of a chunk (p = 7): for those two the aggregator rounds the sum
# once more, to units of 2^ceil(log2 N) times the (largest) step.
BITS = {"i32": 32, "i16": 16, "i8": 8}
EXPONENT_BLOCK = 8192


def ceil_log2(n):
    return (n - 1).bit_length()


def exponent_blocks(codec, n, chunk):
    """The element ranges that share one block exponent: chunks of `chunk` elements
    from the start of the tensor, and for i8 blocks of 8192 within each chunk."""
    per = EXPONENT_BLOCK if codec == "i8" else chunk
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        for b0 in range(c0, c1, per):
            yield b0, min(b0 + per, c1)


def error_bound(codec, inputs, chunk, stochastic=False):
    """The largest error of each element of the sum of `inputs` (one float32 array per
    rank) through `codec`, with chunks of `chunk` elements."""
    x = np.stack([np.asarray(a, dtype=np.float64).ravel() for a in inputs])
    world = len(inputs)
    exact = x.sum(axis=0)
    mags = np.abs(x).sum(axis=0)
    f32 = 2.0**-24
    gamma = (world - 1) * f32 / (1 - world * f32)  # N - 1 additions in f32
    if codec in SIGNIFICAND:
        if codec == "f32":
            return gamma * mags  # the lanes' additions; nothing else rounds
        u, uf = 2.0 ** -SIGNIFICAND[codec], UNDERFLOW[codec]
        k = 2 if stochastic else 1
        sent = k * (u * mags + world * uf)  # rounding the contributions
        lanes = gamma * (mags + sent)
        result = u * (np.abs(exact) + sent + lanes) + uf  # rounding the sum
        return sent + lanes + result
    bits, h = BITS[codec], ceil_log2(world)
    widen = codec != "i32"
    p = bits - 1 if widen else bits - 1 - h
    # Per element: the step of each rank's contribution (shared: the largest over the
    # ranks' block maxima) and the largest step of the block.
    step = np.zeros_like(x)
    for b0, b1 in exponent_blocks(codec, x.shape[1], chunk):
        peak = np.abs(x[:, b0:b1]).max(axis=1)  # each rank's block maximum
        if codec != "i8":
            peak[:] = peak.max()
        _, e1 = np.frexp(peak)  # peak = m * 2^e1, m in [0.5, 1): peak < 2^e1
        # Tiny blocks: the scale stays a normal float, 2^shift <= 2^126.
        scaled = np.maximum(np.ldexp(1.0, e1 - p), 2.0**-126)
        step[:, b0:b1] = np.where(peak > 0, scaled, 0.0)[:, None]
    # Half a step, or how far above 2^p - 1 the scaled value lies (the clamp); a whole
    # step when rounding stochastically.
    over = np.abs(x) / np.where(step > 0, step, 1.0) - (2**p - 1)
    per_rank = step * (1.0 if stochastic else np.maximum(0.5, over))
    top = step.max(axis=0)
    result = 2.0 ** (h - 1) * top if widen and h > 0 else 0.0
    # i8 aligns the ranks' exponents exactly within 31 - p - h binades of the top, and
    # rounds a contribution beyond that by at most 2^-(31 - p - h) of a step.
    spread = world * top * 2.0 ** -(31 - p - h) if codec == "i8" else 0.0
    # The integer sum times 2^-shift, as an f32 (inexact for i32's large sums).
    return (per_rank.sum(axis=0) + result + spread) * (1 + 2 * f32) + f32 * np.abs(exact)


def assert_sum(codec, inputs, got, chunk, what, stochastic=False):
    """Every element of `got` lies within the codec's bound of the float64 sum of
    `inputs`."""
    got = np.asarray(got).ravel()
    exact = np.stack([np.asarray(a, dtype=np.float64).ravel() for a in inputs]).sum(axis=0)
    assert got.shape == exact.shape, f"{what}: {got.shape} elements, want {exact.shape}"
    bound = error_bound(codec, inputs, chunk, stochastic)
    err = np.abs(got.astype(np.float64) - exact)
    bad = ~(err <= bound)  # NaN fails too
    if bad.any():
        i = int(np.argmax(np.where(bad, err - bound, -np.inf)))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {len(got)} elements outside the bound; element {i}: "
            f"got {got[i]!r}, exact {exact[i]!r}, error {err[i]:.3g} > bound {bound[i]:.3g}"
        )
    return float(np.max(err / np.where(bound > 0, bound, 1.0)))


def in_threads(rank, n, timeout=60):
    """Runs `rank(r)` for r in 0..n on threads of this process; fails if one hangs or
    raises."""
    errors = []

    def run(r):
        try:
            rank(r)
        except BaseException as e:  # the test fails with it below
            errors.append((r, e))

    ts = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=timeout)
        assert not t.is_alive(), "a rank hangs"
    if errors:
        r, e = errors[0]
        raise AssertionError(f"rank {r} raised {type(e).__name__}: {e}") from e


def two_ranks_sum(aggregator, job, codec, n, options):
    """Ranks 0 and 1 of `job`, each with `options(r)` as its Worker's keywords,
    allreduce n elements of r + 1; returns each rank's result, and the inputs and
    the chunk size for `assert_sum`."""
    results, chunks = {}, {}

    def rank(r):
        with inagg.Worker(
            aggregator.addr, job, r, 2, codec, join_timeout=20.0, **options(r)
        ) as w:
            a = np.full(n, r + 1, dtype=np.float32)
            w.allreduce(a)
            results[r] = a
            chunks[r] = w.chunk_elements

    in_threads(rank, 2)
    assert chunks[0] == chunks[1]
    inputs = [np.full(n, r + 1, dtype=np.float32) for r in range(2)]
    return results, inputs, chunks[0]


def test_module_lists_its_codecs():
    assert sorted(inagg.codecs()) == sorted(CODECS)


def test_every_codec_sums_numpy_and_torch_across_four_processes(aggregator):
    # More than one i8 chunk (57,344 elements on loopback), several of the others.
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    n, world = 70_000, 4
    procs = [ctx.Process(target=ranks.every_codec, args=(aggregator.addr, r, world, CODECS, n, out))
             for r in range(world)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for i, codec in enumerate(CODECS):
        inputs = [ranks.inputs(r, n, i) for r in range(world)]
        chunk = got[0][codec][2]
        assert all(got[r][codec][2] == chunk for r in range(world))
        for r in range(world):
            for k, kind in enumerate(("numpy", "torch")):
                res = got[r][codec][k]
                assert_sum(codec, inputs, res, chunk, f"{codec} {kind} rank {r}")
                # Every rank receives the same result, bit for bit.
                assert res.tobytes() == got[0][codec][k].tobytes(), f"{codec} {kind} rank {r}"


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
        # The congestion control's counts are reported.
        for key in ("marks", "dips", "pacing_holds", "overflows"):
            assert isinstance(stats[key], int) and stats[key] >= 0, stats


def test_yields_before_sleep_is_taken_and_checked(aggregator):
    # One rank sleeps at once, the other spins long: both get the sum.
    results, _, _ = two_ranks_sum(
        aggregator, 8, "f32", 50_000, lambda r: {"yields_before_sleep": [0, 1000][r]}
    )
    for r in range(2):
        assert np.all(results[r] == 3.0)
    with pytest.raises(OverflowError):
        inagg.Worker(aggregator.addr, 8, 0, 1, yields_before_sleep=-1)


def test_queue_target_is_taken_and_checked(aggregator):
    # One rank without the queue rule, the other with a target of one datagram: the
    # rule changes windows, never sums.
    results, _, _ = two_ranks_sum(
        aggregator, 12, "i32", 200_000, lambda r: {"queue_target": [0, 1][r]}
    )
    assert results[0].tobytes() == results[1].tobytes()
    assert np.all(results[0] == 3.0)
    with pytest.raises(OverflowError):
        inagg.Worker(aggregator.addr, 12, 0, 1, queue_target=-1)


@pytest.mark.parametrize("name, job", [("dip_interval", 13), ("overflow_hold", 14)])
def test_congestion_control_durations_are_taken_and_checked(aggregator, name, job):
    # One rank with the rule off (0), the other with it as short as it may be: the
    # dip rule and the overflow rule change how many datagrams are in flight, never
    # sums.
    results, _, _ = two_ranks_sum(
        aggregator, job, "i32", 200_000, lambda r: {name: [0, 0.001][r]}
    )
    assert results[0].tobytes() == results[1].tobytes()
    assert np.all(results[0] == 3.0)
    with pytest.raises(ValueError, match=f"{name} must be positive seconds"):
        inagg.Worker(aggregator.addr, job, 0, 1, **{name: -1.0})


def test_ranks_that_take_results_by_multicast_or_not_share_a_job(aggregator):
    # A job's results go to a multicast group only when every rank asks (the
    # default on loopback); here one does not, so each gets its own, the same sums.
    results, inputs, chunk = two_ranks_sum(
        aggregator, 9, "i8", 70_000, lambda r: {"multicast": r == 0}
    )
    for r in range(2):
        assert_sum("i8", inputs, results[r], chunk, f"rank {r}")
    assert results[0].tobytes() == results[1].tobytes()


def test_a_sharded_aggregator_is_striped_over_from_its_first_address():
    # `inagg aggregator --threads 3`: the workers are given the first shard only.
    agg = Aggregator("--threads", "3")
    try:
        results = {}

        def rank(r):
            with inagg.Worker(agg.addr, 9, r, 2, "i32", join_timeout=20.0) as w:
                a = np.arange(300_000, dtype=np.float32) * (r + 1)
                results[r] = (w.stripes, w.allreduce(a), a, w.chunk_elements)

        in_threads(rank, 2)
        inputs = [np.arange(300_000, dtype=np.float32) * (r + 1) for r in range(2)]
        for r in range(2):
            stripes, stats, a, chunk = results[r]
            assert stripes == 3
            assert_sum("i32", inputs, a, chunk, f"rank {r}")
            assert stats["bytes_sent"] > 4 * 300_000
        assert results[0][2].tobytes() == results[1][2].tobytes()
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


def test_a_wrong_secret_is_refused_and_the_job_goes_on():
    agg = Aggregator("--silence-timeout-ms", "1500", metrics=True)
    try:
        done = {}

        def rank0():
            with inagg.Worker(agg.addr, 11, 0, 2, "f32", secret="right", join_timeout=30.0) as w:
                a = np.ones(1000, dtype=np.float32)
                w.allreduce(a)
                done[0] = a

        t = threading.Thread(target=rank0)
        t.start()
        # The first rank to join sets the job's secret: rank 0 is first once the
        # aggregator holds job 11, which its join created.
        agg.wait_for(
            "job 11 on the aggregator",
            lambda: (agg.metric("inagg_job_packets_received_total", job=11) or 0) >= 1,
        )
        with pytest.raises(inagg.RefusedError, match="secret"):
            inagg.Worker(agg.addr, 11, 1, 2, "f32", secret="wrong", join_timeout=5.0)
        with inagg.Worker(agg.addr, 11, 1, 2, "f32", secret="right", join_timeout=20.0) as w:
            b = np.ones(1000, dtype=np.float32)
            w.allreduce(b)
        t.join(timeout=30)
        assert not t.is_alive()
        assert np.all(done[0] == 2.0) and np.all(b == 2.0)
        assert agg.proc.poll() is None, "the aggregator died"
    finally:
        agg.stop()


def test_a_dead_peer_raises_aborted_not_a_hang(aggregator):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    victim = ctx.Process(target=ranks.dies_after_joining, args=(aggregator.addr,))
    alive = ctx.Process(target=ranks.survivor, args=(aggregator.addr, out))
    alive.start()
    victim.start()
    # A hang guard: the aggregator aborts the job once rank 1 is silent for 1.5 s.
    what, completed = out.get(timeout=60)
    alive.join(timeout=30)
    victim.join(timeout=30)
    assert what.startswith("AbortedError") and "rank 1" in what, what
    # Without its peer, no allreduce completes: the first one after the death raises.
    assert completed == 0, f"{completed} allreduces completed without rank 1"


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
    w.close()
    assert w.closed
    with pytest.raises(inagg.ClosedError):
        w.allreduce(np.zeros(10, dtype=np.float32))
    # Non-finite input to a block-scaled codec. (What a key does:
    # test_error_feedback_carries_the_residual_from_call_to_call.)
    with inagg.Worker(aggregator.addr, 22, 0, 1, "i8") as w8:
        ones = np.ones(100, dtype=np.float32)
        w8.allreduce(ones, key=3)
        assert np.all(ones == 1.0)
        with pytest.raises(ValueError, match="NaN"):
            w8.allreduce(np.full(100, np.nan, dtype=np.float32))


# A value the codec cannot carry: 0.3 of a rounding step. Fixed point: next to a 1.0
# in every block (block exponent 0, step 2^(1 - p), p as in BITS' comment above) the
# step is 2^-29 for i32 at two ranks, 2^-14 for i16 and 2^-6 for i8; floats: 0.3 ulp
# above 1.0 (2^-10 for f16, 2^-7 for bf16).
STEP = {"i32": 2.0**-29, "i16": 2.0**-14, "i8": 2.0**-6, "f16": 2.0**-10, "bf16": 2.0**-7}


def between_steps(codec, n):
    """n elements: 1.0 at even indices, at odd ones `odd`, 0.3 step from a value the
    codec carries; returns (array, odd)."""
    odd = (1.0 if codec in ("f16", "bf16") else 0.0) + 0.3 * STEP[codec]
    a = np.full(n, odd, dtype=np.float32)
    a[::2] = 1.0
    return a, float(np.float32(odd))


def repeated_sums(aggregator, job, codec, world, calls, n, options, key=None):
    """`calls` allreduces of `between_steps` on each of `world` ranks in threads;
    returns rank 0's results, one row per call, after checking that every rank got
    the same ones, and that each call's lies within the codec's bound (without a key:
    with one, a call sums its inputs and the residual carried)."""
    results, chunks = {}, {}

    def rank(r):
        with inagg.Worker(aggregator.addr, job, r, world, codec, join_timeout=20.0,
                          **options) as w:
            rows = []
            for _ in range(calls):
                a, _ = between_steps(codec, n)
                w.allreduce(a, key)
                rows.append(a)
            results[r] = np.stack(rows)
            chunks[r] = w.chunk_elements

    in_threads(rank, world)
    for r in range(1, world):
        assert results[r].tobytes() == results[0].tobytes(), f"rank {r} got other sums"
    if key is None:
        inputs = [between_steps(codec, n)[0]] * world
        for k, row in enumerate(results[0]):
            assert_sum(codec, inputs, row, chunks[0], f"call {k}",
                       stochastic="stochastic_rounding" in options)
    return results[0]


# Worlds at which the sum is not rounded again: i32 keeps its integer sums exactly,
# i16 and i8 round theirs to the wire's width unless N = 1, and f16 and bf16 round the
# f32 sum to two bytes, exact for one rank. (At N = 2 that last rounding, half up or
# to even, is biased by itself: i8 at two ranks came to 1.7 times the exact mean.)
@pytest.mark.parametrize("codec,world", [("i32", 2), ("i16", 1), ("i8", 1), ("f16", 1), ("bf16", 1)])
def test_stochastic_rounding_removes_the_rounding_bias(aggregator, codec, world):
    calls, n = 8, 16_384
    _, odd = between_steps(codec, n)
    step = STEP[codec]
    exact = world * odd
    nearest = repeated_sums(aggregator, 40, codec, world, calls, n, {})
    dithered = repeated_sums(aggregator, 41, codec, world, calls, n, {"stochastic_rounding": 7})
    assert np.all(nearest[:, ::2] == world), "1.0 is carried exactly"
    # To nearest: every call rounds the same way, 0.3 step down on every rank.
    bias = nearest[:, 1::2].astype(np.float64).mean() - exact
    assert abs(bias + 0.3 * world * step) < 0.01 * step, bias / step
    # Stochastically: a value on the grid stays exact (a quantizer that added its noise
    # in f32 rounded 2^14 + u up to 2^14 + 1 where u > 1 - 2^-10), each other result is
    # off by up to a step per rank (repeated_sums checks every call's), and the mean
    # over 65,536 of them (standard deviation below 0.003 step) is the exact sum.
    assert np.all(dithered[:, ::2] == world), "1.0 is carried exactly, dithered too"
    small = dithered[:, 1::2].astype(np.float64)
    mean = small.mean() - exact
    assert abs(mean) < 0.02 * world * step, mean / step
    # Every call draws new random bits: most elements' results differ between calls
    # (all but 0.3^8 + 0.7^8 of them, for each rank).
    varies = np.mean(small.min(axis=0) != small.max(axis=0))
    assert varies > 0.8, varies


@pytest.mark.parametrize("codec", ["i32", "i16", "i8"])
def test_error_feedback_carries_the_residual_from_call_to_call(aggregator, codec):
    # Two ranks with the same values: their contributions are equal, so the sum is not
    # rounded again, and what error feedback leaves is each rank's residual alone.
    world, calls, n = 2, 16, 8192
    _, odd = between_steps(codec, n)
    step = STEP[codec]
    plain = repeated_sums(aggregator, 42, codec, world, calls, n, {})
    carried = repeated_sums(aggregator, 43, codec, world, calls, n, {}, key=5)
    for rows in (plain, carried):
        assert np.all(rows[:, ::2] == world), "1.0 is carried exactly"
    inputs = world * odd * np.arange(1, calls + 1)[:, None]  # the sum so far of inputs
    # Without a key each call rounds 0.3 step away on each rank, every time: after 16
    # calls the sum of results lies 9.6 steps off.
    drift = np.cumsum(plain[:, 1::2].astype(np.float64), axis=0) - inputs
    assert np.all(np.abs(drift[-1] + 0.3 * world * calls * step) < 0.01 * step)
    # With one, each call sends what the last left out: after every call the sum of
    # results lies within the ranks' residuals (half a step each) of the inputs'.
    track = np.cumsum(carried[:, 1::2].astype(np.float64), axis=0) - inputs
    assert np.all(np.abs(track) <= world * step / 2 * 1.01), np.abs(track).max() / step
    # ... which makes individual results differ from call to call.
    assert not np.array_equal(carried[0], carried[1])


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
            assert_sum("i8", [np.ones(10_000, dtype=np.float32)], a, w.chunk_elements, "quic")
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
