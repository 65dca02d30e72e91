"""The language engine's contract: what a Triton model hands to the engine and what it gets back.

Roles and their primitives (the rest of ``mm_engine`` implements them; read this file first):

- **Caller** (``mm_language`` / ``mm_monolithic`` Triton models, the in-process benchmark, tests):
  builds a :class:`GenerationRequest` (validated prompt token ids, a :class:`ImageLoader` that produces
  the request's image embeddings, :class:`SamplingParams`, an optional deadline and cancellation probe)
  and calls :meth:`Engine.submit` with a :class:`ResponseSink`. ``submit`` never blocks on model work:
  it validates, admits (or refuses with :class:`EngineError` ``QUEUE_FULL``) and returns.
- **Engine** (one per model instance, owns the model, the GPU and the KV cache): loads images on its own
  threads (pulls overlap the decode of other sequences), admits sequences into the running batch between
  decode steps, samples per request, and reports through the sink: ``on_tokens`` for every new token
  (streaming), then exactly one of ``on_finish`` / ``on_error``. After that final call the sequence holds
  no KV slot, no pool block and no thread.
- **Sink** (the caller's): turns those calls into Triton responses (one final response, or one per
  token with a final flag). Sink methods run on engine threads: they must be quick and must not raise.

This file holds only the contract: dataclasses, enums and ABCs, no implementation.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mm_models.qwen2vl import EncodedImage

#: Most stop strings one request may give, and the longest one (bytes of UTF-8), as OpenAI bounds them.
MAX_STOP_STRINGS = 4
MAX_STOP_BYTES = 256


class FinishReason(enum.Enum):
    """Why a sequence ended normally (OpenAI's ``finish_reason`` values)."""

    STOP = "stop"  # an EOS token or a stop string
    LENGTH = "length"  # max_tokens reached (or the context is full)


class ErrorCause(enum.Enum):
    """Why a sequence ended abnormally; maps to a Triton error code and a metric label."""

    INVALID = "invalid"  # the request itself is bad (INVALID_ARG)
    QUEUE_FULL = "queue_full"  # admission refused: too many waiting (UNAVAILABLE)
    QUEUE_TIMEOUT = "queue_timeout"  # waited longer than max_queue_delay_s for a batch slot (UNAVAILABLE)
    DEADLINE = "deadline"  # the request's own timeout passed (UNAVAILABLE / DEADLINE_EXCEEDED)
    CANCELLED = "cancelled"  # the client cancelled (CANCELLED)
    IMAGE_LOAD = "image_load"  # pulling / encoding an image failed (the loader's own error is chained)
    SHUTDOWN = "shutdown"  # the engine is stopping (UNAVAILABLE)
    INTERNAL = "internal"  # a bug or a device error (INTERNAL)


class EngineError(Exception):
    """A sequence's abnormal end, with its cause; ``__cause__`` keeps the underlying exception."""

    def __init__(self, cause: ErrorCause, message: str) -> None:
        super().__init__(message)
        self.cause = cause


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings; they live with the sequence, so one batch mixes them.

    ``temperature`` 0 means greedy (argmax, bit-identical to HF ``generate(do_sample=False)``);
    ``top_k`` 0 and ``top_p`` 1.0 mean off. ``seed`` makes a sampled request reproducible whatever
    else is in the batch (each sequence draws from its own generator). ``stop``: strings that end the
    text (not included in it), as OpenAI's ``stop``. ``ignore_eos``: an end-of-sequence token does not end it.
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks; vLLM's ignore_eos)

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not (
            isinstance(self.temperature, (int, float))
            and math.isfinite(self.temperature)
            and 0.0 <= self.temperature <= 2.0
        ):
            problems.append(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an int >= 0, got {self.top_k!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63
        ):
            problems.append(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            problems.append(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s.encode("utf-8", "surrogatepass")) > MAX_STOP_BYTES:
                problems.append(f"stop: each string must be non-empty and at most {MAX_STOP_BYTES} bytes")
                break
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class ImageLoader(ABC):
    """Produces a request's image embeddings, in prompt order, on an engine loader thread.

    ``mm_language``: pulls each EMBED_REF through the receiver. ``mm_monolithic``: runs the vision tower.
    """

    @abstractmethod
    def load(self, cancelled: Callable[[], bool]) -> list[EncodedImage]:
        """Block until every embedding is ready; raise on failure (the engine reports IMAGE_LOAD)."""

    @abstractmethod
    def abort(self, reason: str) -> None:
        """Release whatever ``load`` has not consumed (e.g. abort the remaining transfers on their
        senders) when the sequence ends before or instead of ``load``. Idempotent; never raises."""


@dataclass
class GenerationRequest:
    """One sequence to generate. ``prompt_ids``: the rendered prompt with each image's pad run already
    expanded to its token count (``image_token_counts`` in prompt order); the loader's embeddings fill
    those positions. ``deadline``: ``time.monotonic()`` value after which the sequence ends with
    DEADLINE. ``cancelled``: cheap probe polled between steps (see ``ModelBase.cancellation_check``)."""

    request_id: str
    prompt_ids: list[int]
    image_token_counts: Sequence[int]
    images: ImageLoader | None
    sampling: SamplingParams
    deadline: float | None = None
    cancelled: Callable[[], bool] = field(default=lambda: False)


@dataclass(frozen=True)
class GenerationOutput:
    """A finished sequence: all new token ids (EOS included if produced), the text (stop string and
    special tokens removed), why it ended, the token counts OpenAI's ``usage`` reports, and how many
    embedding tokens each image became (after resizing to the budget)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    image_tokens: tuple[int, ...] = ()  # embedding tokens per image, in prompt order (part of prompt_tokens)


class ResponseSink(ABC):
    """Where one sequence's results go. Called from engine threads; must be quick and never raise."""

    def on_tokens(self, token_ids: list[int], text_delta: str) -> None:  # noqa: B027 - optional hook
        """New tokens and the text they completed (may be empty while a multi-byte character or a
        possible stop string is pending). Not called for tokens cut by a stop string."""

    @abstractmethod
    def on_finish(self, output: GenerationOutput) -> None:
        """The sequence ended normally; it is the last call for it."""

    @abstractmethod
    def on_error(self, error: EngineError) -> None:
        """The sequence ended abnormally; it is the last call for it."""


class Engine(ABC):
    """One engine loop per model instance."""

    @abstractmethod
    def submit(self, request: GenerationRequest, sink: ResponseSink) -> None:
        """Admit ``request`` or raise EngineError (QUEUE_FULL, INVALID, SHUTDOWN) at once; never waits
        for model work. After a successful submit the sink gets exactly one final call."""

    @abstractmethod
    def close(self) -> None:
        """Stop the loop; every admitted sequence gets on_error(SHUTDOWN) and frees what it holds."""
