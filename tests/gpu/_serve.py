"""``scripts/serve.py ARGS`` as a subprocess for GPU tests (the same idea as ``Served`` in
tests/integration/test_instances.py, which imports tritonclient.http and so cannot be imported on the GPU
machine): its own process group, dies with the test process, ready when it prints "tritonserver ready"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from harness import REPO_ROOT, child_setup, free_run, kill_group, parse_metrics


class Served:
    def __init__(
        self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None, timeout_s: float = 150
    ) -> None:
        base = free_run(3)
        self.name = name
        self.http_port, self.grpc_port, self.metrics_port = base, base + 1, base + 2
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = log_dir / f"serve-{name}.log"
        self.log_file.unlink(missing_ok=True)
        self.cmd = [
            sys.executable,
            "scripts/serve.py",
            *args,
            "--address",
            "127.0.0.1",
            "--port-base",
            str(base),
            "--log-file",
            str(self.log_file),
        ]
        parent = os.getpid()
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            preexec_fn=lambda: child_setup(parent, True),
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        t0 = time.monotonic()
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout_s:
                self.stop()
                raise RuntimeError(
                    f"{' '.join(self.cmd)} did not start:\n{self.output}\n--- log tail:\n"
                    + "\n".join(self.log_text().splitlines()[-40:])
                )
        self.startup_s = time.monotonic() - t0

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "tritonserver ready" in line:
                self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def metrics(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return parse_metrics(r.read().decode())

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        kill_group(self.proc.pid)
        self.proc.wait(timeout=10)
        return self.proc.returncode

    def __repr__(self) -> str:
        return f"<Served {self.name} http {self.http_address}>"
