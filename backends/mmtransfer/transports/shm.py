"""Same-host link between two CPU pools: the receiver maps the sender's pool once, read-only, from the memfd
region it lives in (``memfd.py``: ``/proc/<pid>/fd/<fd>``), and copies pieces out of it with numpy. No payload
crosses a socket: a ready EMBED_REF costs a CLAIM, the copy (the CLAIM's ACK travelling meanwhile) and a DONE;
the CLAIM, the bounds checks and when blocks may be freed are the CUDA IPC link's (``mapped.py``).

Forming the link fails (``ChannelError``) where the kernel does not let this process open the sender's
descriptor (another uid or container, a hardened /proc) or the file opened is not the one exported; the
receiver then falls back to the host link for that sender (``receiver_links.py``). A sender whose region is
gone (it restarted: its pool is another file) is noticed before the next pull (``stale``) and bootstrapped
again, so a new sender's rows are never read from the old mapping.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Sequence

import numpy as np
import torch

from .. import memfd
from ..enums import Transport
from ..errors import ChannelError
from ..pool import BlockPool
from .base import Pieces
from .mapped import MappedReceiverLink, MappedSenderLink


class ShmSenderLink(MappedSenderLink):
    kind = Transport.SHM
    ack_field = "shm"

    def export(self, pool: BlockPool) -> dict[str, Any]:
        export = pool.shm_export()
        if export is None:
            raise ChannelError(f"shm: pool {pool.name} is not in shared memory (on {pool.device}, or no memfd)")
        return export


class ShmReceiverLink(MappedReceiverLink):
    kind = Transport.SHM
    ack_field = "shm"

    def map_source(self, desc: dict[str, Any]) -> np.ndarray:
        if self.pool.device.type != "cpu":
            raise ChannelError(f"shm: this pool is on {self.pool.device}, not the CPU")
        row_bytes = self.pool.bytes_per_token
        if self.source_rows * row_bytes > desc["size_bytes"]:
            raise ChannelError(f"shm: {desc['size_bytes']} bytes cannot hold {self.source_rows} rows of {row_bytes}")
        flat = memfd.map_readonly(desc)
        return flat[: self.source_rows * row_bytes].reshape(self.source_rows, row_bytes)

    def copy_pieces(self, pieces: Pieces, dests: Sequence[torch.Tensor]) -> None:
        src = self.source
        for (row, n), dst in zip(pieces, dests, strict=True):
            # as bytes: numpy has no bfloat16; a destination slice of the embedding is contiguous rows. One
            # thread, not torch's intra-op pool: on a small host the sender's answer to the CLAIM needs a core
            # during the copy (measured: torch's 2-thread copy lands sooner, but the pull returns later)
            np.copyto(dst.view(torch.uint8).numpy(), src[row : row + n])

    def exclusive(self) -> AbstractContextManager:
        return nullcontext()  # nothing pairs by order: pulls over one mapping run concurrently

    def stale(self) -> str:
        if memfd.still_exported(self.desc):
            return ""
        return f"the sender's pool (pid {self.desc['pid']}, fd {self.desc['fd']}) is gone"

    def drain(self, timeout_s: float) -> bool:
        return True  # copies are synchronous: nothing is left in flight
