"""Language serving engine: in-flight batching over a preallocated KV cache (see api.py for the contract).

``LLMEngine`` (engine.py) implements ``Engine``; ``EngineConfig`` (config.py) sizes it; ``EngineObserver``
/ ``EngineStats`` (stats.py) expose its metrics.
"""

from .api import (
    Engine,
    EngineError,
    ErrorCause,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    ImageLoader,
    ResponseSink,
    SamplingParams,
)
from .config import EngineConfig
from .engine import LLMEngine
from .stats import EngineObserver, EngineStats

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineObserver",
    "EngineStats",
    "ErrorCause",
    "FinishReason",
    "GenerationOutput",
    "GenerationRequest",
    "ImageLoader",
    "LLMEngine",
    "ResponseSink",
    "SamplingParams",
]
