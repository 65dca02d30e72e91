"""Fixed vs adaptive receive window on one length mix: continuations and blocks held.

Two ways, same policies (``mmtransfer.window.make_window_policy``, learning online with ``observe``):

* ``plan_policy``: the policies + ``mmtransfer.wire.chunk_plan`` arithmetic, for large samples;
* ``run_endpoints``: real ``SenderEndpoint`` / ``Receiver`` in this process (host transport over
  loopback ZeroMQ, CPU tensors of a small hidden size), recording each ``TransferRecord``.

"hint" = the EMBED_REF carries the length (the normal path: the receiver never offers more than N);
"no hint" = the receiver pulls before the length is known (num_tokens = 0), so it offers the whole window.
Blocks held: mean receive-window blocks per transfer; block-chunks: window blocks x chunks (the window
stays allocated for every chunk round trip); block-token-seconds (endpoint runs): window tokens x
transfer time, summed.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class PolicySpec:
    """``fixed`` or ``adaptive:<percentile>`` (bounded by adaptive_max_window_tokens)."""

    kind: str
    percentile: float = 90.0

    @property
    def label(self) -> str:
        return "fixed" if self.kind == "fixed" else f"adaptive p{self.percentile:g}"

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        kind, _, pct = text.strip().partition(":")
        if kind == "fixed" and not pct:
            return cls("fixed")
        if kind == "adaptive":
            return cls("adaptive", float(pct) if pct else 90.0)
        raise ValueError(f"policy must be 'fixed' or 'adaptive[:percentile]', got {text!r}")

    def config(self, base):
        """The TransferConfig of this policy, from ``base``."""
        if self.kind == "fixed":
            return base.replace(window_policy="fixed")
        return base.replace(window_policy="adaptive", adaptive_percentile=self.percentile)


def _summary(chunks: np.ndarray, blocks: np.ndarray, block_tokens: int, lengths: np.ndarray) -> dict:
    conts = chunks - 1
    capacity = blocks * block_tokens
    return {
        "transfers": int(chunks.size),
        "continuation_rate": float((conts > 0).mean()),
        "continuations_per_transfer": float(conts.mean()),
        "mean_window_blocks": float(blocks.mean()),
        "max_window_blocks": int(blocks.max()),
        "mean_block_chunks": float((blocks * chunks).mean()),
        "mean_unused_window_tokens": float(np.maximum(capacity - lengths, 0).mean()),
    }


def plan_policy(base_config, spec: PolicySpec, lengths: Sequence[int], hint: bool) -> dict:
    """Arithmetic only: the window the receiver would offer for each length (online learning), the
    chunks ``chunk_plan`` gives for it, capped by the pool like ``BlockPool.alloc_wait``."""
    from mmtransfer.window import make_window_policy
    from mmtransfer.wire import chunk_plan

    config = spec.config(base_config)
    policy = make_window_policy(config)
    chunks, blocks = [], []
    for n in lengths:
        n = int(n)
        b = min(policy.window_blocks(n if hint else 0), config.pool_blocks)
        chunks.append(len(chunk_plan(n, b * config.block_tokens)))
        blocks.append(b)
        policy.observe(n)
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    out = _summary(np.array(chunks), np.array(blocks), config.block_tokens, lengths_arr)
    out.update(
        {"policy": spec.label, "hint": hint, "method": "chunk_plan", "final_window_tokens": policy.window_tokens(0)}
    )
    return out


class _Collector:
    def __init__(self) -> None:
        self.records = []
        self.lock = threading.Lock()

    def transfer_completed(self, record) -> None:
        with self.lock:
            self.records.append(record)

    def transfer_failed(self, cause: str) -> None:
        pass

    def pool_changed(self) -> None:
        pass


def run_endpoints(
    base_config,
    spec: PolicySpec,
    lengths: Sequence[int],
    hint: bool,
    hidden: int = 64,
    threads: int = 1,
    verify: bool = True,
) -> dict:
    """Move every length through a real SenderEndpoint -> Receiver pair in this process."""
    import torch

    from mmtransfer import BlockPool, Receiver, SenderEndpoint, TransferObserver

    config = spec.config(base_config)
    max_len = int(max(lengths))
    sender_blocks = max(config.pool_blocks, threads * math.ceil(max_len / config.block_tokens) + 1)
    sender_pool = BlockPool(sender_blocks, config.block_tokens, hidden, torch.float32, "cpu", name="bench-sender")
    recv_pool = BlockPool(config.pool_blocks, config.block_tokens, hidden, torch.float32, "cpu", name="bench-recv")
    collector = _Collector()
    observer = type("Obs", (TransferObserver,), {})()
    observer.transfer_completed = collector.transfer_completed  # type: ignore[method-assign]
    sender = SenderEndpoint(sender_pool, config, name="bench-sender")
    receiver = Receiver(recv_pool, config, observer=observer, name="bench-recv")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn((max_len, hidden), generator=gen)
    errors: list[str] = []

    def one(i: int, n: int) -> None:
        emb = base[:n] + float(i)
        ref = sender.register(emb, {"grid_thw": [1, 1, n]}, request_id=f"bench-{i}")
        if not hint:
            ref = dataclasses.replace(ref, num_tokens=0)
        got = receiver.pull(ref, request_id=f"bench-{i}")
        if verify and not torch.equal(got.embedding, emb):
            errors.append(f"transfer {i}: embedding differs")

    t0 = time.monotonic()
    try:
        if threads <= 1:
            for i, n in enumerate(lengths):
                one(i, int(n))
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda a: one(*a), ((i, int(n)) for i, n in enumerate(lengths))))
    finally:
        receiver.close()
        sender.close()
    elapsed = time.monotonic() - t0
    if errors:
        raise AssertionError("; ".join(errors[:5]))
    out = _endpoint_summary(collector.records, config, spec, hint, hidden, threads, elapsed)
    out.update(
        {
            "final_window_tokens": receiver.window_policy.window_tokens(0),
            "receiver_blocks_leaked": recv_pool.used_blocks,
            "sender_blocks_leaked": sender_pool.used_blocks,
        }
    )
    return out


def _endpoint_summary(recs, config, spec: PolicySpec, hint: bool, hidden: int, threads: int, elapsed: float) -> dict:
    chunks = np.array([r.chunks for r in recs])
    blocks = np.array([r.window_blocks for r in recs])
    toks = np.array([r.tokens for r in recs])
    out = _summary(chunks, blocks, config.block_tokens, toks)
    out.update(
        {
            "policy": spec.label,
            "hint": hint,
            "method": f"endpoints (hidden {hidden}, {threads} thread(s))",
            "threads": threads,
            "elapsed_s": elapsed,
            "block_token_seconds": float(sum(r.window_blocks * config.block_tokens * r.latency_s for r in recs)),
            "mean_transfer_ms": float(np.mean([r.latency_s for r in recs]) * 1e3),
            "p99_transfer_ms": float(np.percentile([r.latency_s for r in recs], 99) * 1e3),
        }
    )
    return out


def parse_policies(text: str) -> list[PolicySpec]:
    return [PolicySpec.parse(p) for p in text.split(",") if p.strip()]


def policies_labels(specs: Iterable[PolicySpec]) -> list[str]:
    return [s.label for s in specs]
