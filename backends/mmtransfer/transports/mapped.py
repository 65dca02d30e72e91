"""The two halves every link that maps the sender's pool shares (CUDA IPC on one GPU, shm on one host).

The sender moves nothing: its BOOTSTRAP_ACK exports the pool once (``ack_fields``), then an EMBED_REF
(protocol 3) or a CHUNK names the pool rows (pieces) the receiver copies itself. With the ref's rows the
receiver sends a CLAIM naming them and copies at once, handing the embedding out only once the sender ACKed
that they are that transfer's blocks; every row is also bounds-checked here against the mapped pool before
anything is read. The sender's blocks stay allocated until DONE or ABORT, and the receiver sends either only
after its copies completed (``drain``), so a block is never reused under a reader.

A subclass says how the pool is exported (``export``) and mapped (``map_source``), and how one piece is
copied (``copy_pieces``).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Sequence

import torch

from ..errors import ChannelError, ProtocolError
from ..pool import DTYPE_NAMES, BlockPool
from .base import Pieces, ReceiverLink, SenderLink

log = logging.getLogger(__name__)


class MappedSenderLink(SenderLink):
    """Exports the pool in its BOOTSTRAP_ACK under ``ack_field``; a chunk's pieces are read by the receiver."""

    ack_field: ClassVar[str]

    def __init__(self, link_id: str, pool: BlockPool, timeout_s: float) -> None:
        super().__init__(link_id, pool, timeout_s)
        self._export = self.export(pool)

    def export(self, pool: BlockPool) -> dict[str, Any]:
        """What the receiver maps the pool with (once per pool; every channel hands out the same)."""
        raise NotImplementedError

    def ack_fields(self) -> dict[str, Any]:
        return {self.ack_field: dict(self._export)}

    def send(self, pieces: Pieces) -> list[memoryview]:
        self.ops += 1  # nothing to move: the receiver reads
        return []


class MappedReceiverLink(ReceiverLink):
    """Maps the sender's pool once (``map_source``) and copies the pieces it is given out of it."""

    reads_pool = True
    ack_field: ClassVar[str]

    def __init__(self, link_id: str, pool: BlockPool, address: str, desc: dict[str, Any]) -> None:
        super().__init__(link_id, pool, address)
        name = self.kind.value
        if desc["hidden"] != pool.hidden or desc["dtype"] != DTYPE_NAMES[pool.dtype]:
            raise ChannelError(
                f"{name}: the sender's pool holds [{desc['hidden']}] {desc['dtype']}, this pool "
                f"[{pool.hidden}] {DTYPE_NAMES[pool.dtype]}"
            )
        self.desc = desc
        self.source_rows = int(desc["rows"])
        try:
            self.source: Any = self.map_source(desc)
        except Exception as exc:
            raise ChannelError(f"{name}: cannot map the sender's pool: {type(exc).__name__}: {exc}") from None
        log.info("%s channel %s: mapped %d rows of %s's pool", name, link_id[:8], self.source_rows, address)

    def map_source(self, desc: dict[str, Any]) -> Any:
        """The sender's pool, mapped here (indexable by flat row through ``copy_pieces``)."""
        raise NotImplementedError

    def copy_pieces(self, pieces: Pieces, dests: Sequence[torch.Tensor]) -> None:
        """Copy every piece (already bounds-checked) into its destination, on this link's stream."""
        raise NotImplementedError

    @classmethod
    def connect(cls, link_id, pool, address, ack, timeout_s) -> MappedReceiverLink:
        desc = getattr(ack, cls.ack_field)
        if desc is None:
            raise ChannelError(f"{cls.kind.value} BOOTSTRAP_ACK carries no {cls.ack_field} export")
        return cls(link_id, pool, address, desc)

    def post(self, pieces: Pieces, dests: Sequence[torch.Tensor], frames: Sequence[bytes]) -> None:
        for row, n in pieces:
            if row + n > self.source_rows:  # a forged ref or CHUNK: refused before anything is read
                raise ProtocolError(
                    f"{self.kind.value}: piece rows [{row}, {row + n}) outside the sender's pool of "
                    f"{self.source_rows} rows"
                )
        self.copy_pieces(pieces, dests)
        self.ops += 1

    def close(self) -> None:
        self.source = None
