"""The sender (encoder) side: owns embeddings in its pool and serves pulls for them.

One ``SenderEndpoint`` per encoder instance. Request threads call ``register`` (or ``reserve``
then ``fill`` when the EMBED_REF must go out before encoding ends, or ``publish`` for blocks a
cache holds); a single server thread answers PULL/DONE/ABORT/BOOTSTRAP/CLOSE. The refs of
``register`` and ``publish`` name the embedding's pool rows (it is fully written when they
return): a receiver can move its bytes before any answer from here.

The endpoint is a facade over four collaborators: the transfer table (``sender_table.py``:
entries, TTL, deferred frees), the channel table (``sender_channels.py``: GPU links by channel
id), the serve path (``sender_serve.py``: one path answering every PULL over any link) and the
server loop (``sender_server.py``: the ZeroMQ socket and its thread).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from .config import TransferConfig
from .enums import TransferState
from .errors import RequestTooLarge
from .observer import TransferObserver
from .pool import DTYPE_NAMES, BlockPool
from .ref import EmbedRef, new_transfer_id
from .sender_channels import ChannelTable
from .sender_serve import PullServer
from .sender_server import ServerLoop
from .sender_table import TransferTable
from .wire import Aux

log = logging.getLogger(__name__)


class SenderEndpoint:
    """Serves the embeddings of one encoder instance to any number of receivers."""

    def __init__(
        self, pool: BlockPool, config: TransferConfig, *, observer: TransferObserver | None = None, name: str = "sender"
    ) -> None:
        self.pool = pool
        self._config = config
        self._observer = observer or TransferObserver()
        self.name = name
        self.table = TransferTable(pool, config.ttl_s, self._observer, name)
        self.channels = ChannelTable(pool, self.table.link_busy, name)
        self.loop = ServerLoop(config, name, pool.device)
        self.server = PullServer(pool, config, self.table, self.channels, self.loop.outbox, name)
        self.loop.start(self.server.dispatch, self.server.tick)
        log.info(
            "%s: serving pulls at %s%s",
            name,
            self.address,
            " (control frames authenticated with the shared secret)" if config.auth_key else "",
        )

    @property
    def config(self) -> TransferConfig:
        return self._config

    @config.setter
    def config(self, config: TransferConfig) -> None:
        """Timeouts and limits apply from the next message on (the socket and secret stay as they are)."""
        self._config = config
        self.table.ttl_s = config.ttl_s
        self.server.config = config

    @property
    def observer(self) -> TransferObserver:
        return self._observer

    @observer.setter
    def observer(self, observer: TransferObserver) -> None:
        self._observer = observer
        self.table.observer = observer

    @property
    def port(self) -> int:
        return self.loop.port

    @property
    def address(self) -> str:
        return f"tcp://{self.config.reachable_host}:{self.port}"

    @property
    def rejected_frames(self) -> int:
        return self.loop.rejected_frames

    # ---- request-thread API -------------------------------------------------------------
    def reserve(self, request_id: str = "", num_tokens_hint: int = 0) -> EmbedRef:
        """Publish a transfer id before the embedding exists; pulls for it wait (bounded)."""
        tid = new_transfer_id()
        self.table.add(tid, request_id)
        return EmbedRef(tid, self.address, num_tokens_hint)

    def fill(self, transfer_id: str, embedding: torch.Tensor, extras: dict[str, list[int]] | None = None) -> None:
        """Copy ``embedding`` ([N, hidden]) into N/block_tokens freshly allocated blocks.

        Allocates by the actual length, waiting up to ``alloc_timeout_s`` for space.
        On any failure the reservation is dropped (waiting pulls get an error) and
        nothing stays allocated.
        """
        blocks: list[int] = []
        try:
            blocks, aux = self.write_blocks(embedding, extras)
            self._publish(transfer_id, blocks, aux, None)
            blocks = []
        except BaseException:
            if blocks:
                self.pool.free(blocks)
            self.discard(transfer_id, "fill failed")
            raise

    def write_blocks(
        self, embedding: torch.Tensor, extras: dict[str, list[int]] | None = None
    ) -> tuple[list[int], Aux]:
        """Allocate blocks by the embedding's actual length and write it there; returns them and its aux.

        The caller owns the blocks (``fill`` publishes them; a cache may keep them and
        ``publish`` them again and again). Nothing stays allocated if this raises."""
        num_tokens = self._check_embedding(embedding)
        aux = self._aux(num_tokens, extras)
        blocks = self.pool.alloc_wait(self.pool.blocks_for(num_tokens), self.config.alloc_timeout_s)
        try:
            self.pool.scatter(blocks, embedding)
            if self.pool.device.type == "cuda":
                torch.cuda.current_stream(self.pool.device).synchronize()
        except BaseException:
            self.pool.free(blocks)
            raise
        return blocks, aux

    def publish(
        self,
        blocks: list[int],
        num_tokens: int,
        extras: dict[str, list[int]] | None,
        release: Callable[[list[int]], None],
        request_id: str = "",
    ) -> EmbedRef:
        """Serve an embedding that already sits in ``blocks`` of this pool (e.g. cached).

        The endpoint does not own the blocks: ``release(blocks)`` is called exactly once
        when the transfer ends (DONE, ABORT, TTL, discard or close), after any send that
        reads them has completed.
        """
        if not 1 <= num_tokens <= len(blocks) * self.pool.block_tokens:
            raise ValueError(f"{num_tokens} tokens do not fit {len(blocks)} block(s)")
        aux = self._aux(num_tokens, extras)
        ref = self.reserve(request_id, num_tokens)
        try:
            self._publish(ref.transfer_id, blocks, aux, release)
        except BaseException:
            self.discard(ref.transfer_id, "publish failed")
            raise
        return self._ready_ref(ref, blocks, aux)

    def register(
        self, embedding: torch.Tensor, extras: dict[str, list[int]] | None = None, request_id: str = ""
    ) -> EmbedRef:
        """``reserve`` + ``fill``: returns the EMBED_REF for a ready embedding."""
        ref = self.reserve(request_id, int(embedding.shape[0]) if embedding.dim() == 2 else 0)
        self.fill(ref.transfer_id, embedding, extras)
        entry = self.table.get(ref.transfer_id)
        if entry is None or entry.aux is None:  # dropped (TTL, ABORT) the moment it was filled
            return ref
        return self._ready_ref(ref, entry.blocks, entry.aux)

    def discard(self, transfer_id: str, reason: str = "discarded") -> bool:
        """Drop a transfer and free its blocks; pulls waiting for it get an error."""
        dropped = self.table.discard(transfer_id, reason)
        if dropped:
            self.loop.wake()
        return dropped

    def state(self, transfer_id: str) -> TransferState | None:
        entry = self.table.get(transfer_id)
        return entry.state if entry else None

    @property
    def active_transfers(self) -> int:
        return len(self.table)

    def close(self) -> None:
        """Stop serving and free every block still held."""
        if self.loop.stopped:
            return
        self.loop.stop()
        self.table.close()
        self.channels.close_all()
        self.loop.close()

    def __enter__(self) -> SenderEndpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- helpers ------------------------------------------------------------------------
    def _publish(self, transfer_id: str, blocks: list[int], aux: Aux, release: Any) -> None:
        self.table.publish(transfer_id, blocks, aux, release)
        self.observer.pool_changed()
        self.loop.wake()

    def _ready_ref(self, ref: EmbedRef, blocks: list[int], aux: Aux) -> EmbedRef:
        """The ref of a fully written embedding: with its pool rows and aux (protocol 3), so a receiver
        moves bytes before any answer from here; without them if they do not fit the ref."""
        n = aux.total_tokens
        rows = tuple((s.pool_row, s.length) for s in self.pool.segments(blocks, n))
        return EmbedRef(ref.transfer_id, ref.address, n, rows=rows, aux=aux).fitted()

    def _aux(self, num_tokens: int, extras: dict[str, list[int]] | None) -> Aux:
        """The aux record, validated now: a receiver would refuse a bad one after the bytes moved."""
        return Aux(num_tokens, self.pool.hidden, DTYPE_NAMES[self.pool.dtype], dict(extras or {})).checked()

    def _check_embedding(self, embedding: torch.Tensor) -> int:
        if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2:
            raise ValueError("embedding must be a 2-D tensor [tokens, hidden]")
        num_tokens, hidden = embedding.shape
        if hidden != self.pool.hidden:
            raise ValueError(f"embedding hidden size {hidden} does not match the pool's {self.pool.hidden}")
        if embedding.dtype != self.pool.dtype:
            raise ValueError(f"embedding dtype {embedding.dtype} does not match the pool's {self.pool.dtype}")
        if num_tokens < 1:
            raise ValueError("embedding has no tokens")
        if num_tokens > self.config.max_embed_tokens:
            raise RequestTooLarge(
                f"embedding of {num_tokens} tokens exceeds max_embed_tokens={self.config.max_embed_tokens}"
            )
        return int(num_tokens)
