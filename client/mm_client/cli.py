"""mm-client: send image(s) and a prompt to the mm_pipeline ensemble and print the answer."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .client import DEFAULT_MODEL, DEFAULT_PORTS, DEFAULT_STREAM_MODEL, MMClient
from .errors import ClientError, InvalidInput

DEFAULT_PROMPT = "Describe the image."

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4

EPILOG = f"""\
examples:
  mm-client --prompt "Describe" photo.png
  mm-client --url localhost:8000 --protocol http --max-tokens 16 --prompt "Describe" img1.png img2.jpg
  mm-client --protocol grpc --demo-image --json          # gRPC on localhost:{DEFAULT_PORTS["grpc"]}, generated image
  mm-client --ready                                      # exit 0 if the server serves {DEFAULT_MODEL}
  mm-client --stream --demo-image                        # gRPC streaming ({DEFAULT_STREAM_MODEL}): tokens as they come

output:
  the generated text on stdout (--stream: printed as it is generated); with --json one object {{"text",
  "token_ids", "latency_s", "finish_reason", "prompt_tokens", "completion_tokens", "image_tokens" (per image,
  after the server resized it to its budget), ("ttft_s" with --stream),
  "images", "url", "protocol"}}. Errors: one line on stderr, "mm-client: error: ...".

exit codes:
  0 success · 1 the server returned an error · 2 bad arguments or unreadable image file ·
  3 no server answers at the URL (start one with ./scripts/serve) · 4 timeout ·
  5 the server is busy (UNAVAILABLE: queue full, deadline passed, ...): retry later
"""


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mm-client",
        description="Send image(s) and a prompt to the disaggregated multimodal pipeline "
        f"(Triton ensemble '{DEFAULT_MODEL}') and print the generated text.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "images", nargs="*", metavar="IMAGE", help="image file(s) (PNG, JPEG, ...), sent as encoded bytes in this order"
    )
    p.add_argument(
        "--url",
        default=None,
        help=f"server host:port (default: localhost:{DEFAULT_PORTS['http']} for http, "
        f"localhost:{DEFAULT_PORTS['grpc']} for grpc)",
    )
    p.add_argument("--protocol", "-i", choices=("http", "grpc"), default="http", help="transport (default: http)")
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help=f"the text prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument(
        "--max-tokens", "-n", type=positive_int, default=None, help="maximum new tokens (default: the server's default)"
    )
    p.add_argument(
        "--demo-image", action="store_true", help="also send a generated demo picture (first), so no file is needed"
    )
    p.add_argument("--json", action="store_true", help="print a JSON object instead of plain text")
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=120.0,
        metavar="SECONDS",
        help="request timeout in seconds (default: 120)",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name to call (default: {DEFAULT_MODEL})")
    p.add_argument(
        "--stream",
        action="store_true",
        help=f"stream tokens as they are generated (gRPC streaming to {DEFAULT_STREAM_MODEL}; implies "
        "--protocol grpc, default port 8001)",
    )
    p.add_argument(
        "--stream-model",
        default=DEFAULT_STREAM_MODEL,
        help=f"model name for --stream (default: {DEFAULT_STREAM_MODEL})",
    )
    p.add_argument(
        "--ready",
        action="store_true",
        help="only check that the server is ready and serves the model; exit 0 (ready) or 3",
    )
    return p


def _error(msg: str, code: int) -> int:
    print(f"mm-client: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad usage, 0 on --help
    if args.stream:
        args.protocol = "grpc"
    url = args.url or f"localhost:{DEFAULT_PORTS[args.protocol]}"

    try:
        client = MMClient(url, protocol=args.protocol, timeout_s=args.timeout, model=args.model)
    except ClientError as e:
        return _error(e, getattr(e, "exit_code", EXIT_FAILED))

    with client:
        if args.ready:
            if client.is_ready():
                print(f"ready: {client.display_url} serves {args.model}")
                return EXIT_OK
            return _error(
                f"{client.display_url} ({args.protocol}) is not ready or does not serve {args.model}"
                "; start a server with ./scripts/serve",
                EXIT_UNAVAILABLE,
            )

        images: list = []
        if args.demo_image:
            from .demo import demo_image

            images.append(demo_image())
        images += args.images
        if not images:
            return _error("no image given: pass image file(s) or --demo-image (see --help)", EXIT_USAGE)

        try:
            if args.stream:
                printer = None if args.json else (lambda chunk: print(chunk.text, end="", flush=True))
                result = client.generate_stream(
                    images, args.prompt, max_tokens=args.max_tokens, on_chunk=printer, model=args.stream_model
                )
            else:
                result = client.generate(images, args.prompt, max_tokens=args.max_tokens)
        except InvalidInput as e:
            return _error(e, EXIT_USAGE)
        except ClientError as e:
            return _error(e, getattr(e, "exit_code", EXIT_FAILED))
        except KeyboardInterrupt:
            return _error("interrupted", 130)

    if args.json:
        out = result.to_dict()
        out.update(images=len(images), url=client.display_url, protocol=args.protocol)
        print(json.dumps(out, ensure_ascii=False))
    elif args.stream:
        print()
    else:
        print(result.text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
