"""Start and stop a real ``tritonserver`` (2.51, from the nvidia-pytriton wheel): the launcher behind
scripts/serve.py, the benchmarks, the soak and the tests.

    from mm_triton.launcher import TritonServer

    with TritonServer(model_repository, env={"MM_POOL_BLOCKS": "8"}) as server:
        client = tritonclient.http.InferenceServerClient(server.http_address)
        ...
        metric_value(server.metrics(), "nv_inference_request_success", model="mm_pipeline")

The server gets free ports (unless given), logs to a file, and is ready when ``/v2/health/ready`` answers
200 (all models loaded). A server that dies or is not ready in time raises ``TritonStartError`` with the tail
of its log. ``stop()`` sends SIGTERM, then SIGKILL to the whole process group (tritonserver and its Python
stubs) after a grace period. A server is never left behind: ``stop()`` runs on ``__exit__``, at interpreter
exit (atexit), and the server's process gets SIGTERM when the process that started it dies
(PR_SET_PDEATHSIG), even if that one is SIGKILLed.

Paths and environment: :mod:`mm_triton.server_env`; process groups: :mod:`mm_triton.processes`.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Mapping

from .ports import distinct_free_ports
from .processes import child_setup, kill_group
from .prometheus import Metrics, parse_metrics
from .server_env import (
    DEFAULT_MODEL_REPOSITORY,
    REPO_ROOT,
    TritonStartError,
    find_backend_dir,
    find_tritonserver,
    server_env,
)

__all__ = ["TritonServer", "TritonStartError"]

_ERROR_LINE = re.compile(r"^E\d{4} ")
_HARMLESS = (  # errors Triton logs on a machine without a GPU, whatever the models do
    "CudaDriverHelper has not been initialized",
    "unable to create stream for",
)

_LIVE: set[TritonServer] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for s in servers:
        try:
            s.stop()
        except Exception:
            pass


class TritonServer:
    """A real tritonserver process. Use as a context manager, or ``start()`` / ``stop()``.

    model_repository: a directory, or several (each becomes one --model-repository); default model_repository/.
    env:              extra environment variables for the server and its Python stubs (e.g. MM_* overrides).
    args:             extra tritonserver arguments (e.g. ["--log-verbose=1"]).
    http_port, grpc_port, metrics_port: fixed ports; None picks free ones (retrying if one gets taken).
    host:             address to bind and to reach the server at (127.0.0.1; "0.0.0.0" binds all and is
                      reached at 127.0.0.1).
    log_file:         where the server's output goes (default: a new file under the system temp dir).
    startup_timeout_s: how long to wait for /v2/health/ready.
    stop_timeout_s:   grace period between SIGTERM and SIGKILL.
    exit_timeout_s:   passed as --exit-timeout-secs (how long Triton waits for in-flight requests).
    die_with_parent:  the server gets SIGTERM when the thread that started it exits (PR_SET_PDEATHSIG):
                      start servers from the main thread or a thread that lives as long as they do.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        args: Iterable[str] = (),
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        host: str = "127.0.0.1",
        log_file: str | os.PathLike | None = None,
        startup_timeout_s: float = 120.0,
        stop_timeout_s: float = 20.0,
        exit_timeout_s: int = 5,
        backend_dir: str | os.PathLike | None = None,
        tritonserver: str | os.PathLike | None = None,
        die_with_parent: bool = True,
    ) -> None:
        if model_repository is None:
            repos = [DEFAULT_MODEL_REPOSITORY]
        elif isinstance(model_repository, (str, os.PathLike)):
            repos = [Path(model_repository)]
        else:
            repos = [Path(r) for r in model_repository]
        self.model_repositories = [r.resolve() for r in repos]
        self.extra_env = dict(env or {})
        self.extra_args = list(args)
        self._fixed_ports = (http_port, grpc_port, metrics_port)
        self.host = host
        self.connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self.log_file = Path(log_file) if log_file else None
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.backend_dir = Path(backend_dir) if backend_dir else None
        self.tritonserver = Path(tritonserver) if tritonserver else None
        self.die_with_parent = die_with_parent
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.proc: subprocess.Popen | None = None
        self._log_fh = None

    # ------------------------------------------------------------------------------- addresses
    @property
    def http_address(self) -> str:
        """host:port, as tritonclient.http wants it."""
        return f"{self.connect_host}:{self.http_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_address}"

    @property
    def grpc_url(self) -> str:
        """host:port, as tritonclient.grpc wants it."""
        return f"{self.connect_host}:{self.grpc_port}"

    grpc_address = grpc_url

    @property
    def metrics_url(self) -> str:
        return f"http://{self.connect_host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        return f"<TritonServer {self.http_address} {state} repo={[str(r) for r in self.model_repositories]}>"

    # ------------------------------------------------------------------------------------ life
    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def command(self) -> list[str]:
        cmd = [str(self.tritonserver or find_tritonserver())]
        for repo in self.model_repositories:
            cmd.append(f"--model-repository={repo}")
        cmd += [
            f"--backend-directory={self.backend_dir or find_backend_dir()}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
        ]
        return cmd + self.extra_args

    def start(self) -> TritonServer:
        if self.is_running():
            return self
        for repo in self.model_repositories:
            if not repo.is_dir():
                raise TritonStartError(f"model repository not found: {repo}")
        auto_ports = None in self._fixed_ports
        attempts = 3 if auto_ports else 1
        for attempt in range(attempts):
            picked = iter(distinct_free_ports(3, self.connect_host))
            self.http_port, self.grpc_port, self.metrics_port = (p if p else next(picked) for p in self._fixed_ports)
            try:
                self._launch_and_wait()
                return self
            except TritonStartError as e:
                port_clash = "address already in use" in str(e).lower() or "failed to start" in str(e).lower()
                if attempt + 1 < attempts and port_clash:
                    continue
                raise

    def _launch_and_wait(self) -> None:
        if self.log_file is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_file = Path(name)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self.log_file, "ab")
        self._log_offset = self._log_fh.tell()
        cmd = self.command()
        self._log_fh.write(("$ " + " ".join(cmd) + "\n").encode())
        self._log_fh.flush()
        parent = os.getpid()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=server_env(self.extra_env),
            cwd=str(REPO_ROOT),
            preexec_fn=lambda: child_setup(parent, self.die_with_parent),
        )
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self.wait_ready(self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.http_address}/v2/health/ready"
        while True:
            rc = self.proc.poll() if self.proc else None
            if rc is not None:
                time.sleep(0.1)  # let the last log lines land
                raise TritonStartError(
                    f"tritonserver exited with code {rc} before it was ready "
                    f"(log: {self.log_file})\n{self.failure_report()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TritonStartError(
                    f"tritonserver not ready after {timeout_s:g} s (log: {self.log_file})\n{self.failure_report()}"
                )
            time.sleep(0.2)

    def stop(self) -> int | None:
        """Stop the server (idempotent). Returns its exit code (negative: killed by that signal)."""
        proc = self.proc
        if proc is None:
            return None
        pgid = proc.pid  # setsid() in the child: its pid is its process group id
        try:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    kill_group(pgid)
                    proc.wait(timeout=10)
            # Python stubs normally exit with the server; anything left in its group goes now.
            kill_group(pgid)
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(self)
            if self._log_fh:
                self._log_fh.close()
                self._log_fh = None
        return proc.returncode

    # --------------------------------------------------------------------------------- reading
    def log_text(self) -> str:
        """This run's log (from its start in the file)."""
        if not self.log_file or not self.log_file.exists():
            return ""
        with open(self.log_file, "rb") as fh:
            fh.seek(getattr(self, "_log_offset", 0))
            return fh.read().decode(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return "\n".join("    | " + line for line in tail)

    def log_errors(self, limit: int = 6) -> list[str]:
        """Triton's error lines (E....), the escaped tracebacks in them expanded, harmless CPU noise left out."""
        errors: list[str] = []
        for line in self.log_text().splitlines():
            if not _ERROR_LINE.match(line) or any(noise in line for noise in _HARMLESS):
                continue
            text = line.replace("\\n", "\n")
            lines = text.splitlines()
            if len(lines) > 30:
                lines = lines[:30] + [f"... ({len(lines) - 30} more lines)"]
            text = "\n".join(lines)
            if text not in errors:
                errors.append(text)
        return errors[:limit]

    def failure_report(self, tail_lines: int = 15) -> str:
        """What went wrong, for a person: the error lines, then the log tail without the status tables."""
        parts = []
        errors = self.log_errors()
        if errors:
            parts.append("  errors in the log:")
            parts += ["    | " + line for e in errors for line in e.splitlines()]
        tail = [ln for ln in self.log_text().splitlines() if not ln.lstrip().startswith(("|", "+"))][-tail_lines:]
        parts.append("  log tail:")
        parts += ["    | " + ln for ln in tail]
        return "\n".join(parts)

    def metrics_text(self, timeout_s: float = 5.0) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=timeout_s) as r:
            return r.read().decode()

    def metrics(self) -> Metrics:
        return parse_metrics(self.metrics_text())

    def model_ready(self, model: str, version: str = "") -> bool:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/ready"
        try:
            with urllib.request.urlopen(f"http://{self.http_address}{path}", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False
