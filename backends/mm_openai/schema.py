"""The chat-completion request body: parsed with pydantic, checked, turned into a :class:`ChatRequest`.

Only what the engine really does is accepted; an option it would silently ignore is refused with a
400 naming it (``n`` > 1, ``logprobs``, tools, penalties, ``logit_bias``, a non-text ``response_format``).
Unknown fields are ignored, as OpenAI's own clients send new ones over time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mm_models.chat import ChatMessages, parse_messages

from .errors import APIError, bad_request

SEED_LIMIT = 2**63
MAX_STOP = 4  # as mm_engine.api.MAX_STOP_STRINGS / MAX_STOP_BYTES (not imported: that pulls in torch)
MAX_STOP_BYTES = 256


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class ImageURL(_Base):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Base):
    type: Literal["image_url"]
    image_url: ImageURL


class TextPart(_Base):
    type: Literal["text"]
    text: str


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Base):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None


class StreamOptions(_Base):
    include_usage: bool = False


class ChatCompletionBody(_Base):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # extension (vLLM's): -1 or 0 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    user: str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None


@dataclass(frozen=True)
class ImageSource:
    """One image of the request, in prompt order: its URL and the field it came from (for errors)."""

    url: str
    param: str


@dataclass(frozen=True)
class Sampling:
    """What goes to Triton; None = the model's default (greedy, its default_max_tokens)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: ChatMessages
    images: tuple[ImageSource, ...]
    sampling: Sampling
    stream: bool
    include_usage: bool


def parse_body(raw: bytes, max_tokens_limit: int, max_images: int) -> ChatRequest:
    """Parse and check one request body; APIError(400) naming the field otherwise."""
    try:
        body = ChatCompletionBody.model_validate_json(raw)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    _refuse_unsupported(body)
    messages, images = _convert_messages(body.messages)
    if len(images) > max_images:
        raise bad_request(f"at most {max_images} images per request, got {len(images)}", "messages")
    try:
        chat = parse_messages(messages)
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from None
    return ChatRequest(
        model=body.model,
        messages=chat,
        images=tuple(images),
        sampling=_sampling(body, max_tokens_limit),
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )


def _validation_error(exc: ValidationError) -> APIError:
    """The most specific problem pydantic found (deepest field), named the way OpenAI names params."""
    errors = exc.errors(include_url=False)
    if errors[0].get("type") == "json_invalid":
        return bad_request(
            f"the request body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')}".rstrip(": ")
        )
    by_param: dict[str, list[str]] = {}
    for err in errors:
        by_param.setdefault(_param(err.get("loc", ())), []).append(err["msg"])
    param = max(by_param, key=lambda p: (p.count(".") + p.count("["), len(p)))
    if not param:
        return bad_request(f"the request body must be a JSON object: {by_param[param][0]}")
    return bad_request(f"{param}: {', or '.join(dict.fromkeys(by_param[param]))}", param)


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or part in _BRANCH_TYPES:
            continue  # pydantic's names of union branches, not fields
        elif part in _PART_TAGS and i > 0 and isinstance(loc[i - 1], int):
            continue  # the content-part union's tag, right after the part's index
        else:
            out += ("." if out else "") + str(part)
    return out


_BRANCH_TYPES = {"str", "int", "float", "bool", "none"}
_PART_TAGS = {"text", "image_url"}


def _refuse_unsupported(body: ChatCompletionBody) -> None:
    if body.n not in (None, 1):
        raise bad_request(f"n: only n=1 is supported, got {body.n}", "n")
    if body.logprobs or body.top_logprobs:
        raise bad_request("logprobs: not supported", "logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0, 0.0):
            raise bad_request(f"{name}: not supported (only 0)", name)
    if body.logit_bias:
        raise bad_request("logit_bias: not supported", "logit_bias")
    if body.tools or body.functions or body.tool_choice not in (None, "none"):
        raise bad_request("tools: tool and function calling are not supported", "tools")
    if body.response_format and body.response_format.get("type") != "text":
        raise bad_request('response_format: only {"type": "text"} is supported', "response_format")


def _convert_messages(messages: list[Message]) -> tuple[list[dict[str, Any]], list[ImageSource]]:
    """OpenAI messages -> the MESSAGES wire shape ({"type": "image"} parts) + the image URLs in order."""
    out: list[dict[str, Any]] = []
    images: list[ImageSource] = []
    for i, msg in enumerate(messages):
        role = "system" if msg.role == "developer" else msg.role
        if msg.content is None:
            raise bad_request(
                f"messages[{i}].content: required (tool calls are not supported)", f"messages[{i}].content"
            )
        if isinstance(msg.content, str):
            out.append({"role": role, "content": msg.content})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(msg.content):
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            else:
                parts.append({"type": "image"})
                images.append(ImageSource(part.image_url.url, f"messages[{i}].content[{j}].image_url.url"))
        out.append({"role": role, "content": parts})
    return out, images


def _sampling(body: ChatCompletionBody, max_tokens_limit: int) -> Sampling:
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if (
        body.max_tokens is not None
        and body.max_completion_tokens is not None
        and body.max_tokens != body.max_completion_tokens
    ):
        raise bad_request("max_tokens and max_completion_tokens differ; give one", "max_completion_tokens")
    if max_tokens is not None and not 1 <= max_tokens <= max_tokens_limit:
        raise bad_request(f"{name}: must be in [1, {max_tokens_limit}], got {max_tokens}", name)
    if body.seed is not None and not 0 <= body.seed < SEED_LIMIT:
        raise bad_request(f"seed: must be in [0, 2**63), got {body.seed}", "seed")
    stop: tuple[str, ...] = ()
    if body.stop is not None:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
        if len(stop) > MAX_STOP:
            raise bad_request(f"stop: at most {MAX_STOP} strings, got {len(stop)}", "stop")
        if any(not s or len(s.encode("utf-8", "surrogatepass")) > MAX_STOP_BYTES for s in stop):
            raise bad_request(f"stop: strings must be non-empty and at most {MAX_STOP_BYTES} bytes", "stop")
    top_k = None if body.top_k in (None, -1, 0) else body.top_k
    return Sampling(max_tokens, body.temperature, body.top_p, top_k, body.seed, stop)
