"""Same-GPU link: the receiver maps the sender's pool once (CUDA IPC) and copies pieces
device-to-device on its own stream. NCCL cannot serve this case: it refuses two ranks on one GPU.

What the link does beyond the export and the mapping (the CLAIM, the bounds checks, when blocks may be
freed) is shared with the shm link: ``mapped.py``.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Sequence

import torch

from ..enums import Transport
from ..errors import TransferError
from ..pool import DTYPE_NAMES, BlockPool, dtype_from_name
from .base import Pieces
from .mapped import MappedReceiverLink, MappedSenderLink
from .streams import use_stream

# Pools exported by this process, by local_key: a CUDA IPC handle cannot be opened by the process
# that made it, so a receiver in the same process (tests, benchmarks) uses the tensor itself.
_EXPORTED: dict[str, torch.Tensor] = {}
# One export per pool: the handle names the whole storage, every channel hands out the same one.
_POOL_EXPORTS: weakref.WeakKeyDictionary[BlockPool, dict[str, Any]] = weakref.WeakKeyDictionary()


def _remember(rows: torch.Tensor) -> str:
    key = f"{rows.data_ptr():x}-{rows.shape[0]}-{rows.shape[1]}"
    _EXPORTED[key] = rows
    return key


def export_storage(rows: torch.Tensor) -> dict[str, Any]:
    """What another process on the same GPU needs to map ``rows`` ([n, hidden], contiguous) once.

    Uses ``UntypedStorage._share_cuda_`` (what torch.multiprocessing does): an IPC handle of the
    cudaMalloc block holding the storage, the storage's offset in it, and torch's IPC ref-counter
    and event, so the block outlives no reader. Bytes fields come back as hex strings."""
    if not rows.is_contiguous() or rows.dim() != 2:
        raise ValueError("export_storage: expected a contiguous 2-D tensor")
    shape = {
        "rows": int(rows.shape[0]),
        "hidden": int(rows.shape[1]),
        "dtype": DTYPE_NAMES[rows.dtype],
        "pid": os.getpid(),
        "local_key": _remember(rows),
    }
    if rows.device.type != "cuda":  # a CPU pool (unit tests): only this process can map it
        return {
            "handle": "",
            "size_bytes": rows.numel() * rows.element_size(),
            "offset_bytes": 0,
            "ref_counter_handle": "",
            "ref_counter_offset": 0,
            "event_handle": "",
            "event_sync_required": False,
            "storage_offset": 0,
            **shape,
        }
    (_dev, handle, size_bytes, offset_bytes, rc_handle, rc_offset, ev_handle, ev_sync) = (
        rows.untyped_storage()._share_cuda_()
    )
    return {
        "handle": bytes(handle).hex(),
        "size_bytes": int(size_bytes),
        "offset_bytes": int(offset_bytes),
        "ref_counter_handle": bytes(rc_handle).hex(),
        "ref_counter_offset": int(rc_offset),
        "event_handle": bytes(ev_handle).hex() if ev_handle else "",
        "event_sync_required": bool(ev_sync),
        "storage_offset": int(rows.storage_offset()),
        **shape,
    }


def import_storage(desc: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Map an exported pool on ``device`` (this process's index of the same GPU): ``[rows, hidden]``."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if desc["pid"] == os.getpid() and desc["local_key"] in _EXPORTED:
        return _EXPORTED[desc["local_key"]]
    if not desc["handle"]:
        raise TransferError("cuda_ipc: the sender's pool is not on a GPU of this process")
    dtype = dtype_from_name(desc["dtype"])
    rows, hidden = desc["rows"], desc["hidden"]
    elem = torch.empty((), dtype=dtype).element_size()
    if (desc["storage_offset"] + rows * hidden) * elem > desc["size_bytes"]:
        raise TransferError(
            f"cuda_ipc: storage of {desc['size_bytes']} bytes cannot hold [{rows}, {hidden}] "
            f"{desc['dtype']} at element offset {desc['storage_offset']}"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        return rebuild_cuda_tensor(
            torch.Tensor,
            torch.Size([rows, hidden]),
            (hidden, 1),
            desc["storage_offset"],
            torch.UntypedStorage,
            dtype,
            index,
            bytes.fromhex(desc["handle"]),
            desc["size_bytes"],
            desc["offset_bytes"],
            False,
            bytes.fromhex(desc["ref_counter_handle"]),
            desc["ref_counter_offset"],
            bytes.fromhex(desc["event_handle"]) if desc["event_handle"] else None,
            desc["event_sync_required"],
        )


class IpcSenderLink(MappedSenderLink):
    kind = Transport.CUDA_IPC
    ack_field = "ipc"

    def export(self, pool: BlockPool) -> dict[str, Any]:
        export = _POOL_EXPORTS.get(pool)
        if export is None:
            export = _POOL_EXPORTS[pool] = export_storage(pool.flat_rows)
        return export


class IpcReceiverLink(MappedReceiverLink):
    kind = Transport.CUDA_IPC
    ack_field = "ipc"

    def map_source(self, desc: dict[str, Any]) -> torch.Tensor:
        return import_storage(desc, self.pool.device)

    def copy_pieces(self, pieces: Pieces, dests: Sequence[torch.Tensor]) -> None:
        src = self.source
        with use_stream(self.stream):
            for (row, n), dst in zip(pieces, dests, strict=True):
                dst.copy_(src[row : row + n], non_blocking=True)
