"""Result files and tables: every result JSON says which machine and commit it came from."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    info = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def _gpus() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    return []


def machine_info() -> dict[str, Any]:
    """nproc, CPU model, memory, GPUs, Python/torch versions, git commit and a UTC time stamp."""
    cpu = _lscpu()
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu.get("Model name", platform.processor()),
        "cpus": cpu.get("CPU(s)"),
        "threads_per_core": cpu.get("Thread(s) per core"),
        "hypervisor": cpu.get("Hypervisor vendor", ""),
        "mem_total_gib": _mem_total_gib(),
        "gpus": _gpus(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "loadavg_1m_5m_15m": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except Exception:
        pass
    return info


def machine_line(info: Mapping[str, Any]) -> str:
    gpus = ", ".join(info.get("gpus") or []) or "no GPU"
    vm = ", " + info["hypervisor"] + " VM" if info.get("hypervisor") else ""
    return (
        f"{info.get('nproc')} CPU cores ({info.get('cpu_model')}{vm}), "
        f"{info.get('mem_total_gib')} GiB RAM, {gpus}; Python {info.get('python')}, torch {info.get('torch', '?')}; "
        f"commit {info.get('git_commit') or '?'}; {info.get('utc')}"
    )


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return path


def _jsonable(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            return float(obj)
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return "-"
    if fmt and isinstance(value, (int, float)):
        return format(value, fmt)
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str] | tuple[str, str, str]], markdown: bool = False
) -> str:
    """Render rows as an aligned text table (or a GitHub markdown table).

    ``columns``: (key, header) or (key, header, format spec, e.g. ".1f").
    """
    heads = [c[1] for c in columns]
    body = [[_cell(r.get(c[0]), c[2] if len(c) > 2 else None) for c in columns] for r in rows]
    if markdown:
        lines = [
            "| " + " | ".join(heads) + " |",
            "|" + "|".join("---:" if i else "---" for i in range(len(heads))) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(heads)]
    fmt_row = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt_row(heads), fmt_row(["-" * w for w in widths])]
    lines += [fmt_row(row) for row in body]
    return "\n".join(lines)


def int_list(text: str) -> list[int]:
    """argparse type for "1,2,8": positive integers, comma-separated."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
