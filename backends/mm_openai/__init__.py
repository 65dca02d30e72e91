"""OpenAI-compatible HTTP API in front of the Triton models (``python -m mm_openai --help``).

Triton stays the serving engine: this process validates OpenAI chat-completion requests, resolves image
URLs, and calls ``mm_pipeline`` (unary gRPC) or ``mm_pipeline_stream`` (gRPC stream) through
``tritonclient.grpc.aio``. Modules, one concern each:

- :mod:`mm_openai.config`    -- ServerConfig (every knob, validated; CLI flags and MM_OPENAI_* env)
- :mod:`mm_openai.errors`    -- APIError, OpenAI error objects, Triton error -> HTTP status mapping
- :mod:`mm_openai.schema`    -- the request body (pydantic) -> ChatRequest (messages + image sources + sampling)
- :mod:`mm_openai.images`    -- data: URLs and the http(s) fetch policy (allow-list, loopback, size, timeout)
- :mod:`mm_openai.triton`    -- TritonBackend: tensors in, completion / stream of deltas out
- :mod:`mm_openai.responses` -- chat.completion and chat.completion.chunk objects, SSE framing
- :mod:`mm_openai.metrics`   -- Prometheus metrics of the API server
- :mod:`mm_openai.app`       -- the FastAPI application
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
