"""mm_bench.loadgen: the bounded Python load generator (no server: a fake request function)."""

from __future__ import annotations

import threading
import time

import pytest

from mm_bench import loadgen


def _fake(delay_s: float = 0.01, fail_on: int | None = None):
    active, peak, lock = [0], [0], threading.Lock()

    def call(step: int):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(delay_s)
            if step == fail_on:
                raise RuntimeError("boom")
            return [step, step + 1]
        finally:
            with lock:
                active[0] -= 1

    return call, peak


def test_closed_loop_bounded_concurrency_and_summary():
    call, peak = _fake()
    out = loadgen.closed_loop(call, steps=3, concurrency=4, requests=20, timeout_s=30)
    assert out["completed"] == 20 and out["errors"] == 0 and not out["timed_out"]
    assert peak[0] <= 4 and peak[0] >= 2
    assert 0 < out["p50_ms"] <= out["p90_ms"] <= out["p99_ms"] <= out["max_ms"]
    assert out["throughput"] > 0
    assert out["token_ids"] == {"step000": [[0, 1]], "step001": [[1, 2]], "step002": [[2, 3]]}


def test_errors_are_counted_not_raised():
    call, _ = _fake(fail_on=1)
    out = loadgen.closed_loop(call, steps=2, concurrency=2, requests=6, timeout_s=30)
    assert out["completed"] == 3 and out["errors"] == 3 and "boom" in out["first_error"]


def test_open_loop_rate():
    call, _ = _fake(delay_s=0.001)
    t0 = time.monotonic()
    out = loadgen.open_loop(call, steps=2, rate=200.0, requests=40, timeout_s=30, seed=1)
    assert out["completed"] == 40 and out["errors"] == 0
    assert time.monotonic() - t0 < 5


def test_bad_arguments():
    with pytest.raises(ValueError):
        loadgen.closed_loop(lambda s: [], steps=1, concurrency=0, requests=1, timeout_s=1)
    with pytest.raises(ValueError):
        loadgen.open_loop(lambda s: [], steps=1, rate=0, requests=1, timeout_s=1)
