"""The correctness oracle, in process: the engine's greedy tokens under in-flight batching equal the
monolithic model's unbatched ``generate()`` of each request alone (fp32 tiny model, CPU)."""

from __future__ import annotations

import time

import pytest

from mm_engine import EngineConfig, FinishReason, LLMEngine, SamplingParams

from ._engine_util import Case, RecordingSink, build_request, random_image


def mixed_cases(n: int = 20) -> list[Case]:
    """Prompt lengths from a few to ~150 text tokens, 0-3 images of different sizes (up to ~1000 image
    tokens), max_tokens 1..40."""
    cases = []
    for i in range(n):
        n_images = [0, 1, 2, 0, 1, 3][i % 6]
        images = [
            random_image(100 * i + j, 16 * (1 + (i + j) % 5), 16 * (1 + (2 * i + j) % 4)) for j in range(n_images)
        ]
        if i % 7 == 3:
            images.append(random_image(999 + i, 120, 96))  # a large one (~700 tokens): prefilled in chunks
        prompt = f"request {i}: " + " ".join(f"w{(i * 13 + k) % 97}" for k in range((i * 17) % 150))
        cases.append(Case(images, prompt, SamplingParams(max_tokens=1 + (i * 11) % 40)))
    return cases


def run_all(engine: LLMEngine, mono, encoder, cases: list[Case], stagger_s: float = 0.01) -> list[RecordingSink]:
    sinks = []
    for i, case in enumerate(cases):
        sink = RecordingSink()
        engine.submit(build_request(mono, encoder, f"r{i}", case), sink)
        sinks.append(sink)
        if i % 3 == 0:
            time.sleep(stagger_s * (i % 4))  # staggered arrivals: some join a running batch
    return [s.wait() for s in sinks]


_ORACLE: dict[tuple, list[int]] = {}


def oracle(mono, case: Case) -> list[int]:
    """Greedy tokens of the monolithic model's generate() for ``case`` alone (cached per input)."""
    key = (case.prompt, case.sampling.max_tokens, tuple((im.size, im.tobytes()) for im in case.images))
    if key not in _ORACLE:
        _ORACLE[key] = mono.generate(case.images, case.prompt, case.sampling.max_tokens)
    return _ORACLE[key]


def assert_oracle(mono, cases: list[Case], sinks: list[RecordingSink]) -> None:
    for i, (case, sink) in enumerate(zip(cases, sinks, strict=True)):
        assert sink.error is None, f"request {i}: {sink.error}"
        expected = oracle(mono, case)
        assert sink.output.token_ids == expected, f"request {i} differs from unbatched generate()"
        assert sink.tokens == expected, f"request {i}: streamed tokens differ"
        assert sink.text == sink.output.text == mono.decode(expected), f"request {i}: text"
        assert sink.output.completion_tokens == len(expected)
        assert sink.output.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
        assert sink.finals == 1


@pytest.mark.parametrize(
    "max_batch, chunk",
    [(6, 64), (32, 100000), (1, 512), (4, 7)],
    ids=["batch6-chunk64", "batch32-unchunked", "batch1", "batch4-chunk7"],
)
def test_batched_greedy_equals_unbatched_generate(tiny_model_dir, mono, encoder, max_batch, chunk):
    cfg = EngineConfig(
        max_batch_size=max_batch, max_seq_len=2048, max_num_batched_tokens=chunk, max_queue_size=64, loader_threads=2
    )
    engine = LLMEngine(mono.hf_model, mono.tokenizer, cfg)
    try:
        cases = mixed_cases(20)
        sinks = run_all(engine, mono, encoder, cases)
        stats = engine.stats()
    finally:
        engine.close()
    assert_oracle(mono, cases, sinks)
    assert stats.slots_used == 0 and stats.waiting == 0
    assert sum(stats.finished.values()) == len(cases)
    assert stats.generation_tokens == sum(len(s.output.token_ids) for s in sinks)


def test_requests_join_a_running_batch(mono, encoder):
    """While a long request decodes, later ones join it (the batch really is shared), and all stay exact."""
    cfg = EngineConfig(max_batch_size=8, max_seq_len=2048, max_num_batched_tokens=32)
    engine = LLMEngine(mono.hf_model, mono.tokenizer, cfg)
    try:
        long_case = Case([], "a long one", SamplingParams(max_tokens=300))
        first = RecordingSink()
        engine.submit(build_request(mono, encoder, "long", long_case), first)
        while len(first.tokens) < 5:
            time.sleep(0.001)
        cases = mixed_cases(8)
        sinks = run_all(engine, mono, encoder, cases, stagger_s=0.002)
        overlapped = not first.done.is_set()
        first.wait()
    finally:
        engine.close()
    assert overlapped, "the long request should still be running when the others finished"
    assert_oracle(mono, [long_case, *cases], [first, *sinks])


def test_seeded_sampling_is_reproducible_across_batch_mates(mono, encoder):
    sampled = Case(
        [random_image(7, 56, 84)],
        "tell me",
        SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, top_k=50, seed=1234),
    )
    cfg = EngineConfig(max_batch_size=8, max_seq_len=2048, max_num_batched_tokens=64)
    engine = LLMEngine(mono.hf_model, mono.tokenizer, cfg)
    try:
        alone = run_all(engine, mono, encoder, [sampled])[0]
        mates = [
            Case([], f"mate {i} " * i, SamplingParams(max_tokens=25, temperature=1.0, seed=i)) for i in range(5)
        ] + mixed_cases(3)
        crowd = run_all(engine, mono, encoder, mates[:3] + [sampled] + mates[3:])
        other_seed = Case(
            sampled.images, sampled.prompt, SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, top_k=50, seed=99)
        )
        different = run_all(engine, mono, encoder, [other_seed])[0]
    finally:
        engine.close()
    assert alone.output.token_ids == crowd[3].output.token_ids
    assert len(alone.output.token_ids) == 30
    assert different.output.token_ids != alone.output.token_ids
    greedy = mono.generate(sampled.images, sampled.prompt, 30)
    assert alone.output.token_ids != greedy  # temperature 0.9 over a random model is not argmax
