"""Per-phase timing of every request, from the server itself: the ``mm_phase_seconds`` histograms.

    mm_phase_seconds{model, instance, phase}   HISTOGRAM   seconds one request spent in one phase

Phases (:class:`Phase`): ``queue`` (inside the model, before its work starts: the encoder's batcher queue,
the engine's loader queue), ``image_decode``, ``preprocess``, ``vision`` (the tower call the image went
through; a batch's whole call), ``publish`` (copy into the pool), ``transfer`` (the language side's pulls,
first pull issued -> last landed, continuations included), ``slot_wait`` (ready -> KV slot), ``prefill``,
``decode`` and ``response`` (building and sending the answer). Triton's own queue before ``execute`` is
its ``nv_inference_queue_duration_us``; the benchmark reads both. Each model reports the phases it runs;
every report is also logged at debug with the request id.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from mm_engine.timing import SequenceTiming

from .metric_flush import DeferredHistograms

log = logging.getLogger(__name__)
PHASE_METRIC = "mm_phase_seconds"
# 0.5 ms .. 60 s: a publish of a small embedding to the decode of 1024 tokens on a CPU
PHASE_BUCKETS = [
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
    60.0,
]


class Phase(enum.Enum):
    QUEUE = "queue"
    IMAGE_DECODE = "image_decode"
    PREPROCESS = "preprocess"
    VISION = "vision"
    PUBLISH = "publish"
    TRANSFER = "transfer"
    SLOT_WAIT = "slot_wait"
    PREFILL = "prefill"
    DECODE = "decode"
    RESPONSE = "response"


class PhaseClock:
    """Accumulates seconds per phase for one request (several images add up); not thread-safe."""

    def __init__(self) -> None:
        self.seconds: dict[Phase, float] = {}

    def add(self, phase: Phase, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + max(0.0, seconds)

    @contextmanager
    def measure(self, phase: Phase) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)


def engine_phases(timing: SequenceTiming, load_phase: Phase | None) -> dict[Phase, float]:
    """The engine's spans as phases; its image ``load`` becomes ``load_phase`` (``transfer`` on the language
    side) or is dropped (None: the monolithic loader reports preprocess and vision itself)."""
    names = {"queue": Phase.QUEUE, "slot_wait": Phase.SLOT_WAIT, "prefill": Phase.PREFILL, "decode": Phase.DECODE}
    out: dict[Phase, float] = {}
    for name, seconds in timing.phases().items():
        phase = load_phase if name == "load" else names.get(name)
        if phase is not None:
            out[phase] = seconds
    return out


def format_phases(seconds: Mapping[Phase, float]) -> str:
    return " ".join(f"{p.value}={s * 1e3:.2f}ms" for p, s in seconds.items())


class PhaseMetrics:
    """The ``mm_phase_seconds`` histograms of one model instance (thread-safe)."""

    def __init__(
        self,
        pb_utils: Any,
        model: str,
        instance: str,
        phases: Iterable[Phase] = tuple(Phase),
        deferred: DeferredHistograms | None = None,
    ) -> None:
        """``phases``: the ones this model runs (only those get a histogram); others are ignored. ``deferred``:
        observe through that flusher thread (the engine models: their loop thread pays no IPC), else at once."""
        mf = pb_utils.MetricFamily
        self._deferred = deferred
        self._family = mf(
            name=PHASE_METRIC, description="Seconds a request spent in each phase", kind=mf.HISTOGRAM
        )  # kept: a family must outlive its metrics
        self._model = model
        self._lock = threading.Lock()
        self._hist = {
            p: self._family.Metric(
                labels={"model": model, "instance": instance, "phase": p.value}, buckets=PHASE_BUCKETS
            )
            for p in phases
        }

    def observe(self, request_id: str, seconds: Mapping[Phase, float]) -> None:
        """Record one request's phases (never raises: timing must not fail a request)."""
        if not seconds:
            return
        try:
            with self._lock:
                for phase, value in seconds.items():
                    hist = self._hist.get(phase)
                    if hist is None:
                        continue
                    if self._deferred is not None:
                        self._deferred.observe(hist, max(0.0, float(value)))
                    else:
                        hist.observe(max(0.0, float(value)))
            if self._deferred is not None:
                self._deferred.flush_soon()  # once per request: its phases show up within milliseconds
            if log.isEnabledFor(logging.DEBUG):  # the formatting is not free: skip it unless it is logged
                log.debug("%s: request %s phases: %s", self._model, request_id, format_phases(seconds))
        except Exception:  # noqa: BLE001
            log.exception("%s: recording the phases of request %s failed", self._model, request_id)
