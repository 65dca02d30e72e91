"""The link interface: how chunk bytes move between a sender's pool and a receiver's pool.

A link has two halves. The sender endpoint serves every PULL through a ``SenderLink`` and the
receiver runs every pull through a ``ReceiverLink``, whatever the transport: host (bytes inline on
the control connection), NCCL (a 2-rank communicator), CUDA IPC (the sender's pool mapped on
the same GPU) or shm (the sender's CPU pool mapped on the same host). The control connection
carries only what to move; the link moves it.

Contract: for every CHUNK the sender calls ``SenderLink.send`` once, before the CHUNK is sent,
and the receiver calls ``ReceiverLink.post`` once, after the CHUNK arrived, in the same order per
link. Pieces are ``(sender pool row, tokens)`` runs in token order, contiguous in the sender's
pool; ``dests`` are the receiver's destination views ``[tokens, hidden]`` in token order.

This module holds the interface only; ``transports/__init__.py`` maps each ``Transport`` to its
implementation (``host.py``, ``nccl.py``, ``cuda_ipc.py``, ``shm.py``), so nothing here imports one.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from ..enums import Landing, Transport
from ..pool import BlockPool
from .streams import new_stream, record_event, wait_event

if TYPE_CHECKING:
    from ..wire import BootstrapAck

Pieces = Sequence[tuple[int, int]]


class SenderLink(ABC):
    """Sender half. Every method is called from the endpoint's single server thread."""

    kind: ClassVar[Transport]
    ordered: ClassVar[bool] = False
    """Sends and receives pair by order (NCCL): a PULL's ``op_seq`` must equal ``ops``."""
    names_pieces: ClassVar[bool] = True
    """CHUNKs on this link list their pieces (the receiver posts one move per piece)."""

    def __init__(self, link_id: str, pool: BlockPool, timeout_s: float) -> None:
        self.link_id = link_id
        self.pool = pool
        self.ops = 0  # chunks sent on this link
        self.last_used = time.monotonic()  # of the last PULL served on it (idle channels are closed)

    def ack_fields(self) -> dict[str, Any]:
        """The BOOTSTRAP_ACK fields the receiver needs to form its half (``nccl_id`` / ``ipc``)."""
        return {}

    def wait_ready(self, timeout_s: float) -> None:
        """Return once the link is formed; raise a TransferError if it could not be (within ``timeout_s``)."""
        return None

    @abstractmethod
    def send(self, pieces: Pieces) -> list[memoryview]:
        """Start moving one chunk's pieces; return the payload frames that ride on its CHUNK (none
        when the bytes move out of band)."""

    def send_blank(self, lengths: Sequence[int]) -> None:
        """Send zeros of these token lengths as one chunk (counted in ``ops``): they pair the receives a
        receiver posted early (``Pull.early``) for a PULL that is not served. Only ordered links need it."""
        self.ops += 1

    def record(self) -> Any:
        """An event that completes once everything sent so far stopped reading the pool, or None
        when nothing is in flight (the blocks may be freed at once)."""
        return None

    def close(self) -> None:
        """Give the link up (abort a communicator, drop a mapping). Idempotent."""
        return None


class ReceiverLink(ABC):
    """Receiver half; pull threads share it. ``exclusive()`` serialises the pulls that need it."""

    kind: ClassVar[Transport]
    pipelined: ClassVar[bool] = True
    """One PULL asks for every chunk (``count=0``); else one PULL per chunk (the window is the credit)."""
    names_pieces: ClassVar[bool] = True
    """The PULL carries the window's runs and each CHUNK its pieces (see ``SenderLink.names_pieces``)."""
    has_channel: ClassVar[bool] = True
    """Opened by BOOTSTRAP and named in every PULL; a failure on it gives it up (the next pull reopens)."""
    reads_pool: ClassVar[bool] = False
    """The receiver reads the sender's pool itself (CUDA IPC, shm): given an EMBED_REF's rows it CLAIMs them (the
    sender authorizes) and copies at once, then sends DONE; no PULL, no CHUNK."""
    posts_early: ClassVar[bool] = False
    """Given an EMBED_REF's rows, the first chunk's receives are posted right after the PULL, before its
    CHUNK arrives (NCCL: the bytes move as soon as the sender posts the matching sends)."""

    def __init__(self, link_id: str, pool: BlockPool, address: str) -> None:
        self.link_id = link_id
        self.pool = pool
        self.address = address
        self.lock = threading.Lock()
        self.ops = 0  # chunks posted on this link
        self.broken = False
        self._stream = new_stream(pool.device)

    @property
    def stream(self) -> Any:
        """The stream this link's work is enqueued on (a CUDA stream, or a stand-in on the CPU)."""
        return self._stream

    @classmethod
    def connect(cls, link_id: str, pool: BlockPool, address: str, ack: BootstrapAck, timeout_s: float) -> ReceiverLink:
        """Form the receiver half from the sender's BOOTSTRAP_ACK (bounded by ``timeout_s``)."""
        return cls(link_id, pool, address)

    def landing(self, configured: Landing) -> Landing:
        """Where this link's bytes land: the configured ``gpu_landing`` unless the link needs the window."""
        return configured

    def payload_bytes(self, capacity_tokens: int) -> int:
        """Payload bytes one inbound message may carry beyond its control frame (the socket's limit)."""
        return 0

    def exclusive(self) -> AbstractContextManager:
        """Held from a pull's PULL until its last chunk is posted: both sides then pair up in order."""
        return self.lock

    @abstractmethod
    def post(self, pieces: Pieces, dests: Sequence[torch.Tensor], frames: Sequence[bytes]) -> None:
        """Enqueue the landing of one chunk on ``stream``: piece i goes to ``dests[i]`` (links that do
        not name pieces get ``pieces=()`` and fill ``dests`` in order), from ``frames`` or out of band."""

    def adopt(self, frames: Sequence[Any], tokens: int) -> torch.Tensor | None:
        """The whole embedding as a view of its payload frames, when this link can hand that out without a
        copy (the host link, into a CPU pool); None: land it with ``post``."""
        return None

    def stale(self) -> str:
        """Why this link may no longer be used although nothing failed on it (the sender it mapped is gone),
        checked before every pull; "" while it may. The receiver then bootstraps a new one."""
        return ""

    def drain(self, timeout_s: float) -> bool:
        """Wait (bounded) for everything enqueued on ``stream``; False if it did not finish in time."""
        return wait_event(record_event(self.stream, self.pool.device), timeout_s)

    def close(self) -> None:
        """Give the link up on this side. Idempotent."""
        return None
