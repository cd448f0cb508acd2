"""A DDP communication hook that sums gradient buckets through inagg.

Launch as with torchrun: ``RANK``, ``WORLD_SIZE`` (and ``LOCAL_RANK``) come from
the environment, the aggregator's address from ``INAGG_AGGREGATOR`` (default
``127.0.0.1:7070``), the job id from ``INAGG_JOB``, else from torchrun's run id
(``TORCHELASTIC_RUN_ID``, hashed), else 1; failover aggregators from
``INAGG_FAILOVER`` (``HOST:PORT[,HOST:PORT...]``) and the aggregator's admission key
file from ``INAGG_ADMISSION_KEY_FILE``, where set (arguments win)::

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import inagg.torch

    dist.init_process_group("gloo")            # DDP's own bookkeeping
    model = DDP(net)
    state = inagg.torch.InaggState(codec="i8")  # joins the inagg job
    model.register_comm_hook(state, inagg.torch.allreduce_hook)
    ...
    state.close()

The hook hands each bucket to one background thread, in the order DDP produces
them (the same on every rank), sums it through inagg, divides by the world size and
completes the future; backward goes on meanwhile. Block-scaled codecs (i32, i16, i8)
use error feedback per bucket unless ``error_feedback=False``.
"""

import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch

from . import Worker

DEFAULT_AGGREGATOR = "127.0.0.1:7070"

_BLOCK_SCALED = ("i32", "i16", "i8")


def job_from_env(default=1):
    """The job id: ``INAGG_JOB``, else a hash of torchrun's ``TORCHELASTIC_RUN_ID``."""
    if os.environ.get("INAGG_JOB"):
        return int(os.environ["INAGG_JOB"])
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run:
        return (zlib.crc32(run.encode()) & 0x7FFFFFFF) or 1
    return default


class InaggState:
    """The hook's state: the inagg worker of this rank and its counters."""

    def __init__(
        self,
        codec="f32",
        aggregator=None,
        job=None,
        rank=None,
        world_size=None,
        error_feedback=None,
        **worker_kwargs,
    ):
        self.rank = int(os.environ["RANK"]) if rank is None else rank
        self.world_size = (
            int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
        )
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.aggregator = aggregator or os.environ.get(
            "INAGG_AGGREGATOR", DEFAULT_AGGREGATOR
        )
        self.job = job_from_env() if job is None else job
        self.codec = codec
        self.error_feedback = (
            codec in _BLOCK_SCALED if error_feedback is None else error_feedback
        )
        failover = os.environ.get("INAGG_FAILOVER")
        if failover and "failover" not in worker_kwargs:
            worker_kwargs["failover"] = [a for a in failover.split(",") if a]
        key_file = os.environ.get("INAGG_ADMISSION_KEY_FILE")
        if key_file and "admission_key" not in worker_kwargs:
            worker_kwargs["admission_key"] = key_file
        self.worker = Worker(
            self.aggregator, self.job, self.rank, self.world_size, codec, **worker_kwargs
        )
        # One thread: buckets go out in DDP's order, which every rank shares.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inagg-ddp")
        self._lock = threading.Lock()
        self.allreduces = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.allreduce_s = 0.0

    def _record(self, stats):
        with self._lock:
            self.allreduces += 1
            self.bytes_sent += stats["bytes_sent"]
            self.bytes_received += stats["bytes_received"]
            self.allreduce_s += stats["elapsed_s"]

    def close(self):
        """Waits for pending buckets and leaves the job."""
        self._pool.shutdown(wait=True)
        self.worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # DDP pickles hook states only for some features (not for plain training);
    # a worker holds sockets and threads and cannot travel.
    def __getstate__(self):
        raise TypeError("InaggState holds a live connection and cannot be pickled")


def _bucket_tensor(bucket):
    # torch >= 1.12: buffer(); earlier: get_tensor().
    return bucket.buffer() if hasattr(bucket, "buffer") else bucket.get_tensor()


def allreduce_hook(state, bucket):
    """DDP communication hook: the average of the bucket over the ranks, via inagg."""
    tensor = _bucket_tensor(bucket)
    key = bucket.index() if state.error_feedback else None
    fut = torch.futures.Future()

    def run():
        try:
            buf = tensor
            if buf.dtype != torch.float32 or not buf.is_contiguous():
                buf = tensor.detach().to(torch.float32).contiguous()
            stats = state.worker.allreduce(buf.detach(), key)
            buf.div_(state.world_size)
            if buf is not tensor:
                tensor.copy_(buf)
            state._record(stats)
            fut.set_result(tensor)
        except BaseException as e:  # the future carries it to DDP's wait
            fut.set_exception(e)

    state._pool.submit(run)
    return fut


def register(model, codec="f32", **kwargs):
    """Creates an :class:`InaggState` and registers :func:`allreduce_hook` on a DDP
    model; returns the state (close it when training ends)."""
    state = InaggState(codec=codec, **kwargs)
    model.register_comm_hook(state, allreduce_hook)
    return state
