"""The encode batcher: one thread that sends concurrent requests' images through the vision tower together.

Requests are queued as :class:`EncodeJob` (their images decoded, checked and mostly preprocessed by the
caller's thread, so that work overlaps the tower). The batcher thread takes the oldest job, then adds
later ones while their tokens fit ``max_batch_tokens`` and the oldest has waited less than
``max_delay_s``; a job is never split, and one larger than the budget runs alone. ``run_batch`` (the
service's) encodes, publishes and answers every job of the batch; it must not raise (a raise fails the
batch's unanswered jobs). What is queued when the batcher closes is failed with ``closed_error``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mm_triton.heartbeat import Activity, hang_for_tests, heartbeat
from mm_triton.phases import PhaseClock

log = logging.getLogger(__name__)
DEFAULT_MAX_BATCH_TOKENS = 8192
DEFAULT_MAX_DELAY_MS = 2


@dataclass
class PreparedImage:
    """One image of a job: decoded and checked; ``inputs`` (pixel_values, grid_thw) unless it was left to
    the batcher (a likely embedding-cache hit is not preprocessed)."""

    image: Any  # PIL image, dropped once preprocessed
    key: str  # embedding cache key, "" without a cache
    tokens: int
    inputs: tuple[Any, Any] | None = None


@dataclass(eq=False)
class EncodeJob:
    """One request's images on their way through the tower; ``done(refs, error)`` is called exactly once."""

    request_id: str
    images: list[PreparedImage]
    cancelled: Callable[[], bool]
    done: Callable[[list[Any] | None, BaseException | None], None]
    clock: PhaseClock = field(default_factory=PhaseClock)
    enqueued: float = field(default_factory=time.perf_counter)
    answered: bool = False

    @property
    def tokens(self) -> int:
        return sum(im.tokens for im in self.images)

    def finish(self, refs: list[Any] | None, error: BaseException | None) -> None:
        """Answer once (later calls are ignored); ``done`` must not raise, but a raise is only logged."""
        if self.answered:
            return
        self.answered = True
        try:
            self.done(refs, error)
        except Exception:  # noqa: BLE001 - an answer callback never stops the batcher
            log.exception("request %s: answering the encode failed", self.request_id)


def take_batch(queue: deque[EncodeJob], max_tokens: int) -> list[EncodeJob]:
    """Pop the oldest job and then, in order, every next one that keeps the batch within ``max_tokens``
    (stops at the first that does not fit, so no job is overtaken)."""
    batch = [queue.popleft()]
    total = batch[0].tokens
    while queue and total + queue[0].tokens <= max_tokens:
        total += queue[0].tokens
        batch.append(queue.popleft())
    return batch


class EncodeBatcher:
    def __init__(
        self,
        run_batch: Callable[[list[EncodeJob]], None],
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_delay_s: float = DEFAULT_MAX_DELAY_MS / 1e3,
        name: str = "mm_encoder",
        closed_error: Callable[[], BaseException] = lambda: RuntimeError("the encoder is closing"),
    ) -> None:
        if max_batch_tokens < 1:
            raise ValueError(f"{name}: max_encode_batch_tokens must be >= 1, got {max_batch_tokens}")
        if not 0 <= max_delay_s <= 1.0:
            raise ValueError(f"{name}: max_encode_delay_ms must be in [0, 1000], got {max_delay_s * 1e3:g}")
        self.max_batch_tokens = max_batch_tokens
        self.max_delay_s = max_delay_s
        self._run_batch = run_batch
        self._closed_error = closed_error
        self._hang_name = f"{name}/batch"  # MM_TEST_HANG_FILE's name for this thread (name: the instance's)
        self._queue: deque[EncodeJob] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self.batches = 0  # counters for tests and logs
        self.batched_jobs = 0
        self._thread = threading.Thread(target=self._loop, name=f"{name}-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: EncodeJob) -> None:
        """Queue ``job``; raises ``closed_error()`` once closing (the job is not answered then)."""
        with self._cond:
            if self._closing:
                raise self._closed_error()
            self._queue.append(job)
            self._cond.notify()

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def _next_batch(self) -> list[EncodeJob] | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            # hold the oldest job up to max_delay_s for company, unless the budget is already full
            until = self._queue[0].enqueued + self.max_delay_s
            while not self._closing and sum(j.tokens for j in self._queue) < self.max_batch_tokens:
                left = until - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._closing:
                return None
            return take_batch(self._queue, self.max_batch_tokens)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            self.batches += 1
            self.batched_jobs += len(batch)
            beat = heartbeat()  # a tower call stuck here is a hang outside any execute(): the watchdog sees it
            beat.beat(True, Activity.ENCODE_BATCH)
            try:
                hang_for_tests(self._hang_name)
                self._run_batch(batch)
            except BaseException as exc:  # noqa: BLE001 - a bug in run_batch: fail its jobs, keep serving
                log.exception("encode batch of %d request(s) failed", len(batch))
                for job in batch:
                    job.finish(None, exc)
            finally:
                beat.beat(False, Activity.ENCODE_BATCH)
        self._fail_queued()

    def _fail_queued(self) -> None:
        with self._cond:
            rest = list(self._queue)
            self._queue.clear()
        for job in rest:
            job.finish(None, self._closed_error())

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking jobs; the batch being encoded finishes, queued ones fail with ``closed_error``."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        self._fail_queued()
