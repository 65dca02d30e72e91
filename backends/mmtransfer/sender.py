"""The sender (encoder) side: owns embeddings in its pool and serves pulls for them.

One ``SenderEndpoint`` per encoder instance. Request threads call ``register`` (or
``reserve`` then ``fill`` when the EMBED_REF must go out before encoding ends); a
single server thread answers PULL/DONE/ABORT on a ZeroMQ ROUTER socket in arrival
order, which is also the order in which out-of-band transports post their sends.

Every block is freed exactly once: on DONE, on ABORT, when ``fill`` fails, when the
TTL expires before the receiver finished, or at ``close``. With a GPU transport a block is
freed only once the sends that read it completed (a CUDA event per PULL, polled by the
server thread: the free is deferred, never a blocking sync).

GPU transports: a receiver opens a channel with BOOTSTRAP (see ``channels.py``); the endpoint
negotiates the transport (``transport.negotiate``), forms the channel, and serves that
channel's PULLs in arrival order, posting the sends of every chunk on the channel's stream.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import zmq

from . import protocol as wire
from .channels import SenderChannel, open_sender_channel, set_thread_device
from .config import TransferConfig
from .errors import AuthenticationError, ProtocolError, RequestTooLarge, TransferAborted, TransferError
from .observer import TransferObserver
from .pool import DTYPE_NAMES, BlockPool
from .protocol import Aux, ErrorCode, TransferState
from .ref import EmbedRef, new_transfer_id
from .transport import HostTransport, Transport, negotiate

log = logging.getLogger(__name__)
MAX_PENDING_PULLS = 4096
MAX_CHANNELS = 1024
# A channel no PULL used for this long is closed (its communicator aborted): a receiver that went away without
# a CLOSE (killed) must not hold NCCL resources here forever; a receiver that comes back after a long pause
# finds its channel unknown and reopens it transparently. When MAX_CHANNELS are open, the least recently
# used idle one makes room for a new one.
CHANNEL_IDLE_S = 900.0
# Ids of transfers that ended (done, aborted, reclaimed), remembered so that a late pull gets a clear
# answer ("reclaimed after ttl_s") rather than a bare "unknown"; bounded, oldest forgotten first.
MAX_ENDED_IDS = 8192
# Inbound ZeroMQ messages larger than this are refused by the socket itself (the peer is disconnected):
# a control frame is at most MAX_FRAME_BYTES; the slack lets an oversized frame be answered clearly.
MAX_INBOUND_BYTES = 16 * wire.MAX_FRAME_BYTES
_REJECT_LOG_EVERY_S = 10.0
_TICK_S = 0.05


@dataclass
class _Entry:
    transfer_id: str
    request_id: str
    expires_at: float
    state: TransferState = TransferState.WAITING_FOR_INPUT
    blocks: list[int] = field(default_factory=list)
    aux: Aux | None = None
    in_flight: Any = None  # CUDA event: the last sends reading these blocks (GPU transports)
    in_flight_channel: str = ""  # the channel those sends were posted on
    release: Callable[[list[int]], None] | None = None  # who takes the blocks back (default: the pool)


@dataclass
class _PendingPull:
    identity: bytes
    pull: wire.Pull
    give_up_at: float


class SenderEndpoint:
    """Serves the embeddings of one encoder instance to any number of receivers."""

    def __init__(
        self,
        pool: BlockPool,
        config: TransferConfig,
        transport: Transport | None = None,
        observer: TransferObserver | None = None,
        name: str = "sender",
    ) -> None:
        self.pool = pool
        self.config = config
        self.transport = transport or HostTransport()
        self.observer = observer or TransferObserver()
        self.name = name
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._pending: list[_PendingPull] = []
        self._channels: dict[str, SenderChannel] = {}
        # (event, blocks, since, release, channel id): blocks freed once the sends reading them completed
        self._deferred: list[tuple[Any, list[int], float, Any, str]] = []
        self._device_info = None
        self._key = config.auth_key
        self._ended: OrderedDict[str, str] = OrderedDict()  # transfer id -> why it ended
        self.rejected_frames = 0  # malformed, unauthenticated or unexpected frames answered with ERROR
        self._reject_log = (0.0, 0)  # (window start, frames rejected in it): rate-limited warnings
        self._idle_checked = 0.0
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, MAX_INBOUND_BYTES)
        bind = f"tcp://{config.control_host}"
        if config.control_port:
            self._router.bind(f"{bind}:{config.control_port}")
            self.port = config.control_port
        else:
            self.port = self._router.bind_to_random_port(bind)
        wake_addr = f"inproc://wake-{id(self)}"
        self._wake_rx = self._ctx.socket(zmq.PULL)
        self._wake_rx.bind(wake_addr)
        self._wake_tx = self._ctx.socket(zmq.PUSH)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.connect(wake_addr)
        self._wake_lock = threading.Lock()  # zmq sockets are not thread-safe
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"{name}-control", daemon=True)
        self._thread.start()
        log.info("%s: serving pulls at %s%s", name, self.address,
                 " (control frames authenticated with the shared secret)" if self._key else "")

    @property
    def address(self) -> str:
        return f"tcp://{self.config.reachable_host}:{self.port}"

    # ---- request-thread API -------------------------------------------------------------
    def reserve(self, request_id: str = "", num_tokens_hint: int = 0) -> EmbedRef:
        """Publish a transfer id before the embedding exists; pulls for it wait (bounded)."""
        tid = new_transfer_id()
        with self._lock:
            self._entries[tid] = _Entry(tid, request_id, time.monotonic() + self.config.ttl_s)
        return EmbedRef(tid, self.address, num_tokens_hint)

    def fill(self, transfer_id: str, embedding: torch.Tensor, extras: dict[str, list[int]] | None = None) -> None:
        """Copy ``embedding`` ([N, hidden]) into N/block_tokens freshly allocated blocks.

        Allocates by the actual length, waiting up to ``alloc_timeout_s`` for space.
        On any failure the reservation is dropped (waiting pulls get an error) and
        nothing stays allocated.
        """
        blocks: list[int] = []
        try:
            blocks, aux = self.write_blocks(embedding, extras)
            self._publish(transfer_id, blocks, aux, None)
            blocks = []
        except BaseException:
            if blocks:
                self.pool.free(blocks)
            self.discard(transfer_id, "fill failed")
            raise

    def write_blocks(
        self, embedding: torch.Tensor, extras: dict[str, list[int]] | None = None
    ) -> tuple[list[int], Aux]:
        """Allocate blocks by the embedding's actual length and write it and its aux there.

        The caller owns the blocks (``fill`` publishes them; a cache may keep them and
        ``publish`` them again and again). Nothing stays allocated if this raises."""
        num_tokens = self._check_embedding(embedding)
        blocks = self.pool.alloc_wait(self.pool.blocks_for(num_tokens), self.config.alloc_timeout_s)
        try:
            self.pool.scatter(blocks, embedding)
            aux = Aux(num_tokens, self.pool.hidden, DTYPE_NAMES[self.pool.dtype], dict(extras or {}))
            self.pool.write_aux(blocks[0], aux.to_bytes())
            if self.pool.device.type == "cuda":
                torch.cuda.current_stream(self.pool.device).synchronize()
        except BaseException:
            self.pool.free(blocks)
            raise
        return blocks, aux

    def publish(
        self,
        blocks: list[int],
        num_tokens: int,
        extras: dict[str, list[int]] | None,
        release: Callable[[list[int]], None],
        request_id: str = "",
    ) -> EmbedRef:
        """Serve an embedding that already sits in ``blocks`` of this pool (e.g. cached).

        The endpoint does not own the blocks: ``release(blocks)`` is called exactly once
        when the transfer ends (DONE, ABORT, TTL, discard or close), after any send that
        reads them has completed.
        """
        if not 1 <= num_tokens <= len(blocks) * self.pool.block_tokens:
            raise ValueError(f"{num_tokens} tokens do not fit {len(blocks)} block(s)")
        ref = self.reserve(request_id, num_tokens)
        aux = Aux(num_tokens, self.pool.hidden, DTYPE_NAMES[self.pool.dtype], dict(extras or {}))
        try:
            self._publish(ref.transfer_id, blocks, aux, release)
        except BaseException:
            self.discard(ref.transfer_id, "publish failed")
            raise
        return ref

    def _publish(self, transfer_id: str, blocks: list[int], aux: Aux, release: Any) -> None:
        with self._lock:
            entry = self._entries.get(transfer_id)
            if entry is None or entry.state != TransferState.WAITING_FOR_INPUT:
                raise TransferAborted(f"transfer {transfer_id} was aborted or expired before it was filled")
            entry.blocks, entry.aux, entry.release = blocks, aux, release
            entry.state = TransferState.TRANSFERRING
            entry.expires_at = time.monotonic() + self.config.ttl_s
        self.observer.pool_changed()
        self._wake()

    def register(
        self, embedding: torch.Tensor, extras: dict[str, list[int]] | None = None, request_id: str = ""
    ) -> EmbedRef:
        """``reserve`` + ``fill``: returns the EMBED_REF for a ready embedding."""
        ref = self.reserve(request_id, int(embedding.shape[0]) if embedding.dim() == 2 else 0)
        self.fill(ref.transfer_id, embedding, extras)
        return ref

    def discard(self, transfer_id: str, reason: str = "discarded") -> bool:
        """Drop a transfer and free its blocks; pulls waiting for it get an error."""
        with self._lock:
            entry = self._entries.pop(transfer_id, None)
            if entry is not None:
                self._remember(transfer_id, f"dropped ({reason[:200]})")
        if entry is None:
            return False
        self._release(entry)
        log.info("%s: transfer %s (request %s) dropped: %s", self.name, transfer_id, entry.request_id, reason)
        self._wake()
        return True

    def state(self, transfer_id: str) -> TransferState | None:
        with self._lock:
            entry = self._entries.get(transfer_id)
            return entry.state if entry else None

    @property
    def active_transfers(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        """Stop serving and free every block still held."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake()
        self._thread.join(timeout=5)
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
            deferred, self._deferred = self._deferred, []
        for entry in entries:
            if entry.blocks:
                (entry.release or self.pool.free)(entry.blocks)
        for _event, blocks, _since, release, _channel in deferred:
            release(blocks)
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        for sock in (self._router, self._wake_rx, self._wake_tx):
            sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> "SenderEndpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- server thread ------------------------------------------------------------------
    def _wake(self) -> None:
        with self._wake_lock:
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # a wake-up is already queued, or the endpoint is closed

    def _release(self, entry: _Entry) -> None:
        """Free an entry's blocks now, or once the sends that read them completed."""
        if not entry.blocks:
            return
        event, entry.in_flight = entry.in_flight, None
        release = entry.release or self.pool.free
        if event is not None and not _completed(event):
            with self._lock:
                self._deferred.append((event, entry.blocks, time.monotonic(), release, entry.in_flight_channel))
            return
        release(entry.blocks)
        self.observer.pool_changed()

    def _free_deferred(self) -> None:
        if not self._deferred:
            return
        now, freed, stuck = time.monotonic(), [], set()
        with self._lock:
            still = []
            for item in self._deferred:
                event, blocks, since, release, channel_id = item
                if _completed(event):
                    freed.append((blocks, release))
                elif now - since > self.config.pull_timeout_s:
                    # sends that never complete: the receiver is gone or its communicator hangs. Abort the
                    # channel (ncclCommAbort stops its kernels; the receiver's next pull opens a new one),
                    # then the blocks can be reused.
                    log.warning("%s: sends on %d block(s) not complete after %.0fs (pull_timeout_s); aborting "
                                "channel %s and freeing them", self.name, len(blocks), now - since, channel_id[:8])
                    stuck.add(channel_id)
                    freed.append((blocks, release))
                else:
                    still.append(item)
            self._deferred = still
        for channel_id in stuck:
            self._close_channel(channel_id, "sends did not complete within pull_timeout_s")
        for blocks, release in freed:
            release(blocks)
        if freed:
            self.observer.pool_changed()

    def _serve(self) -> None:
        set_thread_device(self.pool.device)  # events, streams and NCCL calls of this thread
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(int(_TICK_S * 1000)))
            if self._wake_rx in events:
                while self._wake_rx.poll(0):
                    self._wake_rx.recv()
            if self._router in events:
                for _ in range(256):  # bounded batch, so timers still run under load
                    try:
                        frames = self._router.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    self._handle(frames)
            self._serve_pending()
            self._reap_expired()
            self._free_deferred()
            self._reap_idle_channels()

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return  # not a DEALER frame set; nothing to answer to
        identity, header = frames[0], frames[1]
        try:
            msg = wire.decode(header, self._key)
        except ProtocolError as exc:
            auth = isinstance(exc, AuthenticationError)
            self._rejected(f"rejected {'unauthenticated' if auth else 'malformed'} control frame: {exc}")
            self._reply_error(identity, "", 0, ErrorCode.UNAUTHENTICATED if auth else ErrorCode.BAD_REQUEST, str(exc))
            return
        try:
            if isinstance(msg, wire.Pull):
                self._on_pull(identity, msg)
            elif isinstance(msg, wire.Done):
                self._on_done(identity, msg)
            elif isinstance(msg, wire.Abort):
                self.discard(msg.transfer_id, f"aborted by receiver: {msg.reason}")
            elif isinstance(msg, wire.Bootstrap):
                self._on_bootstrap(identity, msg)
            elif isinstance(msg, wire.Close):
                self._close_channel(msg.channel, f"closed by receiver: {msg.reason}")
            else:
                self._rejected(f"rejected unexpected {msg.TYPE.name} frame")
                self._reply_error(identity, "", 0, ErrorCode.BAD_REQUEST, f"unexpected {msg.TYPE.name}")
        except Exception as exc:  # the endpoint must keep serving whatever one message does
            log.exception("%s: failed handling %s", self.name, type(msg).__name__)
            self._reply_error(identity, getattr(msg, "transfer_id", ""), 0, ErrorCode.INTERNAL, str(exc)[:500])

    def _rejected(self, message: str) -> None:
        """Count a rejected frame; warn about the first few of every window, not about each of a flood."""
        self.rejected_frames += 1
        now = time.monotonic()
        start, count = self._reject_log
        if now - start > _REJECT_LOG_EVERY_S:
            if count > 5:
                log.warning("%s: %d more control frame(s) rejected in the last %.0fs", self.name, count - 5,
                            _REJECT_LOG_EVERY_S)
            start, count = now, 0
        count += 1
        self._reject_log = (start, count)
        if count <= 5:
            log.warning("%s: %s", self.name, message)

    def _remember(self, transfer_id: str, why: str) -> None:
        """Call with ``self._lock`` held: remember how a transfer ended (bounded)."""
        self._ended[transfer_id] = why
        while len(self._ended) > MAX_ENDED_IDS:
            self._ended.popitem(last=False)

    def _reply_unknown(self, identity: bytes, tid: str, seq: int) -> None:
        with self._lock:
            why = self._ended.get(tid)
        if why == "expired":
            self._reply_error(identity, tid, seq, ErrorCode.EXPIRED,
                              f"transfer reclaimed: not pulled within ttl_s={self.config.ttl_s:g}s")
        elif why:
            self._reply_error(identity, tid, seq, ErrorCode.NOT_FOUND, f"unknown transfer id: it was {why}")
        else:
            self._reply_error(identity, tid, seq, ErrorCode.NOT_FOUND,
                              "unknown transfer id (never registered, finished, or expired)")

    def _on_pull(self, identity: bytes, pull: wire.Pull) -> None:
        with self._lock:
            entry = self._entries.get(pull.transfer_id)
        if entry is None:
            self._reply_unknown(identity, pull.transfer_id, pull.seq)
        elif entry.state == TransferState.WAITING_FOR_INPUT:
            if len(self._pending) >= MAX_PENDING_PULLS:
                self._reply_error(identity, pull.transfer_id, pull.seq, ErrorCode.BUSY, "too many waiting pulls")
                return
            self._pending.append(_PendingPull(identity, pull, time.monotonic() + self.config.pull_wait_s))
        else:
            self._send_chunk(identity, pull, entry)

    def _send_chunk(self, identity: bytes, pull: wire.Pull, entry: _Entry) -> None:
        aux = entry.aux
        if aux is None:
            raise RuntimeError("transfer has no aux record")
        total = aux.total_tokens
        if pull.sent_tokens >= total:
            self._reply_error(identity, pull.transfer_id, pull.seq, ErrorCode.BAD_REQUEST,
                              f"sent_tokens {pull.sent_tokens} is not below the total {total}")
            return
        if pull.channel:
            self._send_on_channel(identity, pull, entry, aux)
            return
        if pull.transport != self.transport.name or pull.count != 1:
            self._reply_error(identity, pull.transfer_id, pull.seq, ErrorCode.BAD_REQUEST,
                              f"transport {pull.transport!r} (count {pull.count}) without a channel is not served "
                              f"here ({self.transport.name!r}, count 1)")
            return
        n = wire.chunk_tokens(total, pull.sent_tokens, pull.capacity_tokens)
        payload = self.transport.send_chunk(identity.hex(), self.pool, entry.blocks, pull.sent_tokens, n)
        chunk = wire.Chunk(pull.transfer_id, pull.seq, pull.sent_tokens, n, total,
                           aux if pull.sent_tokens == 0 else None)
        self._router.send_multipart([identity, wire.encode(chunk, self._key), *payload], copy=False)
        with self._lock:
            entry.expires_at = time.monotonic() + self.config.ttl_s

    def _send_on_channel(self, identity: bytes, pull: wire.Pull, entry: _Entry, aux: Aux) -> None:
        """Serve ``pull.count`` consecutive chunks over a GPU channel: per chunk, post its sends
        (one NCCL group) and answer with a CHUNK naming its pieces; one event covers them all."""
        tid, total, cap = pull.transfer_id, aux.total_tokens, pull.capacity_tokens
        channel = self._channels.get(pull.channel)
        problem = ""
        if channel is None:
            problem = f"unknown channel {pull.channel[:8]} (closed or never opened here): bootstrap again"
        elif channel.transport != pull.transport:
            problem = f"channel {pull.channel[:8]} is {channel.transport!r}, the PULL says {pull.transport!r}"
        elif channel.transport == "nccl" and pull.op_seq != channel.ops:
            problem = (f"channel {pull.channel[:8]} out of order: the receiver posted {pull.op_seq} chunk(s), "
                       f"this sender {channel.ops}; the channel is given up")
        if problem:
            if channel is not None:
                self._close_channel(pull.channel, problem)
            self._reply_error(identity, tid, pull.seq, ErrorCode.UNAVAILABLE, problem)
            return
        offsets = list(range(pull.sent_tokens, total, cap))
        if pull.count:
            offsets = offsets[: pull.count]
        if (pull.count and len(offsets) != pull.count) or (pull.runs and sum(pull.runs) != cap):
            self._reply_error(identity, tid, pull.seq, ErrorCode.BAD_REQUEST,
                              f"count {pull.count} / runs {sum(pull.runs)} do not fit {len(offsets)} chunk(s) "
                              f"of capacity {cap} from token {pull.sent_tokens} of {total}")
            return
        channel.last_used = time.monotonic()
        try:
            channel.wait_ready(self.config.bootstrap_timeout_s)
        except TransferError as exc:
            self._close_channel(pull.channel, str(exc))
            self._reply_error(identity, tid, pull.seq, ErrorCode.UNAVAILABLE, str(exc))
            return
        def plan(offset: int) -> tuple[int, int, list[tuple[int, int]]]:
            n = wire.chunk_tokens(total, offset, cap)
            segs = self.pool.segments(entry.blocks, n, offset)
            return offset, n, wire.split_pieces([(s.pool_row, s.length) for s in segs], pull.runs)

        # A chunk has at most (its blocks + 1) sender runs, cut at most len(runs) more times; when
        # that bound fits, no plan can fail, so each chunk is planned just before it is sent (the
        # first bytes move sooner). Otherwise everything is planned first: an ERROR must come
        # before anything was sent, or the channel's pairing would break.
        if cap // self.pool.block_tokens + 2 + len(pull.runs) <= wire.MAX_PIECES:
            plans = (plan(offset) for offset in offsets)
        else:
            plans = iter([plan(offset) for offset in offsets])
        for i, (offset, n, pieces) in enumerate(plans):
            try:
                channel.send(pieces)
            except Exception as exc:
                self._close_channel(pull.channel, f"send failed: {exc}")
                raise
            chunk = wire.Chunk(tid, pull.seq + i, offset, n, total, aux if offset == 0 else None, tuple(pieces))
            self._router.send_multipart([identity, wire.encode(chunk, self._key)])
        event = channel.record()
        with self._lock:
            if event is not None:
                entry.in_flight, entry.in_flight_channel = event, pull.channel
            entry.expires_at = time.monotonic() + self.config.ttl_s

    # ---- channels -----------------------------------------------------------------------
    def _device(self):
        if self._device_info is None:
            from .cuda import device_info

            self._device_info = device_info(self.pool.device)
        return self._device_info

    def _on_bootstrap(self, identity: bytes, msg: wire.Bootstrap) -> None:
        from .cuda import DeviceInfo

        mine = self._device()
        theirs = DeviceInfo(msg.device_kind, msg.device_uuid, msg.host)
        try:
            choice = negotiate(self.config.transport, msg.transport, mine, theirs)
        except TransferError as exc:
            self._reply_error(identity, "", 0, ErrorCode.UNAVAILABLE, str(exc))
            return
        extra: dict[str, Any] = {}
        if choice != "host":
            if len(self._channels) >= MAX_CHANNELS:
                self._evict_lru_channel()
            if msg.channel in self._channels or len(self._channels) >= MAX_CHANNELS:
                self._reply_error(identity, "", 0, ErrorCode.BUSY, "channel id in use or too many channels")
                return
            try:
                channel = open_sender_channel(choice, msg.channel, self.pool, self.config.bootstrap_timeout_s)
            except Exception as exc:
                log.warning("%s: cannot open a %s channel: %s", self.name, choice, exc)
                self._reply_error(identity, "", 0, ErrorCode.UNAVAILABLE,
                                  f"cannot open a {choice} channel: {type(exc).__name__}: {exc}")
                return
            self._channels[msg.channel] = channel
            extra = channel.ack_fields()
            log.info("%s: opening %s channel %s for a receiver on %s %s", self.name, choice, msg.channel[:8],
                     msg.device_kind, msg.device_uuid)
        ack = wire.BootstrapAck(msg.channel, choice, mine.kind, mine.uuid[:64], mine.host[:128], **extra)
        self._router.send_multipart([identity, wire.encode(ack, self._key)])

    def _channel_busy(self, channel_id: str) -> bool:
        """Sends still in flight on the channel (blocks waiting for their completion)."""
        with self._lock:
            return any(item[4] == channel_id for item in self._deferred) or any(
                e.in_flight is not None and e.in_flight_channel == channel_id for e in self._entries.values())

    def _reap_idle_channels(self) -> None:
        if not self._channels:
            return
        now = time.monotonic()
        if now - self._idle_checked < 1.0:
            return
        self._idle_checked = now
        for channel_id, channel in list(self._channels.items()):
            if now - channel.last_used > CHANNEL_IDLE_S and not self._channel_busy(channel_id):
                self._close_channel(channel_id, f"idle for {now - channel.last_used:.0f}s")

    def _evict_lru_channel(self) -> None:
        idle = [(c.last_used, cid) for cid, c in self._channels.items() if not self._channel_busy(cid)]
        if idle:
            self._close_channel(min(idle)[1], f"least recently used of {MAX_CHANNELS} channels")

    def _close_channel(self, channel_id: str, reason: str) -> None:
        channel = self._channels.pop(channel_id, None)
        if channel is not None:
            log.warning("%s: %s channel %s closed: %s", self.name, channel.transport, channel_id[:8], reason)
            channel.close()

    def _on_done(self, identity: bytes, done: wire.Done) -> None:
        with self._lock:
            entry = self._entries.pop(done.transfer_id, None)
            if entry is not None:
                self._remember(done.transfer_id, "completed already")
        if entry is None:
            self._reply_unknown(identity, done.transfer_id, done.seq)
            return
        entry.state = TransferState.SUCCESS
        self._release(entry)
        self._router.send_multipart([identity, wire.encode(wire.Ack(done.transfer_id, done.seq), self._key)])

    def _serve_pending(self) -> None:
        if not self._pending:
            return
        now, still = time.monotonic(), []
        for item in self._pending:
            with self._lock:
                entry = self._entries.get(item.pull.transfer_id)
            if entry is None:
                self._reply_error(item.identity, item.pull.transfer_id, item.pull.seq, ErrorCode.NOT_FOUND,
                                  "unknown transfer id: the embedding was dropped before it was ready")
            elif entry.state != TransferState.WAITING_FOR_INPUT:
                self._send_chunk(item.identity, item.pull, entry)
            elif now >= item.give_up_at:
                self._reply_error(item.identity, item.pull.transfer_id, item.pull.seq, ErrorCode.TIMEOUT,
                                  f"embedding not ready within {self.config.pull_wait_s:.1f}s")
            else:
                still.append(item)
        self._pending = still

    def _reap_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [e for e in self._entries.values() if e.expires_at <= now]
            for entry in expired:
                del self._entries[entry.transfer_id]
                self._remember(entry.transfer_id, "expired")
        for entry in expired:
            nblocks = len(entry.blocks)
            self._release(entry)
            log.warning("%s: transfer %s (request %s) not pulled within TTL %.1fs; reclaimed %d block(s)",
                        self.name, entry.transfer_id, entry.request_id, self.config.ttl_s, nblocks)
            self.observer.transfer_failed("ttl")
            self.observer.pool_changed()

    def _reply_error(self, identity: bytes, tid: str, seq: int, code: str, message: str) -> None:
        msg = wire.Error(tid, seq, code, "".join(c if " " <= c <= "~" else "?" for c in message)[:512])
        self._router.send_multipart([identity, wire.encode(msg, self._key)])

    def _check_embedding(self, embedding: torch.Tensor) -> int:
        if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2:
            raise ValueError("embedding must be a 2-D tensor [tokens, hidden]")
        num_tokens, hidden = embedding.shape
        if hidden != self.pool.hidden:
            raise ValueError(f"embedding hidden size {hidden} does not match the pool's {self.pool.hidden}")
        if embedding.dtype != self.pool.dtype:
            raise ValueError(f"embedding dtype {embedding.dtype} does not match the pool's {self.pool.dtype}")
        if num_tokens < 1:
            raise ValueError("embedding has no tokens")
        if num_tokens > self.config.max_embed_tokens:
            raise RequestTooLarge(
                f"embedding of {num_tokens} tokens exceeds max_embed_tokens={self.config.max_embed_tokens}"
            )
        return int(num_tokens)


def _completed(event: Any) -> bool:
    """Whether a CUDA event completed; an event that cannot be queried any more (its context or
    communicator failed) counts as complete: nothing will read the blocks after that."""
    try:
        return bool(event.query())
    except Exception:  # noqa: BLE001 - a failed query must not stop the control thread
        return True
