"""The receiver (language model) side: pulls an embedding through a window of blocks.

``Receiver.pull`` allocates the default window (fewer blocks if the pool is short,
at least one), asks the sender for the first chunk, learns the total length from
its aux, and keeps issuing continuations with a growing ``sent_tokens`` offset
until everything has arrived, copying each chunk out of the window into the
assembled embedding. The window is freed on every path; on failure the sender is
told to ABORT so its blocks are freed too.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from . import protocol as wire
from .config import TransferConfig
from .errors import ProtocolError, RemoteError, RequestTooLarge, TransferError, TransferNotFound, TransferTimeout
from .observer import TransferObserver, TransferRecord
from .pool import DTYPE_NAMES, BlockPool
from .protocol import Aux, TransferState
from .ref import EmbedRef
from .transport import HostTransport, Transport
from .window import make_window_policy

log = logging.getLogger(__name__)
_ABORT_LINGER_MS = 500


@dataclass(frozen=True)
class Received:
    """An assembled embedding and what it took to move it."""

    embedding: torch.Tensor
    aux: Aux
    record: TransferRecord


class Receiver:
    """Pulls embeddings into this instance's pool; safe to call from several threads."""

    def __init__(
        self,
        pool: BlockPool,
        config: TransferConfig,
        transport: Transport | None = None,
        observer: TransferObserver | None = None,
        name: str = "receiver",
    ) -> None:
        self.pool = pool
        self.config = config
        self.transport = transport or HostTransport()
        self.observer = observer or TransferObserver()
        self.name = name
        self.window_policy = make_window_policy(config)
        self._ctx = zmq.Context()

    def window_blocks_for(self, ref: EmbedRef) -> int:
        """Blocks to ask for: the policy's window, or less when the hint says it is enough."""
        return self.window_policy.window_blocks(ref.num_tokens)

    def pull(self, ref: EmbedRef, request_id: str = "") -> Received:
        """Move the embedding behind ``ref`` here; raises a TransferError subclass on failure."""
        start = time.monotonic()
        state = TransferState.BOOTSTRAPPING
        window: list[int] = []
        sock = self._ctx.socket(zmq.DEALER)
        # A short linger lets a final ABORT leave after close() without blocking the caller.
        sock.setsockopt(zmq.LINGER, _ABORT_LINGER_MS)
        try:
            window = self.pool.alloc_wait(self.window_blocks_for(ref), self.config.alloc_timeout_s, min_blocks=1)
            sock.connect(ref.address)
            capacity = len(window) * self.pool.block_tokens
            out: torch.Tensor | None = None
            aux: Aux | None = None
            sent, seq = 0, 0
            state = TransferState.WAITING_FOR_INPUT
            while aux is None or sent < aux.total_tokens:
                if aux is not None:
                    log.info("%s: request %s transfer %s needs continuation: %d/%d tokens",
                             self.name, request_id, ref.transfer_id, sent, aux.total_tokens)
                pull = wire.Pull(ref.transfer_id, seq, sent, capacity, self.transport.name, request_id[:128])
                chunk, frames = self._exchange(sock, pull)
                if aux is None:
                    aux = self._check_first(chunk)
                    out = torch.empty((aux.total_tokens, self.pool.hidden), dtype=self.pool.dtype,
                                      device=self.pool.device)
                    state = TransferState.TRANSFERRING
                self._check_chunk(chunk, pull, aux)
                self.transport.recv_chunk(ref.address, self.pool, window, chunk.num_tokens, frames)
                self.pool.gather(window, chunk.num_tokens, out=out[sent : sent + chunk.num_tokens])
                sent += chunk.num_tokens
                seq += 1
            self._finish(sock, ref, seq)
            state = TransferState.SUCCESS
            self.window_policy.observe(aux.total_tokens)
            record = TransferRecord(ref.transfer_id, request_id, aux.total_tokens,
                                    aux.total_tokens * self.pool.bytes_per_token, seq, len(window),
                                    time.monotonic() - start)
            self.observer.transfer_completed(record)
            if seq > 1:
                log.info("%s: request %s transfer %s done: %d tokens in %d chunks (%d continuations), %.1f ms",
                         self.name, request_id, ref.transfer_id, aux.total_tokens, seq, seq - 1,
                         record.latency_s * 1e3)
            return Received(out, aux, record)
        except TransferError as exc:
            self._abort(sock, ref, state, str(exc))
            self.observer.transfer_failed(exc.cause)
            log.warning("%s: request %s transfer %s failed in state %s: %s",
                        self.name, request_id, ref.transfer_id, state.name, exc)
            raise
        except BaseException as exc:
            self._abort(sock, ref, state, f"receiver error: {type(exc).__name__}")
            self.observer.transfer_failed("internal")
            raise
        finally:
            sock.close()
            if window:
                self.pool.free(window)
                self.observer.pool_changed()

    def abort(self, ref: EmbedRef, reason: str) -> None:
        """Tell a sender to drop an embedding this receiver will never pull (best effort)."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, _ABORT_LINGER_MS)
        try:
            sock.connect(ref.address)
            self._abort(sock, ref, TransferState.WAITING_FOR_INPUT, reason)
        finally:
            sock.close()

    def close(self) -> None:
        self._ctx.term()

    def __enter__(self) -> "Receiver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- helpers ------------------------------------------------------------------------
    def _exchange(self, sock: zmq.Socket, pull: wire.Pull) -> tuple[wire.Chunk, list[bytes]]:
        sock.send(wire.encode(pull))
        msg, frames = self._recv(sock, pull.transfer_id)
        if isinstance(msg, wire.Error):
            raise _remote_error(msg)
        if not isinstance(msg, wire.Chunk) or msg.transfer_id != pull.transfer_id or msg.seq != pull.seq:
            raise ProtocolError(f"expected CHUNK seq {pull.seq} for {pull.transfer_id}, got {msg}")
        return msg, frames

    def _recv(self, sock: zmq.Socket, tid: str) -> tuple[wire.Message, list[bytes]]:
        timeout_ms = int(self.config.pull_timeout_s * 1000)
        if not sock.poll(timeout_ms):
            raise TransferTimeout(f"transfer {tid}: no answer from the sender within {self.config.pull_timeout_s:.1f}s")
        frames = sock.recv_multipart(copy=True)
        return wire.decode(frames[0]), frames[1:]

    def _check_first(self, chunk: wire.Chunk) -> Aux:
        aux = chunk.aux
        if aux is None:
            raise ProtocolError("first chunk carries no aux record")
        if aux.total_tokens != chunk.total_tokens:
            raise ProtocolError(f"aux total {aux.total_tokens} != chunk total {chunk.total_tokens}")
        if aux.hidden != self.pool.hidden or aux.dtype != DTYPE_NAMES[self.pool.dtype]:
            raise ProtocolError(
                f"embedding is [{aux.hidden}] {aux.dtype}, this pool holds [{self.pool.hidden}] "
                f"{DTYPE_NAMES[self.pool.dtype]}"
            )
        if aux.total_tokens > self.config.max_embed_tokens:
            raise RequestTooLarge(
                f"embedding of {aux.total_tokens} tokens exceeds max_embed_tokens={self.config.max_embed_tokens}"
            )
        return aux

    @staticmethod
    def _check_chunk(chunk: wire.Chunk, pull: wire.Pull, aux: Aux) -> None:
        if chunk.offset != pull.sent_tokens or chunk.total_tokens != aux.total_tokens:
            raise ProtocolError(f"chunk at {chunk.offset}/{chunk.total_tokens}, expected {pull.sent_tokens}/{aux.total_tokens}")
        if chunk.num_tokens > pull.capacity_tokens or chunk.offset + chunk.num_tokens > aux.total_tokens:
            raise ProtocolError(f"chunk of {chunk.num_tokens} tokens overflows the window or the embedding")
        if chunk.offset != 0 and chunk.aux is not None:
            raise ProtocolError("aux on a continuation chunk")

    def _finish(self, sock: zmq.Socket, ref: EmbedRef, seq: int) -> None:
        """DONE lets the sender free its blocks now; wait for the ACK so that a caller
        seeing ``pull`` return knows both pools are settled (the TTL covers a lost ACK)."""
        sock.send(wire.encode(wire.Done(ref.transfer_id, seq)))
        try:
            msg, _ = self._recv(sock, ref.transfer_id)
        except TransferError as exc:
            log.warning("%s: no ACK for DONE of %s (%s); the sender's TTL will reclaim", self.name, ref.transfer_id, exc)
            return
        if not isinstance(msg, wire.Ack):
            log.warning("%s: DONE of %s answered by %s", self.name, ref.transfer_id, msg)

    def _abort(self, sock: zmq.Socket, ref: EmbedRef, state: TransferState, reason: str) -> None:
        if state < TransferState.WAITING_FOR_INPUT:
            return  # nothing was asked of the sender yet
        try:
            sock.send(wire.encode(wire.Abort(ref.transfer_id, reason.encode("ascii", "replace").decode()[:256])),
                      zmq.NOBLOCK)
        except (zmq.ZMQError, ProtocolError):
            pass


def _remote_error(msg: wire.Error) -> TransferError:
    if msg.code == wire.ErrorCode.NOT_FOUND:
        return TransferNotFound(f"transfer {msg.transfer_id}: {msg.message}")
    if msg.code == wire.ErrorCode.TIMEOUT:
        return TransferTimeout(f"transfer {msg.transfer_id}: sender says {msg.message}")
    return RemoteError(msg.code, msg.message)
