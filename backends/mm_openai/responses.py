"""OpenAI response objects: ``chat.completion``, ``chat.completion.chunk`` and their SSE framing."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass
class CompletionIds:
    """What every object of one answer shares."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))


def completion(ids: CompletionIds, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
    return {
        "id": ids.id,
        "object": "chat.completion",
        "created": ids.created,
        "model": ids.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage.as_dict(),
    }


def chunk(
    ids: CompletionIds, delta: dict[str, Any], finish_reason: str | None = None, include_usage: bool = False
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": ids.id,
        "object": "chat.completion.chunk",
        "created": ids.created,
        "model": ids.model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if include_usage:  # OpenAI: with stream_options.include_usage every chunk has "usage": null but the last
        out["usage"] = None
    return out


def usage_chunk(ids: CompletionIds, usage: Usage) -> dict[str, Any]:
    return {
        "id": ids.id,
        "object": "chat.completion.chunk",
        "created": ids.created,
        "model": ids.model,
        "system_fingerprint": None,
        "choices": [],
        "usage": usage.as_dict(),
    }


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
