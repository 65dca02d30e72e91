"""Sequence: one request's state inside the engine, from submit to its final sink call."""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field

import torch

from mm_models.qwen2vl import EncodedImage

from .api import GenerationRequest, ResponseSink
from .detok import IncrementalDetokenizer
from .runner import PreparedPrompt
from .timing import SequenceTiming


class SeqState(enum.Enum):
    LOADING = "loading"  # images being loaded on a loader thread
    READY = "ready"  # images landed (or none): waiting for a KV slot
    PREFILLING = "prefilling"  # holds a slot, prompt partly in the cache
    RUNNING = "running"  # holds a slot, decoding
    DONE = "done"  # final sink call made, holds nothing


@dataclass(eq=False)
class Sequence:
    """Per-request state. Only the loop thread mutates it, except ``ended`` (read by loader threads)."""

    request: GenerationRequest
    sink: ResponseSink
    arrival: float
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    state: SeqState = SeqState.LOADING
    images: list[EncodedImage] | None = None
    prompt: PreparedPrompt | None = None
    prefilled: int = 0  # prompt tokens in the cache
    rope_delta: int = 0  # M-RoPE: position of token i >= prompt_len is i + rope_delta
    output: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    ended: threading.Event = field(default_factory=threading.Event)
    timing: SequenceTiming | None = None  # stamped by the loop and the loader thread (see timing.py)

    def __post_init__(self) -> None:
        if self.timing is None:
            self.timing = SequenceTiming(self.request.request_id, self.arrival)

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def holds_slot(self) -> bool:
        return self.state in (SeqState.PREFILLING, SeqState.RUNNING)

    @property
    def cached_len(self) -> int:
        """Tokens of this sequence in its KV row (the newest output token is not cached yet)."""
        if self.state is SeqState.RUNNING:
            return self.prompt_len + len(self.output) - 1
        if self.state is SeqState.PREFILLING:
            return self.prefilled
        return 0

    def cancelled_or_ended(self) -> bool:
        """The probe handed to ImageLoader.load."""
        if self.ended.is_set():
            return True
        try:
            return bool(self.request.cancelled())
        except Exception:  # noqa: BLE001 - a failing probe never fails the load
            return False
