"""The sender's transfer table: every embedding it serves, how recent ones ended, and the frees
that wait for in-flight sends. Thread-safe: request threads add and drop entries, the server
thread serves and reaps them.

Every block is freed exactly once: on DONE, on ABORT, when ``fill`` fails, when the TTL expires
before the receiver finished, or at ``close``. Blocks that a GPU link's sends may still read
are freed once those sends completed (a CUDA event, polled by the server thread: the free is
deferred, never a blocking sync), or after ``pull_timeout_s`` once their channel was aborted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from .enums import ErrorCode, FailureCause, TransferState
from .errors import TransferAborted
from .observer import TransferObserver
from .pool import BlockPool
from .wire import Aux

log = logging.getLogger(__name__)
# Ids of transfers that ended (done, aborted, reclaimed), remembered so that a late pull gets a clear
# answer ("reclaimed after ttl_s") rather than a bare "unknown"; bounded, oldest forgotten first.
MAX_ENDED_IDS = 8192
Release = Callable[[list[int]], None]
Refusal = tuple[ErrorCode, str] | None  # why a PULL is not served (nothing sent), or None


@dataclass(frozen=True)
class InFlight:
    """Sends that read an entry's blocks: complete when ``event`` is; posted on link ``link_id``."""

    event: Any
    link_id: str


@dataclass
class Entry:
    transfer_id: str
    request_id: str
    expires_at: float
    limit_at: float  # absolute: no pull extends expires_at past it (a reader cannot pin the blocks forever)
    state: TransferState = TransferState.WAITING_FOR_INPUT
    blocks: list[int] = field(default_factory=list)
    aux: Aux | None = None
    in_flight: InFlight | None = None
    release: Release | None = None  # who takes the blocks back (default: the pool)
    # The receiver (ZeroMQ identity) that pulls it: bound by the first served PULL, so that a second
    # receiver cannot interleave with the first; the TTL still reclaims it if that receiver dies.
    owner: bytes | None = None
    next_offset: int = 0  # where the owner's next PULL must start: every chunk is sent once
    unread: int = 0  # payload bytes sent to the owner that no later PULL (or DONE/ABORT) confirmed read
    claimed: bool = False  # a same-GPU receiver is copying the rows (CLAIM): its DONE gets no answer


@dataclass(frozen=True)
class DeferredFree:
    """Blocks to free once the sends reading them completed."""

    blocks: list[int]
    release: Release
    in_flight: InFlight
    since: float


#: An embedding lives at most this many ttl_s from its registration, however often it is pulled: a pull
#: restarts the TTL (a long transfer in many continuations keeps its blocks) but cannot pin them forever.
LIFETIME_TTLS = 2
EXPIRED = "expired"  # how a transfer reclaimed by the TTL ended (a late pull gets ERROR(expired))


def completed(event: Any) -> bool:
    """Whether a CUDA event completed; an event that cannot be queried any more (its context or
    communicator failed) counts as complete: nothing will read the blocks after that."""
    try:
        return bool(event.query())
    except Exception:  # noqa: BLE001 - a failed query must not stop the control thread
        return True


class TransferTable:
    def __init__(self, pool: BlockPool, ttl_s: float, observer: TransferObserver, name: str) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self.observer = observer
        self.name = name
        self.entries: dict[str, Entry] = {}
        self.lock = threading.Lock()
        self._ended: OrderedDict[str, str] = OrderedDict()  # transfer id -> how it ended
        self._deferred: list[DeferredFree] = []
        self.unread: dict[bytes, int] = {}  # peer identity -> payload bytes queued to it, not confirmed read

    # ---- entries ---------------------------------------------------------------------
    def add(self, transfer_id: str, request_id: str) -> None:
        with self.lock:
            now = time.monotonic()
            self.entries[transfer_id] = Entry(
                transfer_id, request_id, now + self.ttl_s, now + LIFETIME_TTLS * self.ttl_s
            )

    def get(self, transfer_id: str) -> Entry | None:
        with self.lock:
            return self.entries.get(transfer_id)

    def __len__(self) -> int:
        with self.lock:
            return len(self.entries)

    def publish(self, transfer_id: str, blocks: list[int], aux: Aux, release: Release | None) -> None:
        with self.lock:
            entry = self.entries.get(transfer_id)
            if entry is None or entry.state != TransferState.WAITING_FOR_INPUT:
                raise TransferAborted(f"transfer {transfer_id} was aborted or expired before it was filled")
            entry.blocks, entry.aux, entry.release = blocks, aux, release
            entry.state = TransferState.TRANSFERRING
            entry.expires_at = min(time.monotonic() + self.ttl_s, entry.limit_at)

    def touch(self, entry: Entry, in_flight: InFlight | None = None) -> None:
        """A chunk was served: the TTL starts again, but never past the entry's absolute limit (registration +
        ``LIFETIME_TTLS`` x ttl_s); ``in_flight`` are the sends now reading the blocks."""
        with self.lock:
            if in_flight is not None:
                entry.in_flight = in_flight
            entry.expires_at = min(time.monotonic() + self.ttl_s, entry.limit_at)

    def pop(self, transfer_id: str, ending: str) -> Entry | None:
        """Remove an entry (its blocks are the caller's to ``release``), remembering how it ended."""
        with self.lock:
            entry = self.entries.pop(transfer_id, None)
            if entry is not None:
                self._remember(transfer_id, ending)
                self._confirm(entry)
        return entry

    def discard(self, transfer_id: str, reason: str) -> bool:
        """Drop a transfer and free its blocks (once no send reads them); False if it was not here."""
        entry = self.pop(transfer_id, f"dropped ({reason[:200]})")
        if entry is None:
            return False
        self.release(entry)
        log.info("%s: transfer %s (request %s) dropped: %s", self.name, transfer_id, entry.request_id, reason)
        return True

    def ending(self, transfer_id: str) -> str:
        """How a transfer that is no longer here ended ("" if this table never knew it or forgot)."""
        with self.lock:
            return self._ended.get(transfer_id, "")

    def _remember(self, transfer_id: str, ending: str) -> None:
        self._ended[transfer_id] = ending
        while len(self._ended) > MAX_ENDED_IDS:
            self._ended.popitem(last=False)

    def reap_expired(self) -> None:
        """Reclaim every entry whose TTL passed."""
        now = time.monotonic()
        with self.lock:
            expired = [e for e in self.entries.values() if e.expires_at <= now]
            for entry in expired:
                del self.entries[entry.transfer_id]
                self._remember(entry.transfer_id, EXPIRED)
                self._confirm(entry)
        for entry in expired:
            nblocks = len(entry.blocks)
            self.release(entry)
            log.warning(
                "%s: transfer %s (request %s) not pulled within TTL %.1fs; reclaimed %d block(s)",
                self.name,
                entry.transfer_id,
                entry.request_id,
                self.ttl_s,
                nblocks,
            )
            self.observer.transfer_failed(FailureCause.TTL)
            self.observer.pool_changed()

    # ---- one receiver per transfer, bytes queued per receiver -------------------------
    def admit(self, entry: Entry, identity: bytes, sent_tokens: int, end: int, nbytes: int, bound: int) -> Refusal:
        """Whether ``identity`` may be sent the chunks of ``entry`` from ``sent_tokens`` to ``end`` (``nbytes``
        of payload) now; if so, they are charged to it. None, or (code, why) with nothing changed.

        A PULL from the owner at ``next_offset`` confirms that it read the chunks before (it could not
        know where to continue otherwise); a refusal for the bytes comes only when something is already
        unconfirmed, so one chunk of any size always goes out."""
        with self.lock:
            if self.entries.get(entry.transfer_id) is not entry:
                return ErrorCode.NOT_FOUND, "unknown transfer id: it was dropped while the PULL was checked"
            if entry.owner is not None and entry.owner != identity:
                return ErrorCode.IN_USE, "another receiver is pulling this transfer (one receiver at a time)"
            if entry.owner is not None and sent_tokens != entry.next_offset:
                return ErrorCode.BAD_REQUEST, (
                    f"PULL from token {sent_tokens}, but this transfer continues at token {entry.next_offset} "
                    "(every chunk is sent once)"
                )
            self._confirm(entry)
            queued = self.unread.get(identity, 0)
            if queued and nbytes and queued + nbytes > bound:
                return ErrorCode.BUSY, (
                    f"{queued} bytes of chunks sent to this receiver are not confirmed read "
                    f"(bound {bound}): read them, then PULL again"
                )
            entry.owner, entry.next_offset, entry.unread = identity, end, nbytes
            if nbytes:
                self.unread[identity] = queued + nbytes
            return None

    def owned_by_other(self, transfer_id: str, identity: bytes) -> bool:
        """A receiver other than ``identity`` pulls the transfer (its DONE or ABORT must not end it)."""
        with self.lock:
            entry = self.entries.get(transfer_id)
            return entry is not None and entry.owner is not None and entry.owner != identity

    def _confirm(self, entry: Entry) -> None:
        """The owner read the entry's chunks (or the entry ended): they no longer count as queued (lock held)."""
        if entry.unread and entry.owner is not None:
            left = self.unread.get(entry.owner, 0) - entry.unread
            if left > 0:
                self.unread[entry.owner] = left
            else:
                self.unread.pop(entry.owner, None)
        entry.unread = 0

    # ---- freeing blocks --------------------------------------------------------------
    def release(self, entry: Entry) -> None:
        """Free an entry's blocks now, or once the sends that read them completed."""
        if not entry.blocks:
            return
        in_flight, entry.in_flight = entry.in_flight, None
        release = entry.release or self.pool.free
        if in_flight is not None and not completed(in_flight.event):
            with self.lock:
                self._deferred.append(DeferredFree(entry.blocks, release, in_flight, time.monotonic()))
            return
        release(entry.blocks)
        self.observer.pool_changed()

    def free_deferred(self, timeout_s: float, abort_link: Callable[[str, str], None]) -> None:
        """Free the deferred blocks whose sends completed. Sends not complete after ``timeout_s`` never
        will (the receiver is gone or its communicator hangs): their link is aborted first
        (``abort_link(link_id, reason)``; ncclCommAbort stops its kernels), then the blocks are reused."""
        if not self._deferred:
            return
        now, freed, stuck = time.monotonic(), [], set()
        with self.lock:
            still = []
            for item in self._deferred:
                if completed(item.in_flight.event):
                    freed.append(item)
                elif now - item.since > timeout_s:
                    log.warning(
                        "%s: sends on %d block(s) not complete after %.0fs (pull_timeout_s); aborting "
                        "channel %s and freeing them",
                        self.name,
                        len(item.blocks),
                        now - item.since,
                        item.in_flight.link_id[:8],
                    )
                    stuck.add(item.in_flight.link_id)
                    freed.append(item)
                else:
                    still.append(item)
            self._deferred = still
        for link_id in stuck:
            abort_link(link_id, "sends did not complete within pull_timeout_s")
        for item in freed:
            item.release(item.blocks)
        if freed:
            self.observer.pool_changed()

    def link_busy(self, link_id: str) -> bool:
        """Sends still in flight on the link (blocks waiting for their completion)."""
        with self.lock:
            return any(d.in_flight.link_id == link_id for d in self._deferred) or any(
                e.in_flight is not None and e.in_flight.link_id == link_id for e in self.entries.values()
            )

    def close(self) -> None:
        """Free every block still held (the server thread has stopped: nothing reads them)."""
        with self.lock:
            entries, self.entries = list(self.entries.values()), {}
            deferred, self._deferred = self._deferred, []
            self.unread.clear()
        for entry in entries:
            if entry.blocks:
                (entry.release or self.pool.free)(entry.blocks)
        for item in deferred:
            item.release(item.blocks)
