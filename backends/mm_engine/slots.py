"""SlotTable: which sequence owns which KV-cache row, kept dense so a decode step reads one view.

The cache is ``[slots, kv_heads, max_len, head_dim]`` per layer, and a decode step attends over the
view ``[:B]`` of the B decoding rows, with no gather. So the rows stay dense and ordered in two groups:
``[0, B)`` decoding, ``[B, n)`` prefilling (a sequence whose prompt is still being chunked in). When a
row leaves, the table fills the hole by moving the last row of its group there (and the last
prefilling row into the hole that leaves at the group boundary); the caller copies the KV rows the
returned :class:`Move` list names, in order. Not thread-safe: only the engine loop thread uses it.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class Move:
    """Copy KV row ``src`` onto row ``dst`` (``swap``: exchange them); ``owner`` is whose data moves
    from ``src`` (for a swap, ``dst``'s owner moves the other way)."""

    src: int
    dst: int
    owner: Hashable
    swap: bool = False


class SlotTable:
    """Dense row allocation over ``capacity`` KV slots (see module docstring)."""

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self._capacity = capacity
        self._rows: list[Hashable] = []  # row -> owner
        self._row_of: dict[Hashable, int] = {}
        self._decoding = 0  # rows [0, _decoding) decode

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def used(self) -> int:
        return len(self._rows)

    @property
    def free(self) -> int:
        return self._capacity - len(self._rows)

    @property
    def decoding(self) -> int:
        """B: rows ``[0, B)`` take part in the next decode step."""
        return self._decoding

    def row(self, owner: Hashable) -> int:
        return self._row_of[owner]

    def owners(self) -> list[Hashable]:
        """Owners by row."""
        return list(self._rows)

    def is_decoding(self, owner: Hashable) -> bool:
        return self._row_of[owner] < self._decoding

    def __contains__(self, owner: object) -> bool:
        return owner in self._row_of

    def acquire(self, owner: Hashable) -> int:
        """Give ``owner`` the next row, in the prefilling group. ValueError when full or already held."""
        if owner in self._row_of:
            raise ValueError(f"{owner!r} already holds row {self._row_of[owner]}")
        if not self.free:
            raise ValueError(f"no free KV slot ({self._capacity} in use)")
        row = len(self._rows)
        self._rows.append(owner)
        self._row_of[owner] = row
        return row

    def promote(self, owner: Hashable) -> list[Move]:
        """Move a prefilling ``owner`` into the decoding group (a swap when it is not first in line)."""
        row = self._row_of[owner]
        if row < self._decoding:
            raise ValueError(f"{owner!r} is already decoding")
        moves = []
        boundary = self._decoding
        if row != boundary:
            other = self._rows[boundary]
            moves.append(Move(src=row, dst=boundary, owner=owner, swap=True))
            self._place(other, row)
            self._place(owner, boundary)
        self._decoding += 1
        return moves

    def release(self, owner: Hashable) -> list[Move]:
        """Free ``owner``'s row; returns the copies that keep the rows dense, to apply in order."""
        row = self._row_of.pop(owner)
        moves: list[Move] = []
        hole = row
        if row < self._decoding:
            last = self._decoding - 1
            if hole != last:
                moves.append(self._move(last, hole))
            hole = last
            self._decoding -= 1
        last = len(self._rows) - 1
        if hole != last:
            moves.append(self._move(last, hole))
        self._rows.pop()
        return moves

    def _move(self, src: int, dst: int) -> Move:
        owner = self._rows[src]
        self._place(owner, dst)
        return Move(src=src, dst=dst, owner=owner)

    def _place(self, owner: Hashable, row: int) -> None:
        self._rows[row] = owner
        self._row_of[owner] = row
