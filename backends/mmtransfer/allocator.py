"""Block allocators: which blocks of a pool belong to whom.

Pure bookkeeping over block indices, no tensors and no locking (the pool owns the
lock). Both allocators share one contract:

* ``alloc(n)`` returns ``n`` block ids, or ``None`` when not enough are free right
  now (the caller applies backpressure). It never raises on exhaustion; it raises
  ``RequestTooLarge`` for a request that could never be satisfied.
* ``free(ids)`` takes back exactly what one ``alloc`` returned; double frees, ids
  out of range and ids never handed out raise ``ValueError`` and change nothing.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol, Sequence

from .errors import RequestTooLarge


class Allocator(Protocol):
    total_blocks: int

    def alloc(self, n: int) -> list[int] | None: ...

    def free(self, ids: Sequence[int]) -> None: ...

    @property
    def used_blocks(self) -> int: ...

    @property
    def max_alloc_blocks(self) -> int: ...

    def can_alloc(self, n: int) -> bool: ...


class BlockAllocator:
    """Free list of block indices; allocations need not be contiguous.

    Freed blocks go to the back of the list and allocations take from the front
    (FIFO), so a block is reused as late as possible, which makes use-after-free
    bugs show up as wrong data in tests instead of hiding.
    """

    def __init__(self, total_blocks: int) -> None:
        if total_blocks < 1:
            raise ValueError(f"total_blocks must be >= 1, got {total_blocks}")
        self.total_blocks = total_blocks
        self._free: deque[int] = deque(range(total_blocks))
        self._used: set[int] = set()

    @property
    def used_blocks(self) -> int:
        return len(self._used)

    @property
    def max_alloc_blocks(self) -> int:
        return self.total_blocks

    def can_alloc(self, n: int) -> bool:
        return n <= len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        _check_count(n, self.total_blocks)
        if n > len(self._free):
            return None
        ids = [self._free.popleft() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids: Sequence[int]) -> None:
        unique = set(ids)
        if len(unique) != len(ids):
            raise ValueError("free: the same block id appears twice")
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < self.total_blocks]
        if bad:
            raise ValueError(f"free: block ids out of range: {bad[:8]}")
        not_held = unique - self._used
        if not_held:
            raise ValueError(f"free: blocks not allocated (double free?): {sorted(not_held)[:8]}")
        self._used -= unique
        self._free.extend(ids)


class FixedSlotAllocator:
    """The index-based baseline: each allocation takes one whole max-size slot.

    Slot ``s`` owns blocks ``[s * slot_blocks, (s + 1) * slot_blocks)``. ``alloc(n)``
    returns the first ``n`` of them, but the whole slot counts as used, which is
    exactly the internal waste the block allocator avoids.
    """

    def __init__(self, total_blocks: int, slot_blocks: int) -> None:
        if not 1 <= slot_blocks <= total_blocks:
            raise ValueError(f"slot_blocks must be in [1, total_blocks={total_blocks}], got {slot_blocks}")
        self.total_blocks = total_blocks
        self.slot_blocks = slot_blocks
        self.num_slots = total_blocks // slot_blocks
        self._free_slots: deque[int] = deque(range(self.num_slots))
        self._held: dict[int, int] = {}  # slot -> blocks handed out

    @property
    def used_blocks(self) -> int:
        return len(self._held) * self.slot_blocks

    @property
    def max_alloc_blocks(self) -> int:
        return self.slot_blocks

    def can_alloc(self, n: int) -> bool:
        return bool(self._free_slots)

    def alloc(self, n: int) -> list[int] | None:
        _check_count(n, self.slot_blocks)
        if not self._free_slots:
            return None
        slot = self._free_slots.popleft()
        self._held[slot] = n
        first = slot * self.slot_blocks
        return list(range(first, first + n))

    def free(self, ids: Sequence[int]) -> None:
        if not ids:
            raise ValueError("free: empty block list")
        first = ids[0]
        if not isinstance(first, int) or not 0 <= first < self.num_slots * self.slot_blocks:
            raise ValueError(f"free: block id out of range: {first}")
        slot, rem = divmod(first, self.slot_blocks)
        if rem or self._held.get(slot) != len(ids) or list(ids) != list(range(first, first + len(ids))):
            raise ValueError(f"free: {list(ids)[:8]} is not an allocation held in slot {slot} (double free?)")
        del self._held[slot]
        self._free_slots.append(slot)


def _check_count(n: int, limit: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"alloc: block count must be a positive integer, got {n!r}")
    if n > limit:
        raise RequestTooLarge(f"alloc: {n} blocks requested, at most {limit} can ever be allocated at once")
