"""Run the API server as a child process (scripts/serve and the tests use this)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence


class APIServerError(RuntimeError):
    pass


class APIServerProcess:
    """``python -m mm_openai ARGS`` in its own process group, logging to ``log_file``.

    ``start()`` returns once ``GET /v1/models`` answers (the app is up; Triton may still be loading);
    ``stop()`` sends SIGTERM, then SIGKILL after ``stop_timeout_s``.
    """

    def __init__(
        self,
        args: Sequence[str],
        host: str,
        port: int,
        log_file: Path | None = None,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.args, self.host, self.port, self.log_file = list(args), host, port, log_file
        self.env = {**os.environ, **(env or {})}
        self.python = python
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> APIServerProcess:
        cmd = [self.python, "-m", "mm_openai", "--host", self.host, "--port", str(self.port), *self.args]
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        finally:
            if self.log_file:
                out.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise APIServerError(f"the API server exited with code {self.proc.returncode}{self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2):
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise APIServerError(f"the API server did not answer on {self.url} within {timeout_s:.0f} s{self._tail()}")

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, stop_timeout_s: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        return self.proc.returncode

    def _tail(self, lines: int = 15) -> str:
        if not self.log_file or not Path(self.log_file).exists():
            return ""
        text = Path(self.log_file).read_text(errors="replace").splitlines()[-lines:]
        return "\n" + "\n".join(text)

    def __enter__(self) -> APIServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
