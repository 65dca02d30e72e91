"""Embedding cache: hits reuse blocks, references protect blocks in flight, LRU eviction
under pool pressure, and every block comes back."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from mm_encoder.cache import EmbeddingCache, image_key
from mmtransfer import BlockPool, Receiver, SenderEndpoint, TransferConfig

HIDDEN = 8


def make_pool(blocks=8):
    return BlockPool(blocks, 4, HIDDEN, torch.float32, name="enc")


def fill(pool, tokens):
    blocks = pool.alloc(pool.blocks_for(tokens))
    pool.scatter(blocks, torch.randn(tokens, HIDDEN))
    return blocks


def test_hit_returns_the_same_blocks_and_counts():
    pool = make_pool()
    cache = EmbeddingCache(pool, max_blocks=8)
    assert cache.acquire("k") is None
    entry = cache.insert("k", fill(pool, 6), 6, {"grid_thw": [1, 2, 3]})
    again = cache.acquire("k")
    assert again is entry and entry.refs == 2
    assert (cache.hits, cache.misses) == (1, 1)
    cache.release(entry)
    cache.release(entry)
    assert cache.idle_blocks == 2 and pool.used_blocks == 2  # kept for the next hit
    cache.clear()
    assert pool.used_blocks == 0


def test_referenced_entries_are_never_evicted():
    pool = make_pool(blocks=4)
    cache = EmbeddingCache(pool, max_blocks=4)
    busy = cache.insert("busy", fill(pool, 8), 8, {})
    idle = cache.insert("idle", fill(pool, 8), 8, {})
    cache.release(idle)
    assert not pool.alloc(1)
    got = pool.alloc_wait(2, timeout_s=0.2)  # the reclaimer evicts the idle entry only
    assert cache.acquire("idle") is None and cache.acquire("busy") is busy
    pool.free(got)
    cache.release(busy)
    cache.release(busy)
    cache.clear()
    assert pool.used_blocks == 0


def test_over_budget_insert_evicts_lru_idle():
    pool = make_pool(blocks=8)
    cache = EmbeddingCache(pool, max_blocks=4)
    for key in ("a", "b"):
        cache.release(cache.insert(key, fill(pool, 8), 8, {}))
    cache.release(cache.acquire("a"))  # a is now the most recently used
    cache.release(cache.insert("c", fill(pool, 8), 8, {}))
    assert cache.acquire("b") is None  # b was least recently used
    entry = cache.acquire("a")
    assert entry is not None
    cache.release(entry)
    assert cache.cached_blocks <= 4
    cache.clear()
    assert pool.used_blocks == 0


def test_duplicate_insert_is_freed_at_release():
    pool = make_pool()
    cache = EmbeddingCache(pool, max_blocks=8)
    first = cache.insert("k", fill(pool, 4), 4, {})
    second = cache.insert("k", fill(pool, 4), 4, {})
    assert second.evicted
    cache.release(second)
    assert pool.used_blocks == 1
    cache.release(first)
    cache.clear()
    assert pool.used_blocks == 0


def test_release_more_than_acquired_is_refused():
    pool = make_pool()
    cache = EmbeddingCache(pool, max_blocks=8)
    entry = cache.insert("k", fill(pool, 4), 4, {})
    cache.release(entry)
    with pytest.raises(ValueError):
        cache.release(entry)
    cache.clear()


def test_cached_embedding_served_to_concurrent_receivers_bit_exact():
    cfg = TransferConfig(block_tokens=4, default_window_tokens=8, pool_blocks=8, max_embed_tokens=64)
    pool = BlockPool(16, 4, HIDDEN, torch.float32, name="enc")
    cache = EmbeddingCache(pool, max_blocks=16)
    data = torch.randn(30, HIDDEN)
    with SenderEndpoint(pool, cfg) as sender, Receiver(BlockPool(8, 4, HIDDEN, torch.float32), cfg) as rx:
        blocks, aux = sender.write_blocks(data, {"grid_thw": [1, 1, 30]})
        entry = cache.insert(image_key(b"img"), blocks, aux.total_tokens, {"grid_thw": [1, 1, 30]})
        refs = [sender.publish(entry.blocks, 30, entry.extras, lambda _b, e=entry: cache.release(e))]
        for _ in range(3):
            hit = cache.acquire(image_key(b"img"))
            refs.append(sender.publish(hit.blocks, 30, hit.extras, lambda _b, e=hit: cache.release(e)))
        results = [None] * len(refs)

        def pull(i):
            results[i] = rx.pull(refs[i]).embedding

        threads = [threading.Thread(target=pull, args=(i,)) for i in range(len(refs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(torch.equal(r, data) for r in results)
        # a pull over a link that reads the pool (shm) returns once its DONE is sent: the sender releases the
        # cache's ref when it has read that DONE, just after
        deadline = time.monotonic() + 10
        while entry.refs and time.monotonic() < deadline:
            time.sleep(0.01)
        assert entry.refs == 0 and cache.idle_blocks == 8
    cache.clear()
    assert pool.used_blocks == 0


class CacheMachine(RuleBasedStateMachine):
    """Random acquire/insert/release/alloc pressure: referenced blocks are never freed
    or reused, and clearing at the end returns the pool to full."""

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(12, 4, 2, torch.float32)
        self.cache = EmbeddingCache(self.pool, max_blocks=8)
        self.held = []  # referenced entries
        self.loose = []  # blocks allocated outside the cache

    @rule(key=st.sampled_from("abcde"), tokens=st.integers(1, 12))
    def request(self, key, tokens):
        entry = self.cache.acquire(key)
        if entry is None:
            blocks = self.pool.alloc(self.pool.blocks_for(tokens))
            if blocks is None:
                if not self.cache.evict_idle(self.pool.blocks_for(tokens)):
                    return
                blocks = self.pool.alloc(self.pool.blocks_for(tokens))
                if blocks is None:
                    return
            entry = self.cache.insert(key, blocks, tokens, {})
        self.held.append(entry)

    @rule(i=st.integers(0, 50))
    def release(self, i):
        if self.held:
            self.cache.release(self.held.pop(i % len(self.held)))

    @rule(n=st.integers(1, 4))
    def pressure(self, n):
        try:
            self.loose.append(self.pool.alloc_wait(n, timeout_s=0.001))
        except Exception:
            pass

    @rule()
    def free_loose(self):
        if self.loose:
            self.pool.free(self.loose.pop())

    @invariant()
    def referenced_blocks_are_allocated_and_disjoint(self):
        live = {id(e): e for e in self.held}
        flat = [b for e in live.values() for b in e.blocks] + [b for ids in self.loose for b in ids]
        assert len(flat) == len(set(flat))
        assert self.pool.used_blocks >= len(flat)

    def teardown(self):
        for entry in self.held:
            self.cache.release(entry)
        for ids in self.loose:
            self.pool.free(ids)
        self.cache.clear()
        assert self.pool.used_blocks == 0


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
