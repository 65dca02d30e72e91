"""The monolithic service: decode, validate, encode and generate in one process, on the same engine as
``mm_language``; no Triton inside.

Same public contract and the same input checks (and error messages) as the disaggregated ``mm_pipeline``
(``mm_encoder`` + ``mm_language``), so a client cannot tell them apart except by speed and memory. The
checkpoint is loaded once; its vision tower runs in the request's :class:`VisionLoader` on an engine loader
thread (while other sequences decode), its language model in the engine. The greedy tokens equal the
pipeline's (both are checked against the same oracle, ``mm_models.qwen2vl.MonolithicModel``).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, Mapping, Sequence

from PIL import Image

from mm_engine.api import GenerationRequest, ImageLoader, SamplingParams
from mm_engine.stats import EngineObserver
from mm_language.engine_factory import engine_config, make_engine, model_dtype, warn_if_an_image_cannot_fit
from mm_models.chat import ChatMessages
from mm_models.data_url import unwrap_data_url
from mm_models.geometry import ImageGeometry
from mm_models.images import decode_image
from mm_models.qwen2vl import EncodedImage, LanguageModel, VisionEncoder, _loading
from mm_triton.phases import Phase, PhaseClock
from mmtransfer import TransferCancelled

log = logging.getLogger(__name__)
MAX_IMAGES_PER_REQUEST = 16  # as mm_encoder / mm_language
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


class RequestTooLarge(ValueError):
    """An image gives more embedding tokens than configured (INVALID_ARG, like the pipeline's)."""


class VisionLoader(ImageLoader):
    """Runs the vision tower on a request's decoded images (engine loader thread)."""

    def __init__(
        self,
        encoder: VisionEncoder,
        images: Sequence[Image.Image],
        clock: PhaseClock | None = None,
        report: Callable[[PhaseClock], None] | None = None,
    ) -> None:
        """``clock``: the request's phases so far (image decode); ``report(clock)`` gets it back with
        preprocess and vision added once every image is encoded."""
        self._encoder = encoder
        self._images = list(images)
        self._aborted = threading.Event()
        self._clock = clock or PhaseClock()
        self._report = report

    def load(self, cancelled: Callable[[], bool]) -> list[EncodedImage]:
        out = []
        for image in self._images:
            if cancelled() or self._aborted.is_set():
                raise TransferCancelled("cancelled before its images were encoded")
            with self._clock.measure(Phase.PREPROCESS):
                inputs = self._encoder.preprocess(image)
            with self._clock.measure(Phase.VISION):
                out.extend(self._encoder.encode_batch([inputs]))
        self._images = []
        if self._report is not None:
            self._report(self._clock)
        return out

    def abort(self, reason: str) -> None:
        self._aborted.set()
        self._images = []  # nothing else is held: drop the pixels now


class MonolithicService:
    """Owns one full Qwen2-VL (vision + language) and this instance's engine."""

    def __init__(
        self,
        checkpoint: str | Path,
        engine_params: Mapping[str, str],
        device: str = "cpu",
        name: str = "mm_monolithic",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        engine_observer: EngineObserver | None = None,
        geometry: ImageGeometry | None = None,
        on_downscaled: Callable[[int], None] | None = None,
    ) -> None:
        """``geometry``: the serving budget, as the pipeline's encoder applies it (None: the checkpoint's
        processor bounds); ``on_downscaled(n)``: told how many of a request's images were shrunk to it."""
        if max_image_pixels < 1:
            raise ValueError("max_image_pixels must be >= 1")
        self.name = name
        self.max_image_pixels = max_image_pixels
        self.geometry = geometry or ImageGeometry.from_model_dir(checkpoint)
        self.max_embed_tokens = self.geometry.max_tokens
        self._on_downscaled = on_downscaled
        # one copy of the weights serves both: the tower (VisionEncoder) and the text model (LanguageModel)
        self.engine_config = engine_config(engine_params, device)
        warn_if_an_image_cannot_fit(self.engine_config, self.max_embed_tokens, name)
        model = _loading.load_model(checkpoint, "full", device=device, dtype=model_dtype(self.engine_config))
        self.vision = VisionEncoder(model, _loading.load_image_processor(checkpoint, self.geometry), model.device)
        self.lm = LanguageModel(model, _loading.load_tokenizer(checkpoint), model.device)
        self.engine = make_engine(model, self.lm.tokenizer, self.engine_config, engine_observer)
        log.info("%s: checkpoint %s on %s (colocated, no transfer)", name, checkpoint, device)

    def check_images(
        self, images: Sequence[bytes], clock: PhaseClock | None = None
    ) -> tuple[list[Image.Image], list[int]]:
        """Decode and validate every image before any model work; ValueError names the bad one.
        ``clock`` (optional) gets the time spent as ``image_decode``."""
        with (clock or PhaseClock()).measure(Phase.IMAGE_DECODE):
            return self._check_images(images)

    def _check_images(self, images: Sequence[bytes]) -> tuple[list[Image.Image], list[int]]:
        if len(images) > MAX_IMAGES_PER_REQUEST:
            raise ValueError(f"IMAGE: at most {MAX_IMAGES_PER_REQUEST} images per request, got {len(images)}")
        decoded, counts = [], []
        for i, data in enumerate(images):
            data = unwrap_data_url(data, i)  # KServe v2 JSON clients send images as data: URLs
            try:
                image = decode_image(data, self.max_image_pixels)
            except ValueError as exc:
                raise ValueError(f"IMAGE[{i}]: {exc}") from None
            try:
                tokens = self.geometry.tokens_for(image.width, image.height)
            except ValueError as exc:
                raise ValueError(f"IMAGE[{i}]: {image.width}x{image.height} cannot be preprocessed: {exc}") from None
            if tokens > self.max_embed_tokens:
                raise RequestTooLarge(
                    f"IMAGE[{i}]: {image.width}x{image.height} gives {tokens} embedding tokens, more than the "
                    f"configured maximum max_embed_tokens={self.max_embed_tokens}"
                )
            decoded.append(image)
            counts.append(tokens)
        downscaled = sum(self.geometry.downscales(image.width, image.height) for image in decoded)
        if downscaled and self._on_downscaled is not None:
            self._on_downscaled(downscaled)
        return decoded, counts

    def build_request(
        self,
        request_id: str,
        decoded: Sequence[Image.Image],
        counts: Sequence[int],
        prompt: str | ChatMessages,
        sampling: SamplingParams,
        deadline: float | None,
        clock: PhaseClock | None = None,
        report: Callable[[PhaseClock], None] | None = None,
    ) -> GenerationRequest:
        """The engine's request for images already checked by :meth:`check_images`; ``clock`` and
        ``report``: see :class:`VisionLoader`."""
        counts = list(counts)
        prompt_ids = self.lm.build_input_ids(prompt, counts)
        loader = VisionLoader(self.vision, decoded, clock, report) if decoded else None  # text-only: none
        return GenerationRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            image_token_counts=counts,
            images=loader,
            sampling=sampling,
            deadline=deadline,
        )

    def close(self) -> None:
        self.engine.close()
