"""What the receiver's pulls share and return (``PullContext``, ``Received``), the retry signal
(``Reopen``), where a chunk's pieces land (``chunk_dests``), the aux check and the best-effort ABORT."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import zmq

from . import wire
from .config import TransferConfig
from .errors import ProtocolError, RequestTooLarge, TransferTimeout
from .observer import TransferObserver, TransferRecord
from .pool import DTYPE_NAMES, BlockPool, Segment
from .receiver_links import LinkTable
from .receiver_sockets import SocketPool
from .ref import EmbedRef
from .window import WindowPolicy


@dataclass(frozen=True)
class Received:
    """An assembled embedding and what it took to move it."""

    embedding: torch.Tensor
    aux: wire.Aux
    record: TransferRecord
    # where the time went, in microseconds from the pull's start (window, sent, first_chunk, posted, ready,
    # acked, and gpu_us on a GPU); for profiling and the benchmark
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PullContext:
    """What every pull of one receiver shares."""

    pool: BlockPool
    config: TransferConfig
    sockets: SocketPool
    links: LinkTable
    observer: TransferObserver
    window_policy: WindowPolicy
    name: str


class Reopen(Exception):
    """The sender does not know the channel (it restarted, or gave it up) and sent nothing: retry the
    pull once on a new channel; the embedding is still there."""


def chunk_dests(
    pool: BlockPool,
    out: torch.Tensor,
    window: list[int],
    win_segs: list[Segment],
    offset: int,
    num_tokens: int,
    pieces: Sequence[tuple[int, int]],
) -> list[torch.Tensor]:
    """Where each piece of the chunk ``[offset, offset + num_tokens)`` lands: slices of ``out`` (direct
    landing, no window segments) or rows of the window's blocks (one per piece, or per window run for a
    link that names no pieces)."""
    lengths = [n for _, n in pieces] or [num_tokens]
    if not win_segs:
        dests, token = [], offset
        for n in lengths:
            dests.append(out[token : token + n])
            token += n
        return dests
    if not pieces:
        return [pool.rows(seg) for seg in pool.segments(window, num_tokens)]
    rows, dests, token, si = pool.flat_rows, [], 0, 0
    for n in lengths:
        while win_segs[si].token + win_segs[si].length <= token:
            si += 1
        seg = win_segs[si]
        row = seg.pool_row + token - seg.token
        dests.append(rows[row : row + n])
        token += n
    return dests


def check_aux(aux: wire.Aux, pool: BlockPool, max_embed_tokens: int) -> None:
    """An embedding's aux record (a CHUNK's, or an EMBED_REF's) fits this pool and the configured maximum."""
    if aux.hidden != pool.hidden or aux.dtype != DTYPE_NAMES[pool.dtype]:
        raise ProtocolError(
            f"embedding is [{aux.hidden}] {aux.dtype}, this pool holds [{pool.hidden}] {DTYPE_NAMES[pool.dtype]}"
        )
    if aux.total_tokens > max_embed_tokens:
        raise RequestTooLarge(f"embedding of {aux.total_tokens} tokens exceeds max_embed_tokens={max_embed_tokens}")


def send_abort(sock: zmq.Socket, ref: EmbedRef, reason: str, key: bytes | None) -> None:
    try:
        sock.send(wire.encode(wire.Abort(ref.transfer_id, wire.printable(reason, 256)), key), zmq.NOBLOCK)
    except (zmq.ZMQError, ProtocolError):
        pass


def no_answer(tid: str, timeout_s: float) -> TransferTimeout:
    return TransferTimeout(f"transfer {tid}: no answer from the sender within {timeout_s:.1f}s")
