"""The sender's channel table: the GPU links receivers opened with BOOTSTRAP, by channel id.

Used from the server thread only. A channel no PULL used for ``CHANNEL_IDLE_S`` is closed (its
communicator aborted): a receiver that went away without a CLOSE (killed) must not hold NCCL
resources here forever, and one that comes back after a long pause finds its channel unknown and
reopens it transparently. With ``MAX_CHANNELS`` open, the least recently used idle one makes room.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from .enums import Transport
from .errors import ChannelError
from .pool import BlockPool
from .transports import SenderLink, open_sender_link

log = logging.getLogger(__name__)
MAX_CHANNELS = 1024
CHANNEL_IDLE_S = 900.0
_IDLE_CHECK_S = 1.0


class ChannelTable:
    def __init__(self, pool: BlockPool, busy: Callable[[str], bool], name: str) -> None:
        self.pool = pool
        self.links: dict[str, SenderLink] = {}
        self._busy = busy  # sends still in flight on a link: it is not idle
        self._idle_checked = 0.0
        self.name = name

    def get(self, channel_id: str) -> SenderLink | None:
        return self.links.get(channel_id)

    def make_room(self, channel_id: str) -> bool:
        """Whether a channel ``channel_id`` may open now (the least recently used idle one is closed
        when the table is full); False when the id is taken or every channel is busy."""
        if len(self.links) >= MAX_CHANNELS:
            self._evict_lru()
        return channel_id not in self.links and len(self.links) < MAX_CHANNELS

    def open(self, kind: Transport, channel_id: str, timeout_s: float) -> SenderLink:
        """A new channel (formed in the background where it must be); call ``make_room`` first."""
        if channel_id in self.links:
            raise ChannelError(f"channel id {channel_id[:8]} in use")
        link = open_sender_link(kind, channel_id, self.pool, timeout_s)
        self.links[channel_id] = link
        return link

    def close(self, channel_id: str, reason: str) -> None:
        link = self.links.pop(channel_id, None)
        if link is not None:
            log.warning("%s: %s channel %s closed: %s", self.name, link.kind.value, channel_id[:8], reason)
            link.close()

    def reap_idle(self) -> None:
        if not self.links:
            return
        now = time.monotonic()
        if now - self._idle_checked < _IDLE_CHECK_S:
            return
        self._idle_checked = now
        for channel_id, link in list(self.links.items()):
            if now - link.last_used > CHANNEL_IDLE_S and not self._busy(channel_id):
                self.close(channel_id, f"idle for {now - link.last_used:.0f}s")

    def _evict_lru(self) -> None:
        idle = [(link.last_used, cid) for cid, link in self.links.items() if not self._busy(cid)]
        if idle:
            self.close(min(idle)[1], f"least recently used of {MAX_CHANNELS} channels")

    def close_all(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()
