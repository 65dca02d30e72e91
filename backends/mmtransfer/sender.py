"""The sender (encoder) side: owns embeddings in its pool and serves pulls for them.

One ``SenderEndpoint`` per encoder instance. Request threads call ``register`` (or
``reserve`` then ``fill`` when the EMBED_REF must go out before encoding ends); a
single server thread answers PULL/DONE/ABORT on a ZeroMQ ROUTER socket in arrival
order, which is also the order in which out-of-band transports post their sends.

Every block is freed exactly once: on DONE, on ABORT, when ``fill`` fails, when the
TTL expires before the receiver finished, or at ``close``.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from . import protocol as wire
from .config import TransferConfig
from .errors import ProtocolError, RequestTooLarge, TransferAborted
from .observer import TransferObserver
from .pool import DTYPE_NAMES, BlockPool
from .protocol import Aux, ErrorCode, TransferState
from .ref import EmbedRef, new_transfer_id
from .transport import HostTransport, Transport

log = logging.getLogger(__name__)
MAX_PENDING_PULLS = 4096
_TICK_S = 0.05


@dataclass
class _Entry:
    transfer_id: str
    request_id: str
    expires_at: float
    state: TransferState = TransferState.WAITING_FOR_INPUT
    blocks: list[int] = field(default_factory=list)
    aux: Aux | None = None


@dataclass
class _PendingPull:
    identity: bytes
    pull: wire.Pull
    give_up_at: float


class SenderEndpoint:
    """Serves the embeddings of one encoder instance to any number of receivers."""

    def __init__(
        self,
        pool: BlockPool,
        config: TransferConfig,
        transport: Transport | None = None,
        observer: TransferObserver | None = None,
        name: str = "sender",
    ) -> None:
        self.pool = pool
        self.config = config
        self.transport = transport or HostTransport()
        self.observer = observer or TransferObserver()
        self.name = name
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._pending: list[_PendingPull] = []
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        bind = f"tcp://{config.control_host}"
        if config.control_port:
            self._router.bind(f"{bind}:{config.control_port}")
            self.port = config.control_port
        else:
            self.port = self._router.bind_to_random_port(bind)
        wake_addr = f"inproc://wake-{id(self)}"
        self._wake_rx = self._ctx.socket(zmq.PULL)
        self._wake_rx.bind(wake_addr)
        self._wake_tx = self._ctx.socket(zmq.PUSH)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.connect(wake_addr)
        self._wake_lock = threading.Lock()  # zmq sockets are not thread-safe
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"{name}-control", daemon=True)
        self._thread.start()
        log.info("%s: serving pulls at %s", name, self.address)

    @property
    def address(self) -> str:
        return f"tcp://{self.config.reachable_host}:{self.port}"

    # ---- request-thread API -------------------------------------------------------------
    def reserve(self, request_id: str = "", num_tokens_hint: int = 0) -> EmbedRef:
        """Publish a transfer id before the embedding exists; pulls for it wait (bounded)."""
        tid = new_transfer_id()
        with self._lock:
            self._entries[tid] = _Entry(tid, request_id, time.monotonic() + self.config.ttl_s)
        return EmbedRef(tid, self.address, num_tokens_hint)

    def fill(self, transfer_id: str, embedding: torch.Tensor, extras: dict[str, list[int]] | None = None) -> None:
        """Copy ``embedding`` ([N, hidden]) into N/block_tokens freshly allocated blocks.

        Allocates by the actual length, waiting up to ``alloc_timeout_s`` for space.
        On any failure the reservation is dropped (waiting pulls get an error) and
        nothing stays allocated.
        """
        blocks: list[int] = []
        try:
            num_tokens = self._check_embedding(embedding)
            blocks = self.pool.alloc_wait(self.pool.blocks_for(num_tokens), self.config.alloc_timeout_s)
            self.pool.scatter(blocks, embedding)
            aux = Aux(num_tokens, self.pool.hidden, DTYPE_NAMES[self.pool.dtype], dict(extras or {}))
            self.pool.write_aux(blocks[0], aux.to_bytes())
            if self.pool.device.type == "cuda":
                torch.cuda.current_stream(self.pool.device).synchronize()
            with self._lock:
                entry = self._entries.get(transfer_id)
                if entry is None or entry.state != TransferState.WAITING_FOR_INPUT:
                    raise TransferAborted(f"transfer {transfer_id} was aborted or expired before it was filled")
                entry.blocks, entry.aux, entry.state = blocks, aux, TransferState.TRANSFERRING
                entry.expires_at = time.monotonic() + self.config.ttl_s
                blocks = []
            self.observer.pool_changed()
        except BaseException:
            if blocks:
                self.pool.free(blocks)
            self.discard(transfer_id, "fill failed")
            raise
        self._wake()

    def register(
        self, embedding: torch.Tensor, extras: dict[str, list[int]] | None = None, request_id: str = ""
    ) -> EmbedRef:
        """``reserve`` + ``fill``: returns the EMBED_REF for a ready embedding."""
        ref = self.reserve(request_id, int(embedding.shape[0]) if embedding.dim() == 2 else 0)
        self.fill(ref.transfer_id, embedding, extras)
        return ref

    def discard(self, transfer_id: str, reason: str = "discarded") -> bool:
        """Drop a transfer and free its blocks; pulls waiting for it get an error."""
        with self._lock:
            entry = self._entries.pop(transfer_id, None)
        if entry is None:
            return False
        if entry.blocks:
            self.pool.free(entry.blocks)
            self.observer.pool_changed()
        log.info("%s: transfer %s (request %s) dropped: %s", self.name, transfer_id, entry.request_id, reason)
        self._wake()
        return True

    def state(self, transfer_id: str) -> TransferState | None:
        with self._lock:
            entry = self._entries.get(transfer_id)
            return entry.state if entry else None

    @property
    def active_transfers(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        """Stop serving and free every block still held."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake()
        self._thread.join(timeout=5)
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            if entry.blocks:
                self.pool.free(entry.blocks)
        for sock in (self._router, self._wake_rx, self._wake_tx):
            sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> "SenderEndpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- server thread ------------------------------------------------------------------
    def _wake(self) -> None:
        with self._wake_lock:
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # a wake-up is already queued, or the endpoint is closed

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(int(_TICK_S * 1000)))
            if self._wake_rx in events:
                while self._wake_rx.poll(0):
                    self._wake_rx.recv()
            if self._router in events:
                for _ in range(256):  # bounded batch, so timers still run under load
                    try:
                        frames = self._router.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    self._handle(frames)
            self._serve_pending()
            self._reap_expired()

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return  # not a DEALER frame set; nothing to answer to
        identity, header = frames[0], frames[1]
        try:
            msg = wire.decode(header)
        except ProtocolError as exc:
            log.warning("%s: rejected malformed control frame: %s", self.name, exc)
            self._reply_error(identity, "", 0, ErrorCode.BAD_REQUEST, str(exc))
            return
        try:
            if isinstance(msg, wire.Pull):
                self._on_pull(identity, msg)
            elif isinstance(msg, wire.Done):
                self._on_done(identity, msg)
            elif isinstance(msg, wire.Abort):
                self.discard(msg.transfer_id, f"aborted by receiver: {msg.reason}")
            else:
                self._reply_error(identity, "", 0, ErrorCode.BAD_REQUEST, f"unexpected {msg.TYPE.name}")
        except Exception as exc:  # the endpoint must keep serving whatever one message does
            log.exception("%s: failed handling %s", self.name, type(msg).__name__)
            self._reply_error(identity, getattr(msg, "transfer_id", ""), 0, ErrorCode.INTERNAL, str(exc)[:500])

    def _on_pull(self, identity: bytes, pull: wire.Pull) -> None:
        with self._lock:
            entry = self._entries.get(pull.transfer_id)
        if entry is None:
            self._reply_error(identity, pull.transfer_id, pull.seq, ErrorCode.NOT_FOUND,
                              "unknown transfer id (never registered, finished, or expired)")
        elif entry.state == TransferState.WAITING_FOR_INPUT:
            if len(self._pending) >= MAX_PENDING_PULLS:
                self._reply_error(identity, pull.transfer_id, pull.seq, ErrorCode.BUSY, "too many waiting pulls")
                return
            self._pending.append(_PendingPull(identity, pull, time.monotonic() + self.config.pull_wait_s))
        else:
            self._send_chunk(identity, pull, entry)

    def _send_chunk(self, identity: bytes, pull: wire.Pull, entry: _Entry) -> None:
        aux = entry.aux
        if aux is None:
            raise RuntimeError("transfer has no aux record")
        total = aux.total_tokens
        if pull.sent_tokens >= total:
            self._reply_error(identity, pull.transfer_id, pull.seq, ErrorCode.BAD_REQUEST,
                              f"sent_tokens {pull.sent_tokens} is not below the total {total}")
            return
        if pull.transport != self.transport.name:
            self._reply_error(identity, pull.transfer_id, pull.seq, ErrorCode.BAD_REQUEST,
                              f"transport {pull.transport!r} not served here ({self.transport.name!r})")
            return
        n = wire.chunk_tokens(total, pull.sent_tokens, pull.capacity_tokens)
        payload = self.transport.send_chunk(identity.hex(), self.pool, entry.blocks, pull.sent_tokens, n)
        chunk = wire.Chunk(pull.transfer_id, pull.seq, pull.sent_tokens, n, total,
                           aux if pull.sent_tokens == 0 else None)
        self._router.send_multipart([identity, wire.encode(chunk), *payload], copy=False)
        with self._lock:
            entry.expires_at = time.monotonic() + self.config.ttl_s

    def _on_done(self, identity: bytes, done: wire.Done) -> None:
        with self._lock:
            entry = self._entries.pop(done.transfer_id, None)
        if entry is None:
            self._reply_error(identity, done.transfer_id, done.seq, ErrorCode.NOT_FOUND, "unknown transfer id")
            return
        entry.state = TransferState.SUCCESS
        if entry.blocks:
            self.pool.free(entry.blocks)
            self.observer.pool_changed()
        self._router.send_multipart([identity, wire.encode(wire.Ack(done.transfer_id, done.seq))])

    def _serve_pending(self) -> None:
        if not self._pending:
            return
        now, still = time.monotonic(), []
        for item in self._pending:
            with self._lock:
                entry = self._entries.get(item.pull.transfer_id)
            if entry is None:
                self._reply_error(item.identity, item.pull.transfer_id, item.pull.seq, ErrorCode.NOT_FOUND,
                                  "the embedding was dropped before it was ready")
            elif entry.state != TransferState.WAITING_FOR_INPUT:
                self._send_chunk(item.identity, item.pull, entry)
            elif now >= item.give_up_at:
                self._reply_error(item.identity, item.pull.transfer_id, item.pull.seq, ErrorCode.TIMEOUT,
                                  f"embedding not ready within {self.config.pull_wait_s:.1f}s")
            else:
                still.append(item)
        self._pending = still

    def _reap_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [e for e in self._entries.values() if e.expires_at <= now]
            for entry in expired:
                del self._entries[entry.transfer_id]
        for entry in expired:
            if entry.blocks:
                self.pool.free(entry.blocks)
            log.warning("%s: transfer %s (request %s) not pulled within TTL %.1fs; reclaimed %d block(s)",
                        self.name, entry.transfer_id, entry.request_id, self.config.ttl_s, len(entry.blocks))
            self.observer.transfer_failed("ttl")
            self.observer.pool_changed()

    def _reply_error(self, identity: bytes, tid: str, seq: int, code: str, message: str) -> None:
        msg = wire.Error(tid, seq, code, "".join(c if " " <= c <= "~" else "?" for c in message)[:512])
        self._router.send_multipart([identity, wire.encode(msg)])

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
