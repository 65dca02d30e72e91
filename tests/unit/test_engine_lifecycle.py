"""Every way a sequence can end frees what it holds: cancellation, deadlines, queue bounds, load
errors, invalid input, stop strings, EOS and shutdown (tiny model, CPU, in process)."""

from __future__ import annotations

import threading
import time

import pytest

from mm_engine import (
    EngineConfig,
    EngineError,
    EngineObserver,
    ErrorCause,
    FinishReason,
    GenerationRequest,
    LLMEngine,
    SamplingParams,
)

from ._engine_util import Case, EncodingLoader, RecordingSink, build_request, random_image, wait_until


@pytest.fixture
def make_engine(mono):
    engines = []

    def make(observer=None, eos=None, **kw) -> LLMEngine:
        kw.setdefault("max_seq_len", 2048)
        engine = LLMEngine(mono.hf_model, mono.tokenizer, EngineConfig(**kw), observer=observer, eos_token_ids=eos)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def text_case(max_tokens: int, prompt: str = "hello") -> Case:
    return Case([], prompt, SamplingParams(max_tokens=max_tokens))


def assert_idle(engine: LLMEngine) -> None:
    wait_until(lambda: engine.stats().slots_used == 0 and engine.stats().waiting == 0, timeout=10)


def test_cancel_running_sequence_frees_its_slot(make_engine, mono, encoder):
    engine = make_engine(max_batch_size=2)
    flag = threading.Event()
    sink = RecordingSink()
    engine.submit(build_request(mono, encoder, "c", text_case(1500), cancelled=flag.is_set), sink)
    wait_until(lambda: len(sink.tokens) >= 3)
    flag.set()
    sink.wait()
    assert sink.error.cause is ErrorCause.CANCELLED and sink.finals == 1
    assert 3 <= len(sink.tokens) < 1500
    assert_idle(engine)
    after = RecordingSink()  # the freed slot serves the next request, exactly
    engine.submit(build_request(mono, encoder, "n", text_case(12, "next")), after)
    assert after.wait().output.token_ids == mono.generate([], "next", 12)


def test_cancel_while_loading_aborts_the_loader(make_engine, mono, encoder):
    engine = make_engine(max_batch_size=2)
    flag = threading.Event()
    loader = EncodingLoader(encoder, [random_image(1, 32, 32)], block=threading.Event())
    sink = RecordingSink()
    case = Case(loader.images, "look", SamplingParams(max_tokens=5))
    engine.submit(build_request(mono, encoder, "l", case, loader=loader, cancelled=flag.is_set), sink)
    time.sleep(0.05)
    flag.set()
    assert sink.wait().error.cause is ErrorCause.CANCELLED
    assert loader.aborted == ["cancelled"]
    assert_idle(engine)


def test_deadline_ends_running_and_waiting_sequences(make_engine, mono, encoder):
    engine = make_engine(max_batch_size=1)
    running, waiting = RecordingSink(), RecordingSink()
    engine.submit(build_request(mono, encoder, "run", text_case(1500), deadline=time.monotonic() + 0.3), running)
    engine.submit(build_request(mono, encoder, "wait", text_case(5), deadline=time.monotonic() + 0.1), waiting)
    assert waiting.wait().error.cause is ErrorCause.DEADLINE
    assert waiting.tokens == []
    assert running.wait().error.cause is ErrorCause.DEADLINE
    assert 0 < len(running.tokens) < 1500
    assert_idle(engine)


def test_queue_full_is_refused_at_submit(make_engine, mono, encoder):
    engine = make_engine(max_batch_size=1, max_queue_size=2)
    gate = threading.Event()
    sinks = []
    for i in range(2):
        loader = EncodingLoader(encoder, [random_image(i, 32, 32)], block=gate)
        sinks.append(RecordingSink())
        engine.submit(
            build_request(
                mono, encoder, f"q{i}", Case(loader.images, "p", SamplingParams(max_tokens=3)), loader=loader
            ),
            sinks[-1],
        )
    with pytest.raises(EngineError) as refused:
        engine.submit(build_request(mono, encoder, "q2", text_case(3)), RecordingSink())
    assert refused.value.cause is ErrorCause.QUEUE_FULL and "max_queue_size" in str(refused.value)
    gate.set()
    assert all(s.wait().output is not None for s in sinks)
    assert_idle(engine)


def test_queue_timeout_when_no_slot_frees_in_time(make_engine, mono, encoder):
    engine = make_engine(max_batch_size=1, max_queue_delay_s=0.2)
    busy, starved = RecordingSink(), RecordingSink()
    flag = threading.Event()
    engine.submit(build_request(mono, encoder, "busy", text_case(1500), cancelled=flag.is_set), busy)
    wait_until(lambda: len(busy.tokens) > 0)
    engine.submit(build_request(mono, encoder, "starved", text_case(5)), starved)
    err = starved.wait().error
    assert err.cause is ErrorCause.QUEUE_TIMEOUT and "max_queue_delay_s" in str(err)
    flag.set()
    busy.wait()
    assert_idle(engine)


def test_image_load_failure_reports_image_load(make_engine, mono, encoder):
    engine = make_engine(max_batch_size=2)
    boom = RuntimeError("pull failed: sender gone")
    loader = EncodingLoader(encoder, [random_image(3, 32, 32)], fail=boom)
    sink = RecordingSink()
    engine.submit(
        build_request(mono, encoder, "f", Case(loader.images, "p", SamplingParams(max_tokens=3)), loader=loader), sink
    )
    err = sink.wait().error
    assert err.cause is ErrorCause.IMAGE_LOAD and err.__cause__ is boom
    assert loader.aborted == ["image_load"]
    assert_idle(engine)


def test_loader_returning_wrong_images_is_invalid(make_engine, mono, encoder):
    engine = make_engine(max_batch_size=2)
    small, big = random_image(4, 32, 32), random_image(5, 64, 64)
    loader = EncodingLoader(encoder, [big])  # the prompt was built for `small`
    sink = RecordingSink()
    request = build_request(mono, encoder, "w", Case([small], "p", SamplingParams(max_tokens=3)), loader=loader)
    engine.submit(request, sink)
    err = sink.wait().error
    assert err.cause is ErrorCause.INVALID and "image 0" in str(err)
    assert_idle(engine)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(prompt_ids=[]), "prompt_ids"),
        (dict(prompt_ids=[10**9]), "prompt_ids"),
        (dict(image_token_counts=[5]), "image_token_counts"),
        (dict(sampling=SamplingParams(max_tokens=2048)), "max_seq_len"),
        (dict(request_id=""), "request_id"),
        (dict(deadline=float("nan")), "deadline"),
    ],
)
def test_invalid_requests_are_refused_at_submit(make_engine, mono, encoder, change, message):
    engine = make_engine(max_batch_size=1)
    base = build_request(mono, encoder, "x", text_case(5))
    fields = {
        k: getattr(base, k)
        for k in ("request_id", "prompt_ids", "image_token_counts", "images", "sampling", "deadline")
    }
    fields.update(change)
    with pytest.raises(EngineError) as refused:
        engine.submit(GenerationRequest(**fields), RecordingSink())
    assert refused.value.cause is ErrorCause.INVALID and message in str(refused.value)
    assert engine.stats().waiting == 0


def test_stop_string_cuts_text_and_ends_with_stop(make_engine, mono, encoder):
    engine = make_engine(max_batch_size=2)
    full = RecordingSink()
    engine.submit(build_request(mono, encoder, "full", text_case(40, "say something")), full)
    text = full.wait().output.text
    assert len(text) > 12
    stop = text[8:11]
    cut = text[: text.find(stop)]
    sink = RecordingSink()
    case = Case([], "say something", SamplingParams(max_tokens=40, stop=(stop, "never-appears-zz")))
    engine.submit(build_request(mono, encoder, "stop", case), sink)
    out = sink.wait().output
    assert out.finish_reason is FinishReason.STOP
    assert out.text == cut and sink.text == cut
    assert out.token_ids == full.output.token_ids[: len(out.token_ids)]
    assert len(sink.tokens) == len(out.token_ids) - 1  # the token completing the stop is not streamed
    assert_idle(engine)


def test_eos_ends_with_stop_and_is_included(make_engine, mono, encoder):
    expected = mono.generate([], "hello", 20)
    eos = expected[4]
    engine = make_engine(max_batch_size=2, eos={eos})
    sink = RecordingSink()
    engine.submit(build_request(mono, encoder, "e", text_case(20)), sink)
    out = sink.wait().output
    assert out.finish_reason is FinishReason.STOP
    assert out.token_ids == expected[: expected.index(eos) + 1] == sink.tokens


def test_ignore_eos_generates_max_tokens_past_an_eos(make_engine, mono, encoder):
    expected = mono.generate([], "hello", 20)
    eos = expected[4]
    engine = make_engine(max_batch_size=2, eos={eos})
    sink = RecordingSink()
    case = Case([], "hello", SamplingParams(max_tokens=20, ignore_eos=True))
    engine.submit(build_request(mono, encoder, "e", case), sink)
    out = sink.wait().output
    assert out.finish_reason is FinishReason.LENGTH
    assert out.token_ids == expected == sink.tokens and eos in out.token_ids[:5]
    assert_idle(engine)


def test_close_fails_every_admitted_sequence_with_shutdown(make_engine, mono, encoder):
    engine = make_engine(max_batch_size=2, max_queue_size=8)
    gate = threading.Event()
    sinks, loaders = [], []
    for i in range(6):
        sinks.append(RecordingSink())
        if i % 2:
            loader = EncodingLoader(encoder, [random_image(i, 32, 32)], block=gate)
            loaders.append(loader)
            req = build_request(
                mono, encoder, f"s{i}", Case(loader.images, "p", SamplingParams(max_tokens=900)), loader=loader
            )
        else:
            req = build_request(mono, encoder, f"s{i}", text_case(900))
        engine.submit(req, sinks[-1])
    wait_until(lambda: len(sinks[0].tokens) > 2)
    engine.close()
    for sink in sinks:
        assert sink.wait(5).finals == 1 and sink.error.cause is ErrorCause.SHUTDOWN
    assert all(loader.aborted == ["shutdown"] for loader in loaders)
    assert not engine.running
    assert engine.stats().slots_used == 0 and engine.stats().waiting == 0
    with pytest.raises(EngineError) as refused:
        engine.submit(build_request(mono, encoder, "late", text_case(3)), RecordingSink())
    assert refused.value.cause is ErrorCause.SHUTDOWN
    gate.set()


class CountingObserver(EngineObserver):
    def __init__(self) -> None:
        self.prompt = self.generated = 0
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.finished: list[str] = []
        self.max_running = 0

    def on_gauges(self, running, waiting, slots_used, slots_total):
        assert 0 <= slots_used <= slots_total
        self.max_running = max(self.max_running, running)

    def on_prompt_tokens(self, count):
        self.prompt += count

    def on_generation_tokens(self, count):
        self.generated += count

    def on_time_to_first_token(self, seconds):
        self.ttft.append(seconds)

    def on_inter_token_latency(self, seconds):
        self.itl.append(seconds)

    def on_finished(self, label):
        self.finished.append(label)


def test_observer_sees_tokens_latencies_and_endings(make_engine, mono, encoder):
    obs = CountingObserver()
    engine = make_engine(observer=obs, max_batch_size=4)
    sinks = [RecordingSink() for _ in range(6)]
    for i, sink in enumerate(sinks):
        engine.submit(build_request(mono, encoder, f"o{i}", text_case(5 + i, f"prompt {i}")), sink)
    outs = [s.wait().output for s in sinks]
    assert_idle(engine)
    assert obs.generated == sum(len(o.token_ids) for o in outs)
    assert obs.prompt == sum(o.prompt_tokens for o in outs)
    assert len(obs.ttft) == 6 and len(obs.itl) == obs.generated - 6
    assert sorted(obs.finished) == ["length"] * 6
    assert 1 < obs.max_running <= 4


class LoopMarks(EngineObserver):
    """Records the loop's work marks and what the engine did inside them (tokens come only while busy)."""

    def __init__(self) -> None:
        self.marks: list[bool] = []
        self.tokens_while_idle = 0

    def on_loop_work(self, busy):
        self.marks.append(busy)

    def on_generation_tokens(self, count):
        if not self.marks or not self.marks[-1]:
            self.tokens_while_idle += count


def test_every_loop_iteration_is_marked_busy_then_idle(make_engine, mono, encoder):
    """The host's hang detection (mm_triton.heartbeat) relies on these marks: each iteration's work sits
    between a True and a False, and the loop's idle wait is outside them."""
    obs = LoopMarks()
    engine = make_engine(observer=obs, max_batch_size=2)
    sinks = [RecordingSink() for _ in range(3)]
    for i, sink in enumerate(sinks):
        engine.submit(build_request(mono, encoder, f"m{i}", text_case(4, f"prompt {i}")), sink)
    for sink in sinks:
        sink.wait()
    wait_until(lambda: obs.marks and obs.marks[-1] is False)
    marks = list(obs.marks)
    assert len(marks) >= 8 and len(marks) % 2 == 0
    assert all(marks[0::2]) and not any(marks[1::2]) and obs.tokens_while_idle == 0
