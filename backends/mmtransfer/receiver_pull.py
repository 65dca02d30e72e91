"""The receiver's one pull loop: one embedding, over any link, through a window of blocks.

``PullRun.run`` allocates the window (the policy's size; fewer blocks if the pool is short, at
least one), sends a PULL, learns the total length from the first CHUNK's aux, lands every chunk
through ``link.post`` into the assembled embedding (directly, or into the window and out of it),
and sends further PULLs until everything arrived. A pipelined link (NCCL, CUDA IPC) asks for every
chunk with one PULL and posts each chunk's move as its CHUNK arrives, behind the previous one on
the link's stream (no round trip per continuation); the host link asks chunk by chunk, the window
bounding the bytes in flight. A CUDA event on the link's stream says when the embedding is usable.

Every path frees the window; on failure the sender is told to ABORT, and a channel whose pairing
is in doubt is drained (bounded) and given up.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import zmq

from . import wire
from .config import TransferConfig
from .enums import ErrorCode, FailureCause, Landing, TransferState
from .errors import (
    ChannelError,
    ProtocolError,
    RemoteError,
    RequestTooLarge,
    TransferCancelled,
    TransferError,
    TransferTimeout,
)
from .observer import TransferObserver, TransferRecord
from .pool import DTYPE_NAMES, BlockPool, Segment
from .receiver_errors import remote_error
from .receiver_links import LinkTable
from .receiver_sockets import SocketPool
from .ref import EmbedRef
from .transports import ReceiverLink
from .transports.streams import current_stream, elapsed_us, record_event, use_stream, wait_event
from .window import WindowPolicy

log = logging.getLogger(__name__)
_SPIN_RECV_S = 0.003
_DRAIN_MAX_S = 10.0
# ERRORs after which the sender has given the channel up (or never had it): its pairing is gone
_CHANNEL_CODES = (ErrorCode.UNAVAILABLE, ErrorCode.UNKNOWN_CHANNEL)


@dataclass(frozen=True)
class Received:
    """An assembled embedding and what it took to move it."""

    embedding: torch.Tensor
    aux: wire.Aux
    record: TransferRecord
    # where the time went, in microseconds from the pull's start (window, sent, first_chunk, posted, ready,
    # and gpu_us on a GPU); for profiling and the benchmark
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PullContext:
    """What every pull of one receiver shares."""

    pool: BlockPool
    config: TransferConfig
    sockets: SocketPool
    links: LinkTable
    observer: TransferObserver
    window_policy: WindowPolicy
    name: str


class Reopen(Exception):
    """The sender does not know the channel (it restarted, or gave it up) and sent nothing: retry the
    pull once on a new channel; the embedding is still there."""


class PullRun:
    """The state of one pull; ``run`` once."""

    def __init__(
        self, ctx: PullContext, ref: EmbedRef, request_id: str, link: ReceiverLink, cancelled: Callable[[], bool] | None
    ) -> None:
        self.ctx, self.ref, self.request_id, self.link, self.cancelled = ctx, ref, request_id, link, cancelled
        self.key = ctx.config.auth_key
        self.state = TransferState.BOOTSTRAPPING
        self.window: list[int] = []
        self.win_segs: list[Segment] = []
        self.runs: tuple[int, ...] = ()
        self.capacity = 0
        self.payload_bytes = 0
        self.sock: zmq.Socket | None = None
        self.clean = False  # the socket may be reused: every answer it was owed has been read
        self.outstanding = False  # a PULL is out whose chunks were not all posted here
        self.answered = 0  # CHUNKs received for the PULL that is out
        self.aux: wire.Aux | None = None
        self.out: torch.Tensor | None = None
        self.sent = self.seq = 0
        self.t0, self.start = time.perf_counter(), time.monotonic()
        self.marks: dict[str, float] = {}
        self.gpu_start = None

    # ---- the loop ----------------------------------------------------------------------
    def run(self, retry: bool) -> Received:
        link = self.link
        try:
            self._open_window()
            with link.exclusive():
                if link.broken:
                    raise ChannelError(f"{link.kind.value} channel to {self.ref.address} broke")
                while self.aux is None or self.sent < self.aux.total_tokens:
                    if not self.outstanding:
                        self._send_pull()
                    chunk, frames = self._next_chunk()
                    if self.aux is None:
                        self._first(chunk)
                    self._check_chunk(chunk)
                    self._land(chunk, frames)
                    self.sent += chunk.num_tokens
                    self.seq += 1
                    self.answered += 1
                    if not link.pipelined or self.sent >= self.aux.total_tokens:
                        self.outstanding = False
            return self._settle()
        except BaseException as exc:
            self._fail(exc, retry)
            raise
        finally:
            if self.sock is not None:
                if self.clean:
                    self.ctx.sockets.give(self.ref.address, self.sock, self.payload_bytes)
                else:
                    self.sock.close()
            if self.window:
                self.ctx.pool.free(self.window)
                self.ctx.observer.pool_changed()

    def _open_window(self) -> None:
        ctx, link = self.ctx, self.link
        blocks = ctx.window_policy.window_blocks(self.ref.num_tokens)
        self.window = ctx.pool.alloc_wait(blocks, ctx.config.alloc_timeout_s, min_blocks=1)
        self.capacity = len(self.window) * ctx.pool.block_tokens
        if link.landing(ctx.config.gpu_landing) is Landing.WINDOW:
            self.win_segs = ctx.pool.segments(self.window, self.capacity)
        if link.names_pieces:
            self.runs = tuple(seg.length for seg in self.win_segs)
            if len(self.runs) > wire.MAX_PIECES:
                raise RequestTooLarge(f"window of {len(self.runs)} runs exceeds {wire.MAX_PIECES}; use larger blocks")
        self.payload_bytes = link.payload_bytes(self.capacity)
        self.sock = ctx.sockets.take(self.ref.address, self.payload_bytes)
        self.state = TransferState.WAITING_FOR_INPUT
        self.marks["window"] = time.perf_counter()

    def _send_pull(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise TransferCancelled(
                f"request {self.request_id or '-'} was cancelled; transfer {self.ref.transfer_id} given up"
            )
        link = self.link
        pull = wire.Pull(
            self.ref.transfer_id,
            self.seq,
            self.sent,
            self.capacity,
            link.kind,
            self.request_id[:128],
            channel=link.link_id,
            count=0 if link.pipelined else 1,
            runs=self.runs,
            op_seq=link.ops,
        )
        self.sock.send(wire.encode(pull, self.key))
        self.outstanding, self.answered = True, 0
        self.marks.setdefault("sent", time.perf_counter())

    def _next_chunk(self) -> tuple[wire.Chunk, list[bytes]]:
        sock, tid, timeout_s = self.sock, self.ref.transfer_id, self.ctx.config.pull_timeout_s
        # Spin a little before sleeping in poll: the answer usually comes within a few hundred
        # microseconds, and waking a sleeping thread costs that much again on a virtual machine.
        spin_until = time.monotonic() + _SPIN_RECV_S
        while not sock.poll(0) and time.monotonic() < spin_until:
            time.sleep(0)
        if not sock.poll(int(timeout_s * 1000)):
            raise _no_answer(tid, timeout_s)
        frames = sock.recv_multipart(copy=True)
        msg = wire.decode(frames[0], self.key)
        if isinstance(msg, wire.Error):
            # The sender checks a PULL completely before it sends anything: an ERROR in place of the
            # PULL's first CHUNK means nothing was sent, and a channel's pairing is intact.
            if self.answered == 0 and msg.code not in _CHANNEL_CODES:
                self.outstanding = False
            raise remote_error(msg)
        if not isinstance(msg, wire.Chunk) or msg.transfer_id != tid or msg.seq != self.seq:
            raise ProtocolError(f"expected CHUNK seq {self.seq} for {tid}, got {type(msg).__name__}")
        if frames[1:] and self.link.names_pieces:
            raise ProtocolError(f"CHUNK seq {self.seq} on a {self.link.kind.value} link carries payload frames")
        return msg, frames[1:]

    def _first(self, chunk: wire.Chunk) -> None:
        ctx = self.ctx
        self.marks["first_chunk"] = time.perf_counter()
        aux = chunk.aux
        if aux is None:
            raise ProtocolError("first chunk carries no aux record")
        if aux.total_tokens != chunk.total_tokens:
            raise ProtocolError(f"aux total {aux.total_tokens} != chunk total {chunk.total_tokens}")
        pool = ctx.pool
        if aux.hidden != pool.hidden or aux.dtype != DTYPE_NAMES[pool.dtype]:
            raise ProtocolError(
                f"embedding is [{aux.hidden}] {aux.dtype}, this pool holds [{pool.hidden}] {DTYPE_NAMES[pool.dtype]}"
            )
        if aux.total_tokens > ctx.config.max_embed_tokens:
            raise RequestTooLarge(
                f"embedding of {aux.total_tokens} tokens exceeds max_embed_tokens={ctx.config.max_embed_tokens}"
            )
        self.aux = aux
        self.out = torch.empty((aux.total_tokens, pool.hidden), dtype=pool.dtype, device=pool.device)
        stream = self.link.stream
        stream.wait_stream(current_stream(pool.device))  # out and window were allocated on this stream
        self.gpu_start = record_event(stream, pool.device, timing=True)
        self.state = TransferState.TRANSFERRING
        if aux.total_tokens > self.capacity:
            log.info(
                "%s: request %s transfer %s needs continuation: %d/%d tokens (%d more chunk(s))",
                ctx.name,
                self.request_id,
                self.ref.transfer_id,
                self.capacity,
                aux.total_tokens,
                math.ceil(aux.total_tokens / self.capacity) - 1,
            )

    def _check_chunk(self, chunk: wire.Chunk) -> None:
        total = self.aux.total_tokens
        if (
            chunk.offset != self.sent
            or chunk.total_tokens != total
            or chunk.num_tokens > self.capacity
            or self.sent + chunk.num_tokens > total
            or (chunk.offset and chunk.aux is not None)
        ):
            raise ProtocolError(
                f"chunk {chunk.seq} at {chunk.offset}+{chunk.num_tokens}/{chunk.total_tokens}, "
                f"expected {self.sent}/{total} within {self.capacity}"
            )
        if self.link.names_pieces:
            wire.check_pieces(chunk.pieces, chunk.num_tokens, self.runs)
        elif chunk.pieces:
            raise ProtocolError(f"CHUNK seq {chunk.seq} on a {self.link.kind.value} link names pieces")

    def _land(self, chunk: wire.Chunk, frames: list[bytes]) -> None:
        """Enqueue one chunk: its bytes land straight in ``out`` (direct) or in the window's blocks,
        followed by the copy out of the window on the same stream (window)."""
        link, pool = self.link, self.ctx.pool
        lengths = [n for _, n in chunk.pieces] or [chunk.num_tokens]
        if not self.win_segs:
            dests, token = [], chunk.offset
            for n in lengths:
                dests.append(self.out[token : token + n])
                token += n
            link.post(chunk.pieces, dests, frames)
            return
        if chunk.pieces:
            rows, dests, token, si = pool.flat_rows, [], 0, 0
            for n in lengths:
                while self.win_segs[si].token + self.win_segs[si].length <= token:
                    si += 1
                seg = self.win_segs[si]
                row = seg.pool_row + token - seg.token
                dests.append(rows[row : row + n])
                token += n
        else:
            dests = [pool.rows(seg) for seg in pool.segments(self.window, chunk.num_tokens)]
        link.post(chunk.pieces, dests, frames)
        with use_stream(link.stream):
            pool.gather(self.window, chunk.num_tokens, out=self.out[chunk.offset : chunk.offset + chunk.num_tokens])

    # ---- the end -----------------------------------------------------------------------
    def _settle(self) -> Received:
        ctx, link, total = self.ctx, self.link, self.aux.total_tokens
        self.marks["posted"] = time.perf_counter()
        landed = record_event(link.stream, ctx.pool.device, timing=True)
        if not wait_event(landed, ctx.config.pull_timeout_s):
            raise ChannelError(f"chunk bytes not landed within {ctx.config.pull_timeout_s:.0f}s")
        self.marks["ready"] = time.perf_counter()
        ready_s = time.monotonic() - self.start
        self.clean = self._finish()
        self.state = TransferState.SUCCESS
        ctx.window_policy.observe(total)
        record = TransferRecord(
            self.ref.transfer_id,
            self.request_id,
            total,
            total * ctx.pool.bytes_per_token,
            self.seq,
            len(self.window),
            time.monotonic() - self.start,
            ready_s,
            link.kind.value,
        )
        ctx.observer.transfer_completed(record)
        if self.seq > 1:
            log.info(
                "%s: request %s transfer %s done over %s: %d tokens in %d chunks (%d continuations), "
                "usable after %.2f ms",
                ctx.name,
                self.request_id,
                self.ref.transfer_id,
                link.kind.value,
                total,
                self.seq,
                self.seq - 1,
                ready_s * 1e3,
            )
        timings = {k: round((v - self.t0) * 1e6, 1) for k, v in self.marks.items()}
        gpu_us = elapsed_us(self.gpu_start, landed)  # first receive posted -> last byte landed, on the GPU
        if gpu_us is not None:
            timings["gpu_us"] = round(gpu_us, 1)
        return Received(self.out, self.aux, record, timings)

    def _finish(self) -> bool:
        """DONE lets the sender free its blocks now; wait for the ACK so that a caller seeing ``pull``
        return knows both pools are settled (the TTL covers a lost ACK). True: the socket is clean."""
        tid, timeout_s = self.ref.transfer_id, self.ctx.config.pull_timeout_s
        self.sock.send(wire.encode(wire.Done(tid, self.seq), self.key))
        try:
            if not self.sock.poll(int(timeout_s * 1000)):
                raise _no_answer(tid, timeout_s)
            msg = wire.decode(self.sock.recv_multipart(copy=True)[0], self.key)
        except TransferError as exc:
            log.warning("%s: no ACK for DONE of %s (%s); the sender's TTL will reclaim", self.ctx.name, tid, exc)
            return False
        if not isinstance(msg, wire.Ack):
            log.warning("%s: DONE of %s answered by %s", self.ctx.name, tid, msg)
            return False
        return True

    def _fail(self, exc: BaseException, retry: bool) -> None:
        ctx, link = self.ctx, self.link
        if isinstance(exc, RemoteError) and exc.code is ErrorCode.UNKNOWN_CHANNEL and retry and self.aux is None:
            ctx.links.drop(link, str(exc))
            self.clean = True  # the one answer owed (the ERROR) was read
            raise Reopen() from exc
        if link.has_channel:
            # Whatever was posted here pairs with sends already posted by the sender (it posts before
            # it answers), so it completes unless the peer died: wait for it (bounded) before the
            # window is freed and the sender told to free its blocks.
            if not link.drain(min(ctx.config.pull_timeout_s, _DRAIN_MAX_S)):
                ctx.links.drop(link, f"posted work did not complete after {type(exc).__name__}", self.sock)
            elif self.outstanding or isinstance(exc, ChannelError):
                ctx.links.drop(link, f"{type(exc).__name__}: {exc}", self.sock)
        self.clean = False
        typed = isinstance(exc, TransferError)
        self._abort(str(exc) if typed else f"receiver error: {type(exc).__name__}")
        ctx.observer.transfer_failed(exc.cause if typed else FailureCause.INTERNAL)
        if typed:
            log.warning(
                "%s: request %s transfer %s failed in state %s over %s: %s",
                ctx.name,
                self.request_id,
                self.ref.transfer_id,
                self.state.name,
                link.kind.value,
                exc,
            )

    def _abort(self, reason: str) -> None:
        if self.state < TransferState.WAITING_FOR_INPUT or self.sock is None:
            return  # nothing was asked of the sender yet
        send_abort(self.sock, self.ref, reason, self.key)


def send_abort(sock: zmq.Socket, ref: EmbedRef, reason: str, key: bytes | None) -> None:
    try:
        sock.send(wire.encode(wire.Abort(ref.transfer_id, wire.printable(reason, 256)), key), zmq.NOBLOCK)
    except (zmq.ZMQError, ProtocolError):
        pass


def _no_answer(tid: str, timeout_s: float) -> TransferTimeout:
    return TransferTimeout(f"transfer {tid}: no answer from the sender within {timeout_s:.1f}s")
