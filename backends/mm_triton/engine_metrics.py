"""The language engine's Triton custom metrics (one set per model instance, labelled model + instance).

    mm_engine_ttft_seconds             HISTOGRAM  submit (execute) -> the sequence's first token
    mm_engine_inter_token_seconds      HISTOGRAM  gap between successive tokens of one sequence
    mm_engine_running_sequences        GAUGE      sequences in the running batch
    mm_engine_waiting_sequences        GAUGE      admitted sequences not running yet (loading images or queued)
    mm_engine_kv_slots_used            GAUGE      KV cache slots held (back to 0 when idle)
    mm_engine_kv_slots_total           GAUGE      KV cache slots preallocated
    mm_engine_prompt_tokens_total      COUNTER    prompt tokens prefilled (image tokens included)
    mm_engine_generated_tokens_total   COUNTER    tokens generated
    mm_engine_requests_total           COUNTER    ended sequences by outcome: stop, length, or the error cause

    mm_phase_seconds{phase=queue|transfer|slot_wait|prefill|decode}   from ``on_sequence_timing`` (phases.py)

All of them come from the engine's own :class:`~mm_engine.stats.EngineObserver` hooks, called on its loop
thread (so is the loop's mark on the stub's heartbeat, ``on_loop_work``, :mod:`mm_triton.heartbeat`). Each
``pb_utils`` metric call is a round trip to tritonserver (:mod:`mm_triton.metric_flush`), so the
loop pays for none per step: a gauge is set only when its value changed, the token counters add up locally and
are incremented when a sequence ends (and at most every ``COUNTER_FLUSH_S`` while one runs), and the histograms
(TTFT, inter-token, the phases) go through a :class:`~mm_triton.metric_flush.DeferredHistograms` flusher thread
when one is given. Every observation is still recorded, with its value.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from mm_engine.api import ErrorCause, FinishReason
from mm_engine.stats import EngineObserver
from mm_engine.timing import SequenceTiming

from .heartbeat import Activity, hang_for_tests, heartbeat
from .metric_flush import DeferredHistograms
from .phases import Phase, PhaseMetrics, engine_phases

log = logging.getLogger(__name__)
TTFT_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]
ITL_BUCKETS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
OUTCOMES = tuple(r.value for r in FinishReason) + tuple(c.value for c in ErrorCause)
#: Longest time the token counters lag behind a running sequence (they are exact whenever one ends).
COUNTER_FLUSH_S = 1.0


class EngineMetrics(EngineObserver):
    """The engine's observer: every hook updates a Triton metric (under a lock: hooks may come from threads)."""

    def __init__(
        self,
        pb_utils: Any,
        model: str,
        instance: str,
        phases: PhaseMetrics | None = None,
        load_phase: Phase | None = None,
        deferred: DeferredHistograms | None = None,
    ) -> None:
        """``phases``: where the engine's per-sequence phases go; its image load is ``load_phase``.
        ``deferred``: the flusher the histograms go through (None: observed at once, on the caller's thread)."""
        mf = pb_utils.MetricFamily
        self._phases = phases
        self._load_phase = load_phase
        self._hang_name = f"{model}/engine"  # MM_TEST_HANG_FILE's name for this loop
        self._deferred = deferred
        self._gauge_values: dict[str, float] = {}  # the last value set on each gauge
        self._unsent = {"prompt": 0, "generated": 0}  # token counts not yet incremented on the counters
        self._counters_at = time.monotonic()
        labels = {"model": model, "instance": instance}
        self._lock = threading.Lock()
        self._families: list[Any] = []  # families must outlive their metrics

        def metric(name: str, help_: str, kind: Any, **kw: Any) -> Any:
            self._families.append(mf(name=name, description=help_, kind=kind))
            return self._families[-1].Metric(labels=labels, **kw)

        self._ttft = metric(
            "mm_engine_ttft_seconds", "Time from submit to a sequence's first token", mf.HISTOGRAM, buckets=TTFT_BUCKETS
        )
        self._itl = metric(
            "mm_engine_inter_token_seconds",
            "Time between successive tokens of a sequence",
            mf.HISTOGRAM,
            buckets=ITL_BUCKETS,
        )
        self._running = metric("mm_engine_running_sequences", "Sequences in the running batch", mf.GAUGE)
        self._waiting = metric("mm_engine_waiting_sequences", "Admitted sequences not running yet", mf.GAUGE)
        self._slots = metric("mm_engine_kv_slots_used", "KV cache slots held by sequences", mf.GAUGE)
        self._slots_total = metric("mm_engine_kv_slots_total", "KV cache slots preallocated", mf.GAUGE)
        self._prompt = metric(
            "mm_engine_prompt_tokens_total", "Prompt tokens prefilled (image tokens included)", mf.COUNTER
        )
        self._generated = metric("mm_engine_generated_tokens_total", "Tokens generated", mf.COUNTER)
        requests = mf(name="mm_engine_requests_total", description="Ended sequences by outcome", kind=mf.COUNTER)
        self._families.append(requests)
        self._outcomes = {o: requests.Metric(labels={**labels, "outcome": o}) for o in OUTCOMES}

    def on_loop_work(self, busy: bool) -> None:
        """The loop's iterations go on the stub's heartbeat: the watchdog restarts a stub whose loop is stuck."""
        heartbeat().beat(busy, Activity.ENGINE_LOOP)
        if busy:
            hang_for_tests(self._hang_name)

    def on_gauges(self, running: int, waiting: int, slots_used: int, slots_total: int) -> None:
        values = {"running": running, "waiting": waiting, "slots": slots_used, "slots_total": slots_total}
        with self._lock:
            for name, value in values.items():
                if self._gauge_values.get(name) != value:
                    getattr(self, f"_{name}").set(value)
                    self._gauge_values[name] = value
            if time.monotonic() - self._counters_at >= COUNTER_FLUSH_S:
                self._send_counters()

    def on_prompt_tokens(self, count: int) -> None:
        with self._lock:
            self._unsent["prompt"] += count

    def on_generation_tokens(self, count: int) -> None:
        with self._lock:
            self._unsent["generated"] += count

    def on_time_to_first_token(self, seconds: float) -> None:
        self._observe(self._ttft, seconds)

    def on_inter_token_latency(self, seconds: float) -> None:
        self._observe(self._itl, seconds)

    def on_finished(self, label: str) -> None:
        counter = self._outcomes.get(label)
        with self._lock:
            self._send_counters()  # exact once the sequence is over (before its answer goes out)
            if counter is not None:
                counter.increment(1)
        if counter is None:
            log.warning("engine metrics: unknown outcome %r", label)
        if self._deferred is not None:
            self._deferred.flush_soon()

    def on_sequence_timing(self, timing: SequenceTiming) -> None:
        if self._phases is not None:
            self._phases.observe(timing.request_id, engine_phases(timing, self._load_phase))

    def flush(self) -> None:
        """Every pending count and observation onto its metric now (tests; ``close``)."""
        with self._lock:
            self._send_counters()
        if self._deferred is not None:
            self._deferred.flush()

    def close(self) -> None:
        """The model unloads: flush, and stop the flusher thread."""
        with self._lock:
            self._send_counters()
        if self._deferred is not None:
            self._deferred.close()

    def _observe(self, histogram: Any, seconds: float) -> None:
        if self._deferred is not None:
            self._deferred.observe(histogram, seconds)
            return
        with self._lock:
            histogram.observe(seconds)

    def _send_counters(self) -> None:
        """Increment the token counters by what added up (under ``self._lock``)."""
        self._counters_at = time.monotonic()
        for name, metric in (("prompt", self._prompt), ("generated", self._generated)):
            count, self._unsent[name] = self._unsent[name], 0
            if count:
                metric.increment(count)
