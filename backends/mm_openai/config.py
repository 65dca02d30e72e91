"""ServerConfig: every knob of the API server, validated once at start-up.

Each field is a CLI flag (``python -m mm_openai --help``) and may be set by an ``MM_OPENAI_<NAME>``
environment variable (the flag wins). A bad value stops start-up with a message naming it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields, replace

ENV_PREFIX = "MM_OPENAI_"
_HOST = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")


@dataclass(frozen=True)
class ServerConfig:
    triton_url: str = "localhost:8001"  # Triton gRPC endpoint
    host: str = "127.0.0.1"
    port: int = 9000
    served_model_name: str = "mm-qwen2-vl"  # the `model` clients name; GET /v1/models lists it
    triton_model: str = "mm_pipeline"  # unary requests
    triton_stream_model: str = "mm_pipeline_stream"  # stream requests via the ensemble
    triton_encoder_model: str = "mm_encoder"  # stream requests, direct route: encode first ...
    triton_language_stream_model: str = "mm_language_stream"  # ... then stream from the language model
    stream_via: str = "direct"  # direct (client disconnect cancels the sequence) or ensemble
    internal_token_file: str = ""  # the direct route's token for the internal models (scripts/serve writes it)
    max_body_bytes: int = 32 * 1024 * 1024  # larger request bodies get 413
    max_image_bytes: int = 20 * 1024 * 1024  # one image (decoded data: URL or fetched)
    max_images: int = 16
    max_tokens_limit: int = 1024  # max_tokens above this get 400 (the language model's own limit applies too)
    request_timeout_s: float = 300.0  # one Triton call (unary) or one whole stream
    image_fetch_timeout_s: float = 10.0
    image_url_hosts: tuple[str, ...] = ()  # hostnames (or *.suffix) whose http(s) images may be fetched
    image_url_loopback: bool = True  # URLs whose host resolves to loopback only may be fetched
    triton_concurrency: int = 256  # Triton calls in flight at once; more wait (then 503 after request_timeout_s)
    log_level: str = "info"

    def __post_init__(self) -> None:
        problems = []
        for name in ("port",):
            if not 0 < getattr(self, name) <= 65535:
                problems.append(f"{name} must be a port, got {getattr(self, name)}")
        for name in ("max_body_bytes", "max_image_bytes", "max_images", "max_tokens_limit", "triton_concurrency"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "image_fetch_timeout_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.stream_via not in ("direct", "ensemble"):
            problems.append(f"stream_via must be direct or ensemble, got {self.stream_via!r}")
        for name in (
            "triton_url",
            "served_model_name",
            "triton_model",
            "triton_stream_model",
            "triton_encoder_model",
            "triton_language_stream_model",
        ):
            if not getattr(self, name).strip():
                problems.append(f"{name} must not be empty")
        for host in self.image_url_hosts:
            if not _HOST.match(host):
                problems.append(f"image_url_hosts: {host!r} is not a host name or *.suffix (no scheme, path or port)")
        if self.log_level.lower() not in ("critical", "error", "warning", "info", "debug"):
            problems.append(f"log_level must be critical/error/warning/info/debug, got {self.log_level!r}")
        if problems:
            raise ValueError("; ".join(problems))


def parse_hosts(value: str) -> tuple[str, ...]:
    """``"a.example, *.cdn.example"`` -> ("a.example", "*.cdn.example"), lower-cased."""
    return tuple(h.strip().lower() for h in value.split(",") if h.strip())


def _convert(name: str, raw: str) -> object:
    kind = {f.name: f.type for f in fields(ServerConfig)}[name]
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "bool":
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r}: not a boolean")
    if kind == "tuple[str, ...]":
        return parse_hosts(raw)
    return raw


def from_env(base: ServerConfig | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    """``base`` with every ``MM_OPENAI_<FIELD>`` variable applied; ValueError names a bad one."""
    environ = os.environ if environ is None else environ
    changes: dict[str, object] = {}
    for f in fields(ServerConfig):
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is None:
            continue
        try:
            changes[f.name] = _convert(f.name, raw)
        except ValueError as exc:
            raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r}: {exc}") from None
    return replace(base or ServerConfig(), **changes)
