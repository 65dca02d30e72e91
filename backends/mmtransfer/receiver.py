"""The receiver (language model) side: pulls an embedding through a window of blocks.

``Receiver.pull`` allocates the default window (fewer blocks if the pool is short,
at least one), asks the sender for the first chunk, learns the total length from
its aux, and keeps issuing continuations with a growing ``sent_tokens`` offset
until everything has arrived, copying each chunk out of the window into the
assembled embedding. The window is freed on every path; on failure the sender is
told to ABORT so its blocks are freed too.

When this pool is on a GPU (and ``transport`` is not forced to host), the first pull to a
sender endpoint opens a channel (BOOTSTRAP; see ``channels.py``): NCCL for another GPU,
CUDA IPC for the same GPU, or host when the sender has no GPU. On a channel the chunk bytes
move out of band on the channel's stream: the first PULL asks for one chunk (its CHUNK
carries the total length), then ONE PULL asks for every remaining chunk (``count``), each
answered by its own CHUNK, and the receiver posts each chunk's receive as its CHUNK arrives,
without waiting for the previous one to land: continuations are pipelined. A CUDA event on
the channel's stream says when the embedding is usable; nothing waits on the whole device.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import zmq

from . import protocol as wire
from .config import TransferConfig
from .errors import (
    AuthenticationError, ProtocolError, RemoteError, RequestTooLarge, TransferCancelled, TransferError,
    TransferExpired, TransferNotFound, TransferTimeout,
)
from .observer import TransferObserver, TransferRecord
from .pool import DTYPE_NAMES, BlockPool
from .protocol import Aux, TransferState
from .ref import EmbedRef
from .transport import HostTransport, Transport
from .window import make_window_policy
from .channels import (
    ChannelError, ReceiverChannel, current_stream, elapsed_us, open_receiver_channel, record_event, use_device,
    use_stream, wait_event,
)

log = logging.getLogger(__name__)
_ABORT_LINGER_MS = 500
_MAX_IDLE_SOCKETS = 16
_SPIN_RECV_S = 0.003
# Inbound message limit of sockets that carry no chunk bytes (control frames only); sockets of the host
# transport also allow one window of bytes. ZeroMQ drops a peer that sends more: a rogue or broken
# "sender" cannot make this process buffer arbitrary amounts.
_CONTROL_MSG_BYTES = 2 * wire.MAX_FRAME_BYTES


@dataclass(frozen=True)
class Received:
    """An assembled embedding and what it took to move it."""

    embedding: torch.Tensor
    aux: Aux
    record: TransferRecord
    # GPU channels: where the time went, in microseconds from the pull's start (window, sent,
    # first_chunk, posted, ready); for profiling and the benchmark
    timings: dict | None = None


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
        self._key = config.auth_key
        self._ctx = zmq.Context()
        self._channels: dict[str, ReceiverChannel | None] = {}  # sender address -> channel (None: host)
        self._channels_lock = threading.Lock()
        self._address_locks: dict[str, threading.Lock] = {}
        self._idle_sockets: dict[str, list[zmq.Socket]] = {}  # connected DEALERs, reused by channel pulls
        self._sockets_lock = threading.Lock()

    @property
    def uses_channels(self) -> bool:
        """True when pulls may go over a GPU channel: this pool is on CUDA and the transport is not
        forced to host, or a GPU transport is forced (a CPU pool then gets a clear error)."""
        return (self.pool.device.type == "cuda" and self.config.transport != "host") or \
            self.config.transport in ("nccl", "cuda_ipc")

    def window_blocks_for(self, ref: EmbedRef) -> int:
        """Blocks to ask for: the policy's window, or less when the hint says it is enough."""
        return self.window_policy.window_blocks(ref.num_tokens)

    def pull(self, ref: EmbedRef, request_id: str = "", cancelled: Callable[[], bool] | None = None) -> Received:
        """Move the embedding behind ``ref`` here; raises a TransferError subclass on failure.

        ``cancelled`` (optional) is asked before every pull message; when it returns True the transfer is
        given up (TransferCancelled), the sender told to ABORT and the window freed."""
        if self.uses_channels:
            try:
                with use_device(self.pool.device):
                    channel = self.channel_for(ref.address)
            except BaseException as exc:
                self.abort(ref, f"receiver could not open a channel: {type(exc).__name__}")
                self.observer.transfer_failed(getattr(exc, "cause", "internal"))
                raise
            if channel is not None:
                try:
                    return self._pull_channel(ref, request_id, channel, cancelled=cancelled)
                except _Reopen:
                    # the sender no longer knows the channel (it restarted, or gave the channel up)
                    # and sent nothing: open a new one once, the embedding is still there
                    with use_device(self.pool.device):
                        channel = self.channel_for(ref.address)
                    if channel is not None:
                        return self._pull_channel(ref, request_id, channel, retry=False, cancelled=cancelled)
        return self._pull_host(ref, request_id, cancelled)

    @staticmethod
    def _check_cancelled(cancelled: Callable[[], bool] | None, ref: EmbedRef, request_id: str) -> None:
        if cancelled is not None and cancelled():
            raise TransferCancelled(f"request {request_id or '-'} was cancelled; transfer {ref.transfer_id} given up")

    def _pull_host(self, ref: EmbedRef, request_id: str = "", cancelled: Callable[[], bool] | None = None) -> Received:
        start = time.monotonic()
        state = TransferState.BOOTSTRAPPING
        window: list[int] = []
        sock = self._ctx.socket(zmq.DEALER)
        # A short linger lets a final ABORT leave after close() without blocking the caller.
        sock.setsockopt(zmq.LINGER, _ABORT_LINGER_MS)
        try:
            window = self.pool.alloc_wait(self.window_blocks_for(ref), self.config.alloc_timeout_s, min_blocks=1)
            capacity = len(window) * self.pool.block_tokens
            sock.setsockopt(zmq.MAXMSGSIZE, capacity * self.pool.bytes_per_token + _CONTROL_MSG_BYTES)
            sock.connect(ref.address)
            out: torch.Tensor | None = None
            aux: Aux | None = None
            sent, seq = 0, 0
            state = TransferState.WAITING_FOR_INPUT
            while aux is None or sent < aux.total_tokens:
                self._check_cancelled(cancelled, ref, request_id)
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
            ready_s = time.monotonic() - start
            self._finish(sock, ref, seq)
            state = TransferState.SUCCESS
            self.window_policy.observe(aux.total_tokens)
            record = TransferRecord(ref.transfer_id, request_id, aux.total_tokens,
                                    aux.total_tokens * self.pool.bytes_per_token, seq, len(window),
                                    time.monotonic() - start, ready_s, "host")
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
        """Close every channel (telling each sender, best effort, so it frees its side now) and every socket."""
        with self._channels_lock:
            channels, self._channels = [c for c in self._channels.values() if c is not None], {}
        for channel in channels:
            channel.close()
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, _ABORT_LINGER_MS)
            try:
                sock.connect(channel.address)
                sock.send(wire.encode(wire.Close(channel.channel_id, "receiver closed"), self._key), zmq.NOBLOCK)
            except (zmq.ZMQError, ProtocolError):
                pass
            finally:
                sock.close()
        with self._sockets_lock:
            idle, self._idle_sockets = [x for v in self._idle_sockets.values() for x in v], {}
        for sock in idle:
            sock.close(linger=0)
        self._ctx.term()

    def _take_socket(self, address: str) -> zmq.Socket:
        """A connected DEALER to ``address``: an idle one when there is, else a new one. Reusing
        sockets keeps the TCP and ZeroMQ handshakes (a few hundred microseconds) off the request path."""
        with self._sockets_lock:
            idle = self._idle_sockets.get(address)
            if idle:
                return idle.pop()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, _ABORT_LINGER_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, _CONTROL_MSG_BYTES)
        sock.connect(address)
        return sock

    def _give_socket(self, address: str, sock: zmq.Socket) -> None:
        """Back to the idle list, only after a clean exchange (no reply can still be on its way)."""
        with self._sockets_lock:
            idle = self._idle_sockets.setdefault(address, [])
            if len(idle) < _MAX_IDLE_SOCKETS:
                idle.append(sock)
                return
        sock.close()

    def __enter__(self) -> "Receiver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


    # ---- GPU channels -------------------------------------------------------------------
    def channel_for(self, address: str) -> ReceiverChannel | None:
        """The channel to the sender endpoint at ``address`` (opened on first use), or None when
        the pair negotiated the host transport."""
        with self._channels_lock:
            if address in self._channels:
                channel = self._channels[address]
                if channel is None or not channel.broken:
                    return channel
            lock = self._address_locks.setdefault(address, threading.Lock())
        with lock:
            with self._channels_lock:
                channel = self._channels.get(address, False)
                if channel is not False and (channel is None or not channel.broken):
                    return channel
            channel = self._bootstrap(address)
            with self._channels_lock:
                self._channels[address] = channel
            return channel

    def _drop_channel(self, channel: ReceiverChannel, reason: str, sock: zmq.Socket | None = None) -> None:
        channel.broken = True
        with self._channels_lock:
            if self._channels.get(channel.address) is channel:
                del self._channels[channel.address]
        log.warning("%s: %s channel %s to %s given up: %s", self.name, channel.transport, channel.channel_id[:8],
                    channel.address, reason)
        channel.close()
        if sock is not None:
            try:
                sock.send(wire.encode(wire.Close(channel.channel_id, reason.encode("ascii", "replace").decode()[:256]),
                                      self._key), zmq.NOBLOCK)
            except (zmq.ZMQError, ProtocolError):
                pass

    def _bootstrap(self, address: str) -> ReceiverChannel | None:
        from .cuda import TransportUnavailable, device_info
        from .ref import new_transfer_id

        mine = device_info(self.pool.device)
        channel_id = new_transfer_id()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, _CONTROL_MSG_BYTES)
        try:
            sock.connect(address)
            sock.send(wire.encode(wire.Bootstrap(channel_id, self.config.transport, mine.kind, mine.uuid[:64],
                                                 mine.host[:128], os.getpid() & 0x7FFFFFFF), self._key))
            if not sock.poll(int(self.config.bootstrap_timeout_s * 1000)):
                raise TransferTimeout(f"no BOOTSTRAP answer from {address} within {self.config.bootstrap_timeout_s:.0f}s")
            msg = wire.decode(sock.recv_multipart(copy=True)[0], self._key)
        finally:
            sock.close()
        if isinstance(msg, wire.Error):
            if msg.code == wire.ErrorCode.UNAVAILABLE:
                raise TransportUnavailable(f"sender at {address}: {msg.message}")
            raise _remote_error(msg)
        if not isinstance(msg, wire.BootstrapAck) or msg.channel != channel_id:
            raise ProtocolError(f"expected BOOTSTRAP_ACK for channel {channel_id[:8]}, got {type(msg).__name__}")
        if self.config.transport not in ("auto", msg.transport):
            raise TransportUnavailable(f"asked for {self.config.transport!r}, sender chose {msg.transport!r}")
        if msg.transport == "host":
            log.info("%s: sender at %s (%s) uses the host transport", self.name, address, msg.device_kind)
            return None
        channel = open_receiver_channel(msg.transport, channel_id, self.pool, address, msg,
                                        self.config.bootstrap_timeout_s)
        log.info("%s: %s channel %s to %s open", self.name, msg.transport, channel_id[:8], address)
        return channel

    def _pull_channel(self, ref: EmbedRef, request_id: str, channel: ReceiverChannel, retry: bool = True,
                      cancelled: Callable[[], bool] | None = None) -> Received:
        with use_device(self.pool.device):
            return self._pull_channel_on_device(ref, request_id, channel, retry, cancelled)

    def _pull_channel_on_device(self, ref: EmbedRef, request_id: str, channel: ReceiverChannel,
                                retry: bool, cancelled: Callable[[], bool] | None = None) -> Received:
        t0 = time.perf_counter()
        start = time.monotonic()
        marks: dict[str, float] = {}
        state = TransferState.BOOTSTRAPPING
        window: list[int] = []
        unpaired = False  # a PULL is out whose chunks were not all posted here: the channel is suspect
        clean = False  # the socket may be reused: every answer it was owed has been read
        aux: Aux | None = None
        seq = 0
        sock = self._take_socket(ref.address)
        device = self.pool.device
        try:
            window = self.pool.alloc_wait(self.window_blocks_for(ref), self.config.alloc_timeout_s, min_blocks=1)
            capacity = len(window) * self.pool.block_tokens
            landing_window = self.config.gpu_landing == "window"
            win_segs = self.pool.segments(window, capacity) if landing_window else []
            runs = tuple(seg.length for seg in win_segs)
            if len(runs) > wire.MAX_PIECES:
                raise RequestTooLarge(f"window of {len(runs)} runs exceeds {wire.MAX_PIECES}; use larger blocks")
            state = TransferState.WAITING_FOR_INPUT
            current = current_stream(device)
            out: torch.Tensor | None = None
            sent, total = 0, None
            marks["window"] = time.perf_counter()
            self._check_cancelled(cancelled, ref, request_id)
            with channel.lock:
                if channel.broken:
                    raise ChannelError(f"{channel.transport} channel to {ref.address} broke")
                # ONE PULL for the whole embedding (count=0): the sender answers with one CHUNK per
                # window-sized chunk, the first carrying the total; each chunk's receive is posted as
                # its CHUNK arrives, behind the previous one on the channel's stream (which also
                # orders the reuse of the window), so continuations cost no round trip.
                pull = wire.Pull(ref.transfer_id, seq, 0, capacity, channel.transport, request_id[:128],
                                 channel=channel.channel_id, count=0, runs=runs, op_seq=channel.ops)
                sock.send(wire.encode(pull, self._key))
                unpaired = True
                marks["sent"] = time.perf_counter()
                while total is None or sent < total:
                    chunk = self._next_chunk(sock, pull, seq, first_of_pull=(seq == 0))
                    if aux is None:
                        marks["first_chunk"] = time.perf_counter()
                        aux = self._check_first(chunk)
                        total = aux.total_tokens
                        out = torch.empty((total, self.pool.hidden), dtype=self.pool.dtype, device=device)
                        channel.stream.wait_stream(current)  # out and window were allocated on this stream
                        gpu_start = record_event(channel.stream, device, timing=True)
                        state = TransferState.TRANSFERRING
                        if total > capacity:
                            log.info("%s: request %s transfer %s needs continuation: %d/%d tokens (%d more "
                                     "chunk(s) in the same PULL)", self.name, request_id, ref.transfer_id,
                                     min(capacity, total), total, math.ceil(total / capacity) - 1)
                    if chunk.offset != sent or chunk.total_tokens != total or chunk.num_tokens > capacity \
                            or sent + chunk.num_tokens > total or (chunk.offset and chunk.aux is not None):
                        raise ProtocolError(f"chunk {chunk.seq} at {chunk.offset}+{chunk.num_tokens}/"
                                            f"{chunk.total_tokens}, expected {sent}/{total} within {capacity}")
                    self._post_chunk(channel, chunk, runs, win_segs, window, out)
                    sent += chunk.num_tokens
                    seq += 1
                unpaired = False
            marks["posted"] = time.perf_counter()
            landed = record_event(channel.stream, device, timing=True)
            if not wait_event(landed, self.config.pull_timeout_s):
                raise ChannelError(f"chunk bytes not landed within {self.config.pull_timeout_s:.0f}s")
            marks["ready"] = time.perf_counter()
            ready_s = time.monotonic() - start
            clean = self._finish(sock, ref, seq)
            state = TransferState.SUCCESS
            self.window_policy.observe(total)
            record = TransferRecord(ref.transfer_id, request_id, total, total * self.pool.bytes_per_token, seq,
                                    len(window), time.monotonic() - start, ready_s, channel.transport)
            self.observer.transfer_completed(record)
            if seq > 1:
                log.info("%s: request %s transfer %s done over %s: %d tokens in %d chunks (%d continuations), "
                         "usable after %.2f ms", self.name, request_id, ref.transfer_id, channel.transport, total,
                         seq, seq - 1, ready_s * 1e3)
            timings = {k: round((v - t0) * 1e6, 1) for k, v in marks.items()}
            gpu_us = elapsed_us(gpu_start, landed)  # first receive posted -> last byte landed, on the GPU
            if gpu_us is not None:
                timings["gpu_us"] = round(gpu_us, 1)
            return Received(out, aux, record, timings)
        except BaseException as exc:
            if isinstance(exc, RemoteError) and exc.code == wire.ErrorCode.UNAVAILABLE:
                if retry and seq == 0 and aux is None and "unknown channel" in str(exc):
                    self._drop_channel(channel, str(exc), None)
                    clean = True  # the one answer owed (the ERROR) was read
                    raise _Reopen() from exc
                unpaired = True  # the sender gave the channel up
            elif getattr(exc, "sender_posted_nothing", False):
                unpaired = False
            # Whatever was posted here pairs with sends already posted by the sender (it posts
            # before it answers), so it completes unless the peer died: wait for it (bounded)
            # before the window is freed and the sender told to free its blocks.
            if not channel.drain(min(self.config.pull_timeout_s, 10.0)):
                self._drop_channel(channel, f"posted work did not complete after {type(exc).__name__}", sock)
            elif unpaired or isinstance(exc, ChannelError):
                self._drop_channel(channel, f"{type(exc).__name__}: {exc}", sock)
            self._abort(sock, ref, state, str(exc) if isinstance(exc, TransferError) else
                        f"receiver error: {type(exc).__name__}")
            self.observer.transfer_failed(getattr(exc, "cause", "internal") if isinstance(exc, TransferError)
                                          else "internal")
            log.warning("%s: request %s transfer %s failed in state %s over %s: %s", self.name, request_id,
                        ref.transfer_id, state.name, channel.transport, exc)
            raise
        finally:
            if clean:
                self._give_socket(ref.address, sock)
            else:
                sock.close()
            if window:
                self.pool.free(window)
                self.observer.pool_changed()

    def _next_chunk(self, sock: zmq.Socket, pull: wire.Pull, seq: int, first_of_pull: bool) -> wire.Chunk:
        # Spin a little before sleeping in poll: the answer usually comes within a few hundred
        # microseconds, and waking a sleeping thread costs that much again on a virtual machine.
        spin_until = time.monotonic() + _SPIN_RECV_S
        while not sock.poll(0) and time.monotonic() < spin_until:
            time.sleep(0)
        msg, frames = self._recv(sock, pull.transfer_id)
        if isinstance(msg, wire.Error):
            exc = _remote_error(msg)
            # The sender checks a PULL completely before it posts anything: an ERROR in place of
            # the first CHUNK means nothing was sent, and the channel's pairing is intact.
            exc.sender_posted_nothing = first_of_pull and msg.code != wire.ErrorCode.UNAVAILABLE
            raise exc
        if not isinstance(msg, wire.Chunk) or msg.transfer_id != pull.transfer_id or msg.seq != seq or frames:
            raise ProtocolError(f"expected CHUNK seq {seq} for {pull.transfer_id}, got {type(msg).__name__}")
        return msg

    def _post_chunk(self, channel: ReceiverChannel, chunk: wire.Chunk, runs: tuple[int, ...],
                    win_segs: list, window: list[int], out: torch.Tensor) -> None:
        """Enqueue one chunk on the channel: pieces land straight in ``out`` (direct) or in the
        window's blocks, followed by the copy out of the window on the same stream (window)."""
        wire.check_pieces(chunk.pieces, chunk.num_tokens, runs)
        if not runs:
            dests, token = [], chunk.offset
            for _, n in chunk.pieces:
                dests.append(out[token : token + n])
                token += n
            channel.post(chunk.pieces, dests)
            return
        rows, dests, token, si = self.pool.flat_rows, [], 0, 0
        for _, n in chunk.pieces:
            while win_segs[si].token + win_segs[si].length <= token:
                si += 1
            seg = win_segs[si]
            row = seg.pool_row + token - seg.token
            dests.append(rows[row : row + n])
            token += n
        channel.post(chunk.pieces, dests)
        with use_stream(channel.stream):
            self.pool.gather(window, chunk.num_tokens, out=out[chunk.offset : chunk.offset + chunk.num_tokens])

    # ---- helpers ------------------------------------------------------------------------
    def _exchange(self, sock: zmq.Socket, pull: wire.Pull) -> tuple[wire.Chunk, list[bytes]]:
        sock.send(wire.encode(pull, self._key))
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
        return wire.decode(frames[0], self._key), frames[1:]

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

    def _finish(self, sock: zmq.Socket, ref: EmbedRef, seq: int) -> bool:
        """DONE lets the sender free its blocks now; wait for the ACK so that a caller
        seeing ``pull`` return knows both pools are settled (the TTL covers a lost ACK)."""
        sock.send(wire.encode(wire.Done(ref.transfer_id, seq), self._key))
        try:
            msg, _ = self._recv(sock, ref.transfer_id)
        except TransferError as exc:
            log.warning("%s: no ACK for DONE of %s (%s); the sender's TTL will reclaim", self.name, ref.transfer_id, exc)
            return False
        if not isinstance(msg, wire.Ack):
            log.warning("%s: DONE of %s answered by %s", self.name, ref.transfer_id, msg)
            return False
        return True

    def _abort(self, sock: zmq.Socket, ref: EmbedRef, state: TransferState, reason: str) -> None:
        if state < TransferState.WAITING_FOR_INPUT:
            return  # nothing was asked of the sender yet
        try:
            sock.send(wire.encode(wire.Abort(ref.transfer_id, reason.encode("ascii", "replace").decode()[:256]),
                                  self._key), zmq.NOBLOCK)
        except (zmq.ZMQError, ProtocolError):
            pass


class _Reopen(Exception):
    """Internal: retry a pull once on a freshly opened channel."""


def _remote_error(msg: wire.Error) -> TransferError:
    if msg.code == wire.ErrorCode.UNAUTHENTICATED:
        return AuthenticationError(f"the sender refused this endpoint's frames: {msg.message}")
    if msg.code == wire.ErrorCode.EXPIRED:
        return TransferExpired(f"transfer {msg.transfer_id}: {msg.message}")
    if msg.code == wire.ErrorCode.NOT_FOUND:
        return TransferNotFound(f"transfer {msg.transfer_id}: {msg.message}")
    if msg.code == wire.ErrorCode.TIMEOUT:
        return TransferTimeout(f"transfer {msg.transfer_id}: sender says {msg.message}")
    return RemoteError(msg.code, msg.message)
