"""Same-GPU transport: the receiver maps the sender's pool once (CUDA IPC) and copies pieces
device-to-device on its own stream. NCCL cannot serve this case: it refuses two ranks on one GPU.

The sender moves nothing: a CHUNK names the pool rows (pieces) the receiver copies from.
The sender's blocks stay allocated until DONE or ABORT, and the receiver sends either only
after its copies completed (``drain``), so a block is never reused under a reader.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from . import cuda
from .channels import ChannelError, ReceiverChannel, SenderChannel, use_stream
from .pool import DTYPE_NAMES, BlockPool

log = logging.getLogger(__name__)


class IpcSenderChannel(SenderChannel):
    transport = "cuda_ipc"

    def __init__(self, channel_id: str, pool: BlockPool) -> None:
        super().__init__(channel_id, pool)
        export = getattr(pool, "_ipc_export", None)
        if export is None:  # once per pool: the handle names the whole storage
            export = cuda.export_storage(pool.flat_rows)
            pool._ipc_export = export
        self._export = export

    def ack_fields(self) -> dict[str, Any]:
        return {"ipc": dict(self._export)}

    def send(self, pieces: Sequence[tuple[int, int]]) -> None:
        self.ops += 1  # nothing to move: the receiver reads


class IpcReceiverChannel(ReceiverChannel):
    transport = "cuda_ipc"

    def __init__(self, channel_id: str, pool: BlockPool, address: str, ipc: dict[str, Any]) -> None:
        super().__init__(channel_id, pool, address)
        if ipc["hidden"] != pool.hidden or ipc["dtype"] != DTYPE_NAMES[pool.dtype]:
            raise ChannelError(f"cuda_ipc: the sender's pool holds [{ipc['hidden']}] {ipc['dtype']}, this pool "
                               f"[{pool.hidden}] {DTYPE_NAMES[pool.dtype]}")
        try:
            self.source = cuda.import_storage(ipc, pool.device)
        except Exception as exc:
            raise ChannelError(f"cuda_ipc: cannot map the sender's pool: {type(exc).__name__}: {exc}") from None
        self.source_rows = int(ipc["rows"])
        log.info("cuda_ipc channel %s: mapped %d rows of %s's pool on %s", channel_id[:8], self.source_rows,
                 address, pool.device)

    def post(self, pieces: Sequence[tuple[int, int]], dests: Sequence[torch.Tensor]) -> None:
        src = self.source
        for (row, n), dst in zip(pieces, dests):
            if row + n > self.source_rows:
                raise ChannelError(f"cuda_ipc: piece rows [{row}, {row + n}) outside the sender's pool "
                                   f"of {self.source_rows} rows")
        with use_stream(self.stream):
            for (row, n), dst in zip(pieces, dests):
                dst.copy_(src[row : row + n], non_blocking=True)
        self.ops += 1

    def close(self) -> None:
        self.source = None
