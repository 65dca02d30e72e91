"""``python -m mm_openai --triton-url localhost:8001 --port 9000``: serve the OpenAI-compatible API."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from .config import ENV_PREFIX, ServerConfig, from_env, parse_hosts

HELP = {
    "triton_url": "Triton gRPC endpoint HOST:PORT (local or remote)",
    "host": "address to listen on (0.0.0.0 for every interface)",
    "port": "port to listen on",
    "served_model_name": "the model name clients send and GET /v1/models lists",
    "triton_model": "Triton model for unary requests",
    "triton_stream_model": "Triton ensemble for stream=true when --stream-via ensemble (or the direct models are "
    "not ready); if it is not ready either, streams get one chunk from --triton-model",
    "triton_encoder_model": "direct stream route: the encoder model called first (EMBED_REF)",
    "triton_language_stream_model": "direct stream route: the decoupled language model streamed from",
    "stream_via": "direct: encoder, then the language model called directly, so a client that goes away cancels "
    "its sequence at once; ensemble: one call to --triton-stream-model (cancellation does not pass "
    "through a Triton 2.51 ensemble: the sequence runs to its end)",
    "internal_token_file": "file (0600) holding the Triton server's internal token, which the direct stream route "
    "needs (the internal models refuse clients); scripts/serve writes it; empty: streams go "
    "through --triton-stream-model",
    "max_body_bytes": "largest request body (413 above)",
    "max_image_bytes": "largest image, decoded data: URL or fetched (413 above)",
    "max_images": "most images per request",
    "max_tokens_limit": "largest max_tokens / max_completion_tokens accepted (400 above)",
    "request_timeout_s": "timeout of one Triton call (a whole stream)",
    "image_fetch_timeout_s": "timeout of one http(s) image fetch",
    "image_url_hosts": "comma-separated host names (or *.suffix) whose http(s) image URLs may be fetched; "
    "empty: none off this machine",
    "image_url_loopback": "fetch image URLs whose host resolves to loopback (a local file server)",
    "triton_concurrency": "Triton calls in flight at once (more wait)",
    "log_level": "critical, error, warning, info or debug",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mm_openai",
        description="OpenAI-compatible HTTP API (POST /v1/chat/completions, GET /v1/models, /health, /metrics) "
        f"in front of the mm-disagg Triton models. Every option may also be set as {ENV_PREFIX}<NAME> "
        "(e.g. MM_OPENAI_IMAGE_URL_HOSTS); the option wins.",
    )
    defaults = ServerConfig()
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.type == "bool":
            p.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=f"{HELP[f.name]} (default: {default})"
            )
        elif f.type == "tuple[str, ...]":
            p.add_argument(flag, type=parse_hosts, default=None, help=f"{HELP[f.name]} (default: {','.join(default)})")
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            p.add_argument(
                flag, type=kind, default=None, metavar=f.name.upper(), help=f"{HELP[f.name]} (default: {default})"
            )
    return p


def config_from_args(argv: list[str] | None = None) -> ServerConfig:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        base = from_env()
        return ServerConfig(**{**{f.name: getattr(base, f.name) for f in fields(ServerConfig)}, **given})
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"mm_openai: error: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
