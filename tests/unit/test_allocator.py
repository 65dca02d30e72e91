"""Allocator contracts: unit cases and hypothesis state machines (no leaks, no overlap)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mmtransfer.allocator import BlockAllocator, FixedSlotAllocator
from mmtransfer.errors import RequestTooLarge


def test_alloc_returns_none_on_exhaustion_and_recovers():
    a = BlockAllocator(4)
    first = a.alloc(3)
    assert first is not None and len(first) == 3
    assert a.alloc(2) is None
    assert a.used_blocks == 3
    a.free(first)
    assert a.alloc(4) is not None


def test_blocks_need_not_be_contiguous():
    a = BlockAllocator(6)
    x, _y, z = a.alloc(2), a.alloc(2), a.alloc(2)
    a.free(x)
    a.free(z)
    got = a.alloc(4)
    assert sorted(got) == sorted(x + z)  # uses both holes around y


@pytest.mark.parametrize("bad", [[99], [-1], [0, 0]])
def test_foreign_and_duplicate_ids_are_rejected(bad):
    a = BlockAllocator(4)
    a.alloc(1)
    with pytest.raises(ValueError):
        a.free(bad)
    assert a.used_blocks == 1


def test_double_free_is_rejected_and_changes_nothing():
    a = BlockAllocator(4)
    ids = a.alloc(2)
    a.free(ids)
    with pytest.raises(ValueError, match="double free"):
        a.free(ids)
    assert a.used_blocks == 0 and a.alloc(4) is not None


@pytest.mark.parametrize("n", [0, -3, 5])
def test_impossible_requests_raise(n):
    a = BlockAllocator(4)
    with pytest.raises(ValueError):
        a.alloc(n)
    if n == 5:
        with pytest.raises(RequestTooLarge):
            a.alloc(n)


def test_fixed_slots_waste_whole_slots():
    a = FixedSlotAllocator(total_blocks=8, slot_blocks=4)
    ids = a.alloc(1)
    assert ids == [0]
    assert a.used_blocks == 4  # one token-block used, the whole slot held
    assert a.alloc(4) == [4, 5, 6, 7]
    assert a.alloc(1) is None
    with pytest.raises(ValueError):
        a.free([1])
    a.free(ids)
    a.free([4, 5, 6, 7])
    assert a.used_blocks == 0
    with pytest.raises(RequestTooLarge):
        a.alloc(5)


class _AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/free sequences: held allocations never overlap, counts add up,
    alloc returns None exactly when there is not enough room, and everything freed
    at the end leaves the allocator full again."""

    make = staticmethod(lambda: BlockAllocator(16))

    def __init__(self) -> None:
        super().__init__()
        self.alloc_ = self.make()
        self.held: list[list[int]] = []

    def room(self, n: int) -> bool:
        if isinstance(self.alloc_, FixedSlotAllocator):
            return len(self.held) < self.alloc_.num_slots
        return n <= self.alloc_.total_blocks - sum(map(len, self.held))

    @rule(n=st.integers(1, 8))
    def alloc(self, n):
        got = self.alloc_.alloc(n)
        if self.room(n):
            assert got is not None and len(got) == n
            self.held.append(got)
        else:
            assert got is None

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        self.alloc_.free(self.held.pop(i % len(self.held)))

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def double_free_is_rejected(self, i):
        ids = self.held[i % len(self.held)]
        self.alloc_.free(ids)
        with pytest.raises(ValueError):
            self.alloc_.free(ids)
        self.held.remove(ids)

    @invariant()
    def no_overlap_and_in_range(self):
        flat = [b for ids in self.held for b in ids]
        assert len(flat) == len(set(flat))
        assert all(0 <= b < self.alloc_.total_blocks for b in flat)

    @invariant()
    def used_count_matches(self):
        if isinstance(self.alloc_, FixedSlotAllocator):
            assert self.alloc_.used_blocks == len(self.held) * self.alloc_.slot_blocks
        else:
            assert self.alloc_.used_blocks == sum(map(len, self.held))

    def teardown(self):
        for ids in self.held:
            self.alloc_.free(ids)
        assert self.alloc_.used_blocks == 0


class _FixedSlotMachine(_AllocatorMachine):
    make = staticmethod(lambda: FixedSlotAllocator(18, 8))


TestBlockAllocatorMachine = _AllocatorMachine.TestCase
TestFixedSlotMachine = _FixedSlotMachine.TestCase
TestBlockAllocatorMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestFixedSlotMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


@given(st.lists(st.integers(1, 5), min_size=1, max_size=30))
def test_alloc_all_then_free_all_restores_everything(sizes):
    a = BlockAllocator(32)
    held = [ids for n in sizes if (ids := a.alloc(n)) is not None]
    assert sum(map(len, held)) <= 32
    for ids in reversed(held):
        a.free(ids)
    assert a.used_blocks == 0
    assert sorted(a.alloc(32)) == list(range(32))
