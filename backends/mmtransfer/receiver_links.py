"""The receiver's links, one per sender endpoint address: opened on first use by BOOTSTRAP (the
sender negotiates the transport), kept while they work, given up (and the sender told with
CLOSE) when they break or go stale (a mapped sender's pool is gone); the next pull then bootstraps
a new one. A pair that negotiated the host transport keeps the shared host link, so it is not asked
again; so does a CPU pair whose shm link cannot be formed (one warning, then the host link).
"""

from __future__ import annotations

import logging
import os
import threading

import zmq

from . import device as devices
from . import wire
from .config import TransferConfig
from .enums import ErrorCode, Transport
from .errors import ProtocolError, SocketsExhausted, TransferError, TransferTimeout, TransportUnavailable
from .pool import BlockPool
from .receiver_errors import remote_error
from .receiver_sockets import SocketPool
from .ref import new_transfer_id
from .transports import ReceiverLink, connect_receiver_link
from .transports.host import HostReceiverLink

log = logging.getLogger(__name__)
_BOOTSTRAP_STRIPES = 16


class LinkTable:
    def __init__(self, pool: BlockPool, config: TransferConfig, sockets: SocketPool, name: str) -> None:
        self.pool = pool
        self.config = config
        self.sockets = sockets
        self.name = name
        self.host_link = HostReceiverLink("", pool, "")
        self._links: dict[str, ReceiverLink] = {}
        self._lock = threading.Lock()
        # Striped, not one per address: a lock per address ever seen would grow without bound.
        self._bootstrap_locks = [threading.Lock() for _ in range(_BOOTSTRAP_STRIPES)]

    def _usable(self, address: str) -> ReceiverLink | None:
        with self._lock:
            link = self._links.get(address)
        if link is None or link.broken:
            return None
        why = link.stale()
        if why:
            self.drop(link, why)  # no CLOSE: the sender that held the other half is gone
            return None
        return link

    def link_for(self, address: str) -> ReceiverLink:
        """The link to the sender endpoint at ``address``, bootstrapped on first use (one bootstrap
        at a time per address: concurrent first pulls share its result)."""
        link = self._usable(address)
        if link is not None:
            return link
        with self._bootstrap_locks[hash(address) % _BOOTSTRAP_STRIPES]:
            link = self._usable(address)
            if link is None:
                link = self._bootstrap(address)
                with self._lock:
                    self._links[address] = link
                self._drop_stale()
            return link

    def _drop_stale(self) -> None:
        """Links whose sender is gone, at every new link: a restarted encoder on another port is never pulled
        from at its old address again, and a mapping of its pool would keep that memory for good."""
        with self._lock:
            links = list(self._links.values())
        for link in links:
            why = link.stale()
            if why:
                self.drop(link, why)

    def drop(self, link: ReceiverLink, reason: str, sock: zmq.Socket | None = None) -> None:
        """Give a broken link up; with ``sock``, tell the sender (CLOSE) so it aborts its half now."""
        link.broken = True
        with self._lock:
            if self._links.get(link.address) is link:
                del self._links[link.address]
        log.warning(
            "%s: %s channel %s to %s given up: %s", self.name, link.kind.value, link.link_id[:8], link.address, reason
        )
        link.close()
        if sock is not None:
            self._send_close(sock, link.link_id, reason)

    def close(self) -> None:
        """Close every channel, telling each sender (best effort) so it frees its side now."""
        with self._lock:
            links, self._links = [x for x in self._links.values() if x.has_channel], {}
        for link in links:
            link.close()
            sock = self.sockets.connect(link.address)
            try:
                self._send_close(sock, link.link_id, "receiver closed")
            finally:
                sock.close()

    def _send_close(self, sock: zmq.Socket, channel_id: str, reason: str) -> None:
        try:
            sock.send(
                wire.encode(wire.Close(channel_id, wire.printable(reason, 256)), self.config.auth_key), zmq.NOBLOCK
            )
        except (zmq.ZMQError, ProtocolError):
            pass

    def _ask(self, address: str, channel_id: str) -> wire.Message:
        mine = devices.device_info(self.pool.device)
        cfg = self.config
        sock = self.sockets.take(address)
        clean = False
        try:
            sock.send(
                wire.encode(
                    wire.Bootstrap(
                        channel_id, cfg.transport, mine.kind, mine.uuid[:64], mine.host[:128], os.getpid() & 0x7FFFFFFF
                    ),
                    cfg.auth_key,
                )
            )
            # A CPU pool's channel (shm) is formed by the answer itself: one reply, waited for as long as any
            # other (a dead sender fails as fast as a host pull would); a GPU channel may take longer to form.
            wait_s = cfg.bootstrap_timeout_s
            if self.pool.device.type == "cpu":
                wait_s = min(wait_s, cfg.pull_timeout_s)
            if not sock.poll(int(wait_s * 1000)):
                raise TransferTimeout(f"no answer to BOOTSTRAP from {address} within {wait_s:.1f}s")
            frames = sock.recv_multipart(copy=True)
            clean = True  # the one answer owed was read: the socket may serve the pulls that follow
            return wire.decode(frames[0], cfg.auth_key)
        finally:
            if clean:
                self.sockets.give(address, sock)
            else:
                self.sockets.discard(sock)

    def _bootstrap(self, address: str) -> ReceiverLink:
        channel_id = new_transfer_id()
        msg = self._ask(address, channel_id)
        if isinstance(msg, wire.Error):
            if self._may_fall_back() and msg.code in (ErrorCode.UNAVAILABLE, ErrorCode.BUSY):
                return self._fall_back(address, f"the sender answered {msg.code.value}: {msg.message}")
            if msg.code is ErrorCode.UNAVAILABLE:
                raise TransportUnavailable(f"sender at {address}: {msg.message}")
            raise remote_error(msg)
        if not isinstance(msg, wire.BootstrapAck) or msg.channel != channel_id:
            raise ProtocolError(f"expected BOOTSTRAP_ACK for channel {channel_id[:8]}, got {type(msg).__name__}")
        if self.config.transport not in (Transport.AUTO, msg.transport):
            raise TransportUnavailable(
                f"asked for {self.config.transport.value!r}, sender chose {msg.transport.value!r}"
            )
        if msg.transport is Transport.HOST:
            log.info("%s: sender at %s (%s) uses the host transport", self.name, address, msg.device_kind)
            return self.host_link
        try:
            link = connect_receiver_link(
                msg.transport, channel_id, self.pool, address, msg, self.config.bootstrap_timeout_s
            )
        except TransferError as exc:
            if msg.transport is not Transport.SHM:
                raise
            self._close_channel(address, channel_id, f"receiver cannot map the pool: {exc}")
            return self._fall_back(address, str(exc))
        log.info("%s: %s channel %s to %s open", self.name, msg.transport.value, channel_id[:8], address)
        return link

    def _may_fall_back(self) -> bool:
        """A CPU receiver on ``auto`` asks for shm but must not fail where the sender cannot give it (a GPU
        sender forcing its transport, too many channels): the host link serves any pair."""
        return self.pool.device.type == "cpu" and self.config.transport is Transport.AUTO

    def _fall_back(self, address: str, why: str) -> ReceiverLink:
        """The shm link cannot be formed (another container or uid, a hardened /proc, an old sender): the host
        link serves this sender from now on (remembered: one warning per address)."""
        log.warning("%s: no shm link to the sender at %s, using the host link: %s", self.name, address, why)
        return self.host_link

    def _close_channel(self, address: str, channel_id: str, reason: str) -> None:
        """Tell the sender to drop a channel it opened that this side will not use (best effort)."""
        try:
            sock = self.sockets.take(address)
        except SocketsExhausted:
            return  # the sender reaps the idle channel
        try:
            self._send_close(sock, channel_id, reason)
        finally:
            self.sockets.give(address, sock)
