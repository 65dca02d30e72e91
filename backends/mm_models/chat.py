"""Chat conversations: validation of OpenAI-shaped messages and rendering with the checkpoint's template.

One rendering for every path, so the oracle holds: ``mm_language`` (disaggregated), ``mm_monolithic`` and
the oracle :class:`~mm_models.qwen2vl.MonolithicModel` all call :func:`render_chat`, which runs the
checkpoint's own chat template (``tokenizer.apply_chat_template(..., add_generation_prompt=True,
tokenize=False)``). A plain PROMPT with n images is the single user turn of :func:`single_turn` (n image
parts, then the text), which renders exactly what :func:`mm_models.prompt.render_prompt` gives (tested).

The wire shape (the ``MESSAGES`` input, a JSON array) is OpenAI's, except that an image part is
``{"type": "image"}`` and stands for the next image of the request (the ``IMAGE`` input, in order)::

    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
     {"role": "assistant", "content": "A cat."},
     {"role": "user", "content": "And its colour?"}]
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from .prompt import CHAT_TEMPLATE, check_prompt

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
#: Bounds of one conversation; the language side's own limits (prompt bytes, context) apply on top.
MAX_MESSAGES = 256
MAX_IMAGES = 16  # as MAX_IMAGES_PER_REQUEST of mm_encoder / mm_language
MAX_MESSAGES_JSON_BYTES = 1024 * 1024
DEFAULT_MAX_TEXT_BYTES = 128 * 1024


@dataclass(frozen=True)
class ChatMessages:
    """A validated conversation, normalised to plain dicts the chat template understands.

    ``messages``: tuple of ``{"role": r, "content": str | [parts]}``, parts ``{"type": "text", "text": s}``
    or ``{"type": "image"}``. ``num_images``: the image parts, in order of appearance.
    """

    messages: tuple[dict[str, Any], ...]
    num_images: int
    text_bytes: int

    def to_json(self) -> str:
        """The wire form (the MESSAGES input)."""
        return json.dumps(list(self.messages), ensure_ascii=False, separators=(",", ":"))


def single_turn(prompt: str, num_images: int) -> ChatMessages:
    """The conversation a plain PROMPT with ``num_images`` images stands for: one user turn, the
    images first, then the text (the layout of :func:`mm_models.prompt.render_prompt`)."""
    check_prompt(prompt)
    if isinstance(num_images, bool) or not isinstance(num_images, int) or not 0 <= num_images <= MAX_IMAGES:
        raise ValueError(f"num_images must be an int in [0, {MAX_IMAGES}], got {num_images!r}")
    parts: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    parts.append({"type": "text", "text": prompt})
    return ChatMessages(({"role": "user", "content": parts},), num_images, len(prompt.encode("utf-8", "surrogatepass")))


def parse_messages(raw: str | bytes | list[Any], max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> ChatMessages:
    """Validate a conversation (a JSON string / bytes, or the decoded list); ValueError names the bad
    field as ``messages[i].content[j]...``. Rules: 1..MAX_MESSAGES messages; role system, user or
    assistant; content a string or a non-empty list of text / image parts; images only in user turns, at
    most MAX_IMAGES; no reserved vision tokens in any text; at most ``max_text_bytes`` of text in all;
    the last message is the user's (the answer to it is generated); something to answer (text or image).
    """
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > MAX_MESSAGES_JSON_BYTES:
            raise ValueError(f"messages: longer than {MAX_MESSAGES_JSON_BYTES} bytes of JSON")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("messages: not valid UTF-8") from None
    if isinstance(raw, str):
        if len(raw) > MAX_MESSAGES_JSON_BYTES:
            raise ValueError(f"messages: longer than {MAX_MESSAGES_JSON_BYTES} bytes of JSON")
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"messages: not valid JSON ({exc})") from None
    if not isinstance(raw, list) or not raw:
        raise ValueError("messages: must be a non-empty JSON array of messages")
    if len(raw) > MAX_MESSAGES:
        raise ValueError(f"messages: at most {MAX_MESSAGES} messages, got {len(raw)}")
    out: list[dict[str, Any]] = []
    counter = _Counter()
    for i, msg in enumerate(raw):
        out.append(_parse_message(msg, f"messages[{i}]", counter))
    if counter.text_bytes > max_text_bytes:
        raise ValueError(f"messages: {counter.text_bytes} bytes of text, more than the limit of {max_text_bytes}")
    if out[-1]["role"] != "user":
        raise ValueError(f"messages: the last message must have role 'user', got {out[-1]['role']!r}")
    if counter.images == 0 and not any(_text_of(m).strip() for m in out if m["role"] == "user"):
        raise ValueError("messages: the user turns hold neither text nor images")
    return ChatMessages(tuple(out), counter.images, counter.text_bytes)


@dataclass
class _Counter:
    images: int = 0
    text_bytes: int = 0

    def text(self, value: object, where: str) -> str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: must be a string, got {type(value).__name__}")
        try:
            check_prompt(value)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        self.text_bytes += len(value.encode("utf-8", "surrogatepass"))
        return value


def _parse_message(msg: object, where: str, counter: _Counter) -> dict[str, Any]:
    if not isinstance(msg, dict):
        raise ValueError(f"{where}: must be an object with 'role' and 'content'")
    unknown = sorted(set(msg) - {"role", "content"})
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} (only 'role' and 'content')")
    role = msg.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role: must be one of {list(ROLES)}, got {role!r}")
    if "content" not in msg:
        raise ValueError(f"{where}.content: missing")
    content = msg["content"]
    if isinstance(content, str):
        return {"role": role, "content": counter.text(content, f"{where}.content")}
    if not isinstance(content, list) or not content:
        raise ValueError(f"{where}.content: must be a string or a non-empty array of parts")
    parts = [_parse_part(p, f"{where}.content[{j}]", role, counter) for j, p in enumerate(content)]
    return {"role": role, "content": parts}


def _parse_part(part: object, where: str, role: str, counter: _Counter) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise ValueError(f"{where}: must be an object with a 'type'")
    kind = part.get("type")
    if kind == "text":
        if set(part) != {"type", "text"}:
            raise ValueError(f"{where}: a text part has exactly the fields 'type' and 'text'")
        return {"type": "text", "text": counter.text(part["text"], f"{where}.text")}
    if kind == "image":
        if set(part) != {"type"}:
            raise ValueError(f'{where}: an image part is {{"type": "image"}} (the image itself goes in IMAGE)')
        if role != "user":
            raise ValueError(f"{where}: images are allowed in user messages only, not {role!r}")
        counter.images += 1
        if counter.images > MAX_IMAGES:
            raise ValueError(f"{where}: at most {MAX_IMAGES} images per request")
        return {"type": "image"}
    raise ValueError(f"{where}.type: must be 'text' or 'image', got {kind!r}")


def _text_of(msg: dict[str, Any]) -> str:
    content = msg["content"]
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content)


def chat_template_of(tokenizer: Any) -> str:
    """The checkpoint's chat template; Qwen2-VL's (:data:`CHAT_TEMPLATE`) when the tokenizer has none
    (older exports keep it only in the processor's ``chat_template.json``)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        return template
    if isinstance(template, dict) and isinstance(template.get("default"), str):
        return template["default"]
    logger.warning("the tokenizer has no chat template; using Qwen2-VL's built-in one")
    return CHAT_TEMPLATE


def render_chat(tokenizer: Any, conversation: str | ChatMessages, num_images: int) -> str:
    """The prompt text for a request with ``num_images`` images: ``conversation`` is a plain prompt
    (rendered as :func:`single_turn`) or validated :class:`ChatMessages` whose image parts must number
    ``num_images``. Each image becomes one ``<|image_pad|>`` (expanded to its token count later)."""
    if isinstance(conversation, str):
        conversation = single_turn(conversation, num_images)
    elif not isinstance(conversation, ChatMessages):
        raise ValueError(f"prompt must be a string (or ChatMessages), got {type(conversation).__name__}")
    if conversation.num_images != num_images:
        raise ValueError(f"MESSAGES: {conversation.num_images} image part(s) but {num_images} image(s) given")
    text = tokenizer.apply_chat_template(
        [dict(m) for m in conversation.messages],
        chat_template=chat_template_of(tokenizer),
        add_generation_prompt=True,
        tokenize=False,
    )
    if not isinstance(text, str):  # a template/tokenizer that ignores tokenize=False
        raise ValueError(f"the chat template rendered {type(text).__name__}, not text")
    return text
