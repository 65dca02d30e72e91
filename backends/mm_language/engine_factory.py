"""This instance's engine from its config.pbtxt parameters (``MM_<NAME>`` environment variables override)."""
from __future__ import annotations

from typing import Any, Mapping

from mm_engine.config import EngineConfig
from mm_engine.engine import LLMEngine
from mm_engine.stats import EngineObserver


def engine_config(params: Mapping[str, str], device: str) -> EngineConfig:
    """The validated engine knobs (ValueError names a bad parameter), read before the model is loaded."""
    return EngineConfig.from_params(params, device=device)


def model_dtype(config: EngineConfig) -> str | None:
    """The dtype to load the checkpoint in: None keeps the checkpoint's own ("auto")."""
    return None if config.dtype == "auto" else config.dtype


def make_engine(hf_model: Any, tokenizer: Any, config: EngineConfig,
                observer: EngineObserver | None = None) -> LLMEngine:
    """Start the engine loop over ``hf_model`` (language-only or the full model) and its tokenizer."""
    return LLMEngine(hf_model, tokenizer, config, observer=observer)
