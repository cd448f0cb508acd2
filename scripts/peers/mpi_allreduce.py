"""An f32 SUM allreduce with MPI (mpi4py, run under mpirun), timed like
`inagg bench`: each timed call on the input copied afresh into the send buffer
(untimed, before the barrier); rank 0 prints one JSON line, with the CPU (user and
system: getrusage) a timed call cost, summed over the ranks."""
import argparse
import json
import resource
import statistics

import numpy as np
from mpi4py import MPI

p = argparse.ArgumentParser()
p.add_argument("--elements", type=int, required=True)
p.add_argument("--iters", type=int, default=5)
p.add_argument("--warmup", type=int, default=1)
a = p.parse_args()
comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
x = np.full(a.elements, rank + 1, dtype=np.float32)
send = np.empty_like(x)
recv = np.empty_like(send)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


times = []
cpu_timed = 0.0
for i in range(a.warmup + a.iters):
    np.copyto(send, x)
    comm.Barrier()
    c = cpu()
    s = MPI.Wtime()
    comm.Allreduce(send, recv, op=MPI.SUM)
    e = MPI.Wtime()
    if i >= a.warmup:
        times.append(e - s)
        cpu_timed += cpu() - c
mine = np.array(times, dtype=np.float64)
slowest = np.empty_like(mine)
comm.Reduce(mine, slowest, op=MPI.MAX, root=0)
cpu_sum = comm.reduce(cpu_timed / max(1, a.iters), op=MPI.SUM, root=0)
if rank == 0:
    med = statistics.median(slowest.tolist())
    print(json.dumps({"system": "mpi", "codec": "f32", "workers": world,
                      "elements": a.elements, "median_s": med,
                      "ate_per_s": a.elements / med,
                      "cpu_s_per_allreduce": cpu_sum}), flush=True)
