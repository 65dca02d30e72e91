"""Links: one interface (``base.py``), one implementation per transport, and the registry that
maps a ``Transport`` to its classes. ``negotiate.py`` decides which transport a pair uses."""

from __future__ import annotations

from ..enums import Transport
from ..pool import BlockPool
from .base import ReceiverLink, SenderLink
from .cuda_ipc import IpcReceiverLink, IpcSenderLink
from .host import HostReceiverLink, HostSenderLink
from .nccl import NcclReceiverLink, NcclSenderLink
from .shm import ShmReceiverLink, ShmSenderLink

SENDER_LINKS: dict[Transport, type[SenderLink]] = {
    Transport.HOST: HostSenderLink,
    Transport.NCCL: NcclSenderLink,
    Transport.CUDA_IPC: IpcSenderLink,
    Transport.SHM: ShmSenderLink,
}
RECEIVER_LINKS: dict[Transport, type[ReceiverLink]] = {
    Transport.HOST: HostReceiverLink,
    Transport.NCCL: NcclReceiverLink,
    Transport.CUDA_IPC: IpcReceiverLink,
    Transport.SHM: ShmReceiverLink,
}


def open_sender_link(kind: Transport, link_id: str, pool: BlockPool, timeout_s: float) -> SenderLink:
    """The sender half of a link of ``kind`` (a channel's, formed in the background where it must be)."""
    return SENDER_LINKS[Transport(kind)](link_id, pool, timeout_s)


def connect_receiver_link(
    kind: Transport, link_id: str, pool: BlockPool, address: str, ack, timeout_s: float
) -> ReceiverLink:
    """The receiver half of a link of ``kind``, formed from the sender's BOOTSTRAP_ACK."""
    return RECEIVER_LINKS[Transport(kind)].connect(link_id, pool, address, ack, timeout_s)


__all__ = ["RECEIVER_LINKS", "SENDER_LINKS", "ReceiverLink", "SenderLink", "connect_receiver_link", "open_sender_link"]
