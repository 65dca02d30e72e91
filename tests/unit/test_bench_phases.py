"""The benchmark's per-phase breakdown from two scrapes of mm_phase_seconds (histogram deltas)."""

from __future__ import annotations

import pytest

from mm_bench.phases import format_breakdown, phase_breakdown, quantile_from_buckets

INF = float("inf")


def _hist(model, phase, buckets, total, instance="i0"):
    base = (("instance", instance), ("model", model), ("phase", phase))
    out = {
        ("mm_phase_seconds_bucket", tuple(sorted(base + (("le", str(le) if le != INF else "+Inf"),)))): c
        for le, c in buckets
    }
    out[("mm_phase_seconds_sum", base)] = total
    out[("mm_phase_seconds_count", base)] = buckets[-1][1]
    return out


def test_quantile_interpolates_inside_the_bucket():
    assert quantile_from_buckets([(0.1, 0), (0.2, 10), (INF, 10)], 0.5) == pytest.approx(0.15)
    assert quantile_from_buckets([(0.1, 4), (0.2, 4), (INF, 8)], 0.75) == 0.2  # in +Inf: its lower bound
    assert quantile_from_buckets([(0.1, 0), (INF, 0)], 0.5) is None


def test_breakdown_is_the_delta_between_scrapes_summed_over_instances():
    before = _hist("mm_encoder", "vision", [(0.01, 1), (0.02, 1), (INF, 1)], 0.005)
    after = {
        **_hist("mm_encoder", "vision", [(0.01, 1), (0.02, 5), (INF, 5)], 0.005 + 4 * 0.015),
        **_hist("mm_encoder", "vision", [(0.01, 0), (0.02, 0), (INF, 0)], 0.0, instance="i1"),
        **_hist("mm_language", "decode", [(0.01, 0), (0.02, 0), (INF, 0)], 0.0),
    }  # nothing new: left out
    after[("nv_inference_queue_duration_us", (("model", "mm_encoder"), ("version", "1")))] = 9000.0
    after[("nv_inference_request_success", (("model", "mm_encoder"), ("version", "1")))] = 6.0
    before[("nv_inference_queue_duration_us", (("model", "mm_encoder"), ("version", "1")))] = 1000.0
    before[("nv_inference_request_success", (("model", "mm_encoder"), ("version", "1")))] = 2.0
    got = phase_breakdown(before, after)
    assert set(got) == {"mm_encoder"}
    vision = got["mm_encoder"]["vision"]
    assert vision["count"] == 4 and vision["mean_ms"] == pytest.approx(15.0)
    assert vision["p50_ms"] == pytest.approx(15.0)  # half-way through the (10, 20] ms bucket
    assert got["mm_encoder"]["triton_queue"] == {"count": 4.0, "mean_ms": 2.0, "p50_ms": None}
    (line,) = format_breakdown(got)
    assert line.index("triton_queue") < line.index("vision") and "vision 15.0/15.0" in line


def test_in_process_collector_takes_engine_and_loader_phases():
    from mm_bench.phases import InProcessPhases
    from mm_engine.timing import SequenceTiming
    from mm_triton.phases import Phase, PhaseClock

    c = InProcessPhases()
    for i, decode in enumerate((0.1, 0.2, 0.6)):
        c.observer.on_sequence_timing(
            SequenceTiming(
                f"r{i}",
                arrival=0.0,
                load_started=0.0,
                load_ended=0.05,
                admitted=0.05,
                first_token=0.1,
                finished=0.1 + decode,
            )
        )
        clock = PhaseClock()
        clock.add(Phase.VISION, 0.02)
        c.report(clock)
    got = c.take()
    assert "load" not in got and got["vision"]["mean_ms"] == pytest.approx(20.0)  # the loader reports its own
    assert got["decode"]["count"] == 3 and got["decode"]["p50_ms"] == pytest.approx(200.0)
    assert got["decode"]["mean_ms"] == pytest.approx(300.0)
    assert c.take() == {}  # taken: the next point starts empty
