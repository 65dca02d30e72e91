"""Chunk arithmetic: which tokens each chunk of a pull carries, and how a chunk is cut into
pieces contiguous in both the sender's pool and the receiver's window."""

from __future__ import annotations

from typing import Sequence

from ..errors import ProtocolError
from .fields import MAX_PIECES


def chunk_tokens(total_tokens: int, sent_tokens: int, capacity_tokens: int) -> int:
    """Tokens in the chunk answering PULL(sent_tokens, capacity): ``min(remaining, capacity)``."""
    if not 0 <= sent_tokens < total_tokens or capacity_tokens < 1:
        raise ValueError(f"no chunk at {sent_tokens}/{total_tokens} with capacity {capacity_tokens}")
    return min(total_tokens - sent_tokens, capacity_tokens)


def chunk_plan(total_tokens: int, capacity_tokens: int) -> list[tuple[int, int]]:
    """Every (offset, num_tokens) the pull sequence moves for an embedding; the first
    is the initial chunk, the rest are continuations (``len - 1`` of them)."""
    plan, sent = [], 0
    while sent < total_tokens:
        n = chunk_tokens(total_tokens, sent, capacity_tokens)
        plan.append((sent, n))
        sent += n
    return plan


def _cuts(runs: Sequence[int]) -> list[int]:
    cuts, acc = [], 0
    for n in runs:
        acc += n
        cuts.append(acc)
    return cuts


def split_pieces(src: list[tuple[int, int]], dst_runs: Sequence[int], limit: int = MAX_PIECES) -> list[tuple[int, int]]:
    """Cut the sender's contiguous runs ``src`` ((pool row, length), in token order) at the
    receiver's run boundaries ``dst_runs`` (lengths, in token order): the union of both sides'
    boundaries. Returns (sender pool row, length) pieces; each is contiguous on both sides.
    Empty ``dst_runs`` means the receiver side is one contiguous run. More than ``limit``
    pieces (they must fit a CHUNK frame) is a ProtocolError."""
    total = sum(n for _, n in src)
    if dst_runs and sum(dst_runs) < total:
        raise ProtocolError(f"receiver runs cover {sum(dst_runs)} tokens, the chunk has {total}")
    cuts = _cuts(dst_runs)
    out: list[tuple[int, int]] = []
    token, ci = 0, 0
    for row, length in src:
        start, end = token, token + length
        while token < end:
            while ci < len(cuts) and cuts[ci] <= token:
                ci += 1
            nxt = min(cuts[ci], end) if ci < len(cuts) else end
            out.append((row + token - start, nxt - token))
            token = nxt
    if len(out) > limit:
        raise ProtocolError(f"chunk splits into {len(out)} pieces, more than {limit}: use larger blocks")
    return out


def check_pieces(pieces: Sequence[tuple[int, int]], num_tokens: int, dst_runs: Sequence[int]) -> None:
    """Receiver side: the pieces cover exactly ``num_tokens`` and none crosses a receiver run."""
    if sum(n for _, n in pieces) != num_tokens:
        raise ProtocolError(f"chunk pieces cover {sum(n for _, n in pieces)} tokens, expected {num_tokens}")
    cuts = _cuts(dst_runs)
    token, ci = 0, 0
    for _, n in pieces:
        while ci < len(cuts) and cuts[ci] <= token:
            ci += 1
        if ci < len(cuts) and token + n > cuts[ci]:
            raise ProtocolError(f"chunk piece [{token}, {token + n}) crosses a receiver block boundary at {cuts[ci]}")
        token += n


def merge_runs(runs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(pool row, length) runs in token order with neighbours that continue each other joined."""
    out: list[tuple[int, int]] = []
    for row, n in runs:
        if out and out[-1][0] + out[-1][1] == row:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((row, n))
    return out


def slice_runs(runs: Sequence[tuple[int, int]], offset: int, num_tokens: int) -> list[tuple[int, int]]:
    """The (pool row, length) runs holding tokens ``[offset, offset + num_tokens)`` of an embedding whose
    tokens lie in ``runs`` (token order); a range outside them is a ProtocolError."""
    out, token, end = [], 0, offset + num_tokens
    for row, n in runs:
        lo, hi = max(offset, token), min(end, token + n)
        if lo < hi:
            out.append((row + lo - token, hi - lo))
        token += n
    if offset < 0 or num_tokens < 1 or end > token:
        raise ProtocolError(f"tokens [{offset}, {end}) are not inside runs of {token} tokens")
    return out


def chunk_pieces(
    rows: Sequence[tuple[int, int]], offset: int, num_tokens: int, dst_runs: Sequence[int], limit: int = MAX_PIECES
) -> list[tuple[int, int]]:
    """The pieces of the chunk at ``offset``: what the sender derives from its blocks and a receiver from
    an EMBED_REF's rows (the same function over the same data, so both sides agree without a message)."""
    return split_pieces(slice_runs(rows, offset, num_tokens), dst_runs, limit)
