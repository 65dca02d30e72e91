"""The receiver (language model) side: pulls embeddings into this instance's pool.

``Receiver`` is a facade over its collaborators: the links to sender endpoints
(``receiver_links.py``: bootstrap, cache, CLOSE), the sockets (``receiver_sockets.py``) and the one
pull loop (``receiver_pull.py``). A receiver forced to the host transport never bootstraps: its
pulls use the host link. Any other bootstraps a channel to each sender endpoint on first use: shm
between two CPU pools of one host (the host link where the sender's pool cannot be mapped), NCCL
for another GPU, CUDA IPC for the same GPU, or the host link when only one side has a GPU.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import zmq

from .config import TransferConfig
from .enums import FailureCause, Transport, WindowPolicyKind
from .errors import SocketsExhausted, TransferError
from .observer import TransferObserver
from .pool import BlockPool
from .receiver_links import LinkTable
from .receiver_pull import PullRun
from .receiver_sockets import SocketPool
from .receiver_types import PullContext, Received, Reopen, send_abort
from .ref import EmbedRef
from .transports import ReceiverLink
from .transports.streams import use_device
from .window import make_window_policy

__all__ = ["Received", "Receiver"]


class Receiver:
    """Pulls embeddings into this instance's pool; safe to call from several threads."""

    def __init__(
        self,
        pool: BlockPool,
        config: TransferConfig,
        *,
        observer: TransferObserver | None = None,
        name: str = "receiver",
    ) -> None:
        self.pool = pool
        self._config = config
        self.observer = observer or TransferObserver()
        self.name = name
        self.window_policy = make_window_policy(config)
        self._ctx = zmq.Context()
        self.sockets = SocketPool(self._ctx, config.max_sockets, _largest_window_bytes(pool, config))
        self.links = LinkTable(pool, config, self.sockets, name)

    @property
    def config(self) -> TransferConfig:
        return self._config

    @config.setter
    def config(self, config: TransferConfig) -> None:
        """Applies from the next pull on (the window policy stays as it is)."""
        self._config = config
        self.links.config = config
        self.sockets.max_sockets = config.max_sockets

    @property
    def uses_channels(self) -> bool:
        """True unless the transport is forced to host: pulls may then go over a channel bootstrapped once
        per sender (shm between two CPU pools of one host; NCCL or CUDA IPC for a GPU pool; a forced
        transport the pools cannot use gets a clear error)."""
        return self.config.transport is not Transport.HOST

    def link_for(self, address: str) -> ReceiverLink:
        """The link pulls from ``address`` use: the host link, or a channel bootstrapped on first use."""
        if not self.uses_channels:
            return self.links.host_link
        with use_device(self.pool.device):
            return self.links.link_for(address)

    def pull(self, ref: EmbedRef, request_id: str = "", cancelled: Callable[[], bool] | None = None) -> Received:
        """Move the embedding behind ``ref`` here; raises a TransferError subclass on failure.

        ``cancelled`` (optional) is asked before every PULL message; when it returns True the transfer is
        given up (TransferCancelled), the sender told to ABORT and the window freed."""
        try:
            link = self.link_for(ref.address)
        except BaseException as exc:
            self.abort(ref, f"receiver could not open a channel: {type(exc).__name__}")
            self.observer.transfer_failed(exc.cause if isinstance(exc, TransferError) else FailureCause.INTERNAL)
            raise
        try:
            return self._run(ref, request_id, link, cancelled, retry=True)
        except Reopen:
            return self._run(ref, request_id, self.link_for(ref.address), cancelled, retry=False)

    def _run(
        self, ref: EmbedRef, request_id: str, link: ReceiverLink, cancelled: Callable[[], bool] | None, retry: bool
    ) -> Received:
        with use_device(self.pool.device):
            ctx = PullContext(
                self.pool, self.config, self.sockets, self.links, self.observer, self.window_policy, self.name
            )
            return PullRun(ctx, ref, request_id, link, cancelled).run(retry)

    def abort(self, ref: EmbedRef, reason: str) -> None:
        """Tell a sender to drop an embedding this receiver will never pull (best effort; no answer comes,
        so the connection stays clean and is reused). With every connection in use, the sender's TTL frees it."""
        try:
            sock = self.sockets.take(ref.address)
        except SocketsExhausted:
            return
        try:
            send_abort(sock, ref, reason, self.config.auth_key)
        finally:
            self.sockets.give(ref.address, sock)

    def close(self) -> None:
        """Close every channel (telling each sender, best effort, so it frees its side now) and every socket."""
        self.links.close()
        self.sockets.close()
        self._ctx.term()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _largest_window_bytes(pool: BlockPool, config: TransferConfig) -> int:
    """Chunk bytes of the largest window this receiver offers (what its sockets must take per message)."""
    tokens = config.default_window_tokens
    if config.window_policy is WindowPolicyKind.ADAPTIVE:
        tokens = max(tokens, config.adaptive_max_window_tokens)
    blocks = min(pool.total_blocks, math.ceil(tokens / pool.block_tokens))
    return blocks * pool.block_tokens * pool.bytes_per_token
