"""Qwen2-VL split into an encoder side and a language side, plus the monolithic oracle.

- :class:`VisionEncoder`  -- image -> :class:`EncodedImage` (vision weights only).
- :class:`LanguageModel`  -- prompt + list of :class:`EncodedImage` -> greedy new token ids (no vision weights).
- :class:`MonolithicModel`, :func:`monolithic_generate` -- the full model, the correctness oracle.

All loaders read a local checkpoint directory only; the Hugging Face hub is never contacted.
"""

from __future__ import annotations

from .. import _hf  # noqa: F401  (offline environment before transformers is imported)
from .language import LanguageModel
from .monolithic import MonolithicModel, monolithic_generate
from .types import EncodedImage, tokens_from_grid
from .vision import VisionEncoder

__all__ = [
    "EncodedImage",
    "LanguageModel",
    "MonolithicModel",
    "VisionEncoder",
    "monolithic_generate",
    "tokens_from_grid",
]
