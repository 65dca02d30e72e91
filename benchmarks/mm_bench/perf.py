"""perf_analyzer (tritonclient 2.51) glue: input-data JSON, command lines, CSV parsing.

Input data: perf_analyzer's JSON format, one entry ("step") per request, taken round-robin:
``{"data": [{"IMAGE": {"b64": ..., "shape": [1]}, "PROMPT": {"content": [...], "shape": [1]}, ...}]}``.
For a BYTES input, ``b64`` holds the *serialized* tensor: each element is a 4-byte little-endian length
followed by its bytes (plain base64 of a PNG is read as a length of 0x474E5089 and refused).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

LATENCY_COLUMNS = {
    "p50": "p50 latency",
    "p90": "p90 latency",
    "p95": "p95 latency",
    "p99": "p99 latency",
    "avg": "Avg latency",
}


def serialize_bytes_tensor(elements: Sequence[bytes]) -> bytes:
    """Triton's wire form of a BYTES tensor: <uint32 little-endian length><bytes> per element."""
    out = bytearray()
    for e in elements:
        out += len(e).to_bytes(4, "little") + bytes(e)
    return bytes(out)


def request_entry(images: Sequence[bytes], prompt: str, max_tokens: int | None) -> dict:
    """One perf_analyzer data step for the mm_pipeline / mm_monolithic contract."""
    entry: dict = {
        "IMAGE": {"b64": base64.b64encode(serialize_bytes_tensor(images)).decode("ascii"), "shape": [len(images)]},
        "PROMPT": {"content": [prompt], "shape": [1]},
    }
    if max_tokens is not None:
        entry["MAX_TOKENS"] = {"content": [int(max_tokens)], "shape": [1]}
    return entry


def write_input_data(path: str | os.PathLike, entries: Sequence[Mapping]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": list(entries)}))
    return path


def find_perf_analyzer() -> str | None:
    """$PERF_ANALYZER, else perf_analyzer on PATH, else next to this Python (the venv's bin/)."""
    import sys

    env = os.environ.get("PERF_ANALYZER")
    if env:
        return env
    found = shutil.which("perf_analyzer")
    if found:
        return found
    local = Path(sys.prefix) / "bin" / "perf_analyzer"
    return str(local) if local.exists() else None


def command(
    perf_analyzer: str,
    model: str,
    url: str,
    input_data: str | os.PathLike,
    csv_path: str | os.PathLike,
    *,
    protocol: str = "grpc",
    concurrency: int | None = None,
    request_rate: float | None = None,
    request_count: int = 32,
    percentile: int = 99,
    max_threads: int | None = None,
    distribution: str = "poisson",
    profile_export: str | os.PathLike | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The perf_analyzer command for one load point: a fixed --request-count (bounded run time, no
    stability search) at one concurrency (closed loop) or one request rate (open loop)."""
    if (concurrency is None) == (request_rate is None):
        raise ValueError("give exactly one of concurrency and request_rate")
    if request_count < 1:
        raise ValueError("request_count must be >= 1")
    cmd = [
        perf_analyzer,
        "-m",
        model,
        "-i",
        protocol,
        "-u",
        url,
        "--input-data",
        str(input_data),
        "--request-count",
        str(request_count),
        "--percentile",
        str(percentile),
        "-f",
        str(csv_path),
    ]
    if profile_export is not None:
        cmd += ["--profile-export-file", str(profile_export)]
    if concurrency is not None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        cmd += ["--concurrency-range", str(concurrency)]
    else:
        if not request_rate or request_rate <= 0:
            raise ValueError("request_rate must be > 0")
        cmd += ["--request-rate-range", f"{request_rate:g}", "--request-distribution", distribution]
        if max_threads:
            cmd += ["--max-threads", str(max_threads)]
    return cmd + list(extra)


def parse_csv(text: str) -> dict:
    """The first data row of perf_analyzer's -f CSV: throughput (infer/s) and latencies in ms."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise ValueError("perf_analyzer CSV has no data row")
    row = {k.strip(): (v or "").strip() for k, v in rows[0].items() if k}
    out: dict = {"throughput": float(row["Inferences/Second"])}
    for key, column in LATENCY_COLUMNS.items():
        if row.get(column):
            out[f"{key}_ms"] = float(row[column]) / 1000.0
    if "avg_ms" not in out:
        parts = [
            c
            for c in (
                "Client Send",
                "Network+Server Send/Recv",
                "Server Queue",
                "Server Compute Input",
                "Server Compute Infer",
                "Server Compute Output",
                "Client Recv",
            )
            if row.get(c)
        ]
        if parts:
            out["avg_ms"] = sum(float(row[c]) for c in parts) / 1000.0
    for key, column in (("server_queue_ms", "Server Queue"), ("server_infer_ms", "Server Compute Infer")):
        if row.get(column):
            out[key] = float(row[column]) / 1000.0
    return out


def load_profile_export(path: str | os.PathLike) -> dict:
    """perf_analyzer's --profile-export-file. It embeds BYTES inputs as raw (non-UTF-8) bytes inside the
    JSON strings, so it is read as latin-1 (the JSON structure itself is ASCII)."""
    return json.loads(Path(path).read_bytes().decode("latin-1"), strict=False)


def summarize_profile(export: Mapping, input_key: str = "IMAGE") -> dict:
    """Precise figures from per-request timestamps (perf_analyzer's own throughput uses whole-second
    windows, too coarse for short runs): throughput = completed / (last response - first request),
    latency percentiles (ms, linear interpolation), errors, and the TOKEN_IDS answered per input."""
    import hashlib

    import numpy as np

    latencies, starts, ends, errors = [], [], [], 0
    tokens: dict[str, set] = {}
    for exp in export.get("experiments", []):
        for req in exp.get("requests", []):
            resp = req.get("response_timestamps") or []
            if not resp:
                errors += 1
                continue
            starts.append(req["timestamp"])
            ends.append(resp[-1])
            latencies.append((resp[-1] - req["timestamp"]) / 1e6)
            outputs = req.get("response_outputs") or []
            image = (req.get("request_inputs") or {}).get(input_key)
            if outputs and image is not None and "TOKEN_IDS" in outputs[-1]:
                key = hashlib.sha1(str(image).encode("latin-1", "replace")).hexdigest()[:16]
                tokens.setdefault(key, set()).add(tuple(outputs[-1]["TOKEN_IDS"]))
    out: dict = {"completed": len(latencies), "errors": errors}
    if latencies:
        lat = np.array(latencies)
        span_s = (max(ends) - min(starts)) / 1e9
        out.update(
            {
                "throughput": len(latencies) / span_s if span_s > 0 else None,
                "span_s": span_s,
                "p50_ms": float(np.percentile(lat, 50)),
                "p90_ms": float(np.percentile(lat, 90)),
                "p99_ms": float(np.percentile(lat, 99)),
                "avg_ms": float(lat.mean()),
                "max_ms": float(lat.max()),
            }
        )
    out["token_ids"] = {k: [list(t) for t in sorted(v)] for k, v in tokens.items()}
    return out
