"""The sender's serve path: every PULL, over any link, is answered here (server thread only); a CLAIM by
``sender_claims.py``.

A PULL names its link: no channel -> the host link; else a channel opened by BOOTSTRAP (NCCL or
CUDA IPC). Whatever the link, ``serve`` checks the whole PULL first (an ERROR must come before
anything was sent, or an ordered link's pairing would break), then per chunk asks the link to
send its pieces and answers with a CHUNK carrying the link's payload frames, if any. One event
from the link covers the sends of the PULL; the blocks are not freed before it completes.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Iterator

from . import wire
from .config import TransferConfig
from .device import DeviceInfo, device_info
from .enums import ErrorCode, TransferState, Transport
from .errors import TransferError
from .pool import BlockPool
from .sender_channels import ChannelTable
from .sender_claims import ClaimDesk
from .sender_server import Outbox
from .sender_table import EXPIRED, Entry, InFlight, TransferTable
from .transports import SenderLink
from .transports.host import HostSenderLink
from .transports.negotiate import negotiate

log = logging.getLogger(__name__)
MAX_PENDING_PULLS = 4096


@dataclass(frozen=True)
class PendingPull:
    """A PULL for an embedding that is reserved but not written yet: answered once it is, or at ``give_up_at``."""

    identity: bytes
    pull: wire.Pull
    give_up_at: float


@dataclass(frozen=True)
class PlannedChunk:
    offset: int
    num_tokens: int
    pieces: list[tuple[int, int]]


class PullServer:
    def __init__(
        self,
        pool: BlockPool,
        config: TransferConfig,
        table: TransferTable,
        channels: ChannelTable,
        outbox: Outbox,
        name: str,
    ) -> None:
        self.pool = pool
        self.config = config
        self.table = table
        self.channels = channels
        self.outbox = outbox
        self.name = name
        self.host_link = HostSenderLink("", pool, 0.0)  # no channel: never formed, never closed
        self.device_info: DeviceInfo = device_info(pool.device)
        self.claims = ClaimDesk(pool, table, outbox, self.reply_unknown)
        self._pending: list[PendingPull] = []

    def dispatch(self, identity: bytes, msg: wire.Message) -> bool:
        """Handle one decoded frame; False for a message a sender does not take."""
        if isinstance(msg, wire.Pull):
            self.on_pull(identity, msg)
        elif isinstance(msg, wire.Done):
            self.on_done(identity, msg)
        elif isinstance(msg, wire.Claim):
            self.claims.on_claim(identity, msg)
        elif isinstance(msg, wire.Abort):
            self.on_abort(identity, msg)
        elif isinstance(msg, wire.Bootstrap):
            self.on_bootstrap(identity, msg)
        elif isinstance(msg, wire.Close):
            self.channels.close(msg.channel, f"closed by receiver: {msg.reason}")
        else:
            return False
        return True

    def tick(self) -> None:
        """The timers, run between batches of messages."""
        self._serve_pending()
        self.table.reap_expired()
        self.table.free_deferred(self.config.pull_timeout_s, self.channels.close)
        self.channels.reap_idle()

    # ---- messages ---------------------------------------------------------------------
    def on_pull(self, identity: bytes, pull: wire.Pull) -> None:
        entry = self.table.get(pull.transfer_id)
        if entry is None:
            self.pair_early(pull)
            self.reply_unknown(identity, pull.transfer_id, pull.seq)
        elif entry.state == TransferState.WAITING_FOR_INPUT:
            if len(self._pending) >= MAX_PENDING_PULLS:
                self.refuse(identity, pull, ErrorCode.BUSY, "too many waiting pulls")
                return
            self._pending.append(PendingPull(identity, pull, time.monotonic() + self.config.pull_wait_s))
        else:
            self.serve(identity, pull, entry)

    def on_done(self, identity: bytes, done: wire.Done) -> None:
        if self.table.owned_by_other(done.transfer_id, identity):
            self.outbox.error(identity, done.transfer_id, done.seq, ErrorCode.IN_USE, "another receiver pulls it")
            return
        entry = self.table.pop(done.transfer_id, "completed already")
        if entry is None:
            self.reply_unknown(identity, done.transfer_id, done.seq)
            return
        entry.state = TransferState.SUCCESS
        self.table.release(entry)
        if not entry.claimed:  # a claiming receiver returned at its claim's ACK and waits for nothing more
            self.outbox.send(identity, wire.Ack(done.transfer_id, done.seq))

    def refuse(self, identity: bytes, pull: wire.Pull, code: ErrorCode, message: str) -> None:
        """Answer ``pull`` with ERROR; receives it posted early are first paired (``pair_early``)."""
        self.pair_early(pull)
        self.outbox.error(identity, pull.transfer_id, pull.seq, code, message)

    def pair_early(self, pull: wire.Pull) -> None:
        """The receiver posted receives of ``pull.early`` tokens before asking (from the EMBED_REF's rows); a
        PULL that is not served sends zeros of those lengths, so an ordered channel's pairing still holds and
        the channel stays usable. Not when the pairing is already gone (unknown channel, out of order)."""
        if not pull.early or not pull.channel:
            return
        link = self.channels.get(pull.channel)
        if link is None or not link.ordered or link.ops != pull.op_seq:
            return
        try:
            link.wait_ready(self.config.bootstrap_timeout_s)
            link.send_blank(pull.early)
        except Exception as exc:
            self.channels.close(pull.channel, f"cannot pair the early receives: {exc}")

    def on_abort(self, identity: bytes, abort: wire.Abort) -> None:
        # A receiver refused with ERROR(in_use) aborts what it could not pull: that must not end the
        # pull in progress. The one pulling (or nobody yet) may abort; the TTL covers a dead puller.
        if self.table.owned_by_other(abort.transfer_id, identity):
            log.info("%s: ABORT of %s by a receiver that does not pull it: ignored", self.name, abort.transfer_id)
            return
        self.table.discard(abort.transfer_id, f"aborted by receiver: {abort.reason}")

    def on_bootstrap(self, identity: bytes, msg: wire.Bootstrap) -> None:
        mine = self.device_info
        try:
            choice = negotiate(
                self.config.transport, msg.transport, mine, DeviceInfo(msg.device_kind, msg.device_uuid, msg.host)
            )
        except TransferError as exc:
            self.outbox.error(identity, "", 0, ErrorCode.UNAVAILABLE, str(exc))
            return
        extra: dict = {}
        if choice is not Transport.HOST:
            if not self.channels.make_room(msg.channel):
                self.outbox.error(identity, "", 0, ErrorCode.BUSY, "channel id in use or too many channels")
                return
            try:
                link = self.channels.open(choice, msg.channel, self.config.bootstrap_timeout_s)
            except Exception as exc:
                log.warning("%s: cannot open a %s channel: %s", self.name, choice.value, exc)
                self.outbox.error(
                    identity,
                    "",
                    0,
                    ErrorCode.UNAVAILABLE,
                    f"cannot open a {choice.value} channel: {type(exc).__name__}: {exc}",
                )
                return
            extra = link.ack_fields()
            log.info(
                "%s: opening %s channel %s for a receiver on %s %s",
                self.name,
                choice.value,
                msg.channel[:8],
                msg.device_kind,
                msg.device_uuid,
            )
        ack = wire.BootstrapAck(msg.channel, choice, mine.kind, mine.uuid[:64], mine.host[:128], **extra)
        self.outbox.send(identity, ack)

    def reply_unknown(self, identity: bytes, tid: str, seq: int) -> None:
        ending = self.table.ending(tid)
        if ending == EXPIRED:
            self.outbox.error(
                identity,
                tid,
                seq,
                ErrorCode.EXPIRED,
                f"transfer reclaimed: not pulled within ttl_s={self.config.ttl_s:g}s",
            )
        elif ending:
            self.outbox.error(identity, tid, seq, ErrorCode.NOT_FOUND, f"unknown transfer id: it was {ending}")
        else:
            self.outbox.error(
                identity, tid, seq, ErrorCode.NOT_FOUND, "unknown transfer id (never registered, finished, or expired)"
            )

    def _serve_pending(self) -> None:
        if not self._pending:
            return
        now, still = time.monotonic(), []
        for item in self._pending:
            entry = self.table.get(item.pull.transfer_id)
            if entry is None:
                self.refuse(
                    item.identity,
                    item.pull,
                    ErrorCode.NOT_FOUND,
                    "unknown transfer id: the embedding was dropped before it was ready",
                )
            elif entry.state != TransferState.WAITING_FOR_INPUT:
                self.serve(item.identity, item.pull, entry)
            elif now >= item.give_up_at:
                self.refuse(
                    item.identity,
                    item.pull,
                    ErrorCode.TIMEOUT,
                    f"embedding not ready within {self.config.pull_wait_s:.1f}s",
                )
            else:
                still.append(item)
        self._pending = still

    # ---- the serve path ---------------------------------------------------------------
    def serve(self, identity: bytes, pull: wire.Pull, entry: Entry) -> None:
        """Answer ``pull`` for a filled entry: ``pull.count`` chunks (0: all), each its own CHUNK."""
        aux = entry.aux
        if aux is None:
            raise RuntimeError("transfer has no aux record")
        tid, total, cap = pull.transfer_id, aux.total_tokens, pull.capacity_tokens
        if pull.sent_tokens >= total:
            self.refuse(
                identity,
                pull,
                ErrorCode.BAD_REQUEST,
                f"sent_tokens {pull.sent_tokens} is not below the total {total}",
            )
            return
        link = self._link(identity, pull)
        if link is None:
            return
        offsets = list(range(pull.sent_tokens, total, cap))
        if pull.count:
            offsets = offsets[: pull.count]
        if (pull.count and len(offsets) != pull.count) or (pull.runs and sum(pull.runs) != cap):
            self.refuse(
                identity,
                pull,
                ErrorCode.BAD_REQUEST,
                f"count {pull.count} / runs {sum(pull.runs)} do not fit {len(offsets)} chunk(s) "
                f"of capacity {cap} from token {pull.sent_tokens} of {total}",
            )
            return
        link.last_used = time.monotonic()
        try:
            link.wait_ready(self.config.bootstrap_timeout_s)
        except TransferError as exc:
            self.channels.close(pull.channel, str(exc))
            self.outbox.error(identity, tid, pull.seq, ErrorCode.UNAVAILABLE, str(exc))
            return
        plans = self._plans(link, pull, entry, offsets, total)
        first = next(plans)
        if pull.early and tuple(n for _, n in first.pieces) != pull.early:
            self.refuse(
                identity,
                pull,
                ErrorCode.BAD_REQUEST,
                f"early receives {list(pull.early)[:8]} do not match the first chunk's pieces (a stale or forged ref)",
            )
            return
        if not self._admit(identity, pull, entry, link, offsets, total):
            return
        self._send_chunks(identity, pull, entry, link, itertools.chain((first,), plans))

    def _send_chunks(
        self, identity: bytes, pull: wire.Pull, entry: Entry, link: SenderLink, plans: Iterator[PlannedChunk]
    ) -> None:
        """Per chunk: the link starts moving its pieces, then its CHUNK goes out (with the link's payload)."""
        aux = entry.aux
        for i, planned in enumerate(plans):
            try:
                payload = link.send(planned.pieces)
            except Exception as exc:
                self.channels.close(pull.channel, f"send failed: {exc}")
                raise
            pieces = tuple(planned.pieces) if link.names_pieces else ()
            first_aux = aux if planned.offset == 0 else None
            chunk = wire.Chunk(
                pull.transfer_id, pull.seq + i, planned.offset, planned.num_tokens, aux.total_tokens, first_aux, pieces
            )
            self.outbox.send(identity, chunk, payload)
        event = link.record()
        self.table.touch(entry, None if event is None else InFlight(event, link.link_id))

    def _admit(
        self, identity: bytes, pull: wire.Pull, entry: Entry, link: SenderLink, offsets: list[int], total: int
    ) -> bool:
        """Bind the transfer to this receiver and charge it the payload bytes, or answer why not."""
        end = min(offsets[-1] + pull.capacity_tokens, total)
        inline = link.kind is Transport.HOST  # only the host link's bytes ride in (and queue with) the frames
        nbytes = (end - pull.sent_tokens) * self.pool.bytes_per_token if inline else 0
        bound = self.config.unread_bound_tokens * self.pool.bytes_per_token
        refusal = self.table.admit(entry, identity, pull.sent_tokens, end, nbytes, bound)
        if refusal is None:
            return True
        code, why = refusal
        log.info("%s: PULL of %s (request %s) refused: %s", self.name, pull.transfer_id, entry.request_id, why)
        self.refuse(identity, pull, code, why)  # receives posted early are paired first
        return False

    def _link(self, identity: bytes, pull: wire.Pull) -> SenderLink | None:
        """The link ``pull`` names, or None after answering why it cannot be served."""
        tid, seq = pull.transfer_id, pull.seq
        if not pull.channel:
            if pull.transport is not Transport.HOST or pull.count != 1:
                self.outbox.error(
                    identity,
                    tid,
                    seq,
                    ErrorCode.BAD_REQUEST,
                    f"transport {pull.transport.value!r} (count {pull.count}) without a channel is "
                    "not served here (host, count 1)",
                )
                return None
            return self.host_link
        link = self.channels.get(pull.channel)
        if link is None:
            self.outbox.error(
                identity,
                tid,
                seq,
                ErrorCode.UNKNOWN_CHANNEL,
                f"unknown channel {pull.channel[:8]} (closed or never opened here): bootstrap again",
            )
            return None
        problem = ""
        if link.kind is not pull.transport:
            problem = f"channel {pull.channel[:8]} is {link.kind.value!r}, the PULL says {pull.transport.value!r}"
        elif link.ordered and pull.op_seq != link.ops:
            problem = (
                f"channel {pull.channel[:8]} out of order: the receiver posted {pull.op_seq} chunk(s), "
                f"this sender {link.ops}; the channel is given up"
            )
        if problem:
            self.channels.close(pull.channel, problem)
            self.outbox.error(identity, tid, seq, ErrorCode.UNAVAILABLE, problem)
            return None
        return link

    def _plans(
        self, link: SenderLink, pull: wire.Pull, entry: Entry, offsets: list[int], total: int
    ) -> Iterator[PlannedChunk]:
        """Each chunk's pieces: the sender's block runs cut at the receiver's window runs."""
        cap, limit = pull.capacity_tokens, wire.MAX_PIECES if link.names_pieces else 1 << 62

        def plan(offset: int) -> PlannedChunk:
            n = wire.chunk_tokens(total, offset, cap)
            segs = self.pool.segments(entry.blocks, n, offset)
            return PlannedChunk(offset, n, wire.split_pieces([(s.pool_row, s.length) for s in segs], pull.runs, limit))

        # A chunk has at most (its blocks + 1) sender runs, cut at most len(runs) more times; when
        # that bound fits, no plan can fail, so each chunk is planned just before it is sent (the
        # first bytes move sooner). Otherwise everything is planned first: an ERROR must come
        # before anything was sent, or the link's pairing would break.
        if cap // self.pool.block_tokens + 2 + len(pull.runs) <= limit:
            return (plan(offset) for offset in offsets)
        return iter([plan(offset) for offset in offsets])
