"""The receiver's sockets: connected ZeroMQ DEALERs to sender endpoints.

Control-only sockets (GPU links: no chunk bytes) are kept after a clean exchange and reused, which
keeps the TCP and ZeroMQ handshakes (a few hundred microseconds) off the request path. A socket
that carries payload (the host link) allows one window of bytes per message, so it is made for
its pull and closed after it. ZeroMQ drops a peer that sends more than a socket's limit: a rogue or
broken "sender" cannot make this process buffer arbitrary amounts.
"""

from __future__ import annotations

import threading

import zmq

from . import wire

# A short linger lets a final ABORT leave after close() without blocking the caller.
ABORT_LINGER_MS = 500
MAX_IDLE_SOCKETS = 16
# Inbound message limit of sockets that carry no chunk bytes (control frames only)
CONTROL_MSG_BYTES = 2 * wire.MAX_FRAME_BYTES


class SocketPool:
    def __init__(self, ctx: zmq.Context) -> None:
        self._ctx = ctx
        self.idle: dict[str, list[zmq.Socket]] = {}  # address -> connected control-only DEALERs
        self._lock = threading.Lock()

    def connect(self, address: str, payload_bytes: int = 0, linger_ms: int = ABORT_LINGER_MS) -> zmq.Socket:
        """A new DEALER connected to ``address`` taking messages of a control frame + ``payload_bytes``."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.MAXMSGSIZE, CONTROL_MSG_BYTES + payload_bytes)
        sock.connect(address)
        return sock

    def take(self, address: str, payload_bytes: int = 0) -> zmq.Socket:
        """A connected DEALER for one pull: an idle control-only one when there is, else a new one."""
        if not payload_bytes:
            with self._lock:
                idle = self.idle.get(address)
                if idle:
                    return idle.pop()
        return self.connect(address, payload_bytes)

    def give(self, address: str, sock: zmq.Socket, payload_bytes: int = 0) -> None:
        """Back to the idle list, only after a clean exchange (no reply can still be on its way);
        a payload socket (``payload_bytes`` as it was taken with) is closed instead."""
        if not payload_bytes:
            with self._lock:
                idle = self.idle.setdefault(address, [])
                if len(idle) < MAX_IDLE_SOCKETS:
                    idle.append(sock)
                    return
        sock.close()

    def close(self) -> None:
        with self._lock:
            idle, self.idle = [s for v in self.idle.values() for s in v], {}
        for sock in idle:
            sock.close(linger=0)
