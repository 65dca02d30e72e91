"""The block pool: one preallocated buffer per instance, lent out block by block.

``storage`` is ``[num_blocks, block_tokens, hidden]`` on the instance's device (a
CUDA tensor works unchanged; on the CPU it lives in a memfd region, ``memfd.py``, that the
shm transport maps in another process). An embedding's aux record (length, layout, extras) is not
stored here: the sender keeps it with the transfer and sends it with the first chunk.

An allocation is a list of block ids; token ``t`` of an allocation lives in block
``ids[t // block_tokens]`` at row ``t % block_tokens``. Blocks need not be
contiguous: copies go segment by segment (``segments``), merging neighbouring
blocks, so there is no external fragmentation.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .allocator import Allocator, BlockAllocator, FixedSlotAllocator
from .errors import PoolExhausted, RequestTooLarge
from .memfd import Region, shared_empty

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class Segment:
    """A contiguous run of pool rows: flat rows ``[pool_row, pool_row + length)`` hold
    tokens ``[token, token + length)`` of the allocation."""

    pool_row: int
    token: int
    length: int


class BlockPool:
    """Preallocated embedding storage plus a thread-safe allocator with bounded waits."""

    def __init__(
        self,
        num_blocks: int,
        block_tokens: int,
        hidden: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        *,
        block_allocator: bool = True,
        slot_blocks: int | None = None,
        name: str = "pool",
    ) -> None:
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.name = name
        self.block_tokens = block_tokens
        self.hidden = hidden
        self.dtype = dtype
        shape = (num_blocks, block_tokens, hidden)
        # Every CPU pool lives in a memfd region: another process on this host can map it (the shm transport)
        self.region: Region | None = None
        if torch.device(device).type == "cpu":
            self.storage, self.region = shared_empty(shape, dtype, self)
        else:
            self.storage = torch.empty(shape, dtype=dtype, device=device)
        self._rows = self.storage.view(num_blocks * block_tokens, hidden)
        self.allocator: Allocator = (
            BlockAllocator(num_blocks) if block_allocator else FixedSlotAllocator(num_blocks, slot_blocks or num_blocks)
        )
        self._cond = threading.Condition()
        # Called with a block count when an allocation would wait; returns True if it freed
        # something (an embedding cache evicting idle entries, say).
        self.reclaimer: Callable[[int], bool] | None = None

    # ---- geometry -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.storage.device

    @property
    def total_blocks(self) -> int:
        return self.allocator.total_blocks

    @property
    def used_blocks(self) -> int:
        with self._cond:
            return self.allocator.used_blocks

    @property
    def max_alloc_blocks(self) -> int:
        return self.allocator.max_alloc_blocks

    @property
    def bytes_per_token(self) -> int:
        return self.hidden * self.storage.element_size()

    def blocks_for(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / self.block_tokens))

    # ---- allocation -----------------------------------------------------------------
    def alloc(self, n: int) -> list[int] | None:
        """``n`` block ids, or None when not enough are free now. Never waits."""
        with self._cond:
            return self.allocator.alloc(n)

    def alloc_wait(self, n: int, timeout_s: float, min_blocks: int | None = None) -> list[int]:
        """Allocate ``n`` blocks, waiting up to ``timeout_s`` for them to be freed.

        With ``min_blocks``, settle for fewer (but at least ``min_blocks``) when the
        pool is short, rather than wait: the receiver's window shrinks under pressure.
        Before waiting, the ``reclaimer`` (if set, e.g. an embedding cache) is asked to
        give back idle blocks. Raises PoolExhausted on timeout and RequestTooLarge if
        ``n`` can never fit.
        """
        n = min(n, self.allocator.max_alloc_blocks) if min_blocks is not None else n
        floor = n if min_blocks is None else max(1, min(min_blocks, n))
        if floor == n and n > self.allocator.max_alloc_blocks:
            raise RequestTooLarge(f"{self.name}: {n} blocks can never be allocated")
        deadline = time.monotonic() + timeout_s
        while True:
            with self._cond:
                ids = self._try_alloc(n, floor)
                if ids is not None:
                    return ids
            # Outside the pool lock: the reclaimer frees through pool.free and has its own lock.
            if self.reclaimer is not None and self.reclaimer(floor):
                continue
            with self._cond:
                ids = self._try_alloc(n, floor)
                if ids is not None:
                    return ids
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PoolExhausted(
                        f"{self.name} exhausted: no {floor} free block(s) within {timeout_s:g}s (alloc_timeout_s; "
                        f"{self.allocator.used_blocks}/{self.total_blocks} in use): too much load for pool_blocks"
                    )
                self._cond.wait(remaining)

    def _try_alloc(self, n: int, floor: int) -> list[int] | None:
        for count in range(n, floor - 1, -1):
            if self.allocator.can_alloc(count):
                return self.allocator.alloc(count)
        return None

    def free(self, ids: Sequence[int]) -> None:
        with self._cond:
            self.allocator.free(ids)
            self._cond.notify_all()

    # ---- data -----------------------------------------------------------------------
    def segments(self, ids: Sequence[int], num_tokens: int, token_offset: int = 0) -> list[Segment]:
        """Contiguous pool row runs covering tokens ``[token_offset, token_offset + num_tokens)``."""
        if num_tokens < 0 or token_offset < 0:
            raise ValueError("segments: negative token count or offset")
        if token_offset + num_tokens > len(ids) * self.block_tokens:
            raise RequestTooLarge(
                f"{self.name}: tokens [{token_offset}, {token_offset + num_tokens}) exceed "
                f"{len(ids)} block(s) of {self.block_tokens}"
            )
        # Plain ints in the loop and one Segment per run: this runs on the request path once per
        # chunk on each side, over up to thousands of blocks.
        out: list[Segment] = []
        token, end, bt = token_offset, token_offset + num_tokens, self.block_tokens
        block = token // bt
        run_row = run_tok = run_len = -1
        while token < end:
            row = token - block * bt
            length = min(bt - row, end - token)
            pool_row = ids[block] * bt + row
            if run_len > 0 and run_row + run_len == pool_row:
                run_len += length
            else:
                if run_len > 0:
                    out.append(Segment(run_row, run_tok, run_len))
                run_row, run_tok, run_len = pool_row, token, length
            token += length
            block += 1
        if run_len > 0:
            out.append(Segment(run_row, run_tok, run_len))
        return out

    def row_ptr(self, row: int) -> int:
        """Device address of flat pool row ``row`` (for transports that hand raw pointers to NCCL)."""
        return self.storage.data_ptr() + row * self.bytes_per_token

    def shm_export(self) -> dict[str, Any] | None:
        """What another process on this host needs to map the storage read-only (None: not shareable)."""
        if self.region is None:
            return None
        rows = self._rows
        return {
            **self.region.export(),
            "rows": int(rows.shape[0]),
            "hidden": self.hidden,
            "dtype": DTYPE_NAMES[self.dtype],
        }

    @property
    def flat_rows(self) -> torch.Tensor:
        """The whole storage as ``[num_blocks * block_tokens, hidden]`` (a view)."""
        return self._rows

    def rows(self, segment: Segment) -> torch.Tensor:
        """The pool rows of one segment, as a view (for transports that send in place)."""
        return self._rows[segment.pool_row : segment.pool_row + segment.length]

    def scatter(self, ids: Sequence[int], data: torch.Tensor, token_offset: int = 0) -> None:
        """Write ``data`` ([n, hidden]) into the allocation's tokens from ``token_offset``."""
        self._check_rows(data)
        base = token_offset
        for seg in self.segments(ids, data.shape[0], token_offset):
            start = seg.token - base
            self.rows(seg).copy_(data[start : start + seg.length], non_blocking=True)

    def gather(
        self, ids: Sequence[int], num_tokens: int, token_offset: int = 0, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Copy tokens ``[token_offset, token_offset + num_tokens)`` of the allocation out."""
        if out is None:
            out = torch.empty((num_tokens, self.hidden), dtype=self.dtype, device=self.device)
        self._check_rows(out, num_tokens)
        for seg in self.segments(ids, num_tokens, token_offset):
            start = seg.token - token_offset
            out[start : start + seg.length].copy_(self.rows(seg), non_blocking=True)
        return out

    def _check_rows(self, data: torch.Tensor, num_tokens: int | None = None) -> None:
        if data.dim() != 2 or data.shape[1] != self.hidden:
            raise ValueError(f"{self.name}: expected [tokens, {self.hidden}], got {tuple(data.shape)}")
        if num_tokens is not None and data.shape[0] != num_tokens:
            raise ValueError(f"{self.name}: expected {num_tokens} rows, got {data.shape[0]}")
        if data.dtype != self.dtype:
            raise ValueError(f"{self.name}: expected dtype {self.dtype}, got {data.dtype}")
