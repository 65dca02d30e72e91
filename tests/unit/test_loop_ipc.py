"""No hidden round trips to tritonserver in the engine loop (issue 13): every pb_utils metric call and every
``is_cancelled()`` is an IPC in a stub. A stand-in pb_utils counts them per thread: the cancellation probe is
bounded by ``cancel_probe_interval_ms``, gauges are set only when they change, counters add up locally, and
the histograms are observed on the flusher thread, every value exactly once."""

from __future__ import annotations

import threading
import time
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from mm_engine.api import SamplingParams
from mm_params import ParamError, Params
from mm_triton.engine_metrics import EngineMetrics
from mm_triton.engine_model import DEFAULT_CANCEL_PROBE_INTERVAL_MS, cancel_probe_interval_s
from mm_triton.metric_flush import DeferredHistograms
from mm_triton.model_base import ModelBase
from mm_triton.phases import Phase, PhaseMetrics
from mm_triton.sinks import StreamSink

from ._engine_util import Case, build_request, wait_until

LOOP = "mm-engine-loop"


class _Calls:
    """Every IPC the stand-in sees: (thread name, kind)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def add(self, kind: str) -> None:
        with self.lock:
            self.seen.append((threading.current_thread().name, kind))

    def on(self, thread: str) -> Counter:
        with self.lock:
            return Counter(kind for name, kind in self.seen if name == thread)


class _Metric:
    def __init__(self, calls: _Calls, labels: dict) -> None:
        self.calls, self.labels, self.value, self.observed = calls, labels, 0.0, []

    def set(self, v: float) -> None:
        self.calls.add("set")
        self.value = v

    def increment(self, n: float) -> None:
        self.calls.add("increment")
        self.value += n

    def observe(self, v: float) -> None:
        self.calls.add("observe")
        self.observed.append(v)


def _pb(calls: _Calls) -> SimpleNamespace:
    made: dict = {}

    class Family:
        COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels, buckets=None):  # noqa: N802 - pb_utils' spelling
            m = made[(self.name, labels.get("outcome") or labels.get("phase"))] = _Metric(calls, labels)
            return m

    class Sender:
        def __init__(self, fail=False):
            self.fail = fail

        def send(self, response, flags=0):
            calls.add("send")
            if self.fail:
                raise RuntimeError("stream closed")

    class Request:
        def __init__(self, fail=False):
            self.sender = Sender(fail)

        def get_response_sender(self):
            return self.sender

        def is_cancelled(self):
            calls.add("is_cancelled")
            return False

    return SimpleNamespace(
        MetricFamily=Family,
        made=made,
        Request=Request,
        Tensor=lambda name, array: (name, np.asarray(array)),
        InferenceResponse=lambda output_tensors=None, error=None: output_tensors,
        TRITONSERVER_RESPONSE_COMPLETE_FINAL=1,
        get_input_tensor_by_name=lambda request, name: None,
    )


# ---- the cancellation probe ---------------------------------------------------------------------------------
def test_cancel_probe_interval_parameter():
    assert cancel_probe_interval_s(Params({}, {})) == DEFAULT_CANCEL_PROBE_INTERVAL_MS / 1000
    assert cancel_probe_interval_s(Params({"cancel_probe_interval_ms": "20"}, {})) == 0.02
    assert cancel_probe_interval_s(Params({}, {"MM_CANCEL_PROBE_INTERVAL_MS": "5"})) == 0.005
    for bad in ("0", "10001", "x"):
        with pytest.raises(ParamError, match="cancel_probe_interval_ms"):
            cancel_probe_interval_s(Params({"cancel_probe_interval_ms": bad}, {}))


def test_probe_asks_triton_at_most_once_per_interval_and_a_failed_send_cancels_at_once():
    calls = _Calls()
    pb = _pb(calls)
    request = pb.Request(fail=True)
    sink = StreamSink(pb, request, "r", ModelBase.cancellation_check(request, 0.2))
    start = time.monotonic()
    for _ in range(2000):  # a loop polling far faster than the interval
        assert not sink.cancelled()
    asked = calls.on(threading.current_thread().name)["is_cancelled"]
    assert asked <= 1 + (time.monotonic() - start) / 0.2
    sink.on_tokens([1], "a")  # the send fails: cancelled now, without asking Triton
    assert sink.cancelled()
    assert calls.on(threading.current_thread().name)["is_cancelled"] == asked


# ---- gauges and counters ------------------------------------------------------------------------------------
def test_gauges_are_set_only_when_their_value_changes():
    calls = _Calls()
    pb = _pb(calls)
    m = EngineMetrics(pb, "mm_language", "i0")
    for _ in range(100):
        m.on_gauges(1, 0, 1, 16)
    assert calls.on(threading.current_thread().name)["set"] == 4
    m.on_gauges(2, 0, 2, 16)
    assert calls.on(threading.current_thread().name)["set"] == 6
    assert pb.made[("mm_engine_running_sequences", None)].value == 2
    assert pb.made[("mm_engine_kv_slots_total", None)].value == 16


def test_token_counters_add_up_and_are_exact_when_a_sequence_ends():
    calls = _Calls()
    pb = _pb(calls)
    m = EngineMetrics(pb, "mm_language", "i0")
    m.on_prompt_tokens(300)
    for _ in range(100):
        m.on_generation_tokens(1)
    assert calls.on(threading.current_thread().name)["increment"] == 0
    m.on_finished("length")
    assert pb.made[("mm_engine_generated_tokens_total", None)].value == 100
    assert pb.made[("mm_engine_prompt_tokens_total", None)].value == 300
    assert pb.made[("mm_engine_requests_total", "length")].value == 1
    assert calls.on(threading.current_thread().name)["increment"] == 3


# ---- histograms through the flusher -------------------------------------------------------------------------
def test_deferred_histograms_observe_every_value_in_order_on_their_own_thread():
    calls = _Calls()
    hist = _Metric(calls, {})
    flusher = DeferredHistograms(name="flusher-test", max_delay_s=0.05)
    try:
        values = [i / 1000 for i in range(500)]
        for v in values:
            flusher.observe(hist, v)
        assert calls.on(threading.current_thread().name)["observe"] == 0  # nothing on the caller's thread
        wait_until(lambda: len(hist.observed) == len(values), timeout=5)  # max_delay_s, no flush_soon
        assert hist.observed == values and calls.on("flusher-test")["observe"] == len(values)
        flusher.observe(hist, 7.0)
        flusher.flush_soon()
        wait_until(lambda: hist.observed[-1:] == [7.0], timeout=5)
        flusher.observe(hist, 8.0)
    finally:
        flusher.close()
    assert hist.observed[-1] == 8.0 and flusher.pending == 0  # close observes what was left
    flusher.observe(hist, 9.0)  # after close: at once
    assert hist.observed[-1] == 9.0
    with pytest.raises(ValueError, match="max_delay_s"):
        DeferredHistograms(max_delay_s=0)


def test_engine_metrics_histograms_through_the_flusher_keep_their_values():
    calls = _Calls()
    pb = _pb(calls)
    flusher = DeferredHistograms(name="flusher-em", max_delay_s=10.0)
    phases = PhaseMetrics(pb, "mm_language", "i0", (Phase.DECODE,), deferred=flusher)
    m = EngineMetrics(pb, "mm_language", "i0", phases, deferred=flusher)
    gaps = [0.001 * (i % 7 + 1) for i in range(50)]
    m.on_time_to_first_token(0.25)
    for g in gaps:
        m.on_inter_token_latency(g)
    phases.observe("r", {Phase.DECODE: 0.5})  # a request's phases wake the flusher at once
    try:
        wait_until(lambda: len(pb.made[("mm_engine_inter_token_seconds", None)].observed) == len(gaps), timeout=5)
    finally:
        m.close()
    assert pb.made[("mm_engine_inter_token_seconds", None)].observed == gaps
    assert pb.made[("mm_engine_ttft_seconds", None)].observed == [0.25]
    assert pb.made[(("mm_phase_seconds"), "decode")].observed == [0.5]
    assert calls.on(threading.current_thread().name)["observe"] == 0


# ---- the real loop: IPCs per step ---------------------------------------------------------------------------
def _run_one_sequence(mono, encoder, calls, pb, tokens):
    from mm_engine import EngineConfig, LLMEngine

    flusher = DeferredHistograms(name="flusher-engine")
    phases = PhaseMetrics(pb, "mm_language", "i0", deferred=flusher)
    metrics = EngineMetrics(pb, "mm_language", "i0", phases, Phase.TRANSFER, deferred=flusher)
    engine = LLMEngine(mono.hf_model, mono.tokenizer, EngineConfig(max_seq_len=512, max_batch_size=2), observer=metrics)
    request = pb.Request()
    sink = StreamSink(pb, request, "r", ModelBase.cancellation_check(request, 0.05), phases=phases)
    try:
        generation = build_request(
            mono, encoder, "r", Case([], "hello", SamplingParams(max_tokens=tokens, ignore_eos=True))
        )
        generation.cancelled = sink.cancelled
        started = time.monotonic()
        engine.submit(generation, sink)
        wait_until(lambda: engine.stats().finished.get("length") == 1, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        engine.close()
        metrics.close()
    return engine.stats().steps, elapsed


def test_the_loop_pays_no_metric_ipc_per_step(mono, encoder):
    calls = _Calls()
    pb = _pb(calls)
    tokens = 48
    steps, elapsed = _run_one_sequence(mono, encoder, calls, pb, tokens)
    loop = calls.on(LOOP)
    print(
        f"\n{steps} steps in {elapsed:.2f} s, loop-thread IPCs: {dict(loop)}, "
        f"flusher: {dict(calls.on('flusher-engine'))}"
    )
    assert loop["send"] == tokens + 1  # one response per token and the FINAL: the only per-step IPC left
    assert loop["observe"] == 0  # every histogram on the flusher
    assert loop["set"] <= 8  # gauges: running/slots 0 -> 1 -> 0, waiting, slots_total once
    assert loop["increment"] <= 3 + 2 * (1 + elapsed)  # the token counters at the end (+ once a second)
    assert loop["is_cancelled"] <= 1 + elapsed / 0.05
    itl = pb.made[("mm_engine_inter_token_seconds", None)].observed
    assert len(itl) == tokens - 1 and all(v >= 0 for v in itl)  # every gap recorded
    assert pb.made[("mm_engine_generated_tokens_total", None)].value == tokens
    assert pb.made[("mm_phase_seconds", "decode")].observed and steps >= tokens - 1


def test_an_idle_loop_sleeps_until_a_submit(mono, encoder):
    """No sequence at all: the loop waits for a submit instead of polling every IDLE_POLL_S (it woke 50 times a
    second, and set four gauges each time, before)."""
    from mm_engine import EngineConfig, LLMEngine

    from ._engine_util import RecordingSink

    engine = LLMEngine(mono.hf_model, mono.tokenizer, EngineConfig(max_seq_len=512, max_batch_size=2))
    try:
        time.sleep(0.5)
        assert engine.stats().steps <= 2  # polling every 20 ms would be ~25
        sink = RecordingSink()
        engine.submit(build_request(mono, encoder, "r", Case([], "hi", SamplingParams(max_tokens=2))), sink)
        assert sink.wait(30).output is not None and len(sink.tokens) == 2
    finally:
        engine.close(5)
    assert not engine.running  # close wakes a sleeping loop
