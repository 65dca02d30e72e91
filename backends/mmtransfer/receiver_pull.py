"""The receiver's one pull loop: one embedding, over any link, through a window of blocks.

``PullRun.run`` allocates the window (the policy's size; fewer blocks if the pool is short, at least
one) and lands every chunk through ``link.post`` into the assembled embedding (directly, or into the
window and out of it). With an EMBED_REF naming the rows (protocol 3) a link that maps the sender's pool
(CUDA IPC, shm) copies them at once (CLAIM, copy, DONE: no PULL), and NCCL posts the first chunk's
receives right after its PULL. Else the first CHUNK's aux says the length. A pipelined link (NCCL,
CUDA IPC, shm) asks for every chunk with one PULL, each chunk's move posted behind the previous one on
the link's stream; the host link asks chunk by chunk, the window bounding the bytes in flight. A CUDA
event says when it is usable. Every path frees the window; on failure the sender is told to ABORT, and
a channel whose pairing is in doubt is drained (bounded) and given up.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch
import zmq

from . import wire
from .enums import ErrorCode, FailureCause, Landing, TransferState
from .errors import (
    ChannelError,
    ProtocolError,
    RemoteError,
    RequestTooLarge,
    TransferCancelled,
    TransferError,
)
from .observer import TransferRecord
from .pool import Segment
from .receiver_errors import remote_error
from .receiver_types import PullContext, Received, Reopen, check_aux, chunk_dests, no_answer, send_abort
from .ref import EmbedRef
from .transports import ReceiverLink
from .transports.streams import current_stream, elapsed_us, record_event, use_stream, wait_event

log = logging.getLogger(__name__)
_DRAIN_MAX_S = 10.0
# ERRORs after which the sender has given the channel up (or never had it): its pairing is gone
_CHANNEL_CODES = (ErrorCode.UNAVAILABLE, ErrorCode.UNKNOWN_CHANNEL)


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
        self.early: tuple[tuple[int, int], ...] = ()  # the first chunk's pieces, posted before its CHUNK

    # ---- the loop ----------------------------------------------------------------------
    def run(self, retry: bool) -> Received:
        link = self.link
        try:
            self._open_window()
            if link.reads_pool and self.ref.ready:
                self._read_pool()  # no PULL: nothing pairs by order, so no exclusive section
                return self._settle()
            with link.exclusive():
                if link.broken:
                    raise ChannelError(f"{link.kind.value} channel to {self.ref.address} broke")
                while self.aux is None or self.sent < self.aux.total_tokens:
                    if not self.outstanding:
                        self._send_pull()
                    chunk, frames = self._next_chunk()
                    if self.sent == 0:
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

    def _check_cancelled(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise TransferCancelled(
                f"request {self.request_id or '-'} was cancelled; transfer {self.ref.transfer_id} given up"
            )

    def _read_pool(self) -> None:
        """A mapped pool (same GPU, shm), ref with rows: CLAIM the rows (the answer travels while bytes move), then
        copy every chunk from the mapped pool, each behind the previous one on the link's stream (no wait
        between chunks); ``_finish`` takes the claim's answer and sends DONE."""
        self._check_cancelled()
        ref = self.ref
        self._check_aux(ref.aux)
        self.sock.send(wire.encode(wire.Claim(ref.transfer_id, 0, ref.rows), self.key))
        self.marks["first_chunk"] = time.perf_counter()
        self._begin(ref.aux)
        total = ref.aux.total_tokens
        for offset, n in wire.chunk_plan(total, self.capacity):
            pieces = tuple(wire.chunk_pieces(ref.rows, offset, n, self.runs))
            chunk = wire.Chunk(ref.transfer_id, self.seq, offset, n, total, None, pieces)
            self._check_chunk(chunk)
            self._land(chunk, [])
            self.sent += n
            self.seq += 1

    def _early_pieces(self) -> tuple[tuple[int, int], ...]:
        """The first chunk's pieces, derived from the ref's rows as the sender derives them from its blocks
        (empty: this pull does not post early)."""
        ref = self.ref
        if not (self.link.posts_early and ref.ready and self.sent == 0 and self.aux is None):
            return ()
        self._check_aux(ref.aux)
        n = wire.chunk_tokens(ref.aux.total_tokens, 0, self.capacity)
        return tuple(wire.chunk_pieces(ref.rows, 0, n, self.runs))

    def _send_pull(self) -> None:
        self._check_cancelled()
        link = self.link
        early = self._early_pieces()
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
            early=tuple(n for _, n in early),
        )
        self.sock.send(wire.encode(pull, self.key))
        self.outstanding, self.answered = True, 0
        self.marks.setdefault("sent", time.perf_counter())
        if early:
            # the sender posts these sends when the PULL arrives (or zeros of the same lengths if it refuses)
            self._begin(self.ref.aux)
            n = sum(k for _, k in early)
            self.link.post(early, chunk_dests(self.ctx.pool, self.out, self.window, self.win_segs, 0, n, early), ())
            self.early = early

    def _answer(self) -> tuple[wire.Message, list[memoryview]]:
        """The next answer about this transfer: poll sleeps with the GIL released (no spin), copy=False reads a
        payload where ZeroMQ received it. An ERROR about another transfer is skipped (a reused socket may hold
        the answer to an earlier same-GPU pull's DONE, sent if that transfer expired just before it)."""
        tid, timeout_s = self.ref.transfer_id, self.ctx.config.pull_timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                raise no_answer(tid, timeout_s)
            parts = self.sock.recv_multipart(copy=False)
            msg = wire.decode(parts[0].bytes, self.key)
            if not (isinstance(msg, wire.Error) and msg.transfer_id not in ("", tid)):
                return msg, [p.buffer for p in parts[1:]]

    def _next_chunk(self) -> tuple[wire.Chunk, list[memoryview]]:
        tid = self.ref.transfer_id
        msg, frames = self._answer()
        if isinstance(msg, wire.Error):
            # The sender checks a PULL completely before it sends anything: an ERROR in place of the
            # PULL's first CHUNK means nothing was sent, and a channel's pairing is intact.
            if self.answered == 0 and msg.code not in _CHANNEL_CODES:
                self.outstanding = False
            raise remote_error(msg)
        if not isinstance(msg, wire.Chunk) or msg.transfer_id != tid or msg.seq != self.seq:
            raise ProtocolError(f"expected CHUNK seq {self.seq} for {tid}, got {type(msg).__name__}")
        if frames and self.link.names_pieces:
            raise ProtocolError(f"CHUNK seq {self.seq} on a {self.link.kind.value} link carries payload frames")
        return msg, frames

    def _first(self, chunk: wire.Chunk) -> None:
        self.marks["first_chunk"] = time.perf_counter()
        aux = chunk.aux
        if aux is None:
            raise ProtocolError("first chunk carries no aux record")
        if aux.total_tokens != chunk.total_tokens:
            raise ProtocolError(f"aux total {aux.total_tokens} != chunk total {chunk.total_tokens}")
        if self.aux is not None:  # known from the ref already (early receives)
            if aux != self.aux:
                raise ProtocolError("first chunk's aux differs from the EMBED_REF's")
            return
        self._check_aux(aux)
        self._begin(aux)

    def _check_aux(self, aux: wire.Aux) -> None:
        check_aux(aux, self.ctx.pool, self.ctx.config.max_embed_tokens)

    def _begin(self, aux: wire.Aux) -> None:
        """The length is known: allocate the assembled embedding and start the GPU clock."""
        ctx, pool = self.ctx, self.ctx.pool
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
        followed by the copy out of the window on the same stream (window). A first chunk whose receives
        were posted early is only checked (the sender must have cut it as the receiver did)."""
        link, pool = self.link, self.ctx.pool
        if chunk.num_tokens == self.aux.total_tokens and not self.win_segs:
            adopted = link.adopt(frames, chunk.num_tokens)
            if adopted is not None:  # the payload is the embedding (host link, CPU pool): no copy
                self.out = adopted
                return
        if self.early and chunk.offset == 0:
            if chunk.pieces != self.early:
                raise ProtocolError("first chunk's pieces differ from the receives posted early")
        else:
            dests = chunk_dests(
                pool, self.out, self.window, self.win_segs, chunk.offset, chunk.num_tokens, chunk.pieces
            )
            link.post(chunk.pieces, dests, frames)
        if self.win_segs:
            with use_stream(link.stream):
                pool.gather(self.window, chunk.num_tokens, out=self.out[chunk.offset : chunk.offset + chunk.num_tokens])

    # ---- the end -----------------------------------------------------------------------
    def _settle(self) -> Received:
        ctx, link, total = self.ctx, self.link, self.aux.total_tokens
        self.marks["posted"] = time.perf_counter()
        landed = record_event(link.stream, ctx.pool.device, timing=True)
        # copies within this GPU cannot hang on a peer: block (GIL released) instead of polling
        if not wait_event(landed, ctx.config.pull_timeout_s, blocking=link.reads_pool):
            raise ChannelError(f"chunk bytes not landed within {ctx.config.pull_timeout_s:.0f}s")
        self.marks["ready"] = time.perf_counter()
        ready_s = time.monotonic() - self.start
        self.clean = self._finish()
        self.marks["acked"] = time.perf_counter()
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
        return knows both pools are settled (the TTL covers a lost ACK). True: the socket is clean.

        A receiver that copied the ref's rows with no PULL first takes its CLAIM's answer: the ACK is the
        sender's word that they are this transfer's blocks; without it the pull fails (what was copied is
        not handed out). Its DONE (sent after the copy landed) gets no answer: nothing more to wait for."""
        tid = self.ref.transfer_id
        if self.link.reads_pool and self.ref.ready:
            msg = self._answer()[0]
            if not (isinstance(msg, wire.Ack) and msg.transfer_id == tid):
                if isinstance(msg, wire.Error):
                    raise remote_error(msg)
                raise ProtocolError(f"CLAIM of {tid} answered by {type(msg).__name__}")
            self.sock.send(wire.encode(wire.Done(tid, self.seq), self.key))
            return True
        self.sock.send(wire.encode(wire.Done(tid, self.seq), self.key))
        try:
            msg = self._answer()[0]
        except TransferError as exc:
            log.warning("%s: no ACK for DONE of %s (%s); the sender's TTL will reclaim", self.ctx.name, tid, exc)
            return False
        if not isinstance(msg, wire.Ack):
            log.warning("%s: DONE of %s answered by %s", self.ctx.name, tid, msg)
            return False
        return True

    def _fail(self, exc: BaseException, retry: bool) -> None:
        ctx, link = self.ctx, self.link
        if isinstance(exc, RemoteError) and exc.code is ErrorCode.UNKNOWN_CHANNEL and retry and self.sent == 0:
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
