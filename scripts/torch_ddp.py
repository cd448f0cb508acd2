#!/usr/bin/python3
"""Trains a small model with PyTorch DDP, once with DDP's default allreduce (Gloo)
and once per inagg codec through inagg's communication hook, and prints a table:
codec, final loss, accuracy, mean step time, bytes per step.

Two ways to run it:

    # N local processes, started by the script; it starts an aggregator too unless
    # INAGG_AGGREGATOR names one
    /usr/bin/python3 scripts/torch_ddp.py --workers 4 --codecs f32,f16,i8

    # under torchrun, with a separately started aggregator
    inagg aggregator --listen 127.0.0.1:7070 &
    INAGG_AGGREGATOR=127.0.0.1:7070 torchrun --redirects 1 --tee 1 --nproc_per_node 4 scripts/torch_ddp.py

(Debian's torchrun 1.13 under Python 3.11 needs `--redirects 1 --tee 1`: its default
fails on an enum change in 3.11.)

The data: a fixed random teacher network labels Gaussian inputs (seeded, no
download); every rank trains on its own shard of each batch. Bytes per step: for
inagg, what each rank put on the wire (IP and UDP headers included); for Gloo's
ring allreduce, the 2 (N - 1) / N x 4 bytes per parameter it sends at best.
"""

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parent.parent


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4, help="processes (without torchrun)")
    p.add_argument("--codecs", default="f32,f16,bf16,i8", help="inagg codecs to run")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=256, help="global batch per step")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--job", type=int, default=None, help="first inagg job id")
    p.add_argument("--inagg-bin", default=None, help="the inagg binary (to start an aggregator)")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    return p.parse_args(argv)


def data(seed, n, dim=32, classes=10):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(dim, classes, generator=g)
    x = torch.randn(n, dim, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, classes, generator=g)).argmax(dim=1)
    return x, y


def model(seed, hidden, dim=32, classes=10):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def train(args, rank, world, codec, job):
    """One training run on this rank; returns its row (rank 0's is printed)."""
    import inagg.torch as itorch

    x, y = data(args.seed, args.batch * args.steps + 4096)
    test_x, test_y = x[-4096:], y[-4096:]
    net = DDP(model(args.seed, args.hidden))
    state = None
    if codec != "gloo":
        state = itorch.InaggState(codec=codec, job=job, rank=rank, world_size=world)
        net.register_comm_hook(state, itorch.allreduce_hook)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    per = args.batch // world
    losses, times = [], []
    for step in range(args.steps):
        lo = step * args.batch + rank * per
        xb, yb = x[lo:lo + per], y[lo:lo + per]
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(net(xb), yb)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        # The global loss of the step: the mean of the ranks' losses.
        l = loss.detach().clone()
        dist.all_reduce(l)
        losses.append(l.item() / world)
    with torch.no_grad():
        acc = (net(test_x).argmax(dim=1) == test_y).float().mean().item()
    params = torch.cat([p.detach().flatten() for p in net.module.parameters()])
    nparams = params.numel()
    failovers = 0
    if state is not None:
        bytes_per_step = state.bytes_sent / max(1, args.steps)
        failovers = state.worker.failovers
        state.close()
    else:
        bytes_per_step = 2 * (world - 1) / world * 4 * nparams
    # Replicas: every rank's parameters must have the same bits.
    digests = [None] * world
    dist.all_gather_object(digests, hashlib.sha256(params.numpy().tobytes()).hexdigest())
    return {
        "codec": codec,
        "workers": world,
        "steps": args.steps,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "accuracy": acc,
        "step_s": sum(times[1:]) / max(1, len(times) - 1),
        "bytes_per_step": bytes_per_step,
        "parameters": nparams,
        "replicas_identical": len(set(digests)) == 1,
        "failovers": failovers,
    }, params


def rank_main(rank, world, args, results):
    """Runs Gloo then every codec on this rank."""
    if "RANK" not in os.environ:
        os.environ["RANK"] = str(rank)
        os.environ["WORLD_SIZE"] = str(world)
        os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rows = []
    row, reference = train(args, rank, world, "gloo", None)
    row["max_param_diff_vs_gloo"] = 0.0
    rows.append(row)
    first_job = args.job if args.job is not None else _job_base()
    for i, codec in enumerate(c for c in args.codecs.split(",") if c):
        row, params = train(args, rank, world, codec, first_job + i)
        row["max_param_diff_vs_gloo"] = (params - reference).abs().max().item()
        rows.append(row)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        if results is not None:
            results.put(rows)
        else:
            report(rows, args.json)


def _job_base():
    import inagg.torch as itorch

    return itorch.job_from_env(default=int(os.environ.get("INAGG_JOB_BASE", "1")))


def report(rows, as_json):
    if as_json:
        for r in rows:
            print(json.dumps(r), flush=True)
        return
    print(f"{'codec':<6} {'final loss':>10} {'accuracy':>9} {'step ms':>8} "
          f"{'bytes/step':>11} {'max |dp| vs gloo':>17} {'replicas':>9}")
    for r in rows:
        print(f"{r['codec']:<6} {r['final_loss']:>10.4f} {100 * r['accuracy']:>8.2f}% "
              f"{1e3 * r['step_s']:>8.2f} {r['bytes_per_step']:>11.0f} "
              f"{r['max_param_diff_vs_gloo']:>17.2e} "
              f"{'identical' if r['replicas_identical'] else 'DIFFER':>9}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_aggregator(binary):
    """Starts `inagg aggregator` on a free port; returns the process and address."""
    if binary is None:
        for cand in (ROOT / "target/release/inagg", ROOT / "target/debug/inagg"):
            if cand.exists():
                binary = str(cand)
                break
        else:
            binary = "inagg"
    p = subprocess.Popen(
        [binary, "aggregator", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    line = p.stdout.readline().strip()
    if not line.startswith("listening on "):
        p.kill()
        sys.exit(f"the aggregator did not start (it said {line!r})")
    return p, line.split()[2]


def main(argv=None):
    args = parse(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        # Under torchrun: this process is one rank; the aggregator runs elsewhere.
        rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return 0
    agg = None
    if not os.environ.get("INAGG_AGGREGATOR"):
        agg, addr = start_aggregator(args.inagg_bin)
        os.environ["INAGG_AGGREGATOR"] = addr
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    try:
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        procs = [ctx.Process(target=rank_main, args=(r, args.workers, args, results))
                 for r in range(args.workers)]
        for p in procs:
            p.start()
        rows = None
        deadline = time.time() + 1800
        while rows is None and time.time() < deadline:
            try:
                rows = results.get(timeout=1)
            except Exception:
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        if rows is None or any(p.exitcode != 0 for p in procs):
            print("a rank failed: exit codes", [p.exitcode for p in procs], file=sys.stderr)
            return 1
        report(rows, args.json)
        return 0
    finally:
        if agg is not None:
            agg.terminate()
            agg.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
