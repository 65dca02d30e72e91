"""Image size <-> embedding-token arithmetic of Qwen2-VL preprocessing, without torch or transformers.

Qwen2-VL resizes an image so both sides are multiples of ``factor = patch_size * merge_size`` and the
pixel count lies in ``[min_pixels, max_pixels]`` ("smart resize"), cuts it into
``patch_size x patch_size`` patches and merges ``merge_size x merge_size`` patches into one embedding
token. So a resized image of ``H x W`` pixels gives ``(H / factor) * (W / factor)`` tokens.

:func:`smart_resize` mirrors ``transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.smart_resize``
(the test-suite checks they agree); :class:`mm_models.qwen2vl.VisionEncoder` itself asks the
checkpoint's image processor, so this module is a cheap helper for clients and tests.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ._hf import PREPROCESSOR_FILE, read_json

MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Return the (height, width) Qwen2-VL resizes an image to. ValueError on a bad size/aspect ratio."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio must be at most {MAX_ASPECT_RATIO}:1, got {width}x{height}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class ImageGeometry:
    """Preprocessing geometry of a checkpoint's image processor."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int

    def __post_init__(self) -> None:
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})")

    @property
    def factor(self) -> int:
        """Pixels per embedding token along one side (patch_size * merge_size)."""
        return self.patch_size * self.merge_size

    @property
    def max_tokens(self) -> int:
        """Most embedding tokens one image can give (max_pixels / factor^2, rounded down)."""
        return self.max_pixels // (self.factor * self.factor)

    @classmethod
    def from_model_dir(cls, path: str | os.PathLike[str]) -> ImageGeometry:
        """Read the geometry from ``preprocessor_config.json`` of a checkpoint directory.

        Understands both the transformers-5 ``size`` dict (shortest_edge/longest_edge = min/max pixels)
        and the older top-level ``min_pixels``/``max_pixels`` keys (top-level keys win, as in
        transformers).
        """
        cfg = read_json(Path(path) / PREPROCESSOR_FILE)
        size = cfg.get("size") or {}
        min_pixels = cfg.get("min_pixels", size.get("shortest_edge", size.get("min_pixels", 56 * 56)))
        max_pixels = cfg.get("max_pixels", size.get("longest_edge", size.get("max_pixels", 28 * 28 * 1280)))
        return cls(
            patch_size=int(cfg.get("patch_size", 14)),
            merge_size=int(cfg.get("merge_size", 2)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
        )

    def with_budget(self, max_tokens: int = 0, max_pixels: int = 0, min_pixels: int = 0) -> ImageGeometry:
        """This geometry under a serving budget: images are resized (never refused) to at most
        ``max_tokens`` embedding tokens and ``max_pixels`` pixels, whichever is smaller, and never above
        the checkpoint's own ``max_pixels``; ``min_pixels`` replaces the checkpoint's lower bound.
        0 leaves a bound as the checkpoint has it. The result's ``max_pixels`` is what the image processor
        is given (:meth:`processor_kwargs`), so the processor's own rounding keeps every image within
        ``max_tokens`` (except aspect ratios so extreme that one row of tokens is already over it).
        ValueError for negative values or a budget below ``min_pixels``.
        """
        for name, value in (("max_tokens", max_tokens), ("max_pixels", max_pixels), ("min_pixels", min_pixels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int (0 = the checkpoint's), got {value!r}")
        budget = self.max_pixels
        if max_pixels:
            budget = min(budget, max_pixels)
        if max_tokens:
            budget = min(budget, max_tokens * self.factor * self.factor)
        floor = min_pixels or self.min_pixels
        if budget < floor or budget < self.factor * self.factor:
            raise ValueError(
                f"image budget of {budget} pixels ({budget // (self.factor * self.factor)} tokens) is below "
                f"min_pixels={floor} (one token is {self.factor}x{self.factor} pixels): raise max_pixels / "
                "max_embed_tokens or lower min_pixels"
            )
        return dataclasses.replace(self, min_pixels=floor, max_pixels=budget)

    def processor_kwargs(self) -> dict[str, int]:
        """The image processor arguments that apply this geometry's pixel bounds (transformers'
        ``Qwen2VLImageProcessor*.from_pretrained(..., **kwargs)``; also vLLM's ``--mm-processor-kwargs``)."""
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}

    def downscales(self, width: int, height: int) -> bool:
        """Whether an image of ``width x height`` is shrunk to fit ``max_pixels`` (not only rounded to
        whole tokens)."""
        h = round(height / self.factor) * self.factor
        w = round(width / self.factor) * self.factor
        return h * w > self.max_pixels

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after smart resize."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return w, h

    def grid_thw(self, width: int, height: int) -> tuple[int, int, int]:
        """Patch grid (t, h, w) of one still image of ``width x height`` pixels (t is always 1)."""
        w, h = self.resized(width, height)
        return 1, h // self.patch_size, w // self.patch_size

    def tokens_for(self, width: int, height: int) -> int:
        """Embedding tokens an image of ``width x height`` pixels gives."""
        w, h = self.resized(width, height)
        return (w // self.factor) * (h // self.factor)

    def size_for_tokens(self, tokens: int) -> tuple[int, int]:
        """Smallest near-square (width, height) in pixels, multiples of ``factor``, that gives at least
        ``tokens`` tokens (exactly ``rows * cols`` tokens with ``rows = ceil(sqrt(tokens))``, so at most
        ``rows - 1`` more than asked). Raises ValueError beyond what ``max_pixels`` allows.
        """
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"tokens must be a positive int, got {tokens!r}")
        rows = math.isqrt(tokens - 1) + 1
        cols = -(-tokens // rows)
        w, h = cols * self.factor, rows * self.factor
        if w * h > self.max_pixels:
            raise ValueError(f"{tokens} tokens exceed this model's maximum of about {self.max_tokens} per image")
        while w * h < self.min_pixels:  # very small requests: the processor upscales anyway
            rows += 1
            cols += 1
            w, h = cols * self.factor, rows * self.factor
        return w, h
