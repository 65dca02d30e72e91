"""Background samplers for a benchmark run: process memory (/proc) and Prometheus metrics."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

from mm_triton import procfs

# ---------------------------------------------------------------------------------------- processes
descendants = procfs.descendants  # ``root`` and every live process below it (tritonserver and its stubs)


def process_label(pid: int) -> str:
    """ "tritonserver", the model name of a Python-backend stub, or the command name."""
    argv = procfs.cmdline(pid)
    if argv is None:
        return "?"
    name = os.path.basename(argv[0]) if argv and argv[0] else "?"
    if name == "triton_python_backend_stub" and len(argv) > 1:
        model_py = Path(argv[1])
        return model_py.parents[1].name if len(model_py.parents) > 1 else name
    return name


def memory_kib(pid: int) -> tuple[int, int | None]:
    """(RSS, PSS) in KiB; PSS (shared pages split between their users) when smaps_rollup is readable."""
    rss = procfs.rss_kib(pid)
    if rss is None:
        return 0, None
    return rss, procfs.pss_kib(pid)


class MemorySampler:
    """Samples RSS/PSS of a process tree every ``interval_s``; peaks in MiB, total and per label."""

    def __init__(self, root_pid: int, interval_s: float = 0.5) -> None:
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.peak_rss_mib = 0.0
        self.peak_pss_mib: float | None = None
        self.peak_by_label: dict[str, float] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mem-sampler", daemon=True)

    def sample(self) -> None:
        total_rss, total_pss, pss_ok = 0, 0, True
        for pid in descendants(self.root_pid):
            rss, pss = memory_kib(pid)
            label = process_label(pid)
            total_rss += rss
            if pss is None:
                pss_ok = False
            else:
                total_pss += pss
            self.peak_by_label[label] = max(self.peak_by_label.get(label, 0.0), rss / 1024)
        self.peak_rss_mib = max(self.peak_rss_mib, total_rss / 1024)
        if pss_ok:
            self.peak_pss_mib = max(self.peak_pss_mib or 0.0, total_pss / 1024)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()

    def result(self) -> dict:
        return {
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "peak_pss_mib": round(self.peak_pss_mib, 1) if self.peak_pss_mib is not None else None,
            "peak_rss_by_process_mib": {k: round(v, 1) for k, v in sorted(self.peak_by_label.items())},
            "samples": self.samples,
        }


# ------------------------------------------------------------------------------------------ metrics
Metrics = Mapping[tuple[str, tuple[tuple[str, str], ...]], float]


def metric_sum(metrics: Metrics, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``; 0 when none."""
    total = 0.0
    for (n, lab), v in metrics.items():
        if n == name:
            d = dict(lab)
            if all(d.get(k) == val for k, val in labels.items()):
                total += v
    return total


class PoolSampler:
    """Polls the metrics endpoint; keeps the max and mean of ``mm_pool_blocks_used`` per model."""

    def __init__(
        self,
        fetch: Callable[[], Metrics],
        models: tuple[str, ...] = ("mm_encoder", "mm_language"),
        interval_s: float = 0.25,
    ) -> None:
        self.fetch = fetch
        self.models = models
        self.interval_s = interval_s
        self.max_used = {m: 0.0 for m in models}
        self.sum_used = {m: 0.0 for m in models}
        self.total = {m: 0.0 for m in models}
        self.samples = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pool-sampler", daemon=True)

    def sample(self) -> None:
        try:
            m = self.fetch()
        except Exception:
            self.errors += 1
            return
        for model in self.models:
            used = metric_sum(m, "mm_pool_blocks_used", model=model)
            self.max_used[model] = max(self.max_used[model], used)
            self.sum_used[model] += used
            self.total[model] = max(self.total[model], metric_sum(m, "mm_pool_blocks_total", model=model))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PoolSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def result(self) -> dict:
        out = {}
        for model in self.models:
            total = self.total[model]
            out[model] = {
                "blocks_total": total,
                "max_used": self.max_used[model],
                "max_utilisation": self.max_used[model] / total if total else None,
                "mean_utilisation": (self.sum_used[model] / self.samples / total) if total and self.samples else None,
            }
        return out


# ------------------------------------------------------------------------------------------ GPU memory
def gpu_memory_used_mib() -> dict[int, float] | None:
    """Memory in use per GPU (MiB, all processes: nvidia-smi's memory.used), or None without nvidia-smi."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used: dict[int, float] = {}
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            try:
                used[int(parts[0])] = float(parts[1])
            except ValueError:
                pass
    return used or None


class GpuMemorySampler:
    """Peak memory in use per GPU during a load point (nvidia-smi every ``interval_s``), also relative to a
    ``baseline`` taken before the server started (so the server's own share: weights, pools, allocator)."""

    def __init__(self, baseline: dict[int, float] | None = None, interval_s: float = 0.5) -> None:
        self.baseline = dict(baseline or {})
        self.interval_s = interval_s
        self.peak: dict[int, float] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-mem-sampler", daemon=True)

    def sample(self) -> None:
        used = gpu_memory_used_mib()
        if not used:
            return
        for gpu, mib in used.items():
            self.peak[gpu] = max(self.peak.get(gpu, 0.0), mib)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GpuMemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        self.sample()

    def result(self) -> dict:
        return {
            "peak_used_mib": {str(g): round(v, 1) for g, v in sorted(self.peak.items())},
            "baseline_mib": {str(g): round(v, 1) for g, v in sorted(self.baseline.items())},
            "peak_server_mib": {str(g): round(v - self.baseline.get(g, 0.0), 1) for g, v in sorted(self.peak.items())},
            "samples": self.samples,
        }


def wait_until(pred: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval_s)
    return pred()


# ------------------------------------------------------------------------------------------ CPU
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_jiffies() -> int:
    """All CPUs' non-idle jiffies since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle


def _tree_jiffies(root: int) -> int:
    stats = (procfs.proc_stat(pid) for pid in descendants(root))
    return sum(s.utime + s.stime for s in stats if s is not None)


class CpuAccount:
    """Where the machine's CPU time went during a run, in cores (CPU-seconds per second):
    the server tree, the load generator (this process's waited-for children, e.g. perf_analyzer),
    this process, and everything else ("other": a noisy neighbour makes a run not comparable)."""

    def __init__(self, server_pid: int = 0) -> None:
        self.server_pid = server_pid

    def __enter__(self) -> CpuAccount:
        import resource

        self._t0 = time.monotonic()
        self._busy0 = _busy_jiffies()
        self._srv0 = _tree_jiffies(self.server_pid) if self.server_pid else 0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._child0 = ru.ru_utime + ru.ru_stime
        t = os.times()
        self._self0 = t.user + t.system
        return self

    def __exit__(self, *exc) -> None:
        import resource

        dt = max(time.monotonic() - self._t0, 1e-9)
        busy = (_busy_jiffies() - self._busy0) / _HZ
        server = ((_tree_jiffies(self.server_pid) - self._srv0) / _HZ) if self.server_pid else 0.0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        client = ru.ru_utime + ru.ru_stime - self._child0
        t = os.times()
        me = t.user + t.system - self._self0
        self.cores = {
            "total": busy / dt,
            "server": server / dt,
            "load_generator": client / dt,
            "bench": me / dt,
            "other": max(0.0, busy - server - client - me) / dt,
            "nproc": os.cpu_count(),
        }

    def result(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in self.cores.items()}


def other_cpu(server_pid: int = 0, window_s: float = 2.0) -> float:
    """Cores busy over ``window_s`` outside the server tree and this process (neighbours' load)."""
    busy0, srv0 = _busy_jiffies(), (_tree_jiffies(server_pid) if server_pid else 0)
    t = os.times()
    me0 = t.user + t.system
    time.sleep(window_s)
    busy = (_busy_jiffies() - busy0) / _HZ
    srv = ((_tree_jiffies(server_pid) - srv0) / _HZ) if server_pid else 0.0
    t = os.times()
    return max(0.0, busy - srv - (t.user + t.system - me0)) / window_s


def wait_for_quiet(server_pid: int, threshold_cores: float, timeout_s: float, window_s: float = 2.0) -> float:
    """Wait (up to ``timeout_s``) until other processes use less than ``threshold_cores``; returns the last
    measurement."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = other_cpu(server_pid, window_s)
        if load < threshold_cores or time.monotonic() >= deadline:
            return load
