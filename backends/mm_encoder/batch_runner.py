"""One encode batch: cache look-ups, ONE vision tower call over every missing image of every request, then
per request publishing (copy into the pool) and its answer. Runs on the batcher thread.

Failure isolation: a request that was cancelled, or whose publish failed (pool exhausted, ...), fails alone
and drops whatever it had published; a failed tower call fails the requests that needed it. Every cache
entry acquired for a request is either handed to a published transfer (released when that ends) or
released here, on every path.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mm_models.qwen2vl import EncodedImage, VisionEncoder
from mm_triton.phases import Phase
from mmtransfer import EmbedRef, SenderEndpoint, TransferCancelled

from .batcher import EncodeJob
from .cache import CachedEmbedding, EmbeddingCache

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Work:
    """A job's state inside one batch."""

    job: EncodeJob
    hits: dict[int, CachedEmbedding] = field(default_factory=dict)  # image index -> acquired, not yet published
    encoded: dict[int, EncodedImage] = field(default_factory=dict)
    refs: list[EmbedRef] = field(default_factory=list)


class BatchRunner:
    def __init__(
        self, vision: VisionEncoder, sender: SenderEndpoint, cache: EmbeddingCache, device: torch.device
    ) -> None:
        self.on_tower_call: Callable[[int], None] | None = None  # told the images of every tower call (a metric)
        self.vision = vision
        self.sender = sender
        self.cache = cache
        self._device = device

    def run(self, jobs: list[EncodeJob]) -> None:
        # the batcher thread starts on cuda:0: make this instance's GPU current for implicit allocations
        with torch.cuda.device(self._device) if self._device.type == "cuda" else nullcontext():
            started = time.perf_counter()
            works = []
            for job in jobs:
                job.clock.add(Phase.QUEUE, started - job.enqueued)
                if job.cancelled():
                    job.finish(
                        None, TransferCancelled(f"request {job.request_id or '-'} was cancelled before encoding")
                    )
                    continue
                job.clock.add(Phase.VISION, 0.0)  # every request reports every phase (0 when all cached)
                works.append(self._look_up(job))
            works = self._encode(works)
            for work in works:
                self._publish(work)

    def _look_up(self, job: EncodeJob) -> _Work:
        work = _Work(job)
        for i, im in enumerate(job.images):
            if im.key:
                entry = self.cache.acquire(im.key)
                if entry is not None:
                    work.hits[i] = entry
                    log.debug(
                        "request %s: embedding cache hit %s (%d tokens)", job.request_id, im.key[:12], entry.num_tokens
                    )
        return work

    def _encode(self, works: list[_Work]) -> list[_Work]:
        """One tower call for every image without a cache hit; returns the works still alive."""
        todo = [(w, i) for w in works for i in range(len(w.job.images)) if i not in w.hits]
        if not todo:
            return works
        try:
            for w, i in todo:  # a miss left unpreprocessed (the cache lost it since submit)
                im = w.job.images[i]
                if im.inputs is None:
                    with w.job.clock.measure(Phase.PREPROCESS):
                        im.inputs, im.image = self.vision.preprocess(im.image), None
            start = time.perf_counter()
            encoded = self.vision.encode_batch([w.job.images[i].inputs for w, i in todo])
            seconds = time.perf_counter() - start
        except BaseException as exc:  # noqa: BLE001 - every request that needed the call fails
            failed = {id(w) for w, _ in todo}
            for w in works:
                if id(w) in failed:
                    self._fail(w, exc)
            return [w for w in works if id(w) not in failed]
        if self.on_tower_call is not None:
            self.on_tower_call(len(todo))
        log.debug(
            "vision tower: %d image(s) of %d request(s), %d tokens in %.1f ms",
            len(todo),
            len({id(w) for w, _ in todo}),
            sum(e.num_tokens for e in encoded),
            seconds * 1e3,
        )
        for (w, i), enc in zip(todo, encoded):
            w.encoded[i] = enc
            w.job.images[i].inputs = None  # the pixels are not needed any more
        for w in {id(w): w for w, _ in todo}.values():
            w.job.clock.add(Phase.VISION, seconds)
        return works

    def _publish(self, work: _Work) -> None:
        job = work.job
        try:
            with job.clock.measure(Phase.PUBLISH):
                for i in range(len(job.images)):
                    work.refs.append(self._publish_one(work, i))
        except BaseException as exc:  # noqa: BLE001 - answered below, this request only
            self._fail(work, exc)
            return
        if job.cancelled():
            self._fail(
                work,
                TransferCancelled(
                    f"request {job.request_id or '-'} was cancelled; its {len(work.refs)} embedding(s) dropped"
                ),
            )
            return
        log.debug(
            "request %s: %d image(s) -> %s tokens", job.request_id, len(work.refs), [r.num_tokens for r in work.refs]
        )
        job.finish(work.refs, None)

    def _publish_one(self, work: _Work, i: int) -> EmbedRef:
        job = work.job
        entry = work.hits.pop(i, None)
        if entry is None:
            enc = work.encoded.pop(i)
            extras: dict[str, Any] = {"grid_thw": list(enc.grid_thw)}
            if not job.images[i].key:
                return self.sender.register(enc.embeds, extras, job.request_id)
            blocks, aux = self.sender.write_blocks(enc.embeds, extras)
            entry = self.cache.insert(job.images[i].key, blocks, aux.total_tokens, extras)
        try:
            return self.sender.publish(
                entry.blocks,
                entry.num_tokens,
                entry.extras,
                lambda _blocks, e=entry: self.cache.release(e),
                job.request_id,
            )
        except BaseException:
            self.cache.release(entry)
            raise

    def _fail(self, work: _Work, exc: BaseException) -> None:
        """Drop what the request published, release its unpublished cache entries, answer the error."""
        for ref in work.refs:
            self.sender.discard(ref.transfer_id, "request failed")
        work.refs.clear()
        for entry in work.hits.values():
            self.cache.release(entry)
        work.hits.clear()
        work.encoded.clear()
        work.job.finish(None, exc)
