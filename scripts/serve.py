"""Serve the model repository with tritonserver (run through scripts/serve, which sets up first)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the launcher is shared with the test harness

DESCRIPTION = """\
Serve the disaggregated multimodal pipeline (mm_encoder + mm_language + ensemble mm_pipeline) with a real
tritonserver 2.51. Runs scripts/setup first. By default it serves the tiny Qwen2-VL model built at set-up
(.cache/models/tiny-qwen2-vl); --checkpoint serves a real Qwen2-VL checkpoint directory instead.
Stops cleanly on Ctrl-C / SIGTERM."""

EPILOG = """\
model knobs (passed to the models as environment overrides of config.pbtxt parameters):
  --checkpoint DIR        -> MM_CHECKPOINT            (default: the tiny model, $MM_TINY_MODEL)
  --block-tokens N        -> MM_BLOCK_TOKENS          (tokens per pool block)
  --window-tokens N       -> MM_DEFAULT_WINDOW_TOKENS (default receive window)
  --pool-blocks N         -> MM_POOL_BLOCKS           (blocks per instance pool)
  --no-block-allocator    -> MM_USE_BLOCK_ALLOCATOR=0 (index-based fixed slots, the baseline)
  Any other MM_* variable already in the environment reaches the models too.

examples:
  scripts/serve                                  serve on 8000 (HTTP) / 8001 (gRPC) / 8002 (metrics)
  scripts/serve --demo                           ... and answer one demo request first
  scripts/serve --demo --exit                    smoke test: start, demo, stop; exit code = demo's
  scripts/serve --http-port 9000 --grpc-port 9001 --metrics-port 9002 --pool-blocks 64
  scripts/serve --checkpoint /models/Qwen2-VL-2B-Instruct
  scripts/serve -- --log-verbose=1               arguments after -- go to tritonserver

then, from another shell:
  scripts/client --url localhost:8000 --prompt "Describe the image." photo.jpg
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
    p = argparse.ArgumentParser(prog="scripts/serve", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("server")
    g.add_argument("--http-port", type=port, metavar="PORT", default=8000, help="HTTP port (default: 8000)")
    g.add_argument("--grpc-port", type=port, metavar="PORT", default=8001, help="gRPC port (default: 8001)")
    g.add_argument("--metrics-port", type=port, metavar="PORT", default=8002, help="Prometheus metrics port (default: 8002)")
    g.add_argument("--address", default="0.0.0.0",
                   help="address the three services bind (default: 0.0.0.0; 127.0.0.1 for this machine only)")
    g.add_argument("--model-repository", type=Path, action="append", default=None, metavar="DIR",
                   help="model repository (default: model_repository/); repeat for several")
    g.add_argument("--startup-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long to wait for all models to be ready (default: 600)")
    g.add_argument("--log-file", type=Path, default=None, metavar="PATH",
                   help="server log (default: .cache/logs/tritonserver-<http port>.log)")
    g.add_argument("--verbose", "-v", action="store_true", help="also stream the server log to the terminal")
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", type=Path, default=None, metavar="DIR",
                   help="a Hugging Face Qwen2-VL checkpoint directory to serve instead of the tiny default")
    m.add_argument("--block-tokens", type=positive_int, default=None, metavar="N", help="tokens per pool block")
    m.add_argument("--window-tokens", type=positive_int, default=None, metavar="N",
                   help="default receive window in tokens")
    m.add_argument("--pool-blocks", type=positive_int, default=None, metavar="N", help="blocks in each pool")
    m.add_argument("--no-block-allocator", action="store_true",
                   help="use index-based fixed slots instead of the block allocator")
    d = p.add_argument_group("demo")
    d.add_argument("--demo", action="store_true",
                   help="once ready, send a demo request (generated image + prompt) and print the answer")
    d.add_argument("--exit", action="store_true",
                   help="with --demo: stop the server after the demo; exit code is the demo's")
    d.add_argument("--demo-prompt", default="Describe the image.", metavar="TEXT", help="the demo's prompt")
    d.add_argument("--demo-max-tokens", type=positive_int, default=16, metavar="N", help="the demo's max tokens (default: 16)")
    p.add_argument("triton_args", nargs=argparse.REMAINDER,
                   help="after --: extra arguments for tritonserver")
    return p


def model_env(args) -> dict[str, str]:
    env: dict[str, str] = {}
    if args.checkpoint is not None:
        ckpt = args.checkpoint.expanduser().resolve()
        if not ckpt.is_dir():
            raise SystemExit(f"serve: error: --checkpoint {args.checkpoint}: not a directory")
        env["MM_CHECKPOINT"] = str(ckpt)
    elif "MM_CHECKPOINT" not in os.environ:
        tiny = Path(os.environ.get("MM_TINY_MODEL", ROOT / ".cache" / "models" / "tiny-qwen2-vl"))
        if not tiny.is_dir():
            print(f"serve: warning: the tiny model {tiny} does not exist (scripts/setup builds it once "
                  "mm_models.build_tiny exists); the models may fail to load", file=sys.stderr)
        env["MM_CHECKPOINT"] = str(tiny)
    if args.block_tokens is not None:
        env["MM_BLOCK_TOKENS"] = str(args.block_tokens)
    if args.window_tokens is not None:
        env["MM_DEFAULT_WINDOW_TOKENS"] = str(args.window_tokens)
    if args.pool_blocks is not None:
        env["MM_POOL_BLOCKS"] = str(args.pool_blocks)
    if args.no_block_allocator:
        env["MM_USE_BLOCK_ALLOCATOR"] = "0"
    return env


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

    print(f"\n--- demo: {args.demo_prompt!r} + a generated {DEMO_SIZE[0]}x{DEMO_SIZE[1]} image "
          f"(max {args.demo_max_tokens} tokens)")
    try:
        with MMClient(server.http_address, protocol="http", timeout_s=300) as client:
            result = client.generate([demo_image()], args.demo_prompt, max_tokens=args.demo_max_tokens)
    except ClientError as e:
        print(f"--- demo FAILED: {e}\n{server.failure_report()}", file=sys.stderr)
        return 1
    print(f"--- answer ({len(result.token_ids)} tokens, {result.latency_s * 1000:.0f} ms): {result.text}")
    print(f"--- token ids: {result.token_ids}\n")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.exit and not args.demo:
        raise SystemExit("serve: error: --exit only makes sense with --demo")
    extra = list(args.triton_args)
    if extra and extra[0] == "--":
        extra = extra[1:]

    from harness import TritonServer, TritonStartError, port_is_free

    repos = args.model_repository or [ROOT / "model_repository"]
    for r in repos:
        if not r.is_dir():
            raise SystemExit(f"serve: error: model repository not found: {r}")
    ports = {"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
    if len(set(ports.values())) != 3:
        raise SystemExit("serve: error: --http-port, --grpc-port and --metrics-port must differ")
    check_host = "127.0.0.1" if args.address in ("0.0.0.0", "") else args.address
    for opt, p in ports.items():
        if not port_is_free(p, check_host) or (args.address in ("0.0.0.0", "") and not port_is_free(p, "0.0.0.0")):
            raise SystemExit(f"serve: error: port {p} is already in use (another server running?); "
                             f"choose another with {opt}")

    env = model_env(args)
    log_file = args.log_file or Path(os.environ.get("MM_CACHE", ROOT / ".cache")) / "logs" / f"tritonserver-{args.http_port}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.unlink(missing_ok=True)

    server = TritonServer(
        repos, env=env, args=extra, http_port=args.http_port, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, host=args.address, log_file=log_file,
        startup_timeout_s=args.startup_timeout, stop_timeout_s=30, exit_timeout_s=10,
    )

    stopping = threading.Event()

    def on_signal(signum, frame):
        if stopping.is_set():
            return
        stopping.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    stop_follow = threading.Event()
    if args.verbose:
        threading.Thread(target=follow, args=(log_file, stop_follow), daemon=True).start()

    knobs = " ".join(f"{k}={v}" for k, v in env.items())
    print(f"serve: starting tritonserver ({', '.join(str(r) for r in repos)}; {knobs}); log: {log_file}", flush=True)
    t0 = time.monotonic()
    rc = 0
    try:
        try:
            server.start()
        except TritonStartError as e:
            print(f"serve: error: {e}", file=sys.stderr)
            return 1
        print(banner(server, args, time.monotonic() - t0), flush=True)
        if args.demo:
            rc = run_demo(server, args)
            if args.exit:
                return rc
            print("serving; Ctrl-C to stop", flush=True)
        while server.is_running():
            time.sleep(0.5)
        code = server.proc.returncode
        print(f"serve: error: tritonserver exited unexpectedly (code {code})\n{server.failure_report()}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nserve: stopping tritonserver...", flush=True)
        return rc if args.demo and args.exit else 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        code = server.stop()
        stop_follow.set()
        if code is not None and server.proc is not None:
            print(f"serve: tritonserver stopped (exit code {code})", flush=True)


def banner(server, args, elapsed: float) -> str:
    models = []
    try:
        import json
        import urllib.request

        req = urllib.request.Request(f"http://{server.http_address}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            models = [f"{m['name']}" + ("" if m.get("state") == "READY" else f" ({m.get('state')})")
                      for m in json.loads(r.read())]
    except Exception:
        pass
    host = "localhost" if args.address in ("0.0.0.0", "127.0.0.1", "") else args.address
    return f"""
serve: tritonserver ready in {elapsed:.1f} s (pid {server.pid}); models: {', '.join(models) or '?'}
  HTTP     {host}:{server.http_port}      (e.g. curl {host}:{server.http_port}/v2/health/ready)
  gRPC     {host}:{server.grpc_port}
  metrics  http://{host}:{server.metrics_port}/metrics
  log      {server.log_file}
  try:     scripts/client --url {host}:{server.http_port} --demo-image --prompt "Describe the image."
           scripts/client --url {host}:{server.grpc_port} --protocol grpc --max-tokens 16 --prompt "Describe" photo.jpg"""


if __name__ == "__main__":
    sys.exit(main())
