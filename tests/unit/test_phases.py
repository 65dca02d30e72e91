"""Per-phase timing arithmetic: the engine's SequenceTiming spans, their mapping to phases, the clock, the
histogram recorder (with a stand-in for pb_utils' metric families), and the engine stamping real runs."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from mm_engine.timing import SequenceTiming
from mm_triton.engine_metrics import EngineMetrics
from mm_triton.phases import PHASE_BUCKETS, PHASE_METRIC, Phase, PhaseClock, PhaseMetrics, engine_phases


def test_spans_of_an_image_request():
    t = SequenceTiming(
        "r", arrival=10.0, load_started=10.5, load_ended=11.25, admitted=12.0, first_token=12.5, finished=14.0
    )
    assert t.phases() == {"queue": 0.5, "load": 0.75, "slot_wait": 0.75, "prefill": 0.5, "decode": 1.5}
    # the spans tile the request: nothing is counted twice or lost
    assert sum(t.phases().values()) == pytest.approx(t.finished - t.arrival)


def test_text_only_request_waits_from_arrival_and_has_no_load():
    t = SequenceTiming("r", arrival=1.0, admitted=1.25, first_token=2.0, finished=2.0)
    assert t.phases() == {"slot_wait": 0.25, "prefill": 0.75, "decode": 0.0}


def test_missing_points_leave_phases_out_and_negative_spans_clip():
    assert SequenceTiming("r", arrival=1.0).phases() == {}
    t = SequenceTiming("r", arrival=5.0, load_started=4.0, load_ended=6.0)  # a clock mix-up: never negative
    assert t.phases() == {"queue": 0.0, "load": 2.0}


def test_engine_phases_maps_the_load():
    t = SequenceTiming("r", arrival=0.0, load_started=0.1, load_ended=0.3, admitted=0.4, first_token=0.6, finished=1.0)
    lang = engine_phases(t, Phase.TRANSFER)
    assert set(lang) == {Phase.QUEUE, Phase.TRANSFER, Phase.SLOT_WAIT, Phase.PREFILL, Phase.DECODE}
    assert lang[Phase.TRANSFER] == pytest.approx(0.2)
    mono = engine_phases(t, None)
    assert Phase.TRANSFER not in mono and len(mono) == 4


def test_clock_accumulates_per_phase():
    clock = PhaseClock()
    clock.add(Phase.PUBLISH, 0.25)
    clock.add(Phase.PUBLISH, 0.5)
    clock.add(Phase.VISION, -1.0)
    with clock.measure(Phase.PREPROCESS):
        pass
    assert clock.seconds[Phase.PUBLISH] == 0.75 and clock.seconds[Phase.VISION] == 0.0
    assert 0.0 <= clock.seconds[Phase.PREPROCESS] < 0.5
    with pytest.raises(RuntimeError), clock.measure(Phase.DECODE):
        raise RuntimeError("counted anyway")
    assert Phase.DECODE in clock.seconds


class _Metric:
    def __init__(self, labels, buckets):
        self.labels, self.buckets, self.observed = labels, buckets, []

    def observe(self, v):
        self.observed.append(v)

    def increment(self, n):
        pass

    def set(self, v):
        pass


class _Family:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

    def __init__(self, name, description, kind):
        self.name, self.kind, self.made = name, kind, []
        _Family.all.append(self)

    def Metric(self, labels, buckets=None):  # noqa: N802 - pb_utils' spelling
        self.made.append(_Metric(labels, buckets))
        return self.made[-1]


@pytest.fixture
def pb():
    _Family.all = []
    return SimpleNamespace(MetricFamily=_Family)


def _phase_hists(family_list):
    fam = next(f for f in family_list if f.name == PHASE_METRIC)
    assert fam.kind == _Family.HISTOGRAM
    return {m.labels["phase"]: m for m in fam.made}


def test_phase_metrics_observe_and_log(pb, caplog):
    pm = PhaseMetrics(pb, "mm_encoder", "mm_encoder_0", (Phase.QUEUE, Phase.VISION))
    hists = _phase_hists(_Family.all)
    assert set(hists) == {"queue", "vision"}
    assert hists["vision"].labels == {"model": "mm_encoder", "instance": "mm_encoder_0", "phase": "vision"}
    assert hists["vision"].buckets == PHASE_BUCKETS and PHASE_BUCKETS == sorted(PHASE_BUCKETS)
    with caplog.at_level(logging.DEBUG, logger="mm_triton.phases"):
        pm.observe("req-7", {Phase.VISION: 0.02, Phase.QUEUE: 0.001, Phase.PREFILL: 9.0})  # prefill: not run here
    assert hists["vision"].observed == [0.02] and hists["queue"].observed == [0.001]
    assert "req-7" in caplog.text and "vision=20.00ms" in caplog.text


def test_engine_metrics_forward_sequence_timing(pb):
    pm = PhaseMetrics(pb, "mm_language", "i0")
    em = EngineMetrics(pb, "mm_language", "i0", pm, Phase.TRANSFER)
    em.on_sequence_timing(
        SequenceTiming("r", arrival=0.0, load_started=0.0, load_ended=0.5, admitted=0.5, first_token=0.75, finished=1.0)
    )
    hists = _phase_hists(_Family.all)
    assert hists["transfer"].observed == [0.5] and hists["prefill"].observed == [0.25]
    assert hists["decode"].observed == [0.25] and hists["image_decode"].observed == []


def test_engine_stamps_every_point(mono, encoder):
    """A real engine run (tiny model, CPU): one timing per finished sequence, its points in order, and the
    phases tile the request's time in the engine (no gap, nothing twice)."""
    import time

    from mm_engine import EngineConfig, EngineObserver, LLMEngine, SamplingParams

    from ._engine_util import Case, RecordingSink, build_request, random_image

    class Obs(EngineObserver):
        def __init__(self):
            self.timings = []

        def on_sequence_timing(self, timing):
            self.timings.append(timing)

    obs = Obs()
    engine = LLMEngine(mono.hf_model, mono.tokenizer, EngineConfig(max_seq_len=2048, max_batch_size=2), observer=obs)
    try:
        cases = [
            Case([random_image(1, 56, 56)], "describe", SamplingParams(max_tokens=4)),
            Case([], "hello", SamplingParams(max_tokens=3)),
        ]
        sinks = [RecordingSink() for _ in cases]
        submitted = time.monotonic()
        for i, (case, sink) in enumerate(zip(cases, sinks)):
            engine.submit(build_request(mono, encoder, f"t{i}", case), sink)
        for sink in sinks:
            sink.wait()
    finally:
        engine.close()
    by_id = {t.request_id: t for t in obs.timings}
    assert set(by_id) == {"t0", "t1"}
    img, txt = by_id["t0"], by_id["t1"]
    points = [img.arrival, img.load_started, img.load_ended, img.admitted, img.first_token, img.finished]
    assert points == sorted(points) and submitted <= img.arrival
    assert set(img.phases()) == {"queue", "load", "slot_wait", "prefill", "decode"}
    assert sum(img.phases().values()) == pytest.approx(img.finished - img.arrival)
    assert txt.load_started is None and set(txt.phases()) == {"slot_wait", "prefill", "decode"}
