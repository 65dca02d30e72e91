"""scripts/serve's side of the API server: its options, and starting it next to (or without) tritonserver."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .config import ServerConfig
from .process import APIServerError, APIServerProcess

DEFAULT_PORT = ServerConfig.port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("OpenAI-compatible API (backends/mm_openai, docs/OPENAI.md)")
    g.add_argument(
        "--openai-port",
        type=int,
        default=DEFAULT_PORT,
        metavar="PORT",
        help=f"port of the OpenAI API server (default: {DEFAULT_PORT})",
    )
    g.add_argument("--no-openai", action="store_true", help="do not start the OpenAI API server")
    g.add_argument(
        "--triton-url",
        default=None,
        metavar="HOST:PORT",
        help="serve ONLY the OpenAI API, in front of this (remote) Triton's gRPC endpoint",
    )
    g.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="model name of the API (default: the checkpoint directory's name)",
    )
    g.add_argument(
        "--image-url-hosts",
        default=None,
        metavar="LIST",
        help="hosts whose http(s) image URLs the API may fetch (default: loopback only)",
    )


def api_args(args: argparse.Namespace, triton_url: str, token_file: str = "") -> list[str]:
    name = args.served_model_name or model_name(args)
    out = ["--triton-url", triton_url, "--served-model-name", name]
    if token_file:  # a path, not the token: the file is 0600
        out += ["--internal-token-file", token_file]
    if args.image_url_hosts:
        out += ["--image-url-hosts", args.image_url_hosts]
    return out


def model_name(args: argparse.Namespace) -> str:
    from mm_params import Params, tiny_model_dir

    ckpt = args.checkpoint or Params().raw("checkpoint") or tiny_model_dir()
    return Path(str(ckpt)).resolve().name or "mm-qwen2-vl"


def start(args: argparse.Namespace, triton_url: str, log_dir: Path, token_file: str = "") -> APIServerProcess | None:
    """The API server for a running Triton (None with --no-openai); SystemExit if it cannot start."""
    if args.no_openai:
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    host = args.address or "0.0.0.0"
    api = APIServerProcess(
        api_args(args, triton_url, token_file),
        host,
        args.openai_port,
        log_file=log_dir / f"openai-{args.openai_port}.log",
    )
    try:
        return api.start()
    except APIServerError as exc:
        raise SystemExit(f"serve: error: the OpenAI API server did not start: {exc}") from None


def banner(api: APIServerProcess | None, model: str) -> str:
    if api is None:
        return ""
    return (
        f"\n  OpenAI   {api.url}/v1   (model {model!r}; log {api.log_file})"
        f"\n           curl {api.url}/v1/chat/completions -H 'content-type: application/json' "
        f'-d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}\''
    )


def run_alone(args: argparse.Namespace) -> int:
    """--triton-url: only the API server, in the foreground, until Ctrl-C."""
    from .__main__ import main

    host = args.address or "0.0.0.0"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return main(["--host", host, "--port", str(args.openai_port), *api_args(args, args.triton_url)])
