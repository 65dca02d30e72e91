"""mm_models.chat: conversation validation and rendering with the checkpoint's chat template."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mm_models.chat import MAX_IMAGES, MAX_MESSAGES, ChatMessages, parse_messages, render_chat, single_turn
from mm_models.prompt import FORBIDDEN_IN_PROMPT, render_prompt


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from mm_models.qwen2vl._loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def test_single_turn_renders_exactly_render_prompt(tokenizer):
    for prompt, n in [("Describe", 1), ("hi", 0), ("two pictures", 2), ("  spaced\nlines  ", 3)]:
        assert render_chat(tokenizer, prompt, n) == render_prompt(prompt, n)
        assert render_chat(tokenizer, single_turn(prompt, n), n) == render_prompt(prompt, n)


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40).filter(
    lambda s: not any(tok in s for tok in FORBIDDEN_IN_PROMPT)
)


@settings(max_examples=60, deadline=None)
@given(prompt=_text, n=st.integers(0, 4))
def test_property_plain_prompt_path_equals_render_prompt(tokenizer, prompt, n):
    """The PROMPT path goes through the chat template and gives what the oracle always used."""
    assert render_chat(tokenizer, prompt, n) == render_prompt(prompt, n)


def test_multi_turn_with_system_and_images(tokenizer):
    messages = parse_messages(
        json.dumps(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
            ]
        )
    )
    assert messages.num_images == 2
    text = render_chat(tokenizer, messages, 2)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nAnd this?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_wire_form_round_trips():
    messages = parse_messages([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "é"}]}])
    again = parse_messages(messages.to_json())
    assert again == messages and isinstance(again, ChatMessages)


def test_image_count_must_match(tokenizer):
    messages = parse_messages([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}])
    with pytest.raises(ValueError, match="1 image part"):
        render_chat(tokenizer, messages, 2)


@pytest.mark.parametrize(
    "raw, match",
    [
        ("not json", "not valid JSON"),
        ("{}", "non-empty JSON array"),
        ("[]", "non-empty JSON array"),
        ([{"role": "tool", "content": "x"}], r"messages\[0\].role"),
        ([{"role": "user"}], r"messages\[0\].content: missing"),
        ([{"role": "user", "content": 5}], r"messages\[0\].content"),
        ([{"role": "user", "content": []}], r"messages\[0\].content"),
        ([{"role": "user", "content": "x", "name": "bob"}], "unknown field"),
        ([{"role": "user", "content": [{"type": "audio"}]}], r"content\[0\].type"),
        ([{"role": "user", "content": [{"type": "text"}]}], "exactly the fields"),
        ([{"role": "user", "content": [{"type": "image", "url": "x"}]}], "image part is"),
        (
            [{"role": "assistant", "content": [{"type": "image"}]}, {"role": "user", "content": "x"}],
            "user messages only",
        ),
        ([{"role": "user", "content": "hi <|image_pad|>"}], "reserved vision token"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            "last message must have role 'user'",
        ),
        ([{"role": "user", "content": "   "}], "neither text nor images"),
        ([{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1), "at most"),
        ([{"role": "user", "content": [{"type": "image"}] * (MAX_IMAGES + 1)}], "at most 16 images"),
    ],
)
def test_bad_conversations_are_refused_naming_the_field(raw, match):
    with pytest.raises(ValueError, match=match):
        parse_messages(raw if isinstance(raw, str) else json.dumps(raw))


def test_text_bound():
    parse_messages([{"role": "user", "content": "x" * 100}], max_text_bytes=100)
    with pytest.raises(ValueError, match="bytes of text"):
        parse_messages([{"role": "user", "content": "x" * 101}], max_text_bytes=100)


def test_chat_template_fallback_when_tokenizer_has_none(tokenizer):
    class NoTemplate:
        chat_template = None

        def apply_chat_template(self, messages, **kw):
            return tokenizer.apply_chat_template(messages, **kw)

    assert render_chat(NoTemplate(), "hi", 1) == render_prompt("hi", 1)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.sampled_from(["user", "assistant", "system", "text", "image", "role", "content", "type"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["role", "content", "type", "text", "x"]), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(raw=_json)
def test_property_any_json_is_accepted_or_refused_with_valueerror(raw):
    """Hostile MESSAGES never crash the model: a ChatMessages or a ValueError, nothing else."""
    try:
        out = parse_messages(json.dumps(raw))
    except ValueError:
        return
    assert isinstance(out, ChatMessages) and out.messages[-1]["role"] == "user"
