"""Per-phase breakdown of a load point from the server's own histograms (``mm_phase_seconds``).

Given two scrapes of the metrics port (before and after a point; :func:`harness.parse_metrics` format:
``{(name, ((label, value), ...)): value}``), :func:`phase_breakdown` gives, per model and phase, how many
requests were observed, their mean and their p50 (linear inside the histogram bucket, as Prometheus'
``histogram_quantile``). Triton's own queue (before ``execute``) comes from its per-model
``nv_inference_queue_duration_us`` / ``nv_inference_request_success`` counters, as phase ``triton_queue``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping

PHASE_METRIC = "mm_phase_seconds"  # as mm_triton.phases.PHASE_METRIC (no Triton import here)
Metrics = Mapping[tuple[str, tuple[tuple[str, str], ...]], float]


def _series(metrics: Metrics, name: str) -> dict[tuple[str, str, str], float]:
    """(model, phase, le) -> value summed over instances; le is "" for _sum/_count."""
    out: dict[tuple[str, str, str], float] = defaultdict(float)
    for (metric, labels), value in metrics.items():
        if metric != name:
            continue
        d = dict(labels)
        out[(d.get("model", ""), d.get("phase", ""), d.get("le", ""))] += value
    return out


def quantile_from_buckets(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of cumulative ``(upper bound, count)`` buckets (sorted, +Inf last); None if empty.
    Linear interpolation inside the bucket; a quantile in the +Inf bucket is its lower bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank and count > below:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def phase_breakdown(before: Metrics, after: Metrics) -> dict[str, dict[str, dict[str, float | None]]]:
    """{model: {phase: {"count", "mean_ms", "p50_ms"}}} over what happened between the two scrapes."""
    deltas: dict[str, dict[tuple[str, str, str], float]] = {}
    for suffix in ("_bucket", "_sum", "_count"):
        a, b = _series(after, PHASE_METRIC + suffix), _series(before, PHASE_METRIC + suffix)
        deltas[suffix] = {k: v - b.get(k, 0.0) for k, v in a.items()}
    out: dict[str, dict[str, dict[str, float | None]]] = defaultdict(dict)
    for (model, phase, _), count in sorted(deltas["_count"].items()):
        if count <= 0:
            continue
        total = deltas["_sum"].get((model, phase, ""), 0.0)
        buckets = sorted(
            ((float(le), c) for (m, p, le), c in deltas["_bucket"].items() if m == model and p == phase),
            key=lambda x: x[0],
        )
        p50 = quantile_from_buckets(buckets, 0.5)
        out[model][phase] = {
            "count": count,
            "mean_ms": 1e3 * total / count,
            "p50_ms": None if p50 is None else 1e3 * p50,
        }
    _add_triton_queue(before, after, out)
    return dict(out)


def _add_triton_queue(before: Metrics, after: Metrics, out: dict) -> None:
    def per_model(metrics: Metrics, name: str) -> dict[str, float]:
        acc: dict[str, float] = defaultdict(float)
        for (metric, labels), value in metrics.items():
            if metric == name:
                acc[dict(labels).get("model", "")] += value
        return acc

    qa, qb = per_model(after, "nv_inference_queue_duration_us"), per_model(before, "nv_inference_queue_duration_us")
    na, nb = per_model(after, "nv_inference_request_success"), per_model(before, "nv_inference_request_success")
    for model in qa:
        n = na.get(model, 0.0) - nb.get(model, 0.0)
        if n > 0 and model in out:
            mean_us = (qa[model] - qb.get(model, 0.0)) / n
            out[model]["triton_queue"] = {"count": n, "mean_ms": mean_us / 1e3, "p50_ms": None}


ORDER = (
    "triton_queue",
    "queue",
    "image_decode",
    "preprocess",
    "vision",
    "publish",
    "transfer",
    "slot_wait",
    "prefill",
    "decode",
    "response",
)


def format_breakdown(breakdown: Mapping[str, Mapping[str, Mapping[str, float | None]]]) -> list[str]:
    """One line per model: ``model: phase mean/p50 ms ...`` in pipeline order."""
    lines = []
    for model, phases in sorted(breakdown.items()):
        parts = []
        for phase in sorted(phases, key=lambda p: ORDER.index(p) if p in ORDER else len(ORDER)):
            s = phases[phase]
            p50 = "-" if s["p50_ms"] is None else f"{s['p50_ms']:.1f}"
            parts.append(f"{phase} {s['mean_ms']:.1f}/{p50}")
        lines.append(f"    {model} (mean/p50 ms): " + ", ".join(parts))
    return lines


class InProcessPhases:
    """The same breakdown without Triton: an engine observer (``on_sequence_timing``) plus the monolithic
    loader's ``report(clock)``; :meth:`take` returns the samples since the last take, as
    :func:`phase_breakdown` does for one model."""

    def __init__(self) -> None:
        import threading

        from mm_engine.stats import EngineObserver

        self._lock = threading.Lock()
        self._samples: dict[str, list[float]] = defaultdict(list)
        outer = self

        class _Observer(EngineObserver):
            def on_sequence_timing(self, timing) -> None:
                from mm_triton.phases import engine_phases

                outer._add({p.value: s for p, s in engine_phases(timing, None).items()})

        self.observer = _Observer()

    def report(self, clock) -> None:
        self._add({p.value: s for p, s in clock.seconds.items()})

    def _add(self, seconds: Mapping[str, float]) -> None:
        with self._lock:
            for phase, value in seconds.items():
                self._samples[phase].append(value)

    def take(self) -> dict[str, dict[str, float | None]]:
        with self._lock:
            samples, self._samples = self._samples, defaultdict(list)
        out: dict[str, dict[str, float | None]] = {}
        for phase, values in samples.items():
            ordered = sorted(values)
            mid = len(ordered) // 2
            p50 = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
            out[phase] = {"count": float(len(values)), "mean_ms": 1e3 * sum(values) / len(values), "p50_ms": 1e3 * p50}
        return out
