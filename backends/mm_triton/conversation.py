"""The request's conversation: a plain PROMPT or a MESSAGES chat (exactly one of them)."""
from __future__ import annotations

from typing import Any

from mm_models.chat import ChatMessages, parse_messages

from .tensors import one_string


def read_conversation(pb_utils: Any, request: Any, num_images: int) -> str | ChatMessages:
    """PROMPT as a string, or MESSAGES parsed and checked against the request's ``num_images``;
    ValueError naming the input otherwise (neither, both, bad JSON, image parts != images)."""
    has_prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT") is not None
    has_messages = pb_utils.get_input_tensor_by_name(request, "MESSAGES") is not None
    if has_prompt and has_messages:
        raise ValueError("give PROMPT or MESSAGES, not both")
    if not has_messages:
        if not has_prompt:
            raise ValueError("input PROMPT (or MESSAGES) is required")
        return one_string(pb_utils, request, "PROMPT")
    try:
        messages = parse_messages(one_string(pb_utils, request, "MESSAGES"))
    except ValueError as exc:
        raise ValueError(f"MESSAGES: {exc}") from None
    if messages.num_images != num_images:
        raise ValueError(f"MESSAGES: {messages.num_images} image part(s) but {num_images} image(s) given")
    return messages
