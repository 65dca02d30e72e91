"""Per-row sampling, incremental detokenization with stop strings, and EngineConfig validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mm_engine import EngineConfig, SamplingParams
from mm_engine.detok import IncrementalDetokenizer
from mm_engine.sampling import make_generator, sample, sample_row


def test_greedy_rows_are_argmax_first_maximum():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 0.0, 5.0]])
    params = [SamplingParams(max_tokens=1)] * 2
    assert sample(logits, params, [None, None]) == [1, 0]


def test_seeded_rows_do_not_depend_on_batch_mates():
    torch.manual_seed(0)
    row = torch.randn(50)
    p = SamplingParams(max_tokens=1, temperature=0.7, top_p=0.8, top_k=20, seed=5)
    alone = [sample(row[None], [p], [g])[0] for g in [make_generator(p)] for _ in range(20)]
    g = make_generator(p)
    mates = [SamplingParams(max_tokens=1), SamplingParams(max_tokens=1, temperature=1.0, seed=9)]
    crowd = []
    for _ in range(20):
        logits = torch.stack([torch.randn(50), row, torch.randn(50)])
        crowd.append(sample(logits, [mates[0], p, mates[1]], [None, g, make_generator(mates[1])])[1])
    assert alone == crowd


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    draws_k = {sample_row(logits, SamplingParams(max_tokens=1, temperature=2.0, top_k=2), g) for _ in range(300)}
    assert draws_k == {0, 1}
    # probabilities at T=1: 0.64, 0.24, 0.09, ...: top_p 0.7 keeps the first two tokens
    draws_p = {sample_row(logits, SamplingParams(max_tokens=1, temperature=1.0, top_p=0.7), g) for _ in range(300)}
    assert draws_p == {0, 1}
    draws_tiny = {sample_row(logits, SamplingParams(max_tokens=1, temperature=1.0, top_p=0.01), g) for _ in range(50)}
    assert draws_tiny == {0}  # the most likely token always stays


def test_sample_checks_shapes():
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 5), [SamplingParams(max_tokens=1)], [None])
    with pytest.raises(ValueError):
        sample(torch.zeros(1, 5), [SamplingParams(max_tokens=1, temperature=1.0)], [None])


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from mm_models.qwen2vl._loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)


TEXTS = st.text(alphabet=st.sampled_from(list("ab é€😀\n.,xyz")), min_size=1, max_size=40)


@settings(max_examples=100, deadline=None)
@given(text=TEXTS)
def test_deltas_never_split_characters_and_add_up(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(t) for t in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text == tokenizer.decode(ids, skip_special_tokens=True)


@settings(max_examples=100, deadline=None)
@given(text=TEXTS, stop=st.text(alphabet=st.sampled_from(list("ab é€😀.")), min_size=1, max_size=4))
def test_stop_strings_cut_before_the_first_match_and_are_never_streamed(tokenizer, text, stop):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    detok = IncrementalDetokenizer(tokenizer, stop=(stop,))
    streamed = ""
    for t in ids:
        streamed += detok.add(t)
        assert stop not in streamed
        if detok.stopped:
            break
    if not detok.stopped:
        streamed += detok.flush()
    if stop in full:
        assert detok.stopped and detok.text == full[: full.find(stop)]
    else:
        assert not detok.stopped and detok.text == full
    assert streamed == detok.text


def test_engine_config_from_params_and_env():
    cfg = EngineConfig.from_params(
        {"max_num_seqs": "8", "kv_cache_tokens": "16384", "max_queue_delay_s": "2.5"},
        device="cpu",
        env={"MM_MAX_QUEUE_SIZE": "7"},
    )
    assert (cfg.max_batch_size, cfg.max_seq_len, cfg.max_queue_size, cfg.max_queue_delay_s) == (8, 2048, 7, 2.5)
    assert cfg.kv_cache_tokens == 16384
    assert EngineConfig.from_params({}, env={}) == EngineConfig()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"max_num_seqs": "0"}, "max_num_seqs"),
        ({"max_num_seqs": "x"}, "max_num_seqs"),
        ({"max_queue_delay_s": "-1"}, "max_queue_delay_s"),
        ({"dtype": "int8"}, "dtype"),
        ({"max_seq_len": "100", "kv_cache_tokens": "6400"}, "kv_cache_tokens"),
        ({"max_num_batched_tokens": "0"}, "max_num_batched_tokens"),
    ],
)
def test_engine_config_rejects_bad_values(params, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig.from_params(params, env={})
