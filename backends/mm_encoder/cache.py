"""Embedding cache: a repeated image skips the vision tower and reuses its blocks.

Entries are keyed by a hash of the encoded image bytes and live in the encoder's own
block pool. Each transfer serving an entry holds a reference; an entry nobody
references is idle and may be evicted (least recently used first) when the pool
runs short or the cache is over its block budget. Blocks in flight are never evicted.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from mmtransfer import BlockPool

log = logging.getLogger(__name__)


def image_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class CachedEmbedding:
    key: str
    blocks: list[int]
    num_tokens: int
    extras: dict[str, list[int]] = field(default_factory=dict)
    refs: int = 0
    evicted: bool = False  # removed from the index while still referenced: freed at the last release


class EmbeddingCache:
    """Reference-counted, LRU-evicted embeddings in a block pool; thread-safe."""

    def __init__(self, pool: BlockPool, max_blocks: int) -> None:
        if max_blocks < 0:
            raise ValueError(f"cache max_blocks must be >= 0, got {max_blocks}")
        self.pool = pool
        self.max_blocks = max_blocks
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, CachedEmbedding] = OrderedDict()
        self._lock = threading.Lock()
        pool.reclaimer = self.evict_idle

    @property
    def enabled(self) -> bool:
        return self.max_blocks > 0

    def contains(self, key: str) -> bool:
        """Whether ``key`` is cached now (a hint: it may be evicted before an ``acquire``)."""
        with self._lock:
            return key in self._entries

    def acquire(self, key: str) -> CachedEmbedding | None:
        """A referenced entry for ``key``, or None (a miss). Pair with ``release``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            entry.refs += 1
            self.hits += 1
            return entry

    def insert(self, key: str, blocks: list[int], num_tokens: int, extras: dict[str, list[int]]) -> CachedEmbedding:
        """Adopt freshly filled ``blocks`` as the entry for ``key``, referenced once.

        If another request cached the same image meanwhile, the new entry still serves
        this request and is freed at its release (never indexed twice)."""
        entry = CachedEmbedding(key, blocks, num_tokens, extras, refs=1)
        with self._lock:
            if key in self._entries or len(blocks) > self.max_blocks:
                entry.evicted = True
                return entry
            self._entries[key] = entry
        self._shrink_to(self.max_blocks)
        return entry

    def release(self, entry: CachedEmbedding) -> None:
        free = False
        with self._lock:
            if entry.refs <= 0:
                raise ValueError(f"cache entry {entry.key[:12]} released more often than acquired")
            entry.refs -= 1
            free = entry.refs == 0 and entry.evicted
        if free:
            self.pool.free(entry.blocks)

    def evict_idle(self, blocks_needed: int) -> bool:
        """Free idle entries, least recently used first, until ``blocks_needed`` blocks
        were freed or none is idle. Returns True if anything was freed."""
        freed = 0
        while freed < blocks_needed:
            victim = self._pop_idle_lru()
            if victim is None:
                break
            self.pool.free(victim.blocks)
            freed += len(victim.blocks)
        if freed:
            log.debug("embedding cache: evicted %d block(s) under pool pressure", freed)
        return freed > 0

    @property
    def idle_blocks(self) -> int:
        """Blocks held only by the cache (no transfer is using them)."""
        with self._lock:
            return sum(len(e.blocks) for e in self._entries.values() if e.refs == 0)

    @property
    def cached_blocks(self) -> int:
        with self._lock:
            return sum(len(e.blocks) for e in self._entries.values())

    def clear(self) -> None:
        """Drop every entry; referenced ones are freed at their last release."""
        while self.evict_idle(1 << 30):
            pass
        with self._lock:
            for entry in self._entries.values():
                entry.evicted = True
            self._entries.clear()

    def _shrink_to(self, max_blocks: int) -> None:
        while self.cached_blocks > max_blocks:
            victim = self._pop_idle_lru()
            if victim is None:
                return  # everything is in flight; shrink at a later insert
            self.pool.free(victim.blocks)

    def _pop_idle_lru(self) -> CachedEmbedding | None:
        with self._lock:
            for key, entry in self._entries.items():
                if entry.refs == 0:
                    del self._entries[key]
                    return entry
        return None
