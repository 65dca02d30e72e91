"""Where a pool lives, as the transport negotiation sees it; CUDA IPC export/import of a pool.

``DeviceInfo`` names a device across processes: a GPU by its UUID (the same physical GPU has
the same UUID in every process, whatever CUDA_VISIBLE_DEVICES says), plus a host id, so
that a sender and a receiver can tell "same GPU" / "other GPU" / "no GPU" apart.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from .errors import TransferError


class TransportUnavailable(TransferError):
    """The configured transport cannot connect these two endpoints (the message says why)."""

    cause = "transport"


def host_id() -> str:
    """Stable for one boot of one machine: hostname + kernel boot id."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"[:128]


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cpu" or "cuda"
    uuid: str = ""  # GPU UUID ("" for cpu)
    host: str = ""

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"


def device_uuid(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        return str(uuid)
    return f"pci:{getattr(props, 'pci_domain_id', 0)}:{getattr(props, 'pci_bus_id', 0)}:{getattr(props, 'pci_device_id', 0)}"


def device_info(device: torch.device) -> DeviceInfo:
    if device.type != "cuda":
        return DeviceInfo("cpu", "", host_id())
    return DeviceInfo("cuda", device_uuid(device), host_id())


# ---- CUDA IPC of a pool's storage (torch's own sharing machinery) ---------------------------------
IPC_FIELDS = ("handle", "size_bytes", "offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle",
              "event_sync_required", "storage_offset", "rows", "hidden", "dtype", "pid", "local_key")
# Pools exported by this process, by local_key: a CUDA IPC handle cannot be opened by the process
# that made it, so a receiver in the same process (tests, benchmarks) uses the tensor itself.
_EXPORTED: dict[str, torch.Tensor] = {}


def export_storage(rows: torch.Tensor) -> dict[str, Any]:
    """What another process on the same GPU needs to map ``rows`` ([n, hidden], contiguous) once.

    Uses ``UntypedStorage._share_cuda_`` (what torch.multiprocessing does): an IPC handle of the
    cudaMalloc block holding the storage, the storage's offset in it, and torch's IPC ref-counter
    and event, so the block outlives no reader. Bytes fields come back as hex strings."""
    if not rows.is_contiguous() or rows.dim() != 2:
        raise ValueError("export_storage: expected a contiguous 2-D tensor")
    from .pool import DTYPE_NAMES

    if rows.device.type != "cuda":  # a CPU pool (unit tests): only this process can map it
        return {"handle": "", "size_bytes": rows.numel() * rows.element_size(), "offset_bytes": 0,
                "ref_counter_handle": "", "ref_counter_offset": 0, "event_handle": "", "event_sync_required": False,
                "storage_offset": 0, "rows": int(rows.shape[0]), "hidden": int(rows.shape[1]),
                "dtype": DTYPE_NAMES[rows.dtype], "pid": os.getpid(), "local_key": _remember(rows)}

    (_dev, handle, size_bytes, offset_bytes, rc_handle, rc_offset, ev_handle, ev_sync) = (
        rows.untyped_storage()._share_cuda_())
    return {
        "handle": bytes(handle).hex(), "size_bytes": int(size_bytes), "offset_bytes": int(offset_bytes),
        "ref_counter_handle": bytes(rc_handle).hex(), "ref_counter_offset": int(rc_offset),
        "event_handle": bytes(ev_handle).hex() if ev_handle else "", "event_sync_required": bool(ev_sync),
        "storage_offset": int(rows.storage_offset()), "rows": int(rows.shape[0]), "hidden": int(rows.shape[1]),
        "dtype": DTYPE_NAMES[rows.dtype], "pid": os.getpid(), "local_key": _remember(rows),
    }


def _remember(rows: torch.Tensor) -> str:
    key = f"{rows.data_ptr():x}-{rows.shape[0]}-{rows.shape[1]}"
    _EXPORTED[key] = rows
    return key


def import_storage(desc: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Map an exported pool on ``device`` (this process's index of the same GPU): ``[rows, hidden]``."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    from .pool import dtype_from_name

    if desc["pid"] == os.getpid() and desc["local_key"] in _EXPORTED:
        return _EXPORTED[desc["local_key"]]
    if not desc["handle"]:
        raise TransferError("cuda_ipc: the sender's pool is not on a GPU of this process")

    dtype = dtype_from_name(desc["dtype"])
    rows, hidden = desc["rows"], desc["hidden"]
    elem = torch.empty((), dtype=dtype).element_size()
    if (desc["storage_offset"] + rows * hidden) * elem > desc["size_bytes"]:
        raise TransferError(f"cuda_ipc: storage of {desc['size_bytes']} bytes cannot hold [{rows}, {hidden}] "
                            f"{desc['dtype']} at element offset {desc['storage_offset']}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        tensor = rebuild_cuda_tensor(
            torch.Tensor, torch.Size([rows, hidden]), (hidden, 1), desc["storage_offset"], torch.UntypedStorage,
            dtype, index, bytes.fromhex(desc["handle"]), desc["size_bytes"], desc["offset_bytes"], False,
            bytes.fromhex(desc["ref_counter_handle"]), desc["ref_counter_offset"],
            bytes.fromhex(desc["event_handle"]) if desc["event_handle"] else None, desc["event_sync_required"],
        )
    return tensor


def stream_ptr(stream: "torch.cuda.Stream") -> int:
    return int(stream.cuda_stream)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
