"""The monolithic service: decode, validate, encode and generate in one process; no Triton inside.

Same public contract and the same input checks (and error messages) as the disaggregated
``mm_pipeline`` (``mm_encoder`` + ``mm_language``), so a client cannot tell them apart except by
speed and memory: IMAGE (encoded bytes, one or more), PROMPT, optional MAX_TOKENS -> TEXT, TOKEN_IDS.
The greedy tokens equal the pipeline's (both are checked against the same oracle,
``mm_models.qwen2vl.MonolithicModel``, which this service runs).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mm_models.chat import ChatMessages
from mm_models.geometry import ImageGeometry
from mm_models.images import decode_image
from mm_models.qwen2vl import MonolithicModel

log = logging.getLogger(__name__)
MAX_IMAGES_PER_REQUEST = 16  # as mm_encoder / mm_language
DEFAULT_MAX_TOKENS = 32
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
DEFAULT_MAX_EMBED_TOKENS = 8192


class RequestTooLarge(ValueError):
    """An image gives more embedding tokens than configured (INVALID_ARG, like the pipeline's)."""


@dataclass(frozen=True)
class MonolithicOutput:
    text: str
    token_ids: list[int]
    image_tokens: list[int]


class MonolithicService:
    """Owns one full Qwen2-VL (vision + language) and answers whole requests."""

    def __init__(
        self,
        checkpoint: str | Path,
        device: str = "cpu",
        name: str = "mm_monolithic",
        max_embed_tokens: int = DEFAULT_MAX_EMBED_TOKENS,
        max_tokens_limit: int = 1024,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if max_embed_tokens < 1 or max_tokens_limit < 1 or default_max_tokens < 1:
            raise ValueError("max_embed_tokens, max_tokens_limit and default_max_tokens must be >= 1")
        self.name = name
        self.max_embed_tokens = max_embed_tokens
        self.max_tokens_limit = max_tokens_limit
        self.default_max_tokens = min(default_max_tokens, max_tokens_limit)
        self.max_image_pixels = max_image_pixels
        self.geometry = ImageGeometry.from_model_dir(checkpoint)
        self.model = MonolithicModel.from_pretrained(checkpoint, device=device)
        log.info("%s: checkpoint %s on %s (colocated, no transfer)", name, checkpoint, device)

    def check_request(self, images: Sequence[bytes], prompt: str | ChatMessages,
                      max_tokens: int | None) -> tuple[list, list[int], int]:
        """Decode and validate everything before any model work; ValueError names the bad input."""
        if len(images) > MAX_IMAGES_PER_REQUEST:
            raise ValueError(f"IMAGE: at most {MAX_IMAGES_PER_REQUEST} images per request, got {len(images)}")
        decoded, counts = [], []
        for i, data in enumerate(images):
            try:
                image = decode_image(data, self.max_image_pixels)
            except ValueError as exc:
                raise ValueError(f"IMAGE[{i}]: {exc}") from None
            tokens = self.geometry.tokens_for(image.width, image.height)
            if tokens > self.max_embed_tokens:
                raise RequestTooLarge(
                    f"IMAGE[{i}]: {image.width}x{image.height} gives {tokens} embedding tokens, more than the "
                    f"configured maximum max_embed_tokens={self.max_embed_tokens}"
                )
            decoded.append(image)
            counts.append(tokens)
        if isinstance(prompt, ChatMessages):
            if prompt.num_images != len(images):
                raise ValueError(f"MESSAGES: {prompt.num_images} image part(s) but {len(images)} image(s) given")
        elif not prompt.strip():
            raise ValueError("PROMPT: must not be empty")
        if max_tokens is None:
            max_tokens = self.default_max_tokens
        if not 1 <= max_tokens <= self.max_tokens_limit:
            raise ValueError(f"MAX_TOKENS: must be in [1, {self.max_tokens_limit}], got {max_tokens}")
        return decoded, counts, max_tokens

    def generate(
        self, images: Sequence[bytes], prompt: str | ChatMessages, max_tokens: int | None = None, request_id: str = ""
    ) -> MonolithicOutput:
        decoded, counts, max_tokens = self.check_request(images, prompt, max_tokens)
        token_ids = self.model.generate(decoded, prompt, max_tokens)
        log.debug("%s: request %s: %d image(s) %s tokens -> %d new tokens", self.name, request_id,
                  len(decoded), counts, len(token_ids))
        return MonolithicOutput(self.model.decode(token_ids), token_ids, counts)

    def close(self) -> None:
        pass
