"""One rank of an f32 SUM allreduce with PyTorch's Gloo backend, timed like
`inagg bench`: warm-ups, then timed calls, each on the input copied afresh into the
tensor (untimed, before the barrier), as `inagg bench` restores its input before every
call and a training step reduces a gradient its backward pass has just written; rank 0
prints one JSON line with the median over iterations of the slowest rank's time, and
the CPU (user and system, all threads: getrusage) a timed call cost, summed over the
ranks, as `inagg bench`'s `cpu_s_per_allreduce`."""
import argparse
import json
import resource
import statistics
import time

import torch
import torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("--rank", type=int, required=True)
p.add_argument("--world", type=int, required=True)
p.add_argument("--master", default="127.0.0.1:29511")
p.add_argument("--elements", type=int, required=True)
p.add_argument("--iters", type=int, default=5)
p.add_argument("--warmup", type=int, default=1)
a = p.parse_args()
torch.set_num_threads(1)
host, port = a.master.rsplit(":", 1)
dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=a.rank, world_size=a.world)
x = torch.full((a.elements,), float(a.rank + 1), dtype=torch.float32)
t = torch.empty_like(x)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


times = []
cpu_timed = 0.0
for i in range(a.warmup + a.iters):
    t.copy_(x)
    dist.barrier()
    c = cpu()
    s = time.perf_counter()
    dist.all_reduce(t)
    e = time.perf_counter()
    if i >= a.warmup:
        times.append(e - s)
        cpu_timed += cpu() - c
slowest = torch.tensor(times, dtype=torch.float64)
dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
cpu_sum = torch.tensor([cpu_timed / max(1, a.iters)], dtype=torch.float64)
dist.all_reduce(cpu_sum)
if a.rank == 0:
    med = statistics.median(slowest.tolist())
    print(json.dumps({"system": "gloo", "codec": "f32", "workers": a.world,
                      "elements": a.elements, "median_s": med,
                      "ate_per_s": a.elements / med,
                      "cpu_s_per_allreduce": cpu_sum.item()}), flush=True)
dist.destroy_process_group()
