"""SlotTable and SlotKVCache: property tests that rows stay dense, never double-allocate, free on every
path, and that the KV moves they order keep each sequence's data in its row."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mm_engine.kv_cache import KVGeometry, SlotKVCache
from mm_engine.slots import SlotTable

OPS = st.lists(st.tuples(st.sampled_from(["acquire", "promote", "release"]), st.integers(0, 50)), max_size=200)


def check_invariants(table: SlotTable, decoding: set, prefilling: set) -> None:
    owners = table.owners()
    assert len(owners) == len(set(owners)) == table.used == len(decoding) + len(prefilling)
    assert table.used + table.free == table.capacity
    assert set(owners[: table.decoding]) == decoding
    assert set(owners[table.decoding :]) == prefilling
    for row, owner in enumerate(owners):
        assert table.row(owner) == row


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 8), ops=OPS)
def test_slot_table_stays_dense_and_consistent(capacity, ops):
    table = SlotTable(capacity)
    decoding: set[int] = set()
    prefilling: set[int] = set()
    data = [None] * capacity  # what each physical row holds, moved as the table says
    next_id = 0
    for op, pick in ops:
        held = sorted(decoding | prefilling)
        if op == "acquire":
            if table.free:
                row = table.acquire(next_id)
                assert data[row] is None  # never hands out a live row
                data[row] = next_id
                prefilling.add(next_id)
                next_id += 1
            else:
                with pytest.raises(ValueError):
                    table.acquire(next_id)
        elif op == "promote" and prefilling:
            owner = sorted(prefilling)[pick % len(prefilling)]
            for m in table.promote(owner):
                assert m.swap
                data[m.src], data[m.dst] = data[m.dst], data[m.src]
            prefilling.discard(owner)
            decoding.add(owner)
        elif op == "release" and held:
            owner = held[pick % len(held)]
            data[table.row(owner)] = None
            for m in table.release(owner):
                assert data[m.src] == m.owner and data[m.dst] is None and not m.swap
                data[m.dst], data[m.src] = data[m.src], None
            decoding.discard(owner)
            prefilling.discard(owner)
        check_invariants(table, decoding, prefilling)
        for owner in decoding | prefilling:
            assert data[table.row(owner)] == owner  # the moves carried every live row's data
    for owner in sorted(decoding | prefilling):
        table.release(owner)
    assert table.used == 0 and table.free == capacity and table.decoding == 0


def test_slot_table_refuses_misuse():
    table = SlotTable(2)
    table.acquire("a")
    with pytest.raises(ValueError):
        table.acquire("a")
    table.promote("a")
    with pytest.raises(ValueError):
        table.promote("a")
    with pytest.raises(KeyError):
        table.release("zzz")
    with pytest.raises(ValueError):
        SlotTable(0)


def make_cache(slots=4, max_len=16) -> SlotKVCache:
    return SlotKVCache(KVGeometry(num_layers=2, kv_heads=2, head_dim=3), slots, max_len, torch.float32, "cpu")


def test_cache_prefill_then_decode_writes_per_row_positions():
    cache = make_cache()
    for row, length in ((0, 5), (1, 3)):
        cache.plan_prefill(row, 0, length)
        k = torch.full((1, 2, length, 3), float(row + 1))
        keys, values = cache.update(k, k * 10, layer_idx=1)
        assert keys.shape == (1, 2, length, 3)
    cache.plan_decode(2, torch.tensor([5, 3]), kv_len=6)
    new = torch.stack([torch.full((2, 1, 3), 7.0), torch.full((2, 1, 3), 8.0)])
    keys, values = cache.update(new, new, layer_idx=1)
    assert keys.shape == (2, 2, 6, 3)
    assert torch.all(cache.keys[1][0, :, 5] == 7) and torch.all(cache.keys[1][1, :, 3] == 8)
    assert torch.all(cache.keys[1][1, :, :3] == 2) and torch.all(cache.keys[1][1, :, 4:] == 0)
    assert torch.all(cache.keys[0] == 0)  # other layers untouched
    cache.clear_plan()
    with pytest.raises(RuntimeError):
        cache.update(new, new, layer_idx=0)


def test_cache_move_and_swap_copy_rows():
    cache = make_cache()
    for t in cache.keys + cache.values:
        for row in range(4):
            t[row] = row
    cache.move(3, 1, length=4)
    assert torch.all(cache.keys[0][1, :, :4] == 3) and torch.all(cache.keys[0][1, :, 4:] == 1)
    cache.swap(0, 2, length=16)
    assert torch.all(cache.values[1][0] == 2) and torch.all(cache.values[1][2] == 0)


def test_cache_plans_are_bounds_checked():
    cache = make_cache()
    with pytest.raises(ValueError):
        cache.plan_prefill(0, 10, 7)
    with pytest.raises(ValueError):
        cache.plan_decode(5, torch.tensor([0] * 5), kv_len=3)


def test_kv_bytes_per_token_of_qwen2_vl_2b():
    geom = KVGeometry(num_layers=28, kv_heads=2, head_dim=128)
    assert geom.bytes_per_token(torch.bfloat16) == 28 * 1024
