#!/usr/bin/env python3
"""Language-engine benchmark: requests/s, TTFT and inter-token latency, through Triton and in-process."""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "backends"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # mm_bench: not an installed package
from mm_bench import perf, streaming  # noqa: E402
from mm_bench.phases import InProcessPhases, format_breakdown, phase_breakdown  # noqa: E402
from mm_bench.report import int_list, machine_info, machine_line, table, write_json  # noqa: E402
from mm_params import tiny_model_dir  # noqa: E402

TARGETS = {  # what the user calls -> the model that streams the same work (same engine, same parameters)
    "inprocess": None,
    "mm_pipeline": "mm_pipeline_stream",
    "mm_monolithic": "mm_monolithic_stream",
    "mm_pipeline_unary": "mm_pipeline",  # optional: the unary ensemble itself (latency only: TTFT = latency)
}
DEFAULT_TARGETS = ("inprocess", "mm_pipeline", "mm_monolithic")
IMAGE_TOKENS = (256, 640, 1200)  # the request mix: three images, the largest needs one continuation
PROMPT = "Describe the image."

DESCRIPTION = """\
Drives the language engine three ways with the same requests (one image each, embedding lengths
256 / 640 / 1200 tokens round-robin, one prompt) and reports, per load point, requests/s, tokens/s and
the p50 / p99 of time to first token (TTFT), inter-token latency (ITL, every gap between two tokens of a
request) and end-to-end latency:
  inprocess      the engine called directly in this process (vision tower on the engine's loader threads,
                 as mm_monolithic does; no Triton, no transfer): the upper bound;
  mm_pipeline    disaggregated, through tritonserver: measured on its streaming twin mm_pipeline_stream
                 (same encoder, same engine and parameters; one response per token gives TTFT and ITL);
  mm_monolithic  colocated, through tritonserver: measured on mm_monolithic_stream;
  mm_pipeline_unary  (not by default) the unary mm_pipeline: requests/s and latency, no token timings.
Load: closed loop at each --concurrency, then open loop (Poisson) at each --request-rates, for each
--max-tokens. Triton points are perf_analyzer --streaming runs of a fixed request count (per-response time
stamps from --profile-export-file); in-process points use a Python load generator with the same shape.
One tritonserver serves both Triton targets (explicit model control, only their models loaded); the
in-process engine runs first, alone, and is closed before the server starts.
Each point also prints the per-phase breakdown (mean/p50 ms per phase: the served models' mm_phase_seconds
deltas, the in-process engine's own SequenceTiming and loader clock), kept in the JSON rows as "phases".
Output: a table on stdout, <out-dir>/<name>.json (every number, the machine, the command), <out-dir>/<name>.png."""

EPILOG = """\
examples:
  scripts/bench_engine.py --quick --out-dir /tmp/be                  CI size, about a minute on 2 cores
  scripts/bench_engine.py --out-dir docs/benchmarks --name engine-cpu
  scripts/bench_engine.py --checkpoint /tmp/q2b --gpu mm_encoder=0 --gpu mm_language_stream=0 \\
      --gpu mm_monolithic_stream=0 --name engine-gpu-2b           (one GPU: CUDA IPC between the two sides)
environment: `source scripts/env.sh` first (perf_analyzer, TRITONSERVER, MM_BACKEND_DIR)."""


def rate_list(text: str) -> list[float] | str:
    if text.strip() in ("auto", "none"):
        return text.strip()
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'none' or comma-separated rates, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("request rates must be > 0")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench_engine.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"comma-separated, of {', '.join(TARGETS)} (default {','.join(DEFAULT_TARGETS)})",
    )
    p.add_argument("--concurrency", type=int_list, default=[1, 4, 16, 64], help="closed-loop concurrencies")
    p.add_argument("--max-tokens", type=int_list, default=[16, 128], help="MAX_TOKENS values")
    p.add_argument(
        "--request-rates",
        type=rate_list,
        default="auto",
        help="open-loop rates (req/s); 'auto' = 0.5x the first target's best closed-loop req/s at each "
        "MAX_TOKENS (the same rate for every target); 'none' skips",
    )
    p.add_argument(
        "--requests",
        type=int,
        default=0,
        help="requests per load point (default: max(16, 2 x concurrency); rate points: 24)",
    )
    p.add_argument("--point-timeout", type=float, default=300.0, metavar="SECONDS")
    add_target_arguments(p)
    return settle_args(p, p.parse_args(argv))


def add_target_arguments(p: argparse.ArgumentParser) -> None:
    from bench_pipeline import env_pair, gpu_pair

    p.add_argument("--checkpoint", type=Path, default=None, help="default: the tiny model (MM_TINY_MODEL)")
    p.add_argument(
        "--device", default="", help="in-process device (default: cuda:N of --gpu mm_monolithic_stream, else cpu)"
    )
    p.add_argument(
        "--gpu",
        dest="gpus",
        type=gpu_pair,
        action="append",
        default=[],
        metavar="MODEL=GPU",
        help="run MODEL's instance on GPU (repeatable), e.g. mm_language_stream=0",
    )
    p.add_argument(
        "--env",
        type=env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="server environment, e.g. MM_MAX_NUM_SEQS=64 (the in-process engine reads MM_* too)",
    )
    p.add_argument("--quick", action="store_true", help="concurrency 1,4, MAX_TOKENS 16, 8 requests a point")
    p.add_argument("--name", default="engine")
    p.add_argument("--out-dir", type=Path, default=ROOT / ".cache" / "bench")
    p.add_argument("--work-dir", type=Path, default=None, help="perf_analyzer files and logs (default: out-dir/work)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")


def settle_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Check the targets and fill the defaults that depend on other options."""
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        p.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    if args.quick:
        args.concurrency, args.max_tokens, args.requests = [1, 4], [16], args.requests or 8
        args.request_rates = "none" if args.request_rates == "auto" else args.request_rates
    args.gpus = dict(args.gpus)
    args.work_dir = args.work_dir or args.out_dir / "work"
    args.checkpoint = args.checkpoint or tiny_model_dir()
    if not args.device:
        gpu = args.gpus.get("mm_monolithic_stream") or args.gpus.get("mm_language_stream")
        args.device = f"cuda:{gpu[0]}" if gpu else "cpu"
    return args


def requests_for(args: argparse.Namespace, concurrency: int | None) -> int:
    if args.requests:
        return args.requests
    return 24 if concurrency is None else max(16, 2 * concurrency)


def make_images(checkpoint: Path) -> list[bytes]:
    from mm_bench.images import make_test_image

    return [make_test_image(tokens=t, seed=100 + i, model_dir=checkpoint) for i, t in enumerate(IMAGE_TOKENS)]


# ---------------------------------------------------------------------------------------- in-process
def inprocess_points(args, images: list[bytes], plan, rows: list[dict]) -> None:
    """The engine called directly: MonolithicService (vision tower on loader threads + LLMEngine); appends to
    ``rows`` as it goes (the plan's 'auto' rates read them)."""
    import mm_monolithic.service as mono

    os.environ.update(dict(args.env))  # MM_* overrides, as the server gets them
    params = model_parameters(ROOT / "model_repository" / "mm_monolithic_stream" / "config.pbtxt")
    phases = InProcessPhases()  # the same per-phase split as the servers' mm_phase_seconds
    service = mono.MonolithicService(
        args.checkpoint, params, args.device, name="inprocess", engine_observer=phases.observer
    )
    decoded = [service.check_images([img]) for img in images]
    try:
        warm = submitter(service, decoded, 4, None, prefix="w")
        streaming.closed_loop(warm, len(images), 2, 2 * len(images), args.point_timeout)  # first calls are slow
        for max_tokens, kind, value in plan("inprocess"):
            submit = submitter(service, decoded, max_tokens, phases.report, prefix="b")
            n = requests_for(args, value if kind == "concurrency" else None)
            phases.take()  # drop the warm-up's and the previous point's samples
            if kind == "concurrency":
                recs = streaming.closed_loop(submit, len(images), value, n, args.point_timeout)
            else:
                recs = streaming.open_loop(submit, len(images), value, n, args.point_timeout)
            rows.append(
                _row("inprocess", max_tokens, kind, value, n, streaming.summarize(recs), {"inprocess": phases.take()})
            )
    finally:
        service.close()
        service = None  # the last reference: its tensors go before the CUDA cache is emptied
        gc.collect()
        _empty_cuda()


def submitter(service, decoded: list, max_tokens: int, report, prefix: str):
    """A streaming-loop ``submit(step, on_token, done)`` that hands request ``step`` to the in-process engine."""
    from mm_engine.api import ResponseSink, SamplingParams

    class Sink(ResponseSink):
        def __init__(self, on_token, done):
            self.on_token, self.done = on_token, done

        def on_tokens(self, token_ids, text_delta):
            if token_ids:
                self.on_token()

        def on_finish(self, output):
            self.done(None)

        def on_error(self, error):
            self.done(f"{error.cause.value}: {error}")

    def submit(step, on_token, done):
        imgs, counts = decoded[step % len(decoded)]
        params = SamplingParams(max_tokens=max_tokens)
        request = service.build_request(
            f"{prefix}{time.monotonic_ns()}", imgs, counts, PROMPT, params, None, report=report
        )
        service.engine.submit(request, Sink(on_token, done))

    return submit


def model_parameters(config: Path) -> dict[str, str]:
    """The ``parameters`` of a config.pbtxt (so the in-process engine is sized as the served one)."""
    import re

    pattern = r'key:\s*"([^"]+)",\s*value:\s*\{\s*string_value:\s*"([^"]*)"'
    return dict(re.findall(pattern, config.read_text()))


def _empty_cuda() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


# ---------------------------------------------------------------------------------------- triton
def start_server(args):
    from bench_pipeline import repository_variant
    from mm_triton.launcher import TritonServer
    from mm_triton.server_env import DEFAULT_MODEL_REPOSITORY

    repo = DEFAULT_MODEL_REPOSITORY
    if args.gpus:
        repo = repository_variant(DEFAULT_MODEL_REPOSITORY, args.work_dir, gpus=args.gpus)
    models = [TARGETS[t] for t in args.targets if TARGETS[t]]
    steps = {"mm_pipeline_stream": ["mm_encoder", "mm_language_stream"], "mm_pipeline": ["mm_encoder", "mm_language"]}
    models = list(dict.fromkeys(m for target in models for m in [*steps.get(target, []), target]))  # BLS steps too
    env = {"MM_CHECKPOINT": str(args.checkpoint), "MM_CACHE_BLOCKS": "0", **dict(args.env)}
    log = args.work_dir / f"{args.name}-server.log"
    server = TritonServer(
        repo,
        env=env,
        log_file=log,
        startup_timeout_s=900,
        args=["--model-control-mode=explicit", *[f"--load-model={m}" for m in models]],
    )
    t0 = time.monotonic()
    server.start()
    print(f"tritonserver pid {server.pid} ready in {time.monotonic() - t0:.1f}s (log {log})", flush=True)
    return server


def warm_up(server, model: str, images: list[bytes]) -> None:
    """A few untimed requests: the first calls of a fresh model instance are slow (allocations, kernels)."""
    from mm_client import MMClient

    with MMClient(server.grpc_url, protocol="grpc", timeout_s=300, model=model) as client:
        for img in images * 2:
            if model.endswith("_stream"):
                list(client.stream([img], PROMPT, max_tokens=4, model=model))
            else:
                client.generate([img], PROMPT, max_tokens=4)


def triton_point(args, server, target: str, data: Path, max_tokens: int, kind: str, value) -> dict:
    label = f"{target}-mt{max_tokens}-{kind[0]}{value:g}"
    export = args.work_dir / f"{args.name}-{label}-export.json"
    export.unlink(missing_ok=True)
    n = requests_for(args, value if kind == "concurrency" else None)
    stream = TARGETS[target].endswith("_stream")
    cmd = perf.command(
        args.perf_analyzer,
        TARGETS[target],
        server.grpc_url,
        data,
        args.work_dir / f"{label}.csv",
        concurrency=value if kind == "concurrency" else None,
        request_rate=value if kind == "rate" else None,
        request_count=n,
        max_threads=64 if kind == "rate" else None,
        profile_export=export,
        extra=["--streaming"] if stream else [],
    )
    before = _scrape(server)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.point_timeout)
        ok = proc.returncode == 0 and export.exists()
        summary = {}
        if ok:
            records = streaming.records_from_profile(perf.load_profile_export(export), summary_response=stream)
            summary = streaming.summarize(records)
            if not stream:  # one response per request: no token timings
                for key in ("tokens_per_s", "tokens_per_request", "itl_p50_ms", "itl_p99_ms"):
                    summary[key] = None
        if not ok:
            summary = {"completed": 0, "errors": n, "error": (proc.stdout + proc.stderr)[-500:]}
    except subprocess.TimeoutExpired:
        summary = {"completed": 0, "errors": n, "error": f"timed out after {args.point_timeout:g}s"}
    time.sleep(0.5)  # the last answers' response phase is recorded just after they were sent
    after = _scrape(server)
    phases = phase_breakdown(before, after) if before is not None and after is not None else None
    return _row(target, max_tokens, kind, value, n, summary, phases)


def _scrape(server):
    try:
        return server.metrics()
    except Exception as exc:  # noqa: BLE001 - the breakdown is optional; the point still counts
        print(f"note: metrics not read: {exc}", file=sys.stderr)
        return None


def _row(
    target: str, max_tokens: int, kind: str, value, requests: int, summary: dict, phases: dict | None = None
) -> dict:
    row = {
        "target": target,
        "max_tokens": max_tokens,
        "load": f"c={value}" if kind == "concurrency" else f"{value:g}/s",
        "kind": kind,
        "value": value,
        "requests": requests,
        **summary,
    }
    print(
        f"  {target:13s} MAX_TOKENS {max_tokens:4d} {row['load']:>8s}: "
        f"{_f(row.get('rps'))} req/s, TTFT p50 {_f(row.get('ttft_p50_ms'))} ms, "
        f"ITL p50 {_f(row.get('itl_p50_ms'))} ms, errors {row.get('errors', 0)}",
        flush=True,
    )
    if phases:
        row["phases"] = phases  # {model: {phase: {count, mean_ms, p50_ms}}}, the server's own split
        for line in format_breakdown(phases):
            print(line, flush=True)
    return row


def _f(v) -> str:
    return "-" if v is None else f"{v:.3g}"


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.perf_analyzer = perf.find_perf_analyzer()
    if any(TARGETS[t] for t in args.targets) and not args.perf_analyzer:
        print("perf_analyzer not found (source scripts/env.sh)", file=sys.stderr)
        return 2
    info = machine_info()
    images = make_images(args.checkpoint)
    rows: list[dict] = []
    rates: dict[int, list[float]] = {}

    def plan(target: str):
        for mt in args.max_tokens:
            for c in args.concurrency:
                yield mt, "concurrency", c
            if args.request_rates != "none":
                if mt not in rates:
                    best = max((r.get("rps") or 0 for r in rows if r["max_tokens"] == mt), default=0)
                    rates[mt] = (
                        list(args.request_rates)
                        if args.request_rates != "auto"
                        else ([round(0.5 * best, 2)] if best else [])
                    )
                for rate in rates[mt]:
                    yield mt, "rate", rate

    if "inprocess" in args.targets:
        print(f"inprocess on {args.device}", flush=True)
        inprocess_points(args, images, plan, rows)
    server_targets = [t for t in args.targets if TARGETS[t]]
    if server_targets:
        server = start_server(args)
        try:
            for target in server_targets:
                warm_up(server, TARGETS[target], images)
                for mt, kind, value in plan(target):
                    entries = [perf.request_entry([img], PROMPT, mt) for img in images]
                    data = perf.write_input_data(args.work_dir / f"{args.name}-inputs-{mt}.json", entries)
                    rows.append(triton_point(args, server, target, data, mt, kind, value))
        finally:
            server.stop()
    return report(args, rows, info)


COLUMNS = [
    ("target", "target"),
    ("max_tokens", "MAX_TOKENS"),
    ("load", "load"),
    ("completed", "done"),
    ("errors", "err"),
    ("rps", "req/s", ".2f"),
    ("tokens_per_s", "tok/s", ".0f"),
    ("ttft_p50_ms", "TTFT p50 ms", ".0f"),
    ("ttft_p99_ms", "TTFT p99 ms", ".0f"),
    ("itl_p50_ms", "ITL p50 ms", ".1f"),
    ("itl_p99_ms", "ITL p99 ms", ".1f"),
    ("latency_p50_ms", "latency p50 ms", ".0f"),
]


def report(args, rows: list[dict], info: dict) -> int:
    print(table(rows, COLUMNS, markdown=args.markdown))
    print(machine_line(info))
    payload = {
        "machine": info,
        "command": sys.argv,
        "images_tokens": IMAGE_TOKENS,
        "prompt": PROMPT,
        "checkpoint": str(args.checkpoint),
        "env": dict(args.env),
        "gpus": args.gpus,
        "rows": rows,
    }
    path = write_json(args.out_dir / f"{args.name}.json", payload)
    png = plot(rows, args, info)
    print(f"wrote {path} and {png}")
    return 0 if all(r.get("completed") for r in rows) else 1


def plot(rows: list[dict], args, info: dict) -> Path:
    from mm_bench.plotting import pyplot, save

    plt = pyplot()
    metrics = [("rps", "requests/s"), ("ttft_p50_ms", "TTFT p50 (ms)"), ("itl_p50_ms", "inter-token p50 (ms)")]
    fig, axes = plt.subplots(
        len(args.max_tokens), len(metrics), figsize=(13, 3.6 * len(args.max_tokens)), squeeze=False
    )
    for i, mt in enumerate(args.max_tokens):
        for j, (key, title) in enumerate(metrics):
            ax = axes[i][j]
            for target in args.targets:
                pts = [
                    (r["value"], r.get(key))
                    for r in rows
                    if r["target"] == target
                    and r["max_tokens"] == mt
                    and r["kind"] == "concurrency"
                    and r.get(key) is not None
                ]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=target)
            ax.set_xlabel("concurrency")
            ax.set_title(f"{title}, MAX_TOKENS {mt}", fontsize=10)
            ax.set_xlim(left=0)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, args.out_dir / f"{args.name}.png", footer=machine_line(info))


if __name__ == "__main__":
    raise SystemExit(main())
