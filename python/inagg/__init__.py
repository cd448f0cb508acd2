"""inagg: in-network gradient aggregation in software.

A :class:`Worker` is one rank of one job on an inagg aggregator::

    import numpy as np
    import inagg

    with inagg.Worker("127.0.0.1:7070", job=1, rank=0, world=2, codec="i8") as w:
        grad = np.ones(1 << 20, dtype=np.float32)
        stats = w.allreduce(grad)          # grad now holds the sum over the ranks
        print(stats["elapsed_s"], stats["bytes_sent"])

``allreduce`` sums a contiguous float32 numpy array or CPU torch tensor in place,
without copying it, and releases the GIL while it runs. ``inagg.torch`` has a DDP
communication hook. Errors are exceptions derived from :class:`InaggError` that name
their cause: :class:`RefusedError` (a wrong secret, a job with other settings),
:class:`JoinTimeoutError` (no aggregator answers, or not every rank came),
``ConnectionRefusedError`` (nothing listens at the address),
:class:`AbortedError` (a peer died), :class:`StalledError`,
:class:`AggregatorSilentError`, :class:`ConnectError` (QUIC handshake or
certificate), :class:`ClosedError`; bad arguments raise ``ValueError`` or
``TypeError``.
"""

from ._inagg import (
    AbortedError,
    AggregatorSilentError,
    ClosedError,
    ConnectError,
    InaggError,
    JoinTimeoutError,
    RefusedError,
    StalledError,
    Worker,
    __version__,
    codecs,
)

__all__ = [
    "AbortedError",
    "AggregatorSilentError",
    "ClosedError",
    "ConnectError",
    "InaggError",
    "JoinTimeoutError",
    "RefusedError",
    "StalledError",
    "Worker",
    "__version__",
    "codecs",
]
