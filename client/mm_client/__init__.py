"""Client for the disaggregated multimodal pipeline served by Triton (ensemble ``mm_pipeline``).

    from mm_client import MMClient
    with MMClient("localhost:8000", protocol="http") as client:
        result = client.generate(["photo.jpg"], "Describe the image.", max_tokens=32)
        print(result.text, result.token_ids, result.latency_s)
"""

from .client import DEFAULT_MODEL, DEFAULT_PORTS, GenerateResult, MMClient
from .demo import demo_image
from .errors import (
    BadRequest,
    ClientError,
    ClientTimeout,
    FileNotFound,
    InvalidInput,
    ServerError,
    ServerUnavailable,
)

__all__ = [
    "MMClient",
    "GenerateResult",
    "DEFAULT_MODEL",
    "DEFAULT_PORTS",
    "demo_image",
    "ClientError",
    "ServerUnavailable",
    "ClientTimeout",
    "ServerError",
    "BadRequest",
    "InvalidInput",
    "FileNotFound",
]
