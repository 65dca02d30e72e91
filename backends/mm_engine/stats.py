"""Engine statistics: a snapshot for polling and an observer for metrics hooks.

The Triton side subclasses :class:`EngineObserver` (e.g. to feed ``pb_utils.Metric`` histograms and
gauges) and passes it to the engine; every method is called on the engine loop thread, must be quick
and must not raise (the engine logs and ignores an exception). :meth:`LLMEngine.stats` returns an
:class:`EngineStats` at any time from any thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .timing import SequenceTiming

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """Counters since start and the gauges at the last step."""

    running: int = 0  # sequences holding a KV slot (prefilling or decoding)
    waiting: int = 0  # admitted, not yet running (images loading, or waiting for a slot)
    slots_used: int = 0
    slots_total: int = 0
    steps: int = 0
    prompt_tokens: int = 0  # prefilled
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # by finish reason / error cause value


class EngineObserver:
    """Hooks for metrics; the defaults do nothing. Called on the engine loop thread."""

    def on_loop_work(self, busy: bool) -> None:
        """Around the work of each loop iteration (not its idle wait): True before, False after. A host marks
        its liveness with it (a loop stuck in one iteration is a hang; ``mm_triton.heartbeat``)."""

    def on_gauges(self, running: int, waiting: int, slots_used: int, slots_total: int) -> None:
        """After each step (and when the engine idles)."""

    def on_prompt_tokens(self, count: int) -> None:
        """``count`` prompt tokens were prefilled."""

    def on_generation_tokens(self, count: int) -> None:
        """``count`` tokens were generated in one step."""

    def on_time_to_first_token(self, seconds: float) -> None:
        """From submit to a sequence's first token."""

    def on_inter_token_latency(self, seconds: float) -> None:
        """Between two consecutive tokens of one sequence."""

    def on_finished(self, label: str) -> None:
        """A sequence ended: a FinishReason value ("stop", "length") or an ErrorCause value."""

    def on_sequence_timing(self, timing: SequenceTiming) -> None:
        """A sequence finished normally (before its sink's ``on_finish``); ``timing.phases()`` splits its
        time into queue, load, slot wait, prefill and decode."""


class StepCounters:
    """The engine loop's running totals (loop thread writes; :meth:`snapshot` may run anywhere)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.steps = 0
        self._prompt = 0
        self._generated = 0
        self._finished: dict[str, int] = {}

    def add_prompt(self, count: int, observer: EngineObserver) -> None:
        with self._lock:
            self._prompt += count
        _call(observer.on_prompt_tokens, count)

    def add_generated(self, count: int, observer: EngineObserver) -> None:
        with self._lock:
            self._generated += count
        _call(observer.on_generation_tokens, count)

    def finished(self, label: str, observer: EngineObserver) -> None:
        with self._lock:
            self._finished[label] = self._finished.get(label, 0) + 1
        _call(observer.on_finished, label)

    def snapshot(self, running: int, waiting: int, slots_total: int) -> EngineStats:
        with self._lock:
            return EngineStats(
                running=running,
                waiting=waiting,
                slots_used=running,
                slots_total=slots_total,
                steps=self.steps,
                prompt_tokens=self._prompt,
                generation_tokens=self._generated,
                finished=dict(self._finished),
            )


def _call(fn: Callable[[int], None] | Callable[[str], None], arg: Any) -> None:
    try:
        fn(arg)
    except Exception:  # noqa: BLE001 - observers must not break the loop
        log.exception("engine observer %s raised", getattr(fn, "__qualname__", fn))
