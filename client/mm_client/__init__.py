"""Client for the disaggregated multimodal pipeline served by Triton (ensemble ``mm_pipeline``).

from mm_client import MMClient
with MMClient("localhost:8000", protocol="http") as client:
    result = client.generate(["photo.jpg"], "Describe the image.", max_tokens=32)
    print(result.text, result.token_ids, result.latency_s)
with MMClient("localhost:8001", protocol="grpc") as client:       # token streaming (mm_pipeline_stream)
    for chunk in client.stream(["photo.jpg"], "Describe the image.", max_tokens=32):
        print(chunk.text, end="", flush=True)
"""

from .client import DEFAULT_MODEL, DEFAULT_PORTS, DEFAULT_STREAM_MODEL, GenerateResult, MMClient, StreamChunk
from .demo import demo_image
from .errors import (
    BadRequest,
    ClientError,
    ClientTimeout,
    FileNotFound,
    InvalidInput,
    ServerBusy,
    ServerError,
    ServerUnavailable,
)

__all__ = [
    "MMClient",
    "GenerateResult",
    "StreamChunk",
    "DEFAULT_STREAM_MODEL",
    "ServerBusy",
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
