#!/usr/bin/env python3
"""End-to-end load test with perf_analyzer: disaggregated mm_pipeline vs colocated mm_monolithic."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "backends"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # mm_bench: not an installed package
from mm_bench import perf  # noqa: E402
from mm_bench.lengths import LogNormalMix, summarize  # noqa: E402
from mm_bench.phases import format_breakdown, phase_breakdown  # noqa: E402
from mm_bench.report import int_list, machine_info, machine_line, table, write_json  # noqa: E402
from mm_bench.sampling import (  # noqa: E402
    CpuAccount,
    GpuMemorySampler,
    MemorySampler,
    PoolSampler,
    gpu_memory_used_mib,
    metric_sum,
    wait_for_quiet,
    wait_until,
)
from mm_params import tiny_model_dir  # noqa: E402

DEFAULT_CONCURRENCY = [1, 2, 4, 8, 16, 32, 64, 100]
MODELS = ("mm_pipeline", "mm_monolithic")
# what --load-model needs per benchmarked model (the pipeline is a BLS model: Triton does not know its steps)
LOAD = {"mm_pipeline": ["mm_encoder", "mm_language", "mm_pipeline"], "mm_monolithic": ["mm_monolithic"]}

DESCRIPTION = """\
Drives perf_analyzer (tritonclient 2.51) against the disaggregated pipeline mm_pipeline (a BLS model) and the
colocated baseline mm_monolithic with the same requests: JPEG photos of ordinary sizes (640x480 ... 4032x3024 in both
orientations, a panorama), which the server resizes to its per-image budget (Qwen2-VL-2B: ~390 to 16384
tokens; the tiny model: 4096 each), one prompt and MAX_TOKENS each. --mix instead sends synthetic PNGs
sized to a log-normal embedding-length mix (e.g. 800,0.75,64,8192: a few hundred to several thousand
tokens, ~1/3 above the default 1024-token receive window; --quick uses it, capped at 2500).

For every model: a closed-loop sweep over --concurrency, then an open-loop request-rate sweep
(--request-rates, Poisson arrivals), each load point one perf_analyzer run of a fixed --request-count
(bounded time, no stability search). Per point it reports:
  throughput and client p50/p90/p99 latency, computed from perf_analyzer's per-request timestamps
    (--profile-export-file; perf_analyzer's own -f CSV figures, kept as pa_*, use whole-second windows,
    too coarse for short runs);
  the continuation ratio: delta mm_transfer_continuations_total / delta mm_transfers_total of mm_language;
  pool utilisation: max and mean of mm_pool_blocks_used / mm_pool_blocks_total per model, metrics polled
    every 0.25 s (the language pool is held only during a pull, milliseconds, so its sampled max is ~0);
  peak memory: RSS (and PSS) of tritonserver + its Python-backend stubs, from /proc every 0.5 s;
  CPU use by the server, perf_analyzer and other processes ("other CPU": a busy neighbour on a shared
    machine makes a point not comparable; --wait-quiet waits for a quiet machine first);
  whether every request with the same image got the same greedy TOKEN_IDS, within and across models;
  the per-phase breakdown from the server itself: mean/p50 per phase (queue, image_decode, preprocess,
    vision, publish, transfer, slot_wait, prefill, decode, response) per model, from the deltas of its
    mm_phase_seconds histograms, plus Triton's own queue (nv_inference_queue_duration_us) as triton_queue;
    printed under each point and kept in the JSON rows as "phases".

By default it starts one real tritonserver per model (model_repository/, explicit model control, only
that model loaded, so memory is the model's own) with the tiny checkpoint, and stops it afterwards.
With --url it uses a running server instead (both models loaded; give --metrics-url and --server-pid
for pool and memory figures).

Output: a table on stdout, <out-dir>/<name>.json (every number, the machine, the command) and
<out-dir>/<name>.png. perf_analyzer inputs, CSVs and logs go to --work-dir."""

EPILOG = """\
examples:
  scripts/bench_pipeline.py --quick --out-dir /tmp/bench          CI size, well under a minute
  scripts/bench_pipeline.py                                       full sweep 1..100 (long on 2 cores)
  scripts/bench_pipeline.py --concurrency 1,2,4,8,16,32 --request-rates auto
  scripts/bench_pipeline.py --url localhost:8001 --metrics-url http://localhost:8002/metrics --server-pid 1234
  scripts/bench_pipeline.py --checkpoint /models/qwen2-vl-2b-random --env MM_POOL_BLOCKS=512
  scripts/bench_pipeline.py --checkpoint /tmp/q2b --gpu mm_encoder=0 --gpu mm_language=1 --gpu mm_monolithic=0 \
      --concurrency 1,2,4,8,16 --request-rates auto1 --name pipeline-gpu-2b    (2 GPUs: disaggregated vs colocated)

environment: PERF_ANALYZER (binary; default: on PATH or in the venv's bin), TRITONSERVER, MM_BACKEND_DIR
(as scripts/env.sh). perf_analyzer needs libb64.so.0d (Debian libb64-0d) and libcudart.so.12
(nvidia-cuda-runtime-cu12 wheel) on LD_LIBRARY_PATH: `source scripts/env.sh` first.
"""


# ------------------------------------------------------------------------------------------ options
def concurrency_list(text: str) -> list[int]:
    return [] if text.strip() == "none" else int_list(text)


def rate_list(text: str) -> list[float] | str:
    if text.strip() in ("auto", "auto1", "none", ""):
        return text.strip() or "none"
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'none' or comma-separated rates, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("request rates must be > 0")
    return values


def gpu_pair(text: str) -> tuple[str, list[int]]:
    model, sep, gpus = text.partition("=")
    try:
        ids = [int(g) for g in gpus.split(",") if g.strip()]
    except ValueError:
        ids = []
    if not sep or not model.strip() or not ids or any(g < 0 for g in ids) or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"expected MODEL=GPU[,GPU...], e.g. mm_encoder=0, got {text!r}")
    return model.strip(), ids


def env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench_pipeline.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_load_options(p.add_argument_group("load"))
    add_requests_options(p.add_argument_group("requests"))
    add_server_options(p.add_argument_group("server"))
    add_output_options(p.add_argument_group("output"))
    return p


def add_load_options(g) -> None:
    g.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated models to benchmark (default {','.join(MODELS)})"
    )
    g.add_argument(
        "--concurrency",
        type=concurrency_list,
        default=DEFAULT_CONCURRENCY,
        help="closed-loop concurrencies (default 1,2,4,8,16,32,64,100; 'none' skips)",
    )
    g.add_argument(
        "--request-rates",
        type=rate_list,
        default="auto",
        help="open-loop request rates (req/s), comma-separated; 'auto' = 0.5x and 0.9x the first "
        "model's best concurrency-sweep throughput, same rates for every model ('auto1': 0.5x "
        "only); 'none' skips",
    )
    g.add_argument(
        "--requests",
        type=int,
        default=0,
        help="requests per concurrency point (default 0 = max(3 x images, 4 x concurrency))",
    )
    g.add_argument(
        "--rate-seconds",
        type=float,
        default=20.0,
        help="target length of a request-rate point: requests = rate x this (default 20)",
    )
    g.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="perf_analyzer protocol (default grpc)")
    g.add_argument(
        "--load-generator",
        choices=("auto", "perf_analyzer", "python"),
        default="auto",
        help="who sends the load: perf_analyzer, or the bounded Python closed/open-loop generator "
        "(mm_bench.loadgen, HTTP; same points and figures); auto (default) = perf_analyzer when "
        "it starts here, else python (said in the output and the JSON)",
    )
    g.add_argument(
        "--point-timeout", type=float, default=600.0, help="seconds before a load point is killed (default 600)"
    )
    add_noise_options(g)
    g.add_argument(
        "--quick",
        action="store_true",
        help="CI size: 6 images (<= 2500 tokens), concurrency 1,4, one request rate, 2 new tokens",
    )


def add_noise_options(g) -> None:
    """A shared machine: wait for quiet, or re-run points that other processes disturbed."""
    g.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each load point wait up to SECONDS until other processes use < 0.25 cores "
        "(a shared machine); the 'other CPU' column shows what remained (default 0: no wait)",
    )
    g.add_argument(
        "--retry-noisy",
        type=int,
        default=0,
        metavar="N",
        help="re-run a load point up to N times while other processes used more than --noise-threshold "
        "cores during it; the quietest attempt is kept (default 0)",
    )
    g.add_argument(
        "--noise-threshold",
        type=float,
        default=0.25,
        help="cores used by other processes that make a point noisy (default 0.25)",
    )


def add_requests_options(g) -> None:
    g.add_argument("--images", type=int, default=24, help="distinct images, one per data step (default 24)")
    g.add_argument(
        "--mix",
        type=LogNormalMix.parse,
        default=None,
        help="instead of photos: synthetic images sized to an embedding-length mix 'median,sigma[,min,max]' "
        "(e.g. 800,0.75,64,8192; --quick uses it, capped at 2500 tokens)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of lengths and image content (default 0)")
    g.add_argument("--prompt", default="Describe the image.", help="prompt of every request")
    g.add_argument("--max-tokens", type=int, default=8, help="MAX_TOKENS of every request (default 8)")


def add_server_options(g) -> None:
    g.add_argument(
        "--url", default="", help="use a running server at HOST:PORT (for --protocol) instead of starting one"
    )
    g.add_argument("--metrics-url", default="", help="with --url: its metrics URL, e.g. http://localhost:8002/metrics")
    g.add_argument("--server-pid", type=int, default=0, help="with --url: tritonserver's pid, for memory sampling")
    g.add_argument(
        "--model-repository",
        type=Path,
        default=ROOT / "model_repository",
        help="repository to serve (default model_repository/)",
    )
    g.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint directory (MM_CHECKPOINT; default the tiny model, $MM_TINY_MODEL); also "
        "used to size the test images",
    )
    g.add_argument(
        "--monolithic-instances",
        type=int,
        default=1,
        help="instance count of mm_monolithic (default 1 as in its config.pbtxt; 2 = as many model "
        "processes as the pipeline's encoder + language); served from a copy in --work-dir",
    )
    g.add_argument(
        "--gpu",
        type=gpu_pair,
        action="append",
        default=[],
        metavar="MODEL=GPU[,GPU]",
        help="serve MODEL's instances on these GPUs (KIND_GPU, --monolithic-instances / 1 instance "
        "per GPU), from a copy of the repository in --work-dir; repeatable, e.g. --gpu mm_encoder=0 "
        "--gpu mm_language=1 --gpu mm_monolithic=0. GPU memory in use is sampled (nvidia-smi) "
        "whenever nvidia-smi exists",
    )
    g.add_argument(
        "--embedding-cache",
        action="store_true",
        help="leave mm_encoder's embedding cache as configured; by default the started server gets "
        "MM_CACHE_BLOCKS=0, because the benchmark repeats its images and mm_monolithic has no cache",
    )
    g.add_argument(
        "--env",
        type=env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the started server, e.g. MM_POOL_BLOCKS=512 (repeatable)",
    )


def add_output_options(g) -> None:
    g.add_argument(
        "--out-dir",
        type=Path,
        default=ROOT / "docs" / "benchmarks",
        help="where <name>.json and <name>.png go (default docs/benchmarks)",
    )
    g.add_argument("--name", default="pipeline-cpu", help="file name stem of the outputs (default pipeline-cpu)")
    g.add_argument(
        "--work-dir",
        type=Path,
        default=ROOT / ".cache" / "bench",
        help="perf_analyzer inputs, CSVs and logs (default .cache/bench)",
    )
    g.add_argument(
        "--keep-exports",
        action="store_true",
        help="keep perf_analyzer's per-request --profile-export-file JSONs in --work-dir (large)",
    )
    g.add_argument(
        "--merge",
        type=Path,
        default=None,
        metavar="JSON",
        help="an earlier result of the same inputs: its rows for load points not measured in this run "
        "are kept (re-measure a few disturbed points without redoing the sweep)",
    )
    g.add_argument("--no-plot", action="store_true", help="skip the PNG")
    g.add_argument("--markdown", action="store_true", help="print the table as markdown")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models:
        p.error("--models is empty")
    if args.quick:
        args.images = min(args.images, 6)
        mix = args.mix or LogNormalMix()
        args.mix = LogNormalMix(mix.median, mix.sigma, mix.min_tokens, min(mix.max_tokens, 2500))
        args.concurrency = [1, 4] if args.concurrency == DEFAULT_CONCURRENCY else args.concurrency
        if args.request_rates == "auto":
            args.request_rates = "auto1"
        args.max_tokens = min(args.max_tokens, 2)
        args.rate_seconds = min(args.rate_seconds, 3.0)
    if args.url and (args.metrics_url == "" or args.server_pid == 0):
        print(
            "note: with --url and no --metrics-url/--server-pid, pool or memory figures are left out", file=sys.stderr
        )
    if args.monolithic_instances < 1:
        p.error("--monolithic-instances must be >= 1")
    args.gpus = dict(args.gpu)
    if len(args.gpus) != len(args.gpu):
        p.error("--gpu: a model is given twice")
    if args.images < 1 or args.max_tokens < 1:
        p.error("--images and --max-tokens must be >= 1")
    return args


# ------------------------------------------------------------------------------------------ inputs
def build_inputs(args: argparse.Namespace, checkpoint: Path) -> tuple[Path, list[int]]:
    """Encoded photos (or images at the mix's quantiles, LogNormalMix.stratified) -> perf_analyzer JSON; returns
    (path, actual token counts: the image geometry rounds up a little)."""
    import io

    from PIL import Image

    from mm_bench.images import make_test_image, tokens_for_image_size
    from mm_client.demo import PHOTO_SIZES, demo_image

    wanted = args.mix.stratified(args.images, seed=args.seed) if args.mix is not None else []
    entries, tokens, steps = [], [], []
    for i in range(args.images):
        if args.mix is None:  # ordinary photos, resized by the server to its per-image budget
            w, h = PHOTO_SIZES[i % len(PHOTO_SIZES)]
            data = demo_image(w, h, seed=args.seed * 10_007 + i + 1)
        else:
            data = make_test_image(tokens=int(wanted[i]), seed=args.seed * 10_007 + i, model_dir=checkpoint)
            w, h = Image.open(io.BytesIO(data)).size
        tokens.append(tokens_for_image_size(checkpoint, w, h))
        entries.append(perf.request_entry([data], args.prompt, args.max_tokens))
        steps.append([data])
    path = perf.write_input_data(args.work_dir / f"{args.name}-input.json", entries)
    args.steps = steps  # the same requests for the Python load generator
    return path, tokens


def mix_description(args: argparse.Namespace) -> str:
    from mm_client.demo import PHOTO_SIZES

    if args.mix is not None:
        return args.mix.describe()
    return f"{args.images} JPEG photos of {len(PHOTO_SIZES)} ordinary sizes (640x480 ... 4032x3024, a panorama)"


def photo_sizes_used(args: argparse.Namespace) -> list[tuple[int, int]]:
    from mm_client.demo import PHOTO_SIZES

    return [PHOTO_SIZES[i % len(PHOTO_SIZES)] for i in range(args.images)]


def expected_continuations(tokens: list[int], window: int = 1024) -> float:
    """Continuations per transfer the fixed default window gives for these images (each used equally)."""
    return sum(math.ceil(t / window) - 1 for t in tokens) / len(tokens)


# ------------------------------------------------------------------------------------------ server
class Target:
    """Where load goes: a server this script started, or one given by --url."""

    def __init__(
        self,
        url: str,
        metrics_url: str,
        pid: int,
        server=None,
        http_address: str = "",
        gpu_baseline: dict | None = None,
    ) -> None:
        self.url, self.metrics_url, self.pid, self.server = url, metrics_url, pid, server
        self.http_address = http_address
        self.gpu_baseline = gpu_baseline

    def metrics(self) -> dict:
        from mm_triton.prometheus import parse_metrics

        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return parse_metrics(r.read().decode())

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


def instance_copy(repository: Path, model: str, count: int, work_dir: Path) -> Path:
    """A copy of the repository whose ``model`` asks for ``count`` instances (version dirs linked)."""
    return repository_variant(repository, work_dir, counts={model: count})


def repository_variant(
    repository: Path, work_dir: Path, counts: dict[str, int] | None = None, gpus: dict[str, list[int]] | None = None
) -> Path:
    """A copy of every model of ``repository`` (config.pbtxt rewritten, version dir ``1`` a symlink): the
    models in ``counts`` get that instance count, those in ``gpus`` KIND_GPU groups, one per GPU, each of
    the model's count (default 1)."""
    import re

    counts, gpus = dict(counts or {}), dict(gpus or {})
    tag = (
        "-".join(
            [f"{m}x{c}" for m, c in sorted(counts.items())]
            + [f"{m}@{'.'.join(map(str, g))}" for m, g in sorted(gpus.items())]
        )
        or "plain"
    )
    repo = work_dir / f"repo-{tag}"
    models = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    unknown = sorted((set(counts) | set(gpus)) - set(models))
    if unknown:
        raise ValueError(f"{repository} has no model {', '.join(unknown)}")
    for model in models:
        src = repository / model
        (repo / model).mkdir(parents=True, exist_ok=True)
        config = (src / "config.pbtxt").read_text()
        if model in counts or model in gpus:
            count = counts.get(model, 1)
            if model in gpus:
                group = ", ".join(f"{{ count: {count}, kind: KIND_GPU, gpus: [ {g} ] }}" for g in gpus[model])
            else:
                group = f"{{ count: {count}, kind: KIND_CPU }}"
            config, n = re.subn(r"instance_group\s*\[[^\]]*\]", f"instance_group [ {group} ]", config, count=1)
            if n != 1:
                raise ValueError(f"no instance_group in {src / 'config.pbtxt'}")
        (repo / model / "config.pbtxt").write_text(config)
        link = repo / model / "1"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((src / "1").resolve(), target_is_directory=True)
    return repo


def start_target(args: argparse.Namespace, model: str, checkpoint: Path) -> Target:
    if args.url:
        return Target(
            args.url, args.metrics_url, args.server_pid, http_address=args.url if args.protocol == "http" else ""
        )
    from mm_triton.launcher import TritonServer

    env = {
        "MM_CHECKPOINT": str(checkpoint),
        **({} if args.embedding_cache else {"MM_CACHE_BLOCKS": "0"}),
        **dict(args.env),
    }
    load = [f"--load-model={m}" for m in LOAD.get(model, [model])]
    log = args.work_dir / f"{args.name}-{model}-server.log"
    if log.exists():
        log.unlink()
    repo = args.model_repository
    counts = {"mm_monolithic": args.monolithic_instances} if args.monolithic_instances != 1 else {}
    if counts or args.gpus:
        repo = repository_variant(args.model_repository, args.work_dir, counts=counts, gpus=args.gpus)
    server = TritonServer(
        repo, env=env, args=["--model-control-mode=explicit", *load], log_file=log, startup_timeout_s=600
    )
    baseline = gpu_memory_used_mib()
    t0 = time.monotonic()
    server.start()
    print(f"[{model}] tritonserver pid {server.pid} ready in {time.monotonic() - t0:.1f}s (log {log})", flush=True)
    url = server.grpc_url if args.protocol == "grpc" else server.http_address
    return Target(url, server.metrics_url, server.pid, server, http_address=server.http_address, gpu_baseline=baseline)


# ------------------------------------------------------------------------------------------ one point
def run_point(
    args,
    target: Target,
    model: str,
    input_path: Path,
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    requests: int,
    label: str,
    pa_env: dict,
) -> dict:
    csv_path = args.work_dir / f"{args.name}-{model}-{label}.csv"
    export_path = args.work_dir / f"{args.name}-{model}-{label}-export.json"
    for stale in (csv_path, export_path):
        if stale.exists():
            stale.unlink()
    cmd = perf.command(
        args.perf_analyzer,
        model,
        target.url,
        input_path,
        csv_path,
        protocol=args.protocol,
        concurrency=concurrency,
        request_rate=rate,
        request_count=requests,
        max_threads=2 if rate else None,
        profile_export=export_path,
        extra=["-a"] if rate else [],
    )
    return measure_point(args, target, model, cmd, csv_path, export_path, concurrency, rate, requests, label, pa_env)


def measure_point(args, target, model, cmd, csv_path, export_path, concurrency, rate, requests, label, pa_env) -> dict:
    """Send one point's load with the samplers running; the row of figures it gives."""
    quiet = wait_for_quiet(target.pid, args.noise_threshold, args.wait_quiet) if args.wait_quiet > 0 else None
    before = _safe_metrics(target)
    mem = MemorySampler(target.pid) if target.pid else None
    pools = PoolSampler(target.metrics) if target.metrics_url else None
    gpu_mem = GpuMemorySampler(target.gpu_baseline) if target.gpu_baseline else None
    t0 = time.monotonic()
    cpu = CpuAccount(target.pid).__enter__()
    for sampler in (mem, pools, gpu_mem):
        if sampler:
            sampler.__enter__()
    try:
        cmd, rc, out, err, generated = send_load(
            args, target, model, cmd, concurrency=concurrency, rate=rate, requests=requests, pa_env=pa_env
        )
    finally:
        for sampler in (pools, mem, gpu_mem):
            if sampler:
                sampler.__exit__(None, None, None)
        cpu.__exit__(None, None, None)
    elapsed = time.monotonic() - t0
    (args.work_dir / f"{args.name}-{model}-{label}.log").write_text(" ".join(cmd) + "\n\n" + out + "\n" + err)
    row: dict = {
        "model": model,
        "mode": "concurrency" if concurrency else "request_rate",
        "concurrency": concurrency,
        "request_rate": rate,
        "requests": requests,
        "rc": rc,
        "elapsed_s": round(elapsed, 2),
        "cpu_cores": cpu.result(),
    }
    row["other_cpu"] = row["cpu_cores"]["other"]
    if quiet is not None:
        row["other_cpu_before"] = round(quiet, 2)
    if gpu_mem:
        row["gpu_memory"] = gpu_mem.result()
        row["gpu_mem"] = " ".join(f"{g}:{v:.0f}" for g, v in row["gpu_memory"]["peak_server_mib"].items())
    load_result(row, args, f"[{model}] {label}", rc, out, err, generated, csv_path, export_path)
    after = _wait_quiet(target) if target.metrics_url else None
    if before is not None and after is not None:
        row.update(transfer_deltas(before, after))
        row["phases"] = phase_breakdown(before, after)  # mm_phase_seconds deltas: {model: {phase: stats}}
    add_sampled_figures(row, pools, mem)
    return row


def add_sampled_figures(row: dict, pools: PoolSampler | None, mem: MemorySampler | None) -> None:
    if pools:
        row["pools"] = pools.result()
        for m, short in (("mm_encoder", "enc"), ("mm_language", "lang")):
            if row["pools"][m]["blocks_total"]:
                row[f"{short}_pool_max"] = row["pools"][m]["max_utilisation"]
                row[f"{short}_pool_mean"] = row["pools"][m]["mean_utilisation"]
    if mem:
        row["memory"] = mem.result()
        row["peak_rss_mib"] = row["memory"]["peak_rss_mib"]
        row["peak_pss_mib"] = row["memory"]["peak_pss_mib"]


def send_load(
    args,
    target: Target,
    model: str,
    cmd: list[str],
    *,
    concurrency: int | None,
    rate: float | None,
    requests: int,
    pa_env: dict,
) -> tuple[list[str], int, str, str, dict | None]:
    """One load point by perf_analyzer (``cmd``) or the Python generator: (command, rc, stdout, stderr,
    the Python generator's result or None)."""
    try:
        if args.load_generator == "python":
            cmd = [
                "mm_bench.loadgen",
                "closed_loop" if concurrency else "open_loop",
                f"c={concurrency}",
                f"rate={rate}",
                f"requests={requests}",
                f"http://{target.http_address}",
            ]
            generated = python_load(args, target, model, concurrency=concurrency, rate=rate, requests=requests)
            rc = 0 if generated["completed"] and not generated["errors"] and not generated["timed_out"] else 1
            return cmd, rc, json.dumps({k: v for k, v in generated.items() if k != "token_ids"}), "", generated
        proc = subprocess.run(cmd, capture_output=True, text=True, env=pa_env, timeout=args.point_timeout)
        return cmd, proc.returncode, proc.stdout, proc.stderr, None
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        return (
            cmd,
            124,
            out.decode() if isinstance(out, bytes) else out,
            f"timed out after {args.point_timeout:g}s",
            None,
        )


def load_result(
    row: dict, args, where: str, rc: int, out: str, err: str, generated: dict | None, csv_path: Path, export_path: Path
) -> None:
    """The load generator's figures into ``row``, or its error."""
    if generated is not None:
        row.update(generated)
        if rc != 0:
            row["error"] = generated.get("first_error") or (
                "timed out" if generated.get("timed_out") else "no response"
            )
            print(f"{where}: load failed: {row['error']}", file=sys.stderr, flush=True)
    elif rc == 0 and csv_path.exists() and export_path.exists():
        row.update({f"pa_{k}": v for k, v in perf.parse_csv(csv_path.read_text()).items()})
        row.update(perf.summarize_profile(perf.load_profile_export(export_path)))
        if not args.keep_exports:
            export_path.unlink()
    else:
        tail = (out + "\n" + err).strip().splitlines()[-6:]
        row["error"] = " | ".join(tail)
        print(f"{where}: perf_analyzer failed (rc {rc}): {row['error']}", file=sys.stderr, flush=True)


def transfer_deltas(before, after) -> dict:
    """What the transfer metrics counted during a point."""

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    transfers = delta("mm_transfers_total", model="mm_language")
    conts = delta("mm_transfer_continuations_total", model="mm_language")
    return {
        "transfers": transfers,
        "continuations": conts,
        "embedding_cache_hits": delta("mm_embedding_cache_hits_total"),
        "continuation_ratio": conts / transfers if transfers else None,
        "transfer_failures": delta("mm_transfer_failures_total"),
    }


def python_load(
    args, target: Target, model: str, *, concurrency: int | None, rate: float | None, requests: int
) -> dict:
    """One load point by mm_bench.loadgen over HTTP (no perf_analyzer): the same data steps, round-robin."""
    from mm_bench import loadgen
    from mm_bench.kserve_http import infer  # dependency-free KServe v2 HTTP client

    if not target.http_address:
        raise SystemExit(
            "--load-generator python needs an HTTP address (a started server, or --url with --protocol http)"
        )
    prompt = [args.prompt.encode()]

    def call(step: int) -> list[int]:
        out = infer(
            target.http_address,
            model,
            {"IMAGE": args.steps[step], "PROMPT": prompt},
            {"MAX_TOKENS": [args.max_tokens]},
            outputs=["TOKEN_IDS"],
            timeout_s=args.point_timeout,
        )
        return [int(x) for x in out["TOKEN_IDS"]]

    if concurrency:
        return loadgen.closed_loop(call, len(args.steps), concurrency, requests, args.point_timeout)
    return loadgen.open_loop(call, len(args.steps), rate, requests, args.point_timeout, seed=args.seed)


def _safe_metrics(target: Target):
    if not target.metrics_url:
        return None
    try:
        return target.metrics()
    except Exception:
        return None


def _wait_quiet(target: Target):
    """Metrics once the pools are back to zero (DONE/ACK settle right after the responses)."""
    last = {}

    def quiet() -> bool:
        m = _safe_metrics(target)
        if m is None:
            return False
        last["m"] = m
        return metric_sum(m, "mm_pool_blocks_used") == 0

    wait_until(quiet, timeout_s=10, interval_s=0.1)
    return last.get("m")


def token_agreement(rows: list[dict]) -> dict:
    """Did every request with the same image get the same greedy tokens, within and across models?
    (Pops the bulky per-row token maps.)"""
    per_model: dict[str, dict[str, set]] = {}
    for r in rows:
        for key, seqs in (r.pop("token_ids", None) or {}).items():
            per_model.setdefault(r["model"], {}).setdefault(key, set()).update(tuple(s) for s in seqs)
    within = all(len(v) == 1 for m in per_model.values() for v in m.values()) if per_model else None
    common = set.intersection(*(set(m) for m in per_model.values())) if per_model else set()
    across = (
        all(len(set().union(*(per_model[m][k] for m in per_model))) == 1 for k in common)
        if len(per_model) > 1
        else None
    )
    return {"inputs": len(common), "consistent_within_model": within, "equal_across_models": across}


def run_point_retrying(args, target: Target, model: str, input_path: Path, **kw) -> dict:
    """run_point, repeated (up to --retry-noisy times) while a neighbour disturbed it; keeps the quietest."""
    attempts = []
    for attempt in range(args.retry_noisy + 1):
        row = run_point(args, target, model, input_path, **kw)
        attempts.append(row)
        if row.get("other_cpu", 0.0) <= args.noise_threshold:
            break
        if attempt < args.retry_noisy:
            print(f"[{model}] {kw['label']}: other processes used {row['other_cpu']:.2f} cores, retrying", flush=True)
    best = min(attempts, key=lambda r: (r["rc"] != 0, r.get("other_cpu", 0.0)))
    best["attempts"] = len(attempts)
    return best


def _key(row: dict) -> tuple:
    return row["model"], row["mode"], row.get("concurrency"), row.get("request_rate")


def merge_rows(rows: list[dict], path: Path, models: list[str], tokens: list[int]) -> tuple[list[dict], dict]:
    """New rows plus the earlier result's rows for other load points (same images required)."""
    old = json_load(path)
    if old.get("image_tokens") != tokens:
        raise SystemExit(f"--merge {path}: measured with other images (image_tokens differ); not merged")
    new_keys = {_key(r) for r in rows}
    kept = [r for r in old.get("rows", []) if _key(r) not in new_keys]
    order = {m: i for i, m in enumerate(dict.fromkeys([*old.get("models", []), *models]))}
    merged = sorted(
        kept + rows,
        key=lambda r: (
            order.get(r["model"], 99),
            r["mode"] != "concurrency",
            r.get("concurrency") or 0,
            r.get("request_rate") or 0,
        ),
    )
    for r in merged:
        r.setdefault("point", _point(r))
    earlier = old.get("token_agreement_runs") or [old.get("token_agreement")]
    return merged, {
        "path": str(path),
        "command": old.get("command"),
        "rows_kept": len(kept),
        "token_agreement_runs": [a for a in earlier if a],
    }


def json_load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def requests_for(args, concurrency: int) -> int:
    return args.requests or max(3 * args.images, 4 * concurrency)


# ------------------------------------------------------------------------------------------ main
def choose_load_generator(args, pa_env: dict) -> bool:
    """Settle ``args.load_generator`` (perf_analyzer when it starts here, unless told); False when the one
    asked for cannot run."""
    args.perf_analyzer = perf.find_perf_analyzer()
    problem = None
    if args.load_generator != "python":
        if not args.perf_analyzer:
            problem = "perf_analyzer not found (pip install 'tritonclient[all]==2.51.0'; or set PERF_ANALYZER)"
        else:
            try:
                probe = subprocess.run(
                    [args.perf_analyzer, "--version"], capture_output=True, text=True, env=pa_env, timeout=60
                )
                if probe.returncode != 0 and "error while loading shared libraries" in probe.stderr:
                    problem = (
                        f"perf_analyzer cannot start: {probe.stderr.strip()} (install the Debian package "
                        "libb64-0d and `source scripts/env.sh`; see docs/BENCHMARKS.md)"
                    )
            except (OSError, subprocess.SubprocessError) as exc:
                problem = f"perf_analyzer cannot start: {exc}"
    if problem and args.load_generator == "perf_analyzer":
        print(f"error: {problem}", file=sys.stderr)
        return False
    if problem or args.load_generator == "python":
        if problem:
            print(f"note: {problem}; using the Python load generator (mm_bench.loadgen, HTTP) instead", flush=True)
        args.load_generator = "python"
        args.perf_analyzer = args.perf_analyzer or "perf_analyzer"  # only for the (unused) command lines
    else:
        args.load_generator = "perf_analyzer"
    print(
        f"load generator: {args.load_generator}"
        + (f" ({args.perf_analyzer})" if args.load_generator == "perf_analyzer" else ""),
        flush=True,
    )
    return True


def sweep_model(
    args,
    target: Target,
    model: str,
    input_path: Path,
    tokens: list[int],
    rows: list[dict],
    rates: list[float],
    pa_env: dict,
) -> list[float]:
    """Warm-up, the concurrency points, then the request-rate points of one model (appended to ``rows``);
    returns the rates (the first model's sweep fixes 'auto' ones for the others)."""
    if args.load_generator == "python":
        python_load(args, target, model, concurrency=1, rate=None, requests=min(len(tokens), 8))
    else:
        warm = perf.command(
            args.perf_analyzer,
            model,
            target.url,
            input_path,
            args.work_dir / "warmup.csv",
            protocol=args.protocol,
            concurrency=1,
            request_count=min(len(tokens), 8),
        )
        subprocess.run(warm, capture_output=True, text=True, env=pa_env, timeout=args.point_timeout)
    point = dict(args=args, target=target, model=model, input_path=input_path, tokens=tokens, rows=rows, pa_env=pa_env)
    for c in args.concurrency:
        measure(**point, label=f"c{c}", requests=requests_for(args, c), concurrency=c)
    if isinstance(args.request_rates, str) and args.request_rates.startswith("auto") and not rates:
        best = max((r.get("throughput", 0.0) for r in rows if r["model"] == model), default=0.0)
        factors = (0.5,) if args.request_rates == "auto1" else (0.5, 0.9)
        rates = [round(best * f, 1) for f in factors if best * f >= 0.1]
    for rate in rates:
        measure(**point, label=f"r{rate:g}", requests=max(8, int(round(rate * args.rate_seconds))), rate=rate)
    return rates


def measure(
    args, target: Target, model: str, input_path: Path, tokens: list[int], rows: list[dict], pa_env: dict, **point
) -> None:
    """One load point (retried while noisy), appended to ``rows``, printed and saved to the partial JSON."""
    row = run_point_retrying(args, target, model, input_path, pa_env=pa_env, **point)
    rows.append(row)
    _print_progress(row)
    _write_partial(args, rows, tokens)


def report(args, argv, rows: list[dict], tokens: list[int], checkpoint: Path, t_start: float) -> int:
    """The table, the JSON (merged with --merge's rows) and the figure; 0 when every point succeeded."""
    info = machine_info()
    agreement = token_agreement(rows)
    merged_from = None
    if args.merge:
        rows, merged_from = merge_rows(rows, args.merge, args.models, tokens)
    print()
    print(table(rows, TABLE_COLUMNS, markdown=args.markdown))
    print(f"\ngreedy TOKEN_IDS per input: {agreement}")
    print(f"\nmachine: {machine_line(info)}; load generator: {args.load_generator}")
    payload = {
        "benchmark": "pipeline",
        "command": "scripts/bench_pipeline.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": info,
        "checkpoint": str(checkpoint),
        "models": list(dict.fromkeys([r["model"] for r in rows] + args.models)),
        "protocol": args.protocol,
        "load_generator": args.load_generator,
        "gpus": args.gpus,
        "mix": args.mix.to_dict() if args.mix else {"photos": [list(s) for s in photo_sizes_used(args)]},
        "image_tokens": tokens,
        "image_token_summary": summarize(tokens),
        "expected_continuations_per_transfer": expected_continuations(tokens),
        "prompt": args.prompt,
        "max_tokens": args.max_tokens,
        "server_env": dict(args.env),
        "embedding_cache": "as configured" if args.embedding_cache else "off (MM_CACHE_BLOCKS=0)",
        "token_agreement": agreement,
        "merged_from": merged_from,
        "token_agreement_runs": ((merged_from or {}).get("token_agreement_runs") or []) + [agreement],
        "rows": rows,
        "elapsed_s": round(time.monotonic() - t_start, 1),
    }
    print(f"wrote {write_json(args.out_dir / f'{args.name}.json', payload)}")
    if not args.no_plot:
        print(f"wrote {plot(rows, args, info, expected_continuations(tokens))}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mm_triton.server_env import server_env

    pa_env = server_env()  # nvidia_pytriton.libs + cuda_runtime on LD_LIBRARY_PATH, venv bin on PATH
    if not choose_load_generator(args, pa_env):
        return 2
    checkpoint = Path(args.checkpoint or tiny_model_dir())
    if not (checkpoint / "config.json").is_file():
        print(f"error: no checkpoint at {checkpoint} (run scripts/setup, or give --checkpoint)", file=sys.stderr)
        return 2
    args.work_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    input_path, tokens = build_inputs(args, checkpoint)
    token_summary = summarize(tokens)
    print(
        f"{len(tokens)} images, embedding tokens: p50 {token_summary['p50']:.0f}, p90 {token_summary['p90']:.0f}, "
        f"max {token_summary['max']}, {token_summary['share_above_1024']:.0%} above the 1024 window "
        f"(expected continuations/transfer {expected_continuations(tokens):.2f}); input {input_path}",
        flush=True,
    )
    rows: list[dict] = []
    rates: list[float] = list(args.request_rates) if isinstance(args.request_rates, list) else []
    for model in args.models:
        target = start_target(args, model, checkpoint)
        try:
            rates = sweep_model(args, target, model, input_path, tokens, rows, rates, pa_env)
        finally:
            target.close()
    return report(args, argv, rows, tokens, checkpoint, t_start)


TABLE_COLUMNS = [
    ("model", "model"),
    ("point", "load"),
    ("requests", "reqs"),
    ("throughput", "infer/s", ".2f"),
    ("p50_ms", "p50 ms", ".0f"),
    ("p90_ms", "p90 ms", ".0f"),
    ("p99_ms", "p99 ms", ".0f"),
    ("continuation_ratio", "conts/xfer", ".2f"),
    ("enc_pool_max", "enc pool max", ".0%"),
    ("lang_pool_max", "lang pool max", ".0%"),
    ("peak_rss_mib", "peak RSS MiB", ".0f"),
    ("peak_pss_mib", "peak PSS MiB", ".0f"),
    ("gpu_mem", "GPU MiB (gpu:peak)"),
    ("other_cpu", "other CPU", ".2f"),
]


def _write_partial(args, rows: list[dict], tokens: list[int]) -> None:
    """The rows so far, in --work-dir/<name>.partial.json: what a run cut short (a time limit) still has."""
    try:
        slim = [{k: v for k, v in r.items() if k != "token_ids"} for r in rows]
        write_json(
            args.work_dir / f"{args.name}.partial.json",
            {
                "benchmark": "pipeline",
                "partial": True,
                "image_tokens": tokens,
                "gpus": args.gpus,
                "load_generator": args.load_generator,
                "rows": slim,
            },
        )
    except Exception as exc:  # noqa: BLE001 - never lose the run over the insurance copy
        print(f"note: partial JSON not written: {exc}", file=sys.stderr)


def _point(row: dict) -> str:
    return f"c={row['concurrency']}" if row["mode"] == "concurrency" else f"rate={row['request_rate']:g}/s"


def _print_progress(row: dict) -> None:
    row["point"] = _point(row)
    if row["rc"] == 0:
        print(
            f"[{row['model']}] {row['point']}: {row.get('throughput', 0):.2f} infer/s, "
            f"p50 {row.get('p50_ms', 0):.0f} ms, "
            f"p99 {row.get('p99_ms', 0):.0f} ms ({row['elapsed_s']:.0f}s)",
            flush=True,
        )
        for line in format_breakdown(row.get("phases") or {}):
            print(line, flush=True)


def plot(rows: list[dict], args: argparse.Namespace, info: dict, exp: float | None = None) -> Path:
    from mm_bench.plotting import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ok = [r for r in rows if r["rc"] == 0]
    models = list(dict.fromkeys(r["model"] for r in rows))
    plot_curves(axes, ok, models, exp)
    mem_title = plot_memory(axes[1, 2], ok, models)
    style_axes(axes, ok, mem_title)
    fig.suptitle(
        f"mm_pipeline (disaggregated) vs mm_monolithic (colocated); images: {mix_description(args)}; "
        f"MAX_TOKENS {args.max_tokens}",
        fontsize=10,
    )
    fig.tight_layout()
    return save(fig, args.out_dir / f"{args.name}.png", footer=machine_line(info))


def plot_curves(axes, ok: list[dict], models: list[str], exp: float | None) -> None:
    """Throughput, latencies, pool utilisation and continuations against load, one colour per model."""
    for i, model in enumerate(models):
        conc = sorted(
            (r for r in ok if r["model"] == model and r["mode"] == "concurrency"), key=lambda r: r["concurrency"]
        )
        rate = sorted(
            (r for r in ok if r["model"] == model and r["mode"] == "request_rate"), key=lambda r: r["request_rate"]
        )
        x = [r["concurrency"] for r in conc]
        color = f"C{i}"
        if conc:
            axes[0, 0].plot(x, [r["throughput"] for r in conc], "o-", color=color, label=model)
            axes[0, 1].plot(x, [r["p50_ms"] for r in conc], "o-", color=color, label=f"{model} p50")
            axes[0, 1].plot(x, [r["p99_ms"] for r in conc], "s--", color=color, label=f"{model} p99")
        if rate:
            xr = [r["request_rate"] for r in rate]
            axes[0, 2].plot(xr, [r["p50_ms"] for r in rate], "o-", color=color, label=f"{model} p50")
            axes[0, 2].plot(xr, [r["p99_ms"] for r in rate], "s--", color=color, label=f"{model} p99")
        if model == "mm_pipeline" and conc:
            for key, label, style in (
                ("enc_pool_max", "encoder pool max", "o-"),
                ("enc_pool_mean", "encoder pool mean", "o:"),
                ("lang_pool_max", "language pool max", "s-"),
                ("lang_pool_mean", "language pool mean", "s:"),
            ):
                if any(r.get(key) is not None for r in conc):
                    axes[1, 0].plot(x, [100 * (r.get(key) or 0) for r in conc], style, label=label)
            axes[1, 1].plot(
                x, [r.get("continuation_ratio") or 0 for r in conc], "o-", color=color, label="measured (metrics)"
            )
    if exp is not None:
        axes[1, 1].axhline(exp, color="0.5", ls="--", label="expected from the image mix")
    axes[1, 1].set_ylim(bottom=0)
    axes[1, 0].set_ylim(bottom=0)


def plot_memory(ax, ok: list[dict], models: list[str]) -> str:
    """Peak GPU memory per GPU (when sampled), else peak RSS per process, at each model's highest load point,
    as stacked bars; returns the panel's title."""
    labels = []
    gpu_rows = [r for r in ok if r.get("gpu_memory")]
    key = "gpu" if gpu_rows else "rss"
    mem_title = (
        "Peak GPU memory by GPU, server's share (highest load point)"
        if gpu_rows
        else "Peak RSS by process (highest load point)"
    )

    def parts(r):
        return (
            {f"GPU {g}": v for g, v in r["gpu_memory"]["peak_server_mib"].items()}
            if key == "gpu"
            else r["memory"]["peak_rss_by_process_mib"]
        )

    with_mem = [r for r in ok if (r.get("gpu_memory") if key == "gpu" else r.get("memory"))]
    procs = sorted({p for r in with_mem for p in parts(r)})
    colors = {p: f"C{j + 2}" for j, p in enumerate(procs)}
    for model in models:
        conc = [r for r in with_mem if r["model"] == model]
        if not conc:
            continue
        top = max(conc, key=lambda r: sum(parts(r).values()))
        bottom = 0.0
        for proc, mib in sorted(parts(top).items()):
            ax.bar(len(labels), mib, bottom=bottom, color=colors[proc])
            ax.annotate(f"{proc} {mib:.0f}", (len(labels), bottom + mib / 2), ha="center", va="center", fontsize=7)
            bottom += mib
        labels.append(model)
    ax.set_xticks(range(len(labels)), labels)
    return mem_title


def style_axes(axes, ok: list[dict], mem_title: str) -> None:
    for ax, title, xl, yl, logx in (
        (axes[0, 0], "Throughput (closed loop)", "concurrency", "infer/s", True),
        (axes[0, 1], "Client latency (closed loop)", "concurrency", "ms", True),
        (axes[0, 2], "Client latency (open loop, Poisson)", "offered request rate (req/s)", "ms", False),
        (axes[1, 0], "mm_pipeline pool utilisation", "concurrency", "% of pool blocks", True),
        (axes[1, 1], "mm_pipeline continuations per transfer", "concurrency", "continuations / transfer", True),
        (axes[1, 2], mem_title, "", "MiB", False),
    ):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        if logx:
            ax.set_xscale("log")
            ticks = sorted({r["concurrency"] for r in ok if r["mode"] == "concurrency"})
            if ticks:
                ax.set_xticks(ticks, [str(t) for t in ticks])
                ax.minorticks_off()
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if handles and ax is not axes[1, 2]:
            ax.legend(fontsize=7)
    if any(r["model"] == "mm_pipeline" for r in ok):
        axes[0, 1].set_yscale("log")


if __name__ == "__main__":
    sys.exit(main())
