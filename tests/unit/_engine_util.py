"""Helpers for the in-process engine tests: request builders over the tiny model, loaders and sinks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from mm_engine.api import (
    EngineError,
    GenerationOutput,
    GenerationRequest,
    ImageLoader,
    ResponseSink,
    SamplingParams,
)


def random_image(seed: int, width: int, height: int) -> Image.Image:
    rs = np.random.RandomState(seed)
    return Image.fromarray((rs.rand(height, width, 3) * 255).astype("uint8"))


class EncodingLoader(ImageLoader):
    """Runs the vision encoder on the loader thread (as mm_monolithic would); optional delay and failure."""

    def __init__(
        self,
        encoder,
        images: Sequence[Image.Image],
        delay_s: float = 0.0,
        fail: BaseException | None = None,
        block: threading.Event | None = None,
    ) -> None:
        self.encoder = encoder
        self.images = list(images)
        self.delay_s = delay_s
        self.fail = fail
        self.block = block
        self.aborted: list[str] = []
        self.loaded = threading.Event()

    def load(self, cancelled: Callable[[], bool]):
        if self.block is not None:
            while not self.block.wait(0.01):
                if cancelled():
                    raise RuntimeError("load cancelled")
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        out = [self.encoder.encode(im) for im in self.images]
        self.loaded.set()
        return out

    def abort(self, reason: str) -> None:
        self.aborted.append(reason)


@dataclass
class RecordingSink(ResponseSink):
    """Records every call; ``finals`` counts final calls (must end at exactly 1)."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    output: GenerationOutput | None = None
    error: EngineError | None = None
    finals: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    token_times: list[float] = field(default_factory=list)

    def on_tokens(self, token_ids: list[int], text_delta: str) -> None:
        self.tokens += token_ids
        self.text += text_delta
        self.token_times.append(time.monotonic())

    def on_finish(self, output: GenerationOutput) -> None:
        self.output = output
        self.finals += 1
        self.done.set()

    def on_error(self, error: EngineError) -> None:
        self.error = error
        self.finals += 1
        self.done.set()

    def wait(self, timeout: float = 120.0) -> RecordingSink:
        if not self.done.wait(timeout):
            raise AssertionError("sequence did not end in time")
        return self


@dataclass
class Case:
    """One request of a test: images, prompt and sampling."""

    images: list[Image.Image]
    prompt: str
    sampling: SamplingParams


def build_request(mono, encoder, rid: str, case: Case, loader: ImageLoader | None = None, **kw) -> GenerationRequest:
    """The engine request the pipeline would build for ``case`` (ids exactly as the oracle tokenises)."""
    ids = mono.build_inputs(case.images, case.prompt)["input_ids"][0].tolist()
    counts = [encoder.count_tokens(im) for im in case.images]
    if loader is None and case.images:
        loader = EncodingLoader(encoder, case.images)
    return GenerationRequest(
        request_id=rid, prompt_ids=ids, image_token_counts=counts, images=loader, sampling=case.sampling, **kw
    )


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)
