"""BlockPool: scatter/gather over non-contiguous blocks, aux area, bounded waits."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmtransfer import BlockPool, PoolExhausted, RequestTooLarge


def make_pool(blocks=8, bt=4, hidden=3, dtype=torch.float32, **kw):
    return BlockPool(blocks, bt, hidden, dtype, **kw)


def test_segments_merge_neighbouring_blocks():
    pool = make_pool()
    segs = pool.segments([2, 3, 7], num_tokens=10, token_offset=1)
    assert [(s.pool_row, s.token, s.length) for s in segs] == [(9, 1, 7), (28, 8, 3)]


@settings(max_examples=60, deadline=None)
@given(
    perm=st.permutations(list(range(8))),
    n_blocks=st.integers(1, 8),
    offset=st.integers(0, 31),
    n=st.integers(0, 32),
)
def test_scatter_gather_roundtrip_any_block_order(perm, n_blocks, offset, n):
    pool = make_pool()
    ids = perm[:n_blocks]
    capacity = n_blocks * pool.block_tokens
    offset, n = min(offset, capacity), min(n, capacity - min(offset, capacity))
    data = torch.randn(n, pool.hidden)
    pool.scatter(ids, data, token_offset=offset)
    assert torch.equal(pool.gather(ids, n, token_offset=offset), data)


def test_out_of_range_tokens_are_refused():
    pool = make_pool()
    with pytest.raises(RequestTooLarge):
        pool.gather([0, 1], num_tokens=9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_are_bit_exact(dtype):
    pool = make_pool(dtype=dtype, hidden=5)
    ids = pool.alloc(3)
    data = torch.randn(11, 5).to(dtype)
    pool.scatter(ids, data)
    assert torch.equal(pool.gather(ids, 11).view(torch.uint8), data.view(torch.uint8))
    pool.free(ids)


def test_shape_and_dtype_mismatch_rejected():
    pool = make_pool()
    ids = pool.alloc(1)
    with pytest.raises(ValueError):
        pool.scatter(ids, torch.zeros(2, 4))
    with pytest.raises(ValueError):
        pool.scatter(ids, torch.zeros(2, 3, dtype=torch.float16))
    pool.free(ids)


def test_alloc_wait_times_out_with_clear_error():
    pool = make_pool(blocks=2)
    held = pool.alloc(2)
    start = time.monotonic()
    with pytest.raises(PoolExhausted, match="2/2 in use"):
        pool.alloc_wait(1, timeout_s=0.2)
    assert 0.15 < time.monotonic() - start < 2
    pool.free(held)


def test_alloc_wait_proceeds_when_blocks_are_freed():
    pool = make_pool(blocks=2)
    held = pool.alloc(2)
    threading.Timer(0.1, pool.free, args=(held,)).start()
    got = pool.alloc_wait(2, timeout_s=5)
    assert len(got) == 2
    pool.free(got)
    assert pool.used_blocks == 0


def test_alloc_wait_settles_for_fewer_blocks_with_min_blocks():
    pool = make_pool(blocks=4)
    held = pool.alloc(3)
    got = pool.alloc_wait(4, timeout_s=0.1, min_blocks=1)
    assert len(got) == 1  # the window shrinks instead of waiting
    pool.free(got)
    pool.free(held)


def test_fixed_slot_pool_allocates_whole_slots():
    pool = make_pool(blocks=8, block_allocator=False, slot_blocks=4)
    a = pool.alloc(1)
    assert pool.used_blocks == 4
    b = pool.alloc(2)
    assert pool.alloc(1) is None
    pool.free(a)
    pool.free(b)
    assert pool.used_blocks == 0
