"""torch's CPU threads inside a stub, set deliberately (``torch_threads``, ``MM_TORCH_THREADS``).

Every Python-backend stub is its own process, and torch gives each one an intra-op pool as large as the
machine's cores: with an encoder, two language and two monolithic stubs on one 16-core host that is 80 threads
for 16 cores, and a parallel region waits for its slowest, descheduled thread. So a model that loads weights
sets its pool at ``initialize``:

- ``torch_threads`` > 0: exactly that many;
- 0 (the default): on a GPU instance ``min(4, cores)`` (its CPU work is preprocessing, sampling bookkeeping and
  kernel launches; the GPU does the math), on a CPU instance torch's own default (all cores: the CPU engine is
  the compute, and on a CPU server the stubs' busy phases mostly take turns).

Inter-op threads are left alone: torch creates that pool only for ``torch.jit.fork``, which nothing here uses.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)
GPU_DEFAULT_THREADS = 4
MAX_TORCH_THREADS = 1024


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def torch_threads_for(requested: int, device: str, cores: int) -> int | None:
    """The intra-op pool size to set, or None to keep torch's default."""
    if requested > 0:
        return requested
    if device.startswith("cuda"):
        return max(1, min(GPU_DEFAULT_THREADS, cores))
    return None


def apply_torch_threads(resolver: Any, device: str, name: str) -> int:
    """Read ``torch_threads`` (0..1024; a ParamError naming it otherwise), set torch's pool; returns its size."""
    requested = resolver.int("torch_threads", 0, low=0, high=MAX_TORCH_THREADS)
    import torch

    cores = cpu_cores()
    threads = torch_threads_for(requested, device, cores)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    log.info(
        "%s: torch intra-op threads %d (torch_threads %d, %s, %d cores)",
        name,
        torch.get_num_threads(),
        requested,
        device,
        cores,
    )
    return torch.get_num_threads()
