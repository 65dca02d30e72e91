"""scripts/serve as an operator runs it: the monolithic baseline is not loaded by default, the repository and
shared-memory APIs are closed to clients, and a tritonserver that dies is started again."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from harness import REPO_ROOT, free_port

pytestmark = pytest.mark.integration


def _status(url: str, method: str = "GET", body: bytes | None = None) -> int:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


class _Serve:
    def __init__(self, *args: str) -> None:
        self.http = free_port()
        base = self.http
        while not all(_free(p) for p in (base, base + 1, base + 2)):
            base = free_port()
        self.http = base
        env = {**os.environ, "MM_CHECKPOINT": str(REPO_ROOT / ".cache" / "models" / "tiny-qwen2-vl")}
        self.proc = subprocess.Popen(
            [
                str(REPO_ROOT / "scripts" / "serve"),
                "--port-base",
                str(base),
                "--address",
                "127.0.0.1",
                "--no-openai",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in serve's output:\n{''.join(self.lines[-40:])}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_serve_defaults_and_restart_after_tritonserver_dies():
    serve = _Serve()
    try:
        pid = int(serve.wait_for(r"tritonserver ready in .* pid (\d+)", 600).group(1))
        url = f"http://127.0.0.1:{serve.http}"
        assert _status(f"{url}/v2/models/mm_pipeline/ready") == 200
        assert _status(f"{url}/v2/models/mm_monolithic/ready") != 200  # --with-baseline loads it
        # closed to clients: load/unload, and the shared-memory APIs (a client once wrote into a stub's region)
        assert _status(f"{url}/v2/repository/models/mm_pipeline/unload", "POST", b"{}") == 403
        assert _status(f"{url}/v2/systemsharedmemory/status") == 403
        assert _status(f"{url}/v2/cudasharedmemory/status") == 403
        # the only credential (the internal token the watchdog reloads with) is on no command line or environment
        from mm_triton.access import per_server_secret

        secret = per_server_secret(pid)
        for proc in [pid, serve.proc.pid] + [int(p) for p in os.listdir("/proc") if p.isdigit()]:
            for what in ("cmdline", "environ"):
                try:
                    assert secret.encode() not in open(f"/proc/{proc}/{what}", "rb").read()
                except OSError:
                    continue
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        serve.wait_for(r"tritonserver restarted \(restart 1\)", 600)
        while _status(f"{url}/v2/health/ready") != 200:
            assert time.monotonic() - killed_at < 600
            time.sleep(0.5)
        print(f"serving again {time.monotonic() - killed_at:.1f}s after SIGKILL of tritonserver", file=sys.stderr)
    finally:
        serve.stop()
