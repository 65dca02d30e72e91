"""Serve the model repository with tritonserver (run through scripts/serve, which sets up first)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(
    0, str(ROOT / "backends")
)  # mm_remote, mm_triton.launcher (repository generation), also without the venv's .pth
ROLES = ("all", "encoder", "language")  # as mm_remote.repository.ROLES (imported lazily: --help needs no numpy)

DESCRIPTION = """\
Serve the disaggregated multimodal pipeline with a real tritonserver 2.51. Runs scripts/setup first.
By default it serves the tiny Qwen2-VL model built at set-up (.cache/models/tiny-qwen2-vl); --checkpoint
serves a real Qwen2-VL checkpoint directory instead. Stops cleanly on Ctrl-C / SIGTERM.

roles (--role):
  all       one server: mm_encoder + mm_language + the ensemble mm_pipeline (model_repository/)
  encoder   an encoder server: mm_encoder only (model_repositories/encoder_server/); default ports 8010-8012
  language  a language server: mm_language + mm_pipeline (BLS) that sends the images to the encoder
            server(s) given by --encoder-url (gRPC HOST:PORT) and pulls the embeddings from them
            (model_repositories/language_server/); same mm_pipeline contract as 'all'
Several language servers may share one encoder server, and a language server may use several encoder
servers (--encoder-url repeated: round-robin, skipping unavailable ones). See docs/DEPLOYMENT.md."""

EPILOG = """\
model knobs (passed to the models as environment overrides of config.pbtxt parameters):
  --checkpoint DIR        -> MM_CHECKPOINT            (default: the tiny model, $MM_TINY_MODEL)
  --block-tokens N        -> MM_BLOCK_TOKENS          (tokens per pool block)
  --window-tokens N       -> MM_DEFAULT_WINDOW_TOKENS (default receive window)
  --pool-blocks N         -> MM_POOL_BLOCKS           (blocks per instance pool)
  --no-block-allocator    -> MM_USE_BLOCK_ALLOCATOR=0 (index-based fixed slots, the baseline)
  --encode-threads N      -> MM_ENCODE_THREADS        (threads encoding one request's images; 0 = auto)
  --mm-processor-kwargs J -> MM_MAX_PIXELS, MM_MIN_PIXELS (per-image pixel budget, as vLLM's flag; larger
                             images are resized to it, never refused; 0 / absent = the checkpoint's)
  --max-embed-tokens N    -> MM_MAX_EMBED_TOKENS      (per-image token budget; 0 = what the processor allows)
  --control-host ADDR     -> MM_CONTROL_HOST          (interface the encoder's control endpoints bind)
  --advertise-host ADDR   -> MM_ADVERTISE_HOST        (address language servers use to reach them)
  --control-port PORT     -> MM_CONTROL_PORT          (encoder instance i binds PORT + i; 0 = any free port)
  --encoder-url HOST:PORT -> MM_ENCODER_URLS          (language role: encoder servers' gRPC addresses)
  --encoder-timeout S     -> MM_ENCODER_TIMEOUT_S     (language role: limit of one encoder call)
  Any other MM_* variable already in the environment reaches the models too.
  --encoder-instances/--language-instances/--pipeline-instances/--encoder-gpus/--language-gpus generate a
  repository under .cache/repos/ from the role's source repository (config.pbtxt rewritten, code symlinked).

examples:
  scripts/serve                                  serve on 8000 (HTTP) / 8001 (gRPC) / 8002 (metrics)
  scripts/serve --demo                           ... and answer one demo request first
  scripts/serve --demo --exit                    smoke test: start, demo, stop; exit code = demo's
  scripts/serve --http-port 9000 --grpc-port 9001 --metrics-port 9002 --pool-blocks 64
  scripts/serve --checkpoint /models/Qwen2-VL-2B-Instruct
  scripts/serve -- --log-verbose=1               arguments after -- go to tritonserver
  scripts/serve --encoder-instances 2 --language-instances 2          one server, 2 x 2 instances
  scripts/serve --openai-port 9100               the OpenAI API on 9100 (default 9000; --no-openai: none)
  scripts/serve --triton-url gpu-host:8001       only the OpenAI API, in front of a remote Triton

  split servers on one host (two shells):
  scripts/serve --role encoder                                         HTTP 8010, gRPC 8011, metrics 8012
  scripts/serve --role language --encoder-url localhost:8011 --demo    HTTP 8000, gRPC 8001, metrics 8002
  scripts/serve --role language --encoder-url localhost:8011 --port-base 8020    a second language server

  across hosts (encoder on 10.0.0.5; open 8011 and 9500-9501 to the language hosts):
  scripts/serve --role encoder --control-host 10.0.0.5 --control-port 9500 --encoder-instances 2
  scripts/serve --role language --encoder-url 10.0.0.5:8011

then, from another shell:
  scripts/client --url localhost:8000 --prompt "Describe the image." photo.jpg
  curl -s localhost:9000/v1/chat/completions -H 'content-type: application/json' \\
      -d '{"model": "tiny-qwen2-vl", "messages": [{"role": "user", "content": "Hello"}]}'
  curl -s localhost:8002/metrics | grep mm_
"""


def port(text: str) -> int:
    v = int(text)
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text}")
    return v


def positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/serve",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_server_options(p.add_argument_group("server"))
    add_model_options(p.add_argument_group("model"))
    add_deployment_options(p.add_argument_group("split deployment and instances"))
    from mm_openai.launch import add_arguments as add_openai_arguments  # stdlib only: fine for --help

    add_openai_arguments(p)
    add_demo_options(p.add_argument_group("demo"))
    p.add_argument("triton_args", nargs=argparse.REMAINDER, help="after --: extra arguments for tritonserver")
    return p


def add_server_options(g) -> None:
    g.add_argument(
        "--role",
        choices=ROLES,
        default="all",
        help="all (default): one server; encoder: mm_encoder only; language: mm_language + mm_pipeline "
        "calling --encoder-url",
    )
    g.add_argument(
        "--http-port", type=port, metavar="PORT", default=None, help="HTTP port (default: 8000; role encoder: 8010)"
    )
    g.add_argument(
        "--grpc-port", type=port, metavar="PORT", default=None, help="gRPC port (default: 8001; role encoder: 8011)"
    )
    g.add_argument(
        "--metrics-port",
        type=port,
        metavar="PORT",
        default=None,
        help="Prometheus metrics port (default: 8002; role encoder: 8012)",
    )
    g.add_argument(
        "--port-base",
        type=port,
        metavar="PORT",
        default=None,
        help="HTTP on PORT, gRPC on PORT+1, metrics on PORT+2 (the --*-port options win)",
    )
    g.add_argument(
        "--address",
        default="0.0.0.0",
        help="address the three services bind (default: 0.0.0.0; 127.0.0.1 for this machine only)",
    )
    add_process_options(g)


def add_process_options(g) -> None:
    g.add_argument(
        "--model-repository",
        type=Path,
        action="append",
        default=None,
        metavar="DIR",
        help="model repository served as it is (default: the role's: model_repository/, "
        "model_repositories/encoder_server/ or model_repositories/language_server/); repeat for several",
    )
    g.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long to wait for all models to be ready (default: 600)",
    )
    g.add_argument(
        "--log-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="server log (default: .cache/logs/tritonserver-<http port>.log)",
    )
    g.add_argument("--verbose", "-v", action="store_true", help="also stream the server log to the terminal")
    g.add_argument(
        "--no-watchdog",
        action="store_true",
        help="do not reload a model whose Python stub process died (tritonserver 2.51 does not restart "
        "it; the watchdog needs --model-control-mode=explicit, see docs/RELIABILITY.md)",
    )
    g.add_argument(
        "--max-restarts",
        type=int,
        default=10,
        metavar="N",
        help="start tritonserver again when it dies, at most N times (default: 10; 0: exit instead)",
    )


def add_model_options(m) -> None:
    m.add_argument(
        "--with-baseline",
        action="store_true",
        help="also load the monolithic baseline (mm_monolithic, mm_monolithic_stream; not loaded by "
        "default: it is a benchmark reference, not a service)",
    )
    m.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        metavar="DIR",
        help="a Hugging Face Qwen2-VL checkpoint directory to serve instead of the tiny default",
    )
    m.add_argument("--block-tokens", type=positive_int, default=None, metavar="N", help="tokens per pool block")
    m.add_argument(
        "--window-tokens", type=positive_int, default=None, metavar="N", help="default receive window in tokens"
    )
    m.add_argument("--pool-blocks", type=positive_int, default=None, metavar="N", help="blocks in each pool")
    m.add_argument(
        "--no-block-allocator", action="store_true", help="use index-based fixed slots instead of the block allocator"
    )
    m.add_argument(
        "--encode-threads",
        type=int,
        default=None,
        metavar="N",
        help="threads encoding the images of one request (default 0 = auto: 1 on CPU, 4 on GPU)",
    )
    m.add_argument(
        "--mm-processor-kwargs",
        type=processor_kwargs,
        default=None,
        metavar="JSON",
        help='image processor budget, e.g. \'{"max_pixels": 1003520, "min_pixels": 3136}\': images '
        "above max_pixels are resized to it (aspect ratio kept), as vLLM's --mm-processor-kwargs",
    )
    m.add_argument(
        "--max-embed-tokens",
        type=int,
        default=None,
        metavar="N",
        help="per-image embedding-token budget (0 = the processor's maximum); images are resized to it",
    )


def add_deployment_options(s) -> None:
    s.add_argument(
        "--encoder-url",
        action="append",
        default=None,
        metavar="HOST:PORT",
        help="role language: gRPC address of an encoder server; repeat (or comma-separate) for "
        "several, used round-robin",
    )
    s.add_argument(
        "--encoder-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="role language: how long one call to an encoder server may take (default: 300)",
    )
    s.add_argument(
        "--control-host",
        default=None,
        metavar="ADDR",
        help="interface the encoder instances' control endpoints bind (default: 127.0.0.1, this host "
        "only); 0.0.0.0 for all interfaces (then give --advertise-host)",
    )
    s.add_argument(
        "--advertise-host",
        default=None,
        metavar="ADDR",
        help="address language servers reach the control endpoints at, put into every EMBED_REF "
        "(default: --control-host)",
    )
    s.add_argument(
        "--control-port",
        type=int,
        default=None,
        metavar="PORT",
        help="first control port: encoder instance i binds PORT+i (default 0: any free port)",
    )
    add_instance_options(s)


def add_instance_options(s) -> None:
    s.add_argument(
        "--encoder-instances",
        type=positive_int,
        default=None,
        metavar="N",
        help="mm_encoder instances (per GPU with --encoder-gpus); default: the repository's (1)",
    )
    s.add_argument(
        "--language-instances",
        type=positive_int,
        default=None,
        metavar="N",
        help="mm_language instances (per GPU with --language-gpus); default: the repository's (1)",
    )
    s.add_argument(
        "--pipeline-instances",
        type=positive_int,
        default=None,
        metavar="N",
        help="role language: instances of the BLS mm_pipeline (default: 2 x mm_language's)",
    )
    s.add_argument(
        "--encoder-gpus",
        default=None,
        metavar="LIST",
        help="comma-separated GPUs for mm_encoder instances, e.g. 0,1 (default: CPU)",
    )
    s.add_argument(
        "--language-gpus",
        default=None,
        metavar="LIST",
        help="comma-separated GPUs for mm_language instances, e.g. 2,3 (default: CPU)",
    )


def add_demo_options(d) -> None:
    d.add_argument(
        "--demo",
        action="store_true",
        help="once ready, send a demo request (generated image + prompt) and print the answer",
    )
    d.add_argument(
        "--exit", action="store_true", help="with --demo: stop the server after the demo; exit code is the demo's"
    )
    d.add_argument("--demo-prompt", default="Describe the image.", metavar="TEXT", help="the demo's prompt")
    d.add_argument(
        "--demo-max-tokens", type=positive_int, default=16, metavar="N", help="the demo's max tokens (default: 16)"
    )


PROCESSOR_KWARGS = ("max_pixels", "min_pixels")


def processor_kwargs(text: str) -> dict[str, int]:
    """``--mm-processor-kwargs`` JSON -> {name: pixels}; argparse reports the error's message."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object such as {"max_pixels": 1003520}')
    for key, pixels in value.items():
        if key not in PROCESSOR_KWARGS:
            raise argparse.ArgumentTypeError(f"unknown key {key!r}: supported are {', '.join(PROCESSOR_KWARGS)}")
        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0:
            raise argparse.ArgumentTypeError(f"{key} must be an integer >= 0 (pixels), got {pixels!r}")
    return value


def model_env(args) -> dict[str, str]:
    env: dict[str, str] = {}
    if args.checkpoint is not None:
        ckpt = args.checkpoint.expanduser().resolve()
        if not ckpt.is_dir():
            raise SystemExit(f"serve: error: --checkpoint {args.checkpoint}: not a directory")
        env["MM_CHECKPOINT"] = str(ckpt)
    elif "MM_CHECKPOINT" not in os.environ:
        from mm_params import tiny_model_dir

        tiny = tiny_model_dir()
        if not tiny.is_dir():
            print(
                f"serve: warning: the tiny model {tiny} does not exist (scripts/setup builds it once "
                "mm_models.build_tiny exists); the models may fail to load",
                file=sys.stderr,
            )
        env["MM_CHECKPOINT"] = str(tiny)
    if args.block_tokens is not None:
        env["MM_BLOCK_TOKENS"] = str(args.block_tokens)
    if args.window_tokens is not None:
        env["MM_DEFAULT_WINDOW_TOKENS"] = str(args.window_tokens)
    if args.pool_blocks is not None:
        env["MM_POOL_BLOCKS"] = str(args.pool_blocks)
    if args.no_block_allocator:
        env["MM_USE_BLOCK_ALLOCATOR"] = "0"
    if args.encode_threads is not None:
        env["MM_ENCODE_THREADS"] = str(args.encode_threads)
    for key, value in (args.mm_processor_kwargs or {}).items():
        env["MM_" + key.upper()] = str(value)
    if args.max_embed_tokens is not None:
        if args.max_embed_tokens < 0:
            raise SystemExit("serve: error: --max-embed-tokens must be >= 0 (0 = the processor's maximum)")
        env["MM_MAX_EMBED_TOKENS"] = str(args.max_embed_tokens)
    if args.control_host is not None:
        env["MM_CONTROL_HOST"] = args.control_host
    if args.advertise_host is not None:
        env["MM_ADVERTISE_HOST"] = args.advertise_host
    if args.control_port is not None:
        env["MM_CONTROL_PORT"] = str(args.control_port)
    if args.encoder_urls:
        env["MM_ENCODER_URLS"] = ",".join(args.encoder_urls)
    if args.encoder_timeout is not None:
        env["MM_ENCODER_TIMEOUT_S"] = str(args.encoder_timeout)
    return env


LAYOUT_OPTIONS = ("encoder_instances", "language_instances", "pipeline_instances", "encoder_gpus", "language_gpus")


ENCODER_SIDE_OPTIONS = (
    "control_host",
    "advertise_host",
    "control_port",
    "encoder_instances",
    "encoder_gpus",
    "encode_threads",
)


def check_language_role(args, fail) -> None:
    """--role language: the encoder servers it calls, and no encoder-side options."""
    from mm_remote.encoders import parse_encoder_urls

    if not args.encoder_url:
        fail(
            "--role language needs --encoder-url HOST:PORT (the gRPC port of an encoder server, "
            "e.g. started with: scripts/serve --role encoder)"
        )
    try:
        args.encoder_urls = parse_encoder_urls(args.encoder_url)
    except ValueError as e:
        fail(f"--encoder-url: {e}")
    for opt in ENCODER_SIDE_OPTIONS:
        if getattr(args, opt) is not None:
            fail(f"--{opt.replace('_', '-')} is for the encoder side (--role encoder or all), not --role language")


def check_role_options(args) -> None:
    """Fill role-dependent defaults and refuse options that do not fit the role (SystemExit)."""
    from mm_remote.repository import parse_gpus

    def fail(msg: str) -> None:
        raise SystemExit(f"serve: error: {msg}")

    base = args.port_base or (8010 if args.role == "encoder" else 8000)
    if args.port_base is not None and base + 2 > 65535:
        fail(f"--port-base {base}: PORT+2 is not a port")
    args.http_port = args.http_port or base
    args.grpc_port = args.grpc_port or base + 1
    args.metrics_port = args.metrics_port or base + 2
    args.encoder_urls = []
    if args.role == "language":
        check_language_role(args, fail)
    else:
        for opt in ("encoder_url", "encoder_timeout", "pipeline_instances"):
            if getattr(args, opt) is not None:
                fail(f"--{opt.replace('_', '-')} is only for --role language")
    if args.role == "encoder":
        for opt in ("language_instances", "language_gpus", "window_tokens"):
            if getattr(args, opt) is not None:
                fail(f"--{opt.replace('_', '-')} is for the language side, not --role encoder")
        if args.demo:
            fail("--demo needs a server with mm_pipeline (--role all or language)")
    if args.control_port is not None and not 0 <= args.control_port <= 65535:
        fail(f"--control-port {args.control_port}: not a port")
    if args.control_host in ("0.0.0.0", "::", "*") and not args.advertise_host:
        fail(
            f"--control-host {args.control_host} binds every interface: give --advertise-host ADDR, the address "
            "language servers reach this host at (it goes into every EMBED_REF)"
        )
    for opt in ("encoder_gpus", "language_gpus"):
        try:
            setattr(args, opt, parse_gpus(getattr(args, opt)))
        except ValueError as e:
            fail(f"--{opt.replace('_', '-')}: {e}")
    if args.model_repository and any(getattr(args, o) is not None for o in LAYOUT_OPTIONS):
        fail(
            "--model-repository serves the given repositories as they are: instance and GPU options need the "
            "generated one (leave --model-repository out)"
        )


def repositories(args, env: dict[str, str]) -> list[Path]:
    """The model repositories to serve: given, the role's own, or one generated for the layout options."""
    from mm_remote.repository import build_repository, source_repository

    if args.model_repository:
        return list(args.model_repository)
    if all(getattr(args, o) is None for o in LAYOUT_OPTIONS):
        return [source_repository(args.role)]
    cache = Path(os.environ.get("MM_CACHE", ROOT / ".cache"))
    dest = cache / "repos" / f"{args.role}-{args.http_port}"
    try:
        return [
            build_repository(
                dest,
                args.role,
                encoder_instances=args.encoder_instances,
                language_instances=args.language_instances,
                pipeline_instances=args.pipeline_instances,
                encoder_gpus=args.encoder_gpus,
                language_gpus=args.language_gpus,
                checkpoint=env.get("MM_CHECKPOINT"),
            )
        ]
    except ValueError as e:
        raise SystemExit(f"serve: error: {e}") from None


def check_encoders(urls: list[str], timeout_s: float = 3.0) -> list[str]:
    """Warnings for encoder servers that do not answer (the language server starts anyway)."""
    from mm_remote.encoders import RemoteEncoders

    try:
        encoders = RemoteEncoders(urls)
    except Exception as e:  # noqa: BLE001
        return [str(e)]
    try:
        return [f"encoder server {url}: {problem}" for url, problem in encoders.check(timeout_s).items() if problem]
    finally:
        encoders.close()


def follow(path: Path, stop: threading.Event) -> None:
    """tail -f the log to stdout until stop is set."""
    while not path.exists() and not stop.is_set():
        time.sleep(0.1)
    with open(path, "rb") as fh:
        while not stop.is_set():
            chunk = fh.read(65536)
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            else:
                time.sleep(0.2)


def run_demo(server, args) -> int:
    from mm_client import ClientError, MMClient, demo_image
    from mm_client.demo import DEMO_SIZE

    print(
        f"\n--- demo: {args.demo_prompt!r} + a generated {DEMO_SIZE[0]}x{DEMO_SIZE[1]} JPEG photo "
        f"(max {args.demo_max_tokens} tokens)"
    )
    try:
        with MMClient(server.http_address, protocol="http", timeout_s=300) as client:
            result = client.generate([demo_image()], args.demo_prompt, max_tokens=args.demo_max_tokens)
    except ClientError as e:
        print(f"--- demo FAILED: {e}\n{server.failure_report()}", file=sys.stderr)
        return 1
    image_tokens = f", the image as {result.image_tokens[0]} embedding tokens" if result.image_tokens else ""
    print(f"--- answer ({len(result.token_ids)} tokens{image_tokens}, {result.latency_s * 1000:.0f} ms): {result.text}")
    print(f"--- token ids: {result.token_ids}\n")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked: role options filled and validated, ``triton_args`` without the ``--``."""
    args = build_parser().parse_args(argv)
    if args.triton_url:  # the OpenAI API alone: nothing else to check
        return args
    if args.exit and not args.demo:
        raise SystemExit("serve: error: --exit only makes sense with --demo")
    args.triton_args = list(args.triton_args)
    if args.triton_args and args.triton_args[0] == "--":
        args.triton_args = args.triton_args[1:]
    check_role_options(args)
    for r in args.model_repository or []:
        if not r.is_dir():
            raise SystemExit(f"serve: error: model repository not found: {r}")
    return args


def own_model_control(args) -> bool:
    """Whether serve sets the model control (explicit: the watchdog can reload, the baseline loads only when
    asked for) or the user's own tritonserver arguments do."""
    return not any(a.startswith(("--model-control-mode", "--load-model")) for a in args.triton_args)


def control_args(args, repos: list[Path]) -> list[str]:
    """Explicit model control with the models to load, the repository and shared-memory APIs closed to
    clients (the watchdog reloads through mm_control); records the list in ``args.loaded_models``."""
    from mm_triton.watchdog import load_list, server_args

    args.loaded_models = load_list(repos, with_baseline=args.with_baseline)
    return server_args(None, args.loaded_models)


def check_ports(args) -> dict[str, int]:
    """The three server ports ({option: port}); SystemExit when they clash or are taken."""
    from mm_triton.ports import port_is_free

    ports = {"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
    if len(set(ports.values())) != 3:
        raise SystemExit("serve: error: --http-port, --grpc-port and --metrics-port must differ")
    check_host = "127.0.0.1" if args.address in ("0.0.0.0", "") else args.address
    for opt, p in ports.items():
        if not port_is_free(p, check_host) or (args.address in ("0.0.0.0", "") and not port_is_free(p, "0.0.0.0")):
            raise SystemExit(
                f"serve: error: port {p} is already in use (another server running?); choose another with {opt}"
            )
    if (
        not args.no_openai
        and args.role != "encoder"
        and (args.openai_port in ports.values() or not port_is_free(args.openai_port, check_host))
    ):
        raise SystemExit(
            f"serve: error: port {args.openai_port} is already in use; choose another with --openai-port "
            "(or --no-openai)"
        )
    return ports


def check_control_ports(args, repos: list[Path], ports: dict[str, int]) -> None:
    """With a fixed --control-port, every encoder instance's port (PORT + i) must be free."""
    if not args.control_port:
        return
    from mm_remote.repository import instance_count
    from mm_triton.ports import port_is_free

    control_host = "127.0.0.1" if args.control_host in (None, "0.0.0.0", "::", "*") else args.control_host
    n = sum(instance_count(r, "mm_encoder") for r in repos if (Path(r) / "mm_encoder" / "config.pbtxt").is_file())
    for p in range(args.control_port, args.control_port + n):
        if p > 65535 or p in ports.values() or not port_is_free(p, control_host):
            raise SystemExit(
                f"serve: error: control port {p} (--control-port {args.control_port} + instance) "
                "is in use or not a port; choose another --control-port"
            )


def fresh_log_file(args) -> Path:
    default = Path(os.environ.get("MM_CACHE", ROOT / ".cache")) / "logs" / f"tritonserver-{args.http_port}.log"
    log_file = args.log_file or default
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.unlink(missing_ok=True)
    return log_file


def stop_on_signals() -> None:
    """SIGTERM, SIGINT and SIGHUP end the run loop (once) through KeyboardInterrupt."""
    stopping = threading.Event()

    def on_signal(signum, frame):
        if stopping.is_set():
            return
        stopping.set()
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)


class Deployment:
    """tritonserver, its stub watchdog and the OpenAI API server: started in order, stopped in reverse."""

    def __init__(self, server, args, env: dict[str, str], repos: list[Path], use_watchdog: bool) -> None:
        self.server, self.args, self.env, self.repos, self.use_watchdog = server, args, env, repos, use_watchdog
        self.watchdog = None
        self.api = None
        self.stop_follow = threading.Event()

    def start(self) -> None:
        """Raises TritonStartError when the server does not come up."""
        args, server = self.args, self.server
        if args.verbose:
            threading.Thread(target=follow, args=(server.log_file, self.stop_follow), daemon=True).start()
        knobs = " ".join(f"{k}={v}" for k, v in self.env.items())
        print(
            f"serve: starting tritonserver ({', '.join(str(r) for r in self.repos)}; {knobs}); log: {server.log_file}",
            flush=True,
        )
        t0 = time.monotonic()
        server.start()
        self.start_watchdog()
        if args.role != "encoder":
            from mm_openai import launch

            token_file = client_token_file(server)
            self.api = launch.start(
                args, server.grpc_url, server.log_file.parent, str(token_file) if token_file else ""
            )
        print(banner(server, args, time.monotonic() - t0, self.env), flush=True)
        if self.api is not None:
            print(launch.banner(self.api, args.served_model_name or launch.model_name(args)).lstrip("\n"), flush=True)
        if self.watchdog is not None:
            print(
                f"  watchdog reloads a model whose stub process dies ({len(self.watchdog._known)} stubs watched; "
                "--no-watchdog to disable)",
                flush=True,
            )

    def start_watchdog(self) -> None:
        if self.use_watchdog:
            from mm_triton.watchdog import StubWatchdog

            self.watchdog = StubWatchdog(self.server.pid, self.server.http_address).start()

    def restart(self, attempt: int) -> None:
        """Start tritonserver again after it died (same ports, same models) and a new watchdog for it; the
        OpenAI front end reconnects by itself. Raises TritonStartError."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        self.server.stop()  # whatever is left of the old process group
        t0 = time.monotonic()
        self.server.start()
        client_token_file(self.server)  # the OpenAI front end re-reads it: the new server has a new token
        print(
            f"serve: tritonserver restarted (restart {attempt}) and serving again in {time.monotonic() - t0:.1f} s "
            f"(pid {self.server.pid})",
            flush=True,
        )
        self.start_watchdog()

    def stop(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.api is not None:
            self.api.stop()
        code = self.server.stop()
        self.stop_follow.set()
        for repo in self.repos:  # a repository generated for this server goes with it
            if (Path(repo) / ".mm-generated").is_file():
                shutil.rmtree(repo, ignore_errors=True)
        if code is not None and self.server.proc is not None:
            print(f"serve: tritonserver stopped (exit code {code})", flush=True)


def run(deployment: Deployment, args) -> int:
    """Start, demo if asked, then serve until a signal or the server's death; returns the exit code."""
    from mm_triton.launcher import TritonStartError

    server, rc = deployment.server, 0
    try:
        try:
            deployment.start()
        except TritonStartError as e:
            print(f"serve: error: {e}", file=sys.stderr)
            return 1
        if args.demo:
            rc = run_demo(server, args)
            if args.exit:
                return rc
            print("serving; Ctrl-C to stop", flush=True)
        return serve_until_given_up(deployment, args)
    except KeyboardInterrupt:
        print("\nserve: stopping tritonserver...", flush=True)
        return rc if args.demo and args.exit else 0
    finally:
        deployment.stop()


def serve_until_given_up(deployment: Deployment, args) -> int:
    """Wait while tritonserver runs; when it dies, start it again up to --max-restarts times."""
    from mm_triton.launcher import TritonStartError

    server = deployment.server
    for attempt in range(1, args.max_restarts + 2):
        while server.is_running():
            time.sleep(0.5)
        print(
            f"serve: error: tritonserver exited unexpectedly (code {server.proc.returncode})\n"
            f"{server.failure_report()}",
            file=sys.stderr,
        )
        if attempt > args.max_restarts:
            print(f"serve: error: {args.max_restarts} restart(s) done (--max-restarts); giving up", file=sys.stderr)
            return 1
        try:
            deployment.restart(attempt)
        except TritonStartError as e:
            print(f"serve: error: restart failed: {e}", file=sys.stderr)
            return 1
    return 1


def client_token_file(server):
    """The server's internal token in a 0600 file for the OpenAI front end's direct stream route (None when the
    server has no internal models here, e.g. a split encoder server)."""
    from mm_triton.access import write_token_file

    try:
        return write_token_file(server.pid, f"openai-{os.getpid()}.key")
    except OSError as exc:
        print(
            f"serve: warning: no internal token for the OpenAI front end ({exc}); streams go through "
            "mm_pipeline_stream",
            file=sys.stderr,
        )
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.triton_url:  # the OpenAI API alone, in front of a Triton that runs elsewhere
        from mm_openai.launch import run_alone

        return run_alone(args)
    extra = list(args.triton_args)
    env = model_env(args)
    ports = check_ports(args)
    repos = repositories(args, env)  # after the port checks: a running server's generated repository stays
    own_control = own_model_control(args)
    if own_control:
        extra += control_args(args, repos)
    check_control_ports(args, repos, ports)
    for warning in check_encoders(args.encoder_urls) if args.encoder_urls else []:
        print(f"serve: warning: {warning}; requests get UNAVAILABLE until it is up", file=sys.stderr)
    from mm_triton.launcher import TritonServer

    server = TritonServer(
        repos,
        env=env,
        args=extra,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        host=args.address,
        log_file=fresh_log_file(args),
        startup_timeout_s=args.startup_timeout,
        stop_timeout_s=30,
        exit_timeout_s=10,
    )
    stop_on_signals()
    return run(Deployment(server, args, env, repos, use_watchdog=own_control and not args.no_watchdog), args)


def control_endpoints(server) -> list[str]:
    """The encoder instances' control endpoints, as their log lines announce them."""
    import re

    return sorted(set(re.findall(r"(\S+): serving pulls at (tcp://\S+)", server.log_text())))


def banner(server, args, elapsed: float, env: dict[str, str] | None = None) -> str:
    models = [m if server.model_ready(m) else f"{m} (not ready)" for m in getattr(args, "loaded_models", [])]
    host = "localhost" if args.address in ("0.0.0.0", "127.0.0.1", "") else args.address
    text = f"""
serve: tritonserver ready in {elapsed:.1f} s (role {args.role}, pid {server.pid}); models: {", ".join(models) or "?"}
  HTTP     {host}:{server.http_port}      (e.g. curl {host}:{server.http_port}/v2/health/ready)
  gRPC     {host}:{server.grpc_port}
  metrics  http://{host}:{server.metrics_port}/metrics
  log      {server.log_file}"""
    if args.role == "encoder":
        endpoints = control_endpoints(server)
        text += "\n  control  " + ("\n           ".join(f"{addr}  ({inst})" for inst, addr in endpoints) or "?")
        text += f"\n  use:     scripts/serve --role language --encoder-url {host}:{server.grpc_port}"
        if all("://127." in addr or "://localhost" in addr for _inst, addr in endpoints):
            text += (
                "\n  note:    control endpoints are on loopback: only language servers on this host can pull; "
                "for other hosts use --control-host/--advertise-host (docs/DEPLOYMENT.md)"
            )
        return text
    if args.role == "language":
        text += f"\n  encoders {', '.join(args.encoder_urls)}"
    return (
        text
        + f"""
  try:     scripts/client --url {host}:{server.http_port} --demo-image --prompt "Describe the image."
           scripts/client --url {host}:{server.grpc_port} --protocol grpc --max-tokens 16 --prompt "Describe" \\
               photo.jpg"""
    )


if __name__ == "__main__":
    sys.exit(main())
