"""This instance's engine from its config.pbtxt parameters (``MM_<NAME>`` environment variables override)."""

from __future__ import annotations

import logging
from typing import Any, Mapping

from mm_engine.config import EngineConfig
from mm_engine.engine import LLMEngine
from mm_engine.stats import EngineObserver

log = logging.getLogger(__name__)


def engine_config(params: Mapping[str, str], device: str) -> EngineConfig:
    """The validated engine knobs (ValueError names a bad parameter), read before the model is loaded."""
    return EngineConfig.from_params(params, device=device)


def warn_if_an_image_cannot_fit(config: EngineConfig, max_image_tokens: int, name: str) -> None:
    """Say at load time when one largest image (after resizing to the budget) cannot fit a KV slot: such
    requests would be refused as too long, which the budget is meant to prevent."""
    if max_image_tokens >= config.max_seq_len:
        log.warning(
            "%s: one image may take %d embedding tokens but a KV slot holds %d (max_seq_len): requests "
            "with such images will be refused; raise max_seq_len or lower max_pixels / max_embed_tokens",
            name,
            max_image_tokens,
            config.max_seq_len,
        )


def model_dtype(config: EngineConfig) -> str | None:
    """The dtype to load the checkpoint in: None keeps the checkpoint's own ("auto")."""
    return None if config.dtype == "auto" else config.dtype


def make_engine(
    hf_model: Any, tokenizer: Any, config: EngineConfig, observer: EngineObserver | None = None
) -> LLMEngine:
    """Start the engine loop over ``hf_model`` (language-only or the full model) and its tokenizer."""
    return LLMEngine(hf_model, tokenizer, config, observer=observer)
