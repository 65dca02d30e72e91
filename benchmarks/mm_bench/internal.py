"""White-box calls to the internal models (mm_encoder, mm_language, mm_language_stream) from tests and the soak.

Clients cannot call them (mm_triton.access); tests that exercise them directly add the server's internal
token, read the way the watchdog reads it (the per-server file of that tritonserver process).

    inputs = with_token(server, "mm_encoder", {"IMAGE": images})
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

INTERNAL_MODELS = ("mm_encoder", "mm_language", "mm_language_stream")
TOKEN_INPUT = "MM_INTERNAL_TOKEN"


def internal_token(server: Any) -> str:
    from mm_triton.access import token_of_server

    return token_of_server(server.pid)


def with_token(server: Any, model: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``inputs`` plus the internal token when ``model`` is internal (a copy; ``inputs`` is unchanged)."""
    out = dict(inputs)
    if model in INTERNAL_MODELS and TOKEN_INPUT not in out:
        out[TOKEN_INPUT] = np.array([internal_token(server).encode()], dtype=np.object_)
    return out
