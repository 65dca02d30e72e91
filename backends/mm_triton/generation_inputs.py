"""The generation inputs every engine-backed model accepts, read and validated at the boundary.

    PROMPT       BYTES [1]   UTF-8 text (PROMPT or MESSAGES is required)
    MESSAGES     BYTES [1]   a chat instead of PROMPT: JSON, OpenAI-shaped messages (mm_models.chat)
    MAX_TOKENS   INT32 [1]   optional, [1, max_tokens_limit], default default_max_tokens
    TEMPERATURE  FP32  [1]   optional, [0, 2]; 0 (default) = greedy
    TOP_P        FP32  [1]   optional, (0, 1]; default 1 (off)
    TOP_K        INT32 [1]   optional, >= 0; default 0 (off)
    SEED         INT64 [1]   optional, [0, 2**63): a sampled request is reproducible whatever its batch mates
    STOP         BYTES [-1]  optional, at most 4 strings of 1..256 UTF-8 bytes; the text ends before the first
    TIMEOUT_MS   INT32 [1]   optional, [1, 3600000]: the request ends with DEADLINE this long after it arrived
    IGNORE_EOS   BOOL  [1]   optional: true generates MAX_TOKENS tokens, an end-of-sequence token included

Every error is a ValueError whose message starts with the input's name (INVALID_ARG at the boundary).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from mm_engine.api import MAX_STOP_BYTES, MAX_STOP_STRINGS, SamplingParams
from mm_models.chat import ChatMessages
from mm_models.prompt import check_prompt

from .conversation import read_messages
from .tensors import one_string, optional_bool, optional_float, optional_int, optional_strings

DEFAULT_MAX_PROMPT_BYTES = 128 * 1024
MAX_TIMEOUT_MS = 3_600_000
#: The inputs above, as every model taking them declares them (the pipelines forward exactly these).
GENERATION_INPUT_NAMES = (
    "PROMPT",
    "MESSAGES",
    "MAX_TOKENS",
    "TEMPERATURE",
    "TOP_P",
    "TOP_K",
    "SEED",
    "STOP",
    "TIMEOUT_MS",
    "IGNORE_EOS",
)


@dataclass(frozen=True)
class InputLimits:
    max_tokens_limit: int = 1024
    default_max_tokens: int = 32
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES

    def __post_init__(self) -> None:
        if self.max_tokens_limit < 1 or self.default_max_tokens < 1 or self.max_prompt_bytes < 1:
            raise ValueError("max_tokens_limit, default_max_tokens and max_prompt_bytes must be >= 1")


@dataclass(frozen=True)
class GenerationInputs:
    prompt: str | ChatMessages
    sampling: SamplingParams
    deadline: float | None  # time.monotonic() value, or None


def check_prompt_text(prompt: str, max_prompt_bytes: int) -> str:
    if not prompt.strip():
        raise ValueError("PROMPT: must not be empty")
    if len(prompt.encode("utf-8", "surrogatepass")) > max_prompt_bytes:
        raise ValueError(f"PROMPT: longer than max_prompt_bytes={max_prompt_bytes} bytes")
    try:
        return check_prompt(prompt)
    except ValueError as exc:
        raise ValueError(f"PROMPT: {exc}") from None


def _in_range(name: str, value: Any, low: float, high: float, low_open: bool = False) -> Any:
    if value is None:
        return None
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}: must be in {bracket}{low:g}, {high:g}], got {value}")
    return value


def read_generation_inputs(
    pb: Any, request: Any, limits: InputLimits, arrived: float | None = None
) -> GenerationInputs:
    """All of the above from one Triton request; ValueError naming the first bad input."""
    prompt = read_messages(pb, request, limits.max_prompt_bytes)
    if prompt is None:
        prompt = check_prompt_text(one_string(pb, request, "PROMPT"), limits.max_prompt_bytes)
    max_tokens = optional_int(pb, request, "MAX_TOKENS")
    max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
    _in_range("MAX_TOKENS", max_tokens, 1, limits.max_tokens_limit)
    temperature = _in_range("TEMPERATURE", optional_float(pb, request, "TEMPERATURE"), 0.0, 2.0)
    top_p = _in_range("TOP_P", optional_float(pb, request, "TOP_P"), 0.0, 1.0, low_open=True)
    top_k = _in_range("TOP_K", optional_int(pb, request, "TOP_K"), 0, 2**31 - 1)
    seed = _in_range("SEED", optional_int(pb, request, "SEED"), 0, 2**63 - 1)
    stop = optional_strings(pb, request, "STOP")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"STOP: at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    for i, s in enumerate(stop):
        if not s or len(s.encode("utf-8")) > MAX_STOP_BYTES:
            raise ValueError(f"STOP[{i}]: must be 1..{MAX_STOP_BYTES} bytes of UTF-8")
    timeout_ms = _in_range("TIMEOUT_MS", optional_int(pb, request, "TIMEOUT_MS"), 1, MAX_TIMEOUT_MS)
    sampling = SamplingParams(
        max_tokens=int(max_tokens),
        temperature=0.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=0 if top_k is None else int(top_k),
        seed=None if seed is None else int(seed),
        stop=tuple(stop),
        ignore_eos=bool(optional_bool(pb, request, "IGNORE_EOS")),
    )
    start = time.monotonic() if arrived is None else arrived
    deadline = None if timeout_ms is None else start + timeout_ms / 1000.0
    return GenerationInputs(prompt, sampling, deadline)
