"""The MESSAGES input: a chat instead of PROMPT (mm_models.chat has the wire shape and the rules)."""

from __future__ import annotations

from typing import Any

from mm_models.chat import ChatMessages, parse_messages

from .tensors import one_string


def read_messages(pb_utils: Any, request: Any, max_text_bytes: int) -> ChatMessages | None:
    """MESSAGES parsed and checked, or None when the request has none (then PROMPT is read);
    ValueError naming the input for bad JSON, a bad message, or PROMPT and MESSAGES both given.
    Its image parts are checked against the request's images when the prompt is rendered
    (mm_models.chat.render_chat), before any embedding is pulled."""
    if pb_utils.get_input_tensor_by_name(request, "MESSAGES") is None:
        return None
    if pb_utils.get_input_tensor_by_name(request, "PROMPT") is not None:
        raise ValueError("give PROMPT or MESSAGES, not both")
    try:
        return parse_messages(one_string(pb_utils, request, "MESSAGES"), max_text_bytes=max_text_bytes)
    except ValueError as exc:
        raise ValueError(f"MESSAGES: {exc}") from None
