"""The ``mm_`` custom metrics, exported through Triton's metrics port.

Every model creates the same families (same names, help and kind), labelled by model
and instance, so the encoder and the language model report side by side.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from mmtransfer import BlockPool, FailureCause, TransferObserver, TransferRecord

log = logging.getLogger(__name__)
LATENCY_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
# the cause labels of mm_transfer_failures_total: every FailureCause, exported from the start
FAILURE_CAUSES = FailureCause.names()


class TritonMetrics(TransferObserver):
    """Observer that turns transfer events and pool usage into Triton metrics."""

    def __init__(self, pb_utils: Any, model: str, instance: str, pool: BlockPool, cache: Any = None) -> None:
        mf = pb_utils.MetricFamily
        labels = {"model": model, "instance": instance}
        self._pool = pool
        self._cache = cache  # an EmbeddingCache (encoder side), whose idle blocks are not "used"
        self._cache_seen = (0, 0)
        self._lock = threading.Lock()

        # Families must outlive their metrics (Triton refuses updates otherwise): keep them.
        self._families: list[Any] = []

        def family(name: str, help_: str, kind: Any) -> Any:
            self._families.append(mf(name=name, description=help_, kind=kind))
            return self._families[-1]

        transfers = family("mm_transfers_total", "Embeddings pulled to completion", mf.COUNTER)
        conts = family("mm_transfer_continuations_total", "Continuation pulls beyond each first chunk", mf.COUNTER)
        nbytes = family("mm_transfer_bytes_total", "Embedding bytes moved by pulls", mf.COUNTER)
        failures = family("mm_transfer_failures_total", "Failed transfers by cause", mf.COUNTER)
        latency = family("mm_transfer_latency_seconds", "Time from first pull to assembled embedding", mf.HISTOGRAM)
        used = family("mm_pool_blocks_used", "Pool blocks held by requests and transfers", mf.GAUGE)
        total = family("mm_pool_blocks_total", "Pool blocks preallocated", mf.GAUGE)
        self._transfers = transfers.Metric(labels=labels)
        self._continuations = conts.Metric(labels=labels)
        self._bytes = nbytes.Metric(labels=labels)
        self._latency = latency.Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self._failures = {c: failures.Metric(labels={**labels, "cause": c}) for c in FAILURE_CAUSES}
        self._used = used.Metric(labels=labels)
        self._total = total.Metric(labels=labels)
        self._total.set(pool.total_blocks)
        if cache is not None:
            cached = family("mm_pool_blocks_cached", "Pool blocks held only by the embedding cache", mf.GAUGE)
            hits = family("mm_embedding_cache_hits_total", "Images served from the embedding cache", mf.COUNTER)
            misses = family("mm_embedding_cache_misses_total", "Images not in the embedding cache", mf.COUNTER)
            self._cached = cached.Metric(labels=labels)
            self._hits = hits.Metric(labels=labels)
            self._misses = misses.Metric(labels=labels)
        self.update_pool()

    def update_pool(self) -> None:
        with self._lock:
            idle = self._cache.idle_blocks if self._cache is not None else 0
            self._used.set(max(0, self._pool.used_blocks - idle))
            if self._cache is not None:
                self._cached.set(idle)
                hits, misses = self._cache.hits, self._cache.misses
                self._hits.increment(hits - self._cache_seen[0])
                self._misses.increment(misses - self._cache_seen[1])
                self._cache_seen = (hits, misses)

    def transfer_completed(self, record: TransferRecord) -> None:
        with self._lock:
            self._transfers.increment(1)
            self._continuations.increment(record.continuations)
            self._bytes.increment(record.nbytes)
            self._latency.observe(record.latency_s)
        self.update_pool()

    def transfer_failed(self, cause: FailureCause | str) -> None:
        with self._lock:
            self._failures[FailureCause.of(cause).value].increment(1)
        self.update_pool()

    def pool_changed(self) -> None:
        self.update_pool()
