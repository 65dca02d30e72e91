"""Histogram observations off the engine loop's thread.

Every ``pb_utils`` metric call in a Python-backend stub is a round trip to tritonserver over shared memory
(measured in a stub on the 2-core CPU machine: ``observe`` 10-19 us, ``increment`` 14-17 us alone; they may
release the GIL while they wait, so beside another runnable Python thread one costs the caller up to the
interpreter's switch interval, 5 ms: 0.1-4 ms measured, docs/BENCHMARKS.md section 6). The
engine's loop thread observed one inter-token latency per token and its phases at every sequence end. Here
hot threads only queue ``(histogram, value)`` pairs (a list append under a lock); one daemon thread at
lowered priority (nice +10) observes them, every value exactly as queued, in queue order:

- when a sequence ended (:meth:`DeferredHistograms.flush_soon`), so a scrape after a request's answer sees
  its observations within milliseconds;
- at the latest ``max_delay_s`` after the first pending value (a long generation still shows up live);
- on :meth:`close` (the model's ``finalize``), synchronously: nothing queued is lost.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

#: Longest time a queued observation waits for the flusher while nothing calls ``flush_soon``.
DEFAULT_MAX_DELAY_S = 1.0
_FLUSHER_NICE = 10  # below the loop thread: the flusher runs when a core is free


class DeferredHistograms:
    """Queue of histogram observations, observed on one background thread (thread-safe)."""

    def __init__(self, name: str = "mm-metrics-flush", max_delay_s: float = DEFAULT_MAX_DELAY_S) -> None:
        if not max_delay_s > 0:
            raise ValueError(f"max_delay_s must be > 0, got {max_delay_s!r}")
        self.max_delay_s = max_delay_s
        self._cond = threading.Condition()
        self._pending: list[tuple[Any, float]] = []
        self._first_at = 0.0  # when the oldest pending value was queued
        self._wake = False
        self._closed = False
        self._flush_lock = threading.Lock()  # one batch at a time: values keep their queue order
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def observe(self, histogram: Any, value: float) -> None:
        """Queue ``histogram.observe(value)`` (never blocks on tritonserver). After :meth:`close`: at once."""
        with self._cond:
            if not self._closed:
                if not self._pending:
                    self._first_at = time.monotonic()
                    self._cond.notify()  # starts the flusher's max_delay_s timer
                self._pending.append((histogram, value))
                return
        _observe_all([(histogram, value)])

    def flush_soon(self) -> None:
        """Wake the flusher now (a sequence ended: its observations should be visible soon)."""
        with self._cond:
            if self._pending:
                self._wake = True
                self._cond.notify()

    def flush(self) -> None:
        """Observe everything queued, on the calling thread (tests, close)."""
        with self._flush_lock:
            with self._cond:
                batch, self._pending = self._pending, []
            _observe_all(batch)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the flusher and observe whatever is still queued; later observations happen at once."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        self.flush()

    def _due(self) -> bool:
        return bool(self._pending) and (self._wake or time.monotonic() - self._first_at >= self.max_delay_s)

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _FLUSHER_NICE)
        except (OSError, AttributeError):  # not Linux, or not allowed: run at the normal priority
            log.debug("metrics flusher: could not lower its priority", exc_info=True)
        while True:
            with self._cond:
                while not (self._closed or self._due()):
                    left = self._first_at + self.max_delay_s - time.monotonic() if self._pending else None
                    self._cond.wait(left)
                self._wake = False
                if self._closed:
                    return  # close() flushes the rest on its own thread
            self.flush()


def _observe_all(batch: list[tuple[Any, float]]) -> None:
    for histogram, value in batch:
        try:
            histogram.observe(value)
        except Exception:  # noqa: BLE001 - a metric must never break the flusher
            log.exception("observing a histogram failed")
