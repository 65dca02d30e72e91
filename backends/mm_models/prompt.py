"""The chat prompt used on both sides of the split, and the Qwen2-VL special tokens.

Both the disaggregated path (:class:`mm_models.qwen2vl.LanguageModel`) and the oracle
(:class:`mm_models.qwen2vl.MonolithicModel`) render a request with the checkpoint's chat template
(:func:`mm_models.chat.render_chat`), so they see the same token ids. For a plain prompt that gives
exactly :func:`render_prompt` (tested): one user turn whose content is the images (first) followed by the
text, with the default system prompt and the generation prompt appended::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>...{prompt}<|im_end|>\\n
    <|im_start|>assistant\\n

Each ``<|image_pad|>`` is later expanded to the image's embedding-token count.
"""

from __future__ import annotations

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

#: Qwen2-VL's special tokens, in the order of the released tokenizer's added tokens.
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    VISION_START,
    VISION_END,
    VISION_PAD,
    IMAGE_PAD,
    VIDEO_PAD,
)

#: Tokens a user prompt may not contain: they would add or break image placeholder blocks.
FORBIDDEN_IN_PROMPT: tuple[str, ...] = (VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD)

SYSTEM_PROMPT = "You are a helpful assistant."

#: Qwen2-VL's chat template (jinja), shipped with the tiny checkpoint's tokenizer.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def check_prompt(prompt: object) -> str:
    """Return ``prompt`` if it is a string without vision placeholder tokens, else raise ValueError."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    for tok in FORBIDDEN_IN_PROMPT:
        if tok in prompt:
            raise ValueError(f"prompt must not contain the reserved vision token {tok!r}")
    return prompt


def render_prompt(prompt: str, num_images: int) -> str:
    """Render one user turn: ``num_images`` single-pad image blocks, then ``prompt``, then the
    assistant generation prompt. Raises ValueError for a bad prompt or a negative image count."""
    check_prompt(prompt)
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"num_images must be a non-negative int, got {num_images!r}")
    image_blocks = f"{VISION_START}{IMAGE_PAD}{VISION_END}" * num_images
    return (
        f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n"
        f"{IM_START}user\n{image_blocks}{prompt}{IM_END}\n"
        f"{IM_START}assistant\n"
    )


def expand_image_pads(ids: list[int], image_token_id: int, counts: list[int]) -> list[int]:
    """Replace the k-th ``image_token_id`` in ``ids`` by ``counts[k]`` copies of it.

    Raises ValueError unless ``ids`` holds exactly ``len(counts)`` image tokens and every count is >= 1.
    """
    n_pads = sum(1 for t in ids if t == image_token_id)
    if n_pads != len(counts):
        raise ValueError(f"prompt renders {n_pads} image placeholders but {len(counts)} images were given")
    out: list[int] = []
    k = 0
    for t in ids:
        if t == image_token_id:
            n = counts[k]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"image {k}: token count must be a positive int, got {n!r}")
            out.extend([image_token_id] * n)
            k += 1
        else:
            out.append(t)
    return out
