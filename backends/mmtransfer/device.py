"""Where a pool lives, as the transport negotiation sees it.

``DeviceInfo`` names a device across processes: a GPU by its UUID (the same physical GPU has
the same UUID in every process, whatever CUDA_VISIBLE_DEVICES says), plus a host id, so
that a sender and a receiver can tell "same GPU" / "other GPU" / "no GPU" apart.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch


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

    def same_gpu(self, other: DeviceInfo) -> bool:
        return self.is_cuda and other.is_cuda and self.uuid == other.uuid and self.host == other.host


def device_uuid(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        return str(uuid)
    return (
        f"pci:{getattr(props, 'pci_domain_id', 0)}:{getattr(props, 'pci_bus_id', 0)}:"
        f"{getattr(props, 'pci_device_id', 0)}"
    )


def device_info(device: torch.device) -> DeviceInfo:
    if device.type != "cuda":
        return DeviceInfo("cpu", "", host_id())
    return DeviceInfo("cuda", device_uuid(device), host_id())
