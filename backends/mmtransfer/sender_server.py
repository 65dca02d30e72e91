"""The sender's server loop: one thread answering a ZeroMQ ROUTER socket in arrival order (also the
order in which out-of-band links post their sends), plus the timers of the serve path.

A malformed or forged frame is answered with ERROR (``bad_request``, ``version`` or
``unauthenticated``) and the loop keeps serving; rejected frames are counted and logged at most
five per 10 s. Inbound messages over ``MAX_INBOUND_BYTES`` are refused by the socket itself.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

import zmq

from . import wire
from .config import TransferConfig
from .enums import ErrorCode
from .errors import AuthenticationError, ProtocolError, VersionMismatch
from .transports.streams import set_thread_device

log = logging.getLogger(__name__)
# A control frame is at most MAX_FRAME_BYTES; the slack lets an oversized frame be answered clearly.
MAX_INBOUND_BYTES = 16 * wire.MAX_FRAME_BYTES
_REJECT_LOG_EVERY_S = 10.0
_TICK_S = 0.05
_BATCH = 256  # messages handled between timer runs, so timers still run under load

Dispatch = Callable[[bytes, wire.Message], bool]
_HWM_SLACK = 16  # the ACK/ERROR frames that may follow a pull's chunks


def send_hwm(config: TransferConfig) -> int:
    """Messages queued per receiver connection before ZeroMQ drops more (its default is 1000): enough for
    the chunks one pull can ask for (one per block at the smallest window) plus a few replies. The bytes
    they carry are bounded by the serve path (``max_unread_tokens``), not by this count. (A receiver with
    smaller blocks than this sender's could ask for more CHUNKs at once; those are control frames of a few
    hundred bytes, which drain into the kernel's socket buffer long before the queue fills.)"""
    return config.max_embed_blocks + _HWM_SLACK


class Outbox:
    """The sending side of the ROUTER socket (server thread only)."""

    def __init__(self, router: zmq.Socket, key: bytes | None) -> None:
        self._router = router
        self._key = key

    def send(self, identity: bytes, msg: wire.Message, payload: Sequence[memoryview] = ()) -> None:
        self._router.send_multipart([identity, wire.encode(msg, self._key), *payload], copy=not payload)

    def error(self, identity: bytes, tid: str, seq: int, code: ErrorCode, message: str) -> None:
        self.send(identity, wire.Error(tid, seq, code, wire.printable(message, 512)))


def _code_for(exc: ProtocolError) -> ErrorCode:
    if isinstance(exc, AuthenticationError):
        return ErrorCode.UNAUTHENTICATED
    if isinstance(exc, VersionMismatch):
        return ErrorCode.VERSION
    return ErrorCode.BAD_REQUEST


class ServerLoop:
    def __init__(self, config: TransferConfig, name: str, device) -> None:
        self.name = name
        self._key = config.auth_key
        self._device = device
        self.rejected_frames = 0  # malformed, unauthenticated or unexpected frames answered with ERROR
        self._reject_log = (0.0, 0)  # (window start, frames rejected in it): rate-limited warnings
        self._ctx = zmq.Context()
        self.router = self._ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_INBOUND_BYTES)
        self.router.setsockopt(zmq.SNDHWM, send_hwm(config))
        bind = f"tcp://{config.control_host}"
        if config.control_port:
            self.router.bind(f"{bind}:{config.control_port}")
            self.port = config.control_port
        else:
            self.port = self.router.bind_to_random_port(bind)
        wake_addr = f"inproc://wake-{id(self)}"
        self._wake_rx = self._ctx.socket(zmq.PULL)
        self._wake_rx.bind(wake_addr)
        self._wake_tx = self._ctx.socket(zmq.PUSH)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.connect(wake_addr)
        self._wake_lock = threading.Lock()  # zmq sockets are not thread-safe
        self._stop = threading.Event()
        self.outbox = Outbox(self.router, self._key)
        self._thread: threading.Thread | None = None

    def start(self, dispatch: Dispatch, tick: Callable[[], None]) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(dispatch, tick), name=f"{self.name}-control", daemon=True
        )
        self._thread.start()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def wake(self) -> None:
        with self._wake_lock:
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # a wake-up is already queued, or the endpoint is closed

    def stop(self) -> None:
        """Stop the thread (waits for it, bounded); ``close`` afterwards releases the sockets."""
        self._stop.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def close(self) -> None:
        for sock in (self.router, self._wake_rx, self._wake_tx):
            sock.close(linger=0)
        self._ctx.term()

    def _run(self, dispatch: Dispatch, tick: Callable[[], None]) -> None:
        set_thread_device(self._device)  # events, streams and NCCL calls of this thread
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(int(_TICK_S * 1000)))
            if self._wake_rx in events:
                while self._wake_rx.poll(0):
                    self._wake_rx.recv()
            if self.router in events:
                for _ in range(_BATCH):
                    try:
                        frames = self.router.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    self._handle(frames, dispatch)
            tick()

    def _handle(self, frames: list[bytes], dispatch: Dispatch) -> None:
        if len(frames) < 2:
            return  # not a DEALER frame set; nothing to answer to
        identity, header = frames[0], frames[1]
        try:
            msg = wire.decode(header, self._key)
        except ProtocolError as exc:
            auth = isinstance(exc, AuthenticationError)
            self.rejected(f"rejected {'unauthenticated' if auth else 'malformed'} control frame: {exc}")
            self.outbox.error(identity, "", 0, _code_for(exc), str(exc))
            return
        try:
            if not dispatch(identity, msg):
                self.rejected(f"rejected unexpected {msg.TYPE.name} frame")
                self.outbox.error(identity, "", 0, ErrorCode.BAD_REQUEST, f"unexpected {msg.TYPE.name}")
        except Exception as exc:  # the endpoint must keep serving whatever one message does
            log.exception("%s: failed handling %s", self.name, type(msg).__name__)
            self.outbox.error(identity, getattr(msg, "transfer_id", ""), 0, ErrorCode.INTERNAL, str(exc)[:500])

    def rejected(self, message: str) -> None:
        """Count a rejected frame; warn about the first few of every window, not about each of a flood."""
        self.rejected_frames += 1
        now = time.monotonic()
        start, count = self._reject_log
        if now - start > _REJECT_LOG_EVERY_S:
            if count > 5:
                log.warning(
                    "%s: %d more control frame(s) rejected in the last %.0fs", self.name, count - 5, _REJECT_LOG_EVERY_S
                )
            start, count = now, 0
        count += 1
        self._reject_log = (start, count)
        if count <= 5:
            log.warning("%s: %s", self.name, message)
