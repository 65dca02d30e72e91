"""The receiver's sockets: connected ZeroMQ DEALERs to sender endpoints, reused and bounded.

A socket is taken by one pull (or one BOOTSTRAP / ABORT) at a time and given back after a clean exchange
(every answer it was owed has been read); sequential pulls from one endpoint therefore share one
connection, which also keeps the TCP and ZeroMQ handshakes (a few hundred microseconds) off the request
path. Concurrent pulls from one endpoint each hold their own, since a DEALER is not thread-safe and its
replies carry no pull of their own to sort them by. A socket that is not clean is closed, never reused.

At most ``max_sockets`` are open (taken and idle, i.e. file descriptors): a new one closes the least
recently used idle socket first, and when every one is taken the caller gets ``SocketsExhausted`` at once.

Every socket takes messages of a control frame plus ``payload_bytes`` (the largest window of chunk bytes
this receiver offers): ZeroMQ drops a peer that sends more, so a rogue or broken "sender" cannot make
this process buffer arbitrary amounts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import zmq

from . import wire
from .errors import SocketsExhausted

# A short linger lets a final ABORT leave after close() without blocking the caller.
ABORT_LINGER_MS = 500
MAX_IDLE_SOCKETS = 16  # idle sockets kept per endpoint (concurrent pulls beyond are closed when done)
# Inbound message limit of sockets that carry no chunk bytes (control frames only)
CONTROL_MSG_BYTES = 2 * wire.MAX_FRAME_BYTES


class SocketPool:
    def __init__(self, ctx: zmq.Context, max_sockets: int = 64, payload_bytes: int = 0) -> None:
        self._ctx = ctx
        self.max_sockets = max_sockets
        self.payload_bytes = payload_bytes
        # address -> idle connected DEALERs; addresses least recently used first
        self.idle: OrderedDict[str, list[zmq.Socket]] = OrderedDict()
        self._taken: set[zmq.Socket] = set()
        self._limits: dict[zmq.Socket, int] = {}  # payload bytes each open socket takes per message
        self._lock = threading.Lock()

    @property
    def open_sockets(self) -> int:
        """Sockets open now, taken or idle (each one a file descriptor of this process)."""
        with self._lock:
            return self._count()

    def connect(self, address: str, payload_bytes: int = 0, linger_ms: int = ABORT_LINGER_MS) -> zmq.Socket:
        """A new DEALER connected to ``address``, outside the pool (closed by the caller at once)."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.MAXMSGSIZE, CONTROL_MSG_BYTES + payload_bytes)
        sock.connect(address)
        return sock

    def take(self, address: str, payload_bytes: int = 0) -> zmq.Socket:
        """A connected DEALER for one exchange: an idle one to ``address`` when there is, else a new one."""
        with self._lock:
            idle = self.idle.get(address)
            while idle:
                sock = idle.pop()
                if self._limits.get(sock, 0) >= payload_bytes:
                    self.idle.move_to_end(address)
                    self._taken.add(sock)
                    return sock
                self._close(sock)  # made for smaller messages (the window grew): a new one below
            self._make_room(address)
            sock = self.connect(address, max(payload_bytes, self.payload_bytes))
            self._limits[sock] = max(payload_bytes, self.payload_bytes)
            self._taken.add(sock)
            return sock

    def give(self, address: str, sock: zmq.Socket, payload_bytes: int = 0) -> None:
        """Back to the idle list, only after a clean exchange (no reply can still be on its way)."""
        with self._lock:
            self._taken.discard(sock)
            if sock.closed:
                self._limits.pop(sock, None)
                return
            idle = self.idle.setdefault(address, [])
            self.idle.move_to_end(address)
            if len(idle) < MAX_IDLE_SOCKETS:
                idle.append(sock)
                return
            self._close(sock)

    def discard(self, sock: zmq.Socket) -> None:
        """Close a taken socket that is not clean."""
        with self._lock:
            self._taken.discard(sock)
            self._close(sock)

    def close(self) -> None:
        with self._lock:
            idle, self.idle = [s for v in self.idle.values() for s in v], OrderedDict()
            self._limits.clear()
        for sock in idle:
            sock.close(linger=0)

    # ---- lock held ---------------------------------------------------------------------------------------
    def _count(self) -> int:
        # A taken socket its user closed (a pull that ended unclean) no longer counts.
        closed = [s for s in self._taken if s.closed]
        for sock in closed:
            self._taken.discard(sock)
            self._limits.pop(sock, None)
        return len(self._taken) + sum(len(v) for v in self.idle.values())

    def _make_room(self, address: str) -> None:
        if self._count() < self.max_sockets:
            return
        for other, idle in list(self.idle.items()):  # least recently used endpoint first
            if idle:
                self._close(idle.pop(0))
            if not idle:
                del self.idle[other]
            if self._count() < self.max_sockets:
                return
        raise SocketsExhausted(
            f"cannot connect to {address}: all {self.max_sockets} connections of this receiver (max_sockets) "
            "are in use by other pulls"
        )

    def _close(self, sock: zmq.Socket) -> None:
        self._limits.pop(sock, None)
        sock.close(linger=0)
