"""mm_bench.streaming: TTFT / inter-token figures from time stamps, and the in-process load shapes."""

from __future__ import annotations

import threading

import pytest

from mm_bench import streaming

MS = 1_000_000


def test_summarize_ttft_itl_and_rates():
    records = [(0, [10 * MS, 12 * MS, 14 * MS], None), (5 * MS, [25 * MS, 26 * MS], None), (0, [], "boom")]
    out = streaming.summarize(records)
    assert out["completed"] == 2 and out["errors"] == 1
    assert out["span_s"] == pytest.approx(0.026)
    assert out["rps"] == pytest.approx(2 / 0.026) and out["tokens_per_s"] == pytest.approx(5 / 0.026)
    assert out["ttft_p50_ms"] == pytest.approx(15.0)  # 10 and 20
    assert out["itl_p50_ms"] == pytest.approx(2.0)  # gaps 2, 2, 1
    assert out["latency_p99_ms"] == pytest.approx(20.93)
    assert streaming.summarize([]) == {"completed": 0, "errors": 0}


def test_records_from_a_streaming_profile_drop_the_summary_response():
    export = {
        "experiments": [
            {
                "requests": [
                    {"timestamp": 100, "response_timestamps": [150, 160, 161]},
                    {"timestamp": 200, "response_timestamps": []},
                ]
            }
        ]
    }
    assert streaming.records_from_profile(export) == [(100, [150, 160], None), (200, [], "no token")]


def _fake_submit(tokens: int, fail_step: int | None = None):
    active, peak, lock = [0], [0], threading.Lock()

    def submit(step, on_token, done):
        if step == fail_step:
            raise RuntimeError("queue full")
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])

        def run():
            for _ in range(tokens):
                on_token()
            with lock:
                active[0] -= 1
            done(None)

        threading.Timer(0.01, run).start()

    return submit, peak


def test_closed_loop_keeps_the_concurrency_and_counts_refusals():
    submit, peak = _fake_submit(3, fail_step=2)
    records = streaming.closed_loop(submit, steps=4, concurrency=3, requests=9, timeout_s=10)
    assert len(records) == 9 and sum(1 for r in records if r[2]) == 2  # i = 2 and 6 hit step 2
    assert all(len(r[1]) == 3 for r in records if r[2] is None)
    assert 1 <= peak[0] <= 3


def test_open_loop_sends_every_arrival():
    submit, _ = _fake_submit(2)
    records = streaming.open_loop(submit, steps=2, rate=200.0, requests=10, timeout_s=10)
    assert len(records) == 10 and all(r[2] is None for r in records)
