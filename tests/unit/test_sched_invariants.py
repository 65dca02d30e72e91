"""Scheduler invariants under random workloads (hypothesis, real engine over the tiny model):
every admitted request gets exactly one final call, refusals happen only at the queue bound, the
running batch never exceeds its slots, every slot and queue place is free at the end, and greedy
requests that complete are exact whatever happened around them."""

from __future__ import annotations

import threading
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mm_engine import EngineConfig, EngineError, EngineObserver, ErrorCause, LLMEngine, SamplingParams

from ._engine_util import Case, EncodingLoader, RecordingSink, build_request, random_image, wait_until


class BoundsObserver(EngineObserver):
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.violations: list[str] = []

    def on_gauges(self, running, waiting, slots_used, slots_total):
        if not (0 <= slots_used <= slots_total == self.slots and running <= self.slots and waiting >= 0):
            self.violations.append(f"running {running} waiting {waiting} slots {slots_used}/{slots_total}")


REQUEST = st.fixed_dictionaries(
    {
        "words": st.integers(0, 60),
        "max_tokens": st.integers(1, 30),
        "image": st.sampled_from([None, "ok", "fail"]),
        "cancel_after": st.one_of(st.none(), st.integers(0, 10)),
        "deadline_s": st.one_of(st.none(), st.floats(0.0, 0.2)),
        "delay_s": st.sampled_from([0.0, 0.0, 0.005]),
    }
)

_ORACLE: dict[tuple, list[int]] = {}


def _oracle(mono, case: Case) -> list[int]:
    key = (case.prompt, case.sampling.max_tokens, bool(case.images))
    if key not in _ORACLE:
        _ORACLE[key] = mono.generate(case.images, case.prompt, case.sampling.max_tokens)
    return _ORACLE[key]


def _submit(engine, mono, encoder, i, spec, cancel_flags, sinks):
    images = [random_image(0, 32, 32)] if spec["image"] else []
    case = Case(images, "p " + "x " * spec["words"], SamplingParams(max_tokens=spec["max_tokens"]))
    loader = None
    if images:
        fail = RuntimeError("pull failed") if spec["image"] == "fail" else None
        loader = EncodingLoader(encoder, images, fail=fail, delay_s=0.01)
    flag = threading.Event()
    deadline = time.monotonic() + spec["deadline_s"] if spec["deadline_s"] is not None else None
    sink = RecordingSink()
    request = build_request(mono, encoder, f"h{i}", case, loader=loader, cancelled=flag.is_set, deadline=deadline)
    engine.submit(request, sink)
    cancel_flags.append((flag, spec["cancel_after"], sink))
    sinks.append((case, spec, sink))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    slots=st.integers(1, 4),
    queue=st.integers(1, 6),
    chunk=st.sampled_from([8, 64, 4096]),
    requests=st.lists(REQUEST, min_size=1, max_size=12),
)
def test_random_workloads_keep_the_invariants(mono, encoder, slots, queue, chunk, requests):
    observer = BoundsObserver(slots)
    engine = LLMEngine(
        mono.hf_model,
        mono.tokenizer,
        EngineConfig(
            max_batch_size=slots, max_queue_size=queue, max_seq_len=1024, max_num_batched_tokens=chunk, loader_threads=2
        ),
        observer=observer,
    )
    sinks: list = []
    flags: list = []
    refused = 0
    try:
        for i, spec in enumerate(requests):
            waiting_before = engine.stats().waiting
            try:
                _submit(engine, mono, encoder, i, spec, flags, sinks)
            except EngineError as e:
                assert e.cause is ErrorCause.QUEUE_FULL
                assert waiting_before >= 1  # refused only with a queue in front of it
                refused += 1
            time.sleep(spec["delay_s"])
            for flag, after, sink in flags:
                if after is not None and len(sink.tokens) >= after:
                    flag.set()
        end = time.monotonic() + 120
        while not all(s.done.is_set() for _, _, s in sinks):
            for flag, after, sink in flags:
                if after is not None and len(sink.tokens) >= after:
                    flag.set()
            assert time.monotonic() < end, "sequences did not end"
            time.sleep(0.002)
        wait_until(lambda: engine.stats().slots_used == 0 and engine.stats().waiting == 0, timeout=10)
        stats = engine.stats()
    finally:
        engine.close()
    assert not observer.violations
    assert sum(stats.finished.values()) == len(sinks) == len(requests) - refused
    for case, spec, sink in sinks:
        assert sink.finals == 1
        if sink.error is None:
            assert spec["image"] != "fail"
            assert sink.output.token_ids == _oracle(mono, case)
        else:
            assert sink.error.cause in (
                ErrorCause.CANCELLED,
                ErrorCause.DEADLINE,
                ErrorCause.IMAGE_LOAD,
                ErrorCause.QUEUE_TIMEOUT,
            )
            assert sink.tokens == _oracle(mono, case)[: len(sink.tokens)]  # a prefix of the exact answer
