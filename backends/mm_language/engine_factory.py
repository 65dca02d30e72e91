"""This instance's engine from its config.pbtxt parameters (``MM_<NAME>`` environment variables override)."""
from __future__ import annotations

from typing import Any, Mapping

from mm_engine.api import Engine
from mm_engine.config import EngineConfig
from mm_engine.stats import EngineObserver


def make_engine(lm: Any, params: Mapping[str, str], device: str, name: str,
                observer: EngineObserver | None = None) -> Engine:
    """The engine over ``lm`` (a :class:`mm_models.qwen2vl.LanguageModel`); ValueError names a bad parameter."""
    config = EngineConfig.from_params(params, device=device)
    raise NotImplementedError(f"waiting for mm_engine ({config}, {name})")
