#!/usr/bin/python3
"""Trains a small model with PyTorch DDP, once with DDP's default allreduce (Gloo)
and once per inagg codec through inagg's communication hook, and prints a table:
codec, final loss, accuracy, mean step time, bytes per step, time to a target
accuracy.

Three ways to run it:

    # N local processes, started by the script; it starts an aggregator too unless
    # INAGG_AGGREGATOR names one
    /usr/bin/python3 scripts/torch_ddp.py --workers 4 --codecs f32,f16,i8

    # under torchrun, with a separately started aggregator
    inagg aggregator --listen 127.0.0.1:7070 &
    INAGG_AGGREGATOR=127.0.0.1:7070 torchrun --redirects 1 --tee 1 --nproc_per_node 4 scripts/torch_ddp.py

    # where bandwidth is scarce: inside scripts/netlab.sh's emulated cluster (one
    # network namespace per rank and one for the aggregator, each rank's link shaped
    # to RATE), once per rate; needs root (or CAP_NET_ADMIN) and iproute2
    /usr/bin/python3 scripts/torch_ddp.py --workers 4 --link-rate 1gbit,200mbit --out /tmp/ddp

(Debian's torchrun 1.13 under Python 3.11 needs `--redirects 1 --tee 1`: its default
fails on an enum change in 3.11.)

The data: a fixed random teacher network labels Gaussian inputs (seeded, no
download); every rank trains on its own shard of each batch. Bytes per step: for
inagg, what each rank put on the wire (IP and UDP headers included); for Gloo's
ring allreduce, the 2 (N - 1) / N x 4 bytes per parameter it sends at best.

Held-out accuracy is evaluated (by rank 0, on 4096 held-out examples) before
training, every --eval-every steps and after the last step. Training wall time is
rank 0's time in training steps (forward, backward with the gradient exchange,
optimizer step); evaluation, and the per-step loss bookkeeping, are excluded. Time to
accuracy: the training wall time at the first evaluation at or above the target
(--target-accuracy; default the f32 run's final accuracy minus 0.5 points, or Gloo's
without an f32 run), null when no evaluation reaches it.
"""

import argparse
import csv
import gzip
import hashlib
import json
import math
import os
import shutil
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
SCRIPT = Path(__file__).resolve()
DIM, CLASSES = 32, 10
# Debian's dataset-fashion-mnist (`--data fashion-mnist`): 28 x 28 grey images, 10
# classes, as gzipped IDX files.
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("synthetic", "fashion-mnist")
DEFAULT_HIDDEN = 256
# With --link-rate and without --model-parameters: about 4 M parameters (hidden width
# 1978). Communication grows with the parameters as compute does; at 1 Gbit/s on 4
# ranks sharing 2 cores, Gloo's ring (1.5 x 16 MB per rank and step) takes most of
# a step.
DEFAULT_LINK_PARAMETERS = 4_000_000
# Gloo's rendezvous in netlab: worker 0's address (198.18.0.(10 + r) is worker r).
NETLAB_MASTER = "198.18.0.10"
CSV_FIELDS = [
    "codec", "link_rate_bps", "workers", "steps", "parameters", "first_loss",
    "final_loss", "accuracy", "step_s", "bytes_per_step", "train_wall_s",
    "time_to_accuracy_s", "target_accuracy", "target_source", "eval_every",
    "max_param_diff_vs_gloo", "replicas_identical", "failovers",
]


def _count(text):
    """`4000000`, `4e6`, `4M`, `500k`: a parameter count."""
    t = text.strip().lower()
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(t[-1:], None)
    try:
        v = float(t[:-1]) * scale if scale else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r}") from None
    if v < 1000:
        raise argparse.ArgumentTypeError("--model-parameters: at least 1000")
    return int(v)


def rate_bps(rate):
    """scripts/netlab.sh's rates (`1gbit`, `200mbit`, `500kbit`, `1000bit`) in bits
    per second, or None if netlab would refuse it."""
    t = rate.strip().lower()
    for suffix, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0), ("", 1.0)):
        if t.endswith(suffix):
            num = t[: len(t) - len(suffix)] if suffix else t
            try:
                return float(num) * scale if num and float(num) > 0 else None
            except ValueError:
                return None
    return None


def rate_label(bps):
    if bps is None:
        return "loopback"
    for scale, unit in ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if bps >= scale:
            return f"{bps / scale:g} {unit}"
    return f"{bps:g} bit/s"


def _fraction(text):
    v = float(text)
    v = v / 100 if v > 1 else v  # 87.5 and 0.875 mean the same
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError("--target-accuracy: a fraction (0.87) or percent (87)")
    return v


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4, help="processes (without torchrun)")
    p.add_argument("--codecs", default="f32,f16,bf16,i8", help="inagg codecs to run")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=256, help="global batch per step")
    p.add_argument("--hidden", type=int, default=None,
                   help=f"hidden width (default {DEFAULT_HIDDEN}, or what --model-parameters needs)")
    p.add_argument("--model-parameters", type=_count, default=None, metavar="P",
                   help="about P parameters (4M, 500k): picks the hidden width; default with "
                        f"--link-rate {DEFAULT_LINK_PARAMETERS / 1e6:g}M, else --hidden")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data", default="synthetic", choices=DATASETS,
                   help="synthetic (generated from --seed), or fashion-mnist (Debian's "
                        f"dataset-fashion-mnist in {FASHION_MNIST})")
    p.add_argument("--job", type=int, default=None, help="first inagg job id")
    p.add_argument("--inagg-bin", default=None, help="the inagg binary (to start an aggregator)")
    p.add_argument("--eval-every", type=int, default=10, metavar="K",
                   help="held-out accuracy every K steps (and before and after training; "
                        "0: only then); its time is not training time")
    p.add_argument("--target-accuracy", type=_fraction, default=None, metavar="A",
                   help="accuracy for time to accuracy (0.87 or 87); default the f32 run's "
                        "final accuracy minus 0.5 points (Gloo's without f32)")
    p.add_argument("--link-rate", default=None, metavar="RATE[,RATE...]",
                   help="run in scripts/netlab.sh's emulated cluster, each rank's link shaped "
                        "to RATE (1gbit, 200mbit), once per rate; needs root or CAP_NET_ADMIN")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write DIR/torch_ddp.csv, DIR/accuracy_vs_time.png and, with several "
                        "rates, DIR/step_time_vs_link_rate.png")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    # Internal: the run inside netlab.sh, and one rank of it in its namespace.
    p.add_argument("--in-netlab", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hidden is not None and args.model_parameters is not None:
        p.error("--hidden and --model-parameters: give one")
    if args.eval_every < 0:
        p.error("--eval-every: 0 or more")
    args.rates = []
    if args.link_rate:
        for rate in (r.strip() for r in args.link_rate.split(",")):
            if rate and rate_bps(rate) is None:
                p.error(f"--link-rate: {rate!r} does not look like 1gbit, 200mbit or 500kbit")
            if rate:
                args.rates.append(rate)
        if not args.rates:
            p.error("--link-rate: no rate given")
    args.dim, args.classes = DIM, CLASSES
    if args.data == "fashion-mnist":
        missing = [f for f in FASHION_FILES if not (FASHION_MNIST / f).exists()]
        if missing:
            p.error(f"--data fashion-mnist: {FASHION_MNIST / missing[0]} is missing "
                    "(apt install dataset-fashion-mnist)")
        args.dim, args.classes = 28 * 28, 10
    if args.hidden is None:
        target = args.model_parameters
        if target is None and args.rates:
            target = DEFAULT_LINK_PARAMETERS
        args.hidden = hidden_for(target, args.dim, args.classes) if target else DEFAULT_HIDDEN
    return args


def parameters_of(hidden, dim=DIM, classes=CLASSES):
    return dim * hidden + hidden + hidden * hidden + hidden + hidden * classes + classes


def hidden_for(parameters, dim=DIM, classes=CLASSES):
    """The hidden width whose model has the parameter count nearest `parameters`."""
    b = dim + classes + 2
    h = max(1, round((-b + math.sqrt(b * b + 4 * max(0, parameters - classes))) / 2))
    return min((h - 1, h, h + 1),
               key=lambda w: abs(parameters_of(max(1, w), dim, classes) - parameters))


def data(seed, n, dim=DIM, classes=CLASSES):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(dim, classes, generator=g)
    x = torch.randn(n, dim, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, classes, generator=g)).argmax(dim=1)
    return x, y


FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def idx(path):
    """One gzipped IDX file as a tensor (uint8 images or labels), its header checked."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise SystemExit(f"torch_ddp: {path} is not an IDX file of unsigned bytes")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(raw[3])]
    start = 4 + 4 * raw[3]
    count = math.prod(dims)
    if len(raw) != start + count:
        raise SystemExit(f"torch_ddp: {path} holds {len(raw) - start} bytes, its header "
                         f"says {count}")
    return torch.frombuffer(bytearray(raw[start:]), dtype=torch.uint8).reshape(dims)


def dataset(args, n):
    """Training rows (at least `n`, repeated in order where the set is smaller) and
    4096 held-out rows: (x, y, test_x, test_y)."""
    if args.data == "synthetic":
        x, y = data(args.seed, n + 4096)
        return x[:n], y[:n], x[-4096:], y[-4096:]
    files = [idx(FASHION_MNIST / f) for f in FASHION_FILES]
    train_x = files[0].reshape(len(files[0]), -1).float() / 255.0
    train_y = files[1].long()
    test_x = files[2].reshape(len(files[2]), -1).float() / 255.0
    test_y = files[3].long()
    rows = torch.arange(n) % len(train_x)
    return train_x[rows], train_y[rows], test_x[:4096], test_y[:4096]


def model(seed, hidden, dim=DIM, classes=CLASSES):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def evaluate(net, x, y):
    """Held-out accuracy of the (unwrapped) model: no DDP machinery, so rank 0 can
    evaluate alone."""
    with torch.no_grad():
        return (net(x).argmax(dim=1) == y).float().mean().item()


def train(args, rank, world, codec, job):
    """One training run on this rank; returns its row (rank 0's is printed)."""
    import inagg.torch as itorch

    x, y, test_x, test_y = dataset(args, args.batch * args.steps)
    net = DDP(model(args.seed, args.hidden, args.dim, args.classes))
    state = None
    if codec != "gloo":
        state = itorch.InaggState(codec=codec, job=job, rank=rank, world_size=world)
        net.register_comm_hook(state, itorch.allreduce_hook)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    per = args.batch // world
    losses, times, evals = [], [], []
    # Rank 0 evaluates while the others wait at the barrier: it may use every core.
    eval_threads = max(1, min(4, os.cpu_count() or 1))

    def held_out(step):
        if rank == 0:
            torch.set_num_threads(eval_threads)
            evals.append([float(sum(times)), step, evaluate(net.module, test_x, test_y)])
            torch.set_num_threads(1)
        dist.barrier()

    held_out(0)
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
        done = step + 1
        if done == args.steps or (args.eval_every and done % args.eval_every == 0):
            held_out(done)
    # The final evaluation (rank 0's; the other ranks' rows are not reported).
    acc = evals[-1][2] if evals else None
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
    bps = os.environ.get("INAGG_NETLAB_LINK_BPS") if args.rank_worker is not None else None
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
        "link_rate_bps": float(bps) if bps else None,
        "train_wall_s": sum(times),
        "eval_every": args.eval_every,
        "eval_accuracy": evals,
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
    t0 = time.monotonic()
    row, reference = train(args, rank, world, "gloo", None)
    row["max_param_diff_vs_gloo"] = 0.0
    rows.append(row)
    progress(args, rank, row, t0)
    first_job = args.job if args.job is not None else _job_base()
    for i, codec in enumerate(c for c in args.codecs.split(",") if c):
        t0 = time.monotonic()
        row, params = train(args, rank, world, codec, first_job + i)
        row["max_param_diff_vs_gloo"] = (params - reference).abs().max().item()
        rows.append(row)
        progress(args, rank, row, t0)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        if results is not None:
            results.put(rows)
        elif args.rank_worker is not None:
            # In netlab: the raw rows go up to the run that started netlab.sh.
            for r in rows:
                print(json.dumps(r), flush=True)
        else:
            finish(rows, args)


def progress(args, rank, row, t0):
    """In netlab runs (long ones), a line on standard error per finished system."""
    if rank == 0 and args.rank_worker is not None:
        print(f"torch_ddp: {rate_label(row['link_rate_bps'])}: {row['codec']} done "
              f"({time.monotonic() - t0:.0f} s, step {1e3 * row['step_s']:.0f} ms)",
              file=sys.stderr, flush=True)


def _job_base():
    import inagg.torch as itorch

    return itorch.job_from_env(default=int(os.environ.get("INAGG_JOB_BASE", "1")))


def set_targets(rows, target=None):
    """Adds target_accuracy, target_source and time_to_accuracy_s to every row; returns
    the target and where it came from."""
    if target is not None:
        source = "--target-accuracy"
    else:
        ref = next((r for r in rows if r["codec"] == "f32"), None)
        ref = ref or next((r for r in rows if r["codec"] == "gloo"), None)
        if ref is None or ref["accuracy"] is None:
            target, source = None, "none"
        else:
            target = max(0.0, ref["accuracy"] - 0.005)
            source = f"{ref['codec']} final accuracy - 0.5 points"
            if ref["link_rate_bps"] is not None and len({r["link_rate_bps"] for r in rows}) > 1:
                source += f" (at {rate_label(ref['link_rate_bps'])})"
    for r in rows:
        r["target_accuracy"] = target
        r["target_source"] = source
        r["time_to_accuracy_s"] = None if target is None else next(
            (w for w, _step, acc in r["eval_accuracy"] if acc >= target), None)
    return target, source


def finish(rows, args):
    """What the run that the user started does with all rows: time to accuracy, the
    table or JSON, and --out's files."""
    target, source = set_targets(rows, args.target_accuracy)
    report(rows, args.json)
    if target is None:
        note = "no target accuracy (no final accuracy)"
    else:
        note = f"target accuracy {100 * target:.2f}% ({source})"
    every = f"every {args.eval_every} steps" if args.eval_every else "before and after training"
    note += (f"; held-out accuracy evaluated {every}; time to target = training wall time "
             "(rank 0's steps) at the first evaluation reaching it, evaluation time excluded")
    print(note, file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.out:
        for path in write_out(rows, Path(args.out), target):
            print(f"wrote {path}", file=sys.stderr, flush=True)


def report(rows, as_json):
    if as_json:
        for r in rows:
            print(json.dumps(r), flush=True)
        return
    print(f"{'codec':<6} {'final loss':>10} {'accuracy':>9} {'step ms':>8} "
          f"{'bytes/step':>11} {'max |dp| vs gloo':>17} {'replicas':>9} "
          f"{'to target s':>12} {'link':>10}")
    for r in rows:
        tta = r.get("time_to_accuracy_s")
        print(f"{r['codec']:<6} {r['final_loss']:>10.4f} {100 * r['accuracy']:>8.2f}% "
              f"{1e3 * r['step_s']:>8.2f} {r['bytes_per_step']:>11.0f} "
              f"{r['max_param_diff_vs_gloo']:>17.2e} "
              f"{'identical' if r['replicas_identical'] else 'DIFFER':>9} "
              f"{'not reached' if tta is None else f'{tta:.2f}':>12} "
              f"{rate_label(r.get('link_rate_bps')):>10}")


def write_out(rows, out, target):
    """DIR/torch_ddp.csv and the plots (matplotlib); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "torch_ddp.csv"]
    with open(written[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("torch_ddp: no plots: matplotlib is missing (Debian: apt-get install "
              "python3-matplotlib)", file=sys.stderr)
        return written
    rates = sorted({r["link_rate_bps"] for r in rows}, key=lambda b: -(b or math.inf))
    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    colors = {c: f"C{i}" for i, c in enumerate(codecs)}
    fig, axes = plt.subplots(1, len(rates), figsize=(6.4 * len(rates), 4.6), squeeze=False,
                             sharey=True)
    for ax, bps in zip(axes[0], rates):
        for r in (r for r in rows if r["link_rate_bps"] == bps):
            pts = r["eval_accuracy"]
            ax.plot([p[0] for p in pts], [100 * p[2] for p in pts], marker=".",
                    color=colors[r["codec"]], label=r["codec"])
        if target is not None:
            ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1,
                       label=f"target {100 * target:.1f}%")
        ax.set_title(f"{rows[0]['workers']} ranks, {rate_label(bps)}")
        ax.set_xlabel("training wall time, s (evaluation excluded)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("held-out accuracy, %")
    fig.suptitle(f"DDP, {rows[0]['parameters'] / 1e6:.2f} M parameters: accuracy against time")
    fig.tight_layout()
    written.append(out / "accuracy_vs_time.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    shaped = [b for b in rates if b is not None]
    if len(shaped) > 1:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4))
        for c in codecs:
            pts = sorted((r["link_rate_bps"], r) for r in rows
                         if r["codec"] == c and r["link_rate_bps"] is not None)
            xs = [b / 1e6 for b, _ in pts]
            a1.plot(xs, [1e3 * r["step_s"] for _, r in pts], marker="o", color=colors[c], label=c)
            tt = [(b / 1e6, r["time_to_accuracy_s"]) for b, r in pts
                  if r["time_to_accuracy_s"] is not None]
            a2.plot([t[0] for t in tt], [t[1] for t in tt], marker="o", color=colors[c],
                    label=c if len(tt) == len(pts) else f"{c} (not reached at {len(pts) - len(tt)}"
                    f" of {len(pts)} rates)")
        for ax, what in ((a1, "mean step time, ms"), (a2, "time to target accuracy, s")):
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xticks([b / 1e6 for b in shaped])
            ax.set_ylim(bottom=0)
            ax.set_xlabel("link rate per rank, Mbit/s")
            ax.set_ylabel(what)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize="small")
        fig.suptitle(f"DDP, {rows[0]['workers']} ranks, {rows[0]['parameters'] / 1e6:.2f} M "
                     "parameters, in scripts/netlab.sh")
        fig.tight_layout()
        written.append(out / "step_time_vs_link_rate.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inagg_binary(binary):
    if binary is not None:
        return binary
    for cand in (ROOT / "target/release/inagg", ROOT / "target/debug/inagg"):
        if cand.exists():
            return str(cand)
    return shutil.which("inagg") or "inagg"


def start_aggregator(binary, listen="127.0.0.1:0", prefix=()):
    """Starts `inagg aggregator` on a free port; returns the process and address."""
    p = subprocess.Popen(
        [*prefix, inagg_binary(binary), "aggregator", "--listen", listen],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    line = p.stdout.readline().strip()
    if not line.startswith("listening on "):
        p.kill()
        sys.exit(f"the aggregator did not start (it said {line!r})")
    return p, line.split()[2]


def netns_problem():
    """Why this process cannot create network namespaces, or None if it can."""
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return f"{' and '.join(missing)} not found (Debian: apt-get install iproute2)"
    name = f"inagg-probe-{os.getpid()}"
    try:
        r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns add` failed: {e}"
    if r.returncode != 0:
        return f"`ip netns add` failed: {(r.stderr or r.stdout).strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return None


def _absolute(binary):
    """A binary named by path, made absolute (the runs started here may start elsewhere)."""
    return str(Path(binary).resolve()) if os.sep in binary else binary


def passthrough(args):
    """The training flags, for the runs this one starts (netlab's and the ranks')."""
    out = ["--workers", str(args.workers), "--codecs", args.codecs, "--steps", str(args.steps),
           "--batch", str(args.batch), "--hidden", str(args.hidden), "--lr", repr(args.lr),
           "--seed", str(args.seed), "--data", args.data, "--eval-every", str(args.eval_every),
           "--inagg-bin", _absolute(inagg_binary(args.inagg_bin))]
    if args.job is not None:
        out += ["--job", str(args.job)]
    return out


def link_rate_main(args):
    """Runs this script inside scripts/netlab.sh once per rate; reports all rows."""
    why = netns_problem()
    if why:
        sys.exit("torch_ddp: --link-rate trains inside scripts/netlab.sh's network namespaces, "
                 "which needs root (or CAP_NET_ADMIN) and iproute2's `ip` and `tc`: " + why)
    rows = []
    for rate in args.rates:
        cmd = ["bash", str(ROOT / "scripts/netlab.sh"), "--workers", str(args.workers),
               "--link-rate", rate, "--", sys.executable, str(SCRIPT), *passthrough(args),
               "--in-netlab"]
        print(f"torch_ddp: {args.workers} ranks on {rate} links, "
              f"{parameters_of(args.hidden, args.dim, args.classes) / 1e6:.2f} M parameters, "
              f"{args.steps} steps",
              file=sys.stderr, flush=True)
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               text=True, timeout=4 * 3600)
        except subprocess.TimeoutExpired:
            print(f"torch_ddp: the run at {rate} did not end in 4 hours", file=sys.stderr)
            return 1
        got = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        if r.returncode != 0 or not got:
            print(f"torch_ddp: the run at {rate} failed (exit {r.returncode})", file=sys.stderr)
            return 1
        rows += got
    finish(rows, args)
    return 0


def in_netlab_main(args):
    """Inside netlab.sh: the aggregator in its namespace, rank r in worker r's."""
    need = ("INAGG_NETLAB_AGG_NETNS", "INAGG_NETLAB_AGG_IP", "INAGG_NETLAB_WORKER_NETNS",
            "INAGG_NETLAB_WORKER_DEV", "INAGG_NETLAB_LINK_BPS")
    if any(not os.environ.get(k) for k in need):
        sys.exit("torch_ddp: --in-netlab runs only under scripts/netlab.sh (use --link-rate)")
    e = os.environ
    agg, addr = start_aggregator(args.inagg_bin, f"{e['INAGG_NETLAB_AGG_IP']}:0",
                                 ("ip", "netns", "exec", e["INAGG_NETLAB_AGG_NETNS"]))
    env = dict(os.environ, INAGG_AGGREGATOR=addr, MASTER_ADDR=NETLAB_MASTER,
               MASTER_PORT="29500", WORLD_SIZE=str(args.workers))
    env.pop("INAGG_FAILOVER", None)
    env.pop("TORCHELASTIC_RUN_ID", None)
    procs = []
    try:
        for r in range(args.workers):
            renv = dict(env, RANK=str(r), LOCAL_RANK=str(r),
                        GLOO_SOCKET_IFNAME=f"{e['INAGG_NETLAB_WORKER_DEV']}{r}")
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", f"{e['INAGG_NETLAB_WORKER_NETNS']}{r}", sys.executable,
                 str(SCRIPT), *passthrough(args), "--rank-worker", str(r)],
                env=renv, stdin=subprocess.DEVNULL,
                # Rank 0's rows (JSON lines) go up through netlab.sh's standard output.
                stdout=None if r == 0 else subprocess.DEVNULL))
        deadline = time.monotonic() + 4 * 3600
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.5)
        codes = [p.poll() for p in procs]
        if any(c != 0 for c in codes):
            print(f"torch_ddp: a rank failed in netlab: exit codes {codes}", file=sys.stderr)
            return 1
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        agg.terminate()
        try:
            agg.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agg.kill()
            agg.wait()


def main(argv=None):
    args = parse(argv)
    if args.rank_worker is not None:
        # One rank in its worker namespace (started by in_netlab_main, which sets RANK,
        # WORLD_SIZE, MASTER_*, GLOO_SOCKET_IFNAME and INAGG_AGGREGATOR).
        rank_main(args.rank_worker, args.workers, args, None)
        return 0
    if args.in_netlab:
        return in_netlab_main(args)
    if args.rates:
        return link_rate_main(args)
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
        finish(rows, args)
        return 0
    finally:
        if agg is not None:
            agg.terminate()
            agg.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
