"""How many embeddings fit at once in a pool of fixed bytes: block allocator vs fixed max-size slots.

Uses the real components: ``mmtransfer.BlockPool`` (storage on the ``meta`` device, so a pool of any
size costs no memory) with its ``BlockAllocator`` or ``FixedSlotAllocator`` and ``BlockPool.blocks_for``.
A trial fills a fresh pool with embeddings drawn from the length mix, in order, until the first one
that does not fit (no skipping ahead: a server serves requests in arrival order); the count is how
many embeddings the pool held concurrently. Internal waste per request = tokens allocated - tokens used
(block mode: the unused tail of the last block; slot mode: the unused part of the max-size slot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .lengths import LogNormalMix

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class PoolGeometry:
    pool_bytes: int
    hidden: int
    dtype: str
    block_tokens: int

    @property
    def bytes_per_block(self) -> int:
        return self.block_tokens * self.hidden * DTYPE_BYTES[self.dtype]

    @property
    def num_blocks(self) -> int:
        return self.pool_bytes // self.bytes_per_block


def make_pool(geom: PoolGeometry, block_allocator: bool, slot_tokens: int):
    """A real BlockPool with no storage behind it (meta device): only its allocator is exercised."""
    import torch

    from mmtransfer import BlockPool, dtype_from_name

    slot_blocks = math.ceil(slot_tokens / geom.block_tokens)
    if geom.num_blocks < max(1, slot_blocks if not block_allocator else 1):
        raise ValueError(f"pool of {geom.num_blocks} blocks is smaller than one slot of {slot_blocks} blocks")
    return BlockPool(
        geom.num_blocks,
        geom.block_tokens,
        geom.hidden,
        dtype_from_name(geom.dtype),
        torch.device("meta"),
        block_allocator=block_allocator,
        slot_blocks=slot_blocks,
        name="bench-block" if block_allocator else "bench-slots",
    )


def fill_once(pool, lengths: np.ndarray) -> tuple[int, int, int]:
    """Allocate ``lengths`` in order until one does not fit; returns (count, tokens held, tokens allocated).
    Frees everything again, so the pool can be reused."""
    held: list[list[int]] = []
    used = allocated = 0
    try:
        for n in lengths:
            n = int(n)
            ids = pool.alloc(pool.blocks_for(n))
            if ids is None:
                break
            held.append(ids)
            used += n
            allocated += _allocated_tokens(pool, len(ids))
        return len(held), used, allocated
    finally:
        for ids in held:
            pool.free(ids)


def _allocated_tokens(pool, n_blocks: int) -> int:
    """Tokens an allocation of ``n_blocks`` takes out of the pool (a whole slot in slot mode)."""
    slot_blocks = getattr(pool.allocator, "slot_blocks", None)
    return (slot_blocks if slot_blocks is not None else n_blocks) * pool.block_tokens


def waste_per_request(pool, lengths: np.ndarray) -> np.ndarray:
    """Internal waste (tokens) of each length, from the pool's own ``blocks_for`` and allocator mode."""
    return np.array([_allocated_tokens(pool, pool.blocks_for(int(n))) - int(n) for n in lengths], dtype=np.int64)


def compare(
    geom: PoolGeometry,
    mix: LogNormalMix,
    slot_tokens: int,
    trials: int = 200,
    seed: int = 0,
    waste_samples: int = 100_000,
) -> dict:
    """One row of the memory table: mean concurrent embeddings per mode, their ratio, and waste."""
    block_pool = make_pool(geom, True, slot_tokens)
    slot_pool = make_pool(geom, False, slot_tokens)
    per_trial = max(16, 4 * geom.num_blocks)  # enough lengths that a trial always ends by a refusal
    counts = {"block": [], "slot": []}
    utilisation = {"block": [], "slot": []}
    for t in range(trials):
        lengths = mix.sample(per_trial, seed=seed * 1_000_003 + t)
        for mode, pool in (("block", block_pool), ("slot", slot_pool)):
            count, used, _ = fill_once(pool, lengths)
            counts[mode].append(count)
            utilisation[mode].append(used / (geom.num_blocks * geom.block_tokens))
        assert block_pool.used_blocks == 0 and slot_pool.used_blocks == 0
    sample = mix.sample(waste_samples, seed=seed + 7)
    waste_b = waste_per_request(block_pool, sample)
    waste_s = waste_per_request(slot_pool, sample)
    mean_b, mean_s = float(np.mean(counts["block"])), float(np.mean(counts["slot"]))
    return {
        "pool_mib": geom.pool_bytes / 2**20,
        "pool_blocks": geom.num_blocks,
        "block_tokens": geom.block_tokens,
        "hidden": geom.hidden,
        "dtype": geom.dtype,
        "slot_tokens": slot_tokens,
        "slots": slot_pool.allocator.num_slots,
        "block_fit_mean": mean_b,
        "block_fit_min": int(np.min(counts["block"])),
        "slot_fit_mean": mean_s,
        "slot_fit_min": int(np.min(counts["slot"])),
        "ratio": mean_b / mean_s if mean_s else math.inf,
        "block_token_utilisation": float(np.mean(utilisation["block"])),
        "slot_token_utilisation": float(np.mean(utilisation["slot"])),
        "block_waste_mean_tokens": float(waste_b.mean()),
        "block_waste_mean_blocks": float(waste_b.mean()) / geom.block_tokens,
        "slot_waste_mean_tokens": float(waste_s.mean()),
        "trials": trials,
    }
