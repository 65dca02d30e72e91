"""A bounded Python load generator, for machines where perf_analyzer cannot run.

Same load points as scripts/bench_pipeline.py drives perf_analyzer with: a closed loop of ``concurrency``
workers sending ``requests`` requests in total, or an open loop of Poisson arrivals at ``rate`` requests/s
(``requests`` arrivals). Requests take the data steps round-robin, like perf_analyzer's --input-data.
The result has the fields of :func:`mm_bench.perf.summarize_profile` (throughput over the span from the first
request to the last response, latency percentiles, errors, TOKEN_IDS per input), so the reports are alike.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

#: call(step index) -> TOKEN_IDS (list of ints); raises on a failed request
Call = Callable[[int], Sequence[int]]


def _one(call: Call, step: int, records: list, lock: threading.Lock) -> None:
    t0 = time.monotonic_ns()
    try:
        tokens = list(call(step))
        err = None
    except Exception as exc:  # noqa: BLE001 - counted, reported
        tokens, err = None, f"{type(exc).__name__}: {exc}"
    t1 = time.monotonic_ns()
    with lock:
        records.append((step, t0, t1, tokens, err))


def closed_loop(call: Call, steps: int, concurrency: int, requests: int, timeout_s: float) -> dict:
    """``concurrency`` workers, each sending its next request when the previous answered, ``requests`` in all."""
    if concurrency < 1 or requests < 1 or steps < 1:
        raise ValueError("concurrency, requests and steps must be >= 1")
    records: list = []
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + timeout_s

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            _one(call, i % steps, records, lock)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 1)
    return summarize(records, timed_out=any(t.is_alive() for t in threads))


def open_loop(
    call: Call, steps: int, rate: float, requests: int, timeout_s: float, seed: int = 0, max_workers: int = 64
) -> dict:
    """Poisson arrivals at ``rate``/s (exponential gaps, seeded), each request sent at its arrival time."""
    if rate <= 0 or requests < 1 or steps < 1:
        raise ValueError("rate must be > 0, requests and steps >= 1")
    rnd = random.Random(seed)
    records: list = []
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + timeout_s
    at = 0.0
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        for i in range(requests):
            at += rnd.expovariate(rate)
            delay = start + at - time.monotonic()
            if start + at > deadline:
                break
            if delay > 0:
                time.sleep(delay)
            pool.submit(_one, call, i % steps, records, lock)
    return summarize(records, timed_out=time.monotonic() > deadline)


def summarize(records: list, timed_out: bool = False) -> dict:
    import numpy as np

    ok = [r for r in records if r[4] is None]
    out: dict = {"completed": len(ok), "errors": len(records) - len(ok), "timed_out": timed_out}
    if len(records) > len(ok):
        out["first_error"] = next(r[4] for r in records if r[4] is not None)
    if ok:
        lat = np.array([(r[2] - r[1]) / 1e6 for r in ok])
        span_s = (max(r[2] for r in ok) - min(r[1] for r in ok)) / 1e9
        out.update(
            {
                "throughput": len(ok) / span_s if span_s > 0 else None,
                "span_s": span_s,
                "p50_ms": float(np.percentile(lat, 50)),
                "p90_ms": float(np.percentile(lat, 90)),
                "p99_ms": float(np.percentile(lat, 99)),
                "avg_ms": float(lat.mean()),
                "max_ms": float(lat.max()),
            }
        )
    tokens: dict[str, set] = {}
    for step, _t0, _t1, ids, _err in ok:
        tokens.setdefault(f"step{step:03d}", set()).add(tuple(ids))
    out["token_ids"] = {k: [list(t) for t in sorted(v)] for k, v in tokens.items()}
    return out
