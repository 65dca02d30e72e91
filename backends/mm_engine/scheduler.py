"""Scheduler: the engine's waiting side, between ``submit`` threads, loader threads and the loop.

- ``submit`` (any thread) -> :meth:`Intake.offer`: bounded by ``max_queue_size`` sequences admitted
  but not yet holding a KV slot (QUEUE_FULL beyond), refused once closing (SHUTDOWN).
- Image loads run on ``loader_threads`` threads (:meth:`Intake.start_load`), so pulls overlap the
  decode steps; a finished load is handed back to the loop through the same condition variable.
- The loop thread drains both (:meth:`Intake.take`) and keeps the sequences that wait for a slot in a
  :class:`WaitQueue`: ready ones join the batch first come, first served, when a slot is free.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mm_models.qwen2vl import EncodedImage

from .api import EngineError, ErrorCause
from .sequence import SeqState, Sequence

log = logging.getLogger(__name__)


@dataclass
class Landed:
    """A finished image load: its images, or the exception ``load`` raised."""

    seq: Sequence
    images: list[EncodedImage] | None
    error: BaseException | None


@dataclass
class Drained:
    """What the loop takes from the intake in one go."""

    new: list[Sequence] = field(default_factory=list)
    landed: list[Landed] = field(default_factory=list)
    closing: bool = False


class Intake:
    """Thread-safe hand-over from submit and loader threads to the loop thread."""

    def __init__(self, max_queue_size: int, loader_threads: int) -> None:
        self._max_waiting = max_queue_size
        self._cond = threading.Condition()
        self._new: list[Sequence] = []
        self._landed: list[Landed] = []
        self._waiting = 0  # admitted, not yet holding a slot, not ended
        self._closing = False
        self._pool = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="mm-engine-load")

    @property
    def waiting(self) -> int:
        return self._waiting

    def offer(self, seq: Sequence) -> None:
        """Admit ``seq`` or raise EngineError (SHUTDOWN, QUEUE_FULL) at once."""
        with self._cond:
            if self._closing:
                raise EngineError(ErrorCause.SHUTDOWN, "the language engine is shutting down")
            if self._waiting >= self._max_waiting:
                raise EngineError(
                    ErrorCause.QUEUE_FULL,
                    f"engine queue full: {self._waiting} requests waiting (max_queue_size "
                    f"{self._max_waiting}); retry later",
                )
            self._waiting += 1
            self._new.append(seq)
            self._cond.notify()

    def left_queue(self) -> None:
        """A waiting sequence got a slot or ended (loop thread)."""
        with self._cond:
            self._waiting -= 1

    def start_load(self, seq: Sequence) -> None:
        """Run ``seq``'s image loader on a loader thread."""
        self._pool.submit(self._load, seq)

    def _load(self, seq: Sequence) -> None:
        images: list[EncodedImage] | None = None
        error: BaseException | None = None
        timing = seq.timing
        timing.load_started = time.monotonic()  # type: ignore[union-attr]
        try:
            if seq.cancelled_or_ended():
                # Skipped, not loaded: the loop then reports the cancel/deadline cause, never "returned None".
                raise RuntimeError("the sequence ended before its images were loaded")
            images = seq.request.images.load(seq.cancelled_or_ended)  # type: ignore[union-attr]
        except BaseException as e:  # noqa: BLE001 - reported as IMAGE_LOAD by the loop
            error = e
        timing.load_ended = time.monotonic()  # type: ignore[union-attr]  # read by the loop after the hand-over
        with self._cond:
            self._landed.append(Landed(seq, images, error))
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def take(self, wait_s: float | None) -> Drained:
        """Everything new; waits up to ``wait_s`` first when nothing is there (0: never waits; None: until a
        submit, a landed load or close)."""
        with self._cond:
            if (wait_s is None or wait_s > 0) and not (self._new or self._landed or self._closing):
                self._cond.wait(wait_s)
            out = Drained(self._new, self._landed, self._closing)
            self._new, self._landed = [], []
            return out

    def close(self) -> None:
        """Refuse new submits; the loop sees ``closing`` at its next take."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def shutdown_pool(self) -> None:
        """Stop the loader threads' queue (running loads finish and are dropped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class WaitQueue:
    """Sequences admitted but not holding a slot (LOADING or READY), in arrival order (loop thread)."""

    def __init__(self) -> None:
        self._seqs: deque[Sequence] = deque()

    def __len__(self) -> int:
        return len(self._seqs)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(list(self._seqs))

    def add(self, seq: Sequence) -> None:
        self._seqs.append(seq)

    def remove(self, seq: Sequence) -> None:
        self._seqs.remove(seq)

    def next_ready(self) -> Sequence | None:
        """The earliest-arrived READY sequence (a later one may overtake one still loading)."""
        for seq in self._seqs:
            if seq.state is SeqState.READY:
                return seq
        return None

    def has_ready(self) -> bool:
        return any(s.state is SeqState.READY for s in self._seqs)

    def drain(self) -> list[Sequence]:
        out = list(self._seqs)
        self._seqs.clear()
        return out
