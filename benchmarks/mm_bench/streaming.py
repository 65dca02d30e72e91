"""Token-level load figures: requests/s, TTFT and inter-token latency from per-response time stamps.

A record is ``(t_request_ns, [t_token_ns, ...], error)``: when the request was sent and when each token
response arrived. perf_analyzer's ``--streaming`` profile export gives exactly that (its last response per
request is the summary carrying FINISH_REASON: dropped, it holds no token); the in-process load generator
(:func:`closed_loop`, :func:`open_loop`) records it from the engine's ``on_tokens`` calls.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Callable, Mapping, Sequence

import numpy as np

Record = tuple[int, list[int], str | None]


def records_from_profile(export: Mapping, summary_response: bool = True) -> list[Record]:
    """perf_analyzer ``--profile-export-file`` of a ``--streaming`` run -> records (errors: no responses)."""
    out: list[Record] = []
    for exp in export.get("experiments", []):
        for req in exp.get("requests", []):
            stamps = list(req.get("response_timestamps") or [])
            if summary_response and stamps:
                stamps = stamps[:-1]
            out.append((int(req["timestamp"]), [int(t) for t in stamps], None if stamps else "no token"))
    return out


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if len(values) else None


def summarize(records: Sequence[Record]) -> dict:
    """completed / errors, requests/s and tokens/s over the span (first request -> last token), TTFT, inter-token
    latency (every gap between two tokens of one request) and end-to-end latency, p50 / p99 in ms."""
    ok = [r for r in records if r[2] is None and r[1]]
    out: dict = {"completed": len(ok), "errors": len(records) - len(ok)}
    if not ok:
        return out
    span_s = (max(r[1][-1] for r in ok) - min(r[0] for r in ok)) / 1e9
    ttft = [(r[1][0] - r[0]) / 1e6 for r in ok]
    itl = [(b - a) / 1e6 for r in ok for a, b in zip(r[1], r[1][1:])]
    latency = [(r[1][-1] - r[0]) / 1e6 for r in ok]
    tokens = sum(len(r[1]) for r in ok)
    out.update(
        {
            "span_s": span_s,
            "rps": len(ok) / span_s if span_s > 0 else None,
            "tokens_per_s": tokens / span_s if span_s > 0 else None,
            "tokens_per_request": tokens / len(ok),
            "ttft_p50_ms": _pct(ttft, 50),
            "ttft_p99_ms": _pct(ttft, 99),
            "itl_p50_ms": _pct(itl, 50),
            "itl_p99_ms": _pct(itl, 99),
            "latency_p50_ms": _pct(latency, 50),
            "latency_p99_ms": _pct(latency, 99),
        }
    )
    return out


# ---- in-process load: submit(index, on_token, done) starts one request; the generator waits for done -----
#: submit(step, on_token() -> None, done(error or None) -> None) -> None; must not block on model work
Submit = Callable[[int, Callable[[], None], Callable[[str | None], None]], None]


def _run_one(submit: Submit, step: int, records: list, lock: threading.Lock) -> threading.Event:
    stamps: list[int] = []
    finished = threading.Event()
    t0 = time.monotonic_ns()

    def on_token() -> None:
        stamps.append(time.monotonic_ns())

    def done(error: str | None) -> None:
        with lock:
            records.append((t0, stamps, error))
        finished.set()

    try:
        submit(step, on_token, done)
    except Exception as exc:  # noqa: BLE001 - a refused request is a counted error
        done(f"{type(exc).__name__}: {exc}")
    return finished


def closed_loop(submit: Submit, steps: int, concurrency: int, requests: int, timeout_s: float) -> list[Record]:
    """``concurrency`` workers, each starting its next request when the previous ended, ``requests`` in all."""
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
            _run_one(submit, i % steps, records, lock).wait(max(0.0, deadline - time.monotonic()))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 1)
    return list(records)


def open_loop(submit: Submit, steps: int, rate: float, requests: int, timeout_s: float, seed: int = 0) -> list[Record]:
    """Poisson arrivals at ``rate`` requests/s (seeded), each started at its arrival time."""
    rnd = random.Random(seed)
    records: list = []
    lock = threading.Lock()
    pending = []
    start = time.monotonic()
    at = 0.0
    for i in range(requests):
        at += rnd.expovariate(rate)
        if at > timeout_s:
            break
        delay = start + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        pending.append(_run_one(submit, i % steps, records, lock))
    for event in pending:
        event.wait(max(0.0, start + timeout_s - time.monotonic()))
    return list(records)
